#!/usr/bin/env bash
# The mmpose test environment: mmpose 1.3.2 needs both mmcv's full build
# (mmpose.models imports mmcv.ops) and a torchvision that imports
# (mmpose.visualization), which neither the main environment (CPU torch,
# no torchvision on PyPI for it) nor .ci/cuda_env.sh's (torch 2.14.1, where
# mmcv 2.1.0 does not compile) has. This one, in a venv: torch 2.13.0's CUDA
# build from PyPI with torchvision 0.28.0 (requirements/mmpose-deps.txt),
# whose CPU code runs without a GPU; mmcv 2.1.0's full build with its CPU ops
# (requirements/mmcv-full.txt: pip's cached wheel from
# tools/setup/setup_downstream.sh, built for 2.13.0+cpu, the same release,
# or else a build from the sdist, ~7.5 min on 2 cores); mmpose, mmdet and
# xtcocotools built from source (requirements/mmpose.txt, --no-deps). mmsync
# is the checkout's (PYTHONPATH), its _ext as the main environment built it
# for 2.13.0+cpu: the same release and ABI, CPU kernels only, so it loads
# here unchanged. Then pytest there on the tests that need mmpose
# (MMPOSE_ENV_TESTS, below). No GPU, no nvcc needed.
#
#   bash .ci/mmpose_env.sh [pytest args]     (MMPOSE_VENV to move the venv)
set -euo pipefail
case "${1:-}" in -h | --help)
  sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0 ;;
esac
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${MMPOSE_VENV:-$ROOT/build/venv-mmpose}
T0=$(date +%s)
say() { echo "mmpose_env [+$(( $(date +%s) - T0 ))s] $*"; }
# (pip's warnings about this machine's local index folders are noise)
quiet() { grep -v "^WARNING: \(Location\|Running pip as\)" || true; }

[ -f mmsync/_build_info.py ] || {
  echo "mmpose_env: mmsync._ext is not built in $ROOT" \
    "(tools/setup/setup_env.sh builds it)" >&2
  exit 2
}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
"$PY" -m pip install -q -U 'pip>=24' 2>&1 | quiet
"$PY" -m pip install -q -r requirements/mmpose-deps.txt 2>&1 | quiet
MMCV=$(sed -n 's/^mmcv==//p' requirements/mmcv-full.txt)
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV'" \
    >/dev/null 2>&1; then
  say "installing mmcv $MMCV with its CPU ops"
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} CFLAGS=${CFLAGS:--g0} \
    "$PY" -m pip install -q --no-build-isolation -r requirements/mmcv-full.txt \
    2>&1 | quiet
fi
"$PY" -m pip install -q --no-deps --no-build-isolation \
  -r requirements/mmpose.txt 2>&1 | quiet
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
"$PY" -W ignore -c '
import torch, torchvision, mmcv, mmcv.ops, mmdet, mmpose
import mmpose.models, mmpose.visualization, mmpose.datasets, mmpose.evaluation
import mmsync.ops
assert torch.version.cuda, "torch is not a CUDA build"
print("torch", torch.__version__, "torchvision", torchvision.__version__,
      "mmcv", mmcv.__version__, "(full build), mmdet", mmdet.__version__,
      "mmpose", mmpose.__version__, "mmsync", mmsync.__version__)' ||
  { echo "mmpose_env: the environment does not import" >&2; exit 1; }
say "venv ready ($(du -sh "$VENV" | cut -f1))"
# tools/dist_train.sh runs `python` and `torchrun`: this environment's.
export PATH=$VENV/bin:$PATH
TESTS=${MMPOSE_ENV_TESTS:-tests/test_ecosystem/test_mmpose_exact.py \
  tests/test_ecosystem/test_train_mmpose.py}
# shellcheck disable=SC2086
"$PY" -m pytest $TESTS -q "$@"
say "done"
