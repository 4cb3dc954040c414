# Sourced by tools/dist_train.sh and tools/dist_test.sh: start torchrun.
#   launch_settings PROG NPROC     defaults and checks of the variables below
#   run_torchrun PROG NPROC SCRIPT [SCRIPT args]
# Reads NNODES, NODE_RANK, MASTER_ADDR, PORT, MAX_RESTARTS and INTERRUPT_HINT
# (said after Ctrl-C). On one node without PORT,
# torchrun picks a free port (--standalone); a PORT that is taken on node 0
# ends in one line (exit 2). torchrun runs in a session of its own: Ctrl-C
# reaches the calling script alone, which stops torchrun and its workers
# with SIGTERM and says so in one line (exit 130).

launch_settings() {
    local prog=$1 var
    NPROC=$2
    NNODES=${NNODES:-1}
    NODE_RANK=${NODE_RANK:-0}
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    MAX_RESTARTS=${MAX_RESTARTS:-0}
    for var in NPROC NNODES; do
        if ! [[ ${!var} =~ ^[1-9][0-9]*$ ]]; then
            echo "$prog: error: $var must be a positive integer, got '${!var}'" >&2
            exit 2
        fi
    done
    if ! [[ $MAX_RESTARTS =~ ^[0-9]+$ ]]; then
        echo "$prog: error: MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'" >&2
        exit 2
    fi
    if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
        echo "$prog: error: NODE_RANK must be in 0..$((NNODES - 1)) for NNODES=$NNODES, got '$NODE_RANK'" >&2
        exit 2
    fi
}

run_torchrun() {
    local prog=$1 nproc=$2
    shift 2
    local tools rendezvous torchrun status interrupted=0
    tools=$(dirname "${BASH_SOURCE[0]}")/..
    if [ -z "${PORT:-}" ] && [ "$NNODES" -eq 1 ]; then
        rendezvous=(--standalone)
    else
        PORT=${PORT:-29500}
        if [ "$NODE_RANK" -eq 0 ]; then
            python "$tools/misc/torchrun.py" --check-port "$prog" \
                "$MASTER_ADDR" "$PORT"
        fi
        rendezvous=(--nnodes="$NNODES" --node-rank="$NODE_RANK"
                    --master-addr="$MASTER_ADDR" --master-port="$PORT")
    fi
    # Unset, torchrun and mmengine each warn and set them to 1: one thread
    # per process at most, the cores shared among the node's processes.
    local cores
    cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}
    export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
    setsid python "$tools/misc/torchrun.py" "${rendezvous[@]}" \
        --max-restarts="$MAX_RESTARTS" --nproc-per-node="$nproc" "$@" &
    torchrun=$!
    trap 'kill -TERM $torchrun 2>/dev/null; interrupted=1' INT TERM
    while true; do
        wait $torchrun && status=0 || status=$?
        kill -0 $torchrun 2>/dev/null || break
    done
    if [ "$interrupted" -eq 1 ]; then
        echo "$prog: interrupted: torchrun and its workers stopped${INTERRUPT_HINT:+; $INTERRUPT_HINT}" >&2
        exit 130
    fi
    exit $status
}
