// CUDA kernel templates of the sync_bn ops. PLANAR inputs (N x C x S): (split,
// channel tile) reduction blocks reading each plane's aligned interior as
// vectors, flat vectorized passes; ROWS inputs (N*S rows of C channels:
// channels_last, 2D): 2-D blocks, each thread owning V channels.
#pragma once

#include "sync_bn_cuda_utils.cuh"

namespace mmsync {
namespace cuda {

// ---------------------------------------------------------------------------
// Local statistics. Each PLANAR block reduces its share of the vectors and
// of the edge elements (see PlanarWalk) of `kThreads / group` channels at
// once, `group` threads on each: small planes and batches keep the block
// busy. Each ROWS block reduces `rows_per_block` rows. Both reduce to
// (n, mean, M2) of x - shift, shift being the channel's first element: the
// float32 moments then keep their precision relative to the spread, not to
// |mean| (mean >> std). The partials ([3][splits][C]: n, mean, M2, then
// shift[C]) are merged by stats_merge_kernel; a grid of one split writes the
// packed row (mean, M2) directly.

// Edge elements (scalars) a PLANAR reduction thread loads before using any.
constexpr int kEdgeUnroll = 2;

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads, kMinReduceBlocks)
    stats_planar_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t S,
                        PlanarWalk w, acc_t* __restrict__ partial,
                        double* __restrict__ packed, double weight,
                        double count) {
  const int64_t splits = gridDim.x;
  const PlanarShare sh(w, C);
  for (int64_t tile = blockIdx.y; tile < sh.tiles(); tile += gridDim.y) {
    const int64_t c = sh.channel(tile);
    const bool active = c < C;
    const acc_t shift = active ? acc_t(x[c * S]) : acc_t(0);
    acc_t n = acc_t(0), mean = acc_t(0), m2 = acc_t(0);
    if (active && sh.lo() + sh.member() < sh.hi()) {
      PlaneCursor cur(sh.lo() + sh.member(), w.W, c, C, S);
      while (cur.j < sh.hi()) {
        Pack<scalar_t, V> p[kUnroll];
        int valid = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (cur.j < sh.hi()) {
            p[u] = load_pack<V>(x + cur.vector_at<V>());
            ++valid;
          }
          cur.advance(w.group, w.vector_step, w.plane_stride);
        }
        welford_add<kUnroll, V>(n, mean, m2, p, valid, shift);
      }
    }
    // V == 1: no edges (W == S).
    if (V > 1 && active && sh.lo_e() + sh.member() < sh.hi_e()) {
      PlaneCursor cur(sh.lo_e() + sh.member(), w.E, c, C, S);
      while (cur.j < sh.hi_e()) {
        Pack<scalar_t, 1> p[kEdgeUnroll];
        int valid = 0;
#pragma unroll
        for (int u = 0; u < kEdgeUnroll; ++u) {
          if (cur.j < sh.hi_e()) {
            p[u].v[0] = x[cur.edge_at<V>(w.W)];
            ++valid;
          }
          cur.advance(w.group, w.edge_step, w.plane_stride);
        }
        welford_add<kEdgeUnroll, 1>(n, mean, m2, p, valid, shift);
      }
    }
    group_welford(n, mean, m2, w.group);
    if (active && sh.member() == 0) {
      if (splits == 1) {
        write_packed(packed, C, c, double(shift), double(mean), double(m2));
      } else {
        partial[blockIdx.x * C + c] = n;
        partial[(splits + blockIdx.x) * C + c] = mean;
        partial[(2 * splits + blockIdx.x) * C + c] = m2;
        if (blockIdx.x == 0) partial[3 * splits * C + c] = shift;
      }
    }
  }
  if (splits == 1 && blockIdx.y == 0 && threadIdx.x == 0) {
    packed[0] = weight;
    packed[1] = count;
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads, kMinReduceBlocks)
    stats_rows_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t C,
                      int64_t rows_per_block, acc_t* __restrict__ partial,
                      double* __restrict__ packed, double weight,
                      double count) {
  // Rows in flight: with 8-wide vectors, 2 of them leave register headroom
  // under the kMinReduceBlocks bound (4 used 122 of 128).
  constexpr int U = V >= 8 ? 2 : kUnroll;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sh = reinterpret_cast<acc_t*>(smem_raw);
  constexpr int kState = 2 * V + 1;  // n, mean[V], m2[V]
  const int bx = blockDim.x, by = blockDim.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t splits = gridDim.x;
  const int64_t Cv = C / V;
  const int64_t lo = int64_t(blockIdx.x) * rows_per_block;
  const int64_t hi = lo + rows_per_block < M ? lo + rows_per_block : M;
  acc_t* mine = sh + (ty * bx + tx) * kState;
  for (int64_t cv0 = int64_t(blockIdx.y) * bx; cv0 < Cv;
       cv0 += int64_t(gridDim.y) * bx) {
    const int64_t cv = cv0 + tx;
    const bool active = cv < Cv;
    acc_t n = acc_t(0), mean[V], m2[V], shift[V];
#pragma unroll
    for (int j = 0; j < V; ++j) mean[j] = m2[j] = shift[j] = acc_t(0);
    if (active) {
      const scalar_t* base = x + cv * V;
#pragma unroll
      for (int j = 0; j < V; ++j) shift[j] = acc_t(base[j]);
      for (int64_t r = lo + ty; r < hi; r += int64_t(by) * U) {
        Pack<scalar_t, V> p[U];
        int valid = 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t rr = r + int64_t(u) * by;
          if (rr < hi) {
            p[u] = load_pack<V>(base + rr * C);
            ++valid;
          }
        }
        welford_add_rows<U, V>(n, mean, m2, p, valid, shift);
      }
    }
    // Tree over the block's rows of threads (any blockDim.y): the upper
    // half merges into the lower half until row 0 holds the block's moments.
    mine[0] = n;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      mine[1 + j] = mean[j];
      mine[1 + V + j] = m2[j];
    }
    __syncthreads();
    for (int rows = by; rows > 1;) {
      const int half = (rows + 1) / 2;
      if (ty < rows - half) {
        const acc_t* other = sh + ((ty + half) * bx + tx) * kState;
        const acc_t nb = other[0];
        if (nb > acc_t(0)) {
          const acc_t n_ab = n + nb;
          const acc_t frac = nb / n_ab;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const acc_t delta = other[1 + j] - mean[j];
            mean[j] += delta * frac;
            m2[j] += other[1 + V + j] + delta * delta * n * frac;
            mine[1 + j] = mean[j];
            mine[1 + V + j] = m2[j];
          }
          n = n_ab;
          mine[0] = n;
        }
      }
      __syncthreads();
      rows = half;
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t c = cv * V + j;
        if (splits == 1) {
          write_packed(packed, C, c, double(shift[j]), double(mean[j]),
                       double(m2[j]));
        } else {
          partial[blockIdx.x * C + c] = n;
          partial[(splits + blockIdx.x) * C + c] = mean[j];
          partial[(2 * splits + blockIdx.x) * C + c] = m2[j];
          if (blockIdx.x == 0) partial[3 * splits * C + c] = shift[j];
        }
      }
    }
    __syncthreads();  // `sh` is reused by the next channel tile
  }
  if (splits == 1 && blockIdx.y == 0 && tx == 0 && ty == 0) {
    packed[0] = weight;
    packed[1] = count;
  }
}

