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

#include "common/cuda_utils.h"
#include "triangle_multiplication/trimul_common_sm90.cuh"

#include <algorithm>
#include <climits>
#include <stdexcept>

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

    static constexpr size_t dynamic_shared_memory() {
        return sizeof(weights) + config::warpgroups * sizeof(warpgroup_tiles) + 1024;
    }
};

template <typename T, int C, int H>
__global__ __launch_bounds__(config::num_threads, 1) void output_kernel(const __grid_constant__ globals<T, C, H> g) {
    using G = globals<T, C, H>;
    extern __shared__ alignment_dummy shared_memory[];
    tma_swizzle_allocator allocator(reinterpret_cast<int*>(&shared_memory[0]));
    typename G::weights& w = allocator.allocate<typename G::weights>();
    typename G::warpgroup_tiles(&tiles)[config::warpgroups] =
        allocator.allocate<typename G::warpgroup_tiles, config::warpgroups>();

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
    wait(weights_arrived, 0);

    const int wg = warpgroup::groupid();
    const int lane = warpgroup::laneid();
    const int barrier_id = 1 + wg;
    typename G::warpgroup_tiles& mine = tiles[wg];
    int phase = 0;

    const int stride = gridDim.x * config::warpgroups;
    for (int t = blockIdx.x * config::warpgroups + wg; t < g.num_tiles; t += stride) {
        const int jt = t % g.row_tiles;
        const int bi = t / g.row_tiles;
        const int i = bi % g.n;
        const int b = bi / g.n;
        const coord<typename G::pair_tile> pc{b, i, jt, 0};
        const coord<typename G::x_tile> xc{b, 0, i, jt};
        if (lane == 0) {
            tma::expect_bytes(inputs_arrived[wg], sizeof(typename G::x_tile) + sizeof(typename G::pair_tile));
            tma::load_async<dim::DEPTH, cache_policy::NORMAL>(mine.x, g.x, xc, inputs_arrived[wg]);
            tma::load_async(mine.z, g.z, pc, inputs_arrived[wg]);
            if (t + stride < g.num_tiles) {
                const int tn = t + stride;
                const int bin = tn / g.row_tiles;
                const int in = bin % g.n, bn = bin / g.n, jn = tn % g.row_tiles;
                tma::prefetch<dim::DEPTH, cache_policy::NORMAL>(mine.x, g.x, coord<typename G::x_tile>{bn, 0, in, jn});
                tma::prefetch(mine.z, g.z, coord<typename G::pair_tile>{bn, in, jn, 0});
            }
        }
        wait(inputs_arrived[wg], phase);
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

        // The previous tile's store has finished reading mine.out, and every
        // warp's wgmma has finished reading mine.x and mine.z.
        if (lane == 0) tma::store_async_read_wait();
        warpgroup::sync(barrier_id);
        warpgroup::store(mine.out, y);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        warpgroup::sync(barrier_id);
        if (lane == 0) tma::store_async(g.out, mine.out, pc);
    }
    if (lane == 0) tma::store_async_wait();
}

template <typename T, int C, int H>
void launch(const TrimulOutputArgs& args, cudaStream_t stream) {
    using G = globals<T, C, H>;
    const size_t batch = static_cast<size_t>(args.batch), n = static_cast<size_t>(args.n);
    const size_t padded = static_cast<size_t>(trimul_padded(args.n));
    const long long tiles = static_cast<long long>(batch * n * (padded / config::pairs));
    if (tiles > INT_MAX) throw std::invalid_argument("genie_tk.trimul_output: too many pair tiles for one launch");
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
        static_cast<int>(tiles),
    };
    auto kernel = output_kernel<T, C, H>;
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(G::dynamic_shared_memory())),
               "cudaFuncSetAttribute(trimul_output)");
    int device = 0, sms = 0;
    cuda_check(cudaGetDevice(&device), "cudaGetDevice");
    cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    const long long blocks = (tiles + config::warpgroups - 1) / config::warpgroups;
    const int grid = static_cast<int>(std::min<long long>(blocks, sms));
    kernel<<<grid, config::num_threads, G::dynamic_shared_memory(), stream>>>(g);
    cuda_check(cudaGetLastError(), "launching trimul_output_sm90");
}

template <typename T>
void dispatch_sizes(const TrimulOutputArgs& args, cudaStream_t stream) {
    if (args.c == 64 && args.hidden == 64) return launch<T, 64, 64>(args, stream);
    if (args.c == 64 && args.hidden == 128) return launch<T, 64, 128>(args, stream);
    if (args.c == 128 && args.hidden == 64) return launch<T, 128, 64>(args, stream);
    if (args.c == 128 && args.hidden == 128) return launch<T, 128, 128>(args, stream);
    throw std::invalid_argument("genie_tk.trimul_output: c_z and c_hidden must be 64 or 128");
}

}  // namespace trimul_output

void trimul_output_sm90(const TrimulOutputArgs& args, cudaStream_t stream) {
    if (args.batch == 0 || args.n == 0) return;
    if (args.dtype == TrimulDtype::kBFloat16) {
        trimul_output::dispatch_sizes<kittens::bf16>(args, stream);
    } else {
        trimul_output::dispatch_sizes<kittens::half>(args, stream);
    }
}

}  // namespace genie_tk
