// CPU kernels of the sync_bn ops. Inputs are PLANAR (N x C x S contiguous) or
// ROWS (N*S rows of C contiguous channels: channels_last and 2D inputs). Work
// is cut into fixed pieces, independent of the thread count, and partial
// results are merged in a fixed order: the output is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../../common/sync_bn_common.h"
#include "../sync_bn_utils.h"

namespace mmsync {
namespace {

using at::Tensor;

// Elements of one plane summed in the accumulate type before the partial
// moments are merged in double; small enough to stay in L1/L2 between the
// two reads of the statistics pass, so the input is read once from memory.
constexpr int64_t kChunk = 4096;
// Independent accumulators of the inner loops (vectorized by the compiler).
constexpr int kLanes = 16;
// ROWS layout: channels per tile, elements per block, row groups.
constexpr int64_t kTile = 1024;
constexpr int64_t kBlockElems = 16384;
constexpr int64_t kMaxGroups = 64;

template <typename acc_t>
inline acc_t reduce_lanes(acc_t* acc) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// Mean and M2 of x[0..n) in two reads of a cache-resident span: the mean,
// then the shifted moments, corrected by their first-order residual.
template <typename scalar_t, typename acc_t>
inline void span_moments(const scalar_t* x, int64_t n, double& mean,
                         double& m2) {
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += acc_t(x[i + j]);
  acc_t total = reduce_lanes(acc);
  for (; i < n; ++i) total += acc_t(x[i]);
  const acc_t shift = total / acc_t(n);
  acc_t s1[kLanes] = {}, s2[kLanes] = {};
  for (i = 0; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = acc_t(x[i + j]) - shift;
      s1[j] += d;
      s2[j] += d * d;
    }
  acc_t d1 = reduce_lanes(s1), d2 = reduce_lanes(s2);
  for (; i < n; ++i) {
    const acc_t d = acc_t(x[i]) - shift;
    d1 += d;
    d2 += d * d;
  }
  mean = double(shift) + double(d1) / double(n);
  m2 = double(d2) - double(d1) * double(d1) / double(n);
}

// Per-channel mean and biased variance of a PLANAR input.
template <typename scalar_t>
void stats_planar(const scalar_t* x, const Geometry& g, double* mean,
                  double* var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = (g.S + kChunk - 1) / kChunk;
  const int64_t tasks = g.N * g.C * K;
  std::vector<double> part_mean(tasks), part_m2(tasks);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::min(g.S, kChunk));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t plane = t / K, k = t % K;
      const int64_t len = std::min(kChunk, g.S - k * kChunk);
      span_moments<scalar_t, acc_t>(x + plane * g.S + k * kChunk, len,
                                    part_mean[t], part_m2[t]);
    }
  });
  at::parallel_for(0, g.C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double n = 0, m = 0, m2 = 0;
      for (int64_t i = 0; i < g.N; ++i)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t t = (i * g.C + c) * K + k;
          const double len = double(std::min(kChunk, g.S - k * kChunk));
          chan_merge(n, m, m2, len, part_mean[t], part_m2[t]);
        }
      mean[c] = m;
      var[c] = n > 0 ? m2 / n : 0.0;
    }
  });
}

// Splits the rows of a ROWS input into blocks, and the blocks into a fixed
// number of groups; each (group, channel tile) task owns its partials.
struct RowPlan {
  int64_t tile, tiles, block_rows, blocks, groups;
  RowPlan(const Geometry& g) {
    tile = std::min(g.C, kTile);
    tiles = (g.C + tile - 1) / tile;
    block_rows = std::max<int64_t>(8, kBlockElems / tile);
    blocks = (g.rows() + block_rows - 1) / block_rows;
    groups = std::min(blocks, kMaxGroups);
  }
  int64_t group_begin(int64_t grp) const { return grp * blocks / groups; }
  int64_t row_begin(int64_t block) const { return block * block_rows; }
};