// The merge kernels' blocks: kMergeLanes channels (adjacent lanes read
// adjacent channels of a split's partials: coalesced) by kMergeRows lanes
// over the splits, each of which merges the splits j = row (mod kMergeRows)
// in float64 in order; a fixed tree over the rows then merges those
// (deterministic, no atomics).
constexpr int kMergeLanes = 32;
constexpr int kMergeRows = kThreads / kMergeLanes;

// Merges the `splits` partial moments of each channel, adds the shift back
// and writes the packed buffer. Block (kMergeLanes, kMergeRows).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    stats_merge_kernel(const acc_t* __restrict__ partial, int64_t splits,
                       int64_t C, double* __restrict__ packed, double weight,
                       double count) {
  __shared__ double sh[3][kMergeRows][kMergeLanes];
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t c0 = int64_t(blockIdx.x) * kMergeLanes; c0 < C;
       c0 += int64_t(gridDim.x) * kMergeLanes) {
    const int64_t c = c0 + tx;
    double n = 0.0, mean = 0.0, m2 = 0.0;
    if (c < C)
      for (int64_t j = ty; j < splits; j += kMergeRows)
        chan_merge(n, mean, m2, double(partial[j * C + c]),
                   double(partial[(splits + j) * C + c]),
                   double(partial[(2 * splits + j) * C + c]));
    sh[0][ty][tx] = n;
    sh[1][ty][tx] = mean;
    sh[2][ty][tx] = m2;
    __syncthreads();
    for (int half = kMergeRows / 2; half > 0; half /= 2) {
      if (ty < half) {
        chan_merge(n, mean, m2, sh[0][ty + half][tx], sh[1][ty + half][tx],
                   sh[2][ty + half][tx]);
        sh[0][ty][tx] = n;
        sh[1][ty][tx] = mean;
        sh[2][ty][tx] = m2;
      }
      __syncthreads();
    }
    if (ty == 0 && c < C)
      write_packed(packed, C, c, double(partial[3 * splits * C + c]), mean,
                   m2);
  }
  if (blockIdx.x == 0 && tx == 0 && ty == 0) {
    packed[0] = weight;
    packed[1] = count;
  }
}

