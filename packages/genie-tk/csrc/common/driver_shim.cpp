// Run-time resolution of the CUDA driver functions ThunderKittens calls; see
// driver_shim.h. These are the only driver symbols the ThunderKittens headers
// reference from the code genie-tk compiles (its VMM/IPC helpers, which use
// others, are never instantiated here); `nm -u` on _C shows no other cu*.
#include "common/driver_shim.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <string>

namespace genie_tk {
namespace {

struct DriverApi {
    PFN_cuGetErrorString_v6000 get_error_string = nullptr;
    PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encode_tiled = nullptr;
    CUresult unavailable = CUDA_SUCCESS;  // what the shims return when a function is missing
    std::string reason;                   // "" when both functions resolved
};

// Looks one symbol up at the ABI version genie-tk was written against.
// Returns "" on success, otherwise the reason, and sets `code` to the CUresult
// the shim should report.
std::string resolve(const char* symbol, unsigned int version, void** fn, CUresult* code) {
    *fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, fn, version, cudaEnableDefault, &found);
#else
    (void)version;
    cudaError_t err = cudaGetDriverEntryPoint(symbol, fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess) {
        *fn = nullptr;
        *code = CUDA_ERROR_NOT_INITIALIZED;
        return std::string("no usable CUDA driver: ") + cudaGetErrorName(err) + " (" +
               cudaGetErrorString(err) + ")";
    }
    if (found != cudaDriverEntryPointSuccess || *fn == nullptr) {
        *fn = nullptr;
        *code = CUDA_ERROR_NOT_FOUND;
        return std::string("the CUDA driver does not provide ") + symbol +
               (found == cudaDriverEntryPointVersionNotSufficent ? " (driver too old)" : "");
    }
    return "";
}

const DriverApi& driver_api() {
    // Resolved once; C++ guarantees thread-safe initialisation of the static.
    static const DriverApi api = [] {
        DriverApi a;
        void* fn = nullptr;
        a.reason = resolve("cuGetErrorString", 6000, &fn, &a.unavailable);
        a.get_error_string = reinterpret_cast<PFN_cuGetErrorString_v6000>(fn);
        if (a.reason.empty()) {
            a.reason = resolve("cuTensorMapEncodeTiled", 12000, &fn, &a.unavailable);
            a.tensor_map_encode_tiled = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
        }
        return a;
    }();
    return api;
}

}  // namespace

std::string driver_status() noexcept {
    try {
        return driver_api().reason;
    } catch (...) {  // only std::bad_alloc is possible here
        return "could not query the CUDA driver";
    }
}

}  // namespace genie_tk

// Definitions of the driver API functions themselves (declared by cuda.h).
// Hidden: they satisfy ThunderKittens' references inside _C and are never
// exported, so they cannot interpose on the real driver for anyone else.
#define GENIE_TK_HIDDEN __attribute__((visibility("hidden")))

extern "C" GENIE_TK_HIDDEN CUresult CUDAAPI cuGetErrorString(CUresult error, const char** pStr) {
    const genie_tk::DriverApi& api = genie_tk::driver_api();
    if (api.get_error_string) return api.get_error_string(error, pStr);
    // ThunderKittens prints *pStr without checking the result: always leave a
    // valid string there, the reason the driver could not be used.
    if (pStr) *pStr = api.reason.c_str();
    return api.unavailable;
}

extern "C" GENIE_TK_HIDDEN CUresult CUDAAPI cuTensorMapEncodeTiled(
    CUtensorMap* tensorMap, CUtensorMapDataType tensorDataType, cuuint32_t tensorRank, void* globalAddress,
    const cuuint64_t* globalDim, const cuuint64_t* globalStrides, const cuuint32_t* boxDim,
    const cuuint32_t* elementStrides, CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
    CUtensorMapL2promotion l2Promotion, CUtensorMapFloatOOBfill oobFill) {
    const genie_tk::DriverApi& api = genie_tk::driver_api();
    if (!api.tensor_map_encode_tiled) return api.unavailable;
    return api.tensor_map_encode_tiled(tensorMap, tensorDataType, tensorRank, globalAddress, globalDim,
                                       globalStrides, boxDim, elementStrides, interleave, swizzle,
                                       l2Promotion, oobFill);
}
