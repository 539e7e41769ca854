// Run-time dispatch of the backward kernels to their (dtype, head dim)
// instantiations, and the row split of the dbias kernel.
#include <algorithm>

#include "triangle_attention/triangle_attention_launch.h"

namespace genie_tk {

void triangle_attention_bwd_dqkv_sm90(const TriangleAttentionBwdArgs& args, cudaStream_t stream) {
    dispatch_triangle_attention(args.p, [&]<AttentionDtype DT, int D>() {
        launch_triangle_attention_bwd_dqkv<DT, D>(args, stream);
    });
}

void triangle_attention_bwd_dbias_sm90(const TriangleAttentionBwdArgs& args, cudaStream_t stream) {
    dispatch_triangle_attention(args.p, [&]<AttentionDtype DT, int D>() {
        launch_triangle_attention_bwd_dbias<DT, D>(args, stream);
    });
}

int triangle_attention_dbias_splits(const TriangleAttentionProblem& p, int num_sms) {
    const long long blocks = (p.n + kTriangleAttentionBlock - 1) / kTriangleAttentionBlock;
    const long long ctas_per_split = static_cast<long long>(p.batch) * p.heads *
                                     ((blocks + kDbiasQueryBlocks - 1) / kDbiasQueryBlocks) *
                                     ((blocks + kDbiasKeyBlocks - 1) / kDbiasKeyBlocks);
    // About two CTAs per multiprocessor; each split adds an fp32 N x Np plane
    // per (b, h), so never more than kDbiasMaxSplits of them.
    const long long target = 2LL * std::max(num_sms, 1);
    const long long wanted = std::max(1LL, (target + ctas_per_split - 1) / std::max(ctas_per_split, 1LL));
    const long long splits = std::min({wanted, static_cast<long long>(kDbiasMaxSplits), static_cast<long long>(p.rows)});
    const long long rows_per_split = (p.rows + splits - 1) / splits;
    return static_cast<int>((p.rows + rows_per_split - 1) / rows_per_split);  // no empty split
}

}  // namespace genie_tk
