// CUDA kernels of the step and its backward. Plain CUDA: this file needs no torch header, so it compiles
// anywhere nvcc does (CI checks it for sm_90); l2l_cuda.cpp turns tensors into the launches below.
//
// Forward: one launch for up to 256 tensors of a param group, through a table with a row per tensor (the
// columns of l2l_constants.h, as the Triton launcher writes them) that is the kernel's parameter. A tensor's
// coordinates fall in tiles of kForwardBlock; a tile finds its row by binary search on the rows' first tiles.
// At the paper's hidden size (20) tiled_forward_kernel runs: a persistent grid whose blocks stage φ in shared
// memory once, then compute each layer of a tile as a matrix product [160 coordinates x inputs] . [inputs x 4H]
// on the FMA pipe, a thread holding 10 coordinates x 2 units (all 4 gates) in registers: per pair of inputs,
// 9 float4 loads from shared memory feed 160 FFMAs. (With one load per FMA, as one thread per coordinate
// reading φ does, the load/store unit would bound it at 3x the memory time.) Any other H, or state not aligned
// for its vector accesses, runs forward_kernel: one thread per coordinate (coordinate_forward of l2l_math.h),
// φ copied into shared memory once per block when it fits, else read through L1.
// Backward: a fixed number of blocks (at most kBackwardPrograms, whatever the GPU) walk tiles in a fixed order
// and add each tile's weight gradients into the block's own row of a partial-sum buffer, so the final sum over
// rows is deterministic, without atomics. At H = 20, tiled_backward_kernel (tiles of 160 coordinates, the tiled
// forward's layout and staged φ; notes at "the tiled backward" below); any other H, or state or adjoints not
// aligned for its vector accesses, backward_kernel: one thread per coordinate (coordinate_backward of
// l2l_math.h), tiles of 128, each tile's weight gradients reduced in shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "l2l_cuda_kernels.h"
#include "l2l_math.h"

namespace l2l {
namespace {

constexpr int kThreads = 128;  // of a backward block

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

// The table row of a tile: the last row whose first tile is <= it (empty tensors have none). __grid_constant__:
// the rows are read where the parameter lives (the constant bank, where a block's uniform reads broadcast),
// not copied per thread.
__device__ __forceinline__ const int64_t* row_of(const LaunchTable& table, int64_t tile) {
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.rows[mid][kColFirstBlock] <= tile) lo = mid; else hi = mid - 1;
  }
  return table.rows[lo];
}

// What the optimizer's step does with a coordinate (`mine`: this thread has one); every thread of the warp takes
// part. A NaN or ±inf gradient leaves its θ and state as they are; the warp counts its skipped coordinates with
// one atomic (an overflowing AMP step makes every coordinate skip). A zero gradient carries no signal: the
// state stays, θ only decays. Under maximize the net is fed −∇.
enum class Step { kNone, kDecay, kFull };
__device__ __forceinline__ Step optimizer_step(float& g, bool mine, unsigned long long* skipped, const Update& u) {
  const bool bad = mine && !isfinite(g);
  const unsigned ballot = __ballot_sync(0xFFFFFFFFu, bad);
  if (ballot != 0 && threadIdx.x % 32 == 0) atomicAdd(skipped, __popc(ballot));
  if (!mine || bad) return Step::kNone;
  if (g == 0.0f) return Step::kDecay;
  if (u.maximize) g = -g;
  return Step::kFull;
}

__device__ __forceinline__ float step_lr(const Update& u) { return u.lr_ptr != nullptr ? *u.lr_ptr : u.lr; }

template <typename S>
__global__ void __launch_bounds__(kForwardBlock) forward_kernel(const __grid_constant__ LaunchTable table,
                                                           const float* weights, int64_t packed,
                                                           bool weights_in_shared, NetShape s,
                                                           unsigned long long* skipped, Update u) {
  extern __shared__ float shared[];
  const float* w = stage_weights(weights, packed, weights_in_shared, shared);
  const int64_t* row = row_of(table, blockIdx.x);
  const int64_t numel = row[kColNumel];
  const int64_t n = (static_cast<int64_t>(blockIdx.x) - row[kColFirstBlock]) * kForwardBlock + threadIdx.x;
  const int code = static_cast<int>(row[kColDtype]);
  float g = n < numel ? load_param(row[kColGrad], n, code) : 0.0f;
  float lr = 1.0f, decay = 1.0f;  // meta-training's step: θ + Δ
  Step step = n < numel ? Step::kFull : Step::kNone;
  if (skipped != nullptr) {  // the optimizer's step
    step = optimizer_step(g, n < numel, skipped, u);
    lr = step_lr(u);
    decay = decay_factor(lr, u.weight_decay);
  }
  if (step == Step::kNone) return;
  float theta_step = -0.0f;  // kDecay: θ·decay alone
  if (step == Step::kFull) {
    const int64_t at = n * s.hidden;
    theta_step = lr * coordinate_forward<0, S>(
        s, w, g, reinterpret_cast<const S*>(row[kColHIn]) + at, reinterpret_cast<const S*>(row[kColCIn]) + at,
        reinterpret_cast<S*>(row[kColHOut]) + at, reinterpret_cast<S*>(row[kColCOut]) + at, numel * s.hidden);
  }
  store_theta(row[kColThetaIn], row[kColThetaOut], n, code, decay, theta_step);
}

// ------------------------------------------------------------------------------------ the tiled forward

constexpr int kTileHidden = 20;
constexpr int kTile = kForwardBlock;  // coordinates of a tile, one per thread for what is done per coordinate
constexpr int kTileThreads = 160;
constexpr int kTileBlocksPerSM = 2;  // registers (168 a thread) and shared memory (46-60 KB) allow it on sm_90
// A thread computes units 2 pair, 2 pair + 1 (pair = thread / 16) of coordinates 2 group + 32 r + {0, 1}
// (group = thread % 16, r < kRuns): its 10 cells.
constexpr int kRuns = 5;
static_assert(kTile == kTileThreads && kTileThreads == kTileHidden / 2 * 16 && kTile == 32 * kRuns, "the cells");
// A tile's inputs in shared memory are interleaved by pairs of rows: input k of coordinate c is element k % 2 of
// float2 (k / 2) kPairStride + c. So a float4 load brings two inputs of two coordinates and an h' pair (units
// 2 pair, 2 pair + 1) is one store; the padding puts consecutive pairs of rows 4 banks apart, which spreads the
// transposing stores of the state.
constexpr int kPairStride = kTile + 2;
constexpr int kHeadSlots = (kTileHidden + 1 + 3) / 4;  // w_out and b_out, in float4 slots

