// Forward kernels for head dim 16 (bf16, fp16); one translation unit per head dim.
#include "triangle_attention/triangle_attention_fwd_sm90.cuh"

namespace genie_tk {
template void launch_triangle_attention_fwd<AttentionDtype::kBFloat16, 16>(const TriangleAttentionFwdArgs&, cudaStream_t);
template void launch_triangle_attention_fwd<AttentionDtype::kFloat16, 16>(const TriangleAttentionFwdArgs&, cudaStream_t);
}  // namespace genie_tk
