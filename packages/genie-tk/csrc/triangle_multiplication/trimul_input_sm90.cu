// Tri-mul input pass: z [B, N, N, C] -> a, b channel-first [2, B, Ch, N, Np]
// (triangle_multiplication.h), with LayerNorm, the four projections, the
// sigmoid gates and the mask fused, so z is read once and a, b written once.
//
// A persistent grid of blocks with two independent warpgroups. The block loads
// the stacked projection weights into shared memory once (2 x 2Ch x C, up to
// 128 KiB) and each warpgroup then walks tiles of 64 pairs (b, i, j..j+63):
// TMA-load z's tile, LayerNorm its rows in place, and for each 64-channel unit
// of a or b compute both projections transposed, (features x pairs) =
// W (features x C) . zn^T, on wgmma, so the accumulators are already
// channel-first; gate, mask, round, and TMA-store the 64 x 64 block along the
// channel axis (ThunderKittens' axis-1 boxes). The next tile is prefetched into
// L2 while the current one is computed; stores are double-buffered.
#include "triangle_multiplication/triangle_multiplication.h"

#include "triangle_multiplication/trimul_common_sm90.cuh"

namespace genie_tk {
namespace trimul_input {

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
    static constexpr int units = 2 * H / 64;  // 64-channel blocks of a then b

    using z_tile = st<T, config::pairs, C>;
    using w_tile = st<T, 64, C>;
    using ab_tile = st<T, 64, config::pairs>;  // channels x pairs
    using z_layout = gl<T, -1, -1, -1, C, z_tile>;                     // [B, N, N, C]
    using w_layout = gl<T, 1, 1, 2 * H, C, w_tile>;                    // [2 Ch, C]
    using ab_layout = gl<T, -1, -1, -1, -1, tma::descriptor<ab_tile, 1>>;  // [2 B, Ch, N, Np]

    struct weights {
        w_tile p[units];
        w_tile g[units];
    };
    struct warpgroup_tiles {
        z_tile z;
        ab_tile out[2];
    };

    z_layout z;
    w_layout p_weight;
    w_layout g_weight;
    ab_layout ab;
    double* moments;
    const float* mask;
    const float* ln_weight;
    const float* ln_bias;
    const float* p_bias;
    const float* g_bias;
    float eps;
    int batch;
    int n;
    int row_tiles;  // Np / 64
    int num_tiles;  // batch * n * row_tiles