// Inputs of layer l as staged: layer 0 keeps two rows for the gradient features (the second all zeros without
// preprocessing), so one code serves both.
__host__ __device__ constexpr int tile_rows(int l) { return (l == 0 ? 2 : kTileHidden) + kTileHidden; }
// Where layer l starts in the staged weights, in float4 slots: per unit, one slot (its 4 gates) per input and
// one for the bias.
__host__ __device__ constexpr int tile_layer_offset(int l) {
  return l == 0 ? 0 : kTileHidden * (tile_rows(0) + 1) + (l - 1) * kTileHidden * (tile_rows(1) + 1);
}
// Staged weights, head, the tile's inputs (2H rows) and a bit per coordinate: whether its state is written.
size_t tile_shared_bytes(int layers) {
  return (tile_layer_offset(layers) + kHeadSlots) * sizeof(float4) + kTileHidden * kPairStride * sizeof(float2) +
         kTile / 8;
}
// The kernel moves the state 4 values (of one coordinate) at a time, 2 in its cells: a tensor's state must start
// on a multiple of 4 values (as PyTorch allocates it; views along N of [L, N, H] keep it, H being 20).
template <typename S>
bool tile_aligned(int64_t address) { return static_cast<uint64_t>(address) % (4 * sizeof(S)) == 0; }

// The gates' activations, float32-accurate without the IEEE divide's slow path: one MUFU.EX2 and one MUFU.RCP
// each. The staged weights of the i, f, o gates are scaled by -log2 e and those of g by 2 log2 e, so a gate's dot
// product is already the exponent e:
//   σ = 1 / (1 + 2^e),   tanh = 1 + r  with  r = -2 / (1 + 2^e)  = 1 / (-0.5 - 0.5 · 2^e)
// (exact at ±∞: 2^e is 0 or ∞, 1/∞ = 0; NaN stays NaN). tanh is never formed: x · tanh = x + x r, one FMA.
// Error (PTX ISA: ex2.approx.f32 within 2 ulp, rcp.approx.f32 within 1 ulp): 1 + 2^e adds half an ulp (scaled
// by -0.5, exactly), so σ and r are within 3.5 ulp, 2.1e-7 relative; tanh = 1 + r within 4.2e-7 absolute (its
// relative accuracy near 0 is lost, as in the reference's (1 - e) / (1 + e)). Scaling the weights rounds each
// product once more: the exponent is that of z perturbed by 2^-24 Σ|w x|, one more rounding of the float32 dot
// product, whose own error is larger. .ftz flushes a 2^e below 2^-126 to 0, where σ and tanh round to 1 and -1
// anyway, and a σ or r below 2^-126 to 0 (absolute error < 1.2e-38). All far inside the float32 test bound
// 1e-5 (1 + |ref|).
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float sigmoid_of(float e) { return rcp(1.0f + ex2(e)); }
__device__ __forceinline__ float tanh_minus_1_of(float e) { return rcp(fmaf(ex2(e), -0.5f, -0.5f)); }

// A unit's (h', c') from its gates' exponents (i, f, g, o) and c: c' = f c + i tanh g, h' = o tanh c'.
__device__ __forceinline__ float2 lstm_cell(float4 e, float c) {
  const float i = sigmoid_of(e.x), c_new = fmaf(sigmoid_of(e.y), c, fmaf(i, tanh_minus_1_of(e.z), i));
  const float o = sigmoid_of(e.w);
  return make_float2(fmaf(o, tanh_minus_1_of(2.0f * kLog2e * c_new), o), c_new);
}

// State values in twos (units 2 pair, 2 pair + 1) and fours (units 4 q to 4 q + 3). bfloat16 is rounded to
// nearest even by the hardware's conversion, as to_bf16_bits does (a NaN stays a NaN).
__device__ __forceinline__ float bf16_lo(uint32_t b) { return __uint_as_float(b << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t b) { return __uint_as_float(b & 0xFFFF0000u); }
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const uint16_t* p) {
  const uint32_t b = *reinterpret_cast<const uint32_t*>(p);
  return make_float2(bf16_lo(b), bf16_hi(b));
}
__device__ __forceinline__ void store2(float* p, float2 v) { *reinterpret_cast<float2*>(p) = v; }
__device__ __forceinline__ void store2(uint16_t* p, float2 v) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __float22bfloat162_rn(v);
}
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const uint16_t* p) {
  const uint2 b = *reinterpret_cast<const uint2*>(p);
  return make_float4(bf16_lo(b.x), bf16_hi(b.x), bf16_lo(b.y), bf16_hi(b.y));
}

// φ as the tiled kernel reads it: per layer and unit, a float4 of the 4 gates' (pre-scaled) weights for each
// input, then for the bias; then the head's w_out and b_out.
__device__ void stage_tile_weights(const float* weights, const NetShape& s, float4* w, float* head) {
  constexpr int H = kTileHidden;
  for (int e = threadIdx.x; e < tile_layer_offset(s.layers); e += blockDim.x) {
    const int l = e < tile_layer_offset(1) ? 0 : 1 + (e - tile_layer_offset(1)) / (H * (tile_rows(1) + 1));
    const int slot = e - tile_layer_offset(l), unit = slot / (tile_rows(l) + 1), k = slot % (tile_rows(l) + 1);
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (l > 0 || k >= 2 || k < s.features) {
      const int packed_row = l > 0 || k < 2 ? k : k - 2 + s.features;
      const float* p = weights + layer_offset(s, l) + packed_row * 4 * H + unit;
      v = make_float4(-kLog2e * p[0], -kLog2e * p[H], 2.0f * kLog2e * p[2 * H], -kLog2e * p[3 * H]);
    }
    w[e] = v;
  }
  const float* w_out = weights + layer_offset(s, s.layers);
  for (int k = threadIdx.x; k <= H; k += blockDim.x) head[k] = w_out[k];
}

