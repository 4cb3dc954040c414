// CPU ops of sync_bn: argument checks and layouts here, the passes in the
// kernels of sync_bn_cpu_kernel*.cpp, picked once for the CPU's instruction
// set (MMSYNC_CPU_CAPABILITY=default|avx2|avx512 caps the choice).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../../common/sync_bn_common.h"
#include "../sync_bn_utils.h"
#include "sync_bn_cpu_kernel.h"

namespace mmsync {
namespace {

using at::Tensor;

const cpu::Kernels& pick_kernels() {
  const char* cap = std::getenv("MMSYNC_CPU_CAPABILITY");
  const auto allowed = [cap](const char* name) {
    if (cap == nullptr) return true;
    if (std::strcmp(cap, "default") == 0) return false;
    return std::strcmp(cap, "avx512") == 0 || std::strcmp(cap, name) == 0;
  };
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (allowed("avx512") && cpu::kernels_avx512() &&
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return *cpu::kernels_avx512();
  if (allowed("avx2") && cpu::kernels_avx2() &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return *cpu::kernels_avx2();
#else
  (void)allowed;
#endif
  return *cpu::kernels_default();
}

const cpu::Kernels& kernels() {
  static const cpu::Kernels& k = pick_kernels();
  return k;
}

// A checked per-channel tensor as doubles, without ATen temporaries.
std::vector<double> channel_doubles(const c10::optional<Tensor>& t,
                                    const char* name, const Tensor& input,
                                    double fill) {
  const int64_t C = input.size(1);
  if (!t.has_value() || !t->defined()) return std::vector<double>(C, fill);
  check_channel(*t, name, input);
  std::vector<double> out(C);
  const Tensor tc = t->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, tc.scalar_type(), "sync_bn_channel", [&] {
        const scalar_t* p = tc.const_data_ptr<scalar_t>();
        for (int64_t c = 0; c < C; ++c) out[c] = double(p[c]);
      });
  return out;
}

// The per-channel table of the passes after the statistics, in double.
struct Table {
  std::vector<double> mean, invstd, scale, bias;
  cpu::ChannelTable view() const {
    return {mean.data(), scale.data(), bias.data()};
  }
};

Table make_table(const Tensor& input, const Tensor& mean, const Tensor& invstd,
                 const c10::optional<Tensor>& weight,
                 const c10::optional<Tensor>& bias) {
  Table t;
  t.mean = channel_doubles(mean, "mean", input, 0.0);
  t.invstd = channel_doubles(invstd, "invstd", input, 1.0);
  t.scale = channel_doubles(weight, "weight", input, 1.0);
  for (size_t c = 0; c < t.scale.size(); ++c) t.scale[c] *= t.invstd[c];
  t.bias = channel_doubles(bias, "bias", input, 0.0);
  return t;
}

Tensor forward_stats_cpu(const Tensor& input_, bool weight_by_count) {
  Tensor input;
  const Geometry g = kernel_input(input_, &input);
  Tensor stats = at::zeros({kStatsFields * g.C + kStatsHeader},
                           input.options().dtype(at::kDouble));
  const int64_t count = g.rows();
  if (count == 0 || g.C == 0) return stats;
  double* out = stats.data_ptr<double>();
  double* var = out + kStatsHeader + 2 * g.C;
  kernels().stats(input.scalar_type(), input.const_data_ptr(), g,
                  out + kStatsHeader, out + kStatsHeader + g.C, var);
  out[0] = weight_by_count ? double(count) : 1.0;
  out[1] = double(count);
  for (int64_t c = 0; c < g.C; ++c) var[c] *= double(count);  // M2
  return stats;
}

std::tuple<Tensor, Tensor, Tensor> forward_finalize_cpu(
    const Tensor& stats_, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var,
    const c10::optional<Tensor>& num_batches_tracked,
    c10::optional<double> momentum, double eps, int64_t count,
    bool weight_by_count, at::ScalarType dtype) {
  int64_t rows = 1;
  const int64_t C = stats_channels(stats_, &rows);
  const Tensor stats = stats_.contiguous();
  const double* s = stats.const_data_ptr<double>();
  double weight, total;
  group_totals(s, rows, C, weight, total);
  TORCH_CHECK_VALUE(total != 1.0, MMSYNC_ONE_VALUE_ERROR, " of ", rows,
                    " ranks");
  std::vector<double> mean(C), invstd(C), unbiased(C);
  for (int64_t c = 0; c < C; ++c) {
    double v;
    merge_rows(s, rows, C, c, mean[c], v);
    invstd[c] = 1.0 / std::sqrt(v + eps);
    unbiased[c] = unbiased_var(v, total);
  }
  const bool has_running =
      running_stats_given(running_mean, running_var, C, stats.device());
  if (has_running && total > 0.0) {
    const bool tracked = num_batches_tracked.has_value() &&
                         num_batches_tracked->defined();
    const double f = update_factor(
        momentum.has_value(), momentum.value_or(0.0), tracked,
        tracked ? num_batches_tracked->item<int64_t>() : 0);
    // running = (1 - f) * running + f * value, in place, in double.
    const auto update = [&](const Tensor& running,
                            const std::vector<double>& value) {
      Tensor r = running.is_contiguous() ? running : running.contiguous();
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, r.scalar_type(), "sync_bn_running", [&] {
            scalar_t* p = r.data_ptr<scalar_t>();
            for (int64_t c = 0; c < C; ++c)
              p[c] = scalar_t((1.0 - f) * double(p[c]) + f * value[c]);
          });
      if (!r.is_same(running)) running.copy_(r);
    };
    update(*running_mean, mean);
    update(*running_var, unbiased);
  }
  const auto opts = stats.options().dtype(dtype);
  Tensor mean_t = at::empty({C}, opts), invstd_t = at::empty({C}, opts),
         scale_t = at::empty({1}, opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "sync_bn_finalize_out", [&] {
    scalar_t* pm = mean_t.data_ptr<scalar_t>();
    scalar_t* pi = invstd_t.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      pm[c] = scalar_t(mean[c]);
      pi[c] = scalar_t(invstd[c]);
    }
    scale_t.data_ptr<scalar_t>()[0] =
        scalar_t(grad_scale(weight, total, count, weight_by_count));
  });
  return {mean_t, invstd_t, scale_t};
}

Tensor forward_output_cpu(const Tensor& input_, const Tensor& mean,
                          const Tensor& invstd,
                          const c10::optional<Tensor>& weight,
                          const c10::optional<Tensor>& bias, bool relu) {
  Tensor input;
  const Geometry g = kernel_input(input_, &input);
  const Table t = make_table(input, mean, invstd, weight, bias);
  Tensor output = empty_same_layout(input);
  if (g.numel() > 0)
    kernels().output(input.scalar_type(), input.const_data_ptr(),
                     output.data_ptr(), g, t.view(), relu);
  return output;
}

Tensor backward_reduce_cpu(const Tensor& grad_output_, const Tensor& input_,
                           const Tensor& mean, const Tensor& invstd,
                           const c10::optional<Tensor>& weight,
                           const c10::optional<Tensor>& bias, bool relu) {
  Tensor input;
  const Geometry g = kernel_input(input_, &input);
  const Tensor grad_output =
      grad_output_like(grad_output_, input, g.layout, "sync_bn_backward_reduce");
  const Table t = make_table(input, mean, invstd, weight, bias);
  const int64_t C = g.C;
  Tensor sums = at::zeros({2 * C}, input.options().dtype(at::kDouble));
  double* ps = sums.data_ptr<double>();
  if (g.numel() > 0)
    kernels().reduce(input.scalar_type(), grad_output.const_data_ptr(),
                     input.const_data_ptr(), g, t.view(), relu, ps, ps + C);
  for (int64_t c = 0; c < C; ++c) ps[C + c] *= t.invstd[c];
  return sums.to(acc_type_of(input.scalar_type()));
}

Tensor backward_data_cpu(const Tensor& grad_output_, const Tensor& input_,
                         const Tensor& mean, const Tensor& invstd,
                         const c10::optional<Tensor>& weight,
                         const c10::optional<Tensor>& bias,
                         const Tensor& sums_, const Tensor& scale_,
                         bool relu) {
  Tensor input;
  const Geometry g = kernel_input(input_, &input);
  const Tensor grad_output =
      grad_output_like(grad_output_, input, g.layout, "sync_bn_backward_data");
  const int64_t C = g.C;
  TORCH_CHECK(sums_.dim() == 1 && sums_.size(0) == 2 * C,
              "sync_bn_backward_data: sums must have shape (2C,) = (", 2 * C,
              ",), got ", sums_.sizes());
  TORCH_CHECK(scale_.numel() == 1,
              "sync_bn_backward_data: scale must have one element, got ",
              scale_.numel());
  const Table t = make_table(input, mean, invstd, weight, bias);
  const Tensor sums = sums_.to(at::kDouble).contiguous();
  const double a = scale_.to(at::kDouble).item<double>();
  // dx = k * (dy' - a * sum_dy) + k2 * (x - mean), k = weight * invstd,
  // k2 = -k * a * invstd * sum_dy_xhat.
  std::vector<double> shift(C), k2(C);
  const double *ps = sums.const_data_ptr<double>(),
               *pk = t.scale.data(), *pi = t.invstd.data();
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = a * ps[c];
    k2[c] = -pk[c] * a * pi[c] * ps[C + c];
  }
  Tensor grad_input = empty_same_layout(input);
  if (g.numel() > 0)
    kernels().data(input.scalar_type(), grad_output.const_data_ptr(),
                   input.const_data_ptr(), grad_input.data_ptr(), g, t.view(),
                   shift.data(), k2.data(), relu);
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

// The instruction set whose CPU kernels run here (tests, benchmarks).
TORCH_LIBRARY_FRAGMENT(mmsync, m) {
  m.def("cpu_capability() -> str",
        []() -> std::string { return kernels().name; });
}

}  // namespace mmsync
