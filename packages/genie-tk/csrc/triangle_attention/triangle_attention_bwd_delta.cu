// delta = rowsum(dout * o) in fp32, the per-row term of the softmax backward
// that both backward kernels read. Memory-bound: each thread reads its rows
// with 16-byte loads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_utils.h"
#include "triangle_attention/triangle_attention.h"

namespace genie_tk {
namespace {

__device__ inline float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
__device__ inline float2 to_float2(__half2 x) { return __half22float2(x); }

template <typename T2, int D>
__global__ void delta_kernel(float* __restrict__ delta, const T2* __restrict__ dout, const T2* __restrict__ out,
                             std::int64_t rows) {
    constexpr int kVectors = D / 8;  // 16-byte vectors of 8 elements per row
    const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
    for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
        const uint4* a = reinterpret_cast<const uint4*>(dout + r * (D / 2));
        const uint4* b = reinterpret_cast<const uint4*>(out + r * (D / 2));
        float acc = 0.f;
#pragma unroll
        for (int c = 0; c < kVectors; ++c) {
            const uint4 x = __ldg(a + c), y = __ldg(b + c);
            const T2* xs = reinterpret_cast<const T2*>(&x);
            const T2* ys = reinterpret_cast<const T2*>(&y);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 u = to_float2(xs[e]), v = to_float2(ys[e]);
                acc = fmaf(u.x, v.x, fmaf(u.y, v.y, acc));
            }
        }
        delta[r] = acc;
    }
}

template <typename T2>
void launch_delta(float* delta, const void* dout, const void* out, std::int64_t rows, int head_dim,
                  cudaStream_t stream) {
    constexpr int threads = 256;
    const std::int64_t blocks = std::min<std::int64_t>((rows + threads - 1) / threads, 1 << 20);
    const auto* a = static_cast<const T2*>(dout);
    const auto* b = static_cast<const T2*>(out);
    switch (head_dim) {
        case 16: delta_kernel<T2, 16><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(delta, a, b, rows); break;
        case 32: delta_kernel<T2, 32><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(delta, a, b, rows); break;
        case 64: delta_kernel<T2, 64><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(delta, a, b, rows); break;
        default: throw std::invalid_argument("genie_tk: triangle attention head dim must be 16, 32 or 64");
    }
    cuda_check(cudaGetLastError(), "launching the triangle attention delta kernel");
}

}  // namespace

void triangle_attention_bwd_delta(float* delta, const void* dout, const void* out, AttentionDtype dtype,
                                  std::int64_t rows, int head_dim, cudaStream_t stream) {
    if (rows == 0) return;
    if (dtype == AttentionDtype::kBFloat16) {
        launch_delta<__nv_bfloat162>(delta, dout, out, rows, head_dim, stream);
    } else {
        launch_delta<__half2>(delta, dout, out, rows, head_dim, stream);
    }
}

}  // namespace genie_tk
