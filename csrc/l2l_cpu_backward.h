// The CPU backward (docs/spec.md §2), a block of kBlock coordinates at a time: the forward's register tile
// (l2l_cpu_forward.h) applied to the three products of an LSTM layer's backward. Host only: l2l_cpu.cpp
// runs it, a chunk of coordinates per task.
//
// Per block it recomputes every layer from the saved ∇, h and c (tile(), then the activations), keeping
// each layer's input rows in[b] = [x | h | 1], its c, its activated gates and tanh(c'). Then, down the
// layers:
//   dz      the adjoints of the pre-activations (l2l_math.h's layer_backward), elementwise over the
//           block's (coordinate, unit) pairs in whole vectors;
//   d_in[b] = Σ_j dz[b][j]·WT[j], the adjoints of the layer's inputs: tile() on the weights transposed once
//           per call (AdjointWeights), its vectors over inputs;
// and once per gradient tile of kGradTile coordinates, whose input rows and dz the blocks leave:
//   dW[k]  += Σ_b in[b][k]·dz[b], the weight gradient (the bias as the weight of the input 1): grad_tile,
//           kTileCoords rows × kTileVecs vectors of gate columns summed in registers over the tile.
// Each product's vectors run over a dimension it does not sum over, in a layout the block already has
// (gate columns for z and dW, inputs for d_in): no transposes.
//
// The recomputed forward is l2l_math.h's arithmetic, σ and tanh of each gate on its own (the backward needs
// each; the forward kernel fuses them into quotients that give only c' and h'), then f·c + i·g and
// o·tanh(c'). Its error is the forward kernel's analysis of those formulas (l2l_cpu_forward.h: c' within
// 2.0e-7·(1 + |c'|), h' within 1e-7), and the two kernels' c' and h' agree to about that.
//
// Sums keep a fixed order: a coordinate's as in the per-coordinate math (bias, then inputs in order; d_in
// over the gate columns in order), the weight gradient's over coordinates in their order, from zero per
// gradient tile, then tile by tile into the chunk's partial (which l2l_cpu.cpp sums in chunk order).
// Nothing depends on a coordinate's lane or on the thread that runs its chunk.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "l2l_cpu_forward.h"

namespace l2l {
namespace cpu {

// Coordinates over which the weight gradient is summed in registers before it joins the chunk's partial
// sum (l2l_cpu.cpp): float rounding grows with ~kGradTile + chunk / kGradTile additions, not a chunk's.
constexpr int kGradTile = 64;
static_assert(kGradTile % kBlock == 0, "gradient tiles hold whole blocks");

// A layer's input rows [x | h | 1] padded with zeros to whole grad_tile rows.
constexpr int padded_rows(int rows) { return (rows + kTileCoords - 1) / kTileCoords * kTileCoords; }
constexpr int padded_vectors(int n) { return (n + kVec - 1) / kVec * kVec; }

// The inputs whose adjoints a layer's backward needs: layer 0's h (no gradient flows into ∇, so its features
// need none), a layer above its x (the h' of the layer below) and h; they are consecutive rows of its weights.
inline int adjoint_inputs(const NetShape& s, int l) { return l == 0 ? s.hidden : 2 * s.hidden; }
inline int first_adjoint_input(const NetShape& s, int l) { return l == 0 ? s.features : 0; }

// Each layer's weights transposed for d_in[b] = Σ_j dz[b][j]·WT[j]: row j (a gate column) holds the weights
// of the adjoint inputs, padded with zeros to whole vectors, then a zero row, the bias row tile() reads.
struct AdjointWeights {
  int cols[kMaxLayers];
  const float* layer[kMaxLayers];
  std::vector<float> data;

