// TMA round trip for Hopper: every block loads one 64 x 64 bf16 tile from src
// into (swizzled) shared memory with a TMA load, waits on an mbarrier, and
// stores it back to dst with a TMA store. Trivial on purpose: it exercises the
// whole chain the real kernels use -- host-side tensor maps built by
// ThunderKittens' gl (through the run-time resolved cuTensorMapEncodeTiled),
// dynamic shared memory aligned for swizzling, semaphores, launch on the
// caller's stream -- so a GPU session can check the plumbing on its own.
#include "common/tile_copy_sm90.h"

#include "common/cuda_utils.h"
#include "common/debug_wait.cuh"
#include "kittens.cuh"

#include <stdexcept>
#include <string>

namespace genie_tk {
namespace tile_copy {

using namespace kittens;

struct config {
    static constexpr int tile_rows = kTileCopyTile;
    static constexpr int tile_cols = kTileCopyTile;
    static constexpr int num_threads = WARP_THREADS;  // lane 0 drives TMA, the rest wait
    static constexpr int max_grid_y = 65535;
};

struct globals {
    using tile = st_bf<config::tile_rows, config::tile_cols>;
    using layout = gl<bf16, 1, 1, -1, -1, tile>;  // (rows, cols), TMA descriptor for `tile`

    layout dst;
    layout src;

    // One block per tile: x over tile rows (up to 2^31 - 1), y over tile columns.
    dim3 grid() const { return dim3(src.rows() / config::tile_rows, src.cols() / config::tile_cols); }
    dim3 block() const { return dim3(config::num_threads); }
    // + 1024 so the allocator can align the tile to the 128-byte swizzle's
    // 1024-byte requirement wherever the dynamic segment starts.
    static constexpr size_t dynamic_shared_memory() { return sizeof(tile) + 1024; }
};

__global__ __launch_bounds__(config::num_threads, 1) void tile_copy_kernel(const __grid_constant__ globals g) {
    extern __shared__ alignment_dummy shared_memory[];
    tma_swizzle_allocator allocator(reinterpret_cast<int*>(&shared_memory[0]));
    globals::tile& tile = allocator.allocate<globals::tile>();
    __shared__ semaphore arrived;

    if (threadIdx.x == 0) {
        const coord<globals::tile> index{static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y)};
        init_semaphore(arrived, 0, 1);
        tma::expect_bytes(arrived, sizeof(globals::tile));
        tma::load_async(tile, g.src, index, arrived);
        GENIE_TK_WAIT(arrived, 0, "tile_copy.arrived", 0);
        tma::store_async(g.dst, tile, index);
        // Shared memory must outlive the bulk store's reads.
        tma::store_async_wait();
    }
}

}  // namespace tile_copy

void tile_copy_sm90(void* dst, const void* src, int rows, int cols, cudaStream_t stream) {
    using namespace tile_copy;
    if (cols / config::tile_cols > config::max_grid_y) {
        throw std::invalid_argument("genie_tk.tile_copy_sm90: at most " +
                                    std::to_string(config::max_grid_y * config::tile_cols) + " columns");
    }
    // Building the layouts encodes the TMA descriptors on the host.
    const globals g{
        globals::layout{static_cast<bf16*>(dst), nullptr, nullptr, static_cast<size_t>(rows),
                        static_cast<size_t>(cols)},
        globals::layout{static_cast<bf16*>(const_cast<void*>(src)), nullptr, nullptr,
                        static_cast<size_t>(rows), static_cast<size_t>(cols)},
    };
    tile_copy_kernel<<<g.grid(), g.block(), globals::dynamic_shared_memory(), stream>>>(g);
    cuda_check(cudaGetLastError(), "launching tile_copy_sm90");
}

}  // namespace genie_tk
