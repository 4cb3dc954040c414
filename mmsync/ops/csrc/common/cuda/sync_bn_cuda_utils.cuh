// Device helpers of the sync_bn CUDA kernels: aligned vector loads, cursors
// over PLANAR tensors (N x C x S contiguous), and Welford/Chan merges of
// per-thread moments in registers, across a warp and across a group of
// warps.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../sync_bn_common.h"

// A device-side error: the kernel stops with `msg` and the CUDA context
// reports a device-side assertion at the next synchronization (the CPU
// emulation of the kernels raises instead).
#ifndef MMSYNC_DEVICE_ASSERT
#include <cassert>
#define MMSYNC_DEVICE_ASSERT(cond, msg)                        \
  do {                                                         \
    if (!(cond))                                               \
      __assert_fail(msg, __FILE__, unsigned(__LINE__), __func__); \
  } while (0)
#endif

namespace mmsync {
namespace cuda {

// Threads of every 1-D block; 2-D (ROWS) blocks hold at most as many.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Vectors (PLANAR) or rows (ROWS) a reduction thread loads before it uses
// any of them: enough bytes in flight to cover the memory latency.
constexpr int kUnroll = 4;
// Reduction kernels are compiled for at least this many resident blocks per
// SM (at most 128 registers per thread on sm_90): enough loads in flight.
constexpr int kMinReduceBlocks = 2;

// V elements loaded or stored as one access (16 bytes at most).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// A PLANAR reduction splits each plane of channel c (S elements from offset
// (n * C + c) * S) into its aligned interior, W vectors of V elements that
// start at the plane's first offset aligned to V, and E = S - W * V edge
// elements before and after them, read one by one. W is the same for every
// plane (the fewest any of its offsets leaves), so the channel's vectors
// and its edge elements are each a regular sequence: item j is item j % P
// of plane j / P (P = W or E). A thread visits every step-th item and tracks
// (item in the plane, plane offset) without a division. Offsets are in
// elements from a base pointer aligned to V elements.
struct PlaneStep {
  int64_t per_plane;  // items per plane (P)
  int64_t dk;         // step % P
  int64_t jump;       // (step / P) * C * S: planes a step passes, as offset
};

struct PlanarWalk {
  int group;                   // threads on one channel: 32..kThreads
  int64_t W, E;                // vectors and edge elements per plane
  int64_t vectors, edges;      // of the channel: N * W, N * E
  int64_t per_block;           // vectors a block reduces
  int64_t per_block_edges;     // edge elements a block reduces
  int64_t plane_stride;        // C * S
  PlaneStep vector_step, edge_step;  // steps of `group` items
};

// This block's share of a PLANAR reduction, the same for each channel:
// vectors [lo, hi) and edge elements [lo_e, hi_e); and this thread's place:
// member() of the group on its channel of each tile of kThreads / group
// channels. Computed where used, from the kernel's parameters: nothing
// held in registers across the loops.
struct PlanarShare {
  const PlanarWalk& w;
  int64_t C;
  __device__ __forceinline__ PlanarShare(const PlanarWalk& walk,
                                         int64_t channels)
      : w(walk), C(channels) {}
  __device__ __forceinline__ int64_t lo() const {
    return int64_t(blockIdx.x) * w.per_block;
  }
  __device__ __forceinline__ int64_t hi() const {
    const int64_t end = lo() + w.per_block;
    return end < w.vectors ? end : w.vectors;
  }
  __device__ __forceinline__ int64_t lo_e() const {
    return int64_t(blockIdx.x) * w.per_block_edges;
  }
  __device__ __forceinline__ int64_t hi_e() const {
    const int64_t end = lo_e() + w.per_block_edges;
    return end < w.edges ? end : w.edges;
  }
  __device__ __forceinline__ int member() const {
    return int(threadIdx.x) % w.group;
  }
  __device__ __forceinline__ int64_t tiles() const {
    const int per_tile = kThreads / w.group;
    return (C + per_tile - 1) / per_tile;
  }
  __device__ __forceinline__ int64_t channel(int64_t tile) const {
    return tile * (kThreads / w.group) + int(threadIdx.x) / w.group;
  }
};

struct PlaneCursor {
  int64_t j, k, base;  // item index, item in its plane, plane offset
  __device__ __forceinline__ PlaneCursor(int64_t j0, int64_t per_plane,
                                         int64_t c, int64_t C, int64_t S) {
    const int64_t n = j0 / per_plane;
    j = j0;
    k = j0 - n * per_plane;
    base = (n * C + c) * S;
  }
  __device__ __forceinline__ void advance(int64_t step, const PlaneStep& st,
                                          int64_t plane_stride) {
    j += step;
    k += st.dk;
    base += st.jump;
    if (k >= st.per_plane) {
      k -= st.per_plane;
      base += plane_stride;
    }
  }
  // Offset of vector k of the plane's aligned interior.
  template <int V>
  __device__ __forceinline__ int64_t vector_at() const {
    return ((base + (V - 1)) & ~int64_t(V - 1)) + k * V;
  }
  // Offset of edge element k: the plane's elements before its interior,
  // then those after the W vectors.
  template <int V>
  __device__ __forceinline__ int64_t edge_at(int64_t W) const {
    const int64_t head = (V - (base & (V - 1))) & (V - 1);
    return base + (k < head ? k : k + W * V);
  }
};

// Stride of the flat elementwise kernels over a PLANAR tensor: they track the
// channel (i / S) % C of element i incrementally, with no division.
struct FlatStep {
  int64_t step;  // elements between two visits of one thread
  int64_t ds;    // step % S
  int64_t dc;    // (step / S) % C
};

// Merges the moments of the first `valid` packs of p (U packs of V values,
// each minus `shift`) into (n, mean, m2): their own mean and M2 first, in
// registers and exactly (two passes over the loaded values), then one Chan
// merge, so that the merge's division is paid once per U * V values. The
// packs stay in the input type; values are converted where they are used.
template <int U, int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void welford_add(acc_t& n, acc_t& mean, acc_t& m2,
                                            const Pack<scalar_t, V> (&p)[U],
                                            int valid, acc_t shift) {
  if (valid <= 0) return;
  acc_t part[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    part[u] = acc_t(0);
    if (u < valid) {
#pragma unroll
      for (int j = 0; j < V; ++j) part[u] += acc_t(p[u].v[j]) - shift;
    }
  }
  acc_t sum = acc_t(0);
#pragma unroll
  for (int u = 0; u < U; ++u) sum += part[u];
  const acc_t nb = acc_t(valid * V);
  const acc_t mb = valid == U ? sum * (acc_t(1) / acc_t(U * V)) : sum / nb;
  acc_t m2b = acc_t(0);
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (u < valid) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t d = (acc_t(p[u].v[j]) - shift) - mb;
        m2b += d * d;
      }
    }
  chan_merge(n, mean, m2, nb, mb, m2b);
}

