// Device code shared by the triangle attention kernels (ThunderKittens, sm_90a).
//
// Every kernel works on 64 x 64 score tiles: a consumer warpgroup owns 64
// query rows j (16 per warp) of one row i and one head h, and a key tile holds
// 64 keys k. Scores are kept in base 2:
//   s2[j, k] = log2(e) * (scale * q_j.k_k + mask_bias[k]) + log2(e) * bias[j, k]
// computed as fma(bias, log2e, fma(qk, scale*log2e, key_bias2)) with
// key_bias2 = log2(e) * mask_bias precomputed by the host glue, so the mask
// bias enters before the triangle bias (OpenFold's order). Keys >= N are set to
// -inf here, explicitly; query rows >= N and rows i >= I come in as zeros from
// TMA's bounds checking and their stores are dropped by TMA or guarded.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/cuda_utils.h"
#include "common/debug_wait.cuh"
#include "common/kernel_setup.h"
#include "kittens.cuh"
#include "triangle_attention/triangle_attention.h"

namespace genie_tk {
namespace triangle_attention_sm90 {

using namespace kittens;

inline constexpr int kBlock = kTriangleAttentionBlock;  // rows per tile (queries or keys)
inline constexpr float kLog2e = 1.4426950408889634f;
// Hopper: 227 KB of shared memory per block, less the kernels' static 128 bytes of semaphores.
inline constexpr std::size_t kMaxDynamicSharedMemory = 227 * 1024 - 128;

template <AttentionDtype DT> struct element;
template <> struct element<AttentionDtype::kBFloat16> { using type = bf16; };
template <> struct element<AttentionDtype::kFloat16> { using type = half; };

// Tile and layout types for element type T and head dim D. Global layouts are
// 4-D views of the 5-D tensors: q/k/v/o as (B, I*H, N, D) so that a row index
// i >= I falls outside the depth axis and TMA zero-fills its loads and drops
// its stores; bias as (B, H, N, Np); key_bias as (1, B, I, Np).
template <typename T, int D>
struct tiles {
    static_assert(D == 16 || D == 32 || D == 64, "head dims 16, 32, 64");
    using rows_tile = st<T, kBlock, D>;           // 64 queries or keys x D (q, k, v, o, dout, dk, dv)
    using score_tile = st<T, kBlock, kBlock>;     // 64 x 64 (bias, P, dS)
    using accum_tile = st<float, kBlock, D>;      // 64 x D fp32 (dq partial sums)
    using key_vec = sv<float, kBlock>;            // 64 key biases
    using scores = rt<float, 16, kBlock>;         // one warp's 16 rows x 64 keys
    using scores_mma = rt<T, 16, kBlock>;         // the same as an MMA operand
    using rows_acc = rt<float, 16, D>;            // one warp's 16 rows x D
    using row_vec = typename scores::col_vec;     // one value per row of `scores`

    using rows_gl = gl<T, -1, -1, -1, -1, rows_tile>;
    using bias_gl = gl<T, -1, -1, -1, -1, score_tile>;
    using key_gl = gl<float, 1, -1, -1, -1, key_vec>;
    using accum_gl = gl<float, -1, -1, -1, -1, accum_tile>;
};

// Ceiling division for tile counts.
__host__ __device__ inline constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Bytes of dynamic shared memory for allocations of `sizes` by
// tma_swizzle_allocator, which aligns every allocation to 1024 bytes; the
// leading 1024 covers the alignment of the dynamic segment itself.
template <std::size_t... sizes>
inline constexpr std::size_t smem_bytes() {
    return 1024 + (((sizes + 1023) / 1024 * 1024) + ... + 0);
}

// 2^x on the special function unit; results below 2^-126 flush to zero, which
// a softmax weight that small may (exp2f without --use_fast_math would spend
// three more instructions per element on denormals).
__device__ inline float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Shared memory written with ordinary stores and read next by wgmma or TMA:
// each writing thread fences before the barrier that publishes the writes.
__device__ inline void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// The ring of `Stages` shared-memory buffers between the producer and the
// consumers: ready[s] completes when the producer's TMA loads into
// buffer s have landed (one expect-tx arrival), free[s] when every
// consumer warp has released it. Step t uses buffer t % Stages in its
// (t / Stages)-th round; a phase's parity is the round's.
template <int Stages>
struct pipeline {
    semaphore ready[Stages];
    semaphore free[Stages];

