// CUDA kernels of the step and its backward. Plain CUDA: this file needs no torch header, so it compiles
// anywhere nvcc does (CI checks it for sm_90); l2l_cuda.cpp turns tensors into the launches below.
//
// One thread per coordinate, 128 to a block; the packed weights (l2l_math.h) are copied into shared memory
// once per block when they fit (every thread reads the same weight at the same time: a broadcast), and read
// through L1 otherwise. Forward: one launch for up to 256 tensors of a param group, through a table with a
// row per tensor (the columns of l2l_constants.h, as the Triton launcher writes them) that is the kernel's parameter; a block finds its row by binary
// search on the first blocks.
// Backward: a fixed number of blocks (at most kBackwardPrograms, whatever the GPU) walk tiles of 128
// coordinates in a fixed order; each tile's weight gradients are reduced in shared memory and added into the
// block's own row of a partial-sum buffer, so the final sum over rows is deterministic, without atomics.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "l2l_cuda_kernels.h"
#include "l2l_math.h"

namespace l2l {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float load_param(int64_t addr, int64_t i, int code) {
  switch (code) {
    case kCodeFloat32: return reinterpret_cast<const float*>(addr)[i];
    case kCodeBfloat16: return from_bf16_bits(reinterpret_cast<const uint16_t*>(addr)[i]);
    case kCodeFloat16: return __half2float(reinterpret_cast<const __half*>(addr)[i]);
    default: return static_cast<float>(reinterpret_cast<const double*>(addr)[i]);
  }
}

// θ' = θ·decay + step in float32 (float64 for float64 θ), rounded once to θ's dtype.
__device__ __forceinline__ void store_theta(int64_t in, int64_t out, int64_t i, int code, float decay, float step) {
  switch (code) {
    case kCodeFloat32:
      reinterpret_cast<float*>(out)[i] = reinterpret_cast<const float*>(in)[i] * decay + step;
      break;
    case kCodeBfloat16:
      reinterpret_cast<uint16_t*>(out)[i] =
          to_bf16_bits(from_bf16_bits(reinterpret_cast<const uint16_t*>(in)[i]) * decay + step);
      break;
    case kCodeFloat16:
      reinterpret_cast<__half*>(out)[i] =
          __float2half_rn(__half2float(reinterpret_cast<const __half*>(in)[i]) * decay + step);
      break;
    default:
      reinterpret_cast<double*>(out)[i] =
          reinterpret_cast<const double*>(in)[i] * static_cast<double>(decay) + static_cast<double>(step);
  }
}

// The packed weights where this block reads them: shared memory if it holds them, else global memory.
__device__ __forceinline__ const float* stage_weights(const float* weights, int64_t packed, bool in_shared,
                                                      float* shared) {
  if (!in_shared) return weights;
  for (int64_t i = threadIdx.x; i < packed; i += blockDim.x) shared[i] = weights[i];
  __syncthreads();
  return shared;
}

template <int H_CT, typename S>
__global__ void __launch_bounds__(kThreads) forward_kernel(const __grid_constant__ LaunchTable table,
                                                           const float* weights, int64_t packed,
                                                           bool weights_in_shared, NetShape s,
                                                           unsigned long long* skipped, Update u) {
  extern __shared__ float shared[];
  const float* w = stage_weights(weights, packed, weights_in_shared, shared);
  // __grid_constant__: the rows are read where the parameter lives (the constant bank, where a block's
  // uniform reads broadcast), not copied per thread.
  int lo = 0, hi = table.count - 1;  // the last row whose first block is <= this block (empty tensors have none)
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.rows[mid][kColFirstBlock] <= static_cast<int64_t>(blockIdx.x)) lo = mid; else hi = mid - 1;
  }
  const int64_t* row = table.rows[lo];
  const int64_t numel = row[kColNumel];
  const int64_t n = (static_cast<int64_t>(blockIdx.x) - row[kColFirstBlock]) * kThreads + threadIdx.x;
  if (n >= numel) return;
  const int code = static_cast<int>(row[kColDtype]);
  float g = load_param(row[kColGrad], n, code);
  float lr = 1.0f, decay = 1.0f;  // meta-training's step: θ + Δ
  if (skipped != nullptr) {  // the optimizer's step
    // A NaN or ±inf gradient leaves the coordinate's θ and state as they are; the warp counts its skipped
    // coordinates with one atomic (an overflowing AMP step makes every coordinate skip).
    const bool bad = !isfinite(g);
    const unsigned active = __activemask();
    const unsigned ballot = __ballot_sync(active, bad);
    if (ballot != 0 && static_cast<int>(threadIdx.x % 32) == __ffs(active) - 1) atomicAdd(skipped, __popc(ballot));
    if (bad) return;
    lr = u.lr_ptr != nullptr ? *u.lr_ptr : u.lr;
    decay = decay_factor(lr, u.weight_decay);
    if (g == 0.0f) {  // no gradient signal: the state stays, θ only decays
      store_theta(row[kColThetaIn], row[kColThetaOut], n, code, decay, -0.0f);
      return;
    }
    if (u.maximize) g = -g;
  }
  const int64_t at = n * s.hidden;
  const float delta = coordinate_forward<H_CT, S>(
      s, w, g, reinterpret_cast<const S*>(row[kColHIn]) + at, reinterpret_cast<const S*>(row[kColCIn]) + at,
      reinterpret_cast<S*>(row[kColHOut]) + at, reinterpret_cast<S*>(row[kColCOut]) + at, numel * s.hidden);
  store_theta(row[kColThetaIn], row[kColThetaOut], n, code, decay, lr * delta);
}