template <typename scalar_t>
void stats_rows(const scalar_t* x, const Geometry& g, double* mean,
                double* var) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowPlan plan(g);
  const int64_t C = g.C, M = g.rows();
  std::vector<double> gn(plan.groups * C, 0.0), gm(plan.groups * C, 0.0),
      gm2(plan.groups * C, 0.0);
  at::parallel_for(0, plan.groups * plan.tiles, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> sum(plan.tile), s1(plan.tile), s2(plan.tile);
    for (int64_t task = b; task < e; ++task) {
      const int64_t grp = task / plan.tiles;
      const int64_t c0 = (task % plan.tiles) * plan.tile;
      const int64_t ct = std::min(plan.tile, C - c0);
      for (int64_t blk = plan.group_begin(grp);
           blk < plan.group_begin(grp + 1); ++blk) {
        const int64_t r0 = plan.row_begin(blk);
        const int64_t r1 = std::min(M, r0 + plan.block_rows);
        std::fill(sum.begin(), sum.end(), acc_t(0));
        std::fill(s1.begin(), s1.end(), acc_t(0));
        std::fill(s2.begin(), s2.end(), acc_t(0));
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = x + r * C + c0;
          for (int64_t j = 0; j < ct; ++j) sum[j] += acc_t(row[j]);
        }
        const acc_t inv_rows = acc_t(1) / acc_t(r1 - r0);
        for (int64_t j = 0; j < ct; ++j) sum[j] *= inv_rows;
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = x + r * C + c0;
          for (int64_t j = 0; j < ct; ++j) {
            const acc_t d = acc_t(row[j]) - sum[j];
            s1[j] += d;
            s2[j] += d * d;
          }
        }
        const double rows = double(r1 - r0);
        for (int64_t j = 0; j < ct; ++j) {
          const int64_t idx = grp * C + c0 + j;
          const double d1 = s1[j];
          chan_merge(gn[idx], gm[idx], gm2[idx], rows,
                     double(sum[j]) + d1 / rows, double(s2[j]) - d1 * d1 / rows);
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, m = 0, m2 = 0;
    for (int64_t grp = 0; grp < plan.groups; ++grp) {
      const int64_t idx = grp * C + c;
      chan_merge(n, m, m2, gn[idx], gm[idx], gm2[idx]);
    }
    mean[c] = m;
    var[c] = n > 0 ? m2 / n : 0.0;
  }
}

Tensor forward_stats_cpu(const Tensor& input_, bool weight_by_count) {
  check_input(input_);
  Layout layout;
  const Tensor input = as_kernel_layout(input_, &layout);
  const Geometry g = geometry_of(input, layout);
  Tensor stats = at::zeros({2 * g.C + kStatsHeader},
                           input.options().dtype(at::kDouble));
  const int64_t count = g.rows();
  if (count == 0 || g.C == 0) return stats;
  double* out = stats.data_ptr<double>();
  std::vector<double> mean(g.C), var(g.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "sync_bn_stats_cpu",
      [&] {
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        if (layout == Layout::kPlanar)
          stats_planar<scalar_t>(x, g, mean.data(), var.data());
        else
          stats_rows<scalar_t>(x, g, mean.data(), var.data());
      });
  const double w = weight_by_count ? double(count) : 1.0;
  out[0] = w;
  out[1] = double(count);
  for (int64_t c = 0; c < g.C; ++c) {
    out[kStatsHeader + c] = w * mean[c];
    out[kStatsHeader + g.C + c] = w * (var[c] + mean[c] * mean[c]);
  }
  return stats;
}