// ---------------------------------------------------------------------------
// Finalize: the gathered rows of the group's ranks -> mean, invstd (out_t),
// the scale of the backward formula, and the running-stat update, all on the
// device: no host read, so the step stays asynchronous and graph-capturable.
// A group holding one value per channel fails a device-side assertion.

template <typename out_t, typename run_t>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const double* __restrict__ stats, int64_t rows, int64_t C,
                    double eps, int64_t count, bool weight_by_count,
                    run_t* __restrict__ running_mean,
                    run_t* __restrict__ running_var,
                    const int64_t* __restrict__ tracked, bool has_momentum,
                    double momentum, out_t* __restrict__ mean,
                    out_t* __restrict__ invstd, out_t* __restrict__ scale) {
  double weight, total;
  group_totals(stats, rows, C, weight, total);
  MMSYNC_DEVICE_ASSERT(total != 1.0, MMSYNC_ONE_VALUE_ERROR);
  const bool update = running_mean != nullptr && total > 0.0;
  double f = 0.0;
  if (update)
    f = update_factor(
        has_momentum, momentum, tracked != nullptr,
        tracked != nullptr ? static_cast<long long>(*tracked) : 0LL);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += stride) {
    double m, v;
    merge_rows(stats, rows, C, c, m, v);
    mean[c] = out_t(m);
    invstd[c] = out_t(1.0 / sqrt(v + eps));
    if (update) {
      running_mean[c] = run_t(double(running_mean[c]) * (1.0 - f) + f * m);
      running_var[c] = run_t(double(running_var[c]) * (1.0 - f) +
                             f * unbiased_var(v, total));
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0)
    scale[0] = out_t(grad_scale(weight, total, count, weight_by_count));
}

// ---------------------------------------------------------------------------
// The passes after the statistics read mean and invstd in float64 and use,
// per channel and in acc_t (as the CPU kernels do): the mean split into
// hi + lo, so that x - mean = (x - hi) - lo stays exact when mean >> std,
// and k = invstd * weight rounded once from float64. weight / bias (acc_t)
// may be null: ones / zeros.

template <typename acc_t>
struct ChannelConsts {
  acc_t hi, lo, k, b;
  __device__ __forceinline__ void load(int64_t c, const double* mean,
                                       const double* invstd,
                                       const acc_t* weight, const acc_t* bias) {
    const double m = mean[c];
    hi = acc_t(m);
    lo = acc_t(m - double(hi));
    k = acc_t(weight != nullptr ? invstd[c] * double(weight[c]) : invstd[c]);
    b = bias != nullptr ? bias[c] : acc_t(0);
  }
  // Row c of a channel table (channel_table_kernel): hi, lo, k, b.
  __device__ __forceinline__ void load(const acc_t* row) {
    const Pack<acc_t, 4> r = load_pack<4>(row);
    hi = r.v[0];
    lo = r.v[1];
    k = r.v[2];
    b = r.v[3];
  }
  __device__ __forceinline__ acc_t centered(acc_t x) const {
    return (x - hi) - lo;
  }
  // dy where the forward output (x - mean) * k + b was positive (or no ReLU).
  __device__ __forceinline__ acc_t grad(acc_t dy, acc_t xm, bool relu) const {
    return (relu && !(xm * k + b > acc_t(0))) ? acc_t(0) : dy;
  }
};