// A tile's h of one layer (coordinates [0, count) from `h`, H values each) into the H / 2 row pairs from `rows`:
// consecutive threads load consecutive fours of values (of one coordinate), coalesced. The rows of coordinates
// past the tensor's end keep what they held: nothing of those coordinates is stored, and no coordinate's
// arithmetic reads another's.
template <typename S>
__device__ __forceinline__ void stage_state(const S* h, float2* rows, int count) {
  constexpr int kFours = kTileHidden / 4, kCoordsPerPass = kTileThreads / kFours;
  static_assert(kTileHidden % 4 == 0 && kTileThreads % kFours == 0 && kTile % kCoordsPerPass == 0, "fours");
  const int pair = 2 * (threadIdx.x % kFours), first = threadIdx.x / kFours;
#pragma unroll
  for (int j = 0; j < kTile / kCoordsPerPass; ++j) {
    const int coord = first + j * kCoordsPerPass;
    if (coord < count) {
      const float4 v = load4(h + 4 * (threadIdx.x + j * kTileThreads));
      rows[pair * kPairStride + coord] = make_float2(v.x, v.y);
      rows[(pair + 1) * kPairStride + coord] = make_float2(v.z, v.w);
    }
  }
}

__device__ __forceinline__ float4 fma4(float4 w, float x, float4 acc) {
  return make_float4(fmaf(w.x, x, acc.x), fmaf(w.y, x, acc.y), fmaf(w.z, x, acc.z), fmaf(w.w, x, acc.w));
}

// Row pair kp of a layer's product: inputs 2 kp, 2 kp + 1 of the thread's cells times their weights, added to z,
// or at the first pair to the biases (w0[Rows], w1[Rows]), which spares copying them into the accumulators.
template <int Rows, bool kFirst>
__device__ __forceinline__ void product_pair(float4 (&z)[2][2 * kRuns], const float4* x, const float4* w0,
                                             const float4* w1, int kp) {
  const float4 a0 = w0[2 * kp], a1 = w0[2 * kp + 1], b0 = w1[2 * kp], b1 = w1[2 * kp + 1];
#pragma unroll
  for (int r = 0; r < kRuns; ++r) {
    const float4 v = x[kp * (kPairStride / 2) + 16 * r];  // inputs 2 kp, 2 kp + 1 of cells 2 r, then 2 r + 1
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int i = 2 * r + e;
      const float x0 = e == 0 ? v.x : v.z, x1 = e == 0 ? v.y : v.w;
      z[0][i] = fma4(a1, x1, fma4(a0, x0, kFirst ? w0[Rows] : z[0][i]));
      z[1][i] = fma4(b1, x1, fma4(b0, x0, kFirst ? w1[Rows] : z[1][i]));
    }
  }
}

// One layer of a tile: its inputs from rows [0, Rows) of `in`, its h' into rows [0, H) once every thread has
// read them. c_in, h_out, c_out point at this thread's first cell (coordinate 2 group, unit 2 pair) of this
// layer's state; bit i of `keep`: whether cell i's state is written.
template <int Rows, typename S>
__device__ __forceinline__ void tile_layer(const float4* w, float2* in, unsigned keep, int pair, int group,
                                           const S* c_in, S* h_out, S* c_out) {
  constexpr int H = kTileHidden;
  static_assert(Rows % 2 == 0 && Rows / 2 % 3 == 2, "the loop between the first and last row pairs goes by 3");
  // The gate exponents of units 2 pair + u, cells i: the bias plus Σ_k input k · weight k, a float4 of 4 gates.
  const float4* w0 = w + 2 * pair * (Rows + 1);
  const float4* w1 = w0 + Rows + 1;
  const float4* x = reinterpret_cast<const float4*>(in) + group;
  float4 z[2][2 * kRuns];
  product_pair<Rows, true>(z, x, w0, w1, 0);
#pragma unroll (Rows / 2 - 2) / 3
  for (int kp = 1; kp < Rows / 2 - 1; ++kp) product_pair<Rows, false>(z, x, w0, w1, kp);
  product_pair<Rows, false>(z, x, w0, w1, Rows / 2 - 1);
  __syncthreads();  // every thread is done with this layer's inputs
  float2* h_rows = in + pair * kPairStride + 2 * group;
#pragma unroll
  for (int i = 0; i < 2 * kRuns; ++i) {
    const int at = 32 * (i / 2) + i % 2;  // cell i's coordinate, from 2 group
    const bool kept = keep >> i & 1;
    const float2 c = kept ? load2(c_in + at * H) : make_float2(0.0f, 0.0f);
    const float2 cell0 = lstm_cell(z[0][i], c.x), cell1 = lstm_cell(z[1][i], c.y);
    const float2 h_new = make_float2(cell0.x, cell1.x);
    h_rows[at] = h_new;
    if (kept) {
      store2(h_out + at * H, h_new);
      store2(c_out + at * H, make_float2(cell0.y, cell1.y));
    }
  }
}

