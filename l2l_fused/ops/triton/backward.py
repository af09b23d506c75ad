"""The fused backward of the step (docs/spec.md §2) in Triton, in both arithmetic modes.

Reads top to bottom: the kernel → its launcher, :func:`backward`, the entry point that
:class:`~l2l_fused.ops.interface.FusedStep` runs. That Function saves only what the step read (∇ and the
incoming state), never a gate: this kernel recomputes the gates of each layer from those inputs, so an
unrolled step costs 324 B per coordinate in float32 (164 B with bfloat16 saving) where autograd through
``nn.LSTMCell`` keeps every gate of every layer, kilobytes.

A program walks its blocks top layer first. The top layer is evaluated once and differentiated at once
(its gates never leave registers); each layer below is evaluated again from the saved state: for the
paper's two layers, three layer evaluations per block (the bottom one twice), not the five of evaluating
every layer's input from the bottom. The dots are the forward's (:mod:`~l2l_fused.ops.triton.forward`),
per operand one over all four gates, against the same host-made tiles (one copy serves meta-training's
forward and backward); the backward adds, per operand, the input adjoint ``dZ · Wᵀ`` (the tile read
transposed; the adjoints are divided by the gates' pre-scales the tile carries) and the weight gradient
``operandᵀ · dZ`` (the pre-scales put back on the host). The bias is the weight of the operands'
constant column, so its gradient comes out of the same dot.

Registers are the limit: a block's gates, cell states and adjoints (``[64, 32]`` each, 16 registers per
thread at 4 warps), the joined adjoints ``dZ`` and the dots' operands exceed 255, and the kernel spills
(the static model: 1.3 KB per thread in fast mode, 2.4 KB in exact; PERF.md's direction of splitting the
layers over two kernels, or holding the tiles in shared memory with TMA, is the next step).

Weight gradients are sums over all coordinates. They are reduced deterministically: a fixed number of
programs (``BACKWARD_PROGRAMS`` on a GPU, whatever the GPU) each walk their own blocks in a fixed order
and accumulate into their own row of a ``[programs, row]`` buffer, laid out as the tiles are (the dots
accumulate into it: plain loads and stores, a row has one owner and at ~12k floats stays in L2); one
``sum`` over the rows finishes, and :func:`~l2l_fused.ops.triton.forward.packed_from_tiles` maps it to
φ's layout. Atomic adds into a single row instead would serialise ~12k read-modify-writes per block on
the same addresses (~2·10⁸ at 1M coordinates) in an order, hence a rounding, that changes from run to run.
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
from ..precision import resolve
from .forward import (GATE_SCALES, INTERPRETER_PROGRAMS, META_TABLE, _activate, _bottom_operand, _cell_tanh,
                      _gate_preacts, _layer, _load_state, _store_state, _tile_dot, check_weights, packed_from_tiles,
                      tensor_core_weights, vector_units)
from .forward import kernel_constants as forward_constants
from .math import _dot_data, _features, _join_gates

BLOCK_N = 64  # coordinates per block
NUM_WARPS = 4
# No software pipelining of the loop over blocks: two stages would copy the tiles straight to shared memory
# (cp.async) and spill less (fast mode, static model: 1.3 KB → 0.7 KB, 2.36 → 1.74 ms at 1M), but they
# stage every load of the loop and ask 336 KB of shared memory, over the 227 KB a block may have.
NUM_STAGES = 1


@triton.jit
def _acc_weight_grad(ptr, a, dz, K: tl.constexpr, N: tl.constexpr, STRIDE: tl.constexpr, EXACT: tl.constexpr,
                     INF: tl.constexpr):
    """``ptr[k, j] += Σ_n a[n, k]·dz[n, j]`` (row stride STRIDE): a block's share of a weight gradient, in
    the tiles' layout. INF: ``a`` may hold ±inf."""
    at = ptr + tl.arange(0, K)[:, None] * STRIDE + tl.arange(0, N)[None, :]
    tl.store(at, _dot_data(tl.trans(a), dz, tl.load(at), EXACT, INF))


