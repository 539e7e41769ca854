// ThunderKittens' host code calls two CUDA driver functions,
// cuTensorMapEncodeTiled (to build TMA descriptors) and cuGetErrorString.
// driver_shim.cpp defines both and forwards them to the real driver, which it
// looks up at first use through the runtime's entry-point API. So genie_tk._C
// links neither libcuda nor its stub, and imports on a machine without a
// driver; there the two functions return an error instead of crashing.
#pragma once

#include <string>

namespace genie_tk {

// "" when the driver entry points resolve (a usable driver is present),
// otherwise a short reason. Never throws.
std::string driver_status() noexcept;

}  // namespace genie_tk
