// Emulation stand-in: the current "device" index is the emulated SM count,
// so that launchers caching per-device properties see each count afresh.
#pragma once
#include <c10/core/Device.h>

#include "../../../emu_prelude.h"

namespace c10 {
namespace cuda {
inline c10::DeviceIndex current_device() {
  return static_cast<c10::DeviceIndex>(emu::g_sms);
}
}  // namespace cuda
}  // namespace c10
