// See kernel_setup.h.
#include "common/kernel_setup.h"

#include <mutex>
#include <set>
#include <stdexcept>
#include <utility>

#include "common/cuda_utils.h"

namespace genie_tk {

std::string register_budget_error(const char* kernel, int num_regs, const RegisterBudget& b) {
    const std::string name = std::string("genie_tk: ") + kernel + ": ";
    if (b.producer_warpgroups == 0 && b.consumer_warpgroups == 0) return "";
    const int warpgroups = b.producer_warpgroups + b.consumer_warpgroups;
    if (b.threads != warpgroups * 128) {
        return name + "the setmaxnreg budget covers " + std::to_string(warpgroups) + " warpgroups but the kernel " +
               "launches " + std::to_string(b.threads) + " threads";
    }
    for (const int r : {b.producer_registers, b.consumer_registers}) {
        if (r < 24 || r > 256 || r % 8 != 0) {
            return name + "setmaxnreg takes 24..256 registers in steps of 8, the budget asks for " +
                   std::to_string(r);
        }
    }
    const int at_entry = allocated_registers(num_regs);
    if (b.producer_warpgroups > 0 && b.producer_registers > at_entry) {
        return name + "the producer budget of " + std::to_string(b.producer_registers) +
               " registers is above the " + std::to_string(at_entry) +
               " each thread starts with (setmaxnreg.dec cannot raise it)";
    }
    if (b.consumer_warpgroups > 0 && b.consumer_registers < at_entry) {
        return name + "the consumer budget of " + std::to_string(b.consumer_registers) +
               " registers is below the " + std::to_string(at_entry) +
               " each thread starts with (setmaxnreg.inc cannot lower it)";
    }
    const long long pool = static_cast<long long>(at_entry) * b.threads;
    const long long asked = 128LL * (static_cast<long long>(b.producer_warpgroups) * b.producer_registers +
                                     static_cast<long long>(b.consumer_warpgroups) * b.consumer_registers);
    if (asked > pool) {
        return name + "setmaxnreg budgets need " + std::to_string(asked) + " registers (" +
               std::to_string(b.producer_warpgroups) + " x 128 x " + std::to_string(b.producer_registers) + " + " +
               std::to_string(b.consumer_warpgroups) + " x 128 x " + std::to_string(b.consumer_registers) +
               ") but the CTA is given " + std::to_string(pool) + " (" + std::to_string(at_entry) + " x " +
               std::to_string(b.threads) + " threads, numRegs " + std::to_string(num_regs) +
               "): the consumers would wait forever in setmaxnreg.inc";
    }
    return "";
}

void prepare_kernel(const void* func, const char* kernel, std::size_t shared_bytes, const RegisterBudget* budget) {
    int device = 0;
    cuda_check(cudaGetDevice(&device), "cudaGetDevice");
    static std::mutex mutex;
    static std::set<std::pair<const void*, int>> prepared;
    const std::lock_guard<std::mutex> lock(mutex);
    if (prepared.count({func, device})) return;
    const std::string what = std::string("setting up ") + kernel;
    if (shared_bytes > 48 * 1024) {
        cuda_check(cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)),
                   what.c_str());
    }
    if (budget != nullptr) {
        cudaFuncAttributes attributes{};
        cuda_check(cudaFuncGetAttributes(&attributes, func), what.c_str());
        const std::string error = register_budget_error(kernel, attributes.numRegs, *budget);
        if (!error.empty()) throw std::runtime_error(error);
    }
    prepared.insert({func, device});
}

}  // namespace genie_tk
