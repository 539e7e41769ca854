// genie_tk._C: the one nanobind module of genie-tk.
//
// Tensors cross by DLPack as nb::ndarray (no libtorch); outputs are allocated
// in Python and passed first; every launch takes the caller's stream as an int
// (torch.cuda.current_stream().cuda_stream). Arguments are validated here and
// errors name the argument (see common/tensor_checks.h).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "common/cuda_utils.h"
#include "common/driver_shim.h"
#include "common/kernel_setup.h"
#include "common/tensor_checks.h"
#include "common/tile_copy_sm90.h"
#include "triangle_attention/bindings_attention.h"
#include "triangle_multiplication/bindings_trimul.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace genie_tk {
namespace {

nb::dict info() {
    nb::dict d;
    d["cuda_kernels"] = true;
    d["cuda_version"] = GENIE_TK_CUDA_VERSION;
    nb::list archs;
    const std::string all = GENIE_TK_CUDA_ARCHS;
    for (std::size_t start = 0; start <= all.size();) {
        const std::size_t end = std::min(all.find(',', start), all.size());
        archs.append(all.substr(start, end - start));
        start = end + 1;
    }
    d["archs"] = archs;
    d["thunderkittens_commit"] = GENIE_TK_THUNDERKITTENS_COMMIT;
#ifdef GENIE_TK_DEBUG
    d["debug"] = true;
#else
    d["debug"] = false;
#endif
    return d;
}

std::string register_budget_error_py(const std::string& kernel, int num_regs, int threads, int producer_warpgroups,
                                     int producer_registers, int consumer_warpgroups, int consumer_registers) {
    return register_budget_error(kernel.c_str(), num_regs,
                                 RegisterBudget{threads, producer_warpgroups, producer_registers, consumer_warpgroups,
                                                consumer_registers});
}

void tile_copy_sm90_py(nb::ndarray<> dst, nb::ndarray<> src, std::uintptr_t stream) {
    check_cuda_tensor(dst, "dst", kBFloat16, 2);
    check_cuda_tensor(src, "src", kBFloat16, 2);
    check_same_device(dst, "dst", src, "src");
    check_shape(dst, "dst", {static_cast<std::int64_t>(src.shape(0)), static_cast<std::int64_t>(src.shape(1))});
    for (std::size_t i = 0; i < 2; ++i) {
        const std::size_t n = src.shape(i);
        if (n == 0 || n % kTileCopyTile != 0 || n > INT_MAX) {
            fail_value("src must have both dimensions positive multiples of " + std::to_string(kTileCopyTile) +
                       ", got shape " + shape_str(src));
        }
    }
    check_alignment(dst, "dst", 16);  // TMA needs 16-byte aligned global addresses
    check_alignment(src, "src", 16);
    DeviceGuard device(src.device_id());
    tile_copy_sm90(dst.data(), src.data(), static_cast<int>(src.shape(0)), static_cast<int>(src.shape(1)),
                   stream_from_handle(stream));
}

}  // namespace
}  // namespace genie_tk

NB_MODULE(_C, m) {
    m.doc() = "genie-tk CUDA kernels (ThunderKittens, sm_90a). Use genie_tk's Python API, not this module.";

    m.def("info", &genie_tk::info,
          "Build facts: {'cuda_kernels': True, 'cuda_version': nvcc version, 'archs': ['90a'], "
          "'thunderkittens_commit': commit or 'local', 'debug': built with GENIE_TK_DEBUG (bounded "
          "barrier waits that report and trap instead of hanging, -lineinfo)}.");

    m.def("register_budget_error", &genie_tk::register_budget_error_py, "kernel"_a, "num_regs"_a, "threads"_a,
          "producer_warpgroups"_a, "producer_registers"_a, "consumer_warpgroups"_a, "consumer_registers"_a,
          "The check every warp-specialised kernel runs at its first launch: '' when its setmaxnreg "
          "budgets fit a CTA of `threads` threads that start with `num_regs` registers each "
          "(cudaFuncGetAttributes().numRegs), otherwise the reason (the launch raises it as a "
          "RuntimeError instead of hanging in setmaxnreg.inc).");

    m.def("driver_status", &genie_tk::driver_status,
          "'' when the CUDA driver entry points resolve, otherwise why the kernels cannot run. "
          "Never raises.");

    m.def("tile_copy_sm90", &genie_tk::tile_copy_sm90_py, "dst"_a.noconvert(), "src"_a.noconvert(), "stream"_a,
          "dst[...] = src through shared memory with TMA (a plumbing check for Hopper).\n\n"
          "dst, src: C-contiguous bfloat16 CUDA tensors of the same shape (R, C), R and C multiples "
          "of 64. stream: the CUDA stream handle to launch on, e.g. "
          "torch.cuda.current_stream().cuda_stream. Asynchronous.");

    genie_tk::register_triangle_attention(m);
    genie_tk::register_triangle_multiplication(m);
}
