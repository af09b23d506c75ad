"""The fused backward of the step (docs/spec.md §2) in Triton.

Reads top to bottom: the kernel → its launcher, :func:`backward`, the entry point that
:class:`~l2l_fused.ops.interface.FusedStep` runs. That Function saves only what the step read (∇ and the
incoming state), never a gate: this kernel recomputes the gates of each layer from those inputs, so an
unrolled step costs 324 B per coordinate in float32 (164 B with bfloat16 saving) where autograd through
``nn.LSTMCell`` keeps every gate of every layer, kilobytes.

Weight gradients are sums over all coordinates, in φ's packed layout (:mod:`l2l_fused.ops.layout`). They are
reduced deterministically: a fixed number of programs (``BACKWARD_PROGRAMS``, whatever the GPU) each walk
their own blocks in a fixed order and add into their own row of a ``[programs, packed size]`` buffer, with
plain loads and stores (a row has one owner, and at ~5k floats it stays in L2); one ``sum`` over the rows
finishes. Atomic adds into a single row instead would give every block ~5k atomics on the same ~5k
addresses (800M serialized read-modify-writes at 10M coordinates) and an order, hence a rounding, that
changes from run to run.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..constants import BACKWARD_PROGRAMS
from ..layout import NetShape
from .forward import check_weights, padded
from .math import _features, _gates, _layer_step, _layer_weights, _tanh

BLOCK_N = 64  # coordinates per block
NUM_WARPS = 4
# No software pipelining of the loop over blocks: it would keep num_stages copies of every tile the loop
# loads in shared memory (527 KB at H = 20, over the 227 KB a block may have), for loads whose latency
# the recomputation already covers.
NUM_STAGES = 1
# tf32x3 splits each float32 operand into two tf32 halves and keeps three of the four products: the
# products run on tensor cores with an error near float32's.
DOT_PRECISION = "tf32x3"


@triton.jit
def _acc_tile(ptr, tile, H: tl.constexpr, HP: tl.constexpr):
    """W[k, j] += tile[j, k] for j, k < H, where ``ptr`` is W[0, gate·H] of a layer's matrix (rows of 4H): a
    gate's block of a weight gradient, computed as dzᵀ·input, stored transposed into the packed layout."""
    j = tl.arange(0, HP)[:, None]
    k = tl.arange(0, HP)[None, :]
    mask = (j < H) & (k < H)
    at = ptr + k * (4 * H) + j
    tl.store(at, tl.load(at, mask=mask, other=0.0) + tile, mask=mask)


@triton.jit
def _acc_vec(ptr, vec, H: tl.constexpr, HP: tl.constexpr, STRIDE: tl.constexpr):
    j = tl.arange(0, HP)
    at = ptr + j * STRIDE
    tl.store(at, tl.load(at, mask=j < H, other=0.0) + vec, mask=j < H)

@triton.jit
def _w_rows(w_ptr, ROW0: tl.constexpr, gate: tl.constexpr, H: tl.constexpr, HP: tl.constexpr):
    """W[ROW0 + k, gate·H + j] of a layer's matrix as a [HP, HP] tile (j rows, k columns), zero outside
    j, k < H: the weights from H inputs starting at row ROW0 (x at 0, h at n_x) into one gate."""
    j = tl.arange(0, HP)[:, None]
    k = tl.arange(0, HP)[None, :]
    return tl.load(w_ptr + (ROW0 + k) * (4 * H) + gate * H + j, mask=(j < H) & (k < H), other=0.0)


