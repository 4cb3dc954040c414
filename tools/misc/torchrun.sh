# Sourced by tools/dist_train.sh and tools/dist_test.sh: start torchrun.
#   launch_settings PROG NPROC     defaults and checks of the variables below
#   run_torchrun PROG NPROC SCRIPT [SCRIPT args]
# Reads NNODES, NODE_RANK, MASTER_ADDR, PORT, MAX_RESTARTS, RDZV_CONF and
# INTERRUPT_HINT (said after Ctrl-C). On one node without PORT,
# torchrun picks a free port (--standalone); a PORT that is taken on node 0
# ends in one line (exit 2). NNODES=N: a static rendezvous of N nodes, node
# ranks as given; NNODES=MIN:MAX: an elastic one (c10d) hosted by node 0 on
# MASTER_ADDR:PORT, going on with MIN..MAX nodes (RDZV_CONF adds torchrun's
# --rdzv-conf options, e.g. last_call_timeout=5). On several nodes,
# GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME default to the interface that
# routes to MASTER_ADDR; a MASTER_ADDR that is unreachable, or a host name
# that resolves to loopback, ends in one line (exit 2). torchrun runs in a session of its own: Ctrl-C
# reaches the calling script alone, which stops torchrun and its workers
# with SIGTERM and says so in one line (exit 130).

launch_settings() {
    local prog=$1 var
    NPROC=$2
    NNODES=${NNODES:-1}
    NODE_RANK=${NODE_RANK:-0}
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    MAX_RESTARTS=${MAX_RESTARTS:-0}
    if ! [[ $NPROC =~ ^[1-9][0-9]*$ ]]; then
        echo "$prog: error: NPROC must be a positive integer, got '$NPROC'" >&2
        exit 2
    fi
    if [[ $NNODES =~ ^([1-9][0-9]*)(:([1-9][0-9]*))?$ ]]; then
        NNODES_MIN=${BASH_REMATCH[1]}
        NNODES_MAX=${BASH_REMATCH[3]:-$NNODES_MIN}
    fi
    if [ -z "${NNODES_MAX:-}" ] || [ "$NNODES_MIN" -gt "$NNODES_MAX" ]; then
        echo "$prog: error: NNODES must be a positive integer N or MIN:MAX with MIN <= MAX, got '$NNODES'" >&2
        exit 2
    fi
    if ! [[ $MAX_RESTARTS =~ ^[0-9]+$ ]]; then
        echo "$prog: error: MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'" >&2
        exit 2
    fi
    if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES_MAX" ]; then
        echo "$prog: error: NODE_RANK must be in 0..$((NNODES_MAX - 1)) for NNODES=$NNODES, got '$NODE_RANK'" >&2
        exit 2
    fi
}

run_torchrun() {
    local prog=$1 nproc=$2
    shift 2
    local tools rendezvous torchrun status interrupted=0 route
    tools=$(dirname "${BASH_SOURCE[0]}")/..
    if [ -z "${PORT:-}" ] && [ "$NNODES_MAX" -eq 1 ]; then
        rendezvous=(--standalone)
    else
        PORT=${PORT:-29500}
        route=$(python "$tools/misc/torchrun.py" --route "$prog" \
            "$MASTER_ADDR" "$NNODES_MAX" "$NODE_RANK")
        if [ "${route% *}" != - ]; then
            export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-${route% *}}
            export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-${route% *}}
        fi
        if [ "$NODE_RANK" -eq 0 ]; then
            python "$tools/misc/torchrun.py" --check-port "$prog" \
                "$MASTER_ADDR" "$PORT"
        fi
        if [ "$NNODES_MIN" -eq "$NNODES_MAX" ]; then
            rendezvous=(--nnodes="$NNODES" --node-rank="$NODE_RANK"
                        --master-addr="$MASTER_ADDR" --master-port="$PORT")
        else
            # --local-addr: the workers' MASTER_ADDR is the address of the
            # first node's agent, by default its host name (loopback on
            # many nodes); is_host: node 0 serves the rendezvous store.
            rendezvous=(--nnodes="$NNODES" --rdzv-backend=c10d
                        --rdzv-endpoint="$MASTER_ADDR:$PORT"
                        --rdzv-id="${RDZV_ID:-mmsync-$PORT}"
                        --local-addr="${route#* }"
                        --rdzv-conf="is_host=$((NODE_RANK == 0))${RDZV_CONF:+,$RDZV_CONF}")
        fi
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
