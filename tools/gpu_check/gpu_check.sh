#!/usr/bin/env bash
# The GPU check of mmsync's CUDA kernels, planned for the device tool's calls
# (one command at most 600 s; the machine stays warm ~30 s between calls and
# keeps the repository's ignored files while warm). On a GPU machine with no
# network (python3 with a CUDA torch, nvcc), in this order, each step under
# its own cap inside one deadline: install the carried wheels its Python
# lacks, build mmsync in place for sm_90, check the CUDA kernels are
# registered, compute-sanitizer memcheck and initcheck on small cases, the
# CUDA tests (one result line per test as it ends, a per-test timeout, the
# gloo test last), a CUDA-graph capture with no warm-up, the benchmark with
# what is left. Every step's result is recorded as it ends; what the deadline
# cut or never reached is left for a second, short call (--follow-up). A
# sanitizer that the device refuses is reported "unavailable" with its
# message and the rest still runs; a step that did not run is never "pass".
# The exact calls: docs/benchmarks_cuda.md.
#
#   bash tools/gpu_check/gpu_check.sh              the main check (GPU machine)
#   bash tools/gpu_check/gpu_check.sh --follow-up  the steps the main call left
#   bash tools/gpu_check/gpu_check.sh --prepare    fetch the wheels it carries (here)
#   bash tools/gpu_check/gpu_check.sh --rehearse   every step that runs without a GPU,
#                                        in a fresh venv built like the GPU
#                                        image, plus a build against torch
#                                        2.11.0 (the image's); ends with
#                                        "rehearsal ok"
#
# Environment: OUT (what returns to the caller; default the state folder),
# GPU_CHECK_STATE (logs and results, kept between calls; default
# work_dirs/gpu_check), MMSYNC_COMMIT (the commit to record; default git's
# HEAD), WHEELS (default build/gpu_wheels), GPU_CHECK_BUDGET_S (default 450
# main, 130 follow-up), GPU_CHECK_CALL_S (the call's timeout_s, default 480
# main, 150 follow-up), BUILD_S (the build's cap, default 190 s), MAX_JOBS
# (default 16).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
MODE=check
case "${1:-}" in
  '') ;;
  -h | --help)
    sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0 ;;
  --follow-up) MODE=follow-up ;;
  --prepare) MODE=prepare ;;
  --rehearse) MODE=rehearse ;;
  *) echo "usage: bash tools/gpu_check/gpu_check.sh [--follow-up|--prepare|--rehearse]" >&2
     exit 2 ;;
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
          pytest-timeout==2.4.0 packaging==26.2 numpy==2.4.6 pyyaml==6.0.3
          ninja==1.13.2)
# What the GPU image holds besides torch that mmengine imports and that is
# too big to carry (opencv alone is ~50 MB of the 64 MiB): the rehearsal's
# venv gets them from the package index, as the image has them.
IMAGE_PACKAGES=(opencv-python-headless matplotlib)
# The GPU image's torch (KINDS.md: 2.11.0+cu130; PyPI's 2.11.0 is the same
# CUDA 13.0 build), which the rehearsal also builds against.
IMAGE_TORCH=2.11.0

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

