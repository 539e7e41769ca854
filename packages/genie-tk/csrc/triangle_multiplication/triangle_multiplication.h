// Host entry points of the triangle multiplicative update kernels (AF2 Alg.
// 11/12 and the fused-projection multimer variant). Free of ThunderKittens and
// nanobind so the bindings compile with the host compiler.
//
// Three passes (NOTES.md gives the bytes each one moves):
//   input     z [B, N, N, C] -> ab [2, B, Ch, N, Np] (a = ab[0], b = ab[1]):
//             LayerNorm, the four gated projections and the mask, written
//             channel-first;
//   contract  per channel, an N x N x N product of two channel-first tensors
//             (outgoing A.B^T, incoming A^T.B, and the backward's A.B);
//   output    x [B, Ch, N, Np], z -> out [B, N, N, C]: LayerNorm of x over the
//             channels, the output projection, and the gate recomputed from z.
//
// Channel-first tensors are [B, channels, N, Np] with Np = trimul_padded(N):
// each channel is an N x Np row-major matrix whose columns >= N are zero.
// ThunderKittens' swizzled TMA boxes are 64 elements wide, and a row length
// that is a multiple of 64 keeps every box within its row, so the copy engine's
// zero fill handles the row tail and the columns are padded with real zeros.
// Every pass keeps the padding zero, so padded columns add nothing to a product.
//
// All tensors are C-contiguous device tensors of the current device with
// 16-byte aligned bases; the bindings check this. Half-precision tensors share
// one element type (`dtype`); LayerNorm parameters, biases, masks and scales
// are fp32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace genie_tk {

enum class TrimulDtype { kBFloat16, kFloat16 };

// Width of the TMA boxes along a padded row.
inline constexpr int kTrimulRowBlock = 64;

inline constexpr std::int64_t trimul_padded(std::int64_t n) {
    return (n + kTrimulRowBlock - 1) / kTrimulRowBlock * kTrimulRowBlock;
}

// c_z and c_hidden the kernels are compiled for.
inline constexpr bool trimul_channels_supported(std::int64_t c) { return c == 64 || c == 128; }

// Which operands of the contraction are transposed. Each channel's A and B
// are N x Np matrices (rows x padded columns):
//   kABt  out[i, j] = sum_k A[i, k] B[j, k]   outgoing forward; incoming dA = B.dX^T
//   kAtB  out[i, j] = sum_k A[k, i] B[k, j]   incoming forward; outgoing dB = dX^T.A
//   kAB   out[i, j] = sum_k A[i, k] B[k, j]   outgoing dA = dX.B; incoming dB = A.dX
enum class TrimulContraction { kABt, kAtB, kAB };

struct TrimulContractArgs {
    TrimulDtype dtype;
    TrimulContraction mode;
    int batch;     // B
    int channels;  // channels of a, b and out
    int n;         // N
    void* out;           // [B, channels, N, Np]
    const void* a;       // [B, channels, N, Np]
    const void* b;       // [B, channels, N, Np]
    const float* scale;  // [1] or nullptr: multiplies the fp32 accumulator before rounding
};

// out = scale * op(A) op(B) per (batch, channel), fp32 accumulation on wgmma.
// Every element of out is written (the padding with zeros). Asynchronous.
void trimul_contract_sm90(const TrimulContractArgs& args, cudaStream_t stream);

struct TrimulInputArgs {
    TrimulDtype dtype;
    int batch;   // B
    int n;       // N
    int c;       // c_z, 64 or 128
    int hidden;  // c_hidden, 64 or 128
    float eps;
    void* ab;             // [2, B, hidden, N, Np] out: ab[0] is a, ab[1] is b
    double* moments;      // [4] or nullptr: += (sum a, sum a^2, sum b, sum b^2) of the rounded values
    const void* z;        // [B, N, N, c]
    const float* mask;    // [B, N, N] or nullptr (all ones)
    const float* ln_weight;  // [c]
    const float* ln_bias;    // [c]
    const void* p_weight;    // [2*hidden, c]
    const float* p_bias;     // [2*hidden]
    const void* g_weight;    // [2*hidden, c]
    const float* g_bias;     // [2*hidden]
};

// With zn = LayerNorm(z[b, i, j]) and f = h + hidden * s (s = 0 for a, 1 for b):
// ab[s, b, h, i, j] = mask[b, i, j] * sigmoid(zn g_weight[f]^T + g_bias[f]) * (zn p_weight[f]^T + p_bias[f]),
// zero for j >= N. Asynchronous.
void trimul_input_sm90(const TrimulInputArgs& args, cudaStream_t stream);

struct TrimulOutputArgs {
    TrimulDtype dtype;
    int batch;   // B
    int n;       // N
    int c;       // c_z, 64 or 128
    int hidden;  // c_hidden, 64 or 128
    float eps;
    void* out;                   // [B, N, N, c]
    const void* x;               // [B, hidden, N, Np]
    const void* z;               // [B, N, N, c]
    const float* ln_in_weight;   // [c]
    const float* ln_in_bias;     // [c]
    const float* ln_out_weight;  // [hidden]
    const float* ln_out_bias;    // [hidden]
    const void* z_weight;        // [c, hidden] (linear_z)
    const float* z_bias;         // [c]
    const void* g_weight;        // [c, c] (linear_g)
    const float* g_bias;         // [c]
};

// out[b, i, j] = sigmoid(LN_in(z) g_weight^T + g_bias) * (LN_out(x[b, :, i, j]) z_weight^T + z_bias).
// Asynchronous.
void trimul_output_sm90(const TrimulOutputArgs& args, cudaStream_t stream);

}  // namespace genie_tk