std::tuple<Tensor, Tensor, Tensor> forward_finalize_cpu(
    const Tensor& stats_, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var,
    const c10::optional<Tensor>& num_batches_tracked,
    c10::optional<double> momentum, double eps, int64_t count,
    bool weight_by_count, at::ScalarType dtype) {
  TORCH_CHECK(stats_.scalar_type() == at::kDouble && stats_.dim() == 1 &&
                  stats_.size(0) >= kStatsHeader &&
                  (stats_.size(0) - kStatsHeader) % 2 == 0,
              "sync_bn_forward_finalize: stats must be the float64 (2C+2,) "
              "buffer of sync_bn_forward_stats, got ",
              stats_.scalar_type(), " ", stats_.sizes());
  const Tensor stats = stats_.contiguous();
  const int64_t C = (stats.size(0) - kStatsHeader) / 2;
  const double* s = stats.const_data_ptr<double>();
  const auto opts = stats.options();
  Tensor mean = at::empty({C}, opts), invstd = at::empty({C}, opts),
         unbiased = at::empty({C}, opts);
  double* pm = mean.data_ptr<double>();
  double* pi = invstd.data_ptr<double>();
  double* pu = unbiased.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    double m, v;
    packed_moments(s, C, c, m, v);
    pm[c] = m;
    pi[c] = 1.0 / std::sqrt(v + eps);
    pu[c] = unbiased_var(v, s[1]);
  }
  const bool has_running = running_mean.has_value() &&
                           running_mean->defined() && running_var.has_value() &&
                           running_var->defined();
  if (has_running && s[1] > 0.0) {
    const bool tracked = num_batches_tracked.has_value() &&
                         num_batches_tracked->defined();
    const double f = update_factor(
        momentum.has_value(), momentum.value_or(0.0), tracked,
        tracked ? num_batches_tracked->item<int64_t>() : 0);
    TORCH_CHECK(running_mean->numel() == C && running_var->numel() == C,
                "sync_bn_forward_finalize: running_mean and running_var must "
                "have C = ",
                C, " elements");
    running_mean->copy_(running_mean->to(at::kDouble).mul_(1.0 - f).add_(mean, f));
    running_var->copy_(
        running_var->to(at::kDouble).mul_(1.0 - f).add_(unbiased, f));
  }
  Tensor scale = at::full({1}, grad_scale(s, count, weight_by_count), opts);
  return {mean.to(dtype), invstd.to(dtype), scale.to(dtype)};
}

// Per-channel constants of the passes after the statistics. The mean is
// split into hi + lo parts of the accumulate type, so x - mean keeps full
// precision when the mean is large against the spread (mean >> std).
template <typename acc_t>
struct ChannelParams {
  std::vector<acc_t> mean_hi, mean_lo, scale, bias;
  std::vector<double> invstd;
  ChannelParams(const Tensor& input, const Tensor& mean,
                const Tensor& invstd_, const c10::optional<Tensor>& weight,
                const c10::optional<Tensor>& bias_) {
    const int64_t C = input.size(1);
    const Tensor m = channel_vector(mean, "mean", input, at::kDouble);
    const Tensor is = channel_vector(invstd_, "invstd", input, at::kDouble);
    const Tensor w = weight_or_ones(weight, input, at::kDouble);
    const Tensor b = bias_or_zeros(bias_, input, at::kDouble);
    const double *pm = m.const_data_ptr<double>(),
                 *pi = is.const_data_ptr<double>(),
                 *pw = w.const_data_ptr<double>(),
                 *pb = b.const_data_ptr<double>();
    mean_hi.resize(C);
    mean_lo.resize(C);
    scale.resize(C);
    bias.resize(C);
    invstd.assign(pi, pi + C);
    for (int64_t c = 0; c < C; ++c) {
      mean_hi[c] = acc_t(pm[c]);
      mean_lo[c] = acc_t(pm[c] - double(mean_hi[c]));
      scale[c] = acc_t(pi[c] * pw[c]);
      bias[c] = acc_t(pb[c]);
    }
  }
};

// Grain of the elementwise passes: about 32K elements per task.
inline int64_t elementwise_grain(int64_t inner) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, inner));
}

template <typename scalar_t, typename acc_t>
inline void output_span(const scalar_t* x, scalar_t* y, int64_t n, acc_t hi,
                        acc_t lo, acc_t k, acc_t b, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = ((acc_t(x[i]) - hi) - lo) * k + b;
      y[i] = scalar_t(v > acc_t(0) ? v : acc_t(0));
    }
  } else {
    for (int64_t i = 0; i < n; ++i)
      y[i] = scalar_t(((acc_t(x[i]) - hi) - lo) * k + b);
  }
}

