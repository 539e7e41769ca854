// Helpers shared by the tri-mul kernels. Device: LayerNorm of the rows or the
// columns of a shared tile in place, element-wise access to wgmma accumulators
// with their coordinates, the walk over tiles of 64 pairs. Host: the
// persistent launch and the dispatch on dtype and channel counts.
#pragma once

#include "common/cuda_utils.h"
#include "common/debug_wait.cuh"
#include "common/kernel_setup.h"
#include "kittens.cuh"
#include "triangle_multiplication/triangle_multiplication.h"

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

namespace genie_tk {
namespace trimul {

using namespace kittens;

__device__ inline float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

template <typename T>
__device__ inline float to_float(T v) {
    return base_types::convertor<float, T>::convert(v);
}

template <typename T>
__device__ inline T from_float(float v) {
    return base_types::convertor<T, float>::convert(v);
}

__device__ inline float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// LayerNorm over the C columns of each of the 64 rows of `tile`, in place, by
// one warpgroup: warp w normalises rows [16 w, 16 w + 16), each lane C / 32
// adjacent columns (one 4- or 8-byte access inside a 16-byte swizzle chunk).
// Statistics in fp32, two passes over registers as PyTorch does.
template <typename T, int C>
__device__ inline void layer_norm_rows(st<T, 64, C>& tile, const float* gamma, const float* beta, float eps) {
    static_assert(C == 64 || C == 128, "one 4- or 8-byte access per lane");
    constexpr int per_lane = C / WARP_THREADS;
    const int lane = laneid();
    const int col = lane * per_lane;
    const int first_row = warpgroup::warpid() * 16;
    for (int r = first_row; r < first_row + 16; ++r) {
        T* p = &tile[{r, col}];
        float v[per_lane];
#pragma unroll
        for (int e = 0; e < per_lane; ++e) v[e] = to_float(p[e]);
        float sum = 0.0f;
#pragma unroll
        for (int e = 0; e < per_lane; ++e) sum += v[e];
        const float mean = warp_sum(sum) / C;
        float sq = 0.0f;
#pragma unroll
        for (int e = 0; e < per_lane; ++e) {
            v[e] -= mean;
            sq += v[e] * v[e];
        }
        const float rstd = rsqrtf(warp_sum(sq) / C + eps);
#pragma unroll
        for (int e = 0; e < per_lane; ++e) p[e] = from_float<T>(v[e] * rstd * gamma[col + e] + beta[col + e]);
    }
}

// Scratch of layer_norm_columns: partial sums of the two halves of a column.
struct column_scratch {
    float sum[2][64];
    float sq[2][64];
};

// LayerNorm over the R rows of each of the 64 columns of `tile`, in place, by
// one warpgroup: thread t takes column t % 64 and half of its rows, and the
// halves meet in `scratch`. `barrier_id` names the warpgroup's barrier.
template <typename T, int R>
__device__ inline void layer_norm_columns(st<T, R, 64>& tile, column_scratch& scratch, const float* gamma,
                                          const float* beta, float eps, int barrier_id) {
    constexpr int half_rows = R / 2;
    const int col = warpgroup::laneid() % 64;
    const int half = warpgroup::laneid() / 64;
    const int r0 = half * half_rows;
    float sum = 0.0f;
    for (int r = r0; r < r0 + half_rows; ++r) sum += to_float(tile[{r, col}]);
    scratch.sum[half][col] = sum;
    warpgroup::sync(barrier_id);
    const float mean = (scratch.sum[0][col] + scratch.sum[1][col]) / R;
    float sq = 0.0f;
    for (int r = r0; r < r0 + half_rows; ++r) {
        const float d = to_float(tile[{r, col}]) - mean;
        sq += d * d;
    }
    scratch.sq[half][col] = sq;
    warpgroup::sync(barrier_id);
    const float rstd = rsqrtf((scratch.sq[0][col] + scratch.sq[1][col]) / R + eps);
    for (int r = r0; r < r0 + half_rows; ++r) {
        T& v = tile[{r, col}];
        v = from_float<T>((to_float(v) - mean) * rstd * gamma[r] + beta[r]);
    }
}

// Calls f(row, col, a, b) for every element of two wgmma accumulators of the
// same shape held by one warp of a warpgroup; `row` counts from the first row
// of the warpgroup's 64-row block. `a` may be modified in place.
template <typename RT, typename F>
__device__ inline void for_each_pair(RT& a, const RT& b, F&& f) {
    static_assert(RT::height == 1, "one 16-row slab per warp, as wgmma leaves it");
    const int lane = laneid();
    const int row0 = warpgroup::warpid() * 16 + lane / 4;
#pragma unroll
    for (int j = 0; j < RT::width; ++j) {
#pragma unroll
        for (int k = 0; k < RT::packed_per_tile; ++k) {
            const int row = row0 + (k % 2) * 8;
            const int col = j * 16 + (k / 2) * 8 + (lane % 4) * 2;
            f(row, col, a.tiles[0][j].data[k].x, b.tiles[0][j].data[k].x);
            f(row, col + 1, a.tiles[0][j].data[k].y, b.tiles[0][j].data[k].y);
        }
    }
}

// Rounds the accumulator `acc` of one warpgroup into the shared tile `stage`
// and TMA-stores it at `idx` of `dst` (along `Axis`). Lane 0 first waits until
// at most `Pending` earlier stores are still reading shared memory, so `stage`
// is free when it is Pending + 1 stores old (a ring of Pending + 1 buffers).
template <int Axis, int Pending, typename GL, typename ST, typename RT, typename COORD>
__device__ inline void store_through_shared(const GL& dst, ST& stage, const RT& acc, const COORD& idx,
                                            int barrier_id) {
    if (warpgroup::laneid() == 0) tma::store_async_read_wait<Pending>();
    warpgroup::sync(barrier_id);
    warpgroup::store(stage, acc);
    // Ordinary shared-memory stores, read next by the copy engine.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    warpgroup::sync(barrier_id);
    if (warpgroup::laneid() == 0) tma::store_async<Axis, cache_policy::NORMAL>(dst, stage, idx);
}

// Dynamic shared memory of a pair-tile pass: the block's weights, then the
// tiles of each of its `Warpgroups` warpgroups, 1024-byte aligned for swizzling.
template <typename Weights, typename Tiles, int Warpgroups>
struct pass_shared_memory {
    static constexpr size_t bytes = sizeof(Weights) + Warpgroups * sizeof(Tiles) + 1024;
    Weights& weights;
    Tiles (&tiles)[Warpgroups];