// Output: y = (x - mean) * k + b, optionally max(y, 0).
template <typename acc_t>
struct AffineConsts : ChannelConsts<acc_t> {
  template <typename scalar_t>
  __device__ __forceinline__ scalar_t apply(scalar_t x, bool relu) const {
    const acc_t v = this->centered(acc_t(x)) * this->k + this->b;
    return scalar_t(relu ? (v > acc_t(0) ? v : acc_t(0)) : v);
  }
};

// The elementwise passes read their per-channel constants from a table of
// C rows built once per pass by this kernel, in float64 and rounded once,
// from mean / invstd (float64), weight / bias (param_t, converted here, or
// null) and, for the grad input (kData), the reduced sums (sums_t) and the
// scale: [hi, lo, k, b] a row, then [shift, k2, 0, 0] with kData. A thread
// of a flat pass, whose successive vectors lie in different channels, then
// loads one or two 16-byte rows per vector (two or four for float64)
// instead of 5 to 7 dependent loads and a dozen float64 operations.
template <bool kData>
constexpr int table_width() {
  return kData ? 8 : 4;
}

template <typename acc_t, typename param_t, typename sums_t, bool kData>
__global__ void __launch_bounds__(kThreads)
    channel_table_kernel(int64_t C, const double* __restrict__ mean,
                         const double* __restrict__ invstd,
                         const param_t* __restrict__ weight,
                         const param_t* __restrict__ bias,
                         const sums_t* __restrict__ sums,
                         const double* __restrict__ scale,
                         acc_t* __restrict__ table) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += stride) {
    const double m = mean[c];
    // Weight and bias as acc_t first, as the CPU kernels take them.
    const double kd = weight != nullptr
                          ? invstd[c] * double(acc_t(weight[c]))
                          : invstd[c];
    acc_t* row = table + c * table_width<kData>();
    Pack<acc_t, 4> r;
    r.v[0] = acc_t(m);
    r.v[1] = acc_t(m - double(r.v[0]));
    r.v[2] = acc_t(kd);
    r.v[3] = bias != nullptr ? acc_t(bias[c]) : acc_t(0);
    store_pack<4>(row, r);
    if (kData) {
      const double a = scale[0];
      r.v[0] = acc_t(a * double(sums[c]));
      r.v[1] = acc_t(-kd * a * invstd[c] * double(sums[C + c]));
      r.v[2] = r.v[3] = acc_t(0);
      store_pack<4>(row + 4, r);
    }
  }
}

// The two elementwise passes (output, grad input) share the walks below and
// differ only in their Op: load(u, offset) fetches the u-th vector (of U in
// flight), channel(c) / channels(c0) load per-channel constants, apply(u, j,
// slot) transforms element j of vector u in place with the constants of
// `slot`, store(u, offset) writes it, scalar(e) handles one element.
// Every load of a batch is issued before any use: U 16-byte vectors per
// tensor in flight per thread, without more resident blocks.

