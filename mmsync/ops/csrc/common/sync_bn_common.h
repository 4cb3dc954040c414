// Per-channel math shared by the CPU and CUDA backends of the sync_bn ops:
// Chan's merge of (count, mean, M2) and the O(C) finalize step that turns the
// all-reduced packed statistics into mean / invstd / running-stat updates.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMSYNC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMSYNC_HOST_DEVICE inline
#endif

namespace mmsync {

// Layout of the packed statistics buffer (float64, 2 * C + 2 entries) that
// one all_reduce sums across ranks: [weight, count, weight * mean[C],
// weight * (var + mean^2)[C]], var being the local biased variance. The
// weight is the local count in 'N' mode and 1 (0 for an empty rank) in
// 'default' mode, so the summed buffer gives the weighted global moments.
constexpr int kStatsHeader = 2;

// Merges the partial moments (nb, mean_b, m2_b) into (n, mean, m2).
template <typename T>
MMSYNC_HOST_DEVICE void chan_merge(T& n, T& mean, T& m2, T nb, T mean_b,
                                   T m2_b) {
  if (nb <= T(0)) return;
  const T n_ab = n + nb;
  const T delta = mean_b - mean;
  const T frac_b = nb / n_ab;
  mean += delta * frac_b;
  m2 += m2_b + delta * delta * n * frac_b;
  n = n_ab;
}

// Global mean and biased variance of channel c from the reduced buffer.
MMSYNC_HOST_DEVICE void packed_moments(const double* stats, long long C,
                                       long long c, double& mean,
                                       double& var) {
  const double weight = stats[0];
  if (weight <= 0.0) {
    mean = 0.0;
    var = 0.0;
    return;
  }
  mean = stats[kStatsHeader + c] / weight;
  const double second = stats[kStatsHeader + C + c] / weight;
  var = second - mean * mean;
  var = var > 0.0 ? var : 0.0;
}

// Scale a of the backward formula dx = w*invstd*(dy - a*(sum_dy +
// xhat*sum_dy_xhat)): 1/N_total in 'N' mode, 1/(W*n_local) in 'default'.
MMSYNC_HOST_DEVICE double grad_scale(const double* stats, long long count,
                                     bool weight_by_count) {
  if (count <= 0) return 0.0;
  if (weight_by_count) return stats[1] > 0.0 ? 1.0 / stats[1] : 0.0;
  return stats[0] > 0.0 ? 1.0 / (stats[0] * double(count)) : 0.0;
}

// Factor of the running-stat update: momentum, or 1/num_batches_tracked for
// the cumulative average (momentum=None); 0 when no batch has been seen.
MMSYNC_HOST_DEVICE double update_factor(bool has_momentum, double momentum,
                                        bool has_tracked, long long tracked) {
  if (has_momentum) return momentum;
  return (has_tracked && tracked > 0) ? 1.0 / double(tracked) : 0.0;
}

// Unbiased variance with the total count n (> 1 is checked by the caller).
MMSYNC_HOST_DEVICE double unbiased_var(double var, double n) {
  return n > 1.0 ? var * n / (n - 1.0) : var;
}

}  // namespace mmsync