// A persistent grid: each block stages φ once, then walks tiles of kTile coordinates (of any of the table's
// tensors) in steps of the grid. Every row's state is tile_aligned.
template <typename S>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSM) tiled_forward_kernel(
    const __grid_constant__ LaunchTable table, int64_t tiles, const float* weights, NetShape s,
    unsigned long long* skipped, Update u) {
  constexpr int H = kTileHidden;
  extern __shared__ float4 smem[];
  float* head = reinterpret_cast<float*>(smem + tile_layer_offset(s.layers));
  float2* in = reinterpret_cast<float2*>(head + 4 * kHeadSlots);
  unsigned* keep_bits = reinterpret_cast<unsigned*>(in + H * kPairStride);
  stage_tile_weights(weights, s, smem, head);
  float lr = 1.0f, decay = 1.0f;  // meta-training's step: θ + Δ
  if (skipped != nullptr) {
    lr = step_lr(u);
    decay = decay_factor(lr, u.weight_decay);
  }
  const int t = threadIdx.x, pair = t / 16, group = t % 16;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t* row = row_of(table, tile);
    const int64_t numel = row[kColNumel], n0 = (tile - row[kColFirstBlock]) * kTile, stride = numel * H;
    const int count = static_cast<int>(numel - n0 < kTile ? numel - n0 : kTile);
    const int code = static_cast<int>(row[kColDtype]);
    const S* h_in = reinterpret_cast<const S*>(row[kColHIn]) + n0 * H;
    const int64_t cell = (n0 + 2 * group) * H + 2 * pair;
    const S* c_in = reinterpret_cast<const S*>(row[kColCIn]) + cell;
    S* h_out = reinterpret_cast<S*>(row[kColHOut]) + cell;
    S* c_out = reinterpret_cast<S*>(row[kColCOut]) + cell;
    __syncthreads();  // the weights are staged, the previous tile's head has read `in`
    const bool mine = t < count;  // thread t's coordinate
    float g = mine ? load_param(row[kColGrad], n0 + t, code) : 0.0f;
    const Step step = skipped != nullptr ? optimizer_step(g, mine, skipped, u) : mine ? Step::kFull : Step::kNone;
    float x[2] = {0.0f, 0.0f};
    features(s, g, x);
    in[t] = make_float2(x[0], x[1]);
    const unsigned kept = __ballot_sync(0xFFFFFFFFu, step == Step::kFull);
    if (t % 32 == 0) keep_bits[t / 32] = kept;
    stage_state(h_in, in + kPairStride, count);
    __syncthreads();
    unsigned keep = 0;  // bit i: cell i's coordinate 2 group + 32 (i / 2) + i % 2
#pragma unroll
    for (int r = 0; r < kRuns; ++r) keep |= (keep_bits[r] >> 2 * group & 3u) << 2 * r;
    tile_layer<tile_rows(0)>(smem, in, keep, pair, group, c_in, h_out, c_out);
    for (int l = 1; l < s.layers; ++l) {  // its input: rows [0, H) the layer below's h', rows [H, 2H) its own h
      stage_state(h_in + l * stride, in + H / 2 * kPairStride, count);
      __syncthreads();
      tile_layer<tile_rows(1)>(smem + tile_layer_offset(l), in, keep, pair, group, c_in + l * stride,
                               h_out + l * stride, c_out + l * stride);
    }
    __syncthreads();
    if (step != Step::kNone) {
      float out = head[H];
#pragma unroll
      for (int kp = 0; kp < H / 2; ++kp) {
        const float2 h = in[kp * kPairStride + t];
        out += head[2 * kp] * h.x + head[2 * kp + 1] * h.y;
      }
      store_theta(row[kColThetaIn], row[kColThetaOut], n0 + t, code, decay,
                  step == Step::kFull ? lr * (s.output_scale * out) : -0.0f);
    }
  }
}

// ------------------------------------------------------------------------------------ the tiled backward
//
// At H = kTileHidden, tiled_backward_kernel: a fixed grid (at most kBackwardPrograms blocks, whatever the GPU) walks
// tiles of kTile coordinates with the forward's thread layout and staged φ (stage_tile_weights: its float4 slots hold
// each unit's 4 gates per input, pre-scaled so that a gate's dot product is its activation's exponent). Per tile:
// 1. the inputs of every layer into shared memory, as pairs of rows (the forward's interleaved layout): the gradient
//    features, each layer's h, and the h' of every layer below the top (recomputed layer by layer, tile_product and
//    lstm_cell as the forward);
// 2. from the top layer down, per layer l: its gates again (tile_product, parked in shared memory) and, per cell,
//    the adjoints of its gates' pre-activations dz and of its c (cell_backward: layer_backward of l2l_math.h), dc
//    written out, dz staged in shared memory (a float4 per unit and coordinate) in place of the gates; the top
//    layer's cells add the head's gradient (w_out, b_out), summed over the tile, into the block's row; then
//    - the weight gradient Σ over the tile's coordinates of [x | h | 1] dzᵀ (tile_weight_gradient): per pair of input
//      rows a thread sums its 10 coordinates' products into 16 (input, gate, unit) entries, which its half-warp sums
//      and scatters (4 shuffle steps), each lane adding one entry into the block's row of `partial`;
//    - the adjoints of the layer's inputs, W dz (tile_input_adjoints): a warp owns 4 (layer 0: dh) or 8 (dx, dh)
//      input rows, a lane 5 coordinates; dh is written out, dx replaces the h' of the layer below in shared memory,
//      where that layer's cells read it.
// Per coordinate that is 3 layer products for L = 2 (layer 0 twice: its gates are not kept, which would take 51 KB
// more shared memory than the 2 blocks an SM holds allow), the 2 adjoint products and the 2 weight-gradient sums,
// all float32 FMAs. Coordinates past the tensor's end are staged as zeros with zero adjoints: their dz, so all they
// add to the weight gradient, is zero. Every sum runs in a fixed order, and a block adds only into its own row: the
// host's sum over rows is deterministic.

// Layer l's inputs as staged for the backward, in pairs of rows from tile_pair(l): pair 0 the gradient features and
// then layer 0's h; for l > 0 the h' of layer l - 1 (H / 2 pairs) and then its own h. tile_pair(L): pairs in all.
__host__ __device__ constexpr int tile_pair(int l) { return l == 0 ? 0 : (tile_rows(0) + (l - 1) * tile_rows(1)) / 2; }
__host__ __device__ constexpr int tile_state_pair(int l) { return tile_pair(l) + (l == 0 ? 1 : kTileHidden / 2); }
// layer_offset of l2l_math.h at H = kTileHidden, in closed form (its loop, run per tile, kept values in local memory).
__host__ __device__ constexpr int tile_packed_offset(int features, int l) {
  return l == 0 ? 0 : 4 * kTileHidden * ((features + kTileHidden + 1) + (l - 1) * (2 * kTileHidden + 1));
}
// dz ([H][kTile] float4: a unit's 4 gates per coordinate), the head, the tile's du, the input rows, staged φ.
size_t tile_backward_shared_bytes(int layers) {
  return (kTileHidden * kTile + kHeadSlots) * sizeof(float4) + kTile * sizeof(float) +
         tile_pair(layers) * kPairStride * sizeof(float2) + tile_layer_offset(layers) * sizeof(float4);
}

// threadIdx.x, read where it is used: a value the compiler cannot hoist out of the loop over tiles, so that the
// numbers derived from it (the thread's units, coordinates, entries) are not all held in registers across it.
__device__ __forceinline__ int thread_index() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}