// PLANAR, flat: thread t visits vectors t, t + grid, ... of the whole tensor
// and tracks their channel incrementally; a vector that spans two planes
// (S % V != 0) is handled element by element.
template <int V, int U, typename Op>
__device__ __forceinline__ void flat_walk(Op& op, int64_t numel, int64_t C,
                                          int64_t S, const FlatStep& st) {
  const int64_t tid = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t body = numel - numel % V;
  int64_t i = tid * V, s = 0, c = 0;
  if (i < body) {
    const int64_t p = i / S;
    s = i - p * S;
    c = p % C;
  }
  int64_t loaded = -1;
  while (i < body) {
    int64_t iu[U], su[U], cu[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      iu[u] = i;
      su[u] = s;
      cu[u] = c;
      if (i < body) op.load(u, i);
      i += st.step;
      s += st.ds;
      c += st.dc;
      if (s >= S) {
        s -= S;
        ++c;
      }
      if (c >= C) c -= C;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (iu[u] >= body) break;
      if (su[u] + V <= S) {
        if (cu[u] != loaded) {
          op.channel(cu[u]);
          loaded = cu[u];
        }
#pragma unroll
        for (int j = 0; j < V; ++j) op.apply(u, j, 0);
      } else {
        int64_t sj = su[u], cj = cu[u];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (sj == S) {
            sj = 0;
            cj = cj + 1 == C ? 0 : cj + 1;
          }
          if (cj != loaded) {
            op.channel(cj);
            loaded = cj;
          }
          op.apply(u, j, 0);
          ++sj;
        }
      }
      op.store(u, iu[u]);
    }
  }
  // The last numel % V (< V) elements, one per thread of the first block.
  if (tid < numel - body) {
    const int64_t e = body + tid;
    op.channel((e / S) % C);
    op.scalar(e);
  }
}

// ROWS: thread (tx, ty) owns channels [V*cv, V*cv + V), keeps their
// constants in registers and walks rows ty, ty + by, ..., U at a time.
template <int V, int U, typename Op>
__device__ __forceinline__ void rows_walk(Op& op, int64_t M, int64_t C) {
  const int64_t Cv = C / V;
  const int64_t row_step = int64_t(gridDim.x) * blockDim.y;
  for (int64_t cv = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; cv < Cv;
       cv += int64_t(gridDim.y) * blockDim.x) {
    op.channels(cv * V);
    for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < M;
         r += row_step * U) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (r + u * row_step < M) op.load(u, (r + u * row_step) * C + cv * V);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r + u * row_step >= M) break;
#pragma unroll
        for (int j = 0; j < V; ++j) op.apply(u, j, j);
        op.store(u, (r + u * row_step) * C + cv * V);
      }
    }
  }
}

// What both passes read besides their tensors: the input and the channel
// table (channel_table_kernel).
template <typename scalar_t, typename acc_t>
struct PassInputs {
  const scalar_t* __restrict__ x;
  const acc_t* __restrict__ table;
  bool relu;
};

// Output: y = (x - mean) * k + b, optionally max(y, 0). K: constant slots
// (1 for the flat walk, V for the rows walk).
template <typename scalar_t, typename acc_t, int V, int U, int K>
struct OutputOp : PassInputs<scalar_t, acc_t> {
  scalar_t* __restrict__ y;
  AffineConsts<acc_t> k[K];
  Pack<scalar_t, V> xv[U];

  __device__ __forceinline__ void channel(int64_t c) {
    k[0].load(this->table + c * table_width<false>());
  }
  __device__ __forceinline__ void channels(int64_t c0) {
#pragma unroll
    for (int j = 0; j < K; ++j)
      k[j].load(this->table + (c0 + j) * table_width<false>());
  }
  __device__ __forceinline__ void load(int u, int64_t i) {
    xv[u] = load_pack<V>(this->x + i);
  }
  __device__ __forceinline__ void apply(int u, int j, int slot) {
    xv[u].v[j] = k[slot].apply(xv[u].v[j], this->relu);
  }
  __device__ __forceinline__ void store(int u, int64_t i) {
    store_pack<V>(y + i, xv[u]);
  }
  __device__ __forceinline__ void scalar(int64_t e) {
    y[e] = k[0].apply(this->x[e], this->relu);
  }
};

// Vectors of one tensor in flight per thread: the output pass reads one
// tensor, the grad-input pass two.
constexpr int kOutputUnroll = 4;
constexpr int kDataUnroll = 2;

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    output_planar_kernel(const scalar_t* __restrict__ x,
                         scalar_t* __restrict__ y, int64_t numel, int64_t C,
                         int64_t S, FlatStep st,
                         const acc_t* __restrict__ table, bool relu) {
  OutputOp<scalar_t, acc_t, V, kOutputUnroll, 1> op{{x, table, relu}, y};
  flat_walk<V, kOutputUnroll>(op, numel, C, S, st);
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    output_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                       int64_t M, int64_t C, const acc_t* __restrict__ table,
                       bool relu) {
  // Wide vectors hold V constant sets already: fewer rows in flight.
  constexpr int U = V >= 4 ? 2 : kOutputUnroll;
  OutputOp<scalar_t, acc_t, V, U, V> op{{x, table, relu}, y};
  rows_walk<V, U>(op, M, C);
}

