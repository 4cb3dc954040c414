// Schemas of the sync_bn ops, declared once for every backend. The backends
// (cpu/sync_bn_cpu.cpp, cuda/sync_bn_cuda.cu) register their kernels; fake
// kernels for tracing live next to the Python wrapper (ops/sync_bn.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mmsync, m) {
  // Local statistics in one pass, packed as one row of the forward all_gather
  // (float64, 3C+2: weight, count, shift, mean, M2; sync_bn_common.h).
  m.def("sync_bn_forward_stats(Tensor input, bool weight_by_count) -> Tensor");
  // The ranks' gathered rows (R, 3C+2), merged in rank order -> (mean, invstd,
  // grad_scale); updates running stats.
  m.def(
      "sync_bn_forward_finalize(Tensor stats, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor? num_batches_tracked, float? momentum, "
      "float eps, int count, bool weight_by_count, ScalarType dtype) -> "
      "(Tensor, Tensor, Tensor)");
  // y = (x - mean) * invstd * weight + bias, optionally followed by ReLU.
  m.def(
      "sync_bn_forward_output(Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor? bias, bool relu) -> Tensor");
  // [sum(dy), sum(dy * xhat)] per channel (2C) in one pass.
  m.def(
      "sync_bn_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, "
      "Tensor invstd, Tensor? weight, Tensor? bias, bool relu) -> Tensor");
  // dx = weight * invstd * (dy - scale * (sum_dy + xhat * sum_dy_xhat)).
  m.def(
      "sync_bn_backward_data(Tensor grad_output, Tensor input, Tensor mean, "
      "Tensor invstd, Tensor? weight, Tensor? bias, Tensor sums, "
      "Tensor scale, bool relu) -> Tensor");
}
