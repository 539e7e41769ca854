// Tri-mul output pass: out = sigmoid(LN_in(z) W_g^T + b_g) * (LN_out(x) W_z^T + b_z)
// with x channel-first [B, Ch, N, Np] (triangle_multiplication.h). The gate is
// recomputed from z rather than stored by the input pass: reading z again
// costs one read of [B, N, N, C], storing the gate a write and a read.
//
// A persistent grid of blocks with two independent warpgroups. The block keeps
// W_z (C x Ch) and W_g (C x C) in shared memory; each warpgroup walks tiles of
// 64 pairs (b, i, j..j+63): TMA-load x's Ch x 64 block (along the channel axis,
// ThunderKittens' axis-1 box) and z's 64 x C block, LayerNorm x's columns and
// z's rows in place, then on wgmma y = xn^T W_z^T (xn read transposed, MN-major)
// and the gate zn W_g^T, combine, and TMA-store the 64 x C block of out.
#include "triangle_multiplication/triangle_multiplication.h"

#include "triangle_multiplication/trimul_common_sm90.cuh"

namespace genie_tk {
namespace trimul_output {

using namespace kittens;
using trimul::for_each_pair;
using trimul::sigmoid;

struct config {
    static constexpr int warpgroups = 2;
    static constexpr int num_threads = warpgroups * WARPGROUP_THREADS;
    static constexpr int pairs = 64;  // pairs per tile, along j
};

template <typename T, int C, int H>
struct globals {
    using pair_tile = st<T, config::pairs, C>;  // z in, out out: pairs x C
    using x_tile = st<T, H, config::pairs>;     // channels x pairs
    using z_weight_tile = st<T, C, H>;
    using g_weight_tile = st<T, C, C>;
    using pair_layout = gl<T, -1, -1, -1, C, pair_tile>;                    // [B, N, N, C]
    using x_layout = gl<T, -1, -1, -1, -1, tma::descriptor<x_tile, 1>>;    // [B, Ch, N, Np]
    using z_weight_layout = gl<T, 1, 1, C, H, z_weight_tile>;
    using g_weight_layout = gl<T, 1, 1, C, C, g_weight_tile>;

    struct weights {
        z_weight_tile z;
        g_weight_tile g;
    };
    struct warpgroup_tiles {
        x_tile x;
        pair_tile z;
        pair_tile out;
    };

    pair_layout out;
    x_layout x;
    pair_layout z;
    z_weight_layout z_weight;
    g_weight_layout g_weight;
    const float* ln_in_weight;
    const float* ln_in_bias;
    const float* ln_out_weight;
    const float* ln_out_bias;
    const float* z_bias;
    const float* g_bias;
    float eps;
    int n;
    int row_tiles;  // Np / 64
    int num_tiles;  // batch * n * row_tiles

