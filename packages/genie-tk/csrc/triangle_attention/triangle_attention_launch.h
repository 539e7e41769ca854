// Launch templates of the triangle attention kernels, one instantiation per
// (element type, head dim) in instantiations/*.cu, and the dispatch from run
// time values to them. No ThunderKittens here: the dispatchers compile fast.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "triangle_attention/triangle_attention.h"

namespace genie_tk {

template <AttentionDtype DT, int D>
void launch_triangle_attention_fwd(const TriangleAttentionFwdArgs& args, cudaStream_t stream);

template <AttentionDtype DT, int D>
void launch_triangle_attention_bwd_dqkv(const TriangleAttentionBwdArgs& args, cudaStream_t stream);

template <AttentionDtype DT, int D>
void launch_triangle_attention_bwd_dbias(const TriangleAttentionBwdArgs& args, cudaStream_t stream);

// Work split of the dbias kernel, shared by the kernel and by
// triangle_attention_dbias_splits: each CTA owns dbias_query_blocks x
// dbias_key_blocks tiles of 64 x 64 and loops over a range of rows i.
inline constexpr int kDbiasQueryBlocks = 2;
inline constexpr int kDbiasKeyBlocks = 1;
inline constexpr int kDbiasMaxSplits = 16;

// Calls fn.template operator()<DT, D>() for the problem's dtype and head dim.
template <typename Fn>
void dispatch_triangle_attention(const TriangleAttentionProblem& p, Fn&& fn) {
    auto by_dim = [&]<AttentionDtype DT>() {
        switch (p.head_dim) {
            case 16: fn.template operator()<DT, 16>(); return;
            case 32: fn.template operator()<DT, 32>(); return;
            case 64: fn.template operator()<DT, 64>(); return;
            default:
                throw std::invalid_argument("genie_tk: triangle attention head dim must be 16, 32 or 64, got " +
                                            std::to_string(p.head_dim));
        }
    };
    if (p.dtype == AttentionDtype::kBFloat16) {
        by_dim.template operator()<AttentionDtype::kBFloat16>();
    } else {
        by_dim.template operator()<AttentionDtype::kFloat16>();
    }
}

}  // namespace genie_tk