    // Thread 0, before the CTA-wide barrier.
    __device__ inline void init(int consumer_warps) {
        for (int s = 0; s < Stages; ++s) {
            init_semaphore(ready[s], 0, 1);
            init_semaphore(free[s], consumer_warps, 0);
        }
    }
    // Producer: waits until buffer step % Stages is free (from the second
    // round on), announces `bytes` of TMA loads on it; returns the buffer.
    __device__ inline int acquire(int step, uint32_t bytes) {
        const int s = step % Stages;
        if (step >= Stages) GENIE_TK_WAIT(free[s], ((step / Stages) - 1) & 1, "pipeline.free", step);
        tma::expect_bytes(ready[s], bytes);
        return s;
    }
    // Consumers: waits until the loads of `step` have landed; returns the buffer.
    __device__ inline int wait_ready(int step) {
        const int s = step % Stages;
        GENIE_TK_WAIT(ready[s], (step / Stages) & 1, "pipeline.ready", step);
        return s;
    }
    // Consumer warp: done with the buffer of `step` (its MMAs on it waited,
    // the values it loaded from it used). __syncwarp orders the other lanes'
    // shared-memory reads before lane 0's release-arrive.
    __device__ inline void release(int s) {
        __syncwarp();
        warp::arrive(free[s]);
    }
};

// Position of element (tile t, slot k, half h) of a warp's 16 x 64 register
// tile (ThunderKittens' row layout): row within the warp's 16, column 0..63.
__device__ inline int tile_row(int k) { return (k % 2) * 8 + laneid() / 4; }
__device__ inline int tile_col(int t, int k) { return t * 16 + (k / 2) * 8 + (laneid() % 4) * 2; }

// s <- base-2 logits (see the top of this file) of the key tile that starts at
// key `key0`. On entry `s` holds q.k from the MMA; `bias` is the warp's
// 16 x 64 slice of the triangle bias (fp32, or bf16/fp16 widened here) and
// `key_bias` the tile's 64 base-2 mask biases.
template <typename Scores, typename Bias>
__device__ inline void biased_scores(Scores& s, const Bias& bias, const sv<float, kBlock>& key_bias,
                                     float scale_log2, int key0, int n) {
    static_assert(Scores::height == 1 && Scores::width == kBlock / 16);
    static_assert(Bias::height == 1 && Bias::width == Scores::width);
#pragma unroll
    for (int t = 0; t < Scores::width; ++t) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float2 kb = *reinterpret_cast<const float2*>(&key_bias.data[tile_col(t, k)]);
            const float2 b = base_types::convertor<float2, typename Bias::dtype>::convert(bias.tiles[0][t].data[k]);
            float2& x = s.tiles[0][t].data[k];
            x.x = fmaf(b.x, kLog2e, fmaf(x.x, scale_log2, kb.x));
            x.y = fmaf(b.y, kLog2e, fmaf(x.y, scale_log2, kb.y));
        }
    }
    if (key0 + kBlock > n) {  // the tile reaches past the last key: exclude those keys
#pragma unroll
        for (int t = 0; t < Scores::width; ++t) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int key = key0 + tile_col(t, k);
                float2& x = s.tiles[0][t].data[k];
                if (key >= n) x.x = -INFINITY;
                if (key + 1 >= n) x.y = -INFINITY;
            }
        }
    }
}

// Softmax statistics of a warp's two query rows (top: row lane/4, bottom:
// row lane/4 + 8) as the backward kernels need them.
struct row_stats {
    float max[2];     // row max of s2; +inf for rows >= N so that P = 0 there
    float log_sum[2]; // log2 of the row sum of exp2(s2 - max)
    float delta[2];   // sum_d dout * o
};

