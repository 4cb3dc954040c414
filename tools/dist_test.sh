#!/usr/bin/env bash
# Evaluate a checkpoint with torchrun on NPROC processes per node, the test
# set split over them; the metric is the one a single process reports:
#   tools/dist_test.sh CONFIG CHECKPOINT NPROC [tools/test.py arguments]
# NNODES, NODE_RANK, MASTER_ADDR and PORT as for tools/dist_train.sh.
set -eu
case "${1:-}" in -h | --help)
    sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0 ;;
esac

if [ $# -lt 3 ]; then
    echo "dist_test.sh: error: usage: tools/dist_test.sh CONFIG CHECKPOINT NPROC [test.py args]" >&2
    exit 2
fi
TOOLS=$(dirname "$0")
# shellcheck source=tools/misc/torchrun.sh
source "$TOOLS/misc/torchrun.sh"
MAX_RESTARTS=0
launch_settings dist_test.sh "$3"
# In a checkout, its mmsync; installed (mmsync/.mim/tools), the package's.
if [ -f "$TOOLS/../mmsync/__init__.py" ]; then
    export PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}"
fi
run_torchrun dist_test.sh "$NPROC" "$TOOLS/test.py" "$1" "$2" --launcher pytorch "${@:4}"
