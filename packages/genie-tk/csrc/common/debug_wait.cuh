// Every mbarrier wait of the kernels goes through GENIE_TK_WAIT(sem, phase,
// name, step). In a normal build it is ThunderKittens' wait. In a
// GENIE_TK_DEBUG build (CMake -DGENIE_TK_DEBUG=ON) it is a bounded spin: if
// the phase has not completed after GENIE_TK_DEBUG_TIMEOUT_NS nanoseconds of
// the global timer (default 2 s, far beyond any legal wait), lane 0 of the
// waiting warp prints
//   genie_tk hang: <file>:<line> block <x> warpgroup <w> warp <v> barrier <name> phase <p> step <s>
// and the thread traps. A hang becomes a located error: the launch fails with
// cudaErrorLaunchFailure (unspecified launch failure) and the printed lines
// say which barrier each stuck warp waited on.
#pragma once

#include <cstdint>
#include <cstdio>

#include "kittens.cuh"

#ifndef GENIE_TK_DEBUG_TIMEOUT_NS
#define GENIE_TK_DEBUG_TIMEOUT_NS 2000000000ull
#endif

namespace genie_tk {
namespace debug {

__device__ inline std::uint64_t global_timer_ns() {
    std::uint64_t t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

// One probe of `sem`'s phase `phase` (true once it completed); try_wait may
// suspend the thread for a hardware-chosen while before it answers false.
__device__ inline bool phase_completed(kittens::semaphore& sem, int phase) {
    const std::uint32_t addr = static_cast<std::uint32_t>(__cvta_generic_to_shared(&sem));
    std::uint32_t done;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(addr), "r"(phase)
        : "memory");
    return done != 0;
}

__device__ inline void bounded_wait(kittens::semaphore& sem, int phase, const char* name, int step, const char* file,
                                    int line) {
    if (phase_completed(sem, phase)) return;
    const std::uint64_t start = global_timer_ns();
    while (!phase_completed(sem, phase)) {
        if (global_timer_ns() - start > GENIE_TK_DEBUG_TIMEOUT_NS) {
            if (threadIdx.x % 32 == 0) {
                printf("genie_tk hang: %s:%d block %d warpgroup %d warp %d barrier %s phase %d step %d\n", file, line,
                       static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x / 128),
                       static_cast<int>(threadIdx.x / 32), name, phase, step);
            }
            __trap();
        }
    }
}

}  // namespace debug
}  // namespace genie_tk

#ifdef GENIE_TK_DEBUG
#define GENIE_TK_WAIT(sem, phase, name, step) \
    ::genie_tk::debug::bounded_wait((sem), (phase), (name), (step), __FILE__, __LINE__)
#else
#define GENIE_TK_WAIT(sem, phase, name, step) ::kittens::wait((sem), (phase))
#endif