// A tile's h of one layer into its H / 2 pairs of rows, as stage_state, the rows of coordinates past the tensor's
// end zeroed: the weight gradient sums over every coordinate of the tile.
template <typename S>
__device__ __forceinline__ void stage_rows(const S* h, float2* rows, int count) {
  constexpr int kFours = kTileHidden / 4, kCoordsPerPass = kTileThreads / kFours;
  const int t = thread_index(), pair = 2 * (t % kFours), first = t / kFours;
#pragma unroll
  for (int j = 0; j < kTile / kCoordsPerPass; ++j) {
    const int coord = first + j * kCoordsPerPass;
    const float4 v = coord < count ? load4(h + 4 * (t + j * kTileThreads)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    rows[pair * kPairStride + coord] = make_float2(v.x, v.y);
    rows[(pair + 1) * kPairStride + coord] = make_float2(v.z, v.w);
  }
}

// The gate exponents of the thread's cells (units 2 pair + u, coordinates 2 group + 32 (i / 2) + i % 2) for a layer
// whose Rows inputs are staged from `in`: tile_layer's product.
template <int Rows>
__device__ __forceinline__ void tile_product(float4 (&z)[2][2 * kRuns], const float4* w, const float2* in, int pair,
                                             int group) {
  static_assert(Rows % 2 == 0 && Rows / 2 % 3 == 2, "the loop between the first and last row pairs goes by 3");
  const float4* w0 = w + 2 * pair * (Rows + 1);
  const float4* w1 = w0 + Rows + 1;
  const float4* x = reinterpret_cast<const float4*>(in) + group;
  product_pair<Rows, true>(z, x, w0, w1, 0);
#pragma unroll (Rows / 2 - 2) / 3
  for (int kp = 1; kp < Rows / 2 - 1; ++kp) product_pair<Rows, false>(z, x, w0, w1, kp);
  product_pair<Rows, false>(z, x, w0, w1, Rows / 2 - 1);
}

// A layer below the top, forward only: its h' into the H / 2 pairs of rows from `out` (the next layer's inputs).
// first: where the tile's layer starts in c ([L, N, H]); count: the tile's coordinates in the tensor (the c of the
// others reads as 0).
template <int Rows, typename S>
__device__ __forceinline__ void tile_forward_layer(const float4* w, const float2* in, float2* out, const S* c,
                                                   int64_t first, int count) {
  constexpr int H = kTileHidden;
  const int pair = thread_index() / 16, group = thread_index() % 16;
  const S* c_cell = c + first + 2 * group * H + 2 * pair;  // the thread's first cell (coordinate 2 group, unit 2 pair)
  float4 z[2][2 * kRuns];
  tile_product<Rows>(z, w, in, pair, group);
  float2* h_rows = out + pair * kPairStride + 2 * group;
#pragma unroll
  for (int i = 0; i < 2 * kRuns; ++i) {
    const int at = 32 * (i / 2) + i % 2;  // cell i's coordinate, from 2 group
    const float2 c = 2 * group + at < count ? load2(c_cell + at * H) : make_float2(0.0f, 0.0f);
    h_rows[at] = make_float2(lstm_cell(z[0][i], c.x).x, lstm_cell(z[1][i], c.y).x);
  }
}

// One unit's backward (layer_backward of l2l_math.h) from its gates' exponents e (i, f, g, o, as lstm_cell takes
// them), its c and the adjoints of its h' and c': dz, the adjoints of the gates' pre-activations; dc, of c; and h'
// (for the head's gradient). tanh is carried as r = tanh - 1 (lstm_cell): 1 - tanh² = -r (2 + r), with no
// cancellation near ±1; σ (1 - σ) is one FMA, σ - σ².
struct CellAdjoint {
  float4 dz;
  float dc, h;
};
__device__ __forceinline__ CellAdjoint cell_backward(float4 e, float c, float dh_new, float dc_new) {
  const float i = sigmoid_of(e.x), f = sigmoid_of(e.y), rg = tanh_minus_1_of(e.z), o = sigmoid_of(e.w);
  const float c_new = fmaf(f, c, fmaf(i, rg, i));
  const float rc = tanh_minus_1_of(2.0f * kLog2e * c_new);
  const float dct = fmaf(dh_new * o, -rc * (2.0f + rc), dc_new);
  CellAdjoint a;
  a.dz = make_float4(dct * (1.0f + rg) * fmaf(-i, i, i), dct * c * fmaf(-f, f, f), dct * i * (-rg * (2.0f + rg)),
                     dh_new * (1.0f + rc) * fmaf(-o, o, o));
  a.dc = dct * f;
  a.h = fmaf(o, rc, o);
  return a;
}

// dz in the staged weights' scale (their i, f, o columns are W · -log2 e, g's W · 2 log2 e): staged W · scaled dz is
// W · dz.
constexpr float kLn2 = 0.6931471805599453f;
__device__ __forceinline__ float4 staged_scale(float4 dz) {
  return make_float4(-kLn2 * dz.x, -kLn2 * dz.y, 0.5f * kLn2 * dz.z, -kLn2 * dz.w);
}

// a if p else b, as one select: written as C's ?: on two elements of a local array, the compiler may select their
// address instead, which puts the array in local memory.
__device__ __forceinline__ float select(bool p, float a, float b) {
  float y;
  asm("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %1, 0;\n\tselp.f32 %0, %2, %3, q;\n\t}"
      : "=f"(y) : "r"(static_cast<int>(p)), "f"(a), "f"(b));
  return y;
}

// One step of sum_scatter: the lane keeps v[j + M] (lane bit M set) or v[j] for j < M, plus what its partner across
// that bit sends, the other one.
template <int M>
__device__ __forceinline__ void scatter_step(float (&v)[16], int lane) {
  const bool upper = lane & M;
#pragma unroll
  for (int j = 0; j < M; ++j) {
    const float send = select(upper, v[j], v[j + M]), keep = select(upper, v[j + M], v[j]);
    v[j] = keep + __shfl_xor_sync(0xFFFFFFFFu, send, M);
  }
}

// Σ over the 16 lanes of a half-warp of each of v[0..16), scattered: lane j (of the half) returns the sum of v[j].
// Each step halves the values a lane holds (which half: the lane's bit M), so lane j ends with v[j]'s sum. The first
// step takes no select: there the lanes' values come swapped already (v[j] and v[j + 8] exchanged where lane bit 8
// is set), so every lane keeps v[j] and sends v[j + 8].
__device__ __forceinline__ float sum_scatter(float (&v)[16], int lane) {
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] += __shfl_xor_sync(0xFFFFFFFFu, v[j + 8], 8);
  scatter_step<4>(v, lane);
  scatter_step<2>(v, lane);
  scatter_step<1>(v, lane);
  return v[0];
}

