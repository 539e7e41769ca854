// Run-time dispatch of the forward kernel to its (dtype, head dim) instantiation.
#include "triangle_attention/triangle_attention_launch.h"

namespace genie_tk {

void triangle_attention_fwd_sm90(const TriangleAttentionFwdArgs& args, cudaStream_t stream) {
    dispatch_triangle_attention(args.p, [&]<AttentionDtype DT, int D>() {
        launch_triangle_attention_fwd<DT, D>(args, stream);
    });
}

}  // namespace genie_tk
