// Emulation stand-in for c10's CUDA error checks (see ../../../emu_prelude.h).
#pragma once
#include <c10/util/Exception.h>

#include "../../../emu_prelude.h"

#define C10_CUDA_CHECK(EXPR)                                         \
  do {                                                               \
    const cudaError_t mmsync_emu_err = (EXPR);                       \
    TORCH_CHECK(mmsync_emu_err == cudaSuccess,                       \
                "CUDA error: ", cudaGetErrorString(mmsync_emu_err)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
