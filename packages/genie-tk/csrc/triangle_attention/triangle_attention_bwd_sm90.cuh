// Triangle attention backward for Hopper (ThunderKittens, sm_90a).
//
// The three gradients reduce over different axes of the (i, j, k) cube of one
// (b, h): dq over keys k, dk and dv over queries j, dbias over rows i. No tiling
// keeps all three in registers, so the backward is two kernels, each of which
// recomputes the scores from q, k, the biases and the forward's statistics:
//
// * dqkv_kernel (flash-attention-2 style, key-stationary): one CTA owns row i,
//   head h and two 64-key blocks (one per consumer warpgroup, K and V resident
//   in shared memory) and loops over all query blocks j. dk and dv accumulate
//   in registers and are complete at the end. dq for the query block is the sum
//   over the two consumers of dS K, formed by consumer 0 from both dS tiles in
//   shared memory and added into an fp32 buffer with a TMA bulk reduction
//   (cp.reduce.async.bulk .add), ceil(N/128) additions per dq element.
// * dbias_kernel (row-innermost): one CTA owns head h, `kDbiasQueryBlocks` x
//   `kDbiasKeyBlocks` 64 x 64 tiles of dbias and loops over rows i, recomputing
//   S = q k^T and dP = dout v^T and summing dS in fp32 registers. The triangle
//   bias tile is loaded once. No atomics and no N^3 buffer: each dbias element
//   is owned by one CTA per row split; when one CTA per tile would not fill the
//   GPU (small N) the rows are split in S <= 16 ranges written to an fp32
//   [S, B, H, N, Np] buffer that the caller sums: O(S N^2 H) memory.
// The price is a second exp2 pass and two more MMAs per score (S, dP) in the
// dbias kernel; the alternative, adding dS of every row into dbias with
// atomics, moves 4 bytes per score element through L2 (17 GB at N = 1024, H = 4)
// and is far slower.
//
// Both kernels: one producer warpgroup streams the per-step tiles with TMA
// through `stages` buffers (`pipeline`, triangle_attention_common_sm90.cuh), two consumer
// warpgroups compute. Per-row statistics (max, log2 sum, delta) are read by
// the consumers with plain loads, issued before the MMA wait.
#pragma once

#include "triangle_attention/triangle_attention_common_sm90.cuh"
#include "triangle_attention/triangle_attention_launch.h"

namespace genie_tk {
namespace triangle_attention_sm90 {

// ------------------------------------------------------------------ dq, dk, dv

struct dqkv_config {
    static constexpr int key_blocks = 2;  // consumers, one 64-key block each
    static constexpr int consumers = key_blocks;
    static constexpr int stages = 2;
    static constexpr int threads = (consumers + 1) * WARPGROUP_THREADS;
    static constexpr int producer_registers = 24;
    static constexpr int consumer_registers = 240;
    static constexpr RegisterBudget budget{threads, 1, producer_registers, consumers, consumer_registers};
    // Named barriers (0 is __syncthreads): both consumers; consumer 0 alone.
    static constexpr int consumers_barrier = 1;
    static constexpr int dq_barrier = 2;
};

template <typename T, int D>
struct dqkv_globals {
    using tl = tiles<T, D>;
    typename tl::rows_gl q, k, v, dout, dk, dv;  // (B, I*H, N, D)
    typename tl::accum_gl dq;                    // (B, I*H, N, D) fp32, added into
    typename tl::bias_gl bias;                   // (B, H, N, Np)
    typename tl::key_gl key_bias;                // (1, B, I, Np)
    const float* stats;                          // [B, I, H, N, 2]
    const float* delta;                          // [B, I, H, N]
    int rows, heads, n;
    int key_supers;    // ceil(ceil(N / 64) / key_blocks)
    float scale_log2;  // scale * log2(e)
    float scale;