@triton.jit
def _layer_input(x0, x1, h_ptr, c_ptr, w_ptr, state_offs, state_mask, layer_stride, UPTO: tl.constexpr,
                 IN: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """h' of layer UPTO - 1 (the input of layer UPTO), recomputed from the saved state."""
    x = tl.zeros([BLOCK_N, HP], dtype=tl.float32)
    for layer in tl.static_range(UPTO):
        _, x = _layer_step(x, x0, x1, h_ptr, c_ptr, layer * layer_stride + state_offs, state_mask, w_ptr, layer, IN, H,
                           HP, DOT_PRECISION)
    return x

@triton.jit
def _acc_gate(base, gate: tl.constexpr, dz, x, x0, x1, h, FIRST: tl.constexpr, IN: tl.constexpr,
              H: tl.constexpr, HP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One gate's share of a block's weight gradients, added into this program's row at ``base``, the
    layer's matrix in the packed layout: dW[k, gate·H + j] += Σ_n input_k dz_j over inputs (x, h, 1)."""
    N_X: tl.constexpr = IN if FIRST else H
    if FIRST:  # one or two input features: sums, no dot
        _acc_vec(base + gate * H, tl.sum(dz * x0[:, None], axis=0), H, HP, 1)
        if N_X == 2:
            _acc_vec(base + 4 * H + gate * H, tl.sum(dz * x1[:, None], axis=0), H, HP, 1)
    else:
        _acc_tile(base + gate * H, tl.dot(tl.trans(dz), x, input_precision=DOT_PRECISION), H, HP)
    _acc_tile(base + N_X * 4 * H + gate * H, tl.dot(tl.trans(dz), h, input_precision=DOT_PRECISION), H, HP)
    _acc_vec(base + (N_X + H) * 4 * H + gate * H, tl.sum(dz, axis=0), H, HP, 1)


@triton.jit
def _l2l_bwd_kernel(
    grad_ptr, h_ptr, c_ptr, dtheta_ptr, dh_next_ptr, dc_next_ptr, dh_ptr, dc_ptr, partial_ptr,
    w_ptr, n, num_blocks, output_scale, inv_p, threshold, exp_p,
    L: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, IN: tl.constexpr, PREPROCESS: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW: tl.constexpr,
):
    pid = tl.program_id(0)
    part = partial_ptr + pid * ROW  # this program's row of partial sums, packed like φ (< 1024 * ~5k: int32)
    k = tl.arange(0, HP)
    w_out = tl.load(_layer_weights(w_ptr, L, IN, H) + k, mask=k < H, other=0.0)
    head = _layer_weights(part, L, IN, H)  # dW_out, then db_out
    layer_stride = n * H
    for block in range(pid, num_blocks, tl.num_programs(0)):
        offs = (block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: N*H can pass 2**31
        mask = offs < n
        x0, x1 = _features(tl.load(grad_ptr + offs, mask=mask, other=0.0), inv_p, threshold, exp_p, PREPROCESS)
        state_offs = offs[:, None] * H + k[None, :]
        state_mask = mask[:, None] & (k[None, :] < H)

        # head: Δ = s (w_out · h'_L + b_out); rows past n load zero adjoints and contribute nothing
        du = output_scale * tl.load(dtheta_ptr + offs, mask=mask, other=0.0)
        top = _layer_input(x0, x1, h_ptr, c_ptr, w_ptr, state_offs, state_mask, layer_stride, L, IN, H, HP,
                           BLOCK_N, DOT_PRECISION)
        _acc_vec(head, tl.sum(du[:, None] * top, axis=0), H, HP, 1)
        tl.store(head + H, tl.load(head + H) + tl.sum(du, axis=0))
        dh = tl.load(dh_next_ptr + (L - 1) * layer_stride + state_offs, mask=state_mask, other=0.0) \
            + du[:, None] * w_out[None, :]

        for layer in tl.static_range(L - 1, -1, -1):
            w_layer = _layer_weights(w_ptr, layer, IN, H)
            base = _layer_weights(part, layer, IN, H)
            at = layer * layer_stride + state_offs
            x = _layer_input(x0, x1, h_ptr, c_ptr, w_ptr, state_offs, state_mask, layer_stride, layer, IN, H,
                             HP, BLOCK_N, DOT_PRECISION)
            h = tl.load(h_ptr + at, mask=state_mask, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + at, mask=state_mask, other=0.0).to(tl.float32)
            i, f, g, o = _gates(x, x0, x1, h, w_layer, layer == 0, IN, H, HP, DOT_PRECISION)
            tc = _tanh(f * c + i * g)
            dc = tl.load(dc_next_ptr + at, mask=state_mask, other=0.0) + dh * o * (1.0 - tc * tc)
            tl.store(dc_ptr + at, dc * f, mask=state_mask)
            dz_i = dc * g * i * (1.0 - i)
            dz_f = dc * c * f * (1.0 - f)
            dz_g = dc * i * (1.0 - g * g)
            dz_o = dh * tc * o * (1.0 - o)

            # dW_ih += dz ⊗ x, dW_hh += dz ⊗ h, db += dz, summed over the block
            _acc_gate(base, 0, dz_i, x, x0, x1, h, layer == 0, IN, H, HP, DOT_PRECISION)
            _acc_gate(base, 1, dz_f, x, x0, x1, h, layer == 0, IN, H, HP, DOT_PRECISION)
            _acc_gate(base, 2, dz_g, x, x0, x1, h, layer == 0, IN, H, HP, DOT_PRECISION)
            _acc_gate(base, 3, dz_o, x, x0, x1, h, layer == 0, IN, H, HP, DOT_PRECISION)

            # dh(out) = W_hhᵀ dz; the layer below receives W_ihᵀ dz on top of its incoming adjoint
            dh_prev = tl.dot(dz_i, _w_rows(w_layer, IN if layer == 0 else H, 0, H, HP), input_precision=DOT_PRECISION)
            dh_prev = tl.dot(dz_f, _w_rows(w_layer, IN if layer == 0 else H, 1, H, HP), dh_prev, input_precision=DOT_PRECISION)
            dh_prev = tl.dot(dz_g, _w_rows(w_layer, IN if layer == 0 else H, 2, H, HP), dh_prev, input_precision=DOT_PRECISION)
            dh_prev = tl.dot(dz_o, _w_rows(w_layer, IN if layer == 0 else H, 3, H, HP), dh_prev, input_precision=DOT_PRECISION)
            tl.store(dh_ptr + at, dh_prev, mask=state_mask)
            if layer > 0:
                below = (layer - 1) * layer_stride + state_offs
                dh = tl.load(dh_next_ptr + below, mask=state_mask, other=0.0)
                dh = tl.dot(dz_i, _w_rows(w_layer, 0, 0, H, HP), dh, input_precision=DOT_PRECISION)
                dh = tl.dot(dz_f, _w_rows(w_layer, 0, 1, H, HP), dh, input_precision=DOT_PRECISION)
                dh = tl.dot(dz_g, _w_rows(w_layer, 0, 2, H, HP), dh, input_precision=DOT_PRECISION)
                dh = tl.dot(dz_o, _w_rows(w_layer, 0, 3, H, HP), dh, input_precision=DOT_PRECISION)


# -------------------------------------------------------------------------------------------- launcher

def backward(grad: Tensor, h: Tensor, c: Tensor, dtheta: Tensor, dh_next: Tensor, dc_next: Tensor, weights: Tensor,
             shape: NetShape, precision: Optional[str] = None, block_n: int = BLOCK_N) -> tuple[Tensor, Tensor, Tensor]:
    """Adjoints of one step: ``(dh, dc, dweights)`` from the saved ∇, h, c and the incoming adjoints, in
    exact arithmetic whatever ``precision``: this kernel has no fast path yet.

    ``grad`` and ``dtheta`` are flat [N]; ``h``, ``c`` (float32 or bfloat16), ``dh_next``, ``dc_next``
    are [L, N, H]; ``dweights`` is packed like ``weights``.
    """
    device = grad.device
    check_weights(weights, shape, device)
    n = grad.numel()
    state = (shape.layers, n, shape.hidden)
    for name, t in (("h", h), ("c", c), ("dh_next", dh_next), ("dc_next", dc_next)):
        if tuple(t.shape) != state or not t.is_contiguous() or t.device != device:
            raise ValueError(f"{name} must be contiguous {list(state)} on {device}, got {list(t.shape)}")
    num_blocks = triton.cdiv(n, block_n)
    programs = max(1, min(num_blocks, BACKWARD_PROGRAMS))
    partial = torch.zeros(programs, shape.packed_size, device=device, dtype=torch.float32)
    dh = torch.empty(state, device=device, dtype=torch.float32)
    dc = torch.empty(state, device=device, dtype=torch.float32)
    if n:
        p = 1.0 if shape.preprocess_p is None else float(shape.preprocess_p)
        _l2l_bwd_kernel[(programs,)](
            grad, h, c, dtheta, dh_next, dc_next, dh, dc, partial, weights, n, num_blocks,
            float(shape.output_scale), 1.0 / p, math.exp(-p), math.exp(p),
            L=shape.layers, H=shape.hidden, HP=padded(shape.hidden), IN=shape.features,
            PREPROCESS=shape.preprocess_p is not None, BLOCK_N=block_n, DOT_PRECISION=DOT_PRECISION,
            ROW=shape.packed_size, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    return dh, dc, partial.sum(0)  # the second, deterministic, stage of the reduction