# build_image_torch REH: mmsync._ext built for sm_90 against torch
# $IMAGE_TORCH's headers and libraries, then imported under that torch with
# every op's CUDA kernel registered. The wheel is fetched once into a cache
# outside the tree and unpacked over the rehearsal venv's torch (its CUDA 13
# runtime libraries and pure-Python dependencies serve both); the host code
# is compiled without optimization: what this build checks is that the
# sources compile, link and load against the image's torch, not speed.
build_image_torch() {
  local reh=$1 t0
  t0=$(date +%s)
  local cache=${TORCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmsync/torch-$IMAGE_TORCH}
  local whl
  whl=$(ls "$cache"/torch-"$IMAGE_TORCH"-cp311-*.whl 2>/dev/null | head -1)
  if [ -z "$whl" ]; then
    mkdir -p "$cache"
    python3 -m pip download -q --no-deps --only-binary=:all: \
      --python-version 3.11 --implementation cp \
      --platform manylinux_2_28_x86_64 -d "$cache" "torch==$IMAGE_TORCH" \
      >"$reh/out/torch_image_fetch.log" 2>&1 ||
      { cat "$reh/out/torch_image_fetch.log"
        echo "torch $IMAGE_TORCH could not be fetched (above)"; return 1; }
    whl=$(ls "$cache"/torch-"$IMAGE_TORCH"-cp311-*.whl | head -1)
  fi
  local site="$reh/torch_image"
  rm -rf "$site" && mkdir -p "$site"
  # Only torch/ (its includes, libraries and Python package); its test
  # tools and the CUDA libraries stay in the wheel or the venv.
  python3 -m zipfile -e "$whl" "$site" || return 1
  rm -rf "$site"/torch-*.dist-info
  local venv_site
  venv_site=$("$reh/venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # torch's libraries find the CUDA runtime through $ORIGIN/../../nvidia.
  ln -s "$venv_site/nvidia" "$site/nvidia"
  stamp "torch $IMAGE_TORCH unpacked from $whl ($(( $(date +%s) - t0 )) s)"
  local tree="$reh/tree_image"
  rm -rf "$tree" && mkdir -p "$tree"
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$tree"
  local py="$reh/venv/bin/python3"
  PYTHONPATH="$site" "$py" -c "import torch; v = torch.__version__
assert v.split('+')[0] == '$IMAGE_TORCH', v
print('torch', v, 'CUDA', torch.version.cuda, 'from', torch.__file__)" ||
    return 1
  # DEBUG=1: -O0 for the host code; the device code is compiled as for the
  # GPU (nvcc's -O applies to the host side only).
  (cd "$tree" && PYTHONPATH="$site" FORCE_CUDA=1 DEBUG=1 \
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
    LIBRARY_PATH=/usr/local/cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH} \
    "$py" setup.py -q build_ext --inplace >"$reh/out/build_torch_image.log" 2>&1) ||
    { tail -40 "$reh/out/build_torch_image.log"
      echo "build against torch $IMAGE_TORCH FAILED"; return 1; }
  (cd "$tree" && PYTHONPATH="$tree:$site:$reh/site" "$py" tools/gpu_check/gpu_check.py registered) ||
    return 1
  stamp "built and registered against torch $IMAGE_TORCH ($(( $(date +%s) - t0 )) s)"
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
  # Then the follow-up call, and the build against the image's torch.
  REH=${REHEARSE_DIR:-$REPO/build/gpu_rehearsal}
  # Both sets: the cp312 one is what the GPU run carries.
  { prepare 3.12 && prepare 3.11; } ||
    { echo "rehearsal FAILED: wheels" >&2; exit 1; }
  rm -rf "$REH" && mkdir -p "$REH/tree/$WHEELS" "$REH/out"
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$REH/tree"
  cp -r "$WHEELS/cp311" "$REH/tree/$WHEELS/"
  stamp "venv with torch==2.14.1 ${IMAGE_PACKAGES[*]} in $REH/venv"
  python3 -m venv "$REH/venv" &&
    "$REH/venv/bin/python3" -m pip install -q torch==2.14.1 \
      "${IMAGE_PACKAGES[@]}" >"$REH/venv.log" 2>&1 ||
    { tail "$REH/venv.log"; exit 1; }
  stamp "venv ready"
  # libcudart lies in lib, not lib64, on this machine. The build's cap is
  # the rehearsal's (2 cores); the plan printed is the device's as well.
  reh_env=(PATH="$REH/venv/bin:$PATH"
           LIBRARY_PATH=/usr/local/cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
           GPU_CHECK_REHEARSAL=1 SITE="$REH/site" OUT="$REH/out"
           GPU_CHECK_STATE="$REH/state" MAX_JOBS=${MAX_JOBS:-2}
           BUILD_S=${BUILD_S:-1200})
  budget=${GPU_CHECK_BUDGET_S:-1800}
  env "${reh_env[@]}" GPU_CHECK_BUDGET_S=$budget \
    GPU_CHECK_CALL_S=$(( budget + 30 )) bash "$REH/tree/tools/gpu_check/gpu_check.sh"
  rc=$?
  if [ $rc = 0 ]; then
    env "${reh_env[@]}" GPU_CHECK_BUDGET_S=130 GPU_CHECK_CALL_S=150 \
      bash "$REH/tree/tools/gpu_check/gpu_check.sh" --follow-up
    rc=$?
  fi
  if [ $rc = 0 ]; then
    build_image_torch "$REH"
    rc=$?
  fi
  if [ $rc = 0 ]; then
    rm -rf "$REH/venv" "$REH/tree" "$REH/site" "$REH/torch_image" \
      "$REH/tree_image"  # ~8 GB; the logs stay
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
STATE=${GPU_CHECK_STATE:-$REPO/work_dirs/gpu_check}
SITE=${SITE:-/tmp/site}
CHECK=(python3 "$REPO/tools/gpu_check/gpu_check.py")
REH_FLAG=()
[ "$REHEARSAL" = 1 ] && REH_FLAG=(--rehearsal)
if [ "$MODE" = follow-up ]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-130}
  CALL_S=${GPU_CHECK_CALL_S:-150}
  if [ ! -f "$STATE/steps.tsv" ]; then
    echo "gpu_check: nothing to follow up: $STATE/steps.tsv is missing (a" \
      "fresh machine: the main call's results went with the one before;" \
      "run the main call again)"
    exit 1
  fi
