// Emulation stand-in for the CUDA runtime header (see ../emu_prelude.h).
#pragma once
#include "../emu_prelude.h"
