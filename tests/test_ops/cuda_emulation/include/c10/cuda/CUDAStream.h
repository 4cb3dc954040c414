// Emulation stand-in for the current CUDA stream (there is only one).
#pragma once
#include "../../../emu_prelude.h"

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
