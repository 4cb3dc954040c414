#!/usr/bin/env bash
# The GPU check of mmsync's CUDA kernels, in one call on a GPU machine with no
# network (python3 with a CUDA torch, nvcc): installs the carried wheels its
# Python lacks, builds mmsync in place for sm_90, checks that the CUDA kernels
# are registered, runs the CUDA tests, compute-sanitizer (memcheck, racecheck,
# synccheck) on a small case, a CUDA-graph capture of a training step with no
# warm-up and the CUDA benchmark (before the sanitizers, which may be refused
# by the machine), then prints a summary with device, commit and every number. One deadline (GPU_CHECK_BUDGET_S, default 450 s from the
# start) bounds every step, the build included; each step gets a share of
# what is left. Logs and results go to $OUT. The exact device-tool call:
# docs/benchmarks_cuda.md.
#
#   bash tools/gpu_check.sh             the check (on the GPU machine)
#   bash tools/gpu_check.sh --prepare   fetch the wheels it carries (here)
#   bash tools/gpu_check.sh --rehearse  every step that runs without a GPU, in
#                                       a fresh venv built like the GPU image;
#                                       ends with "rehearsal ok"
#
# Environment: OUT (default work_dirs/gpu_check), MMSYNC_COMMIT (the commit
# to record; default git's HEAD), WHEELS (default build/gpu_wheels),
# GPU_CHECK_BUDGET_S, BUILD_S (the build's own cap, default 300 s; 1200 s in
# the rehearsal, 2 cores), MAX_JOBS (default 16; 2 in the rehearsal).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
MODE=check
case "${1:-}" in
  '') ;;
  --prepare) MODE=prepare ;;
  --rehearse) MODE=rehearse ;;
  *) echo "usage: bash tools/gpu_check.sh [--prepare|--rehearse]" >&2; exit 2 ;;
esac
WHEELS=${WHEELS:-build/gpu_wheels}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }

# What `import mmsync` and the CUDA tests need beyond torch, pinned, that
# travels as wheels. The GPU image lacks mmengine and the first five; it
# holds the rest (KINDS.md), which travel only as insurance: the install step
# skips what is there. numpy, PyYAML and ninja are binary wheels.
PACKAGES=(mmengine==0.10.7 addict==2.4.0 termcolor==3.3.0 yapf==0.43.0
          platformdirs==4.14.9 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
          pygments==2.20.0 pytest==9.0.3 iniconfig==2.3.0 pluggy==1.6.0
          packaging==26.2 numpy==2.4.6 pyyaml==6.0.3 ninja==1.13.2)
# What the GPU image holds besides torch that mmengine imports and that is
# too big to carry (opencv alone is ~50 MB of the 64 MiB): the rehearsal's
# venv gets them from the package index, as the image has them.
IMAGE_PACKAGES=(opencv-python-headless matplotlib)

# prepare PYVER: the wheels for CPython PYVER (3.12: the GPU image; 3.11:
# the rehearsal here) with exact platform tags, into $WHEELS/cpXY; kept when
# the same package list was fetched before.
prepare() {
  local ver=$1 dir="$WHEELS/cp${1/./}"
  local want="${PACKAGES[*]}"
  if [ -f "$dir/PACKAGES" ] && [ "$(cat "$dir/PACKAGES")" = "$want" ]; then
    stamp "wheels for Python $ver already in $dir"
    return 0
  fi
  rm -rf "$dir" && mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$ver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "${PACKAGES[@]}" \
    2>"$dir.log" || { cat "$dir.log" >&2; return 1; }
  echo "$want" >"$dir/PACKAGES"
  stamp "wheels for Python $ver in $dir ($(du -sh "$dir" | cut -f1))"
}

if [ "$MODE" = prepare ]; then
  prepare 3.12 && prepare 3.11
  exit
fi

if [ "$MODE" = rehearse ]; then
  # A copy of the tree as the device tool sends it (tracked and untracked,
  # not ignored), a fresh venv of this machine's Python 3.11 with torch
  # 2.14.1 (CUDA 13.0 build) and IMAGE_PACKAGES only, and the cp311 wheels
  # of the same packages: the GPU image's situation, with 3.11 for 3.12.
  REH=${REHEARSE_DIR:-$REPO/build/gpu_rehearsal}
  # Both sets: the cp312 one is what the GPU run carries.
  { prepare 3.12 && prepare 3.11; } ||
    { echo "rehearsal FAILED: wheels" >&2; exit 1; }
  rm -rf "$REH" && mkdir -p "$REH/tree/$WHEELS"
  git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$REH/tree"
  cp -r "$WHEELS/cp311" "$REH/tree/$WHEELS/"
  stamp "venv with torch==2.14.1 ${IMAGE_PACKAGES[*]} in $REH/venv"
  python3 -m venv "$REH/venv" &&
    "$REH/venv/bin/python3" -m pip install -q torch==2.14.1 \
      "${IMAGE_PACKAGES[@]}" >"$REH/venv.log" 2>&1 ||
    { tail "$REH/venv.log"; exit 1; }
  # libcudart lies in lib, not lib64, on this machine.
  PATH="$REH/venv/bin:$PATH" LIBRARY_PATH=/usr/local/cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH} \
    GPU_CHECK_REHEARSAL=1 SITE="$REH/site" OUT="$REH/out" \
    MAX_JOBS=${MAX_JOBS:-2} GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-1800} \
    BUILD_S=${BUILD_S:-1200} \
    bash "$REH/tree/tools/gpu_check.sh"
  rc=$?
  if [ $rc = 0 ]; then
    rm -rf "$REH/venv" "$REH/tree" "$REH/site"  # ~6 GB; the logs stay
    echo "rehearsal ok ($(( $(date +%s) - T0 )) s; logs in $REH/out)"
    exit 0
  fi
  echo "rehearsal FAILED (rc $rc; logs in $REH/out)" >&2
  exit 1
