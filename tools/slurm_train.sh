#!/usr/bin/env bash
# Train on a Slurm partition with srun, one task per process:
#   tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py args]
# Environment: GPUS (tasks in all, default 8), GPUS_PER_NODE (tasks per node,
# default 8), CPUS_PER_TASK (default 5), GRES (default gpu:$GPUS_PER_NODE; set
# GRES= on CPU-only partitions), SRUN_ARGS (more srun options),
# MASTER_PORT (default: derived from the job id).
# The config and the split of the train set over GPUS tasks are checked here
# first (tools/train.py --dry-run), so bad input fails in one line.
set -eu
case "${1:-}" in -h | --help)
    sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0 ;;
esac

if [ $# -lt 4 ]; then
    echo "slurm_train.sh: error: usage: tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py args]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
GRES=${GRES-gpu:$GPUS_PER_NODE}
SRUN_ARGS=${SRUN_ARGS:-}
for var in GPUS GPUS_PER_NODE CPUS_PER_TASK; do
    if ! [[ ${!var} =~ ^[1-9][0-9]*$ ]]; then
        echo "slurm_train.sh: error: $var must be a positive integer, got '${!var}'" >&2
        exit 2
    fi
done

TOOLS=$(dirname "$0")
# In a checkout, its mmsync; installed (mmsync/.mim/tools), the package's.
if [ -f "$TOOLS/../mmsync/__init__.py" ]; then
    export PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}"
fi
python "$TOOLS/train.py" "$CONFIG" --work-dir "$WORK_DIR" "${@:5}" --dry-run "$GPUS" >/dev/null
# shellcheck disable=SC2086 # SRUN_ARGS holds several options
exec srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    ${GRES:+--gres="$GRES"} \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    $SRUN_ARGS \
    python -u "$TOOLS/train.py" "$CONFIG" --work-dir="$WORK_DIR" --launcher=slurm "${@:5}"
