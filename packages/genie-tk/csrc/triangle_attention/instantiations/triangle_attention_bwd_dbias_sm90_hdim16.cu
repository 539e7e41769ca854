// Backward dbias kernels for head dim 16 (bf16, fp16).
#include "triangle_attention/triangle_attention_bwd_sm90.cuh"

namespace genie_tk {
template void launch_triangle_attention_bwd_dbias<AttentionDtype::kBFloat16, 16>(const TriangleAttentionBwdArgs&, cudaStream_t);
template void launch_triangle_attention_bwd_dbias<AttentionDtype::kFloat16, 16>(const TriangleAttentionBwdArgs&, cudaStream_t);
}  // namespace genie_tk