  AdjointWeights(const NetShape& s, const float* w) {
    const int H4 = 4 * s.hidden;
    int64_t at[kMaxLayers], size = 0;
    for (int l = 0; l < s.layers; ++l) {
      cols[l] = padded_vectors(adjoint_inputs(s, l));
      at[l] = size;
      size += static_cast<int64_t>(H4 + 1) * cols[l];
    }
    data.assign(size, 0.0f);
    for (int l = 0; l < s.layers; ++l) {
      const float* rows = w + layer_offset(s, l) + first_adjoint_input(s, l) * H4;
      float* t = data.data() + at[l];
      for (int a = 0; a < adjoint_inputs(s, l); ++a)
        for (int j = 0; j < H4; ++j) t[j * cols[l] + a] = rows[a * H4 + j];
      layer[l] = t;
    }
  }
};

// G[r] += Σ_{b < count} in[b][r]·dz[b] for kTileCoords rows r (stride g_stride) over the kTileCols gate
// columns at dz and G: the weight gradient's register tile. The sum over coordinates, in their order,
// starts from zero and joins G at the end (the gradient tile's partial, then the chunk's).
inline void grad_tile(const float* in, int in_stride, const float* dz, int dz_stride, int count, float* G,
                      int g_stride) {
  Vec acc[kTileCoords][kTileVecs] = {};
  for (int b = 0; b < count; ++b) {
    // + 0 as in tile(): each dz vector stays in a register for its kTileCoords FMAs; a -0 becoming +0
    // changes no sum (an accumulator is never -0: it starts at +0, and x + y is -0 only if both are).
    Vec d[kTileVecs];
    for (int t = 0; t < kTileVecs; ++t) d[t] = load_vec(dz + b * dz_stride + t * kVec) + 0.0f;
    for (int r = 0; r < kTileCoords; ++r) {
      const float v = in[b * in_stride + r];
      for (int t = 0; t < kTileVecs; ++t) acc[r][t] += d[t] * v;
    }
  }
  for (int r = 0; r < kTileCoords; ++r)
    for (int t = 0; t < kTileVecs; ++t) {
      float* p = G + r * g_stride + t * kVec;
      store_vec(p, load_vec(p) + acc[r][t]);
    }
}

// Coordinates of a tile V < kTileVecs vectors wide: as many as keep a full tile's number of accumulators
// (independent FMA chains, which the FMA latency needs), a power of two dividing kBlock.
constexpr int narrow_coords(int V) {
  int c = kTileCoords;
  while (2 * c * V <= kTileCoords * kTileVecs && kBlock % (2 * c) == 0) c *= 2;
  return c;
}

// The block's z[b] = Σ_k x[b][k]·W[k] (W's row n_x the bias) over `vecs` < kTileVecs vectors of columns:
// the last columns of an input-adjoint product, whose width is whole vectors but not whole tiles.
template <int V = kTileVecs - 1>
inline void narrow_tiles(int vecs, const float* x, int x_stride, int n_x, const float* W, int cols, float* z,
                         int z_stride) {
  if constexpr (V > 0) {
    if (vecs != V) return narrow_tiles<V - 1>(vecs, x, x_stride, n_x, W, cols, z, z_stride);
    constexpr int C = narrow_coords(V);
    for (int b = 0; b < kBlock; b += C)
      tile<C, V>(x + b * x_stride, x_stride, n_x, nullptr, 0, W, cols, z + b * z_stride, z_stride);
  }
}

// l2l_math.h's sigmoid and tanh_stable on vectors (exp_vec is exp_f): the per-coordinate activations, each
// gate on its own, since the backward needs each (the forward's fused quotients give only c' and h').
inline Vec sigmoid_vec(Vec z) { return 1.0f / (1.0f + exp_vec(-z)); }
inline Vec tanh_vec(Vec z) {
  const VecI sign = sign_of(z);
  const Vec e = exp_vec(-2.0f * without_sign(z, sign));
  return with_sign((1.0f - e) / (1.0f + e), sign);
}

// A block reads its state and adjoints as rows of 4·L [L, N, H] arrays and writes 2·L: more streams than the
// hardware prefetcher follows (the backward measured 4% slower on one thread without asking, 8% on two).
// Each block asks for the rows of the block kPrefetchAhead blocks on.
constexpr int kPrefetchAhead = 2;

// Asks for the cache lines of p[0, count) ahead of their use (to be written when kWrite).
template <bool kWrite = false, typename T>
inline void prefetch(const T* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  const int64_t size = count * static_cast<int64_t>(sizeof(T));
  for (int64_t at = 0; at < size; at += 64) __builtin_prefetch(bytes + at, kWrite, 3);
}

// What a chunk's blocks keep: per block, the recomputed forward's values (flat arrays are [b·H + u]); per
// gradient tile, each layer's input rows and dz, the operands of the weight gradient.
template <int H_CT>
struct ChunkScratch {
  static constexpr int HM = H_CT ? H_CT : kMaxHidden;
  static constexpr int CM = padded_columns(HM);
  static constexpr int KM = padded_rows((HM > 2 ? HM : 2) + HM + 1);  // the widest input row [x | h | 1]
  static constexpr int AM = padded_vectors(2 * HM);
  enum { kI, kF, kG, kO, kTanhC };