    __device__ static pass_shared_memory allocate(int* base) {
        tma_swizzle_allocator allocator(base);
        Weights& w = allocator.allocate<Weights>();
        return {w, allocator.allocate<Tiles, Warpgroups>()};
    }
};

// Tiles of 64 pairs (b, i, j0..j0+63) in memory order, j0 = 64 * jt; the last
// tile of a row reaches into the padding (columns N..Np-1).
struct pair_tile {
    int b, i, jt;
};

__device__ inline pair_tile decode_pair_tile(int t, int row_tiles, int n) {
    const int bi = t / row_tiles;
    return {bi / n, bi % n, t % row_tiles};
}

// Number of pair tiles of a [batch, n, n, *] problem; throws past int range.
inline int pair_tiles(int batch, int n, const char* name) {
    const long long tiles = static_cast<long long>(batch) * n * (trimul_padded(n) / kTrimulRowBlock);
    if (tiles > INT_MAX) throw std::invalid_argument(std::string(name) + ": too many pair tiles for one launch");
    return static_cast<int>(tiles);
}

// Launches `kernel(g)` on a persistent grid: min(blocks, multiprocessors) blocks
// of `threads` threads with `smem` bytes of dynamic shared memory. The first
// launch on a device prepares the kernel (kernel_setup.h) and checks its
// setmaxnreg `budget`, if it has one.
template <typename Kernel, typename Globals>
void launch_persistent(Kernel kernel, const Globals& g, long long blocks, int threads, size_t smem,
                       cudaStream_t stream, const char* name, const RegisterBudget* budget = nullptr) {
    prepare_kernel(kernel, name, smem, budget);
    int device = 0, sms = 0;
    cuda_check(cudaGetDevice(&device), "cudaGetDevice");
    cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    kernel<<<static_cast<int>(std::min<long long>(blocks, sms)), threads, smem, stream>>>(g);
    cuda_check(cudaGetLastError(), name);
}

// Calls f.template operator()<T>() with the ThunderKittens type of `dtype`.
template <typename F>
void dispatch_dtype(TrimulDtype dtype, F&& f) {
    if (dtype == TrimulDtype::kBFloat16) {
        f.template operator()<bf16>();
    } else {
        f.template operator()<half>();
    }
}

// Calls f.template operator()<C, H>() for c_z = c and c_hidden = hidden in {64, 128}.
template <typename F>
void dispatch_channels(int c, int hidden, const char* name, F&& f) {
    if (c == 64 && hidden == 64) return f.template operator()<64, 64>();
    if (c == 64 && hidden == 128) return f.template operator()<64, 128>();
    if (c == 128 && hidden == 64) return f.template operator()<128, 64>();
    if (c == 128 && hidden == 128) return f.template operator()<128, 128>();
    throw std::invalid_argument(std::string(name) + ": c_z and c_hidden must be 64 or 128");
}

}  // namespace trimul
}  // namespace genie_tk