    using shared_memory = trimul::pass_shared_memory<weights, warpgroup_tiles, config::warpgroups>;
};

template <typename T, int C, int H>
__global__ __launch_bounds__(config::num_threads, 1) void input_kernel(const __grid_constant__ globals<T, C, H> g) {
    using G = globals<T, C, H>;
    extern __shared__ alignment_dummy dynamic_shared[];
    const auto smem = G::shared_memory::allocate(reinterpret_cast<int*>(&dynamic_shared[0]));
    typename G::weights& w = smem.weights;

    __shared__ float ln_weight[C], ln_bias[C], p_bias[2 * H], g_bias[2 * H];
    __shared__ float mask[config::warpgroups][config::pairs];
    __shared__ semaphore weights_arrived, z_arrived[config::warpgroups];

    if (threadIdx.x == 0) {
        init_semaphore(weights_arrived, 0, 1);
        for (int wg = 0; wg < config::warpgroups; ++wg) init_semaphore(z_arrived[wg], 0, 1);
        tma::expect_bytes(weights_arrived, sizeof(typename G::weights));
        for (int u = 0; u < G::units; ++u) {
            tma::load_async(w.p[u], g.p_weight, coord<typename G::w_tile>{0, 0, u, 0}, weights_arrived);
            tma::load_async(w.g[u], g.g_weight, coord<typename G::w_tile>{0, 0, u, 0}, weights_arrived);
        }
    }
    for (int k = threadIdx.x; k < C; k += blockDim.x) {
        ln_weight[k] = g.ln_weight[k];
        ln_bias[k] = g.ln_bias[k];
    }
    for (int k = threadIdx.x; k < 2 * H; k += blockDim.x) {
        p_bias[k] = g.p_bias[k];
        g_bias[k] = g.g_bias[k];
    }
    __syncthreads();
    GENIE_TK_WAIT(weights_arrived, 0, "input.weights_arrived", 0);

    const int wg = warpgroup::groupid();
    const int lane = warpgroup::laneid();
    const int barrier_id = 1 + wg;
    typename G::warpgroup_tiles& mine = smem.tiles[wg];
    // Sums of the rounded a and b values (fp16's normalisation): fp32 per
    // tile, fp64 across tiles.
    double a_sum = 0.0, a_sq = 0.0, b_sum = 0.0, b_sq = 0.0;
    int phase = 0;
    int stores = 0;  // TMA stores issued by this warpgroup: which out buffer is free

    const int stride = gridDim.x * config::warpgroups;
    for (int t = blockIdx.x * config::warpgroups + wg; t < g.num_tiles; t += stride) {
        const auto [b, i, jt] = trimul::decode_pair_tile(t, g.row_tiles, g.n);
        if (lane == 0) {
            tma::expect_bytes(z_arrived[wg], sizeof(typename G::z_tile));
            tma::load_async(mine.z, g.z, coord<typename G::z_tile>{b, i, jt, 0}, z_arrived[wg]);
            if (t + stride < g.num_tiles) {
                const trimul::pair_tile next = trimul::decode_pair_tile(t + stride, g.row_tiles, g.n);
                tma::prefetch(mine.z, g.z, coord<typename G::z_tile>{next.b, next.i, next.jt, 0});
            }
        }
        if (lane < config::pairs) {
            const int j = jt * config::pairs + lane;
            float m = 0.0f;  // the padding columns j >= N stay zero
            if (j < g.n) m = g.mask == nullptr ? 1.0f : g.mask[(static_cast<size_t>(b) * g.n + i) * g.n + j];
            mask[wg][lane] = m;
        }
        GENIE_TK_WAIT(z_arrived[wg], phase, "input.z_arrived", t);
        phase ^= 1;
        trimul::layer_norm_rows<T, C>(mine.z, ln_weight, ln_bias, g.eps);
        // Ordinary shared-memory stores, read next by wgmma.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        warpgroup::sync(barrier_id);

#pragma unroll 1
        for (int u = 0; u < G::units; ++u) {
            rt_fl<16, config::pairs> proj, gate;
            warpgroup::mm_ABt(proj, w.p[u], mine.z);
            warpgroup::mm_ABt(gate, w.g[u], mine.z);
            warpgroup::mma_async_wait();
            const int f0 = u * 64;  // first feature (row of the stacked weights) of this unit
            float sum = 0.0f, sq = 0.0f;
            for_each_pair(proj, gate, [&](int row, int col, float& p, float gv) {
                const float v = mask[wg][col] * sigmoid(gv + g_bias[f0 + row]) * (p + p_bias[f0 + row]);
                p = trimul::to_float(trimul::from_float<T>(v));  // the value stored, for the moments
                sum += p;
                sq += p * p;
            });
            const int s = u / (G::units / 2);  // 0: a, 1: b
            // Named accumulators: a run-time index would put an array in local memory.
            (s == 0 ? a_sum : b_sum) += sum;
            (s == 0 ? a_sq : b_sq) += sq;

            const coord<typename G::ab_tile> oc{s * g.batch + b, u % (G::units / 2), i, jt};
            trimul::store_through_shared<dim::DEPTH, 1>(g.ab, mine.out[stores % 2], proj, oc, barrier_id);
            ++stores;
        }
        // Every warp's wgmma reads of mine.z and its reads of mask[wg] are
        // done before the next tile overwrites them.
        warpgroup::sync(barrier_id);
    }
    if (lane == 0) tma::store_async_wait();

    if (g.moments != nullptr) {
        const double moment[4] = {a_sum, a_sq, b_sum, b_sq};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            double v = moment[k];
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
            if (laneid() == 0) atomicAdd(&g.moments[k], v);
        }
    }
}

template <typename T, int C, int H>
void launch(const TrimulInputArgs& args, cudaStream_t stream) {
    using G = globals<T, C, H>;
    const size_t batch = static_cast<size_t>(args.batch), n = static_cast<size_t>(args.n);
    const size_t padded = static_cast<size_t>(trimul_padded(args.n));
    const int tiles = trimul::pair_tiles(args.batch, args.n, "genie_tk.trimul_input");
    const auto weight = [](const void* p) {
        return typename G::w_layout{static_cast<T*>(const_cast<void*>(p)), nullptr, nullptr, nullptr, nullptr};
    };
    const G g{
        typename G::z_layout{static_cast<T*>(const_cast<void*>(args.z)), batch, n, n, nullptr},
        weight(args.p_weight),
        weight(args.g_weight),
        typename G::ab_layout{static_cast<T*>(args.ab), 2 * batch, static_cast<size_t>(H), n, padded},
        args.moments,
        args.mask,
        args.ln_weight,
        args.ln_bias,
        args.p_bias,
        args.g_bias,
        args.eps,
        args.batch,
        args.n,
        static_cast<int>(padded / config::pairs),
        tiles,
    };
    trimul::launch_persistent(input_kernel<T, C, H>, g, (tiles + config::warpgroups - 1) / config::warpgroups,
                              config::num_threads, G::shared_memory::bytes, stream, "genie_tk.trimul_input");
}

}  // namespace trimul_input

void trimul_input_sm90(const TrimulInputArgs& args, cudaStream_t stream) {
    if (args.batch == 0 || args.n == 0) return;
    trimul::dispatch_dtype(args.dtype, [&]<typename T>() {
        trimul::dispatch_channels(args.c, args.hidden, "genie_tk.trimul_input",
                                  [&]<int C, int H>() { trimul_input::launch<T, C, H>(args, stream); });
    });
}

}  // namespace genie_tk
