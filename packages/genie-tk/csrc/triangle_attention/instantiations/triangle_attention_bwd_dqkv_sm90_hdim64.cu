// Backward dq/dk/dv kernels for head dim 64 (bf16, fp16).
#include "triangle_attention/triangle_attention_bwd_sm90.cuh"

namespace genie_tk {
template void launch_triangle_attention_bwd_dqkv<AttentionDtype::kBFloat16, 64>(const TriangleAttentionBwdArgs&, cudaStream_t);
template void launch_triangle_attention_bwd_dqkv<AttentionDtype::kFloat16, 64>(const TriangleAttentionBwdArgs&, cudaStream_t);
}  // namespace genie_tk