// Weight gradients of one tile of kThreads coordinates, summed over the tile in shared memory and added
// into this block's row of partial sums (which no other block touches).
struct BlockSink {
  const NetShape& s;
  float* scratch;  // [kThreads][4H] dz, then [kThreads][n_x + H] inputs
  float* partial;  // this block's row, packed like the weights

  __device__ void reduce(int64_t offset, const float* dz, int n_dz, const float* in, int n_in) {
    float* DZ = scratch;
    float* IN = scratch + kThreads * n_dz;
    const int t = threadIdx.x;
    for (int j = 0; j < n_dz; ++j) DZ[t * n_dz + j] = dz[j];
    for (int k = 0; k < n_in; ++k) IN[t * n_in + k] = in[k];
    __syncthreads();
    const int entries = (n_in + 1) * n_dz;  // rows k < n_in: input k; the last row: the bias (input 1)
    for (int e = t; e < entries; e += kThreads) {
      const int k = e / n_dz, j = e % n_dz;
      float acc = 0.0f;
      for (int u = 0; u < kThreads; ++u) acc += (k < n_in ? IN[u * n_in + k] : 1.0f) * DZ[u * n_dz + j];
      partial[offset + e] += acc;
    }
    __syncthreads();
  }
  __device__ void head(float du, const float* h_top) {
    // w_out [H] then b_out: the transpose of reduce's layout with one "gate" (du) and inputs h_top.
    float* DU = scratch;
    float* IN = scratch + kThreads;
    const int t = threadIdx.x, H = s.hidden;
    DU[t] = du;
    for (int k = 0; k < H; ++k) IN[t * H + k] = h_top[k];
    __syncthreads();
    for (int k = t; k <= H; k += kThreads) {
      float acc = 0.0f;
      for (int u = 0; u < kThreads; ++u) acc += (k < H ? IN[u * H + k] : 1.0f) * DU[u];
      partial[layer_offset(s, s.layers) + k] += acc;
    }
    __syncthreads();
  }
  __device__ void layer(int l, const float* dz, const float* x, int n_x, const float* h) {
    float in[kMaxHidden * 2];
    for (int k = 0; k < n_x; ++k) in[k] = x[k];
    for (int k = 0; k < s.hidden; ++k) in[n_x + k] = h[k];
    reduce(layer_offset(s, l), dz, 4 * s.hidden, in, n_x + s.hidden);
  }
};