Tensor forward_output_cpu(const Tensor& input_, const Tensor& mean,
                          const Tensor& invstd,
                          const c10::optional<Tensor>& weight,
                          const c10::optional<Tensor>& bias, bool relu) {
  check_input(input_);
  Layout layout;
  const Tensor input = as_kernel_layout(input_, &layout);
  const Geometry g = geometry_of(input, layout);
  Tensor output = empty_same_layout(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "sync_bn_output_cpu",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const ChannelParams<acc_t> cp(input, mean, invstd, weight, bias);
        if (g.numel() == 0) return;
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        scalar_t* y = output.data_ptr<scalar_t>();
        const acc_t *hi = cp.mean_hi.data(), *lo = cp.mean_lo.data(),
                    *k = cp.scale.data(), *b = cp.bias.data();
        if (layout == Layout::kPlanar) {
          at::parallel_for(0, g.N * g.C, elementwise_grain(g.S),
                           [&](int64_t begin, int64_t end) {
                             for (int64_t p = begin; p < end; ++p) {
                               const int64_t c = p % g.C;
                               output_span(x + p * g.S, y + p * g.S, g.S,
                                           hi[c], lo[c], k[c], b[c], relu);
                             }
                           });
          return;
        }
        const int64_t C = g.C;
        at::parallel_for(
            0, g.rows(), elementwise_grain(C), [&](int64_t begin, int64_t end) {
              for (int64_t r = begin; r < end; ++r) {
                const scalar_t* xr = x + r * C;
                scalar_t* yr = y + r * C;
                if (relu) {
                  for (int64_t c = 0; c < C; ++c) {
                    const acc_t v = ((acc_t(xr[c]) - hi[c]) - lo[c]) * k[c] +
                                    b[c];
                    yr[c] = scalar_t(v > acc_t(0) ? v : acc_t(0));
                  }
                } else {
                  for (int64_t c = 0; c < C; ++c)
                    yr[c] = scalar_t(((acc_t(xr[c]) - hi[c]) - lo[c]) * k[c] +
                                     b[c]);
                }
              }
            });
      });
  return output;
}

// sum(dy) and sum(dy * (x - mean)) over a span; with relu, dy counts only
// where the forward output (x - mean) * k + b was positive.
template <typename scalar_t, typename acc_t>
inline void grad_span_sums(const scalar_t* dy, const scalar_t* x, int64_t n,
                           acc_t hi, acc_t lo, acc_t k, acc_t b, bool relu,
                           double& sdy, double& sdyx) {
  acc_t a1[kLanes] = {}, a2[kLanes] = {};
  int64_t i = 0;
  if (relu) {
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const acc_t xm = (acc_t(x[i + j]) - hi) - lo;
        const acc_t gv = xm * k + b > acc_t(0) ? acc_t(dy[i + j]) : acc_t(0);
        a1[j] += gv;
        a2[j] += gv * xm;
      }
  } else {
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const acc_t gv = acc_t(dy[i + j]);
        a1[j] += gv;
        a2[j] += gv * ((acc_t(x[i + j]) - hi) - lo);
      }
  }
  acc_t t1 = reduce_lanes(a1), t2 = reduce_lanes(a2);
  for (; i < n; ++i) {
    const acc_t xm = (acc_t(x[i]) - hi) - lo;
    const acc_t gv =
        (!relu || xm * k + b > acc_t(0)) ? acc_t(dy[i]) : acc_t(0);
    t1 += gv;
    t2 += gv * xm;
  }
  sdy = t1;
  sdyx = t2;
}

// grad_output in the input's layout, after checking that the two match.
Tensor grad_in_layout(const Tensor& grad_output, const Tensor& input,
                      Layout layout, const char* op) {
  TORCH_CHECK(grad_output.sizes() == input.sizes() &&
                  grad_output.scalar_type() == input.scalar_type() &&
                  grad_output.device() == input.device(),
              op, ": grad_output must match input in shape, dtype and device, "
              "got ", grad_output.sizes(), " ", grad_output.scalar_type(),
              " vs ", input.sizes(), " ", input.scalar_type());
  return to_layout(grad_output, layout);
}

template <typename scalar_t>
void reduce_planar(const scalar_t* dy, const scalar_t* x, const Geometry& g,
                   const ChannelParams<at::opmath_type<scalar_t>>& cp,
                   bool relu, double* sdy, double* sdyx) {
  const int64_t C = g.C, K = (g.S + kChunk - 1) / kChunk;
  const int64_t tasks = g.N * C * K;
  std::vector<double> p1(tasks), p2(tasks);
  at::parallel_for(0, tasks, elementwise_grain(std::min(g.S, kChunk)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t t = begin; t < end; ++t) {
                       const int64_t plane = t / K, kk = t % K, c = plane % C;
                       const int64_t off = plane * g.S + kk * kChunk;
                       const int64_t len = std::min(kChunk, g.S - kk * kChunk);
                       grad_span_sums(dy + off, x + off, len, cp.mean_hi[c],
                                      cp.mean_lo[c], cp.scale[c], cp.bias[c],
                                      relu, p1[t], p2[t]);
                     }
                   });
  for (int64_t i = 0; i < g.N; ++i)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t kk = 0; kk < K; ++kk) {
        const int64_t t = (i * C + c) * K + kk;
        sdy[c] += p1[t];
        sdyx[c] += p2[t];
      }
}