  alignas(64) float in[kMaxLayers][kGradTile][KM];
  alignas(64) float dz[kMaxLayers][kGradTile][CM];
  alignas(64) float c[kMaxLayers][kBlock * HM];
  alignas(64) float gates[kMaxLayers][5][kBlock * HM];  // i, f, g, o, tanh(c'); i..o then become dz
  alignas(64) float z[kBlock][CM];                      // pre-activations as the tiles leave them
  alignas(64) float h_top[kBlock * HM], dh_new[kBlock * HM], dc_new[kBlock * HM], dc[kBlock * HM];
  alignas(64) float d_in[kBlock][AM];
  float du[kBlock], g_out[HM + 1];
};

// The weight gradient's layout in a chunk's partial sum: each layer's padded rows × padded columns (what the
// tiles write), then the head's H + 1. Unpacked into the packed layout once the chunks are summed.
struct GradLayout {
  int n_x[kMaxLayers], rows[kMaxLayers], cols;
  int64_t at[kMaxLayers + 1];  // where each layer starts; the head at L
  int64_t size;

  GradLayout(const NetShape& s, int cols) : cols(cols) {
    at[0] = 0;
    for (int l = 0; l < s.layers; ++l) {
      n_x[l] = l == 0 ? s.features : s.hidden;
      rows[l] = padded_rows(n_x[l] + s.hidden + 1);
      at[l + 1] = at[l] + static_cast<int64_t>(rows[l]) * cols;
    }
    size = at[s.layers] + s.hidden + 1;
  }

