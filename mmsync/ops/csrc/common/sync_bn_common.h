// Per-channel math shared by the CPU and CUDA backends of the sync_bn ops:
// Chan's merge of (count, mean, M2) and the O(C) finalize step that merges
// the ranks' gathered statistics into mean / invstd / running-stat updates.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMSYNC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMSYNC_HOST_DEVICE inline
#endif

namespace mmsync {

// Layout of one rank's packed statistics (float64, 3 * C + 2 entries):
// [weight, count, shift[C], mean[C], M2[C]]: the rank's mean is shift + mean
// (shift: one of its values of the channel, mean relative to it) and M2 the
// sum of its squared deviations. The weight is the count in 'N' mode and 1
// (0 for an empty rank) in 'default' mode. The forward gathers every rank's
// row and merge_rows combines them in rank order relative to the first
// non-empty rank's shift: no E[x^2] - mean^2, which cancels when mean >> std,
// and no difference of two means rounded at the offset's magnitude.
constexpr int kStatsHeader = 2;
constexpr int kStatsFields = 3;

// F.batch_norm's error for a group holding one value per channel in
// training, raised by the finalize of every backend.
#define MMSYNC_ONE_VALUE_ERROR                                    \
  "Expected more than 1 value per channel when training, got 1 " \
  "value per channel in the whole group"

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

// Total weight and count of `rows` gathered rows of 3C+2 entries.
MMSYNC_HOST_DEVICE void group_totals(const double* stats, long long rows,
                                     long long C, double& weight,
                                     double& count) {
  weight = 0.0;
  count = 0.0;
  for (long long r = 0; r < rows; ++r) {
    weight += stats[r * (kStatsFields * C + kStatsHeader)];
    count += stats[r * (kStatsFields * C + kStatsHeader) + 1];
  }
}

// Weighted mean and biased variance of channel c over `rows` gathered rows,
// merged by Chan's formula in rank order (the same bits on every rank). A
// row weighs w with the rank's mean and w * M2 / n: its biased variance
// counted w times.
MMSYNC_HOST_DEVICE void merge_rows(const double* stats, long long rows,
                                   long long C, long long c, double& mean,
                                   double& var) {
  double w = 0.0, rel = 0.0, m2 = 0.0, base = 0.0;
  for (long long r = 0; r < rows; ++r) {
    const double* row = stats + r * (kStatsFields * C + kStatsHeader);
    const double wr = row[0], nr = row[1];
    if (wr <= 0.0 || nr <= 0.0) continue;
    const double shift = row[kStatsHeader + c];
    if (w == 0.0) base = shift;
    const double m2r = row[kStatsHeader + 2 * C + c];
    chan_merge(w, rel, m2, wr, (shift - base) + row[kStatsHeader + C + c],
               wr == nr ? m2r : wr * (m2r / nr));
  }
  mean = base + rel;
  var = w > 0.0 ? m2 / w : 0.0;
}

// Scale a of the backward formula dx = w*invstd*(dy - a*(sum_dy +
// xhat*sum_dy_xhat)): 1/N_total in 'N' mode, 1/(W*n_local) in 'default',
// from the group's total weight W and count N.
MMSYNC_HOST_DEVICE double grad_scale(double weight, double total,
                                     long long count, bool weight_by_count) {
  if (count <= 0) return 0.0;
  if (weight_by_count) return total > 0.0 ? 1.0 / total : 0.0;
  return weight > 0.0 ? 1.0 / (weight * double(count)) : 0.0;
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