fi

# ---------------------------------------------------------------------------
# The check. In a rehearsal (GPU_CHECK_REHEARSAL=1) the steps that need a GPU
# must report "no CUDA GPU" (exit 3) or skip; anything else fails it.
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
OUT=${OUT:-work_dirs/gpu_check}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
: >"$OUT/steps.tsv"
DEADLINE=$(( T0 + ${GPU_CHECK_BUDGET_S:-450} ))
SUMMARY_S=20
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"  # ninja, where its wheel was installed
export MMSYNC_COMMIT=${MMSYNC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
FAILED=()

left() { echo $(( DEADLINE - SUMMARY_S - $(date +%s) )); }

# run NAME SECONDS EXPECT CMD...: runs CMD under `timeout SECONDS` (cut to
# what is left before the deadline), its output into $OUT/NAME.log, and
# records rc and time; EXPECT is the set of good exit codes ("0", "0|3").
run() {
  local name=$1 secs=$2 expect=$3
  shift 3
  local budget
  budget=$(left)
  [ "$secs" -gt "$budget" ] && secs=$budget
  if [ "$secs" -lt 5 ]; then
    printf '%s\t-\t0\tskipped: no time left\n' "$name" >>"$OUT/steps.tsv"
    stamp "$name: SKIPPED, no time left"
    FAILED+=("$name")
    return 1
  fi
  stamp "$name (up to ${secs}s)"
  local s0 rc
  s0=$(date +%s)
  timeout -k 5 "$secs" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local note=''
  [ $rc = 124 ] || [ $rc = 137 ] && note="timed out after ${secs}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - s0 ))" "$note" \
    >>"$OUT/steps.tsv"
  if [[ "|$expect|" != *"|$rc|"* ]]; then
    tail -30 "$OUT/$name.log"
    stamp "$name: FAILED (rc $rc, log $OUT/$name.log)"
    FAILED+=("$name")
    return 1
  fi
  tail -3 "$OUT/$name.log"
}

# A GPU step: exit 0 on a GPU, 3 ("no CUDA GPU") in the rehearsal.
GPU_OK=0
[ "$REHEARSAL" = 1 ] && GPU_OK=3

WHEEL_DIR="$WHEELS/cp$(python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')"
if ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
  run install 60 0 python3 tools/gpu_check.py install "$WHEEL_DIR" "$SITE"
else
  stamp "no wheels in $WHEEL_DIR (bash tools/gpu_check.sh --prepare)"
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
    echo "no nvidia-smi"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU")'
  echo "commit $MMSYNC_COMMIT"; } >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# -Xptxas -v: ptxas's register and spill report per kernel, in build.log.
if run build "${BUILD_S:-300}" 0 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
    MAX_JOBS=${MAX_JOBS:-16} NVCC_APPEND_FLAGS='-Xptxas -v' \
    python3 setup.py build_ext --inplace; then
  python3 tools/gpu_check.py summary "$OUT" | grep ptxas
  run registered 60 0 python3 tools/gpu_check.py registered
fi

if [ ${#FAILED[@]} = 0 ]; then
  # Without a GPU every CUDA test must skip, with its reason; on a GPU none.
  run tests 180 0 python3 -m pytest tests/test_ops/test_sync_bn_cuda.py -q \
    -rfEs -p no:cacheprovider --junitxml="$OUT/tests.xml"
  python3 tools/gpu_check.py verdict "$OUT" \
    $([ "$REHEARSAL" = 1 ] && echo --rehearsal) || FAILED+=(tests-verdict)
  run graph 45 "$GPU_OK" python3 tools/gpu_check.py graph
  # The benchmark leaves SANITIZE_S for the sanitizers, which come last: on
  # some GPU machines compute-sanitizer refuses the device.
  SANITIZE_S=105
  if [ "$REHEARSAL" = 1 ]; then
    # Without a GPU the benchmark must get as far as its own check (mmsync
    # imported from the tree) and exit with "no CUDA GPU".
    run benchmark 60 1 python3 tools/benchmark_cuda.py &&
      grep -q 'benchmark_cuda: no CUDA GPU' "$OUT/benchmark.log" ||
      FAILED+=(benchmark)
  else
    BENCH_S=$(( $(left) - SANITIZE_S ))
    [ "$BENCH_S" -lt 60 ] && BENCH_S=60
    run benchmark "$BENCH_S" 0 python3 tools/benchmark_cuda.py \
      --json "$OUT/benchmark_cuda.json"
  fi
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck synccheck; do
    if [ "$REHEARSAL" = 1 ]; then
      run "sanitizer_$tool" 60 3 python3 tools/gpu_check.py sanitize
    else
      run "sanitizer_$tool" $(( SANITIZE_S / 3 )) 0 "$SANITIZER" \
        --tool "$tool" --error-exitcode 9 python3 tools/gpu_check.py sanitize
    fi
  done
fi

DEADLINE=$(( DEADLINE + SUMMARY_S ))
stamp "summary"
python3 tools/gpu_check.py summary "$OUT" || FAILED+=(summary)
if [ ${#FAILED[@]} != 0 ]; then
  stamp "FAILED: ${FAILED[*]}"
  exit 1
fi
stamp "done"