@triton.jit
def _operand_backward(p_ptr, t_ptr, a, K: tl.constexpr, dz_i, dz_f, dz_g, dz_o, BLOCK_N: tl.constexpr,
                      HP: tl.constexpr, PER_GATE: tl.constexpr, EXACT: tl.constexpr, INF: tl.constexpr):
    """One operand's share of a layer's backward, from the gates' adjoints divided by their pre-scales: its
    weight gradient (then times the pre-scales, as the tiles are) added at ``p_ptr`` (``[K, 4·HP]``), and
    its adjoint ``dZ · Wᵀ`` ``[BLOCK_N, K]``, against the forward's own tile at ``t_ptr`` transposed (the
    pre-scales cancel). Per gate where the forward's dots are (PER_GATE)."""
    LO: tl.constexpr = K * 4 * HP
    if PER_GATE:
        _acc_weight_grad(p_ptr, a, dz_i, K, HP, 4 * HP, EXACT, INF)
        _acc_weight_grad(p_ptr + HP, a, dz_f, K, HP, 4 * HP, EXACT, INF)
        _acc_weight_grad(p_ptr + 2 * HP, a, dz_g, K, HP, 4 * HP, EXACT, INF)
        _acc_weight_grad(p_ptr + 3 * HP, a, dz_o, K, HP, 4 * HP, EXACT, INF)
        rows = tl.arange(0, HP)[:, None] + tl.arange(0, K)[None, :] * (4 * HP)  # a gate's columns, transposed
        d = _tile_dot(dz_i, t_ptr + rows, LO, EXACT, False, tl.zeros([BLOCK_N, K], dtype=tl.float32))
        d = _tile_dot(dz_f, t_ptr + HP + rows, LO, EXACT, False, d)
        d = _tile_dot(dz_g, t_ptr + 2 * HP + rows, LO, EXACT, False, d)
        d = _tile_dot(dz_o, t_ptr + 3 * HP + rows, LO, EXACT, False, d)
    else:
        dz = _join_gates(dz_i, dz_f, dz_g, dz_o, BLOCK_N, HP)
        _acc_weight_grad(p_ptr, a, dz, K, 4 * HP, 4 * HP, EXACT, INF)
        at = t_ptr + tl.arange(0, 4 * HP)[:, None] + tl.arange(0, K)[None, :] * (4 * HP)
        d = _tile_dot(dz, at, LO, EXACT, False, tl.zeros([BLOCK_N, K], dtype=tl.float32))
    return d