// v[8 u + at + gate] (+)= x · dz[u].gate for the thread's two units (at: 4 for the second of a pair of rows).
__device__ __forceinline__ void outer_add(float (&v)[16], int at, float x, const float4 (&dz)[2], bool first) {
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const float4 d = dz[u];
    float* p = v + 8 * u + at;
    p[0] = first ? x * d.x : fmaf(x, d.x, p[0]);
    p[1] = first ? x * d.y : fmaf(x, d.y, p[1]);
    p[2] = first ? x * d.z : fmaf(x, d.z, p[2]);
    p[3] = first ? x * d.w : fmaf(x, d.w, p[3]);
  }
}

// A shared-memory float4 the thread itself stored, read again: a volatile load, so that the compiler does not keep
// the stored value in registers until here instead (it would hold 80 of them across tile_backward_layer's cells).
__device__ __forceinline__ float4 reload(const float4* p) {
  float4 v;
  asm volatile("ld.volatile.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p))));
  return v;
}

// A layer's weight gradient over the tile, Σ_coordinates [x | h | 1] dzᵀ, added into `dw` (the layer's rows of this
// block's partial sums). The thread's cells' dz are read back from `dz_rows` (staged_scale's, so every sum is scaled
// back by its gate's staged weight scale). Per pair of staged input rows (2 kp, 2 kp + 1) the thread sums its cells'
// products for its 16 entries (unit 2 pair + u, row 2 kp + r, gate; v index 8 u + 4 r + gate), and its half-warp (the
// 16 groups of one pair, lanes of one warp) sums each entry over the groups: lane `group` gets entry `group`. For
// sum_scatter's first step, a lane with bit 8 set holds its units the other way round (u = 0 is unit 2 pair + 1).
// Layer 0's staged rows 0 and 1 are the features (row 1 unused without preprocessing).
template <int Rows>
__device__ __forceinline__ void tile_weight_gradient(const float4* dz_rows, const float2* in, float* dw,
                                                     int features) {
  constexpr int H = kTileHidden;
  const int pair = thread_index() / 16, group = thread_index() % 16;
  constexpr bool kLayer0 = Rows == tile_rows(0);
  const int mine = 2 * pair + (group >> 3), other = 4 * pair + 1 - mine;  // this lane's unit, the other one
  float4 dz[2][2 * kRuns];
#pragma unroll
  for (int i = 0; i < 2 * kRuns; ++i) {
    const int coord = 2 * group + 32 * (i / 2) + i % 2;
    dz[0][i] = reload(dz_rows + mine * kTile + coord);
    dz[1][i] = reload(dz_rows + other * kTile + coord);
  }
  const float scale = (group & 3) == 2 ? 2.0f * kLog2e : -kLog2e;  // of this lane's entries' gate
  // this lane's entry of staged row 2 kp + r (r = group / 4 % 2) at packed row 2 kp + r + shift (for kp > 0 in layer
  // 0, the features' packed rows being 0 .. features - 1)
  const int r = group >> 2 & 1, shift = kLayer0 ? features - 2 : 0;
  float* entry = dw + (r + shift) * 4 * H + (group & 3) * H + mine;
  const float4* x = reinterpret_cast<const float4*>(in) + group;
#pragma unroll 1
  for (int kp = 0; kp < Rows / 2; ++kp) {
    float v[16];
#pragma unroll
    for (int run = 0; run < kRuns; ++run) {
      const float4 in2 = x[kp * (kPairStride / 2) + 16 * run];  // rows 2 kp, 2 kp + 1 of cells 2 run, then 2 run + 1
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float4 cell[2] = {dz[0][2 * run + e], dz[1][2 * run + e]};
        outer_add(v, 0, e == 0 ? in2.x : in2.z, cell, run == 0 && e == 0);
        outer_add(v, 4, e == 0 ? in2.y : in2.w, cell, run == 0 && e == 0);
      }
    }
    const float sum = sum_scatter(v, group) * scale;
    if (kLayer0 && kp == 0) {  // the features: staged rows 0, 1 are packed rows 0 .. features - 1
      if (r < features) entry[-shift * 4 * H] += sum;
    } else {
      entry[kp * 2 * 4 * H] += sum;
    }
  }
  float v[16];  // the bias: Σ dz
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    v[j] = 0.0f;
    v[j + 8] = 0.0f;
  }
#pragma unroll
  for (int i = 0; i < 2 * kRuns; ++i) {
    const float4 cell[2] = {dz[0][i], dz[1][i]};
    outer_add(v, 0, 1.0f, cell, i == 0);
  }
  const float sum = sum_scatter(v, group) * scale;
  if (r == 0) entry[Rows * 4 * H] += sum;  // packed row Rows + shift: layer_inputs(l)
}

// The adjoints of a layer's inputs, W dz over the tile, from dz staged in `dz_rows` in the weights' scale: warp w
// computes output rows R w .. R w + R - 1 (layer 0: dh of its h, staged rows 2..H+1; upper layers: dx of its x, rows
// 0..H-1, then dh, rows H..2H-1) of coordinates lane + 32 r. dh goes to `dh_tile` ([kTile][H] of the tile, coordinates
// before `count`), dx into the pairs of rows of `dx_rows` (all coordinates; past the end they are 0).
template <int Rows>
__device__ __forceinline__ void tile_input_adjoints(const float4* w, const float4* dz_rows, float2* dx_rows,
                                                    float* dh_tile, int count) {
  constexpr int H = kTileHidden, kOut = Rows == tile_rows(0) ? H : 2 * H, kWarps = kTileThreads / 32;
  constexpr int R = kOut / kWarps;
  static_assert(kOut % kWarps == 0 && R % 4 == 0 && H % 4 == 0 && kTile == 32 * kRuns, "a warp's rows go by 4");
  const int warp = thread_index() / 32, lane = thread_index() % 32, first = R * warp;  // output rows first + o
  const float4* wr = w + (Rows - kOut) + first;  // unit u's slot of output row first + o: wr[u (Rows + 1) + o]
  float acc[R][kRuns];
#pragma unroll
  for (int o = 0; o < R; ++o) {
#pragma unroll
    for (int r = 0; r < kRuns; ++r) acc[o][r] = 0.0f;
  }
#pragma unroll 2
  for (int u = 0; u < H; ++u) {
    float4 wu[R];
#pragma unroll
    for (int o = 0; o < R; ++o) wu[o] = wr[u * (Rows + 1) + o];
#pragma unroll
    for (int r = 0; r < kRuns; ++r) {
      const float4 d = dz_rows[u * kTile + lane + 32 * r];
#pragma unroll
      for (int o = 0; o < R; ++o) {
        acc[o][r] = fmaf(wu[o].w, d.w, fmaf(wu[o].z, d.z, fmaf(wu[o].y, d.y, fmaf(wu[o].x, d.x, acc[o][r]))));
      }
    }
  }
#pragma unroll
  for (int q = 0; q < R / 4; ++q) {
    const int o = first + 4 * q;  // output rows o .. o + 3: dh if o >= kOut - H, else dx
#pragma unroll
    for (int r = 0; r < kRuns; ++r) {
      const int coord = lane + 32 * r;
      if (o >= kOut - H) {
        if (coord < count) {
          *reinterpret_cast<float4*>(dh_tile + coord * H + o - (kOut - H)) =
              make_float4(acc[4 * q][r], acc[4 * q + 1][r], acc[4 * q + 2][r], acc[4 * q + 3][r]);
        }
      } else {
        dx_rows[o / 2 * kPairStride + coord] = make_float2(acc[4 * q][r], acc[4 * q + 1][r]);
        dx_rows[(o / 2 + 1) * kPairStride + coord] = make_float2(acc[4 * q + 2][r], acc[4 * q + 3][r]);
      }
    }
  }
}