template <typename scalar_t>
void reduce_rows(const scalar_t* dy, const scalar_t* x, const Geometry& g,
                 const ChannelParams<at::opmath_type<scalar_t>>& cp, bool relu,
                 double* sdy, double* sdyx) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowPlan plan(g);
  const int64_t C = g.C, M = g.rows();
  std::vector<double> g1(plan.groups * C, 0.0), g2(plan.groups * C, 0.0);
  const acc_t *hi = cp.mean_hi.data(), *lo = cp.mean_lo.data(),
              *k = cp.scale.data(), *b = cp.bias.data();
  at::parallel_for(0, plan.groups * plan.tiles, 1, [&](int64_t bg, int64_t e) {
    std::vector<acc_t> a1(plan.tile), a2(plan.tile);
    for (int64_t task = bg; task < e; ++task) {
      const int64_t grp = task / plan.tiles;
      const int64_t c0 = (task % plan.tiles) * plan.tile;
      const int64_t ct = std::min(plan.tile, C - c0);
      for (int64_t blk = plan.group_begin(grp); blk < plan.group_begin(grp + 1);
           ++blk) {
        const int64_t r0 = plan.row_begin(blk);
        const int64_t r1 = std::min(M, r0 + plan.block_rows);
        std::fill(a1.begin(), a1.end(), acc_t(0));
        std::fill(a2.begin(), a2.end(), acc_t(0));
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = x + r * C + c0;
          const scalar_t* dr = dy + r * C + c0;
          for (int64_t j = 0; j < ct; ++j) {
            const int64_t c = c0 + j;
            const acc_t xm = (acc_t(xr[j]) - hi[c]) - lo[c];
            const acc_t gv = (!relu || xm * k[c] + b[c] > acc_t(0))
                                 ? acc_t(dr[j])
                                 : acc_t(0);
            a1[j] += gv;
            a2[j] += gv * xm;
          }
        }
        for (int64_t j = 0; j < ct; ++j) {
          g1[grp * C + c0 + j] += a1[j];
          g2[grp * C + c0 + j] += a2[j];
        }
      }
    }
  });
  for (int64_t grp = 0; grp < plan.groups; ++grp)
    for (int64_t c = 0; c < C; ++c) {
      sdy[c] += g1[grp * C + c];
      sdyx[c] += g2[grp * C + c];
    }
}

Tensor backward_reduce_cpu(const Tensor& grad_output_, const Tensor& input_,
                           const Tensor& mean, const Tensor& invstd,
                           const c10::optional<Tensor>& weight,
                           const c10::optional<Tensor>& bias, bool relu) {
  check_input(input_);
  Layout layout;
  const Tensor input = as_kernel_layout(input_, &layout);
  const Tensor grad_output =
      grad_in_layout(grad_output_, input, layout, "sync_bn_backward_reduce");
  const Geometry g = geometry_of(input, layout);
  const int64_t C = g.C;
  std::vector<double> sdy(C, 0.0), sdyx(C, 0.0), inv(C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "sync_bn_reduce_cpu",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const ChannelParams<acc_t> cp(input, mean, invstd, weight, bias);
        inv = cp.invstd;
        if (g.numel() == 0) return;
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
        if (layout == Layout::kPlanar)
          reduce_planar(dy, x, g, cp, relu, sdy.data(), sdyx.data());
        else
          reduce_rows(dy, x, g, cp, relu, sdy.data(), sdyx.data());
      });
  Tensor sums = at::empty({2 * C}, input.options().dtype(at::kDouble));
  double* ps = sums.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    ps[c] = sdy[c];
    ps[C + c] = sdyx[c] * inv[c];
  }
  return sums.to(acc_type_of(input.scalar_type()));
}

