// Per-coordinate math of the learned optimizer (docs/spec.md §1 forward, §2 backward), written once for the CPU
// kernel (l2l_cpu.cpp) and the CUDA kernel (l2l_cuda_kernels.cu).
//
// Weights arrive packed in the one layout of every fused kernel (l2l_fused/ops/layout.py, which packs them;
// layer_offset and packed_size below mirror its NetShape): per layer l a matrix WT_l [(I_l + H + 1) x 4H] whose
// row k holds the 4H gate weights (gate order i, f, g, o, as nn.LSTMCell) of input k (the layer's input x
// first, then its own h), its last row b_l = b_ih + b_hh (the weights of an input that is always 1); after
// the layers the head's w_out [H] and b_out [1]. Rows are contiguous over the 4H gate units, so the CPU loops
// vectorise over units and CUDA threads read the same row at the same time (shared-memory broadcast).
//
// H_CT is the hidden size when it is known at compile time (the paper's 20), which lets the compiler keep
// the per-coordinate arrays in registers and unroll; H_CT = 0 runs any H <= kMaxHidden from `hidden`.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "l2l_constants.h"

#if defined(__CUDACC__)
#define L2L_HD __host__ __device__ __forceinline__
#else
#define L2L_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define L2L_UNROLL _Pragma("unroll")
#define L2L_SUM_OVER_UNITS L2L_UNROLL
#else
#define L2L_UNROLL  // host compilers vectorise these loops over units at -O3 on their own
#if defined(_OPENMP)
// A sum over units may be vectorised (reassociated) on the host: -O3 alone keeps it scalar. The order stays
// fixed for a given build, so results stay deterministic.
#define L2L_SUM_OVER_UNITS _Pragma("omp simd reduction(+ : acc)")
#else
#define L2L_SUM_OVER_UNITS
#endif
#endif

namespace l2l {

struct NetShape {
  int layers;      // L, 1..3
  int hidden;      // H, 1..64
  int features;    // inputs of the first layer: 2 with preprocessing, 1 without
  bool preprocess;
  float inv_p, threshold, exp_p;  // 1/p, exp(-p) rounded to float (as the reference compares), exp(p)
  float output_scale;
};

// The optimizer's options of a group step (l2l_fused.backends.Update): θ' = θ·(1 − lr·wd) + lr·Δ, the net
// fed −∇ under maximize. lr_ptr, when set, points to the float32 lr where the kernel runs (read when it
// runs, so a scheduler's in-place change reaches a captured CUDA graph) and lr is not read.
struct Update {
  float lr = 1.0f;
  const float* lr_ptr = nullptr;
  float weight_decay = 0.0f;
  bool maximize = false;
};

// 1 − lr·wd, in double where the product of two floats is exact: the same float whether or not the compiler
// fuses the multiply-add (l2l_fused.backends.Update, the reference, does the same).
L2L_HD float decay_factor(float lr, float weight_decay) {
  return static_cast<float>(1.0 - static_cast<double>(lr) * static_cast<double>(weight_decay));
}

// Offsets into the packed weights, identical on host and device.
L2L_HD int64_t layer_inputs(const NetShape& s, int l) { return (l == 0 ? s.features : s.hidden) + s.hidden; }
L2L_HD int64_t layer_offset(const NetShape& s, int l) {
  int64_t offset = 0;
  for (int i = 0; i < l; ++i) offset += (layer_inputs(s, i) + 1) * 4 * s.hidden;  // WT rows + the bias row
  return offset;
}
L2L_HD int64_t packed_size(const NetShape& s) { return layer_offset(s, s.layers) + s.hidden + 1; }

// Cephes' single-precision exp after its range reduction: p with e^xc = p · 2^n, n = round(xc / ln 2), for a
// float or a vector of them (the CPU forward's, l2l_cpu_forward.h), operation for operation the same.
template <typename T>
inline T exp_reduced(T xc, T n) {
  T r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp. On the GPU, CUDA's expf. On the host, Cephes' single-precision scheme (range reduction by ln 2, a
// degree-5 polynomial, 2^n from the exponent bits; ~1 ulp), written without branches or calls so the loops
// over gate units vectorise: libm's expf is a call the compiler vectorises only under -ffast-math, which
// would also drop NaN semantics.
L2L_HD float exp_f(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);  // NaN passes: it is returned below
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |x / ln 2| < 2^22): adds, no call, vectorises
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float p = exp_reduced(xc, n);
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);  // 2^n
  return x != x ? x : p * scale;
#endif
}

// log. On the GPU __logf (MUFU.LG2 and a multiply): within 2^-21.41 absolute on [0.5, 2], 3 ulp elsewhere (CUDA
// programming guide), which the features divide by p; logf is a polynomial several times as long. On the host,
// libm's logf.
L2L_HD float log_f(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  return logf(x);
#endif
}