    static constexpr std::size_t dynamic_shared_memory() {
        using C = dqkv_config;
        return smem_bytes<sizeof(typename tl::rows_tile) * C::consumers,                // k
                          sizeof(typename tl::rows_tile) * C::consumers,                // v
                          sizeof(typename tl::key_vec) * C::consumers,                  // key bias
                          sizeof(typename tl::rows_tile) * C::stages,                   // q
                          sizeof(typename tl::rows_tile) * C::stages,                   // dout
                          sizeof(typename tl::score_tile) * C::stages * C::consumers,   // bias
                          sizeof(typename tl::score_tile) * 2 * C::consumers,           // P (double buffered)
                          sizeof(typename tl::score_tile) * 2 * C::consumers,           // dS (double buffered)
                          sizeof(typename tl::accum_tile)>();                           // dq
    }
};

template <typename T, int D>
__global__ __launch_bounds__(dqkv_config::threads, 1) void dqkv_kernel(const __grid_constant__ dqkv_globals<T, D> g) {
    using C = dqkv_config;
    using tl = tiles<T, D>;
    using rows_tile = typename tl::rows_tile;
    using score_tile = typename tl::score_tile;
    using accum_tile = typename tl::accum_tile;
    using key_vec = typename tl::key_vec;

    extern __shared__ alignment_dummy shared_memory[];
    tma_swizzle_allocator al(reinterpret_cast<int*>(&shared_memory[0]));
    // Allocation order and sizes must match dqkv_globals::dynamic_shared_memory.
    rows_tile(&k_s)[C::consumers] = al.allocate<rows_tile, C::consumers>();
    rows_tile(&v_s)[C::consumers] = al.allocate<rows_tile, C::consumers>();
    key_vec(&key_s)[C::consumers] = al.allocate<key_vec, C::consumers>();
    rows_tile(&q_s)[C::stages] = al.allocate<rows_tile, C::stages>();
    rows_tile(&do_s)[C::stages] = al.allocate<rows_tile, C::stages>();
    score_tile(&bias_s)[C::stages][C::consumers] = al.allocate<score_tile, C::stages, C::consumers>();
    score_tile(&p_s)[2][C::consumers] = al.allocate<score_tile, 2, C::consumers>();
    score_tile(&ds_s)[2][C::consumers] = al.allocate<score_tile, 2, C::consumers>();
    accum_tile& dq_s = al.allocate<accum_tile>();

    __shared__ semaphore kv_ready;
    __shared__ pipeline<C::stages> pipe;

    int tile = blockIdx.x;
    const int key_super = tile % g.key_supers;
    tile /= g.key_supers;
    const int h = tile % g.heads;
    tile /= g.heads;
    const int i = tile % g.rows;
    const int b = tile / g.rows;
    const int depth = i * g.heads + h;
    const int kb0 = key_super * C::key_blocks;
    const int query_tiles = ceil_div(g.n, kBlock);

    if (threadIdx.x == 0) {
        init_semaphore(kv_ready, 0, 1);
        pipe.init(C::consumers * WARPGROUP_WARPS);
        tma::expect_bytes(kv_ready, sizeof(k_s) + sizeof(v_s) + sizeof(key_s));
        for (int w = 0; w < C::consumers; ++w) {
            const coord<rows_tile> kv{b, depth, kb0 + w, 0};
            tma::load_async(k_s[w], g.k, kv, kv_ready);
            tma::load_async(v_s[w], g.v, kv, kv_ready);
            tma::load_async(key_s[w], g.key_bias, coord<key_vec>{0, b, i, kb0 + w}, kv_ready);
        }
    }
    __syncthreads();

    const int wg = warpgroup::groupid();
    if (wg == C::consumers) {  // producer
        warpgroup::decrease_registers<C::producer_registers>();
        if (warpgroup::laneid() == 0) {
            constexpr uint32_t stage_bytes = 2 * sizeof(rows_tile) + C::consumers * sizeof(score_tile);
            for (int qt = 0; qt < query_tiles; ++qt) {
                const int s = pipe.acquire(qt, stage_bytes);
                const coord<rows_tile> rows{b, depth, qt, 0};
                tma::load_async(q_s[s], g.q, rows, pipe.ready[s]);
                tma::load_async(do_s[s], g.dout, rows, pipe.ready[s]);
                for (int w = 0; w < C::consumers; ++w) {
                    tma::load_async(bias_s[s][w], g.bias, coord<score_tile>{b, h, qt, kb0 + w}, pipe.ready[s]);
                }
            }
        }
        return;
    }

    warpgroup::increase_registers<C::consumer_registers>();
    const int kb = kb0 + wg;
    const std::int64_t slice = ((static_cast<std::int64_t>(b) * g.rows + i) * g.heads + h) * g.n;

    typename tl::rows_acc dk, dv;
    warp::zero(dk);
    warp::zero(dv);

    GENIE_TK_WAIT(kv_ready, 0, "dqkv.kv_ready", 0);
    for (int qt = 0; qt < query_tiles; ++qt) {
        const int buf = qt % 2;
        const row_stats stats = load_row_stats(g.stats, g.delta, slice, qt * kBlock + warpgroup::warpid() * 16, g.n);
        const int s = pipe.wait_ready(qt);

        typename tl::scores att, dp, bias;
        warpgroup::mm_ABt(att, q_s[s], k_s[wg]);
        warpgroup::mm_ABt(dp, do_s[s], v_s[wg]);
        warpgroup::load(bias, bias_s[s][wg]);
        warpgroup::mma_async_wait();
        biased_scores(att, bias, key_s[wg], g.scale_log2, kb * kBlock, g.n);
        probabilities_and_dscores(att, dp, stats);

        // P and dS to shared memory for the transposed products. Buffers
        // alternate by step: the barrier below (reached by every warp only
        // after its MMAs of the previous step completed) is what frees the
        // buffer written two steps ago.
        warpgroup::store(p_s[buf][wg], att);
        warpgroup::store(ds_s[buf][wg], dp);
        fence_async_shared();
        group<2 * WARPGROUP_WARPS>::sync(C::consumers_barrier);

        warpgroup::mma_AtB(dv, p_s[buf][wg], do_s[s]);    // dv += P^T dout
        warpgroup::mma_AtB(dk, ds_s[buf][wg], q_s[s]);    // dk += dS^T q (scaled at the end)
        typename tl::rows_acc dq;
        if (wg == 0) {  // dq of this query block over both key blocks: dS_0 k_0 + dS_1 k_1
            warpgroup::mm_AB(dq, ds_s[buf][0], k_s[0]);
            warpgroup::mma_AB(dq, ds_s[buf][1], k_s[1]);
        }
        warpgroup::mma_async_wait();
        pipe.release(s);

        if (wg == 0) {
            warp::mul(dq, dq, g.scale);
            if (warpgroup::laneid() == 0) tma::store_async_read_wait();  // the previous add has read dq_s
            warpgroup::sync(C::dq_barrier);
            warpgroup::store(dq_s, dq);
            fence_async_shared();
            warpgroup::sync(C::dq_barrier);
            if (warpgroup::laneid() == 0) tma::store_add_async(g.dq, dq_s, coord<accum_tile>{b, depth, qt, 0});
        }
    }

    // dk, dv: registers -> the consumer's own K/V tiles -> TMA (rows >= N
    // dropped). Consumer 0 reads both K tiles for dq until its last MMA: wait
    // for it before K is overwritten.
    group<2 * WARPGROUP_WARPS>::sync(C::consumers_barrier);
    warp::mul(dk, dk, g.scale);
    warpgroup::store(k_s[wg], dk);
    warpgroup::store(v_s[wg], dv);
    fence_async_shared();
    warpgroup::sync(3 + wg);
    if (warpgroup::laneid() == 0) {
        const coord<rows_tile> kv{b, depth, kb, 0};
        tma::store_async(g.dk, k_s[wg], kv);
        tma::store_async(g.dv, v_s[wg], kv);
        tma::store_async_wait();  // also the dq additions of consumer 0
    }
}

// ------------------------------------------------------------------ dbias

struct dbias_config {
    static constexpr int query_blocks = kDbiasQueryBlocks;  // consumers sharing each K/V tile
    static constexpr int key_blocks = kDbiasKeyBlocks;      // consumers sharing each q/dout tile
    static constexpr int consumers = query_blocks * key_blocks;
    static constexpr int stages = 3;
    static constexpr int threads = (consumers + 1) * WARPGROUP_THREADS;
    // Two consumers: S, dP and the dbias accumulator (3 x 32 fp32 registers)
    // spill with the 96 registers per thread of four (checked with -Xptxas -v).
    static constexpr int producer_registers = 24;
    static constexpr int consumer_registers = 240;
    static constexpr RegisterBudget budget{threads, 1, producer_registers, consumers, consumer_registers};
};

template <typename T, int D>
struct dbias_globals {
    using tl = tiles<T, D>;
    typename tl::rows_gl q, k, v, dout;  // (B, I*H, N, D)
    typename tl::bias_gl bias;           // (B, H, N, Np)
    typename tl::key_gl key_bias;        // (1, B, I, Np)
    const float* stats;                  // [B, I, H, N, 2]
    const float* delta;                  // [B, I, H, N]
    float* dbias_partial;                // [S, B, H, N, Np]
    int batch, rows, heads, n, n_padded;
    int query_supers, key_supers;
    int rows_per_split;
    float scale_log2;

