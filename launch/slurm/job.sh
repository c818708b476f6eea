# Sourced by the .sbatch scripts: job geometry, one task per GPU, and the time-limit warning.
#
# submit.sh asks SLURM for SIGTERM to this batch shell 120 s before the time limit
# (--signal=B:TERM@120). The shell passes it on to the running step: the sparc processes write a
# checkpoint and stop, and the job is requeued (--requeue). The requeued job runs the same
# commands; finished steps are skipped where a script checks for their output, and an interrupted
# `sparc attribute` resumes from its checkpoint.

source "$SPARC_ROOT/launch/common.sh"

# Inside a job SLURM says how many nodes and tasks per node there are; DRY_RUN takes them from
# NODES and GPUS like submit.sh does.
NODES=${SLURM_JOB_NUM_NODES:-${NODES:-1}}
GPUS=${SLURM_NTASKS_PER_NODE:-${GPUS:-1}}
# One task per GPU on every node: Fabric's SLURMEnvironment reads rank, world size and the main
# address from srun's variables, and checks that --fabric.devices equals the tasks per node.
SRUN=(srun --nodes="$NODES" --ntasks-per-node="$GPUS" --kill-on-bad-exit=1)
FABRIC_GEOMETRY=(--fabric.devices "$GPUS" --fabric.num_nodes "$NODES")

job_header() {
    [[ $DRY_RUN == 1 ]] && return 0
    {
        echo "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) on ${SLURM_JOB_NODELIST:-?}: $NODES node(s) x $GPUS GPU(s)," \
             "restart ${SLURM_RESTART_COUNT:-0}"
        # whether the token is there, never its value
        echo "HF_TOKEN $([[ -n ${HF_TOKEN:-} ]] && echo set || echo unset); HF_HOME=${HF_HOME:-default};" \
             "SPARC_CACHE=${SPARC_CACHE:-default}"
    } >&2
}

# A warning that arrives between two steps is remembered, and the job requeues before the next one.
_term_received=0
[[ $DRY_RUN == 1 ]] || trap '_term_received=1' TERM

_requeue() {
    echo "requeueing job $SLURM_JOB_ID: its rerun skips finished steps and resumes from the checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}

_on_term() {  # kind pid
    _term_received=1
    echo "SIGTERM: the time limit is near; the running step writes a checkpoint and stops" >&2
    if [[ $1 == srun ]]; then
        # every job step, not this batch shell (scancel leaves the batch step alone unless --full)
        scancel --signal=TERM "$SLURM_JOB_ID"
    else
        kill -TERM "$2" 2>/dev/null || true
    fi
}

# step srun|local COMMAND...: run one step of the job. `srun` steps are started by srun on every
# node; `local` steps (prune, evaluate) run in this shell on the first node.
step() {
    local kind=$1 pid rc
    shift
    if [[ $kind == srun ]]; then
        set -- "${SRUN[@]}" "$@"
    fi
    if [[ $DRY_RUN == 1 ]]; then
        show "$@"
        return 0
    fi
    [[ $_term_received == 0 ]] || _requeue
    echo "+ $(show "$@")" >&2
    "$@" &
    pid=$!
    trap "_on_term $kind $pid" TERM
    while :; do
        rc=0
        wait "$pid" || rc=$?
        # a trapped signal ends `wait` early: wait again until the step has really finished
        kill -0 "$pid" 2>/dev/null || break
    done
    trap '_term_received=1' TERM
    if [[ $_term_received == 1 ]]; then
        echo "the step stopped with exit code $rc after SIGTERM" >&2
        _requeue
    fi
    return "$rc"
}

# unless_done FILE COMMAND...: skip a step whose output exists (a requeued job repeats the script).
unless_done() {
    local output=$1
    shift
    if [[ -e $output ]]; then
        echo "# done: $output exists, skipping: $(show "$@")" >&2
        return 0
    fi
    "$@"
}