// Layer l's backward over a tile (Rows = tile_rows(l)), its inputs staged from `in`. dx_above: the adjoint of its h'
// from the layer above (that layer's dx, in its pairs of rows), unless it is the top layer, whose h' feeds the head
// (du_row, w_out). first: where the tile's layer l starts in [L, N, H] (its c, dh_next, dc_next are read there, its
// dc and dh written); dw: layer l's rows of the block's partial sums; head_grad: the head's (w_out, then b_out),
// which the top layer adds to.
template <int Rows, typename S>
__device__ __forceinline__ void tile_backward_layer(const float4* w, float2* in, const float2* dx_above,
                                                    float4* dz_rows, const float* du_row, const float* head, bool top,
                                                    int count, int features, const S* c,
                                                    const float* dh_next, const float* dc_next, float* dc, float* dh,
                                                    int64_t first, float* dw, float* head_grad) {
  constexpr int H = kTileHidden;
  {  // the gates' exponents, parked in the thread's own cells of dz_rows: no 80 registers held across the cells
    const int pair = thread_index() / 16, group = thread_index() % 16;
    float4 z[2][2 * kRuns];
    tile_product<Rows>(z, w, in, pair, group);
#pragma unroll
    for (int i = 0; i < 2 * kRuns; ++i) {
      const int coord = 2 * group + 32 * (i / 2) + i % 2;
      dz_rows[2 * pair * kTile + coord] = z[0][i];
      dz_rows[(2 * pair + 1) * kTile + coord] = z[1][i];
    }
  }
  const int pair = thread_index() / 16, group = thread_index() % 16;
  const int64_t cell = first + 2 * group * H + 2 * pair;  // the thread's first cell (coordinate 2 group, unit 2 pair)
  const S* c_cell = c + cell;
  const float *dh_next_cell = dh_next + cell, *dc_next_cell = dc_next + cell;
  float* dc_cell = dc + cell;
  float2 dw_out = make_float2(0.0f, 0.0f);  // the top layer's: Σ du h' of the cells (w_out), Σ du (b_out)
  float db_out = 0.0f;
#pragma unroll
  for (int i = 0; i < 2 * kRuns; ++i) {
    const int at = 32 * (i / 2) + i % 2, coord = 2 * group + at;  // cell i's coordinate, from 2 group and in the tile
    const bool kept = coord < count;
    float2 c = make_float2(0.0f, 0.0f), dh_next = c, dc_next = c;
    if (kept) {
      c = load2(c_cell + at * H);
      dh_next = load2(dh_next_cell + at * H);
      dc_next = load2(dc_next_cell + at * H);
    }
    float du = 0.0f;
    float2 dh_new;
    if (top) {
      du = du_row[coord];
      dh_new = make_float2(fmaf(du, head[2 * pair], dh_next.x), fmaf(du, head[2 * pair + 1], dh_next.y));
    } else {
      const float2 dx = dx_above[pair * kPairStride + coord];
      dh_new = make_float2(dh_next.x + dx.x, dh_next.y + dx.y);
    }
    const CellAdjoint a = cell_backward(reload(dz_rows + 2 * pair * kTile + coord), c.x, dh_new.x, dc_next.x);
    const CellAdjoint b = cell_backward(reload(dz_rows + (2 * pair + 1) * kTile + coord), c.y, dh_new.y, dc_next.y);
    if (kept) store2(dc_cell + at * H, make_float2(a.dc, b.dc));
    if (top) {
      dw_out.x = fmaf(du, a.h, dw_out.x);
      dw_out.y = fmaf(du, b.h, dw_out.y);
      db_out += du;
    }
    dz_rows[2 * pair * kTile + coord] = staged_scale(a.dz);
    dz_rows[(2 * pair + 1) * kTile + coord] = staged_scale(b.dz);
  }
  if (top) {  // the head's gradient: summed over the half-warp (the pair's 16 groups: every coordinate of the tile)
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      dw_out.x += __shfl_xor_sync(0xFFFFFFFFu, dw_out.x, 8 >> step);
      dw_out.y += __shfl_xor_sync(0xFFFFFFFFu, dw_out.y, 8 >> step);
      db_out += __shfl_xor_sync(0xFFFFFFFFu, db_out, 8 >> step);
    }
    if (group == 0) {
      head_grad[2 * pair] += dw_out.x;
      head_grad[2 * pair + 1] += dw_out.y;
      if (pair == 0) head_grad[H] += db_out;
    }
  }
  tile_weight_gradient<Rows>(dz_rows, in, dw, features);
  __syncthreads();  // dz is staged; every thread is done with this layer's input rows
  tile_input_adjoints<Rows>(w, dz_rows, in, dh + first, count);
  if (Rows != tile_rows(0)) __syncthreads();  // dx is staged for the layer below; every thread is done with dz
}

