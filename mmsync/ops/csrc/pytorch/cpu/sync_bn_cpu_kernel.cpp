// The sync_bn CPU kernels compiled for the baseline instruction set.
#include "sync_bn_cpu_kernel.h"

namespace mmsync {
namespace cpu {
namespace isa_default {
#define MMSYNC_ISA_NAME "default"
#include "sync_bn_cpu_kernel_impl.h"
#undef MMSYNC_ISA_NAME
}  // namespace isa_default
const Kernels* kernels_default() { return isa_default::table(); }
}  // namespace cpu
}  // namespace mmsync
