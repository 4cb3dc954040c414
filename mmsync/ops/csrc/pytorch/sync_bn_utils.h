// Argument checks and memory-layout detection shared by the backends of the
// sync_bn ops. A tensor is either PLANAR (contiguous N, C, S...) or ROWS
// (channels last: N*S rows of C contiguous channels; also 2D inputs).
#pragma once

#include <ATen/ATen.h>

#include "../common/sync_bn_common.h"

namespace mmsync {

enum class Layout { kPlanar, kRows };

// Sizes of the input seen as N x C x S, and which layout its memory has.
struct Geometry {
  int64_t N, C, S;
  Layout layout;
  int64_t rows() const { return N * S; }
  int64_t numel() const { return N * C * S; }
};

inline bool is_rows_layout(const at::Tensor& t) {
  // The memory-format flags are cached on the tensor; the view is not.
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast))
    return true;
  if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return true;
  return t.movedim(1, -1).is_contiguous();
}

inline void check_input(const at::Tensor& input) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "sync_bn: expected a floating point input (float32, float64, "
              "float16 or bfloat16), got ",
              input.scalar_type());
  TORCH_CHECK(input.dim() >= 2, "sync_bn: expected input with 2 or more ",
              "dimensions (N, C, *), got ", input.dim(), "D");
}

// Checks `input` and sets `*out` to it in the layout the kernels read: as
// it is when PLANAR or ROWS, else made contiguous once (the Python layer
// already does so; this is a safe net). Returns its geometry.
inline Geometry kernel_input(const at::Tensor& input, at::Tensor* out) {
  check_input(input);
  int64_t spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) spatial *= input.size(d);
  Layout layout = Layout::kPlanar;
  *out = input;
  if (!(spatial > 1 && input.is_contiguous())) {
    if (is_rows_layout(input)) {
      layout = Layout::kRows;
    } else {
      *out = input.contiguous();
      // Contiguous with one value per plane (2-D): rows of C channels.
      if (spatial == 1) layout = Layout::kRows;
    }
  }
  return Geometry{input.size(0), input.size(1), spatial, layout};
}

// `t` (same sizes as the input) in the given layout, copied only if needed.
inline at::Tensor to_layout(const at::Tensor& t, Layout layout) {
  if (layout == Layout::kPlanar) return t.contiguous();
  if (is_rows_layout(t)) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

// grad_output in the input's layout, after checking that the two match.
inline at::Tensor grad_output_like(const at::Tensor& grad_output,
                                   const at::Tensor& input, Layout layout,
                                   const char* op) {
  TORCH_CHECK(grad_output.sizes() == input.sizes() &&
                  grad_output.scalar_type() == input.scalar_type(),
              op, ": grad_output must match input in shape and dtype, got ",
              grad_output.sizes(), " ", grad_output.scalar_type(), " vs ",
              input.sizes(), " ", input.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), op,
              ": grad_output is on ", grad_output.device(), " but input is on ",
              input.device());
  return to_layout(grad_output, layout);
}

// An uninitialized tensor like `input` with the same (dense) strides.
inline at::Tensor empty_same_layout(const at::Tensor& input) {
  return at::empty_strided(input.sizes(), input.strides(), input.options());
}

// Checks that a per-channel tensor has shape (C,) and the input's device.
inline void check_channel(const at::Tensor& t, const char* name,
                          const at::Tensor& input) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), "sync_bn: ", name,
              " must have shape (C,) = (", input.size(1), ",), got ",
              t.sizes());
  TORCH_CHECK(t.device() == input.device(), "sync_bn: ", name,
              " is on ", t.device(), " but input is on ", input.device());
}

// Checks a per-channel tensor and returns it as a contiguous `dtype` vector.
inline at::Tensor channel_vector(const at::Tensor& t, const char* name,
                                 const at::Tensor& input,
                                 at::ScalarType dtype) {
  check_channel(t, name, input);
  return t.to(dtype).contiguous();
}

// Checks the statistics given to sync_bn_forward_finalize: one rank's
// float64 (3C+2,) row of sync_bn_forward_stats, or the (R, 3C+2) rows of a
// group of R ranks. Returns C and sets *rows to R.
inline int64_t stats_channels(const at::Tensor& stats, int64_t* rows) {
  TORCH_CHECK(stats.scalar_type() == at::kDouble &&
                  (stats.dim() == 1 || stats.dim() == 2) &&
                  stats.size(-1) >= kStatsHeader &&
                  (stats.size(-1) - kStatsHeader) % kStatsFields == 0,
              "sync_bn_forward_finalize: stats must be the float64 (3C+2,) "
              "row of sync_bn_forward_stats or (R, 3C+2) rows of R ranks, "
              "got ",
              stats.scalar_type(), " ", stats.sizes());
  *rows = stats.dim() == 2 ? stats.size(0) : 1;
  return (stats.size(-1) - kStatsHeader) / kStatsFields;
}

// Whether running_mean and running_var are both given to
// sync_bn_forward_finalize; if so, checks that each holds C values on
// `device`.
inline bool running_stats_given(const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var,
                                int64_t C, const at::Device& device) {
  const bool given = running_mean.has_value() && running_mean->defined() &&
                     running_var.has_value() && running_var->defined();
  if (given) {
    TORCH_CHECK(running_mean->numel() == C && running_var->numel() == C,
                "sync_bn_forward_finalize: running_mean and running_var must "
                "have C = ",
                C, " elements");
    TORCH_CHECK(
        running_mean->device() == device && running_var->device() == device,
        "sync_bn_forward_finalize: running stats must be on ", device);
  }
  return given;
}

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace mmsync