// Loads the statistics of query rows row0 + {lane/4, lane/4 + 8} of the
// (b, i, h) slice that starts at element `slice` of stats/delta.
__device__ inline row_stats load_row_stats(const float* __restrict__ stats, const float* __restrict__ delta,
                                           std::int64_t slice, int row0, int n) {
    row_stats r;
#pragma unroll
    for (int half_row = 0; half_row < 2; ++half_row) {
        const int row = row0 + half_row * 8 + laneid() / 4;
        if (row < n) {
            const float2 st = __ldg(reinterpret_cast<const float2*>(stats) + slice + row);
            r.max[half_row] = st.x;
            r.log_sum[half_row] = st.y;
            r.delta[half_row] = __ldg(delta + slice + row);
        } else {
            r.max[half_row] = INFINITY;
            r.log_sum[half_row] = 0.f;
            r.delta[half_row] = 0.f;
        }
    }
    return r;
}

// From base-2 logits `s` and dP = dout.v^T in `dp`: s <- P = exp2(s - max -
// log_sum) (the softmax weights, exact for fully masked rows because s - max
// is formed first) and dp <- dS = P * (dP - delta), the gradient of the
// natural-unit logits.
template <typename Scores>
__device__ inline void probabilities_and_dscores(Scores& s, Scores& dp, const row_stats& r) {
#pragma unroll
    for (int t = 0; t < Scores::width; ++t) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int h = k % 2;
            float2& x = s.tiles[0][t].data[k];
            float2& g = dp.tiles[0][t].data[k];
            x.x = fast_exp2((x.x - r.max[h]) - r.log_sum[h]);
            x.y = fast_exp2((x.y - r.max[h]) - r.log_sum[h]);
            g.x = x.x * (g.x - r.delta[h]);
            g.y = x.y * (g.y - r.delta[h]);
        }
    }
}

// Global layouts of the tensors in triangle_attention.h for problem p.
template <typename T, int D>
typename tiles<T, D>::rows_gl rows_layout(const TriangleAttentionProblem& p, const void* ptr) {
    return typename tiles<T, D>::rows_gl{static_cast<T*>(const_cast<void*>(ptr)), static_cast<std::size_t>(p.batch),
                                         static_cast<std::size_t>(p.rows) * p.heads, static_cast<std::size_t>(p.n),
                                         static_cast<std::size_t>(D)};
}

template <typename T, int D>
typename tiles<T, D>::bias_gl bias_layout(const TriangleAttentionProblem& p, const void* ptr) {
    return typename tiles<T, D>::bias_gl{static_cast<T*>(const_cast<void*>(ptr)), static_cast<std::size_t>(p.batch),
                                         static_cast<std::size_t>(p.heads), static_cast<std::size_t>(p.n),
                                         static_cast<std::size_t>(triangle_attention_padded_keys(p.n))};
}

template <typename T, int D>
typename tiles<T, D>::key_gl key_layout(const TriangleAttentionProblem& p, const float* ptr) {
    return typename tiles<T, D>::key_gl{const_cast<float*>(ptr), nullptr, static_cast<std::size_t>(p.batch),
                                        static_cast<std::size_t>(p.rows),
                                        static_cast<std::size_t>(triangle_attention_padded_keys(p.n))};
}

inline unsigned grid_size(long long ctas) {
    if (ctas > 0x7fffffffLL) throw std::invalid_argument("genie_tk: triangle attention problem too large for one grid");
    return static_cast<unsigned>(ctas);
}

// Prepares the kernel at its first launch on this device (shared memory
// opt-in, setmaxnreg budget against the registers it is given: kernel_setup.h),
// launches it on `stream` and reports a launch error naming `what`.
template <typename Kernel, typename Globals>
void launch(Kernel kernel, const Globals& g, dim3 grid, const RegisterBudget& budget, std::size_t bytes,
            cudaStream_t stream, const char* what) {
    prepare_kernel(kernel, what, bytes, &budget);
    kernel<<<grid, budget.threads, bytes, stream>>>(g);
    cuda_check(cudaGetLastError(), what);
}

}  // namespace triangle_attention_sm90
}  // namespace genie_tk
