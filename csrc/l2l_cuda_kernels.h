// Launchers of the CUDA kernels (l2l_cuda_kernels.cu): raw pointers and a stream, no torch types.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "l2l_math.h"

namespace l2l {

constexpr int kRowsPerLaunch = 256;      // tensors per forward launch: a 20 KB table
constexpr int kForwardBlock = 160;       // coordinates per block of the forward (a tile of the tiled kernel)
constexpr size_t kWeightsSharedBytes = 96 * 1024;

// The forward launch's table, passed by value as the kernel's parameter (CUDA 12.1 allows 32 KB of them),
// as PyTorch's fused optimizers pass their tensor lists: nothing is uploaded, so a CUDA graph captures the
// table with the launch and replays it as it was. A group of more tensors takes one launch per 256.
struct LaunchTable {
  int64_t rows[kRowsPerLaunch][kTableColumns];  // first blocks count from this launch's first
  int count;
};

bool weights_fit_shared(const NetShape& s);
int backward_blocks(int64_t n);
// skipped: nullptr (meta-training's θ + Δ), or an int64 on the device for the optimizer's step, which counts
// (and so skips) coordinates whose ∇ is NaN or ±inf, leaves the state of zero-∇ ones, and applies `u`.
cudaError_t launch_forward(const LaunchTable& table, int64_t blocks, const float* weights, const NetShape& s,
                           bool bf16_state, int64_t* skipped, const Update& u, cudaStream_t stream);
// partial: [backward_blocks(n), packed_size(s)] zeros; its column sums are the packed weight gradients.
cudaError_t launch_backward(const float* grad, const void* h, const void* c, const float* dtheta,
                            const float* dh_next, const float* dc_next, float* dh, float* dc, float* partial,
                            const float* weights, int64_t n, const NetShape& s, bool bf16_state, cudaStream_t stream);

}  // namespace l2l
