// The sync_bn CPU kernels compiled for AVX2 + FMA (x86-64, GCC);
// only called where the CPU reports both.
#include "sync_bn_cpu_kernel.h"

namespace mmsync {
namespace cpu {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define MMSYNC_ISA_NAME "avx2"
#include "sync_bn_cpu_kernel_impl.h"
#undef MMSYNC_ISA_NAME
}  // namespace isa_avx2
#pragma GCC pop_options
const Kernels* kernels_avx2() { return isa_avx2::table(); }
#else
const Kernels* kernels_avx2() { return nullptr; }
#endif
}  // namespace cpu
}  // namespace mmsync