@triton.jit
def _l2l_bwd_kernel(
    grad_ptr, h_ptr, c_ptr, dtheta_ptr, dh_next_ptr, dc_next_ptr, dh_ptr, dc_ptr, partial_ptr, tiles_ptr,
    n_coords, num_blocks, output_scale, inv_p, threshold, exp_p,
    L: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, G: tl.constexpr,
    GA: tl.constexpr, IN: tl.constexpr, PREPROCESS: tl.constexpr, BLOCK_N: tl.constexpr, EXACT: tl.constexpr,
    PER_GATE: tl.constexpr, ALIGNED: tl.constexpr, S_I: tl.constexpr, S_G: tl.constexpr,
):
    # Tiles (tensor_core_weights; the transposed ones are as large): layer 0's [h | x | 1], then per upper
    # layer x and [h | 1]; hi then lo in exact mode. This program's partial row: the same matrices, one
    # part each, then the head's w_out (HP) and b_out.
    PARTS: tl.constexpr = 2 if EXACT else 1
    UPPER: tl.constexpr = K0 * 4 * HP * PARTS
    PER_LAYER: tl.constexpr = (HP + K1) * 4 * HP * PARTS
    P_UPPER: tl.constexpr = K0 * 4 * HP
    P_LAYER: tl.constexpr = (HP + K1) * 4 * HP
    ROW: tl.constexpr = P_UPPER + (L - 1) * P_LAYER + HP + 1
    part = partial_ptr + tl.program_id(0) * ROW
    kx = tl.arange(0, HP)
    k1 = tl.arange(0, K1)
    n = tl.arange(0, BLOCK_N)
    t_ptr = tl.multiple_of(tl.load(tiles_ptr).to(tl.pointer_type(tl.float32)), 16)
    w_out = tl.load(t_ptr + UPPER + (L - 1) * PER_LAYER + kx)
    d_w_out = tl.zeros([HP], dtype=tl.float32)  # the head's gradients, written once at the end
    d_b_out = tl.zeros([BLOCK_N], dtype=tl.float32)
    layer_stride = tl.cast(n_coords, tl.int64) * H
    if ALIGNED:  # the launcher checked: 16-byte aligned state and adjoints, so groups of units vectorise
        h_ptr, c_ptr = tl.multiple_of(h_ptr, 16), tl.multiple_of(c_ptr, 16)
        dh_next_ptr, dc_next_ptr = tl.multiple_of(dh_next_ptr, 16), tl.multiple_of(dc_next_ptr, 16)
        dh_ptr, dc_ptr = tl.multiple_of(dh_ptr, 16), tl.multiple_of(dc_ptr, 16)

    for block in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
        start = tl.cast(block, tl.int64) * BLOCK_N  # int64: N·H can pass 2**31
        # The tiles' addresses, read again at each block (the stores below may alias them, so the compiler
        # cannot hoist the loads): otherwise it computes every tile element's address once, before the
        # loop, and keeps them all, ~16 registers per tile, across it, and spills.
        t_ptr = tl.multiple_of(tl.load(tiles_ptr).to(tl.pointer_type(tl.float32)), 16)
        mask = n < n_coords - start
        h_in, c_in = h_ptr + start * H, c_ptr + start * H
        x0, x1 = _features(tl.load(grad_ptr + start + n, mask=mask, other=0.0), inv_p, threshold, exp_p, PREPROCESS)
        # rows past n load zero adjoints: dZ = 0 there, so they add nothing to the weight gradients
        du = output_scale * tl.load(dtheta_ptr + start + n, mask=mask, other=0.0)
        d_b_out += du
        dx = tl.zeros([BLOCK_N, HP], dtype=tl.float32)  # adjoint of this layer's h' from the layer above

        for layer in tl.static_range(L - 1, -1, -1):
            at = layer * layer_stride + start * H
            if layer == 0:
                a = _bottom_operand(h_in, n, mask, x0, x1, K0, H, G, IN)
                zi, zf, zg, zo = _gate_preacts(a, t_ptr, K0, a, t_ptr, K0, False, BLOCK_N, HP, PER_GATE, EXACT, True)
            else:
                # this layer's input, h' of the layer below, evaluated from the bottom
                a0 = _bottom_operand(h_in, n, mask, x0, x1, K0, H, G, IN)
                x = _layer(a0, t_ptr, K0, a0, t_ptr, K0, False, _load_state(c_in, n, mask, HP, H, G), BLOCK_N, HP,
                           PER_GATE, EXACT, True)[1]
                for below in tl.static_range(1, layer):
                    tiles = t_ptr + UPPER + (below - 1) * PER_LAYER
                    hb = tl.where(k1[None, :] == H, 1.0, _load_state(h_in + below * layer_stride, n, mask, K1, H, G))
                    x = _layer(x, tiles, HP, hb, tiles + HP * 4 * HP * PARTS, K1, True,
                               _load_state(c_in + below * layer_stride, n, mask, HP, H, G), BLOCK_N, HP, PER_GATE,
                               EXACT, False)[1]
                tiles = t_ptr + UPPER + (layer - 1) * PER_LAYER
                b = tl.where(k1[None, :] == H, 1.0, _load_state(h_in + layer * layer_stride, n, mask, K1, H, G))
                zi, zf, zg, zo = _gate_preacts(x, tiles, HP, b, tiles + HP * 4 * HP * PARTS, K1, True, BLOCK_N, HP,
                                               PER_GATE, EXACT, False)
            i, f, g, o = _activate(zi, zf, zg, zo, EXACT)
            c = _load_state(c_in + layer * layer_stride, n, mask, HP, H, G)
            c_new = f * c + i * g
            tc = _cell_tanh(c_new, EXACT)
            dh = _load_state(dh_next_ptr + at, n, mask, HP, H, GA) + dx
            if layer == L - 1:  # the head: Δ = s (w_out · h' + b_out)
                d_w_out += tl.sum(du[:, None] * (o * tc), axis=0)
                dh += du[:, None] * w_out[None, :]
            dc = _load_state(dc_next_ptr + at, n, mask, HP, H, GA) + dh * o * (1.0 - tc * tc)
            _store_state(dc_ptr + at, n, mask, dc * f, HP, H, GA)
            # the pre-activations' adjoints over their gate's pre-scale (tensor_core_weights' GATE_SCALES)
            dz_i = dc * g * i * (1.0 - i) * (1.0 / S_I)
            dz_f = dc * c * f * (1.0 - f) * (1.0 / S_I)
            dz_g = dc * i * (1.0 - g * g) * (1.0 / S_G)
            dz_o = dh * tc * o * (1.0 - o) * (1.0 / S_I)
            if layer == 0:
                d = _operand_backward(part, t_ptr, a, K0, dz_i, dz_f, dz_g, dz_o, BLOCK_N, HP, PER_GATE, EXACT, True)
                _store_state(dh_ptr + at, n, mask, d, K0, H, GA)  # the operand's first H columns: h
            else:
                p = part + P_UPPER + (layer - 1) * P_LAYER
                d = _operand_backward(p + HP * 4 * HP, tiles + HP * 4 * HP * PARTS, b, K1, dz_i, dz_f, dz_g, dz_o,
                                      BLOCK_N, HP, PER_GATE, EXACT, False)
                _store_state(dh_ptr + at, n, mask, d, K1, H, GA)
                dx = _operand_backward(p, tiles, x, HP, dz_i, dz_f, dz_g, dz_o, BLOCK_N, HP, PER_GATE, EXACT, False)

    head = part + P_UPPER + (L - 1) * P_LAYER
    tl.store(head + kx, d_w_out)
    tl.store(head + HP, tl.sum(d_b_out, axis=0))


