#!/usr/bin/env bash
# Turns the main environment (tools/setup/setup_env.sh) into the one mmseg's and
# mmdet's users have: mmcv's full build compiled from its sdist with its CPU
# ops in place of mmcv-lite (requirements/mmcv-full.txt), mmsegmentation,
# mmdetection and mmdetection3d (requirements/downstream.txt, --no-deps) and
# what they import
# (requirements/downstream-deps.txt). The tests of tests/test_ecosystem that
# need them run in this environment. mmcv's C++ build took 7 min 25 s on 2
# cores (MAX_JOBS, default 2; CFLAGS=-g0 replaces Python's "-O3 -g": no
# debug information and no -O, against 558 s with the defaults); pip keeps
# the wheel in its cache, and a second run with mmcv already built compiles
# nothing. PYTHON picks the interpreter (default python3).
set -euo pipefail
case "${1:-}" in -h | --help)
  sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0 ;;
esac
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { echo "setup_downstream [+$(( $(date +%s) - T0 ))s] $*"; }
quiet() { grep -v "^WARNING: \(Location\|Running pip as\)" || true; }

"$PY" -m pip install -q -r requirements/downstream-deps.txt 2>&1 | quiet
MMCV=$(sed -n 's/^mmcv==//p' requirements/mmcv-full.txt)
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV'" \
    >/dev/null 2>&1; then
  # mmcv-lite's files would stay under mmcv's and shadow them.
  "$PY" -m pip uninstall -y -q mmcv-lite mmcv 2>&1 | quiet
  say "building mmcv $MMCV with its CPU ops"
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} CFLAGS=${CFLAGS:--g0} \
    "$PY" -m pip install -q --no-build-isolation -r requirements/mmcv-full.txt \
    2>&1 | quiet
fi
"$PY" -m pip install -q --no-deps -r requirements/downstream.txt 2>&1 | quiet
"$PY" -c 'import mmcv, mmcv.ops, mmseg.models, mmdet.models, mmdet3d.models
print("mmcv", mmcv.__version__, "(full build), mmseg", __import__("mmseg").__version__,
      "mmdet", __import__("mmdet").__version__,
      "mmdet3d", __import__("mmdet3d").__version__)'
say "done"
