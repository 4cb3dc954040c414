#!/usr/bin/env bash
# Train with torchrun on NPROC processes per node:
#   tools/dist_train.sh CONFIG NPROC [tools/train.py arguments]
# Several nodes: run it on each node with NNODES, NODE_RANK (0..NNODES-1),
# MASTER_ADDR (the address of node 0) and PORT set alike, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 PORT=29500 tools/dist_train.sh CONFIG 8
# The config and the split of the train set over NNODES*NPROC processes are
# checked first (tools/train.py --dry-run), so bad input fails in one line.
set -eu

if [ $# -lt 2 ]; then
    echo "dist_train.sh: error: usage: tools/dist_train.sh CONFIG NPROC [train.py args]" >&2
    exit 2
fi
CONFIG=$1
NPROC=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PORT=${PORT:-29500}
for var in NPROC NNODES; do
    if ! [[ ${!var} =~ ^[1-9][0-9]*$ ]]; then
        echo "dist_train.sh: error: $var must be a positive integer, got '${!var}'" >&2
        exit 2
    fi
done
if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "dist_train.sh: error: NODE_RANK must be in 0..$((NNODES - 1)) for NNODES=$NNODES, got '$NODE_RANK'" >&2
    exit 2
fi

TOOLS=$(dirname "$0")
export PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}"
python "$TOOLS/train.py" "$CONFIG" "${@:3}" --dry-run $((NNODES * NPROC)) >/dev/null
exec torchrun \
    --nnodes="$NNODES" \
    --node-rank="$NODE_RANK" \
    --master-addr="$MASTER_ADDR" \
    --master-port="$PORT" \
    --nproc-per-node="$NPROC" \
    "$TOOLS/train.py" "$CONFIG" --launcher pytorch "${@:3}"
