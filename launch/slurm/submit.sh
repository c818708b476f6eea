#!/usr/bin/env bash
# Submit a sparc job to SLURM, resources from variables (#SBATCH lines cannot expand them).
#
#   launch/slurm/submit.sh attribute [sparc attribute options...]    one attribution (attribute.sbatch)
#   launch/slurm/submit.sh experiment [sparc attribute options...]   the paper experiment (experiment.sbatch)
#
# Variables (default):
#   PARTITION      gpu
#   GPUS           1          GPUs per node = tasks per node (one rank per GPU)
#   GPU_TYPE       (none)     e.g. h200 or a100 -> --gres=gpu:h200:GPUS
#   NODES          1
#   TIME           24:00:00
#   MEM            32G per GPU: each rank loads the bf16 checkpoint through host memory (16 GB for Llama-3-8B)
#   CPUS_PER_TASK  8
#   ACCOUNT, QOS   (none)     passed when set
#   JOB_NAME       sparc-<job>
#   LOG_DIR        logs       one log per job: LOG_DIR/<job name>-<job id>.out (appended when requeued)
#   SIGNAL_SECONDS 120        SIGTERM this long before the time limit: the engine writes a checkpoint
#   SBATCH_EXTRA   (none)     further sbatch options, split on spaces
#   DRY_RUN=1                 print the sbatch command and the commands the job would run
# HF_TOKEN, HF_HOME and SPARC_CACHE travel with the environment (--export=ALL).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

job=${1:-}
[[ $job == attribute || $job == experiment ]] || die "usage: launch/slurm/submit.sh attribute|experiment [sparc options...]"
shift

PARTITION=${PARTITION:-gpu}
GPUS=${GPUS:-1}
NODES=${NODES:-1}
TIME=${TIME:-24:00:00}
MEM=${MEM:-$((32 * GPUS))G}
CPUS_PER_TASK=${CPUS_PER_TASK:-8}
JOB_NAME=${JOB_NAME:-sparc-$job}
LOG_DIR=${LOG_DIR:-logs}
SIGNAL_SECONDS=${SIGNAL_SECONDS:-120}
gres=gpu:${GPU_TYPE:+$GPU_TYPE:}$GPUS

options=(--job-name="$JOB_NAME" --partition="$PARTITION" --nodes="$NODES" --ntasks-per-node="$GPUS"
         --gres="$gres" --cpus-per-task="$CPUS_PER_TASK" --mem="$MEM" --time="$TIME"
         --signal=B:TERM@"$SIGNAL_SECONDS" --requeue --open-mode=append
         --output="$LOG_DIR/%x-%j.out" --chdir="$SPARC_ROOT" --export=ALL)
[[ -n ${ACCOUNT:-} ]] && options+=(--account="$ACCOUNT")
[[ -n ${QOS:-} ]] && options+=(--qos="$QOS")
# shellcheck disable=SC2206  # split on purpose
[[ -n ${SBATCH_EXTRA:-} ]] && options+=($SBATCH_EXTRA)

export SPARC_ROOT NODES GPUS
script=$SPARC_ROOT/launch/slurm/$job.sbatch
[[ $DRY_RUN == 1 ]] || mkdir -p "$SPARC_ROOT/$LOG_DIR"  # SLURM does not create the log directory
run sbatch "${options[@]}" "$script" "$@"
if [[ $DRY_RUN == 1 ]]; then
    # what the job will run, rendered with the same geometry
    bash "$script" "$@"
fi
