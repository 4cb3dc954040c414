#!/usr/bin/env bash
# The GPU check of mmsync's CUDA kernels, for a fresh GPU machine with no
# network (python3 with a CUDA torch, nvcc, ninja, pytest): builds mmsync in
# place for TORCH_CUDA_ARCH_LIST (default 9.0), runs the CUDA tests and the
# CUDA benchmark, and prints a short table last. Well inside 8 minutes on an
# H100/H200. How to call it through the device tool: docs/benchmarks_cuda.md.
#
#   [OUT=dir] [WHEELS=dir] [MMSYNC_COMMIT=sha] bash tools/gpu_check.sh
#
# WHEELS (default build/wheels): pure-Python wheels that the machine lacks
# (mmengine and what it imports), installed into /tmp/site first.
# OUT (default work_dirs/gpu_check): logs and benchmark JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-work_dirs/gpu_check}
WHEELS=${WHEELS:-build/wheels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stamp "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
  --format=csv | tee "$OUT/device.txt"
python3 - <<'EOF' | tee -a "$OUT/device.txt"
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF

stamp "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1
B0=$(date +%s)
if ! python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  stamp "BUILD FAILED (full log: $OUT/build.log)"
  exit 1
fi
BUILD_S=$(( $(date +%s) - B0 ))
grep -iE "warning|spill" "$OUT/build.log" | grep -v "^ptxas info" | head -20
stamp "built in ${BUILD_S}s"

stamp "CUDA tests"
timeout 270 python3 -m pytest tests/test_ops/test_sync_bn_cuda.py -q -rfEs \
  -p no:cacheprovider >"$OUT/tests.log" 2>&1
TESTS_RC=$?
tail -40 "$OUT/tests.log"

stamp "CUDA benchmark"
timeout 240 python3 tools/benchmark_cuda.py --json "$OUT/benchmark_cuda.json" \
  >"$OUT/benchmark.log" 2>&1
BENCH_RC=$?
cat "$OUT/benchmark.log" | tail -60

stamp "summary"
BUILD_S=$BUILD_S TESTS_RC=$TESTS_RC BENCH_RC=$BENCH_RC OUT=$OUT \
  python3 - <<'EOF' | tee "$OUT/summary.txt"
import json
import os
import re

out = os.environ['OUT']
tests = open(os.path.join(out, 'tests.log')).read().strip().splitlines()
verdict = next((l for l in reversed(tests) if re.search(r'passed|failed|error',
                                                        l)), '(no result)')
rows = [('build', f"ok, {os.environ['BUILD_S']} s"),
        ('tests', f"rc {os.environ['TESTS_RC']}: {verdict.strip('= ')}")]
try:
    b = json.load(open(os.path.join(out, 'benchmark_cuda.json')))
    info = b['info']
    rows.append(('device', f"{info['device']}, torch {info['torch']}, "
                 f"commit {info['commit']}"))
    rows.append(('copy', f"{b['copy_gbs']:.0f} GB/s"))
    ratios = [s['graph_ratio'] for s in b['steps']]
    slower = [f"{s['shape']} {s['dtype']} {s['layout']} x{s['graph_ratio']:.2f}"
              for s in b['steps'] if s['graph_ratio'] > 1.0]
    rows.append(('step vs native', f"graph ratio {min(ratios):.2f}.."
                 f"{max(ratios):.2f}; slower: {', '.join(slower) or 'none'}"))
    worst = min((p[f'{k}_of_copy'], k, p['dtype'], p['layout'])
                for p in b['passes']
                for k in ('stats', 'output', 'reduce', 'data'))
    rows.append(('pass bandwidth', f"worst {worst[0]:.2f} of copy "
                 f"({worst[1]}, {worst[2]}, {worst[3]})"))
    rows.append(('step passes', ', '.join(
        f"{p['dtype']}/{p['layout']} {p['step_passes']:.1f}"
        for p in b['passes'])))
    rows.append(('host-sync free', str(all(p['host_sync_free']
                                           for p in b['passes']))))
except (OSError, ValueError, KeyError) as e:
    rows.append(('benchmark', f"rc {os.environ['BENCH_RC']}: no results "
                 f"({e})"))
width = max(len(k) for k, _ in rows)
print('-' * 78)
for k, v in rows:
    print(f'{k:>{width}} | {v}')
print('-' * 78)
EOF
stamp "done"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
