// The CPU forward, a block of coordinates at a time (host only: l2l_cpu.cpp runs it; the per-coordinate
// math it follows is l2l_math.h's, which the CUDA kernel uses). The CPU backward (l2l_cpu_backward.h) is
// built from the same pieces.
//
// A layer's pre-activations for a block are a small matrix product, z[b] = bias + Σ_k in[b][k]·W[k] with
// in[b] = [x | h] of coordinate b. The kernel this replaces took one coordinate at a time: a load of a
// weight per multiply-add and its 4H sums in memory. Here a register tile of kTileCoords coordinates ×
// kTileVecs vectors of gate columns reuses each weight vector for kTileCoords FMAs and each broadcast input
// for kTileVecs, in independent FMA chains. Vectors run over the gate columns, the layout's contiguous
// dimension, so the state keeps its [L, N, H] order (no transposes) and the packed weights are read as
// they are. The activations then run over the block's kBlock·H (coordinate, unit) pairs, whole vectors.
//
// Every sum keeps the per-coordinate order (the bias, then the inputs in order) and a coordinate's
// arithmetic does not depend on its lane or on the other coordinates of its block, so results are the
// same for any thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "l2l_math.h"

namespace l2l {
namespace cpu {

// Floats in a register of the widest vector unit the build targets (-march=native), from the compiler's
// macros; with GNU vector types one Vec is then one register on any ISA, without intrinsics.
#if defined(__AVX512F__)
constexpr int kVec = 16;
#elif defined(__AVX__)
constexpr int kVec = 8;
#else
constexpr int kVec = 4;
#endif
typedef float Vec __attribute__((vector_size(kVec * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kVec * sizeof(int32_t))));

// The register tile: as many accumulators as the register file holds beside the tile's weight vectors and
// a broadcast input (AVX-512's 32 registers: 4 × 5; AVX2's and SSE's 16: 4 × 2). Its kTileVecs·kVec
// columns (80, 16 or 8) divide the paper's 4H = 80, so those weights need no padding on any of these ISAs.
constexpr int kTileCoords = 4;
constexpr int kTileVecs = kVec == 16 ? 5 : 2;
constexpr int kTileCols = kTileVecs * kVec;
// Coordinates per block: kBlock·H (coordinate, unit) pairs fill whole vectors for every H.
constexpr int kBlock = kVec;

constexpr int padded_columns(int hidden) { return (4 * hidden + kTileCols - 1) / kTileCols * kTileCols; }

// The packed weights, each layer's 4H columns padded with zeros to a multiple of kTileCols (copied only
// where that adds columns); the head is read from the packed weights.
struct BlockWeights {
  const float* packed;
  int cols;
  const float* layer[kMaxLayers];
  std::vector<float> padded;