    static constexpr std::size_t dynamic_shared_memory() {
        using C = dbias_config;
        return smem_bytes<sizeof(typename tl::score_tile) * C::consumers,                 // bias
                          sizeof(typename tl::rows_tile) * C::stages * C::query_blocks,   // q
                          sizeof(typename tl::rows_tile) * C::stages * C::query_blocks,   // dout
                          sizeof(typename tl::rows_tile) * C::stages * C::key_blocks,     // k
                          sizeof(typename tl::rows_tile) * C::stages * C::key_blocks,     // v
                          sizeof(typename tl::key_vec) * C::stages * C::key_blocks>();    // key bias
    }
};

template <typename T, int D>
__global__ __launch_bounds__(dbias_config::threads, 1) void dbias_kernel(const __grid_constant__ dbias_globals<T, D> g) {
    using C = dbias_config;
    using tl = tiles<T, D>;
    using rows_tile = typename tl::rows_tile;
    using score_tile = typename tl::score_tile;
    using key_vec = typename tl::key_vec;

    extern __shared__ alignment_dummy shared_memory[];
    tma_swizzle_allocator al(reinterpret_cast<int*>(&shared_memory[0]));
    // Allocation order and sizes must match dbias_globals::dynamic_shared_memory.
    score_tile(&bias_s)[C::consumers] = al.allocate<score_tile, C::consumers>();
    rows_tile(&q_s)[C::stages][C::query_blocks] = al.allocate<rows_tile, C::stages, C::query_blocks>();
    rows_tile(&do_s)[C::stages][C::query_blocks] = al.allocate<rows_tile, C::stages, C::query_blocks>();
    rows_tile(&k_s)[C::stages][C::key_blocks] = al.allocate<rows_tile, C::stages, C::key_blocks>();
    rows_tile(&v_s)[C::stages][C::key_blocks] = al.allocate<rows_tile, C::stages, C::key_blocks>();
    key_vec(&key_s)[C::stages][C::key_blocks] = al.allocate<key_vec, C::stages, C::key_blocks>();

    __shared__ semaphore bias_ready;
    __shared__ pipeline<C::stages> pipe;

    // Key superblock fastest, then query superblock: concurrent CTAs share the
    // q/dout and K/V tiles of the same rows.
    int tile = blockIdx.x;
    const int key_super = tile % g.key_supers;
    tile /= g.key_supers;
    const int query_super = tile % g.query_supers;
    tile /= g.query_supers;
    const int h = tile % g.heads;
    tile /= g.heads;
    const int b = tile % g.batch;
    const int split = tile / g.batch;
    const int i_begin = split * g.rows_per_split;
    const int i_end = min(g.rows, i_begin + g.rows_per_split);
    const int jb0 = query_super * C::query_blocks;
    const int kb0 = key_super * C::key_blocks;

    if (threadIdx.x == 0) {
        init_semaphore(bias_ready, 0, 1);
        pipe.init(C::consumers * WARPGROUP_WARPS);
        tma::expect_bytes(bias_ready, sizeof(bias_s));
        for (int cj = 0; cj < C::query_blocks; ++cj) {
            for (int ck = 0; ck < C::key_blocks; ++ck) {
                tma::load_async(bias_s[cj * C::key_blocks + ck], g.bias, coord<score_tile>{b, h, jb0 + cj, kb0 + ck},
                                bias_ready);
            }
        }
    }
    __syncthreads();

    const int wg = warpgroup::groupid();
    if (wg == C::consumers) {  // producer
        warpgroup::decrease_registers<C::producer_registers>();
        if (warpgroup::laneid() == 0) {
            constexpr uint32_t stage_bytes =
                C::query_blocks * 2 * sizeof(rows_tile) + C::key_blocks * (2 * sizeof(rows_tile) + sizeof(key_vec));
            for (int step = 0, i = i_begin; i < i_end; ++step, ++i) {
                const int s = pipe.acquire(step, stage_bytes);
                const int depth = i * g.heads + h;
                for (int cj = 0; cj < C::query_blocks; ++cj) {
                    const coord<rows_tile> rows{b, depth, jb0 + cj, 0};
                    tma::load_async(q_s[s][cj], g.q, rows, pipe.ready[s]);
                    tma::load_async(do_s[s][cj], g.dout, rows, pipe.ready[s]);
                }
                for (int ck = 0; ck < C::key_blocks; ++ck) {
                    const coord<rows_tile> keys{b, depth, kb0 + ck, 0};
                    tma::load_async(k_s[s][ck], g.k, keys, pipe.ready[s]);
                    tma::load_async(v_s[s][ck], g.v, keys, pipe.ready[s]);
                    tma::load_async(key_s[s][ck], g.key_bias, coord<key_vec>{0, b, i, kb0 + ck}, pipe.ready[s]);
                }
            }
        }
        return;
    }

    warpgroup::increase_registers<C::consumer_registers>();
    const int cj = wg / C::key_blocks;
    const int ck = wg % C::key_blocks;
    const int jb = jb0 + cj;
    const int kb = kb0 + ck;
    const int row0 = jb * kBlock + warpgroup::warpid() * 16;

    typename tl::scores acc;
    typename tl::scores_mma bias;  // constant over the loop: kept in registers, in bf16/fp16
    warp::zero(acc);
    GENIE_TK_WAIT(bias_ready, 0, "dbias.bias_ready", 0);
    warpgroup::load(bias, bias_s[wg]);

    for (int step = 0, i = i_begin; i < i_end; ++step, ++i) {
        const std::int64_t slice = ((static_cast<std::int64_t>(b) * g.rows + i) * g.heads + h) * g.n;
        const row_stats stats = load_row_stats(g.stats, g.delta, slice, row0, g.n);
        const int s = pipe.wait_ready(step);

        typename tl::scores att, dp;
        warpgroup::mm_ABt(att, q_s[s][cj], k_s[s][ck]);
        warpgroup::mm_ABt(dp, do_s[s][cj], v_s[s][ck]);
        warpgroup::mma_async_wait();
        biased_scores(att, bias, key_s[s][ck], g.scale_log2, kb * kBlock, g.n);
        pipe.release(s);  // key bias read; q, k, v, dout only by the MMAs above
        probabilities_and_dscores(att, dp, stats);
        warp::add(acc, acc, dp);
    }

    // The CTA owns these dbias elements for its row split: plain stores. Rows
    // >= N are skipped; columns < Np are always inside the buffer.
    if (kb * kBlock >= g.n_padded) return;
    const std::int64_t plane =
        ((static_cast<std::int64_t>(split) * g.batch + b) * g.heads + h) * g.n * static_cast<std::int64_t>(g.n_padded);
#pragma unroll
    for (int t = 0; t < tl::scores::width; ++t) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int row = row0 + tile_row(k);
            if (row < g.n) {
                const int col = kb * kBlock + tile_col(t, k);
                *reinterpret_cast<float2*>(g.dbias_partial + plane + static_cast<std::int64_t>(row) * g.n_padded + col) =
                    acc.tiles[0][t].data[k];
            }
        }
    }
}