  // packed[e] = the entry of `grads` it is, for the packed layout's every entry.
  void unpack(const NetShape& s, const float* grads, float* packed) const {
    const int H4 = 4 * s.hidden;
    for (int l = 0; l < s.layers; ++l)
      for (int r = 0; r <= n_x[l] + s.hidden; ++r)
        std::memcpy(packed + layer_offset(s, l) + r * H4, grads + at[l] + static_cast<int64_t>(r) * cols,
                    H4 * sizeof(float));
    std::memcpy(packed + layer_offset(s, s.layers), grads + at[s.layers], (s.hidden + 1) * sizeof(float));
  }
};

// The backward of coordinates [begin, end) of one chunk: writes their dh, dc ([L, N, H], layer l at
// l·stride) and adds their weight gradient to `partial` (laid out as `g`), one gradient tile at a time.
template <int H_CT, typename S>
void chunk_backward(const NetShape& s, const BlockWeights& wb, const AdjointWeights& wa, const GradLayout& g,
                    int64_t begin, int64_t end, const float* grad, const S* h, const S* c, const float* dtheta,
                    const float* dh_next, const float* dc_next, float* dh, float* dc, int64_t stride,
                    float* partial) {
  using Scratch = ChunkScratch<H_CT>;
  constexpr int CM = Scratch::CM, KM = Scratch::KM, AM = Scratch::AM;
  const int H = H_CT ? H_CT : s.hidden, H4 = 4 * H, L = s.layers, cols = g.cols;
  static_assert(kBlock % kTileCoords == 0 && KM % kTileCoords == 0, "tiles cover whole blocks and rows");
  // Zeroed once (make_unique value-initialises): the input rows' constant 1 and zero padding, and dz's
  // padded columns, stay as set here; lanes past a partial block keep finite values.
  const auto scratch = std::make_unique<Scratch>();
  Scratch& k = *scratch;
  for (int l = 0; l < L; ++l)
    for (int b = 0; b < kGradTile; ++b) k.in[l][b][g.n_x[l] + H] = 1.0f;
  const float* w_out = wb.packed + layer_offset(s, L);
  // A block's rows of an [L, N, H] float array, [b·H + u] from `at`: read in place when the block is whole,
  // else copied to `copy` with zeros past count.
  auto block_rows = [&](const float* at, int count, float* copy) -> const float* {
    if (count == kBlock) return at;
    std::memcpy(copy, at, count * H * sizeof(float));
    std::fill(copy + count * H, copy + kBlock * H, 0.0f);
    return copy;
  };
  auto load_rows = [&](float* to, const S* from, int n) {
    for (int u = 0; u < n; ++u) to[u] = load_state(from + u);
  };

  // Coordinates n0 + [0, count), rows t0 + [0, count) of the gradient tile.
  auto block = [&](int64_t n0, int t0, int count) {
    const int64_t ahead = n0 + kPrefetchAhead * kBlock;
    const int64_t units = std::min<int64_t>(kBlock, end - ahead) * H;
    for (int64_t at = ahead * H; units > 0 && at < L * stride; at += stride) {
      prefetch(h + at, units);
      prefetch(c + at, units);
      prefetch(dh_next + at, units);
      prefetch(dc_next + at, units);
      prefetch<true>(dh + at, units);
      prefetch<true>(dc + at, units);
    }
    for (int b = 0; b < count; ++b) features(s, grad[n0 + b], k.in[0][t0 + b]);
    // The forward, keeping each layer's input rows, c, gates and tanh(c').
    for (int l = 0; l < L; ++l) {
      const int64_t base = l * stride + n0 * H;
      auto& in = k.in[l];
      for (int b = 0; b < count; ++b) load_rows(in[t0 + b] + g.n_x[l], h + base + b * H, H);
      load_rows(k.c[l], c + base, count * H);
      for (int b = count; b < kBlock; ++b) std::fill_n(in[t0 + b] + g.n_x[l], H, 0.0f);
      std::fill(k.c[l] + count * H, k.c[l] + kBlock * H, 0.0f);
      for (int b = 0; b < kBlock; b += kTileCoords)
        for (int j = 0; j < cols; j += kTileCols)
          tile(in[t0 + b], KM, g.n_x[l] + H, nullptr, 0, wb.layer[l] + j, cols, k.z[b] + j, CM);
      auto& gt = k.gates[l];
      for (int b = 0; b < kBlock; ++b)
        for (int q = 0; q < 4; ++q) std::memcpy(gt[q] + b * H, k.z[b] + q * H, H * sizeof(float));
      // c' first, tanh(c') in a second pass: in one, each vector's chain (an exp, a division, then another)
      // is too long for the reorder window to overlap the next vector's, measured ~25% slower.
      for (int m = 0; m < kBlock * H; m += kVec) {
        const Vec i = sigmoid_vec(load_vec(gt[Scratch::kI] + m)), f = sigmoid_vec(load_vec(gt[Scratch::kF] + m));
        const Vec gg = tanh_vec(load_vec(gt[Scratch::kG] + m));
        store_vec(gt[Scratch::kI] + m, i);
        store_vec(gt[Scratch::kF] + m, f);
        store_vec(gt[Scratch::kG] + m, gg);
        store_vec(gt[Scratch::kO] + m, sigmoid_vec(load_vec(gt[Scratch::kO] + m)));
        store_vec(gt[Scratch::kTanhC] + m, f * load_vec(k.c[l] + m) + i * gg);
      }
      float* hn = l + 1 < L ? k.dh_new : k.h_top;  // dh_new is free until the backward
      for (int m = 0; m < kBlock * H; m += kVec) {
        const Vec tc = tanh_vec(load_vec(gt[Scratch::kTanhC] + m));
        store_vec(gt[Scratch::kTanhC] + m, tc);
        store_vec(hn + m, load_vec(gt[Scratch::kO] + m) * tc);
      }
      if (l + 1 < L)
        for (int b = 0; b < kBlock; ++b) std::memcpy(k.in[l + 1][t0 + b], hn + b * H, H * sizeof(float));
    }
    // The head, Δ = output_scale·(w_out·h_top + b_out), and the top layer's dh'.
    for (int b = 0; b < kBlock; ++b) k.du[b] = b < count ? s.output_scale * dtheta[n0 + b] : 0.0f;
    for (int b = 0; b < count; ++b) {
      for (int u = 0; u < H; ++u) k.g_out[u] += k.du[b] * k.h_top[b * H + u];
      k.g_out[H] += k.du[b];
    }
    const float* dhn = block_rows(dh_next + (L - 1) * stride + n0 * H, count, k.dh_new);
    for (int b = 0; b < kBlock; ++b)
      for (int u = 0; u < H; ++u) k.dh_new[b * H + u] = dhn[b * H + u] + k.du[b] * w_out[u];
    // Down the layers: dz, then the input adjoints; the weight gradient waits for the gradient tile.
    for (int l = L - 1; l >= 0; --l) {
      const int64_t base = l * stride + n0 * H;
      const float* dcn = block_rows(dc_next + base, count, k.dc_new);
      float* dcb = count == kBlock ? dc + base : k.dc;
      auto& gt = k.gates[l];
      for (int m = 0; m < kBlock * H; m += kVec) {
        const Vec i = load_vec(gt[Scratch::kI] + m), f = load_vec(gt[Scratch::kF] + m);
        const Vec gg = load_vec(gt[Scratch::kG] + m), o = load_vec(gt[Scratch::kO] + m);
        const Vec tc = load_vec(gt[Scratch::kTanhC] + m), dh_m = load_vec(k.dh_new + m);
        const Vec dct = load_vec(dcn + m) + dh_m * o * (1.0f - tc * tc);
        store_vec(dcb + m, dct * f);
        store_vec(gt[Scratch::kI] + m, dct * gg * i * (1.0f - i));
        store_vec(gt[Scratch::kF] + m, dct * load_vec(k.c[l] + m) * f * (1.0f - f));
        store_vec(gt[Scratch::kG] + m, dct * i * (1.0f - gg * gg));
        store_vec(gt[Scratch::kO] + m, dh_m * tc * o * (1.0f - o));
      }
      if (count < kBlock) std::memcpy(dc + base, k.dc, count * H * sizeof(float));
      auto& dz = k.dz[l];
      for (int b = 0; b < kBlock; ++b)
        for (int q = 0; q < 4; ++q) std::memcpy(dz[t0 + b] + q * H, gt[q] + b * H, H * sizeof(float));
      const int a_cols = wa.cols[l], full = a_cols / kTileCols * kTileCols;
      for (int b = 0; b < kBlock; b += kTileCoords)
        for (int j = 0; j < full; j += kTileCols)
          tile(dz[t0 + b], CM, H4, nullptr, 0, wa.layer[l] + j, a_cols, k.d_in[b] + j, AM);
      narrow_tiles((a_cols - full) / kVec, dz[t0], CM, H4, wa.layer[l] + full, a_cols, k.d_in[0] + full, AM);
      const int h_adjoints = l == 0 ? 0 : H;  // where h's adjoints start among the layer's
      for (int b = 0; b < count; ++b) std::memcpy(dh + base + b * H, k.d_in[b] + h_adjoints, H * sizeof(float));
      if (l > 0) {
        const float* below = block_rows(dh_next + base - stride, count, k.dh_new);
        for (int b = 0; b < kBlock; ++b)
          for (int u = 0; u < H; ++u) k.dh_new[b * H + u] = below[b * H + u] + k.d_in[b][u];
      }
    }
  };

  for (int64_t first = begin; first < end; first += kGradTile) {
    const int count = static_cast<int>(std::min<int64_t>(kGradTile, end - first));
    std::fill_n(k.g_out, H + 1, 0.0f);
    for (int t0 = 0; t0 < count; t0 += kBlock) block(first + t0, t0, std::min(kBlock, count - t0));
    // Column slices outside: a slice of dz stays in L1 while the row tiles pass over it.
    for (int l = 0; l < L; ++l)
      for (int j = 0; j < cols; j += kTileCols)
        for (int r = 0; r < g.rows[l]; r += kTileCoords)
          grad_tile(k.in[l][0] + r, KM, k.dz[l][0] + j, CM, count, partial + g.at[l] + int64_t{r} * cols + j, cols);
    for (int u = 0; u <= H; ++u) partial[g.at[L] + u] += k.g_out[u];
  }
}

}  // namespace cpu
}  // namespace l2l
