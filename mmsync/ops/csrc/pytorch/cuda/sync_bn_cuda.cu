// CUDA launchers of the sync_bn ops (schemas in ../sync_bn.cpp, semantics of
// cpu/sync_bn_cpu.cpp). Inputs are PLANAR (N x C x S contiguous) or ROWS
// (N*S rows of C channels); nothing here reads device memory from the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "../../common/cuda/sync_bn_cuda_kernel.cuh"
#include "../sync_bn_utils.h"

namespace mmsync {
namespace {

using at::Tensor;
using cuda::kThreads;
using cuda::kUnroll;

// Elements (PLANAR) or rows (ROWS) of one channel in one reduction block:
// keeps float32 counts exact (< 2^24).
constexpr int64_t kMaxBlockCount = int64_t(1) << 22;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count() {
  static std::atomic<int> cache[256];
  const int dev = c10::cuda::current_device();
  if (dev >= 0 && dev < 256) {
    const int known = cache[dev].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  sms = std::max(sms, 1);
  if (dev >= 0 && dev < 256) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

// Blocks of `kernel` that the whole GPU holds at once with this block size
// and dynamic shared memory: one full wave. Grids are sized in waves, since
// a partial last wave of equal blocks costs as much as a full one. Cached
// per (kernel, block, device): the query is a driver call.
int64_t wave_blocks(const void* kernel, int threads, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t, int>, int64_t> cache;
  const int dev = c10::cuda::current_device();
  const auto key = std::make_tuple(kernel, threads, smem, dev);
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel,
                                                               threads, smem));
  const int64_t wave = int64_t(std::max(per_sm, 1)) * sm_count();
  const std::lock_guard<std::mutex> lock(mu);
  cache.emplace(key, wave);
  return wave;
}

template <typename Kernel>
const void* as_key(Kernel* kernel) {
  return reinterpret_cast<const void*>(kernel);
}

// Blocks per item (splits) for `items` independent items (channels or
// channel tiles) in [lo, hi]: the fewest that fill at least ~one wave and
// leave the last wave >= 90% full, else the least wasteful tried; hi when
// even hi cannot fill one wave.
int64_t balanced_splits(int64_t items, int64_t wave, int64_t lo, int64_t hi) {
  hi = std::max(hi, lo);
  if (items * hi <= wave) return hi;
  const int64_t first =
      std::max(lo, std::min(hi, ceil_div(wave * 9, items * 10)));
  int64_t best = first;
  double best_fill = -1.0;
  for (int64_t s = first; s <= hi && s < first + 256; ++s) {
    const int64_t blocks = items * s;
    const double fill = double(blocks) / double(ceil_div(blocks, wave) * wave);
    if (fill >= 0.9) return s;
    if (fill > best_fill) {
      best_fill = fill;
      best = s;
    }
  }
  return best;
}

bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0;
}

// Widest vector of vmax, vmax / 2 or 1 elements that `fits(v)` the tensor
// and to which every pointer is aligned (vmax / 2 skipped unless `halves`):
// exactly the widths with_vec3 (halves) and with_vec2 instantiate.
template <typename Fits>
int pick_vec(int vmax, int64_t elem_size,
             std::initializer_list<const void*> ptrs, bool halves,
             Fits&& fits) {
  for (const int v : {vmax, halves ? vmax / 2 : 1}) {
    if (v <= 1) break;
    bool ok = fits(v);
    for (const void* p : ptrs) ok = ok && aligned_to(p, v * elem_size);
    if (ok) return v;
  }
  return 1;
}

// Calls f(std::integral_constant<int, V>) for V in {VMAX, VMAX / 2, 1}.
template <int VMAX, typename F>
void with_vec3(int v, F&& f) {
  constexpr int kHalfVec = VMAX / 2 > 1 ? VMAX / 2 : 1;
  if (v == VMAX)
    f(std::integral_constant<int, VMAX>());
  else if (v == kHalfVec)
    f(std::integral_constant<int, kHalfVec>());
  else
    f(std::integral_constant<int, 1>());
}

// Calls f(std::integral_constant<int, V>) for V in {VMAX, 1}.
template <int VMAX, typename F>
void with_vec2(int v, F&& f) {
  if (v == VMAX)
    f(std::integral_constant<int, VMAX>());
  else
    f(std::integral_constant<int, 1>());
}

template <typename scalar_t>
constexpr int vec_max() {
  return int(16 / sizeof(scalar_t));
}

// Aligned vectors of V elements inside every plane of S elements: plane
// offsets are multiples of S, so their misalignment to V is a multiple of
// gcd(S, V) and at most V - gcd(S, V) elements precede the first aligned
// offset (V: a power of 2).
int64_t plane_vectors(int64_t S, int V) {
  const int64_t before = V - std::min<int64_t>(S & -S, V);
  return S > before ? (S - before) / V : 0;
}

// Calls planar(V) or rows(V) (V as std::integral_constant) with the widest
// vector of scalar_t every pointer allows: ROWS passes by the channels they
// vectorize and PLANAR reductions by the plane size (VMAX, VMAX / 2 or 1),
// flat PLANAR passes VMAX or 1 (their vectors may span planes).
template <typename scalar_t, bool kReduction, typename Planar, typename Rows>
void dispatch_vec(const Geometry& g, std::initializer_list<const void*> ptrs,
                  Planar&& planar, Rows&& rows) {
  constexpr int VMAX = vec_max<scalar_t>();
  const int64_t size = sizeof(scalar_t);
  if (g.layout == Layout::kRows) {
    // Vectors of channels: V divides C.
    with_vec3<VMAX>(
        pick_vec(VMAX, size, ptrs, true, [&](int v) { return g.C % v == 0; }),
        rows);
  } else if constexpr (kReduction) {
    // Vectors inside each plane, covering at least half of it (7x7 planes:
    // 40 of 49 halves, 44 of 49 floats).
    with_vec3<VMAX>(pick_vec(VMAX, size, ptrs, true,
                             [&](int v) {
                               return 2 * plane_vectors(g.S, v) * v >= g.S;
                             }),
                    planar);
  } else {
    // Flat walks: any width (a vector that spans planes goes element-wise).
    with_vec2<VMAX>(pick_vec(VMAX, size, ptrs, false, [](int) { return true; }),
                    planar);
  }
}

// PLANAR reduction grid: (splits, channel tiles) of kThreads-thread blocks;
// `group` threads reduce one channel (kThreads / group channels a tile),
// each block its share of the channel's vectors and edge elements.
struct PlanarPlan {
  int64_t splits, grid_c;
  cuda::PlanarWalk walk;
  dim3 grid() const { return dim3(unsigned(splits), unsigned(grid_c)); }
};

cuda::PlaneStep plane_step(int64_t step, int64_t per_plane, int64_t stride) {
  cuda::PlaneStep st;
  st.per_plane = std::max<int64_t>(per_plane, 1);  // 1: an unused sequence
  st.dk = step % st.per_plane;
  st.jump = (step / st.per_plane) * stride;
  return st;
}

template <typename Kernel>
PlanarPlan plan_planar(const Geometry& g, int V, Kernel* kernel) {
  const int64_t wave = wave_blocks(as_key(kernel), kThreads, 0);
  PlanarPlan p;
  cuda::PlanarWalk& w = p.walk;
  w.W = plane_vectors(g.S, V);
  w.E = g.S - w.W * V;
  w.vectors = g.N * w.W;
  w.edges = g.N * w.E;
  w.plane_stride = g.C * g.S;
  // Loads of one channel; the fewest threads per channel (a warp at least)
  // that leave each at most one batch of kUnroll, a whole block beyond.
  const int64_t loads = w.vectors + w.edges;
  w.group = 32;
  while (w.group < kThreads && int64_t(w.group) * kUnroll < loads)
    w.group *= 2;
  p.grid_c = std::min<int64_t>(ceil_div(g.C, kThreads / w.group), 65535);
  // Each thread should see at least one batch of kUnroll loads.
  const int64_t most =
      std::max<int64_t>(1, loads / (int64_t(kThreads) * kUnroll));
  const int64_t splits = balanced_splits(
      p.grid_c, wave, ceil_div(g.N * g.S, kMaxBlockCount), most);
  w.per_block = ceil_div(w.vectors, splits);
  w.per_block_edges = ceil_div(w.edges, splits);
  p.splits = std::max<int64_t>(
      {int64_t(1), w.per_block > 0 ? ceil_div(w.vectors, w.per_block) : 0,
       w.per_block_edges > 0 ? ceil_div(w.edges, w.per_block_edges) : 0});
  w.vector_step = plane_step(w.group, w.W, w.plane_stride);
  w.edge_step = plane_step(w.group, w.E, w.plane_stride);
  return p;
}

// ROWS grid: blockDim (bx channel vectors, by rows), gridDim (row blocks,
// channel tiles). The block shape comes first (shape_rows), the grid once
// the kernel's wave is known (grid_rows).
struct RowsPlan {
  int bx, by;
  int64_t tiles, rows_per_block, row_blocks;
  size_t smem;
  int threads() const { return bx * by; }
  dim3 grid() const { return dim3(unsigned(row_blocks), unsigned(tiles)); }
  dim3 block() const { return dim3(unsigned(bx), unsigned(by)); }
};

// Channel vectors across a ROWS reduction block at most: one warp's (512
// contiguous bytes a row), so that wide rows split into channel tiles, which
// carry the parallelism, rather than into row splits, whose partials (one
// per split and channel) would approach the input's size at large C and
// small N*S (32x2048x7x7 float16: 196 splits of 256 vectors, 4.8 MB of
// partials for 6.4 MB of input; with this, 8 tiles of 24 splits, 0.6 MB).
constexpr int64_t kRowsReduceLanes = 32;

RowsPlan shape_rows(const Geometry& g, int V, bool reduction) {
  RowsPlan p;
  const int64_t Cv = g.C / V;
  const int64_t most = reduction ? kRowsReduceLanes : kThreads;
  if (Cv <= most) {
    p.bx = int(Cv);
    p.tiles = 1;
  } else {
    const int64_t tiles = ceil_div(Cv, most);
    p.bx = int(std::min<int64_t>(most, ceil_div(ceil_div(Cv, tiles), 32) * 32));
    p.tiles = ceil_div(Cv, p.bx);
  }
  p.by = std::max(1, kThreads / p.bx);
  p.tiles = std::min<int64_t>(p.tiles, 65535);  // kernels loop past this
  p.rows_per_block = p.row_blocks = 1;
  return p;
}

void grid_rows(RowsPlan& p, const Geometry& g, int64_t wave, bool reduction) {
  const int64_t M = g.rows();
  p.smem = 0;
  if (reduction) {
    const int64_t most =
        std::max<int64_t>(1, M / (int64_t(p.by) * kUnroll * 2));
    const int64_t splits =
        balanced_splits(p.tiles, wave, ceil_div(M, kMaxBlockCount), most);
    p.rows_per_block = ceil_div(M, splits);
    p.row_blocks = ceil_div(M, p.rows_per_block);
  } else {
    p.rows_per_block = p.by;
    p.row_blocks =
        std::max<int64_t>(1, std::min(ceil_div(M, p.by), wave / p.tiles));
  }
}

// The ROWS plan of `kernel` with `state` bytes of shared memory per thread:
// a reduction's grid (splits of the rows), or with 0 an elementwise pass's.
template <typename Kernel>
RowsPlan plan_rows(const Geometry& g, int V, Kernel* kernel, size_t state) {
  RowsPlan p = shape_rows(g, V, state > 0);
  const size_t smem = size_t(p.threads()) * state;
  grid_rows(p, g, wave_blocks(as_key(kernel), p.threads(), smem), state > 0);
  p.smem = smem;
  return p;
}

// Flat PLANAR elementwise grid and its stride in (plane position, channel).
struct FlatPlan {
  int64_t blocks;
  cuda::FlatStep step;
};

template <typename Kernel>
FlatPlan plan_flat(const Geometry& g, int V, Kernel* kernel) {
  const int64_t wave = wave_blocks(as_key(kernel), kThreads, 0);
  FlatPlan p;
  p.blocks = std::max<int64_t>(
      1, std::min(ceil_div(ceil_div(g.numel(), V), kThreads), wave));
  const int64_t step = p.blocks * kThreads * V;
  const int64_t dn = step / g.S;
  p.step.step = step;
  p.step.ds = step - dn * g.S;
  p.step.dc = dn % g.C;
  return p;
}

// The merge kernels' grid and block (cuda::kMergeLanes channels a block).
unsigned merge_blocks(int64_t C) {
  return unsigned(std::min<int64_t>(ceil_div(C, cuda::kMergeLanes), 65535));
}

dim3 merge_block() { return dim3(cuda::kMergeLanes, cuda::kMergeRows); }

// A per-channel tensor as a contiguous acc_t vector, or null when absent.
Tensor optional_vector(const c10::optional<Tensor>& t, const char* name,
                       const Tensor& input, at::ScalarType acc) {
  if (t.has_value() && t->defined())
    return channel_vector(*t, name, input, acc);
  return Tensor();
}

// A per-channel parameter checked and made contiguous in its own dtype
// (the channel table converts it), or undefined when absent.
Tensor param_vector(const c10::optional<Tensor>& t, const char* name,
                    const Tensor& input) {
  if (!t.has_value() || !t->defined()) return Tensor();
  check_channel(*t, name, input);
  return t->contiguous();
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// The channel table of an elementwise pass (cuda::channel_table_kernel),
// C rows of table_width<kData>() acc_t: weight and bias read in their own
// dtype when they share one (no conversion pass for float16 parameters),
// the sums as acc_t or float64 (a group's sums).
template <typename acc_t, bool kData>
Tensor channel_table(const Tensor& input, const Tensor& mean,
                     const Tensor& invstd,
                     const c10::optional<Tensor>& weight_,
                     const c10::optional<Tensor>& bias_, const Tensor& sums_,
                     const Tensor& scale) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t C = input.size(1);
  Tensor weight = param_vector(weight_, "weight", input);
  Tensor bias = param_vector(bias_, "bias", input);
  if (weight.defined() && bias.defined() &&
      weight.scalar_type() != bias.scalar_type()) {
    weight = weight.to(acc);
    bias = bias.to(acc);
  }
  const at::ScalarType param_type =
      weight.defined() ? weight.scalar_type()
                       : (bias.defined() ? bias.scalar_type() : acc);
  Tensor sums;
  if constexpr (kData)
    sums = sums_.scalar_type() == at::kDouble ? sums_.contiguous()
                                              : sums_.to(acc).contiguous();
  Tensor table = at::empty({C * cuda::table_width<kData>()},
                           input.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks =
      unsigned(std::max<int64_t>(1, std::min<int64_t>(ceil_div(C, kThreads),
                                                      1024)));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, param_type, "sync_bn_channel_table", [&] {
        using param_t = scalar_t;
        const auto launch = [&](auto sums_ptr) {
          using sums_t = std::remove_const_t<
              std::remove_pointer_t<decltype(sums_ptr)>>;
          cuda::channel_table_kernel<acc_t, param_t, sums_t, kData>
              <<<blocks, kThreads, 0, stream>>>(
                  C, mean.const_data_ptr<double>(),
                  invstd.const_data_ptr<double>(), ptr_or_null<param_t>(weight),
                  ptr_or_null<param_t>(bias), sums_ptr,
                  kData ? scale.const_data_ptr<double>() : nullptr,
                  table.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if constexpr (!kData) {
          launch(static_cast<const acc_t*>(nullptr));
        } else if (std::is_same_v<acc_t, double> ||
                   sums.scalar_type() != at::kDouble) {
          launch(sums.const_data_ptr<acc_t>());
        } else {
          launch(sums.const_data_ptr<double>());
        }
      });
  return table;
}

void check_cuda(const Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": expected a CUDA tensor, got one on ",
              t.device());
}


// ---------------------------------------------------------------------------

template <typename scalar_t>
void launch_stats(const Tensor& input, const Geometry& g, double weight,
                  Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  double* packed = stats.data_ptr<double>();
  const double count = double(g.rows());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_opts =
      input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  Tensor partial;
  int64_t splits = 1;
  // Partials of split grids: [3][splits][C] (n, mean, M2) and shift[C].
  const auto partials = [&](int64_t n) -> acc_t* {
    splits = n;
    if (n == 1) return nullptr;
    partial = at::empty({(3 * n + 1) * g.C}, acc_opts);
    return partial.data_ptr<acc_t>();
  };
  dispatch_vec<scalar_t, true>(
      g, {x},
      [&](auto vc) {
        constexpr int V = decltype(vc)::value;
        const auto p =
            plan_planar(g, V, &cuda::stats_planar_kernel<scalar_t, acc_t, V>);
        acc_t* part = partials(p.splits);
        cuda::stats_planar_kernel<scalar_t, acc_t, V>
            <<<p.grid(), kThreads, 0, stream>>>(x, g.C, g.S, p.walk, part,
                                                packed, weight, count);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      [&](auto vc) {
        constexpr int V = decltype(vc)::value;
        const auto p =
            plan_rows(g, V, &cuda::stats_rows_kernel<scalar_t, acc_t, V>,
                      (2 * V + 1) * sizeof(acc_t));
        acc_t* part = partials(p.row_blocks);
        cuda::stats_rows_kernel<scalar_t, acc_t, V>
            <<<p.grid(), p.block(), p.smem, stream>>>(
                x, g.rows(), g.C, p.rows_per_block, part, packed, weight,
                count);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  if (splits > 1) {
    cuda::stats_merge_kernel<acc_t>
        <<<merge_blocks(g.C), merge_block(), 0, stream>>>(
            partial.const_data_ptr<acc_t>(), splits, g.C, packed, weight,
            count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

Tensor forward_stats_cuda(const Tensor& input_, bool weight_by_count) {
  check_cuda(input_, "sync_bn_forward_stats");
  const c10::cuda::CUDAGuard guard(input_.device());
  Tensor input;
  const Geometry g = kernel_input(input_, &input);
  const auto opts = input.options().dtype(at::kDouble);
  const int64_t count = g.rows();
  const int64_t size = kStatsFields * g.C + kStatsHeader;
  if (count == 0 || g.C == 0) return at::zeros({size}, opts);
  Tensor stats = at::empty({size}, opts);
  const double weight = weight_by_count ? double(count) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "sync_bn_stats_cuda",
      [&] { launch_stats<scalar_t>(input, g, weight, stats); });
  return stats;
}

// ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> forward_finalize_cuda(
    const Tensor& stats_, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var,
    const c10::optional<Tensor>& num_batches_tracked,
    c10::optional<double> momentum, double eps, int64_t count,
    bool weight_by_count, at::ScalarType dtype) {
  int64_t rows = 1;
  const int64_t C = stats_channels(stats_, &rows);
  check_cuda(stats_, "sync_bn_forward_finalize");
  const c10::cuda::CUDAGuard guard(stats_.device());
  const Tensor stats = stats_.contiguous();
  // Kernels write float32 or float64; other requested dtypes are cast after.
  const at::ScalarType out_type =
      dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = stats.options().dtype(out_type);
  Tensor mean = at::empty({C}, opts), invstd = at::empty({C}, opts),
         scale = at::empty({1}, opts);

  const bool has_running =
      running_stats_given(running_mean, running_var, C, stats.device());
  Tensor rm, rv;  // what the kernel updates in place
  bool copy_back = false;
  if (has_running) {
    rm = *running_mean;
    rv = *running_var;
    if (rm.scalar_type() != rv.scalar_type() || !rm.is_contiguous() ||
        !rv.is_contiguous() || !at::isFloatingType(rm.scalar_type())) {
      rm = running_mean->to(at::kDouble).contiguous();
      rv = running_var->to(at::kDouble).contiguous();
      copy_back = true;
    }
  }
  Tensor tracked;
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    TORCH_CHECK(num_batches_tracked->numel() == 1 &&
                    num_batches_tracked->device() == stats.device(),
                "sync_bn_forward_finalize: num_batches_tracked must be one "
                "element on ",
                stats.device());
    tracked = num_batches_tracked->to(at::kLong).contiguous();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(C, kThreads), 1024));
  const at::ScalarType run_type = has_running ? rm.scalar_type() : at::kDouble;
  AT_DISPATCH_FLOATING_TYPES(out_type, "sync_bn_finalize_cuda", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, run_type, "sync_bn_finalize_cuda", [&] {
          using run_t = scalar_t;
          cuda::finalize_kernel<out_t, run_t>
              <<<unsigned(blocks), kThreads, 0, stream>>>(
                  stats.const_data_ptr<double>(), rows, C, eps, count,
                  weight_by_count, has_running ? rm.data_ptr<run_t>() : nullptr,
                  has_running ? rv.data_ptr<run_t>() : nullptr,
                  tracked.defined() ? tracked.const_data_ptr<int64_t>()
                                    : nullptr,
                  momentum.has_value(), momentum.value_or(0.0),
                  mean.data_ptr<out_t>(), invstd.data_ptr<out_t>(),
                  scale.data_ptr<out_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  if (copy_back) {
    running_mean->copy_(rm);
    running_var->copy_(rv);
  }
  if (out_type != dtype)
    return {mean.to(dtype), invstd.to(dtype), scale.to(dtype)};
  return {mean, invstd, scale};
}

// ---------------------------------------------------------------------------

Tensor forward_output_cuda(const Tensor& input_, const Tensor& mean_,
                           const Tensor& invstd_,
                           const c10::optional<Tensor>& weight_,
                           const c10::optional<Tensor>& bias_, bool relu) {
  check_cuda(input_, "sync_bn_forward_output");
  const c10::cuda::CUDAGuard guard(input_.device());
  Tensor input;
  const Geometry g = kernel_input(input_, &input);
  const Tensor mean = channel_vector(mean_, "mean", input, at::kDouble);
  const Tensor invstd = channel_vector(invstd_, "invstd", input, at::kDouble);
  Tensor output = empty_same_layout(input);
  if (g.numel() == 0) return output;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "sync_bn_output_cuda",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Tensor table = channel_table<acc_t, false>(
            input, mean, invstd, weight_, bias_, Tensor(), Tensor());
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        scalar_t* y = output.data_ptr<scalar_t>();
        const acc_t* pt = table.const_data_ptr<acc_t>();
        dispatch_vec<scalar_t, false>(
            g, {x, y},
            [&](auto vc) {
              constexpr int V = decltype(vc)::value;
              const auto p = plan_flat(
                  g, V, &cuda::output_planar_kernel<scalar_t, acc_t, V>);
              cuda::output_planar_kernel<scalar_t, acc_t, V>
                  <<<unsigned(p.blocks), kThreads, 0, stream>>>(
                      x, y, g.numel(), g.C, g.S, p.step, pt, relu);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            },
            [&](auto vc) {
              constexpr int V = decltype(vc)::value;
              const auto p = plan_rows(
                  g, V, &cuda::output_rows_kernel<scalar_t, acc_t, V>, 0);
              cuda::output_rows_kernel<scalar_t, acc_t, V>
                  <<<p.grid(), p.block(), 0, stream>>>(
                      x, y, g.rows(), g.C, pt, relu);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      });
  return output;
}

// ---------------------------------------------------------------------------

Tensor backward_reduce_cuda(const Tensor& grad_output_, const Tensor& input_,
                            const Tensor& mean_, const Tensor& invstd_,
                            const c10::optional<Tensor>& weight_,
                            const c10::optional<Tensor>& bias_, bool relu) {
  check_cuda(input_, "sync_bn_backward_reduce");
  const c10::cuda::CUDAGuard guard(input_.device());
  Tensor input;
  const Geometry g = kernel_input(input_, &input);
  const Tensor grad_output =
      grad_output_like(grad_output_, input, g.layout,
                       "sync_bn_backward_reduce");
  const auto acc = acc_type_of(input.scalar_type());
  const Tensor mean = channel_vector(mean_, "mean", input, at::kDouble);
  const Tensor invstd = channel_vector(invstd_, "invstd", input, at::kDouble);
  const Tensor weight = optional_vector(weight_, "weight", input, acc);
  const Tensor bias = optional_vector(bias_, "bias", input, acc);
  const auto acc_opts = input.options().dtype(acc);
  if (g.numel() == 0) return at::zeros({2 * g.C}, acc_opts);
  Tensor sums = at::empty({2 * g.C}, acc_opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "sync_bn_reduce_cuda",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
        const double* pm = mean.const_data_ptr<double>();
        const double* pi = invstd.const_data_ptr<double>();
        const acc_t* pw = ptr_or_null<acc_t>(weight);
        const acc_t* pb = ptr_or_null<acc_t>(bias);
        acc_t* out = sums.data_ptr<acc_t>();
        Tensor partial;
        int64_t splits = 1;
        // Partials of split grids: [2][splits][C] (sum(g), sum(g * xmu)).
        const auto partials = [&](int64_t n) -> acc_t* {
          splits = n;
          if (n == 1) return nullptr;
          partial = at::empty({2 * n * g.C}, acc_opts);
          return partial.data_ptr<acc_t>();
        };
        dispatch_vec<scalar_t, true>(
            g, {x, dy},
            [&](auto vc) {
              constexpr int V = decltype(vc)::value;
              const auto p = plan_planar(
                  g, V, &cuda::reduce_planar_kernel<scalar_t, acc_t, V>);
              acc_t* part = partials(p.splits);
              cuda::reduce_planar_kernel<scalar_t, acc_t, V>
                  <<<p.grid(), kThreads, 0, stream>>>(
                      dy, x, g.C, g.S, p.walk, pm, pi, pw, pb, relu, part,
                      out);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            },
            [&](auto vc) {
              constexpr int V = decltype(vc)::value;
              const auto p =
                  plan_rows(g, V, &cuda::reduce_rows_kernel<scalar_t, acc_t, V>,
                            2 * V * sizeof(acc_t));
              acc_t* part = partials(p.row_blocks);
              cuda::reduce_rows_kernel<scalar_t, acc_t, V>
                  <<<p.grid(), p.block(), p.smem, stream>>>(
                      dy, x, g.rows(), g.C, p.rows_per_block, pm, pi, pw, pb,
                      relu, part, out);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
        if (splits > 1) {
          cuda::reduce_merge_kernel<acc_t>
              <<<merge_blocks(g.C), merge_block(), 0, stream>>>(
                  partial.const_data_ptr<acc_t>(), splits, g.C, pi, out);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return sums;
}

// ---------------------------------------------------------------------------

Tensor backward_data_cuda(const Tensor& grad_output_, const Tensor& input_,
                          const Tensor& mean_, const Tensor& invstd_,
                          const c10::optional<Tensor>& weight_,
                          const c10::optional<Tensor>& bias_,
                          const Tensor& sums_, const Tensor& scale_,
                          bool relu) {
  check_cuda(input_, "sync_bn_backward_data");
  const c10::cuda::CUDAGuard guard(input_.device());
  Tensor input;
  const Geometry g = kernel_input(input_, &input);
  const Tensor grad_output =
      grad_output_like(grad_output_, input, g.layout, "sync_bn_backward_data");
  TORCH_CHECK(sums_.dim() == 1 && sums_.size(0) == 2 * g.C,
              "sync_bn_backward_data: sums must have shape (2C,) = (", 2 * g.C,
              ",), got ", sums_.sizes());
  TORCH_CHECK(scale_.numel() == 1,
              "sync_bn_backward_data: scale must have one element, got ",
              scale_.numel());
  TORCH_CHECK(
      sums_.device() == input.device() && scale_.device() == input.device(),
      "sync_bn_backward_data: sums and scale must be on ", input.device());
  const Tensor mean = channel_vector(mean_, "mean", input, at::kDouble);
  const Tensor invstd = channel_vector(invstd_, "invstd", input, at::kDouble);
  const Tensor scale = scale_.to(at::kDouble).contiguous();
  Tensor grad_input = empty_same_layout(input);
  if (g.numel() == 0) return grad_input;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "sync_bn_data_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Tensor table = channel_table<acc_t, true>(
            input, mean, invstd, weight_, bias_, sums_, scale);
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
        scalar_t* dx = grad_input.data_ptr<scalar_t>();
        const acc_t* pt = table.const_data_ptr<acc_t>();
        dispatch_vec<scalar_t, false>(
            g, {x, dy, dx},
            [&](auto vc) {
              constexpr int V = decltype(vc)::value;
              const auto p = plan_flat(
                  g, V, &cuda::data_planar_kernel<scalar_t, acc_t, V>);
              cuda::data_planar_kernel<scalar_t, acc_t, V>
                  <<<unsigned(p.blocks), kThreads, 0, stream>>>(
                      dy, x, dx, g.numel(), g.C, g.S, p.step, pt, relu);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            },
            [&](auto vc) {
              constexpr int V = decltype(vc)::value;
              const auto p = plan_rows(
                  g, V, &cuda::data_rows_kernel<scalar_t, acc_t, V>, 0);
              cuda::data_rows_kernel<scalar_t, acc_t, V>
                  <<<p.grid(), p.block(), 0, stream>>>(
                      dy, x, dx, g.rows(), g.C, pt, relu);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmsync, CUDA, m) {
  m.impl("sync_bn_forward_stats", &forward_stats_cuda);
  m.impl("sync_bn_forward_finalize", &forward_finalize_cuda);
  m.impl("sync_bn_forward_output", &forward_output_cuda);
  m.impl("sync_bn_backward_reduce", &backward_reduce_cuda);
  m.impl("sync_bn_backward_data", &backward_data_cuda);
}

}  // namespace mmsync
