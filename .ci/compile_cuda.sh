#!/usr/bin/env bash
# Compile-only check of every CUDA source of mmsync (no GPU, no CUDA torch
# needed): nvcc compiles each .cu to an object thrown away, with the flags
# setup.py's CUDAExtension uses and torch's (CPU wheel) include paths.
#
#   .ci/compile_cuda.sh [file.cu ...]    default: every mmsync/ops/csrc/**/*.cu
#
# TORCH_CUDA_ARCH_LIST (default "9.0") picks the targets, as in setup.py.
# Fails on any compile error; reports the kernel count, the most registers a
# kernel uses and any register spills (a failure only with STRICT_SPILLS=1);
# prints the time taken. COMPILE_CUDA_LOG=file keeps ptxas's full report.
set -euo pipefail
case "${1:-}" in -h | --help)
  sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0 ;;
esac
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "compile_cuda: $NVCC not found" >&2; exit 2; }

if [ $# -gt 0 ]; then
  SOURCES=("$@")
else
  mapfile -t SOURCES < <(find mmsync/ops/csrc -name '*.cu' | sort)
fi
[ ${#SOURCES[@]} -gt 0 ] || { echo "compile_cuda: no .cu files" >&2; exit 2; }

# Torch's include directories and the nvcc flags of its CUDAExtension.
mapfile -t TORCH_FLAGS < <(python3 - <<'EOF'
from torch.utils import cpp_extension as ce
for p in ce.include_paths():
    print('-I' + p)
for f in ce.COMMON_NVCC_FLAGS:
    print(f)
EOF
)

ARCH_FLAGS=()
IFS=';, ' read -r -a ARCHS <<< "${TORCH_CUDA_ARCH_LIST:-9.0}"
for a in "${ARCHS[@]}"; do
  [ -n "$a" ] || continue
  ptx=0
  case "$a" in *+PTX) ptx=1; a=${a%+PTX} ;; esac
  num=${a//./}
  ARCH_FLAGS+=("-gencode=arch=compute_${num},code=sm_${num}")
  [ $ptx = 1 ] && ARCH_FLAGS+=("-gencode=arch=compute_${num},code=compute_${num}")
done

# C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU wheel lacks the CMake-generated
# c10/cuda/impl/cuda_cmake_macros.h.
FLAGS=(-c -o /dev/null -std=c++20 -O3 -lineinfo -Xcompiler -fPIC
       -Xptxas -v
       -DMMSYNC_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
       -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_ext
       -Immsync/ops/csrc/common
       "${TORCH_FLAGS[@]}" "${ARCH_FLAGS[@]}")

status=0
total_start=$(date +%s)
for src in "${SOURCES[@]}"; do
  start=$(date +%s)
  log=$(mktemp)
  if "$NVCC" "${FLAGS[@]}" "$src" >"$log" 2>&1; then
    # ptxas -v: one "Compiling entry function" and one "Used N registers"
    # line per kernel; report them compactly.
    kernels=$(grep -c "Compiling entry function" "$log" || true)
    spills=$(grep -E "bytes spill (stores|loads)" "$log" |
             grep -vE " 0 bytes spill stores, 0 bytes spill loads" || true)
    maxreg=$(grep -oE "Used [0-9]+ registers" "$log" | awk '{print $2}' |
             sort -n | tail -1)
    echo "compile_cuda: OK   $src ($(( $(date +%s) - start )) s, ${kernels} kernels, max ${maxreg:-?} registers)"
    grep -iE "warning" "$log" | grep -v "ptxas info" | sort -u | head -20 || true
    if [ -n "$spills" ]; then
      echo "compile_cuda: register spills in $src (ptxas -v):"
      echo "$spills" | sort | uniq -c
      [ "${STRICT_SPILLS:-0}" = 1 ] && status=1
    fi
  else
    echo "compile_cuda: FAIL $src ($(( $(date +%s) - start )) s)" >&2
    grep -v "ptxas info" "$log" >&2 || true
    status=1
  fi
  [ -n "${COMPILE_CUDA_LOG:-}" ] && cat "$log" >>"$COMPILE_CUDA_LOG"
  rm -f "$log"
done
echo "compile_cuda: ${#SOURCES[@]} file(s) in $(( $(date +%s) - total_start )) s"
exit $status
