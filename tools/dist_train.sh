#!/usr/bin/env bash
# Train with torchrun on NPROC processes per node:
#   tools/dist_train.sh CONFIG NPROC [tools/train.py arguments]
# Several nodes: run it on each node with NNODES, NODE_RANK (0..NNODES-1),
# MASTER_ADDR (the address of node 0) and PORT set alike, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 PORT=29500 tools/dist_train.sh CONFIG 8
# On one node without PORT, torchrun picks a free port (--standalone), so jobs
# sharing a machine do not collide. MAX_RESTARTS=N lets torchrun restart the
# workers up to N times after a failure; they resume from the newest
# checkpoint of the work dir that loads.
# The config, data, work dir and checkpoint, and the split of the train set
# over NNODES*NPROC processes are checked first (tools/train.py --dry-run),
# so bad input fails in one line.
set -eu
case "${1:-}" in -h | --help)
    sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0 ;;
esac

if [ $# -lt 2 ]; then
    echo "dist_train.sh: error: usage: tools/dist_train.sh CONFIG NPROC [train.py args]" >&2
    exit 2
fi
CONFIG=$1
TOOLS=$(dirname "$0")
# shellcheck source=tools/misc/torchrun.sh
source "$TOOLS/misc/torchrun.sh"
launch_settings dist_train.sh "$2"
# In a checkout, its mmsync; installed (mmsync/.mim/tools), the package's.
if [ -f "$TOOLS/../mmsync/__init__.py" ]; then
    export PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}"
fi
python "$TOOLS/train.py" "$CONFIG" "${@:3}" --dry-run $((NNODES_MAX * NPROC)) >/dev/null
INTERRUPT_HINT="add --resume to continue from the last checkpoint"
run_torchrun dist_train.sh "$NPROC" "$TOOLS/train.py" "$CONFIG" --launcher pytorch "${@:3}"