Tensor backward_data_cpu(const Tensor& grad_output_, const Tensor& input_,
                         const Tensor& mean, const Tensor& invstd,
                         const c10::optional<Tensor>& weight,
                         const c10::optional<Tensor>& bias,
                         const Tensor& sums_, const Tensor& scale_,
                         bool relu) {
  check_input(input_);
  Layout layout;
  const Tensor input = as_kernel_layout(input_, &layout);
  const Tensor grad_output =
      grad_in_layout(grad_output_, input, layout, "sync_bn_backward_data");
  const Geometry g = geometry_of(input, layout);
  const int64_t C = g.C;
  TORCH_CHECK(sums_.dim() == 1 && sums_.size(0) == 2 * C,
              "sync_bn_backward_data: sums must have shape (2C,) = (", 2 * C,
              ",), got ", sums_.sizes());
  TORCH_CHECK(scale_.numel() == 1,
              "sync_bn_backward_data: scale must have one element, got ",
              scale_.numel());
  const Tensor sums = sums_.to(at::kDouble).contiguous();
  const double a = scale_.to(at::kDouble).item<double>();
  Tensor grad_input = empty_same_layout(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "sync_bn_data_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const ChannelParams<acc_t> cp(input, mean, invstd, weight, bias);
        if (g.numel() == 0) return;
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
        scalar_t* dx = grad_input.data_ptr<scalar_t>();
        const double* ps = sums.const_data_ptr<double>();
        // dx = k * (dy - a * sum_dy) + k2 * (x - mean), k = weight * invstd.
        std::vector<acc_t> shift(C), k2(C);
        for (int64_t c = 0; c < C; ++c) {
          shift[c] = acc_t(a * ps[c]);
          k2[c] = acc_t(-double(cp.scale[c]) * a * cp.invstd[c] * ps[C + c]);
        }
        const acc_t *hi = cp.mean_hi.data(), *lo = cp.mean_lo.data(),
                    *k = cp.scale.data(), *b = cp.bias.data();
        if (layout == Layout::kPlanar) {
          at::parallel_for(
              0, g.N * C, elementwise_grain(g.S), [&](int64_t bg, int64_t e) {
                for (int64_t p = bg; p < e; ++p) {
                  const int64_t c = p % C, off = p * g.S;
                  const acc_t h = hi[c], l = lo[c], kc = k[c], sc = shift[c],
                              k2c = k2[c], bc = b[c];
                  if (relu) {
                    for (int64_t i = 0; i < g.S; ++i) {
                      const acc_t xm = (acc_t(x[off + i]) - h) - l;
                      const acc_t gv = xm * kc + bc > acc_t(0)
                                           ? acc_t(dy[off + i])
                                           : acc_t(0);
                      dx[off + i] = scalar_t(kc * (gv - sc) + k2c * xm);
                    }
                  } else {
                    for (int64_t i = 0; i < g.S; ++i)
                      dx[off + i] =
                          scalar_t(kc * (acc_t(dy[off + i]) - sc) +
                                   k2c * ((acc_t(x[off + i]) - h) - l));
                  }
                }
              });
          return;
        }
        at::parallel_for(
            0, g.rows(), elementwise_grain(C), [&](int64_t bg, int64_t e) {
              for (int64_t r = bg; r < e; ++r) {
                const scalar_t* xr = x + r * C;
                const scalar_t* dr = dy + r * C;
                scalar_t* gr = dx + r * C;
                for (int64_t c = 0; c < C; ++c) {
                  const acc_t xm = (acc_t(xr[c]) - hi[c]) - lo[c];
                  const acc_t gv = (!relu || xm * k[c] + b[c] > acc_t(0))
                                       ? acc_t(dr[c])
                                       : acc_t(0);
                  gr[c] = scalar_t(k[c] * (gv - shift[c]) + k2[c] * xm);
                }
              }
            });
      });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmsync, CPU, m) {
  m.impl("sync_bn_forward_stats", &forward_stats_cpu);
  m.impl("sync_bn_forward_finalize", &forward_finalize_cpu);
  m.impl("sync_bn_forward_output", &forward_output_cpu);
  m.impl("sync_bn_backward_reduce", &backward_reduce_cpu);
  m.impl("sync_bn_backward_data", &backward_data_cpu);
}

}  // namespace mmsync
