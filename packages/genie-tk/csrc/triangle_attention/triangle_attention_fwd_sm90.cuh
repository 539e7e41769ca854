// Triangle attention forward for Hopper (ThunderKittens, sm_90a).
//
// One CTA = one head h, `rows_per_cta` consecutive rows i of one batch b, and
// `query_blocks` blocks of 64 query rows j. Consumer warpgroup (ci, cj) owns
// the 64 queries of block cj in row i0 + ci and runs flash attention over the
// key tiles with an fp32 online softmax; one producer warpgroup streams, per
// key tile and through a ring of `stages` buffers,
//   K, V and the key (mask) biases of every row ci,
//   the 64 x 64 triangle-bias tile of every query block cj,
// with TMA (see `pipeline` in triangle_attention_common_sm90.cuh).
//
// Why this split: per score element a consumer reads 4D/64 bytes of K/V and
// 2 bytes of triangle bias from L2 (the bias is shared by all rows i but each
// row needs all of it), about 3 bytes at D = 32: more than the exp2 work costs
// at L2 bandwidth. Consumers of different rows i share each bias tile and
// consumers of different query blocks share each K/V tile, so the 2 x 2 grid
// (D <= 32) needs about 2 bytes per score. The triangle bias stays in bf16/fp16
// registers and is widened in the score FMAs; the four consumers fit the 96
// registers per thread that 640 threads leave (no spills, -Xptxas -v). Head
// dims 16/32 make the wgmma K dimension short (one or two k-steps), so the
// exp2 and the bias/mask FMAs, not the tensor cores, bound the arithmetic; the
// producer/consumer split keeps TMA latency off that path.
//
// Outputs: o through shared memory and a TMA store (rows >= N dropped by TMA),
// and the softmax statistics (row max and log2 row sum of the base-2 logits)
// with guarded stores.
#pragma once

#include "triangle_attention/triangle_attention_common_sm90.cuh"
#include "triangle_attention/triangle_attention_launch.h"

namespace genie_tk {
namespace triangle_attention_sm90 {

template <int D>
struct fwd_config {
    // A 2 x 2 grid of consumers (two rows i sharing each bias tile, two query
    // blocks sharing each K/V tile) halves both kinds of L2 traffic per score
    // against one consumer; at D = 64 the O accumulator leaves no registers for
    // four consumers, so two rows only.
    static constexpr int rows_per_cta = 2;
    static constexpr int query_blocks = D <= 32 ? 2 : 1;
    static constexpr int consumers = rows_per_cta * query_blocks;
    static constexpr int stages = 3;
    static constexpr int threads = (consumers + 1) * WARPGROUP_THREADS;
    // setmaxnreg budget: 128 * (24 + consumers * consumer_registers) <= 65536.
    static constexpr int producer_registers = 24;
    static constexpr int consumer_registers = consumers == 4 ? 112 : 240;
    static constexpr RegisterBudget budget{threads, 1, producer_registers, consumers, consumer_registers};
};

template <typename T, int D>
struct fwd_globals {
    using tl = tiles<T, D>;
    typename tl::rows_gl q, k, v, o;  // (B, I*H, N, D)
    typename tl::bias_gl bias;        // (B, H, N, Np)
    typename tl::key_gl key_bias;     // (1, B, I, Np)
    float* stats;                     // [B, I, H, N, 2]
    int rows, heads, n;
    int row_groups;     // ceil(I / rows_per_cta)
    int query_supers;   // ceil(ceil(N / 64) / query_blocks)
    float scale_log2;   // scale * log2(e)

