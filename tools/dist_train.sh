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

if [ $# -lt 2 ]; then
    echo "dist_train.sh: error: usage: tools/dist_train.sh CONFIG NPROC [train.py args]" >&2
    exit 2
fi
CONFIG=$1
NPROC=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
for var in NPROC NNODES; do
    if ! [[ ${!var} =~ ^[1-9][0-9]*$ ]]; then
        echo "dist_train.sh: error: $var must be a positive integer, got '${!var}'" >&2
        exit 2
    fi
done
if ! [[ $MAX_RESTARTS =~ ^[0-9]+$ ]]; then
    echo "dist_train.sh: error: MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'" >&2
    exit 2
fi
if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "dist_train.sh: error: NODE_RANK must be in 0..$((NNODES - 1)) for NNODES=$NNODES, got '$NODE_RANK'" >&2
    exit 2
fi

TOOLS=$(dirname "$0")
export PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}"
python "$TOOLS/train.py" "$CONFIG" "${@:3}" --dry-run $((NNODES * NPROC)) >/dev/null
if [ -z "${PORT:-}" ] && [ "$NNODES" -eq 1 ]; then
    RENDEZVOUS=(--standalone)
else
    PORT=${PORT:-29500}
    if [ "$NODE_RANK" -eq 0 ]; then
        # Node 0 listens on PORT: say so in one line if it is taken.
        python - "$MASTER_ADDR" "$PORT" <<'PYTHON'
import errno, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
try:
    with socket.create_server((addr, port)):
        pass
except OSError as e:
    if e.errno != errno.EADDRINUSE:
        sys.exit(0)
    with socket.create_server((addr, 0)) as s:
        free = s.getsockname()[1]
    print(f'dist_train.sh: error: PORT={port} is in use on {addr} (another '
          f'job?): choose a free one, e.g. PORT={free}, or on one node leave '
          'PORT unset to let torchrun pick one', file=sys.stderr)
    sys.exit(2)
PYTHON
    fi
    RENDEZVOUS=(--nnodes="$NNODES" --node-rank="$NODE_RANK"
                --master-addr="$MASTER_ADDR" --master-port="$PORT")
fi
# torchrun in a session of its own: Ctrl-C reaches this script alone, which
# stops torchrun and its workers with SIGTERM and says so in one line.
setsid python "$TOOLS/misc/torchrun.py" \
    "${RENDEZVOUS[@]}" \
    --max-restarts="$MAX_RESTARTS" \
    --nproc-per-node="$NPROC" \
    "$TOOLS/train.py" "$CONFIG" --launcher pytorch "${@:3}" &
TORCHRUN=$!
INTERRUPTED=0
trap 'kill -TERM $TORCHRUN 2>/dev/null; INTERRUPTED=1' INT TERM
while true; do
    wait $TORCHRUN && STATUS=0 || STATUS=$?
    kill -0 $TORCHRUN 2>/dev/null || break
done
if [ "$INTERRUPTED" -eq 1 ]; then
    echo "dist_train.sh: interrupted: torchrun and its workers stopped; add --resume to continue from the last checkpoint" >&2
    exit 130
fi
exit $STATUS
