// Small CUDA runtime helpers shared by the bindings and the kernels' host code.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace genie_tk {

// Throws std::runtime_error (RuntimeError in Python) naming the failed step.
inline void cuda_check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("genie_tk: ") + what + " failed: " +
                                 cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
    }
}

// A stream handle from Python (torch.cuda.current_stream().cuda_stream; 0 is
// the legacy default stream) as a cudaStream_t.
inline cudaStream_t stream_from_handle(std::uintptr_t handle) {
    return reinterpret_cast<cudaStream_t>(handle);
}

// Makes `device` current for the lifetime of the guard, so a launch goes to
// the device that owns the tensors and the caller's stream, whatever device
// the thread had selected; restores the previous one afterwards.
class DeviceGuard {
public:
    explicit DeviceGuard(int device) {
        cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
        if (previous_ != device) {
            cuda_check(cudaSetDevice(device), "cudaSetDevice");
            switched_ = true;
        }
    }
    ~DeviceGuard() {
        if (switched_) cudaSetDevice(previous_);
    }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

private:
    int previous_ = 0;
    bool switched_ = false;
};

}  // namespace genie_tk