// ROWS variant: pack u is row u, its V values V channels that share the row
// count; `valid` rows of U, values minus shift[j].
template <int U, int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void welford_add_rows(
    acc_t& n, acc_t (&mean)[V], acc_t (&m2)[V], const Pack<scalar_t, V> (&p)[U],
    int valid, const acc_t (&shift)[V]) {
  if (valid <= 0) return;
  const acc_t nb = acc_t(valid);
  const acc_t inv_nb = valid == U ? acc_t(1) / acc_t(U) : acc_t(1) / nb;
  const acc_t n_ab = n + nb;
  const acc_t frac = nb / n_ab;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    acc_t sum = acc_t(0);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (u < valid) sum += acc_t(p[u].v[j]) - shift[j];
    const acc_t mb = sum * inv_nb;
    acc_t m2b = acc_t(0);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (u < valid) {
        const acc_t d = (acc_t(p[u].v[j]) - shift[j]) - mb;
        m2b += d * d;
      }
    const acc_t delta = mb - mean[j];
    mean[j] += delta * frac;
    m2[j] += m2b + delta * delta * n * frac;
  }
  n = n_ab;
}

// Chan merge across the 32 lanes of a warp; lane 0 holds the result.
template <typename T>
__device__ __forceinline__ void warp_welford(T& n, T& mean, T& m2) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T nb = __shfl_down_sync(0xffffffffu, n, off);
    const T mb = __shfl_down_sync(0xffffffffu, mean, off);
    const T m2b = __shfl_down_sync(0xffffffffu, m2, off);
    chan_merge(n, mean, m2, nb, mb, m2b);
  }
}

template <typename T>
__device__ __forceinline__ void warp_sum2(T& a, T& b) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
}

// Merges over each group of `group` consecutive threads of a 1-D block of
// kThreads (group: a multiple of 32 dividing kThreads, the same in the whole
// block); the group's first thread holds the result. Every thread of the
// block must call it; a loop may call it again at once.
template <typename T>
__device__ __forceinline__ void group_welford(T& n, T& mean, T& m2,
                                              int group) {
  __shared__ T sh[3][kWarps];
  warp_welford(n, mean, m2);
  const int per_group = group >> 5;  // warps
  if (per_group == 1) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sh[0][warp] = n;
    sh[1][warp] = mean;
    sh[2][warp] = m2;
  }
  __syncthreads();
  if (warp % per_group == 0) {
    n = lane < per_group ? sh[0][warp + lane] : T(0);
    mean = lane < per_group ? sh[1][warp + lane] : T(0);
    m2 = lane < per_group ? sh[2][warp + lane] : T(0);
    warp_welford(n, mean, m2);
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ void group_sum2(T& a, T& b, int group) {
  __shared__ T sh[2][kWarps];
  warp_sum2(a, b);
  const int per_group = group >> 5;
  if (per_group == 1) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sh[0][warp] = a;
    sh[1][warp] = b;
  }
  __syncthreads();
  if (warp % per_group == 0) {
    a = lane < per_group ? sh[0][warp + lane] : T(0);
    b = lane < per_group ? sh[1][warp + lane] : T(0);
    warp_sum2(a, b);
  }
  __syncthreads();
}

// Writes channel c of the packed statistics row (see sync_bn_common.h).
__device__ __forceinline__ void write_packed(double* packed, int64_t C,
                                             int64_t c, double shift,
                                             double mean, double m2) {
  packed[kStatsHeader + c] = shift;
  packed[kStatsHeader + C + c] = mean;
  packed[kStatsHeader + 2 * C + c] = m2;
}

}  // namespace cuda
}  // namespace mmsync
