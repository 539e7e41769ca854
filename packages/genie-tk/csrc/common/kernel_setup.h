// What every warp-specialised kernel needs before its first launch on a
// device, done once per (kernel, device) and remembered:
//
// * the opt-in to more than 48 KB of dynamic shared memory
//   (cudaFuncSetAttribute), which costs a driver call per launch otherwise;
// * a check of its setmaxnreg budgets against the registers the CTA is given
//   at launch (cudaFuncGetAttributes().numRegs x threads). setmaxnreg.inc
//   blocks until the CTA's pool holds the registers it asks for, so a budget
//   over the pool is a silent hang on the GPU; here it is a RuntimeError.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>

namespace genie_tk {

// The setmaxnreg budgets of a kernel: `producer_warpgroups` warpgroups drop
// to `producer_registers` per thread and `consumer_warpgroups` raise theirs to
// `consumer_registers`. Zero warpgroups of both: the kernel uses no setmaxnreg.
struct RegisterBudget {
    int threads = 0;
    int producer_warpgroups = 0;
    int producer_registers = 0;
    int consumer_warpgroups = 0;
    int consumer_registers = 0;
};

// Registers per thread that the hardware allocates for a kernel whose
// compiled count is `num_regs` (a multiple of 8: 256 per warp).
inline constexpr int allocated_registers(int num_regs) { return (num_regs + 7) / 8 * 8; }

// "" when `budget` fits a CTA whose threads start with `num_regs` registers
// each, otherwise why not (it names `kernel`). Pure arithmetic: testable
// without a GPU (genie_tk._C.register_budget_error).
std::string register_budget_error(const char* kernel, int num_regs, const RegisterBudget& budget);

// Once per (kernel, current device): raises the kernel's dynamic shared memory
// limit to `shared_bytes` and checks `budget` (if given) against
// cudaFuncGetAttributes. Throws std::runtime_error naming `kernel` on failure;
// a failed setup is retried at the next call. Thread-safe.
void prepare_kernel(const void* func, const char* kernel, std::size_t shared_bytes, const RegisterBudget* budget);

template <typename Kernel>
void prepare_kernel(Kernel* func, const char* kernel, std::size_t shared_bytes, const RegisterBudget* budget) {
    prepare_kernel(reinterpret_cast<const void*>(func), kernel, shared_bytes, budget);
}

}  // namespace genie_tk
