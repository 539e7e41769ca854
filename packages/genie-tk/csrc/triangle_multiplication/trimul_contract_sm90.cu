// The N^3 part of the triangle multiplicative update: for every (batch,
// channel), out = scale * op(A) op(B) with N x Np channel-first operands
// (triangle_multiplication.h), on Hopper's wgmma.
//
// A persistent grid walks output tiles of 128 x 256 (two consumer warpgroups of
// 64 rows each, 256 columns). A producer warpgroup, of which one thread works,
// streams 64-deep slices of A and B through a ring of shared-memory stages with
// TMA; each consumer warpgroup multiplies its 64 x 64 slice of A by the shared
// 64 x 256 (or 256 x 64) slice of B into fp32 registers and, at the end of the
// tile, scales, rounds and stores its 64 x 256 block through shared memory
// with a TMA store. Transposed operands are read in place: wgmma takes
// MN-major shared tiles, so no pass ever transposes a tensor in memory.
//
// Tails need no special code: rows beyond N are outside the TMA boxes' bounds
// (zero-filled on load, dropped on store), and columns beyond N are the zero
// padding of the channel-first layout.
#include "triangle_multiplication/triangle_multiplication.h"

#include "triangle_multiplication/trimul_common_sm90.cuh"

namespace genie_tk {
namespace trimul_contract {

using namespace kittens;

struct config {
    static constexpr int consumer_warpgroups = 2;
    static constexpr int block_m = 64 * consumer_warpgroups;  // output rows per tile
    static constexpr int block_n = 256;                      // output columns per tile
    static constexpr int block_k = 64;                       // depth of one stage
    static constexpr int b_slices = block_n / 64;
    static constexpr int stages = 3;
    static constexpr int num_threads = (consumer_warpgroups + 1) * WARPGROUP_THREADS;
    static constexpr int consumer_warps = consumer_warpgroups * WARPGROUP_WARPS;
    // setmaxnreg budgets: 40 for the producer, the rest to the consumers'
    // 64 x 256 fp32 accumulators (128 registers per thread).
    static constexpr int producer_registers = 40;
    static constexpr int consumer_registers = 232;
    static constexpr RegisterBudget budget{num_threads, 1, producer_registers, consumer_warpgroups,
                                           consumer_registers};
};

template <typename T, TrimulContraction Mode>
struct globals {
    static constexpr bool trans_a = Mode == TrimulContraction::kAtB;
    static constexpr bool trans_b = Mode == TrimulContraction::kABt;

    using tile = st<T, 64, 64>;
    // The b_slices tiles of one stage, side by side: 64 x 256 (B read as
    // K x N) or stacked: 256 x 64 (B read as N x K). Same bytes either way.
    using b_block = std::conditional_t<trans_b, st<T, config::block_n, 64>, st<T, 64, config::block_n>>;
    using out_tile = st<T, 64, config::block_n>;
    using operand_layout = gl<T, -1, -1, -1, -1, tile>;    // [B, C, N, Np]
    using out_layout = gl<T, -1, -1, -1, -1, out_tile>;    // [B, C, N, Np]

    struct stage {
        tile a[config::consumer_warpgroups];
        tile b[config::b_slices];
    };

    operand_layout a;
    operand_layout b;
    out_layout out;
    const float* scale;
    int channels;
    int tiles_m;
    int tiles_n;
    int k_iters;
    int num_tasks;

