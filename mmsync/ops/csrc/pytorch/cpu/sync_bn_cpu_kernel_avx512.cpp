// The sync_bn CPU kernels compiled for AVX-512 (F, BW, VL, DQ) + FMA
// (x86-64, GCC); only called where the CPU reports them.
#include "sync_bn_cpu_kernel.h"

namespace mmsync {
namespace cpu {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace isa_avx512 {
#define MMSYNC_ISA_NAME "avx512"
#include "sync_bn_cpu_kernel_impl.h"
#undef MMSYNC_ISA_NAME
}  // namespace isa_avx512
#pragma GCC pop_options
const Kernels* kernels_avx512() { return isa_avx512::table(); }
#else
const Kernels* kernels_avx512() { return nullptr; }
#endif
}  // namespace cpu
}  // namespace mmsync