// ------------------------------------------------------------------ launches

template <AttentionDtype DT, int D>
void launch_dqkv(const TriangleAttentionBwdArgs& a, cudaStream_t stream) {
    using T = typename element<DT>::type;
    using G = dqkv_globals<T, D>;
    using tl = tiles<T, D>;
    const TriangleAttentionProblem& p = a.p;
    const int key_supers = ceil_div(ceil_div(p.n, kBlock), dqkv_config::key_blocks);
    const G g{
        rows_layout<T, D>(p, a.q),
        rows_layout<T, D>(p, a.k),
        rows_layout<T, D>(p, a.v),
        rows_layout<T, D>(p, a.dout),
        rows_layout<T, D>(p, a.dk),
        rows_layout<T, D>(p, a.dv),
        typename tl::accum_gl{a.dq_accum, static_cast<std::size_t>(p.batch), static_cast<std::size_t>(p.rows) * p.heads,
                              static_cast<std::size_t>(p.n), static_cast<std::size_t>(D)},
        bias_layout<T, D>(p, a.bias),
        key_layout<T, D>(p, a.key_bias),
        a.stats,
        a.delta,
        p.rows,
        p.heads,
        p.n,
        key_supers,
        p.scale * kLog2e,
        p.scale,
    };
    static_assert(G::dynamic_shared_memory() <= kMaxDynamicSharedMemory);
    const long long ctas = static_cast<long long>(p.batch) * p.rows * p.heads * key_supers;
    launch(dqkv_kernel<T, D>, g, dim3(grid_size(ctas)), dqkv_config::budget, G::dynamic_shared_memory(), stream,
           "the triangle attention dq/dk/dv kernel");
}