    using shared_memory = trimul::pass_shared_memory<weights, warpgroup_tiles, config::warpgroups>;
};

template <typename T, int C, int H>
__global__ __launch_bounds__(config::num_threads, 1) void output_kernel(const __grid_constant__ globals<T, C, H> g) {
    using G = globals<T, C, H>;
    extern __shared__ alignment_dummy dynamic_shared[];
    const auto smem = G::shared_memory::allocate(reinterpret_cast<int*>(&dynamic_shared[0]));
    typename G::weights& w = smem.weights;

    __shared__ float ln_in_weight[C], ln_in_bias[C], ln_out_weight[H], ln_out_bias[H], z_bias[C], g_bias[C];
    __shared__ trimul::column_scratch scratch[config::warpgroups];
    __shared__ semaphore weights_arrived, inputs_arrived[config::warpgroups];

    if (threadIdx.x == 0) {
        init_semaphore(weights_arrived, 0, 1);
        for (int wg = 0; wg < config::warpgroups; ++wg) init_semaphore(inputs_arrived[wg], 0, 1);
        tma::expect_bytes(weights_arrived, sizeof(typename G::weights));
        tma::load_async(w.z, g.z_weight, coord<typename G::z_weight_tile>{0, 0, 0, 0}, weights_arrived);
        tma::load_async(w.g, g.g_weight, coord<typename G::g_weight_tile>{0, 0, 0, 0}, weights_arrived);
    }
    for (int k = threadIdx.x; k < C; k += blockDim.x) {
        ln_in_weight[k] = g.ln_in_weight[k];
        ln_in_bias[k] = g.ln_in_bias[k];
        z_bias[k] = g.z_bias[k];
        g_bias[k] = g.g_bias[k];
    }
    for (int k = threadIdx.x; k < H; k += blockDim.x) {
        ln_out_weight[k] = g.ln_out_weight[k];
        ln_out_bias[k] = g.ln_out_bias[k];
    }
    __syncthreads();
    GENIE_TK_WAIT(weights_arrived, 0, "output.weights_arrived", 0);

    const int wg = warpgroup::groupid();
    const int lane = warpgroup::laneid();
    const int barrier_id = 1 + wg;
    typename G::warpgroup_tiles& mine = smem.tiles[wg];
    int phase = 0;

    const int stride = gridDim.x * config::warpgroups;
    for (int t = blockIdx.x * config::warpgroups + wg; t < g.num_tiles; t += stride) {
        const auto [b, i, jt] = trimul::decode_pair_tile(t, g.row_tiles, g.n);
        const coord<typename G::pair_tile> pc{b, i, jt, 0};
        if (lane == 0) {
            tma::expect_bytes(inputs_arrived[wg], sizeof(typename G::x_tile) + sizeof(typename G::pair_tile));
            tma::load_async<dim::DEPTH, cache_policy::NORMAL>(mine.x, g.x, coord<typename G::x_tile>{b, 0, i, jt},
                                                               inputs_arrived[wg]);
            tma::load_async(mine.z, g.z, pc, inputs_arrived[wg]);
            if (t + stride < g.num_tiles) {
                const trimul::pair_tile next = trimul::decode_pair_tile(t + stride, g.row_tiles, g.n);
                tma::prefetch<dim::DEPTH, cache_policy::NORMAL>(
                    mine.x, g.x, coord<typename G::x_tile>{next.b, 0, next.i, next.jt});
                tma::prefetch(mine.z, g.z, coord<typename G::pair_tile>{next.b, next.i, next.jt, 0});
            }
        }
        GENIE_TK_WAIT(inputs_arrived[wg], phase, "output.inputs_arrived", t);
        phase ^= 1;
        trimul::layer_norm_rows<T, C>(mine.z, ln_in_weight, ln_in_bias, g.eps);
        trimul::layer_norm_columns<T, H>(mine.x, scratch[wg], ln_out_weight, ln_out_bias, g.eps, barrier_id);
        // Ordinary shared-memory stores, read next by wgmma.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        warpgroup::sync(barrier_id);

        rt_fl<16, C> y, gate;
        warpgroup::mm_AtBt(y, mine.x, w.z);
        warpgroup::mm_ABt(gate, mine.z, w.g);
        warpgroup::mma_async_wait();
        for_each_pair(y, gate, [&](int, int col, float& v, float gv) {
            v = sigmoid(gv + g_bias[col]) * (v + z_bias[col]);
        });

        // Its barriers also see every warp's wgmma done with mine.x and mine.z
        // before the next tile's loads.
        trimul::store_through_shared<dim::ROW, 0>(g.out, mine.out, y, pc, barrier_id);
    }
    if (lane == 0) tma::store_async_wait();
}

template <typename T, int C, int H>
void launch(const TrimulOutputArgs& args, cudaStream_t stream) {
    using G = globals<T, C, H>;
    const size_t batch = static_cast<size_t>(args.batch), n = static_cast<size_t>(args.n);
    const size_t padded = static_cast<size_t>(trimul_padded(args.n));
    const int tiles = trimul::pair_tiles(args.batch, args.n, "genie_tk.trimul_output");
    const auto pairs = [&](const void* p) {
        return typename G::pair_layout{static_cast<T*>(const_cast<void*>(p)), batch, n, n, nullptr};
    };
    const G g{
        pairs(args.out),
        typename G::x_layout{static_cast<T*>(const_cast<void*>(args.x)), batch, static_cast<size_t>(H), n, padded},
        pairs(args.z),
        typename G::z_weight_layout{static_cast<T*>(const_cast<void*>(args.z_weight)), nullptr, nullptr, nullptr,
                                    nullptr},
        typename G::g_weight_layout{static_cast<T*>(const_cast<void*>(args.g_weight)), nullptr, nullptr, nullptr,
                                    nullptr},
        args.ln_in_weight,
        args.ln_in_bias,
        args.ln_out_weight,
        args.ln_out_bias,
        args.z_bias,
        args.g_bias,
        args.eps,
        args.n,
        static_cast<int>(padded / config::pairs),
        tiles,
    };
    trimul::launch_persistent(output_kernel<T, C, H>, g, (tiles + config::warpgroups - 1) / config::warpgroups,
                              config::num_threads, G::shared_memory::bytes, stream, "genie_tk.trimul_output");
}

}  // namespace trimul_output

void trimul_output_sm90(const TrimulOutputArgs& args, cudaStream_t stream) {
    if (args.batch == 0 || args.n == 0) return;
    trimul::dispatch_dtype(args.dtype, [&]<typename T>() {
        trimul::dispatch_channels(args.c, args.hidden, "genie_tk.trimul_output",
                                  [&]<int C, int H>() { trimul_output::launch<T, C, H>(args, stream); });
    });
}

}  // namespace genie_tk