// ---------------------------------------------------------------------------
// Backward reduction: per channel sum(g) and sum(g * (x - mean)), g being dy
// masked by the recomputed ReLU; blocks and grids as for the statistics.
// Partials ([2][splits][C]) are summed in float64 by reduce_merge_kernel,
// which also applies invstd; a grid of one split writes `sums` (2C, acc_t)
// directly.

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads, kMinReduceBlocks)
    reduce_planar_kernel(
        const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
        int64_t C, int64_t S, PlanarWalk w,
        const double* __restrict__ mean, const double* __restrict__ invstd,
        const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
        bool relu, acc_t* __restrict__ partial, acc_t* __restrict__ sums) {
  // Two tensors in flight: with 16-byte vectors, 2 of each per thread keep
  // the registers under the kMinReduceBlocks bound.
  constexpr int U = V * sizeof(scalar_t) >= 16 ? 2 : kUnroll;
  const int64_t splits = gridDim.x;
  const PlanarShare sh(w, C);
  for (int64_t tile = blockIdx.y; tile < sh.tiles(); tile += gridDim.y) {
    const int64_t c = sh.channel(tile);
    const bool active = c < C;
    acc_t s1[V], s2[V];
#pragma unroll
    for (int j = 0; j < V; ++j) s1[j] = s2[j] = acc_t(0);
    ChannelConsts<acc_t> k;
    if (active) k.load(c, mean, invstd, weight, bias);
    if (active && sh.lo() + sh.member() < sh.hi()) {
      PlaneCursor cur(sh.lo() + sh.member(), w.W, c, C, S);
      while (cur.j < sh.hi()) {
        Pack<scalar_t, V> gv[U], xv[U];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          ok[u] = cur.j < sh.hi();
          if (ok[u]) {
            const int64_t at = cur.vector_at<V>();
            gv[u] = load_pack<V>(dy + at);
            xv[u] = load_pack<V>(x + at);
          }
          cur.advance(w.group, w.vector_step, w.plane_stride);
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (ok[u]) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
              const acc_t xm = k.centered(acc_t(xv[u].v[j]));
              const acc_t g = k.grad(acc_t(gv[u].v[j]), xm, relu);
              s1[j] += g;
              s2[j] += g * xm;
            }
          }
      }
    }
    // V == 1: no edges (W == S).
    if (V > 1 && active && sh.lo_e() + sh.member() < sh.hi_e()) {
      PlaneCursor cur(sh.lo_e() + sh.member(), w.E, c, C, S);
      while (cur.j < sh.hi_e()) {
        scalar_t gv[kEdgeUnroll], xv[kEdgeUnroll];
        bool ok[kEdgeUnroll];
#pragma unroll
        for (int u = 0; u < kEdgeUnroll; ++u) {
          ok[u] = cur.j < sh.hi_e();
          if (ok[u]) {
            const int64_t at = cur.edge_at<V>(w.W);
            gv[u] = dy[at];
            xv[u] = x[at];
          }
          cur.advance(w.group, w.edge_step, w.plane_stride);
        }
#pragma unroll
        for (int u = 0; u < kEdgeUnroll; ++u)
          if (ok[u]) {
            const acc_t xm = k.centered(acc_t(xv[u]));
            const acc_t g = k.grad(acc_t(gv[u]), xm, relu);
            s1[0] += g;
            s2[0] += g * xm;
          }
      }
    }
    acc_t t1 = acc_t(0), t2 = acc_t(0);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      t1 += s1[j];
      t2 += s2[j];
    }
    group_sum2(t1, t2, w.group);
    if (active && sh.member() == 0) {
      if (splits == 1) {
        sums[c] = t1;
        sums[C + c] = acc_t(double(t2) * invstd[c]);
      } else {
        partial[blockIdx.x * C + c] = t1;
        partial[(splits + blockIdx.x) * C + c] = t2;
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads, kMinReduceBlocks)
    reduce_rows_kernel(const scalar_t* __restrict__ dy,
                       const scalar_t* __restrict__ x, int64_t M, int64_t C,
                       int64_t rows_per_block, const double* __restrict__ mean,
                       const double* __restrict__ invstd,
                       const acc_t* __restrict__ weight,
                       const acc_t* __restrict__ bias, bool relu,
                       acc_t* __restrict__ partial, acc_t* __restrict__ sums) {
  // Two tensors in flight: with 8-wide vectors, one row of each (two
  // 16-byte vectors) leaves register headroom under the kMinReduceBlocks
  // bound (two rows used 122 of 128).
  constexpr int U = V >= 8 ? 1 : kUnroll;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sh = reinterpret_cast<acc_t*>(smem_raw);
  constexpr int kState = 2 * V;  // s1[V], s2[V]
  const int bx = blockDim.x, by = blockDim.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t splits = gridDim.x;
  const int64_t Cv = C / V;
  const int64_t lo = int64_t(blockIdx.x) * rows_per_block;
  const int64_t hi = lo + rows_per_block < M ? lo + rows_per_block : M;
  acc_t* mine = sh + (ty * bx + tx) * kState;
  for (int64_t cv0 = int64_t(blockIdx.y) * bx; cv0 < Cv;
       cv0 += int64_t(gridDim.y) * bx) {
    const int64_t cv = cv0 + tx;
    const bool active = cv < Cv;
    acc_t s1[V], s2[V];
#pragma unroll
    for (int j = 0; j < V; ++j) s1[j] = s2[j] = acc_t(0);
    if (active) {
      ChannelConsts<acc_t> k[V];
#pragma unroll
      for (int j = 0; j < V; ++j)
        k[j].load(cv * V + j, mean, invstd, weight, bias);
      const int64_t col = cv * V;
      for (int64_t r = lo + ty; r < hi; r += int64_t(by) * U) {
        Pack<scalar_t, V> gv[U], xv[U];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t rr = r + int64_t(u) * by;
          ok[u] = rr < hi;
          if (ok[u]) {
            gv[u] = load_pack<V>(dy + rr * C + col);
            xv[u] = load_pack<V>(x + rr * C + col);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (ok[u]) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
              const acc_t xm = k[j].centered(acc_t(xv[u].v[j]));
              const acc_t g = k[j].grad(acc_t(gv[u].v[j]), xm, relu);
              s1[j] += g;
              s2[j] += g * xm;
            }
          }
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      mine[j] = s1[j];
      mine[V + j] = s2[j];
    }
    __syncthreads();
    for (int rows = by; rows > 1;) {
      const int half = (rows + 1) / 2;
      if (ty < rows - half) {
        const acc_t* other = sh + ((ty + half) * bx + tx) * kState;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          s1[j] += other[j];
          s2[j] += other[V + j];
          mine[j] = s1[j];
          mine[V + j] = s2[j];
        }
      }
      __syncthreads();
      rows = half;
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t c = cv * V + j;
        if (splits == 1) {
          sums[c] = s1[j];
          sums[C + c] = acc_t(double(s2[j]) * invstd[c]);
        } else {
          partial[blockIdx.x * C + c] = s1[j];
          partial[(splits + blockIdx.x) * C + c] = s2[j];
        }
      }
    }
    __syncthreads();  // `sh` is reused by the next channel tile
  }
}

