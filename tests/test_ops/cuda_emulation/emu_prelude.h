// CPU emulation of the CUDA execution model for mmsync's kernels: each CUDA
// thread of a block is a fiber (ucontext); barriers and warp shuffles are real
// and resolved in a seeded random order. One block runs at a time.
#pragma once

// A missing barrier or a read of unwritten shared memory (poisoned) changes
// the results; running blocks one at a time lets __shared__ be static.

#include <cxxabi.h>
#include <dlfcn.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
// A failed device-side assertion: raised from the launch here.
#define MMSYNC_DEVICE_ASSERT(cond, msg) \
  do {                                  \
    if (!(cond)) throw std::runtime_error(msg); \
  } while (0)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct emu_stream*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace emu {

inline uint3 g_thread, g_block;
inline dim3 g_block_dim, g_grid_dim;
inline int g_sms = 4;        // SM count the launchers see
inline uint64_t g_seed = 1;  // schedule order
inline int64_t g_launches = 0;
inline std::string g_error;  // first launch error, like cudaGetLastError
inline std::vector<unsigned char> g_smem;
inline std::string g_trace;  // one line per launch: kernel, grid, block

inline std::string kernel_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr) return "?";
  int status = 0;
  char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string out = status == 0 && name ? name : info.dli_sname;
  std::free(name);
  const auto paren = out.find('(');
  return paren == std::string::npos ? out : out.substr(0, paren);
}

enum class State { kRunning, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = State::kRunning;
  uint3 tid;
  int linear = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  Fiber* current = nullptr;
  std::vector<uint64_t> shfl;  // one 8-byte slot per thread
  std::function<void()> body;
};

inline Block* g_run = nullptr;

inline void yield_as(State s) {
  Fiber* f = g_run->current;
  f->state = s;
  swapcontext(&f->ctx, &g_run->sched);
}

inline std::string g_fiber_error;  // an exception thrown inside a fiber

inline void fiber_entry() {
  try {
    g_run->body();
  } catch (const std::exception& e) {
    if (g_fiber_error.empty()) g_fiber_error = e.what();
  }
  Fiber* f = g_run->current;
  f->state = State::kDone;
  swapcontext(&f->ctx, &g_run->sched);
}

[[noreturn]] inline void fail(const std::string& what) {
  throw std::runtime_error("CUDA emulation: " + what);
}

// Runs one block to completion, resolving barriers; throws on a deadlock
// or on a barrier that not every live thread of its scope reached.
inline void run_block(const dim3& block, const std::function<void()>& body,
                      std::mt19937_64& rng) {
  Block b;
  const int n = int(block.x * block.y * block.z);
  b.fibers.resize(n);
  b.shfl.assign(n, 0);
  b.body = body;
  g_run = &b;
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = uint3{unsigned(i % block.x), unsigned((i / block.x) % block.y),
                  unsigned(i / (block.x * block.y))};
    f.stack.resize(64 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  const int warps = (n + 31) / 32;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int i : order) {
      Fiber& f = b.fibers[i];
      if (f.state != State::kRunning) continue;
      b.current = &f;
      g_thread = f.tid;
      swapcontext(&b.sched, &f.ctx);
    }
    int done = 0, at_block = 0;
    for (auto& f : b.fibers) {
      done += f.state == State::kDone;
      at_block += f.state == State::kBlockBarrier;
    }
    if (done == n) break;
    bool released = false;
    for (int w = 0; w < warps; ++w) {
      const int lo = w * 32, hi = std::min(n, lo + 32);
      int at_warp = 0, other = 0;
      for (int i = lo; i < hi; ++i) {
        at_warp += b.fibers[i].state == State::kWarpBarrier;
        other += b.fibers[i].state != State::kWarpBarrier;
      }
      if (at_warp == 0) continue;
      if (other != 0)
        fail("a full-mask warp shuffle that not all 32 lanes of warp " +
             std::to_string(w) + " reached");
      if (hi - lo != 32) fail("a warp shuffle in a partial warp");
      for (int i = lo; i < hi; ++i) b.fibers[i].state = State::kRunning;
      released = true;
    }
    if (released) continue;
    if (at_block == n - done && done == 0) {
      for (auto& f : b.fibers) f.state = State::kRunning;
      continue;
    }
    if (!g_fiber_error.empty()) {
      const std::string e = g_fiber_error;
      g_fiber_error.clear();
      fail(e);
    }
    if (at_block > 0 && done > 0)
      fail("__syncthreads after some threads of the block exited");
    fail("deadlock");
  }
  g_run = nullptr;
  if (!g_fiber_error.empty()) {
    const std::string e = g_fiber_error;
    g_fiber_error.clear();
    fail(e);
  }
}

