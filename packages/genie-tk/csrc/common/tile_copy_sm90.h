// Host entry point of the TMA round-trip kernel (tile_copy_sm90.cu). Kept free
// of ThunderKittens and nanobind so the bindings compile with the host compiler.
#pragma once

#include <cuda_runtime.h>

namespace genie_tk {

// Side of the square bf16 tile the kernel moves; rows and cols must be
// multiples of it.
inline constexpr int kTileCopyTile = 64;

// dst[r, c] = src[r, c] for row-major bf16 matrices of rows x cols, each
// 64 x 64 tile loaded into shared memory by TMA and stored back by TMA.
// Preconditions (checked by the binding): device pointers of the current
// device, 16-byte aligned, rows and cols positive multiples of kTileCopyTile.
// Asynchronous on `stream`; throws std::runtime_error if the launch fails.
void tile_copy_sm90(void* dst, const void* src, int rows, int cols, cudaStream_t stream);

}  // namespace genie_tk