// Sums the `splits` partial sums of each channel in float64 and applies
// invstd. Block (kMergeLanes, kMergeRows), as stats_merge_kernel.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    reduce_merge_kernel(const acc_t* __restrict__ partial, int64_t splits,
                        int64_t C, const double* __restrict__ invstd,
                        acc_t* __restrict__ sums) {
  __shared__ double sh[2][kMergeRows][kMergeLanes];
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t c0 = int64_t(blockIdx.x) * kMergeLanes; c0 < C;
       c0 += int64_t(gridDim.x) * kMergeLanes) {
    const int64_t c = c0 + tx;
    double s1 = 0.0, s2 = 0.0;
    if (c < C)
      for (int64_t j = ty; j < splits; j += kMergeRows) {
        s1 += double(partial[j * C + c]);
        s2 += double(partial[(splits + j) * C + c]);
      }
    sh[0][ty][tx] = s1;
    sh[1][ty][tx] = s2;
    __syncthreads();
    for (int half = kMergeRows / 2; half > 0; half /= 2) {
      if (ty < half) {
        s1 += sh[0][ty + half][tx];
        s2 += sh[1][ty + half][tx];
        sh[0][ty][tx] = s1;
        sh[1][ty][tx] = s2;
      }
      __syncthreads();
    }
    if (ty == 0 && c < C) {
      sums[c] = acc_t(s1);
      sums[C + c] = acc_t(s2 * invstd[c]);
    }
  }
}

