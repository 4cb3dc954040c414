#!/usr/bin/env bash
# The second CI environment: torch 2.14.1 (CUDA 13.0 build), torchvision and
# the real mmcv-lite, mmpretrain and timm (requirements/ecosystem.txt) in a
# venv; mmsync built with its CUDA kernels for sm_90 in a copy of the tree;
# a check that every op has its CPU and CUDA kernel; then pytest there, on
# what only this environment can test (CUDA_ENV_TESTS, below): the packages
# that need torchvision, mim, the CUDA build, and the main checkout's _ext
# (built for the CPU torch) imported under this torch. No GPU is needed (the
# CUDA kernels are built, linked and registered, not run).
#
#   bash .ci/cuda_env.sh [pytest args]     (CUDA_VENV, CUDA_TREE to move them)
set -euo pipefail
case "${1:-}" in -h | --help)
  sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0 ;;
esac
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${CUDA_VENV:-$ROOT/build/venv-cuda}
TREE=${CUDA_TREE:-$ROOT/build/cuda-tree}
T0=$(date +%s)
say() { echo "cuda_env [+$(( $(date +%s) - T0 ))s] $*"; }

command -v nvcc >/dev/null || { echo "cuda_env: nvcc not found" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
# (pip's warnings about this machine's local index folders are noise)
"$PY" -m pip install -q -U 'pip>=24' 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pip install -q -r requirements/ecosystem.txt 2>&1 |
  grep -v "^WARNING: Location" || true
"$PY" -c 'import torch, torchvision, mmpretrain, timm, mmcv' ||
  { echo "cuda_env: the environment does not import" >&2; exit 1; }
say "venv ready: $("$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__)')"

# A copy of the tracked and new files, so that this build's _ext does not
# replace the main environment's in the checkout; a copy made before is
# replaced but for its build/ folder, so that a rerun compiles only what
# changed.
mkdir -p "$TREE"
find "$TREE" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$TREE"
say "building mmsync._ext with CUDA kernels (sm_90)"
# nvcc on the PATH may be a wrapper script outside the toolkit, where torch
# would guess CUDA_HOME wrongly; the machine's CUDA keeps libcudart in lib,
# not the lib64 torch's build adds.
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
  export CUDA_HOME=/usr/local/cuda
fi
CUDA_LIB=$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME)')/lib
(cd "$TREE" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  MAX_JOBS=${MAX_JOBS:-2} LIBRARY_PATH=$CUDA_LIB${LIBRARY_PATH:+:$LIBRARY_PATH} \
  "$PY" setup.py -q build_ext --inplace >"$TREE/build_cuda.log" 2>&1) ||
  { tail -50 "$TREE/build_cuda.log"; echo "cuda_env: build failed" >&2; exit 1; }
say "built"
# The tree as a distribution on the path (mmsync.egg-info), as an install
# makes it: `mim train mmsync` finds the package, and its .mim, through it.
(cd "$TREE" && "$PY" setup.py -q egg_info >>"$TREE/build_cuda.log" 2>&1)
(cd "$TREE" && PYTHONPATH=$TREE "$PY" tools/gpu_check/gpu_check.py registered)
say "pytest in the CUDA-torch environment"
cd "$TREE"
# tools/dist_train.sh runs `python` and `torchrun`: this environment's.
export PATH=$VENV/bin:$PATH
# What only this environment can test: the packages that need torchvision
# (mmpretrain, timm) and mim, the CUDA build's registration and collection,
# and an _ext built for another torch (the main checkout's, built for the
# CPU torch). The layer's, engine's and tools' suites ran in the main
# environment.
export MMSYNC_OTHER_TORCH_TREE=$ROOT
TESTS=${CUDA_ENV_TESTS:-tests/test_ecosystem tests/test_utils \
  tests/test_ops/test_sync_bn_cuda_collect.py tests/test_ops/test_sync_bn_cuda.py}
# shellcheck disable=SC2086
"$PY" -m pytest $TESTS -q "$@"
say "done"
