#!/usr/bin/env bash
# Everything CI checks, on a fresh machine: set-up from the repository's own
# files (tools/setup/setup_env.sh, then tools/setup/setup_downstream.sh: mmcv's full
# build, mmseg and mmdet), style (yapf, isort), a compile-only pass over the
# CUDA sources, the test suite, and (where nvcc exists) the second environment of
# .ci/cuda_env.sh: torch's CUDA build with mmcv-lite, mmpretrain, timm and
# torchvision, mmsync built with its CUDA kernels, the suite again there;
# then the rehearsal of tools/gpu_check/gpu_check.sh; then, with or without
# nvcc, the mmpose environment of .ci/mmpose_env.sh and its tests. Extra
# arguments go to pytest. Run it in a virtual environment (setup_env.sh
# refuses another):
#   python3 -m venv .venv && . .venv/bin/activate && bash tools/setup/run_tests.sh
set -euo pipefail
case "${1:-}" in -h | --help)
  sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0 ;;
esac
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
bash tools/setup/setup_env.sh --tests
# mmcv's full build, mmseg and mmdet in the main environment (their tests).
bash tools/setup/setup_downstream.sh
# A real single-node Slurm for the launcher test (root with apt only; the
# test skips visibly where srun is missing).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null &&
    ! command -v srun >/dev/null; then
  pkgs="slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 &&
      apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1; } ||
    echo "run_tests: could not install Slurm; its test will skip"
fi
"$PY" -m yapf --diff --recursive mmsync tools tests configs setup.py
"$PY" -m isort --check-only --diff mmsync tools tests configs setup.py
if command -v nvcc >/dev/null; then
  bash .ci/compile_cuda.sh
else
  echo "run_tests: nvcc not found, CUDA sources not compile-checked"
fi
"$PY" -m pytest tests -q "$@"
if command -v nvcc >/dev/null; then
  bash .ci/cuda_env.sh "$@"
  # The GPU check's every step that runs without a GPU, in a fresh venv
  # built as the GPU machine gets it; ends with "rehearsal ok".
  bash tools/gpu_check/gpu_check.sh --rehearse
else
  echo "run_tests: nvcc not found, the CUDA-torch environment and the GPU" \
    "check's rehearsal are skipped"
fi
# The mmpose environment (.ci/mmpose_env.sh): torch 2.13.0's CUDA build,
# torchvision, mmcv's full build (pip's cached wheel from
# setup_downstream.sh) and mmpose, the checkout's mmsync; no nvcc needed.
bash .ci/mmpose_env.sh "$@"
