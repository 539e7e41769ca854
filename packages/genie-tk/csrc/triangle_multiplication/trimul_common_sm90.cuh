// Device helpers shared by the tri-mul input and output kernels: LayerNorm of
// the rows or the columns of a shared tile in place, and element-wise access
// to wgmma accumulators with their coordinates.
#pragma once

#include "kittens.cuh"

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

}  // namespace trimul
}  // namespace genie_tk