    static constexpr std::size_t dynamic_shared_memory() {
        using C = fwd_config<D>;
        return smem_bytes<sizeof(typename tl::rows_tile) * C::consumers,
                          sizeof(typename tl::rows_tile) * C::stages * C::rows_per_cta,
                          sizeof(typename tl::rows_tile) * C::stages * C::rows_per_cta,
                          sizeof(typename tl::score_tile) * C::stages * C::query_blocks,
                          sizeof(typename tl::key_vec) * C::stages * C::rows_per_cta>();
    }
};

template <typename T, int D>
__global__ __launch_bounds__(fwd_config<D>::threads, 1) void fwd_kernel(const __grid_constant__ fwd_globals<T, D> g) {
    using C = fwd_config<D>;
    using tl = tiles<T, D>;
    using rows_tile = typename tl::rows_tile;
    using score_tile = typename tl::score_tile;
    using key_vec = typename tl::key_vec;

    extern __shared__ alignment_dummy shared_memory[];
    tma_swizzle_allocator al(reinterpret_cast<int*>(&shared_memory[0]));
    // Allocation order and sizes must match fwd_globals::dynamic_shared_memory.
    rows_tile(&q_s)[C::consumers] = al.allocate<rows_tile, C::consumers>();
    rows_tile(&k_s)[C::stages][C::rows_per_cta] = al.allocate<rows_tile, C::stages, C::rows_per_cta>();
    rows_tile(&v_s)[C::stages][C::rows_per_cta] = al.allocate<rows_tile, C::stages, C::rows_per_cta>();
    score_tile(&bias_s)[C::stages][C::query_blocks] = al.allocate<score_tile, C::stages, C::query_blocks>();
    key_vec(&key_s)[C::stages][C::rows_per_cta] = al.allocate<key_vec, C::stages, C::rows_per_cta>();

    __shared__ semaphore q_ready;
    __shared__ pipeline<C::stages> pipe;

    // Query superblock fastest: CTAs that run together share K/V of one (i, h).
    int tile = blockIdx.x;
    const int query_super = tile % g.query_supers;
    tile /= g.query_supers;
    const int h = tile % g.heads;
    tile /= g.heads;
    const int row_group = tile % g.row_groups;
    const int b = tile / g.row_groups;
    const int i0 = row_group * C::rows_per_cta;
    const int jb0 = query_super * C::query_blocks;
    const int key_tiles = ceil_div(g.n, kBlock);

    if (threadIdx.x == 0) {
        init_semaphore(q_ready, 0, 1);
        pipe.init(C::consumers * WARPGROUP_WARPS);
        tma::expect_bytes(q_ready, sizeof(q_s));
        for (int ci = 0; ci < C::rows_per_cta; ++ci) {
            for (int cj = 0; cj < C::query_blocks; ++cj) {
                tma::load_async(q_s[ci * C::query_blocks + cj], g.q,
                                coord<rows_tile>{b, (i0 + ci) * g.heads + h, jb0 + cj, 0}, q_ready);
            }
        }
    }
    __syncthreads();

    const int wg = warpgroup::groupid();
    if (wg == C::consumers) {  // producer
        warpgroup::decrease_registers<C::producer_registers>();
        if (warpgroup::laneid() == 0) {
            constexpr uint32_t stage_bytes =
                C::rows_per_cta * (2 * sizeof(rows_tile) + sizeof(key_vec)) + C::query_blocks * sizeof(score_tile);
            for (int kt = 0; kt < key_tiles; ++kt) {
                const int s = pipe.acquire(kt, stage_bytes);
                for (int ci = 0; ci < C::rows_per_cta; ++ci) {
                    const coord<rows_tile> kv{b, (i0 + ci) * g.heads + h, kt, 0};
                    tma::load_async(k_s[s][ci], g.k, kv, pipe.ready[s]);
                    tma::load_async(v_s[s][ci], g.v, kv, pipe.ready[s]);
                    tma::load_async(key_s[s][ci], g.key_bias, coord<key_vec>{0, b, i0 + ci, kt}, pipe.ready[s]);
                }
                for (int cj = 0; cj < C::query_blocks; ++cj) {
                    tma::load_async(bias_s[s][cj], g.bias, coord<score_tile>{b, h, jb0 + cj, kt}, pipe.ready[s]);
                }
            }
        }
        return;
    }

    warpgroup::increase_registers<C::consumer_registers>();
    const int ci = wg / C::query_blocks;
    const int cj = wg % C::query_blocks;

    typename tl::rows_acc o;
    typename tl::row_vec row_max, row_max_prev, row_sum, rescale;
    warp::zero(o);
    warp::neg_infty(row_max);
    warp::zero(row_sum);

    GENIE_TK_WAIT(q_ready, 0, "fwd.q_ready", 0);
    for (int kt = 0; kt < key_tiles; ++kt) {
        const int s = pipe.wait_ready(kt);

        typename tl::scores att;
        typename tl::scores_mma bias;  // kept in bf16/fp16 (half the registers), widened in biased_scores
        warpgroup::mm_ABt(att, q_s[wg], k_s[s][ci]);
        warpgroup::load(bias, bias_s[s][cj]);  // while the MMA runs
        warpgroup::mma_async_wait();
        biased_scores(att, bias, key_s[s][ci], g.scale_log2, kt * kBlock, g.n);

        // Online softmax in base 2. The first tile always holds key 0 < N, so
        // the running max is finite after it and rescale = exp2(-inf) = 0 there.
        warp::copy(row_max_prev, row_max);
        warp::row_max(row_max, att, row_max);
        warp::sub(rescale, row_max_prev, row_max);
        rescale[0][0].x = fast_exp2(rescale[0][0].x);
        rescale[0][0].y = fast_exp2(rescale[0][0].y);
        const float top_max = row_max[0][0].x, bottom_max = row_max[0][0].y;
#pragma unroll
        for (int t = 0; t < tl::scores::width; ++t) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float m = (k % 2) ? bottom_max : top_max;
                float2& x = att.tiles[0][t].data[k];
                x.x = fast_exp2(x.x - m);
                x.y = fast_exp2(x.y - m);
            }
        }
        warp::mul(row_sum, row_sum, rescale);
        warp::row_sum(row_sum, att, row_sum);
        warp::mul_row(o, o, rescale);