    static constexpr size_t dynamic_shared_memory() {
        // + 1024: the allocator aligns the first tile for the 128-byte swizzle.
        return config::stages * sizeof(stage) + config::consumer_warpgroups * sizeof(out_tile) + 1024;
    }
};

// A task is one output tile; consecutive tasks share a channel, so the blocks
// running at once read the same A and B from L2.
struct task_coord {
    int batch, channel, tile_m, tile_n;
};

template <typename G>
__device__ inline task_coord decode(const G& g, int task) {
    const int per_channel = g.tiles_m * g.tiles_n;
    const int bc = task / per_channel;
    const int rem = task - bc * per_channel;
    return {bc / g.channels, bc % g.channels, rem % g.tiles_m, rem / g.tiles_m};
}

template <typename T, TrimulContraction Mode>
__global__ __launch_bounds__(config::num_threads, 1) void contract_kernel(const __grid_constant__ globals<T, Mode> g) {
    using G = globals<T, Mode>;
    using stage = typename G::stage;
    extern __shared__ alignment_dummy shared_memory[];
    tma_swizzle_allocator allocator(reinterpret_cast<int*>(&shared_memory[0]));
    stage(&stages)[config::stages] = allocator.allocate<stage, config::stages>();
    typename G::out_tile(&out_tiles)[config::consumer_warpgroups] =
        allocator.allocate<typename G::out_tile, config::consumer_warpgroups>();

    // full[s]: the stage's bytes have landed. empty[s]: every consumer warp
    // is done reading it.
    __shared__ semaphore full[config::stages], empty[config::stages];
    if (threadIdx.x == 0) {
        for (int s = 0; s < config::stages; ++s) {
            init_semaphore(full[s], 0, 1);
            init_semaphore(empty[s], config::consumer_warps, 0);
        }
    }
    __syncthreads();

    const int wg = warpgroup::groupid();
    if (wg == config::consumer_warpgroups) {  // producer
        warpgroup::decrease_registers<config::producer_registers>();
        if (warpgroup::laneid() != 0) return;
        int it = 0;  // stage uses over all tasks of this block: ring slot and phase
        for (int task = blockIdx.x; task < g.num_tasks; task += gridDim.x) {
            const task_coord t = decode(g, task);
            for (int k = 0; k < g.k_iters; ++k, ++it) {
                const int s = it % config::stages;
                GENIE_TK_WAIT(empty[s], ((it / config::stages) & 1) ^ 1, "contract.empty", it);
                tma::expect_bytes(full[s], sizeof(stage));
                for (int w = 0; w < config::consumer_warpgroups; ++w) {
                    const int m = t.tile_m * config::consumer_warpgroups + w;
                    const coord<typename G::tile> at =
                        G::trans_a ? coord<typename G::tile>{t.batch, t.channel, k, m}
                                   : coord<typename G::tile>{t.batch, t.channel, m, k};
                    tma::load_async(stages[s].a[w], g.a, at, full[s]);
                }
                for (int q = 0; q < config::b_slices; ++q) {
                    const int n = t.tile_n * config::b_slices + q;
                    const coord<typename G::tile> bt =
                        G::trans_b ? coord<typename G::tile>{t.batch, t.channel, n, k}
                                   : coord<typename G::tile>{t.batch, t.channel, k, n};
                    tma::load_async(stages[s].b[q], g.b, bt, full[s]);
                }
            }
        }
        return;
    }

    // consumers
    warpgroup::increase_registers<config::consumer_registers>();
    const float scale = g.scale == nullptr ? 1.0f : *g.scale;
    const int barrier_id = 1 + wg;  // named barrier of this warpgroup (0 is __syncthreads)
    typename G::out_tile& out_tile = out_tiles[wg];
    rt_fl<16, config::block_n> acc;
    int it = 0;
    for (int task = blockIdx.x; task < g.num_tasks; task += gridDim.x) {
        const task_coord t = decode(g, task);
        warp::zero(acc);
        for (int k = 0; k < g.k_iters; ++k, ++it) {
            const int s = it % config::stages;
            GENIE_TK_WAIT(full[s], (it / config::stages) & 1, "contract.full", it);
            const auto& b_block = *reinterpret_cast<const typename G::b_block*>(&stages[s].b[0]);
            warpgroup::mma<G::trans_a ? transpose::T : transpose::N, G::trans_b ? transpose::T : transpose::N>(
                acc, stages[s].a[wg], b_block);
            warpgroup::mma_async_wait();
            if (warp::laneid() == 0) arrive(empty[s]);
        }
        warp::mul(acc, acc, scale);
        const int m = t.tile_m * config::consumer_warpgroups + wg;
        trimul::store_through_shared<dim::ROW, 0>(
            g.out, out_tile, acc, coord<typename G::out_tile>{t.batch, t.channel, m, t.tile_n}, barrier_id);
    }
    if (warpgroup::laneid() == 0) tma::store_async_wait();
}

template <typename T, TrimulContraction Mode>
void launch(const TrimulContractArgs& args, cudaStream_t stream) {
    using G = globals<T, Mode>;
    const size_t padded = static_cast<size_t>(trimul_padded(args.n));
    const auto layout = [&](const void* p) {
        return typename G::operand_layout{static_cast<T*>(const_cast<void*>(p)), static_cast<size_t>(args.batch),
                                          static_cast<size_t>(args.channels), static_cast<size_t>(args.n), padded};
    };
    // Output rows span A's rows (or columns, transposed), output columns B's
    // columns (or rows); the depth is N rows or Np columns, both 64-slices.
    const int tiles_m = static_cast<int>((args.n + config::block_m - 1) / config::block_m);
    const int tiles_n = static_cast<int>((padded + config::block_n - 1) / config::block_n);
    const long long tasks = static_cast<long long>(args.batch) * args.channels * tiles_m * tiles_n;
    if (tasks > INT_MAX) throw std::invalid_argument("genie_tk.trimul_contract: too many output tiles for one launch");
    const G g{
        layout(args.a),
        layout(args.b),
        typename G::out_layout{static_cast<T*>(args.out), static_cast<size_t>(args.batch),
                               static_cast<size_t>(args.channels), static_cast<size_t>(args.n), padded},
        args.scale,
        args.channels,
        tiles_m,
        tiles_n,
        static_cast<int>(padded / config::block_k),
        static_cast<int>(tasks),
    };
    trimul::launch_persistent(contract_kernel<T, Mode>, g, tasks, config::num_threads, G::dynamic_shared_memory(),
                              stream, "genie_tk.trimul_contract", &config::budget);
}

template <typename T>
void dispatch_mode(const TrimulContractArgs& args, cudaStream_t stream) {
    switch (args.mode) {
        case TrimulContraction::kABt: return launch<T, TrimulContraction::kABt>(args, stream);
        case TrimulContraction::kAtB: return launch<T, TrimulContraction::kAtB>(args, stream);
        case TrimulContraction::kAB: return launch<T, TrimulContraction::kAB>(args, stream);
    }
    throw std::invalid_argument("genie_tk.trimul_contract: unknown contraction mode");
}

}  // namespace trimul_contract

void trimul_contract_sm90(const TrimulContractArgs& args, cudaStream_t stream) {
    if (args.batch == 0 || args.channels == 0 || args.n == 0) return;
    trimul::dispatch_dtype(args.dtype, [&]<typename T>() { trimul_contract::dispatch_mode<T>(args, stream); });
}

}  // namespace genie_tk
