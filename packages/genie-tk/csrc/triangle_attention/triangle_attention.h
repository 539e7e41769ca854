// Host entry points of the triangle attention kernels (AF2 Alg. 13/14 core).
// Free of ThunderKittens and nanobind so that the bindings compile with the
// host compiler; the kernels live in triangle_attention_{fwd,bwd}_sm90.cuh.
//
// Layouts (all C-contiguous, every pointer 16-byte aligned, device pointers of
// the current device; the bindings check this):
//   q, k, v, o, dout, dk, dv   [B, I, H, N, D]  element type `dtype`
//   bias                       [B, H, N, Np]    element type `dtype`, Np = padded_keys(N);
//                              columns >= N are read but never used
//   key_bias                   [B, I, Np]       fp32, log2(e) * inf * (mask - 1): the finite
//                              mask bias in base-2 units; columns >= N are never used
//   stats                      [B, I, H, N, 2]  fp32 (row max, log2 of row sum) of the base-2
//                              logits; written by the forward, read by the backward
//   delta                      [B, I, H, N]     fp32, sum_d dout * o
//   dq_accum                   [B, I, H, N, D]  fp32, zero on entry; the dq/dk/dv kernel adds into it
//   dbias_partial              [S, B, H, N, Np] fp32, S = dbias_splits(...); every element written
//
// Semantics: with s = scale * q.k + mask_bias + bias (natural units; OpenFold's
// order: mask bias first), o = softmax_k(s) v. The kernels work on the base-2
// logits s2 = log2(e) * s, so one exp2 per element. Keys >= N are excluded
// explicitly (-inf) in the kernels; the finite mask bias of a fully masked row
// gives a uniform softmax, and the stats keep max and log-sum apart so the
// backward reproduces that row exactly (a single fp32 logsumexp near -1.4e9
// would round log2(N) away).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace genie_tk {

enum class AttentionDtype { kBFloat16, kFloat16 };

// Rows (queries or keys) per tile in every kernel; the padded key axis Np of
// `bias` and `key_bias` is a multiple of it so that each TMA box is in bounds.
inline constexpr int kTriangleAttentionBlock = 64;

inline constexpr std::int64_t triangle_attention_padded_keys(std::int64_t n) {
    return (n + kTriangleAttentionBlock - 1) / kTriangleAttentionBlock * kTriangleAttentionBlock;
}

inline constexpr bool triangle_attention_head_dim_supported(std::int64_t d) {
    return d == 16 || d == 32 || d == 64;
}

struct TriangleAttentionProblem {
    AttentionDtype dtype;
    int batch;     // B
    int rows;      // I, the rows sharing the triangle bias
    int heads;     // H
    int n;         // N = J = K
    int head_dim;  // D in {16, 32, 64}
    float scale;   // multiplies q.k (1/sqrt(D) in OpenFold)
};

struct TriangleAttentionFwdArgs {
    TriangleAttentionProblem p;
    void* o;
    float* stats;
    const void* q;
    const void* k;
    const void* v;
    const void* bias;
    const float* key_bias;
};

struct TriangleAttentionBwdArgs {
    TriangleAttentionProblem p;
    const void* q;
    const void* k;
    const void* v;
    const void* dout;
    const void* bias;
    const float* key_bias;
    const float* stats;
    const float* delta;
    float* dq_accum;       // dq/dk/dv kernel only
    void* dk;              // dq/dk/dv kernel only
    void* dv;              // dq/dk/dv kernel only
    float* dbias_partial;  // dbias kernel only
    int dbias_splits;      // dbias kernel only
};

// o and stats from q, k, v, bias, key_bias. Asynchronous on `stream`.
void triangle_attention_fwd_sm90(const TriangleAttentionFwdArgs& args, cudaStream_t stream);

// delta[r] = sum_d dout[r, d] * out[r, d] in fp32 for `rows` = B*I*H*N rows.
void triangle_attention_bwd_delta(float* delta, const void* dout, const void* out, AttentionDtype dtype,
                                  std::int64_t rows, int head_dim, cudaStream_t stream);

// dk, dv (complete) and dq (added into dq_accum). Needs stats and delta.
void triangle_attention_bwd_dqkv_sm90(const TriangleAttentionBwdArgs& args, cudaStream_t stream);

// dbias_partial[s] = sum over the rows i of split s of dS. Needs stats and delta.
void triangle_attention_bwd_dbias_sm90(const TriangleAttentionBwdArgs& args, cudaStream_t stream);

// How many row splits the dbias kernel uses for this problem on a GPU with
// `num_sms` multiprocessors (1 <= splits <= min(rows, 16)); the caller sizes
// dbias_partial with it and sums the splits.
int triangle_attention_dbias_splits(const TriangleAttentionProblem& p, int num_sms);

}  // namespace genie_tk