// The backward of a step at H = kTileHidden: the adjoints of h and c into dh, dc ([L, N, H] float32), the weight
// gradient into this block's row of `partial` (packed as φ). Needs h, c tile_aligned<S> and the float32 adjoints
// tile_aligned<float>; any n.
template <typename S>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSM) tiled_backward_kernel(
    const float* grad, const S* h, const S* c, const float* dtheta, const float* dh_next, const float* dc_next,
    float* dh, float* dc, float* partial, const float* weights, int64_t n, NetShape s) {
  constexpr int H = kTileHidden;
  // What does not depend on L first, at addresses known when compiling: dz, the head, du, the input rows; then φ.
  extern __shared__ float4 smem[];
  float4* dz_rows = smem;
  float* head = reinterpret_cast<float*>(dz_rows + H * kTile);
  float* du_row = head + 4 * kHeadSlots;
  float2* in = reinterpret_cast<float2*>(du_row + kTile);
  float4* w = reinterpret_cast<float4*>(in + tile_pair(s.layers) * kPairStride);
  stage_tile_weights(weights, s, w, head);
  partial += blockIdx.x * (tile_packed_offset(s.features, s.layers) + H + 1);  // this block's row
  const int64_t stride = n * H;
  for (int64_t n0 = blockIdx.x * static_cast<int64_t>(kTile); n0 < n; n0 += gridDim.x * static_cast<int64_t>(kTile)) {
    const int count = static_cast<int>(n - n0 < kTile ? n - n0 : kTile);
    __syncthreads();  // the weights are staged (the previous tile is done with the rows)
    const int t = thread_index();
    const bool mine = t < count;  // thread t's coordinate
    float x[2] = {0.0f, 0.0f};
    features(s, mine ? grad[n0 + t] : 0.0f, x);
    in[t] = make_float2(x[0], x[1]);
    du_row[t] = mine ? s.output_scale * dtheta[n0 + t] : 0.0f;
    for (int l = 0; l < s.layers; ++l) {
      stage_rows(h + l * stride + n0 * H, in + tile_state_pair(l) * kPairStride, count);
    }
    __syncthreads();
    if (s.layers > 1) {  // the h' of every layer below the top
      tile_forward_layer<tile_rows(0)>(w, in, in + tile_pair(1) * kPairStride, c, n0 * H, count);
      for (int l = 1; l + 1 < s.layers; ++l) {
        __syncthreads();  // the layer below's h' is staged
        tile_forward_layer<tile_rows(1)>(w + tile_layer_offset(l), in + tile_pair(l) * kPairStride,
                                         in + tile_pair(l + 1) * kPairStride, c, n0 * H + l * stride, count);
      }
      __syncthreads();
    }
    for (int l = s.layers - 1; l > 0; --l) {
      tile_backward_layer<tile_rows(1)>(w + tile_layer_offset(l), in + tile_pair(l) * kPairStride,
                                        in + tile_pair(l + 1) * kPairStride, dz_rows, du_row, head, l == s.layers - 1,
                                        count, s.features, c, dh_next, dc_next, dc, dh,
                                        n0 * H + l * stride,
                                        partial + tile_packed_offset(s.features, l),
                                        partial + tile_packed_offset(s.features, s.layers));
    }
    tile_backward_layer<tile_rows(0)>(w, in, in + tile_pair(1) * kPairStride, dz_rows, du_row, head,
                                      s.layers == 1, count, s.features, c, dh_next, dc_next, dc,
                                      dh, n0 * H, partial, partial + tile_packed_offset(s.features, 1));
  }
}

// ------------------------------------------------------------------------------------ the generic backward

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
  auto* count = reinterpret_cast<unsigned long long*>(skipped);
  auto run = [&](auto state) {
    using S = decltype(state);
    bool aligned = true;
    for (int r = 0; r < table.count; ++r) {
      for (int col : {kColHIn, kColHOut, kColCIn, kColCOut}) aligned &= tile_aligned<S>(table.rows[r][col]);
    }
    if (s.hidden == kTileHidden && aligned) {  // as many blocks as fit on the GPU at once, at most one per tile
      auto kernel = tiled_forward_kernel<S>;
      const size_t bytes = tile_shared_bytes(s.layers);
      int device = 0, sms = 0;
      cudaError_t err = allow_shared(kernel, bytes);
      if (err == cudaSuccess) err = cudaGetDevice(&device);
      if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      if (err != cudaSuccess) return err;
      const int64_t resident = static_cast<int64_t>(sms) * kTileBlocksPerSM;
      kernel<<<static_cast<unsigned>(blocks < resident ? blocks : resident), kTileThreads, bytes, stream>>>(
          table, blocks, weights, s, count, u);
      return cudaGetLastError();
    }
    const bool in_shared = weights_fit_shared(s);
    const size_t bytes = in_shared ? packed_size(s) * sizeof(float) : 0;
    auto kernel = forward_kernel<S>;
    cudaError_t err = allow_shared(kernel, bytes);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(blocks), kForwardBlock, bytes, stream>>>(table, weights, packed_size(s), in_shared,
                                                                          s, count, u);
    return cudaGetLastError();
  };
  return bf16_state ? run(uint16_t()) : run(float());
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
  auto tiled = [&](auto state) {  // at most kBackwardPrograms blocks (so at most backward_blocks(n)), any GPU
    using S = decltype(state);
    auto kernel = tiled_backward_kernel<S>;
    const size_t bytes = tile_backward_shared_bytes(s.layers);
    cudaError_t err = allow_shared(kernel, bytes);
    if (err != cudaSuccess) return err;
    const int64_t tiles = (n + kTile - 1) / kTile;
    kernel<<<static_cast<unsigned>(tiles < kBackwardPrograms ? tiles : kBackwardPrograms), kTileThreads, bytes,
             stream>>>(grad, static_cast<const S*>(h), static_cast<const S*>(c), dtheta, dh_next, dc_next, dh, dc,
                       partial, weights, n, s);
    return cudaGetLastError();
  };
  // The tiled kernel's vector accesses: h and c by 4 values (tile_aligned), the float32 adjoints by 4 or 2.
  auto address = [](const void* p) { return reinterpret_cast<int64_t>(p); };
  bool aligned = s.hidden == kTileHidden;
  for (const void* p : {h, c}) {
    aligned &= bf16_state ? tile_aligned<uint16_t>(address(p)) : tile_aligned<float>(address(p));
  }
  for (const float* p : {dh_next, dc_next, static_cast<const float*>(dh), static_cast<const float*>(dc)}) {
    aligned &= tile_aligned<float>(address(p));
  }
  if (aligned) return bf16_state ? tiled(uint16_t()) : tiled(float());
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
