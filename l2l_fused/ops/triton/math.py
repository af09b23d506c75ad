"""Per-coordinate math of the step as Triton device functions, shared by the forward and backward kernels.

Every function works on a block of coordinates: gradients ``[BLOCK_N]``, states ``[BLOCK_N, HP]`` with the
hidden size H padded to HP (a power of two, at least 16) in registers; padded columns hold zeros. φ is
read in its packed layout (:mod:`l2l_fused.ops.layout`): layer l's matrix ``W[k, gate·H + unit]`` over the
inputs k = (x, h, 1).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # From exp of a non-positive argument: never overflows, and the interpreter (which has no
    # libdevice) runs the same arithmetic as the GPU. Absolute error ~1e-7 near 0.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _to_bf16(x):
    """float32 → bfloat16, rounded to nearest even. Written out because Triton's interpreter
    truncates in ``.to(tl.bfloat16)`` while the GPU rounds: this way CI tests what the GPU runs."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN (the carry could make it inf)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _to_state(x, STATE_DTYPE: tl.constexpr):
    if STATE_DTYPE == tl.bfloat16:
        y = _to_bf16(x)
    else:
        y = x
    return y


@triton.jit
def _load_f32(addr, offs, mask, code):
    """Values of a float32/bfloat16/float16/float64 tensor at ``addr``, as float32."""
    if code == 0:
        v = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif code == 1:
        v = tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0).to(tl.float32)
    elif code == 2:
        v = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.load(addr.to(tl.pointer_type(tl.float64)) + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _store_theta_plus(in_addr, out_addr, offs, mask, code, decay, delta):
    """θ' = θ·decay + Δ, in float32 (float64 for float64 θ) and rounded once to θ's dtype.

    Nothing is assigned inside the branches: compiled Triton needs one type per variable across them."""
    if code == 0:
        tl.store(out_addr.to(tl.pointer_type(tl.float32)) + offs,
                 tl.load(in_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask) * decay + delta, mask=mask)
    elif code == 1:
        tl.store(out_addr.to(tl.pointer_type(tl.bfloat16)) + offs,
                 _to_bf16(tl.load(in_addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask).to(tl.float32) * decay
                          + delta),
                 mask=mask)
    elif code == 2:
        tl.store(out_addr.to(tl.pointer_type(tl.float16)) + offs,
                 (tl.load(in_addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask).to(tl.float32) * decay
                  + delta).to(tl.float16),
                 mask=mask)
    else:
        tl.store(out_addr.to(tl.pointer_type(tl.float64)) + offs,
                 tl.load(in_addr.to(tl.pointer_type(tl.float64)) + offs, mask=mask) * decay + delta.to(tl.float64),
                 mask=mask)


@triton.jit
def _layer_weights(w_ptr, layer: tl.constexpr, IN: tl.constexpr, H: tl.constexpr):
    """Where layer ``layer``'s matrix starts in packed φ (``layer = L``: the head), as NetShape.layer_offset."""
    if layer == 0:
        at = w_ptr
    else:
        at = w_ptr + (IN + H + 1) * 4 * H + (layer - 1) * (2 * H + 1) * 4 * H
    return at


@triton.jit
def _gate_preact(x, x0, x1, h, w_ptr, gate: tl.constexpr, FIRST: tl.constexpr, IN: tl.constexpr, H: tl.constexpr,
                 HP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """z of one gate for a block: ``[BLOCK_N, HP]``, zero in the padded columns j >= H. ``w_ptr``: the layer's
    matrix W [n_x + H + 1, 4H]."""
    N_X: tl.constexpr = IN if FIRST else H
    j = tl.arange(0, HP)  # output unit
    k = tl.arange(0, HP)  # input unit
    cols = gate * H + j
    wmask = (k[:, None] < H) & (j[None, :] < H)
    # B[k, j] = W[n_x + k, gate*H + j]: rows of the layer's own h
    w_hh = tl.load(w_ptr + (N_X + k[:, None]) * (4 * H) + cols[None, :], mask=wmask, other=0.0)
    z = tl.dot(h, w_hh, input_precision=DOT_PRECISION)
    if FIRST:
        # 1 or 2 input features: rank-1 updates (a dot needs an inner size of at least 16)
        z += x0[:, None] * tl.load(w_ptr + cols, mask=j < H, other=0.0)[None, :]
        if IN == 2:
            z += x1[:, None] * tl.load(w_ptr + 4 * H + cols, mask=j < H, other=0.0)[None, :]
    else:
        w_ih = tl.load(w_ptr + k[:, None] * (4 * H) + cols[None, :], mask=wmask, other=0.0)
        z = tl.dot(x, w_ih, z, input_precision=DOT_PRECISION)
    bias = tl.load(w_ptr + (N_X + H) * (4 * H) + cols, mask=j < H, other=0.0)  # the row of the constant input
    return z + bias[None, :]


@triton.jit
def _features(g, inv_p, threshold, exp_p, PREPROCESS: tl.constexpr):
    """The first layer's input (docs/spec.md §1): ``(log|g|/p, sign g)`` or ``(-1, e^p g)``, or g alone."""
    if PREPROCESS:
        mag = tl.abs(g)
        large = mag >= threshold
        x0 = tl.where(large, tl.log(tl.where(large, mag, 1.0)) * inv_p, -1.0)
        x1 = tl.where(large, tl.where(g > 0, 1.0, -1.0), g * exp_p)
    else:
        x0 = g
        x1 = g
    return x0, x1


@triton.jit
def _gates(x, x0, x1, h, w_ptr, FIRST: tl.constexpr, IN: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
           DOT_PRECISION: tl.constexpr):
    """(i, f, g, o) of one layer; padded columns get i = f = o = 1/2 and g = 0, so they stay zero."""
    i = tl.sigmoid(_gate_preact(x, x0, x1, h, w_ptr, 0, FIRST, IN, H, HP, DOT_PRECISION))
    f = tl.sigmoid(_gate_preact(x, x0, x1, h, w_ptr, 1, FIRST, IN, H, HP, DOT_PRECISION))
    g = _tanh(_gate_preact(x, x0, x1, h, w_ptr, 2, FIRST, IN, H, HP, DOT_PRECISION))
    o = tl.sigmoid(_gate_preact(x, x0, x1, h, w_ptr, 3, FIRST, IN, H, HP, DOT_PRECISION))
    return i, f, g, o


@triton.jit
def _layer_step(x, x0, x1, h_ptr, c_ptr, at, mask, w_ptr, layer: tl.constexpr, IN: tl.constexpr, H: tl.constexpr,
                HP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``(c', h')`` of layer ``layer`` for a block whose state (float32 or bfloat16) is at ``h_ptr + at``,
    ``c_ptr + at``; ``x`` is the layer's input (unused by the first layer, which reads x0, x1)."""
    h = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + at, mask=mask, other=0.0).to(tl.float32)
    i, f, g, o = _gates(x, x0, x1, h, _layer_weights(w_ptr, layer, IN, H), layer == 0, IN, H, HP, DOT_PRECISION)
    c = f * c + i * g
    return c, o * _tanh(c)