template <AttentionDtype DT, int D>
void launch_dbias(const TriangleAttentionBwdArgs& a, cudaStream_t stream) {
    using T = typename element<DT>::type;
    using G = dbias_globals<T, D>;
    const TriangleAttentionProblem& p = a.p;
    const int splits = a.dbias_splits;
    const int rows_per_split = ceil_div(p.rows, splits);
    if (splits < 1 || ceil_div(p.rows, rows_per_split) != splits) {
        throw std::invalid_argument("genie_tk: dbias_splits must come from triangle_attention_dbias_splits");
    }
    const int query_supers = ceil_div(ceil_div(p.n, kBlock), dbias_config::query_blocks);
    const int key_supers = ceil_div(ceil_div(p.n, kBlock), dbias_config::key_blocks);
    const G g{
        rows_layout<T, D>(p, a.q),
        rows_layout<T, D>(p, a.k),
        rows_layout<T, D>(p, a.v),
        rows_layout<T, D>(p, a.dout),
        bias_layout<T, D>(p, a.bias),
        key_layout<T, D>(p, a.key_bias),
        a.stats,
        a.delta,
        a.dbias_partial,
        p.batch,
        p.rows,
        p.heads,
        p.n,
        static_cast<int>(triangle_attention_padded_keys(p.n)),
        query_supers,
        key_supers,
        rows_per_split,
        p.scale * kLog2e,
    };
    static_assert(G::dynamic_shared_memory() <= kMaxDynamicSharedMemory);
    const long long ctas = static_cast<long long>(splits) * p.batch * p.heads * query_supers * key_supers;
    launch(dbias_kernel<T, D>, g, dim3(grid_size(ctas)), dbias_config::budget, G::dynamic_shared_memory(), stream,
           "the triangle attention dbias kernel");
}

}  // namespace triangle_attention_sm90

template <AttentionDtype DT, int D>
void launch_triangle_attention_bwd_dqkv(const TriangleAttentionBwdArgs& args, cudaStream_t stream) {
    triangle_attention_sm90::launch_dqkv<DT, D>(args, stream);
}

template <AttentionDtype DT, int D>
void launch_triangle_attention_bwd_dbias(const TriangleAttentionBwdArgs& args, cudaStream_t stream) {
    triangle_attention_sm90::launch_dbias<DT, D>(args, stream);
}

}  // namespace genie_tk