# -------------------------------------------------------------------------------------------- launcher

def tile_addresses(tiles: Tensor) -> Tensor:
    """Where ``tiles`` starts, as an int64 on its device: the kernel reads its tiles' address at every block."""
    return torch.tensor([tiles.data_ptr()], dtype=torch.int64).to(tiles.device)


def partial_row(shape: NetShape) -> int:
    """Floats in a program's row of weight-gradient partial sums (the kernel's ROW)."""
    c = forward_constants(shape, torch.float32, "exact")
    return c["K0"] * 4 * c["HP"] + (shape.layers - 1) * (c["HP"] + c["K1"]) * 4 * c["HP"] + c["HP"] + 1


def kernel_constants(shape: NetShape, state_dtype: torch.dtype, precision: str, block_n: int = BLOCK_N) -> dict:
    """The constexprs of a backward launch that follow from the net, the saved state's dtype and the mode."""
    forward = forward_constants(shape, state_dtype, precision, block_n)
    return {**{k: forward[k] for k in ("L", "H", "HP", "K0", "K1", "G", "IN", "PREPROCESS", "BLOCK_N", "EXACT",
                                       "PER_GATE")},
            "GA": vector_units(shape.hidden, torch.float32),
            # the pre-scales the tiles carry (GATE_SCALES): σ's, shared by i, f and o, and tanh's (g)
            "S_I": GATE_SCALES[precision][0], "S_G": GATE_SCALES[precision][2]}


def backward(grad: Tensor, h: Tensor, c: Tensor, dtheta: Tensor, dh_next: Tensor, dc_next: Tensor, weights: Tensor,
             shape: NetShape, precision: Optional[str] = None, block_n: Optional[int] = None,
             num_warps: Optional[int] = None, programs: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Adjoints of one step: ``(dh, dc, dweights)`` from the saved ∇, h, c and the incoming adjoints, in
    ``precision`` (None: :func:`~l2l_fused.ops.precision.resolve`).

    ``grad`` and ``dtheta`` are flat float32 [N]; ``h``, ``c`` (float32 or bfloat16), ``dh_next``,
    ``dc_next`` (float32) are [L, N, H]; ``dweights`` is packed like ``weights``. ``block_n``,
    ``num_warps`` and ``programs`` override the launch (the same ``programs`` gives the same bits).
    """
    precision = resolve(precision)
    device = grad.device
    check_weights(weights, shape, device)
    n = grad.numel()
    state = (shape.layers, n, shape.hidden)
    for name, t in (("grad", grad), ("dtheta", dtheta)):
        if t.shape != (n,) or t.dtype != torch.float32 or t.device != device:
            raise ValueError(f"{name} must be float32 [{n}] on {device}, got {t.dtype} {list(t.shape)} on {t.device}")
    for name, t, dtypes in (("h", h, (torch.float32, torch.bfloat16)), ("c", c, (h.dtype,)),
                            ("dh_next", dh_next, (torch.float32,)), ("dc_next", dc_next, (torch.float32,))):
        if tuple(t.shape) != state or not t.is_contiguous() or t.device != device or t.dtype not in dtypes:
            raise ValueError(f"{name} must be contiguous {[str(d) for d in dtypes]} {list(state)} on {device}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")
    block_n, num_warps = block_n or BLOCK_N, num_warps or NUM_WARPS
    num_blocks = triton.cdiv(n, block_n)
    programs = max(1, min(num_blocks, programs or (BACKWARD_PROGRAMS if device.type == "cuda" else INTERPRETER_PROGRAMS)))
    partial = torch.zeros(programs, partial_row(shape), device=device, dtype=torch.float32)
    dh = torch.empty(state, device=device, dtype=torch.float32)
    dc = torch.empty(state, device=device, dtype=torch.float32)
    if n:
        tiles = META_TABLE.derived(weights, precision, lambda: tensor_core_weights(weights, shape, precision))
        addresses = META_TABLE.derived(tiles, ("address", precision), lambda: tile_addresses(tiles))
        p = 1.0 if shape.preprocess_p is None else float(shape.preprocess_p)
        _l2l_bwd_kernel[(programs,)](
            grad, h, c, dtheta, dh_next, dc_next, dh, dc, partial, addresses, n, num_blocks,
            float(shape.output_scale), 1.0 / p, math.exp(-p), math.exp(p),
            **kernel_constants(shape, h.dtype, precision, block_n),
            ALIGNED=all(t.data_ptr() % 16 == 0 for t in (h, c, dh_next, dc_next, dh, dc)),
            num_warps=num_warps, num_stages=NUM_STAGES,
        )
    # the second, deterministic, stage of the reduction
    return dh, dc, packed_from_tiles(partial.sum(0), shape, GATE_SCALES[precision])
