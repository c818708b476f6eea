# Shared by the launch scripts (sourced, not run): repository root, executables, DRY_RUN.
#
# DRY_RUN=1 prints every command (sbatch, srun, fabric, sparc) on one line of stdout instead of
# running it; arguments with shell-special characters are quoted so that a line can be pasted back.
# Otherwise each command is echoed to stderr with a "+ " prefix (it lands in the job log) and run.

# sbatch runs a copy of the batch script from a spool directory, so the root comes from the
# environment that submit.sh exports (or the submit directory), not from the script's own path.
SPARC_ROOT=${SPARC_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
DRY_RUN=${DRY_RUN:-0}

# An executable from PATH, else from the repository's virtual environment, else the bare name.
tool() {
    if command -v "$1" >/dev/null 2>&1; then
        echo "$1"
    elif [[ -x "$SPARC_ROOT/.venv/bin/$1" ]]; then
        echo "$SPARC_ROOT/.venv/bin/$1"
    else
        echo "$1"
    fi
}
SPARC=${SPARC:-$(tool sparc)}
FABRIC=${FABRIC:-$(tool fabric)}

# One command line, quoted only where the shell needs it.
show() {
    local out=() a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a"); else out+=("${a@Q}"); fi
    done
    echo "${out[*]}"
}

run() {
    if [[ $DRY_RUN == 1 ]]; then
        show "$@"
    else
        echo "+ $(show "$@")" >&2
        "$@"
    fi
}

die() {
    echo "error: $*" >&2
    exit 2
}