        typename tl::scores_mma p;
        warp::copy(p, att);
        warpgroup::mma_AB(o, p, v_s[s][ci]);
        warpgroup::mma_async_wait();
        pipe.release(s);
    }

    warp::div_row(o, o, row_sum);

    // o: registers -> shared memory (the consumer's Q tile is free now) -> TMA.
    rows_tile& o_s = q_s[wg];
    warpgroup::store(o_s, o);
    fence_async_shared();
    warpgroup::sync(1 + wg);
    const int i = i0 + ci;
    const int jb = jb0 + cj;
    if (warpgroup::laneid() == 0) {
        tma::store_async(g.o, o_s, coord<rows_tile>{b, i * g.heads + h, jb, 0});
        tma::store_async_wait();
    }

    // Statistics: each row's value sits in the four lanes of a quad; lane 0 of
    // the quad writes it.
    if (i < g.rows && laneid() % 4 == 0) {
        const std::int64_t slice = ((static_cast<std::int64_t>(b) * g.rows + i) * g.heads + h) * g.n;
        const int row0 = jb * kBlock + warpgroup::warpid() * 16 + laneid() / 4;
        float2* out = reinterpret_cast<float2*>(g.stats) + slice;
        if (row0 < g.n) out[row0] = float2{row_max[0][0].x, __log2f(row_sum[0][0].x)};
        if (row0 + 8 < g.n) out[row0 + 8] = float2{row_max[0][0].y, __log2f(row_sum[0][0].y)};
    }
}

template <AttentionDtype DT, int D>
void launch_fwd(const TriangleAttentionFwdArgs& a, cudaStream_t stream) {
    using T = typename element<DT>::type;
    using G = fwd_globals<T, D>;
    const TriangleAttentionProblem& p = a.p;
    const int query_supers = ceil_div(ceil_div(p.n, kBlock), fwd_config<D>::query_blocks);
    const int row_groups = ceil_div(p.rows, fwd_config<D>::rows_per_cta);
    const G g{
        rows_layout<T, D>(p, a.q),
        rows_layout<T, D>(p, a.k),
        rows_layout<T, D>(p, a.v),
        rows_layout<T, D>(p, a.o),
        bias_layout<T, D>(p, a.bias),
        key_layout<T, D>(p, a.key_bias),
        a.stats,
        p.rows,
        p.heads,
        p.n,
        row_groups,
        query_supers,
        p.scale * kLog2e,
    };
    static_assert(G::dynamic_shared_memory() <= kMaxDynamicSharedMemory);
    const long long ctas = static_cast<long long>(p.batch) * row_groups * p.heads * query_supers;
    launch(fwd_kernel<T, D>, g, dim3(grid_size(ctas)), fwd_config<D>::budget, G::dynamic_shared_memory(), stream,
           "the triangle attention forward kernel");
}

}  // namespace triangle_attention_sm90

template <AttentionDtype DT, int D>
void launch_triangle_attention_fwd(const TriangleAttentionFwdArgs& args, cudaStream_t stream) {
    triangle_attention_sm90::launch_fwd<DT, D>(args, stream);
}

}  // namespace genie_tk
