// Raw-pointer CPU kernels of the sync_bn ops, compiled once per instruction
// set (default, AVX2, AVX-512) and chosen at run time. Inputs are PLANAR
// (N x C x S contiguous) or ROWS (N*S rows of C contiguous channels).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <vector>

#include "../../common/sync_bn_common.h"
#include "../sync_bn_utils.h"

namespace mmsync {
namespace cpu {

// Per-channel constants of the passes after the statistics, in double.
struct ChannelTable {
  const double* mean;   // global mean
  const double* scale;  // invstd * weight
  const double* bias;   // bias (zeros without affine)
};

struct Kernels {
  const char* name;
  // Per-channel shift (the channel's first value), mean relative to it and
  // biased variance of x.
  void (*stats)(at::ScalarType dtype, const void* x, const Geometry& g,
                double* shift, double* mean, double* var);
  // y = (x - mean) * scale + bias, then ReLU if asked.
  void (*output)(at::ScalarType dtype, const void* x, void* y,
                 const Geometry& g, const ChannelTable& t, bool relu);
  // sum(dy') and sum(dy' * (x - mean)), dy' masked by the ReLU if asked.
  void (*reduce)(at::ScalarType dtype, const void* dy, const void* x,
                 const Geometry& g, const ChannelTable& t, bool relu,
                 double* sum_dy, double* sum_dy_xmu);
  // dx = scale * (dy' - shift) + k2 * (x - mean).
  void (*data)(at::ScalarType dtype, const void* dy, const void* x, void* dx,
               const Geometry& g, const ChannelTable& t, const double* shift,
               const double* k2, bool relu);
};

// nullptr where the instruction set cannot be compiled for.
const Kernels* kernels_default();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

}  // namespace cpu
}  // namespace mmsync