  BlockWeights(const NetShape& s, const float* w) : packed(w), cols(padded_columns(s.hidden)) {
    const int H4 = 4 * s.hidden;
    const int64_t rows = layer_offset(s, s.layers) / H4;  // every layer's K + 1 rows
    if (cols != H4) {
      padded.assign(rows * cols, 0.0f);
      for (int64_t r = 0; r < rows; ++r) std::memcpy(&padded[r * cols], w + r * H4, H4 * sizeof(float));
    }
    for (int l = 0; l < s.layers; ++l)
      layer[l] = cols == H4 ? w + layer_offset(s, l) : padded.data() + layer_offset(s, l) / H4 * cols;
  }
};

inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline Vec splat(float x) { return Vec{} + x; }

// x < lo ? lo : x, then > hi ? hi : x: what the x86 max and min instructions compute, a NaN x included
// (their comparison fails and they return the second operand), one instruction each. For the ternaries the
// compiler emits a compare and a blend each, 4 of exp_vec's 19 instructions (with them exp_vec took 19%
// longer).
inline Vec clamp(Vec x, float lo, float hi) {
#if defined(__AVX512F__)
  // the maskz forms, every lane set: GCC 12's _mm512_max_ps warns about its own uninitialised operand
  const __mmask16 all = 0xFFFF;
  const __m512 low = _mm512_maskz_max_ps(all, _mm512_set1_ps(lo), reinterpret_cast<__m512>(x));
  return reinterpret_cast<Vec>(_mm512_maskz_min_ps(all, _mm512_set1_ps(hi), low));
#elif defined(__AVX__)
  const __m256 low = _mm256_max_ps(_mm256_set1_ps(lo), reinterpret_cast<__m256>(x));
  return reinterpret_cast<Vec>(_mm256_min_ps(_mm256_set1_ps(hi), low));
#elif defined(__SSE__)
  const __m128 low = _mm_max_ps(_mm_set1_ps(lo), reinterpret_cast<__m128>(x));
  return reinterpret_cast<Vec>(_mm_min_ps(_mm_set1_ps(hi), low));
#else
  x = x < lo ? splat(lo) : x;
  return x > hi ? splat(hi) : x;
#endif
}

// l2l_math.h's exp_f on a vector, operation for operation, less its NaN select: a NaN passes the clamp and
// makes r, hence the result, NaN anyway.
inline Vec exp_vec(Vec x) {
  const Vec xc = clamp(x, -87.3f, 88.7f);
  const Vec n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  return exp_reduced(xc, n) * reinterpret_cast<Vec>((__builtin_convertvector(n, VecI) + 127) << 23);  // p · 2^n
}

// x's sign bit, and x with it cleared (|x|) or set from `sign` (on an x >= 0).
inline VecI sign_of(Vec x) { return reinterpret_cast<VecI>(x) & INT32_MIN; }
inline Vec without_sign(Vec x, VecI sign) { return reinterpret_cast<Vec>(reinterpret_cast<VecI>(x) ^ sign); }
inline Vec with_sign(Vec x, VecI sign) { return reinterpret_cast<Vec>(reinterpret_cast<VecI>(x) | sign); }

// z[c] = W's bias row + Σ_k x[c][k]·W[k] + Σ_k h[c][k]·W[n_x + k], over the V·kVec columns at W, for C
// coordinates (x and h with strides x_stride, H). The forward's tiles are kTileCoords × kTileVecs; the
// backward's input adjoints end in narrower ones (l2l_cpu_backward.h).
template <int C = kTileCoords, int V = kTileVecs>
inline void tile(const float* x, int x_stride, int n_x, const float* h, int H, const float* W, int cols, float* z,
                 int z_stride) {
  Vec acc[C][V];
  const float* bias = W + static_cast<int64_t>(n_x + H) * cols;
  for (int t = 0; t < V; ++t) {
    const Vec b = load_vec(bias + t * kVec);
    for (int c = 0; c < C; ++c) acc[c][t] = b;
  }
  auto add_row = [&](const float* row, const float* in, int stride) {
    // + 0 keeps each weight vector in a register for the tile's C FMAs: the compiler would otherwise fold
    // its load into every one of them, and loads, not FMAs, would bound the loop. It cannot drop the
    // addition (-0 + 0 = +0); a weight -0 becoming +0 changes no sum.
    Vec w[V];
    for (int t = 0; t < V; ++t) w[t] = load_vec(row + t * kVec) + 0.0f;
    for (int c = 0; c < C; ++c) {
      const float v = in[c * stride];
      for (int t = 0; t < V; ++t) acc[c][t] += w[t] * v;
    }
  };
  for (int k = 0; k < n_x; ++k) add_row(W + static_cast<int64_t>(k) * cols, x + k, x_stride);
  for (int k = 0; k < H; ++k) add_row(W + static_cast<int64_t>(n_x + k) * cols, h + k, H);
  for (int c = 0; c < C; ++c)
    for (int t = 0; t < V; ++t) store_vec(z + c * z_stride + t * kVec, acc[c][t]);
}

// The step of the coordinates index[0, count), count <= kBlock, whose first-layer inputs are x0[b] (finite
// values in the lanes past count, which are computed and dropped): writes their h', c' ([L, N, H] seen from
// coordinate 0, layer l at l·layer_stride) and delta[b]. Outputs may alias inputs: a layer's state is read
// for the whole block before any of it is written.
template <int H_CT, typename S>
void block_forward(const NetShape& s, const BlockWeights& wb, int count, const int64_t* index, const float (*x0)[2],
                   const S* h_in, const S* c_in, S* h_out, S* c_out, int64_t layer_stride, float* delta) {
  static_assert(kBlock % kTileCoords == 0, "tiles cover whole blocks");
  constexpr int HM = H_CT ? H_CT : kMaxHidden;
  constexpr int CM = padded_columns(HM);
  const int H = H_CT ? H_CT : s.hidden;
  const int cols = H_CT ? CM : wb.cols;
  // Flat [b·H + u] over the block: h and c read, h' (the next layer's x), gates by gate; z as the tiles
  // leave it, [b][gate·H + u].
  alignas(64) float h[kBlock * HM], c[kBlock * HM], hn[kBlock * HM], gates[4][kBlock * HM], z[kBlock][CM];
  for (int l = 0; l < s.layers; ++l) {
    const int64_t base = l * layer_stride;
    for (int b = 0; b < kBlock; ++b) {
      if (b < count) {
        const S* hb = h_in + base + index[b] * H;
        const S* cb = c_in + base + index[b] * H;
        for (int u = 0; u < H; ++u) {
          h[b * H + u] = load_state(hb + u);
          c[b * H + u] = load_state(cb + u);
        }
      } else {
        std::fill_n(h + b * H, H, 0.0f);
        std::fill_n(c + b * H, H, 0.0f);
      }
    }
    const float* x = l == 0 ? x0[0] : hn;
    const int n_x = l == 0 ? s.features : H, x_stride = l == 0 ? 2 : H;
    for (int b = 0; b < kBlock; b += kTileCoords)
      for (int j = 0; j < cols; j += kTileCols)
        tile(x + b * x_stride, x_stride, n_x, h + b * H, H, wb.layer[l] + j, cols, z[b] + j, CM);
    for (int b = 0; b < kBlock; ++b)
      for (int g = 0; g < 4; ++g) std::memcpy(gates[g] + b * H, z[b] + g * H, H * sizeof(float));
    // l2l_math.h's activations, σ(z) = 1/(1 + e^-z) and tanh(z) = sign(z)·(1 - e)/(1 + e) with e = e^-2|z|,
    // but i·g, f·c and o·tanh(c') each as one division: 3 per unit instead of 5. Error: each result is a
    // quotient of sums and products of exp_vec values, a few roundings (~1e-7; absolute near 0, where 1 - e
    // cancels, as in tanh_stable). Measured against float64 for |z|, |c| <= 100: c' within 2.9e-7·(1 + |c'|),
    // h' within 1e-7 (l2l_math.h's separate σ, tanh and products: 2.0e-7, 1.0e-7); the tests allow 1e-5.
    // A product (1 + e)(1 + e') overflows only where σ(z) < 3e-39; the quotient is then 0, off by less.
    for (int m = 0; m < kBlock * H; m += kVec) {
      const Vec ei = exp_vec(-load_vec(gates[0] + m)), ef = exp_vec(-load_vec(gates[1] + m));
      const Vec zg = load_vec(gates[2] + m);
      const VecI sg = sign_of(zg);
      const Vec eg = exp_vec(-2.0f * without_sign(zg, sg));
      const Vec ig = with_sign((1.0f - eg) / ((1.0f + ei) * (1.0f + eg)), sg);
      store_vec(c + m, load_vec(c + m) / (1.0f + ef) + ig);
      store_vec(gates[3] + m, 1.0f + exp_vec(-load_vec(gates[3] + m)));  // 1/σ(z_o), for the loop below
    }
    // h' in a second pass: one loop through c' and then tanh(c') per vector, a longer chain of dependent
    // operations, measured ~10% slower overall.
    for (int m = 0; m < kBlock * H; m += kVec) {
      const Vec cn = load_vec(c + m);
      const VecI sc = sign_of(cn);
      const Vec ec = exp_vec(-2.0f * without_sign(cn, sc));
      store_vec(hn + m, with_sign((1.0f - ec) / (load_vec(gates[3] + m) * (1.0f + ec)), sc));
    }
    for (int b = 0; b < count; ++b) {
      S* hb = h_out + base + index[b] * H;
      S* cb = c_out + base + index[b] * H;
      for (int u = 0; u < H; ++u) {
        store_state(hb + u, hn[b * H + u]);
        store_state(cb + u, c[b * H + u]);
      }
    }
  }
  for (int b = 0; b < count; ++b) delta[b] = head(s, wb.packed, hn + b * H);
}

}  // namespace cpu
}  // namespace l2l