inline void sync_warp_barrier() { yield_as(State::kWarpBarrier); }

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
            cudaStream_t, A&&... args) {
  ++g_launches;
  g_trace += kernel_name(reinterpret_cast<const void*>(kernel)) + " grid=(" +
             std::to_string(grid.x) + "," + std::to_string(grid.y) +
             ") block=(" + std::to_string(block.x) + "," +
             std::to_string(block.y) + ") smem=" + std::to_string(smem) + "\n";
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 256 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      uint64_t(grid.x) > 2147483647ull || smem > 48 * 1024) {
    if (g_error.empty())
      g_error = "invalid launch configuration: grid (" +
                std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                "), block (" + std::to_string(block.x) + ", " +
                std::to_string(block.y) + "), smem " + std::to_string(smem);
    return;
  }
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  std::mt19937_64 rng(g_seed + uint64_t(g_launches) * 7919u);
  g_block_dim = block;
  g_grid_dim = grid;
  g_smem.assign(smem + 16, 0xA5);  // poisoned: unwritten reads show
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block = uint3{x, y, z};
        std::fill(g_smem.begin(), g_smem.end(), 0xA5);
        run_block(block, [&] { std::apply(kernel, params); }, rng);
      }
}

inline unsigned char* dynamic_smem() {
  auto p = reinterpret_cast<uintptr_t>(g_smem.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
}

}  // namespace emu

#define threadIdx (emu::g_thread)
#define blockIdx (emu::g_block)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)

inline void __syncthreads() { emu::yield_as(emu::State::kBlockBarrier); }

template <typename T>
T __shfl_down_sync(unsigned mask, T v, int delta) {
  static_assert(sizeof(T) <= 8, "emulated shuffles move 8 bytes at most");
  if (mask != 0xffffffffu) emu::fail("only full-mask shuffles are emulated");
  emu::Fiber* f = emu::g_run->current;
  const int lane = f->linear % 32, base = f->linear - lane;
  std::memcpy(&emu::g_run->shfl[f->linear], &v, sizeof(T));
  emu::sync_warp_barrier();
  T r = v;
  if (lane + delta < 32)
    std::memcpy(&r, &emu::g_run->shfl[base + lane + delta], sizeof(T));
  emu::sync_warp_barrier();
  return r;
}

// Like CUDA's: returns the last launch error and clears it.
inline cudaError_t cudaGetLastError() {
  if (emu::g_error.empty()) return cudaSuccess;
  return cudaErrorInvalidConfiguration;
}

inline const char* cudaGetErrorString(cudaError_t) {
  static std::string last;
  last = emu::g_error;
  emu::g_error.clear();
  return last.c_str();
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr,
                                          int device) {
  // The emulated "device index" is the SM count (see c10/cuda stubs), so
  // launchers that cache per device see each SM count afresh.
  *value = device;
  return cudaSuccess;
}

// An SM holds 2048 threads and at most 8 blocks, whatever the kernel.
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks,
                                                                 const void*,
                                                                 int threads,
                                                                 size_t) {
  *blocks = std::max(1, std::min(8, 2048 / std::max(threads, 1)));
  return cudaSuccess;
}