else
  BUDGET=${GPU_CHECK_BUDGET_S:-450}
  CALL_S=${GPU_CHECK_CALL_S:-480}
  rm -rf "$STATE"
fi
mkdir -p "$STATE" && STATE=$(cd "$STATE" && pwd)
OUT=${OUT:-$STATE}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
DEADLINE=$(( T0 + BUDGET ))
SUMMARY_S=10
# Below this a step is not started but left for the follow-up call.
MIN_S=10
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"  # ninja, where its wheel was installed
export MMSYNC_COMMIT=${MMSYNC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

# The plan (tools/gpu_check/gpu_check.py's PLAN): each step's cap in seconds; the
# benchmark takes what is left, at least its cap, else it waits for the
# follow-up call.
STEPS=()
declare -A CAP
while read -r name cap; do
  STEPS+=("$name")
  CAP[$name]=$cap
done < <("${CHECK[@]}" caps ${BUILD_S:+--build "$BUILD_S"})
CAP[sanitize_cases]=40  # the rehearsal's stand-in for a missing sanitizer
BENCH_MIN_S=${CAP[benchmark]}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-60}

left() { echo $(( DEADLINE - SUMMARY_S - $(date +%s) )); }

# Copies what the caller gets back into OUT (the device tool returns at most
# 8 files): the tables, and every log in one archive.
sync_out() {
  [ "$OUT" = "$STATE" ] && return 0
  local f
  for f in steps.tsv tests.tsv benchmark_cuda.json summary.txt; do
    [ -f "$STATE/$f" ] && cp "$STATE/$f" "$OUT/$f"
  done
  tar -czf "$OUT/logs.tar.gz" -C "$STATE" --exclude=benchmark_cuda.json . \
    2>/dev/null
}

# step NAME CMD...: runs CMD for at most min(CAP[NAME], what is left)
# seconds, its output in $STATE/NAME.log, and records its status (pass,
# FAIL, timeout, unavailable, no-gpu) from the exit code and the log;
# returns 0 when later steps may rely on it. With too little time left the
# step is recorded "deferred" (for the follow-up call) and not started.
step() {
  local name=$1
  shift
  local secs=${CAP[$name]} budget
  budget=$(left)
  [ "$name" = benchmark ] && secs=$budget
  [ "$secs" -gt "$budget" ] && secs=$budget
  if [ "$secs" -lt "$MIN_S" ] || { [ "$name" = benchmark ] && [ "$secs" -lt "$BENCH_MIN_S" ]; }; then
    "${CHECK[@]}" record "$STATE" "$name" - 0 "${CAP[$name]}" \
      --status deferred --note "not started: ${budget}s left of the budget"
    sync_out
    return 1
  fi
  stamp "$name (up to ${secs}s)"
  local s0 rc
  s0=$(date +%s)
  timeout -k 5 "$secs" "$@" >>"$STATE/$name.log" 2>&1
  rc=$?
  "${CHECK[@]}" record "$STATE" "$name" "$rc" "$(( $(date +%s) - s0 ))" \
    "$secs" "${REH_FLAG[@]}"
  local ok=$?
  sync_out
  if [ $ok != 0 ]; then
    tail -20 "$STATE/$name.log"
  fi
  return $ok
}

# block NAME WHY: NAME is not run because a step it needs failed.
block() {
  "${CHECK[@]}" record "$STATE" "$1" - 0 "${CAP[$1]}" --status blocked \
    --note "$2"
}

if [ "$MODE" = follow-up ]; then
  mapfile -t TODO < <("${CHECK[@]}" pending "$STATE")
  stamp "follow-up of $STATE: ${TODO[*]:-nothing left to run}"
else
  TODO=("${STEPS[@]}")