template <int H_CT, typename S>
__global__ void __launch_bounds__(kThreads) backward_kernel(const float* grad, const S* h, const S* c,
                                                            const float* dtheta, const float* dh_next,
                                                            const float* dc_next, float* dh, float* dc,
                                                            float* partial, const float* weights, int64_t packed,
                                                            bool weights_in_shared, int64_t n, NetShape s) {
  extern __shared__ float shared[];
  const float* w = stage_weights(weights, packed, weights_in_shared, shared);
  BlockSink sink{s, shared + (weights_in_shared ? packed : 0), partial + blockIdx.x * packed};
  constexpr int HM = H_CT ? H_CT : kMaxHidden;
  // A thread past the end still takes part in the block's reductions, with zero adjoints: all of its
  // weight-gradient contributions are zero.
  S zero_state[HM] = {};
  float zero[HM] = {}, sink_dh[HM], sink_dc[HM];
  const int64_t stride = n * s.hidden, tiles = (n + kThreads - 1) / kThreads;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t i = tile * kThreads + threadIdx.x;
    if (i < n) {
      const int64_t at = i * s.hidden;
      coordinate_backward<H_CT, S>(s, w, grad[i], h + at, c + at, stride, dtheta[i], dh_next + at, dc_next + at,
                                   dh + at, dc + at, sink);
    } else {
      coordinate_backward<H_CT, S>(s, w, 0.0f, zero_state, zero_state, 0, 0.0f, zero, zero, sink_dh, sink_dc, sink);
    }
  }
}

template <typename Fn>
cudaError_t dispatch(const NetShape& s, bool bf16_state, Fn&& fn) {
  if (bf16_state) {
    return s.hidden == 20 ? fn(std::integral_constant<int, 20>(), uint16_t()) : fn(std::integral_constant<int, 0>(), uint16_t());
  }
  return s.hidden == 20 ? fn(std::integral_constant<int, 20>(), float()) : fn(std::integral_constant<int, 0>(), float());
}

// Dynamic shared memory for a kernel, raising its limit above the default 48 KB when needed.
template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace

bool weights_fit_shared(const NetShape& s) { return packed_size(s) * sizeof(float) <= kWeightsSharedBytes; }

cudaError_t launch_forward(const LaunchTable& table, int64_t blocks, const float* weights, const NetShape& s,
                           bool bf16_state, int64_t* skipped, const Update& u, cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  const bool in_shared = weights_fit_shared(s);
  const size_t bytes = in_shared ? packed_size(s) * sizeof(float) : 0;
  return dispatch(s, bf16_state, [&](auto hidden, auto state) {
    auto kernel = forward_kernel<decltype(hidden)::value, decltype(state)>;
    cudaError_t err = allow_shared(kernel, bytes);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(table, weights, packed_size(s), in_shared, s,
                                                                     reinterpret_cast<unsigned long long*>(skipped), u);
    return cudaGetLastError();
  });
}

int backward_blocks(int64_t n) {
  const int64_t tiles = (n + kThreads - 1) / kThreads;
  return static_cast<int>(tiles < kBackwardPrograms ? (tiles > 0 ? tiles : 1) : kBackwardPrograms);
}

cudaError_t launch_backward(const float* grad, const void* h, const void* c, const float* dtheta,
                            const float* dh_next, const float* dc_next, float* dh, float* dc, float* partial,
                            const float* weights, int64_t n, const NetShape& s, bool bf16_state,
                            cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const bool in_shared = weights_fit_shared(s);
  const int64_t packed = packed_size(s);
  const int widest = (s.features > s.hidden ? s.features : s.hidden) + s.hidden;  // inputs of a layer
  const size_t bytes = ((in_shared ? packed : 0) + kThreads * (4 * s.hidden + widest)) * sizeof(float);
  return dispatch(s, bf16_state, [&](auto hidden, auto state) {
    using S = decltype(state);
    auto kernel = backward_kernel<decltype(hidden)::value, S>;
    cudaError_t err = allow_shared(kernel, bytes);
    if (err != cudaSuccess) return err;
    kernel<<<backward_blocks(n), kThreads, bytes, stream>>>(grad, static_cast<const S*>(h), static_cast<const S*>(c),
                                                            dtheta, dh_next, dc_next, dh, dc, partial, weights,
                                                            packed, in_shared, n, s);
    return cudaGetLastError();
  });
}

}  // namespace l2l
