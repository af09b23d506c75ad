// Launchers of the CUDA kernels (l2l_cuda_kernels.cu): raw pointers and a stream, no torch types.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "l2l_math.h"

namespace l2l {

constexpr int kTableColumns = 10;        // θ in, θ out, ∇, h in, h out, c in, c out, size, dtype code, first block
constexpr int kForwardBlock = 128;       // coordinates per block
constexpr int kMaxBackwardBlocks = 1024; // fixed, so the weight-gradient sums are the same on any GPU
constexpr size_t kWeightsSharedBytes = 96 * 1024;

bool weights_fit_shared(const NetShape& s);
int backward_blocks(int64_t n);
// skipped: nullptr, or an int64 on the device that counts (and so skips) coordinates whose ∇ is NaN or ±inf.
cudaError_t launch_forward(const int64_t* table, int rows, int64_t blocks, const float* weights, const NetShape& s,
                           bool bf16_state, int64_t* skipped, cudaStream_t stream);
// partial: [backward_blocks(n), packed_size(s)] zeros; its column sums are the packed weight gradients.
cudaError_t launch_backward(const float* grad, const void* h, const void* c, const float* dtheta,
                            const float* dh_next, const float* dc_next, float* dh, float* dc, float* partial,
                            const float* weights, int64_t n, const NetShape& s, bool bf16_state, cudaStream_t stream);

}  // namespace l2l