fi
if [ "$REHEARSAL" = 1 ] && [ "$MODE" = check ]; then
  echo "the device's plan of the main call:"
  "${CHECK[@]}" plan --budget 450 --call 480 --summary "$SUMMARY_S" \
    $("${CHECK[@]}" caps | tr ' ' '=')
  echo "this run's plan:"
fi
[ ${#TODO[@]} -gt 0 ] &&
  "${CHECK[@]}" plan --budget "$BUDGET" --call "$CALL_S" --summary "$SUMMARY_S" \
    $(for s in "${TODO[@]}"; do echo "$s=${CAP[$s]}"; done) |
  tee -a "$STATE/plan.txt"
todo() { [[ " ${TODO[*]} " == *" $1 "* ]]; }

if todo install; then
  WHEEL_DIR="$WHEELS/cp$(python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')"
  if ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
    step install "${CHECK[@]}" install "$WHEEL_DIR" "$SITE"
  else
    "${CHECK[@]}" record "$STATE" install - 0 "${CAP[install]}" --status skipped \
      --note "no wheels in $WHEEL_DIR (bash tools/gpu_check/gpu_check.sh --prepare)"
  fi
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
      echo "no nvidia-smi"
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU")'
    echo "commit $MMSYNC_COMMIT"; } >"$STATE/device.txt" 2>&1
  cat "$STATE/device.txt"
fi

BUILT=1
if todo build; then
  # -Xptxas -v: ptxas's registers, stack frame and spills per kernel.
  step build env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
    MAX_JOBS=${MAX_JOBS:-16} NVCC_APPEND_FLAGS='-Xptxas -v' \
    python3 setup.py build_ext --inplace || BUILT=0
fi
if [ $BUILT = 1 ] && todo registered; then
  step registered "${CHECK[@]}" registered || BUILT=0
fi
if [ $BUILT = 1 ]; then
  "${CHECK[@]}" summary "$STATE" --only ptxas
  SANITIZER=$(command -v compute-sanitizer ||
              ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  for tool in memcheck initcheck; do
    todo $tool || continue
    if [ -z "$SANITIZER" ]; then
      "${CHECK[@]}" record "$STATE" $tool - 0 "${CAP[$tool]}" \
        --status unavailable --note "compute-sanitizer not found"
      continue
    fi
    # No caching allocator: every at::empty is a fresh allocation, so an
    # access past a tensor or a read of an unwritten output is caught.
    step $tool env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" \
      --tool $tool --error-exitcode 9 --print-limit 30 \
      "${CHECK[@]}" sanitize
  done
  if [ -z "$SANITIZER" ] && [ "$REHEARSAL" = 1 ] && todo memcheck; then
    step sanitize_cases "${CHECK[@]}" sanitize  # they reach "no CUDA GPU"
  fi
  if todo tests; then
    # One line per test in tests.tsv as it ends (the gpu_check plugin);
    # a follow-up runs only the tests that have none.
    mapfile -t DESELECT < <("${CHECK[@]}" deselect "$STATE")
    step tests env GPU_CHECK_TESTS="$STATE/tests.tsv" \
      PYTHONPATH="$REPO/tools/gpu_check:$PYTHONPATH" python3 -m pytest tests/test_ops/test_sync_bn_cuda.py -v \
      -rfEs -p no:cacheprovider -p gpu_check --timeout="$TEST_TIMEOUT_S" \
      --durations=10 "${DESELECT[@]}"
  fi
  todo graph && step graph "${CHECK[@]}" graph
  if todo benchmark; then
    if [ "$REHEARSAL" = 1 ]; then
      # Without a GPU the benchmark gets as far as its own check (mmsync
      # imported from the tree) and exits with "no CUDA GPU".
      step benchmark python3 tools/analysis_tools/benchmark_cuda.py
    else
      step benchmark python3 tools/analysis_tools/benchmark_cuda.py --resume \
        --json "$STATE/benchmark_cuda.json"
    fi
  fi
else
  for s in memcheck initcheck tests graph benchmark; do
    todo $s && block $s "the build or the kernel registration failed"
  done
fi

DEADLINE=$(( DEADLINE + SUMMARY_S ))
stamp "summary"
"${CHECK[@]}" summary "$STATE" | tee "$STATE/summary.txt.tmp"
mv "$STATE/summary.txt.tmp" "$STATE/summary.txt"
sync_out
"${CHECK[@]}" verdict "$STATE" "${REH_FLAG[@]}"
rc=$?
stamp "$([ $rc = 0 ] && echo done || echo FAILED) (results in $OUT)"
exit $rc
