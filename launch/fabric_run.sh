#!/usr/bin/env bash
# Several processes on this machine (GPUs, or CPU processes over gloo) with Lightning's `fabric run`.
#
#   launch/fabric_run.sh attribute --config configs/attribute-embedded.yaml --out_dir out/attr
#   ACCELERATOR=cpu DEVICES=2 launch/fabric_run.sh attribute --model random:tiny --out_dir /tmp/a
#   DEVICES=8 launch/fabric_run.sh run --config configs/llama3-8b-toxicity.yaml --config configs/llama3-8b-h200.yaml
#
# Variables (environment):
#   ACCELERATOR  cpu | cuda | gpu | auto (default auto: the config decides in each process)
#   DEVICES      processes per node (default: the GPUs nvidia-smi lists, or 1)
#   NUM_NODES    nodes (default 1); on more than one, run this on every node with NODE_RANK,
#   NODE_RANK    MAIN_ADDRESS (node 0's address) and MAIN_PORT (default 29400)
#   PRECISION    Fabric precision, e.g. bf16-true (default: the config's, see below)
#   STRATEGY     auto | ddp (default: the config's). fsdp is not supported yet: the engine refuses
#                it, since every rank would still hold the whole model
#   DRY_RUN=1    print the command instead of running it
#
# `fabric run` starts the processes itself (torchrun) and hands Fabric its settings as LT_*
# variables; Fabric refuses a value set differently in code, so the same accelerator, devices and
# nodes are also appended to the sparc options (they override the config). Precision and strategy go
# to sparc only, as --fabric.precision/--fabric.strategy, so that the config and this launcher
# cannot disagree. (The engine passes the strategy to Fabric as a plain string, so giving `fabric
# run` the same --strategy would also work; one that differs from a non-auto fabric.strategy in the
# config ends in a one-line `error: invalid Fabric settings`.) Without PRECISION and without
# fabric.precision in the config, the engine uses bf16-true on GPUs and 32-true on CPUs, under
# `fabric run` too; only an LT_PRECISION set by `fabric run --precision` (which this script never
# passes) would replace that.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

command=${1:-}
case $command in
    attribute | run) ;;
    prune | evaluate) die "sparc $command runs in one process: call \`sparc $command\` directly" ;;
    *) die "usage: launch/fabric_run.sh attribute|run [sparc options...]" ;;
esac

ACCELERATOR=${ACCELERATOR:-}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAIN_ADDRESS=${MAIN_ADDRESS:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29400}
PRECISION=${PRECISION:-}
STRATEGY=${STRATEGY:-}
DEVICES=${DEVICES:-auto}
if [[ $DEVICES == auto ]]; then
    # `fabric run --devices auto` starts one process even with several GPUs: count them here.
    gpus=0
    if [[ $ACCELERATOR != cpu ]] && command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    DEVICES=$(( gpus > 0 ? gpus : 1 ))
fi

fabric_args=(--devices "$DEVICES" --num_nodes "$NUM_NODES" --node_rank "$NODE_RANK"
             --main_address "$MAIN_ADDRESS" --main_port "$MAIN_PORT")
sparc_args=("$@" --fabric.devices "$DEVICES" --fabric.num_nodes "$NUM_NODES")
if [[ -n $ACCELERATOR ]]; then
    fabric_args=(--accelerator "$ACCELERATOR" "${fabric_args[@]}")
    sparc_args+=(--fabric.accelerator "$ACCELERATOR")
fi
[[ -n $PRECISION ]] && sparc_args+=(--fabric.precision "$PRECISION")
[[ -n $STRATEGY ]] && sparc_args+=(--fabric.strategy "$STRATEGY")

run "$FABRIC" run "${fabric_args[@]}" "$SPARC_ROOT/launch/sparc_entry.py" "${sparc_args[@]}"