L2L_HD float sigmoid(float x) { return 1.0f / (1.0f + exp_f(-x)); }
// tanh from exp of a non-positive argument: never overflows.
L2L_HD float tanh_stable(float x) {
  const float e = exp_f(-2.0f * fabsf(x));
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

// The first layer's input: (log|g|/p, sign g) where |g| >= exp(-p), else (-1, exp(p) g); or g alone.
L2L_HD void features(const NetShape& s, float g, float* x) {
  if (!s.preprocess) {
    x[0] = g;
    return;
  }
  const float mag = fabsf(g);
  const bool large = mag >= s.threshold;
  x[0] = large ? log_f(mag) * s.inv_p : -1.0f;
  x[1] = large ? (g > 0.0f ? 1.0f : -1.0f) : g * s.exp_p;
}

// One LSTM layer for one coordinate: gates (i, f, g, o) activated, into `gates` [4H]; c' and h'.
template <int H_CT>
L2L_HD void layer_forward(const NetShape& s, const float* w, int l, const float* x, const float* h, const float* c,
                          float* gates, float* c_new, float* h_new) {
  const int H = H_CT ? H_CT : s.hidden;
  const int n_x = l == 0 ? s.features : H;
  const float* WT = w + layer_offset(s, l);
  const float* b = WT + (n_x + H) * 4 * H;
L2L_UNROLL
  for (int j = 0; j < 4 * H; ++j) gates[j] = b[j];
  for (int k = 0; k < n_x; ++k) {
    const float xk = x[k];
    const float* row = WT + k * 4 * H;
L2L_UNROLL
    for (int j = 0; j < 4 * H; ++j) gates[j] += row[j] * xk;
  }
L2L_UNROLL
  for (int k = 0; k < H; ++k) {
    const float hk = h[k];
    const float* row = WT + (n_x + k) * 4 * H;
L2L_UNROLL
    for (int j = 0; j < 4 * H; ++j) gates[j] += row[j] * hk;
  }
L2L_UNROLL
  for (int j = 0; j < H; ++j) {
    const float i = sigmoid(gates[j]), f = sigmoid(gates[H + j]), g = tanh_stable(gates[2 * H + j]),
                o = sigmoid(gates[3 * H + j]);
    gates[j] = i;
    gates[H + j] = f;
    gates[2 * H + j] = g;
    gates[3 * H + j] = o;
    c_new[j] = f * c[j] + i * g;
    h_new[j] = o * tanh_stable(c_new[j]);
  }
}

L2L_HD float head(const NetShape& s, const float* w, const float* h_top) {
  const float* w_out = w + layer_offset(s, s.layers);
  float out = w_out[s.hidden];
  for (int k = 0; k < s.hidden; ++k) out += w_out[k] * h_top[k];
  return s.output_scale * out;
}

// Backward of one layer for one coordinate (docs/spec.md §2), from its recomputed gates and c'.
// In: dh_new, dc_new (adjoints of h', c'). Out: dz [4H] (adjoint of the pre-activations, for the weight
// gradients), dc (adjoint of the incoming c), dh (of the incoming h: W_hhᵀ dz), dx (of the layer's input:
// W_ihᵀ dz; skipped when dx is null).
template <int H_CT>
L2L_HD void layer_backward(const NetShape& s, const float* w, int l, const float* c, const float* gates,
                           const float* c_new, const float* dh_new, const float* dc_new, float* dz, float* dc,
                           float* dh, float* dx) {
  const int H = H_CT ? H_CT : s.hidden;
  const int n_x = l == 0 ? s.features : H;
  const float* WT = w + layer_offset(s, l);
L2L_UNROLL
  for (int j = 0; j < H; ++j) {
    const float i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
    const float tc = tanh_stable(c_new[j]);
    const float dct = dc_new[j] + dh_new[j] * o * (1.0f - tc * tc);
    dc[j] = dct * f;
    dz[j] = dct * g * i * (1.0f - i);
    dz[H + j] = dct * c[j] * f * (1.0f - f);
    dz[2 * H + j] = dct * i * (1.0f - g * g);
    dz[3 * H + j] = dh_new[j] * tc * o * (1.0f - o);
  }
  if (dx) {
    for (int k = 0; k < n_x; ++k) {
      const float* row = WT + k * 4 * H;
      float acc = 0.0f;
L2L_SUM_OVER_UNITS
      for (int j = 0; j < 4 * H; ++j) acc += row[j] * dz[j];
      dx[k] = acc;
    }
  }
L2L_UNROLL
  for (int k = 0; k < H; ++k) {
    const float* row = WT + (n_x + k) * 4 * H;
    float acc = 0.0f;
L2L_SUM_OVER_UNITS
    for (int j = 0; j < 4 * H; ++j) acc += row[j] * dz[j];
    dh[k] = acc;
  }
}

// State storage: float32, or bfloat16 kept as its bits (uint16_t), math always in float32.
L2L_HD float load_state(const float* p) { return *p; }
L2L_HD void store_state(float* p, float v) { *p = v; }
L2L_HD uint16_t to_bf16_bits(float x);
L2L_HD float from_bf16_bits(uint16_t b);
L2L_HD float load_state(const uint16_t* p) { return from_bf16_bits(*p); }
L2L_HD void store_state(uint16_t* p, float v) { *p = to_bf16_bits(v); }

// The whole step of one coordinate: preprocessing, every layer (state read from h_in/c_in, written to
// h_out/c_out, each [L, N, H] seen from this coordinate: layer l at + l * layer_stride), and the head.
// Returns Δ. Outputs may alias inputs: each value is read before it is written.
template <int H_CT, typename S>
L2L_HD float coordinate_forward(const NetShape& s, const float* w, float g, const S* h_in, const S* c_in, S* h_out,
                                S* c_out, int64_t layer_stride) {
  constexpr int HM = H_CT ? H_CT : kMaxHidden;
  const int H = H_CT ? H_CT : s.hidden;
  float x[HM > 2 ? HM : 2], h[HM], c[HM], gates[4 * HM], c_new[HM];
  features(s, g, x);
  for (int l = 0; l < s.layers; ++l) {
    const int64_t at = l * layer_stride;
L2L_UNROLL
    for (int k = 0; k < H; ++k) {
      h[k] = load_state(h_in + at + k);
      c[k] = load_state(c_in + at + k);
    }
    layer_forward<H_CT>(s, w, l, x, h, c, gates, c_new, x);  // x becomes this layer's h'
L2L_UNROLL
    for (int k = 0; k < H; ++k) {
      store_state(h_out + at + k, x[k]);
      store_state(c_out + at + k, c_new[k]);
    }
  }
  return head(s, w, x);
}

// Backward of one coordinate's step (docs/spec.md §2), recomputing every gate from the saved ∇, h, c. Adjoints in:
// dtheta (of θ', a scalar), dh_next/dc_next (of h', c'); out: dh/dc (of h, c), all float32 [L, N, H] seen
// from this coordinate. Weight gradients go to `sink`: sink.layer(l, dz, x, n_x, h) with dz [4H] the
// adjoint of layer l's pre-activations, x its input and h its incoming state; sink.head(du, h_top).
template <int H_CT, typename S, typename Sink>
L2L_HD void coordinate_backward(const NetShape& s, const float* w, float g, const S* h_in, const S* c_in,
                                int64_t layer_stride, float dtheta, const float* dh_next, const float* dc_next,
                                float* dh, float* dc, Sink& sink) {
  constexpr int HM = H_CT ? H_CT : kMaxHidden;
  const int H = H_CT ? H_CT : s.hidden;
  float xs[kMaxLayers + 1][HM > 2 ? HM : 2];  // xs[l]: input of layer l; xs[L]: h' of the top layer
  float hs[kMaxLayers][HM], cs[kMaxLayers][HM], gates[kMaxLayers][4 * HM], c_new[kMaxLayers][HM];
  features(s, g, xs[0]);
  for (int l = 0; l < s.layers; ++l) {
    const int64_t at = l * layer_stride;
L2L_UNROLL
    for (int k = 0; k < H; ++k) {
      hs[l][k] = load_state(h_in + at + k);
      cs[l][k] = load_state(c_in + at + k);
    }
    layer_forward<H_CT>(s, w, l, xs[l], hs[l], cs[l], gates[l], c_new[l], xs[l + 1]);
  }
  const float du = s.output_scale * dtheta;
  sink.head(du, xs[s.layers]);
  const float* w_out = w + layer_offset(s, s.layers);
  float dh_new[HM], dc_new[HM], dz[4 * HM], dx[HM > 2 ? HM : 2];
  const int64_t top = (s.layers - 1) * layer_stride;
L2L_UNROLL
  for (int k = 0; k < H; ++k) dh_new[k] = dh_next[top + k] + du * w_out[k];
  for (int l = s.layers - 1; l >= 0; --l) {
    const int64_t at = l * layer_stride;
L2L_UNROLL
    for (int k = 0; k < H; ++k) dc_new[k] = dc_next[at + k];
    layer_backward<H_CT>(s, w, l, cs[l], gates[l], c_new[l], dh_new, dc_new, dz, dc + at, dh + at, l > 0 ? dx : nullptr);
    sink.layer(l, dz, xs[l], l == 0 ? s.features : H, hs[l]);
    if (l > 0) {
      const int64_t below = (l - 1) * layer_stride;
L2L_UNROLL
      for (int k = 0; k < H; ++k) dh_new[k] = dh_next[below + k] + dx[k];
    }
  }
}

// float32 -> bfloat16 bits, rounded to nearest even (NaN kept a NaN), and back.
L2L_HD uint16_t to_bf16_bits(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  if (x != x) return 0x7FC0;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}
L2L_HD float from_bf16_bits(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}

}  // namespace l2l
