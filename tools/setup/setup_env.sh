#!/usr/bin/env bash
# Installs mmsync from this repository's own files into the active virtual
# environment: the pinned CPU build of torch (requirements/torch.txt) and
# mmengine, what the main job needs, then builds mmsync._ext in
# place (pip install -e . --no-build-isolation), a line per step with times:
#   python3 -m venv .venv && . .venv/bin/activate
#   bash tools/setup/setup_env.sh            the main job's set-up
#   bash tools/setup/setup_env.sh --tests    and the test tools (pytest, onnx,
#                                            yapf, isort, mmcv-lite, ...)
# It refuses an interpreter outside a virtual environment (or a conda one)
# unless MMSYNC_SYSTEM_INSTALL=1. Safe to run again: the compiled objects
# stay in build/temp (see setup.py), so a second run recompiles only what
# changed (19 s with nothing changed, 108 s the first time on 2 cores).
# PYTHON picks the interpreter (default python3).
set -euo pipefail
TESTS=0
case "${1:-}" in
  -h | --help)
    sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0 ;;
  --tests) TESTS=1 ;;
  "") ;;
  *) echo "setup_env.sh: error: unknown argument '$1' (--tests or --help)" >&2
     exit 2 ;;
esac
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { echo "setup_env [+$(( $(date +%s) - T0 ))s] $*"; }
quiet() { grep -v "^WARNING: \(Location\|Running pip as\)" || true; }

if [ "${MMSYNC_SYSTEM_INSTALL:-0}" != 1 ] && ! "$PY" -c '
import os, sys
conda = os.environ.get("CONDA_PREFIX")
sys.exit(sys.prefix == sys.base_prefix and not (
    conda and os.path.samefile(conda, sys.prefix)))' 2>/dev/null; then
  echo "setup_env.sh: error: $(command -v "$PY") is not in a virtual" \
    "environment: create one first (python3 -m venv .venv &&" \
    ". .venv/bin/activate), or set MMSYNC_SYSTEM_INSTALL=1 to install" \
    "into it anyway" >&2
  exit 2
fi
say "installing into $("$PY" -c 'import sys; print(sys.prefix)')"
"$PY" -m pip install -q -U 'pip>=24' 2>&1 | quiet
say "installing torch $(sed -n 's/^torch==//p' requirements/torch.txt) (CPU)," \
  "mmengine and the build tools"
"$PY" -m pip install -q -r requirements/torch.txt -r requirements/build.txt \
  -r requirements/runtime.txt 2>&1 | quiet
if [ "$TESTS" = 1 ]; then
  say "installing the test tools (requirements/tests.txt)"
  "$PY" -m pip install -q -r requirements/torch.txt -r requirements/tests.txt \
    2>&1 | quiet
  # mmcv-lite (mmcv's builders, for the registry tests) unless mmcv's full
  # build (tools/setup/setup_downstream.sh) is there: both are the package
  # `mmcv`, and one installed over the other breaks both.
  if ! "$PY" -m pip show -q mmcv >/dev/null 2>&1; then
    say "installing mmcv-lite"
    "$PY" -m pip install -q -r requirements/mmcv-lite.txt 2>&1 | quiet
  fi
fi
say "building mmsync._ext (C++; about 2 min on 2 cores the first time)"
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q -e . --no-build-isolation \
  2>&1 | quiet
say "done: $("$PY" -c 'import mmsync, torch; print("mmsync", mmsync.__version__, "with torch", torch.__version__)')"