// ---------------------------------------------------------------------------
// Grad input: dx = k * (g - shift) + k2 * (x - mean) with k = weight *
// invstd, shift = scale * sum_dy, k2 = -k * scale * invstd * sum_dy_xhat,
// formed in float64 and rounded once; `scale` is read from device memory
// (the output of finalize), never from the host.

template <typename acc_t>
struct DataConsts : ChannelConsts<acc_t> {
  acc_t shift, k2;
  // Row c of a kData channel table: hi, lo, k, b, shift, k2.
  __device__ __forceinline__ void load(const acc_t* row) {
    ChannelConsts<acc_t>::load(row);
    const Pack<acc_t, 2> r = load_pack<2>(row + 4);
    shift = r.v[0];
    k2 = r.v[1];
  }
  template <typename scalar_t>
  __device__ __forceinline__ scalar_t apply(scalar_t dy, scalar_t x,
                                            bool relu) const {
    const acc_t xm = this->centered(acc_t(x));
    const acc_t g = this->grad(acc_t(dy), xm, relu);
    return scalar_t(this->k * (g - shift) + k2 * xm);
  }
};

// Grad input, as an Op of the walks above.
template <typename scalar_t, typename acc_t, int V, int U, int K>
struct DataOp : PassInputs<scalar_t, acc_t> {
  const scalar_t* __restrict__ dy;
  scalar_t* __restrict__ dx;
  DataConsts<acc_t> k[K];
  Pack<scalar_t, V> gv[U], xv[U];

  __device__ __forceinline__ void channel(int64_t c) {
    k[0].load(this->table + c * table_width<true>());
  }
  __device__ __forceinline__ void channels(int64_t c0) {
#pragma unroll
    for (int j = 0; j < K; ++j)
      k[j].load(this->table + (c0 + j) * table_width<true>());
  }
  __device__ __forceinline__ void load(int u, int64_t i) {
    gv[u] = load_pack<V>(dy + i);
    xv[u] = load_pack<V>(this->x + i);
  }
  __device__ __forceinline__ void apply(int u, int j, int slot) {
    gv[u].v[j] = k[slot].apply(gv[u].v[j], xv[u].v[j], this->relu);
  }
  __device__ __forceinline__ void store(int u, int64_t i) {
    store_pack<V>(dx + i, gv[u]);
  }
  __device__ __forceinline__ void scalar(int64_t e) {
    dx[e] = k[0].apply(dy[e], this->x[e], this->relu);
  }
};

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    data_planar_kernel(const scalar_t* __restrict__ dy,
                       const scalar_t* __restrict__ x,
                       scalar_t* __restrict__ dx, int64_t numel, int64_t C,
                       int64_t S, FlatStep st, const acc_t* __restrict__ table,
                       bool relu) {
  DataOp<scalar_t, acc_t, V, kDataUnroll, 1> op{{x, table, relu}, dy, dx};
  flat_walk<V, kDataUnroll>(op, numel, C, S, st);
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    data_rows_kernel(const scalar_t* __restrict__ dy,
                     const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                     int64_t M, int64_t C, const acc_t* __restrict__ table,
                     bool relu) {
  // V constant sets of 6 values already: one row in flight for 8-wide
  // vectors keeps the registers (and the resident blocks) where they were.
  constexpr int U = V >= 8 ? 1 : kDataUnroll;
  DataOp<scalar_t, acc_t, V, U, V> op{{x, table, relu}, dy, dx};
  rows_walk<V, U>(op, M, C);
}

}  // namespace cuda
}  // namespace mmsync
