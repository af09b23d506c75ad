"""The fused forward step in Triton: preprocessing, L LSTM layers, head and update in one kernel.

Reads top to bottom: the kernel → its launcher → the public entry points, :func:`forward` (meta-training's
out-of-place step) and :func:`group_step` (the optimizer's in-place step, a custom op). The specification
they must match is :mod:`l2l_fused.ops.reference`; the per-coordinate math is in
:mod:`l2l_fused.ops.triton.math`, shared with the backward.

One launch covers every tensor of a param group, whatever their shapes and dtypes: the launcher writes a
table with one row per tensor (:mod:`l2l_fused.ops.constants` names its columns) and a block→tensor map,
as PyTorch's fused Adam and apex's multi_tensor_apply do. Persistent programs walk the blocks; a block
is ``BLOCK_N`` coordinates of one tensor, so a program branches on that tensor's dtype once per block,
uniformly, and nothing is copied or concatenated: θ, ∇ and the state are read and written where they
live. The tables are the optimizer's (:class:`~l2l_fused.ops.launch_table.LaunchTable`, which also keeps
them valid under CUDA-graph capture): a step whose tensors did not move is exactly one kernel launch.
docs/kernels.md ("The Triton forward", "Arithmetic modes") has the design and its static model.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..constants import COLUMN
from ..launch_table import LaunchTable, supported_dtypes
from ..layout import NetShape
from ..precision import PRECISIONS, resolve
from ..update import Update
from .math import (_dot_tf32, _features, _load_f32, _logistic2, _split_gates, _store_theta_plus, _tanh, _tanh_fast,
                   _to_state)

STATE_DTYPES = (torch.float32, torch.bfloat16)

BLOCK_N = 128  # coordinates per pass of a program's loop: a wgmma tile of M = 64 per warpgroup
NUM_WARPS = 8
# Software pipelining (cp.async prefetch of the next blocks' loads) per precision. The exact mode's
# three-pass tiles, twice the fast mode's, would not fit in shared memory twice over: it loads as it goes.
NUM_STAGES = {"fast": 3, "exact": 1}
# Programs per SM of the persistent grid: enough resident warps to cover the loads' latency.
PROGRAMS_PER_SM = 4
# The interpreter runs programs one after another: two of them walk every block, so each test crosses
# the loop over blocks.
INTERPRETER_PROGRAMS = 2

# Meta-training's launches (the out-of-place forward and the backward) keep φ's tiles here across
# unrolled steps: the net's kernel_weights is one tensor until a weight changes, so an unrolled step
# launches no kernel to make them. (Their launch tables, new outputs at every step, are made each time.)
META_TABLE = LaunchTable()

# The launch table's columns, as the kernel reads them (a jitted function sees only constexpr globals).
COLUMNS = tl.constexpr(len(COLUMN))
THETA_IN, THETA_OUT, GRAD = (tl.constexpr(COLUMN[name]) for name in ("theta_in", "theta_out", "grad"))
H_IN, H_OUT, C_IN, C_OUT = (tl.constexpr(COLUMN[name]) for name in ("h_in", "h_out", "c_in", "c_out"))
NUMEL, DTYPE, FIRST_BLOCK = (tl.constexpr(COLUMN[name]) for name in ("numel", "dtype", "first_block"))


@triton.jit
def _state_at(n, mask, K: tl.constexpr, H: tl.constexpr, G: tl.constexpr):
    """Offsets ``[BLOCK_N, K/G, G]`` of units G·j + e of coordinates n in a block's ``[BLOCK_N, H]`` state, and
    the mask (n's, and units < H), constant over e: groups of G units load and store as one vector."""
    j = tl.arange(0, K // G)
    offs = n[:, None, None] * H + (j * G)[None, :, None] + tl.arange(0, G)[None, None, :]
    return offs, mask[:, None, None] & (j < H // G)[None, :, None]


@triton.jit
def _load_state(ptr, n, mask, K: tl.constexpr, H: tl.constexpr, G: tl.constexpr):
    """The state of a block as float32 ``[BLOCK_N, K]``, zero in units ≥ H."""
    offs, m = _state_at(n, mask, K, H, G)
    return tl.reshape(tl.load(ptr + offs, mask=m, other=0.0), [n.shape[0], K]).to(tl.float32)


@triton.jit
def _store_state(ptr, n, mask, x, K: tl.constexpr, H: tl.constexpr, G: tl.constexpr):
    offs, m = _state_at(n, mask, K, H, G)
    tl.store(ptr + offs, tl.reshape(_to_state(x, ptr.dtype.element_ty), [n.shape[0], K // G, G]), mask=m)


@triton.jit
def _tile_dot(a, at, LO: tl.constexpr, EXACT: tl.constexpr, INF: tl.constexpr, acc):
    """acc + a · the block of a host-made operand tile at pointers ``at`` ``[K, N]``: its hi part, and in
    exact mode its lo part, LO elements further. Read from L1/L2 at every block (Triton stages it into
    shared memory for the tensor cores): held in registers across the loop, it would leave too few for the
    block."""
    hi = tl.load(at)
    if EXACT:
        lo = tl.load(at + LO)
    else:
        lo = hi
    return _dot_tf32(a, hi, lo, acc, EXACT, INF)


@triton.jit
def _preact(a, t_ptr, K: tl.constexpr, HP: tl.constexpr, first: tl.constexpr, N: tl.constexpr, EXACT: tl.constexpr,
            INF: tl.constexpr, acc):
    """acc + a · columns [first, first + N) of the operand tile ``[K, 4·HP]`` at ``t_ptr``
    (:func:`tensor_core_weights`: hi, then lo in exact mode)."""
    at = t_ptr + tl.arange(0, K)[:, None] * (4 * HP) + first + tl.arange(0, N)[None, :]
    return _tile_dot(a, at, K * 4 * HP, EXACT, INF, acc)


@triton.jit
def _gate_preacts(a, t_a, K_A: tl.constexpr, b, t_b, K_B: tl.constexpr, TWO: tl.constexpr, BLOCK_N: tl.constexpr,
                  HP: tl.constexpr, PER_GATE: tl.constexpr, EXACT: tl.constexpr, INF: tl.constexpr):
    """A layer's pre-activations (i, f, g, o), each ``[BLOCK_N, HP]``, from its operands: ``a`` against the
    tile at ``t_a``, and (if TWO) ``b`` against ``t_b``. One dot per operand over all four gates (N = 4·HP),
    split in registers; or, where such tiles would not fit in shared memory (PER_GATE), one per gate. INF:
    ``a`` may hold ±inf. Padded units get z = 0."""
    if PER_GATE:
        zero = tl.zeros([BLOCK_N, HP], dtype=tl.float32)
        zi = _preact(a, t_a, K_A, HP, 0, HP, EXACT, INF, zero)
        zf = _preact(a, t_a, K_A, HP, HP, HP, EXACT, INF, zero)
        zg = _preact(a, t_a, K_A, HP, 2 * HP, HP, EXACT, INF, zero)
        zo = _preact(a, t_a, K_A, HP, 3 * HP, HP, EXACT, INF, zero)
        if TWO:
            zi = _preact(b, t_b, K_B, HP, 0, HP, EXACT, False, zi)
            zf = _preact(b, t_b, K_B, HP, HP, HP, EXACT, False, zf)
            zg = _preact(b, t_b, K_B, HP, 2 * HP, HP, EXACT, False, zg)
            zo = _preact(b, t_b, K_B, HP, 3 * HP, HP, EXACT, False, zo)
    else:
        z = _preact(a, t_a, K_A, HP, 0, 4 * HP, EXACT, INF, tl.zeros([BLOCK_N, 4 * HP], dtype=tl.float32))
        if TWO:
            z = _preact(b, t_b, K_B, HP, 0, 4 * HP, EXACT, False, z)
        zi, zf, zg, zo = _split_gates(z, BLOCK_N, HP)
    return zi, zf, zg, zo


@triton.jit
def _layer(a, t_a, K_A: tl.constexpr, b, t_b, K_B: tl.constexpr, TWO: tl.constexpr, c, BLOCK_N: tl.constexpr,
           HP: tl.constexpr, PER_GATE: tl.constexpr, EXACT: tl.constexpr, INF: tl.constexpr):
    """(c', h') of one layer from its operands (:func:`_gate_preacts`). Padded units have z = 0:
    i = f = o = ½, g = 0, and c = 0, so c' = h' = 0 there."""
    zi, zf, zg, zo = _gate_preacts(a, t_a, K_A, b, t_b, K_B, TWO, BLOCK_N, HP, PER_GATE, EXACT, INF)
    i, f, g, o = _activate(zi, zf, zg, zo, EXACT)
    c = f * c + i * g
    return c, o * _cell_tanh(c, EXACT)


@triton.jit
def _bottom_operand(h_ptr, n, mask, x0, x1, K0: tl.constexpr, H: tl.constexpr, G: tl.constexpr, IN: tl.constexpr):
    """Layer 0's dot operand ``[h | x0 (x1) | 1]``, ``[BLOCK_N, K0]``, zero past it."""
    k0 = tl.arange(0, K0)
    a = tl.where(k0[None, :] == H, x0[:, None], _load_state(h_ptr, n, mask, K0, H, G))
    if IN == 2:
        a = tl.where(k0[None, :] == H + 1, x1[:, None], a)
    return tl.where(k0[None, :] == H + IN, 1.0, a)


@triton.jit
def _activate(zi, zf, zg, zo, EXACT: tl.constexpr):
    """(i, f, g, o) from pre-activations that carry their gate's pre-scale (the tiles' columns do,
    :data:`GATE_SCALES`), so each arrives as its activation wants it."""
    if EXACT:  # σ(z) = 1 / (1 + 2^(−z·log₂e)), tanh(z) = 2 / (1 + 2^(−2z·log₂e)) − 1
        i, f, g, o = _logistic2(zi), _logistic2(zf), 2.0 * _logistic2(zg) - 1.0, _logistic2(zo)
    else:  # σ(z) = ½ + ½·tanh(z/2)
        i, f = 0.5 + 0.5 * _tanh_fast(zi), 0.5 + 0.5 * _tanh_fast(zf)
        g, o = _tanh_fast(zg), 0.5 + 0.5 * _tanh_fast(zo)
    return i, f, g, o


@triton.jit
def _cell_tanh(c, EXACT: tl.constexpr):
    if EXACT:
        t = _tanh(c)
    else:
        t = _tanh_fast(c)
    return t


@triton.jit
def _l2l_fwd_kernel(
    table_ptr, block_tensor_ptr, t_ptr, skipped_ptr, lr_ptr, num_blocks,
    output_scale, inv_p, threshold, exp_p, lr, weight_decay,
    L: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, G: tl.constexpr,
    IN: tl.constexpr,
    PREPROCESS: tl.constexpr, STATE_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, EXACT: tl.constexpr,
    PER_GATE: tl.constexpr, GROUP_STEP: tl.constexpr, LR_TENSOR: tl.constexpr, MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # Where each operand's tile starts in t_ptr (tensor_core_weights): layer 0's [h | x | 1], then per upper
    # layer x (the layer below's h') and [h | 1]; hi then lo in exact mode; the head last.
    PARTS: tl.constexpr = 2 if EXACT else 1
    UPPER: tl.constexpr = K0 * 4 * HP * PARTS
    PER_LAYER: tl.constexpr = (HP + K1) * 4 * HP * PARTS
    kx = tl.arange(0, HP)
    k1 = tl.arange(0, K1)
    n = tl.arange(0, BLOCK_N)
    head = t_ptr + UPPER + (L - 1) * PER_LAYER  # w_out [HP], b_out
    w_out = tl.load(head + kx)
    b_out = tl.load(head + HP)
    decay = 1.0
    if GROUP_STEP:
        if LR_TENSOR:  # read when the kernel runs: a scheduler's in-place change needs no new launch setup
            lr = tl.load(lr_ptr)
        # in float64, where lr·wd is exact: the same bits fused or not, as every backend computes it
        decay = (1.0 - tl.cast(lr, tl.float64) * tl.cast(weight_decay, tl.float64)).to(tl.float32)
    skipped = tl.zeros([BLOCK_N], dtype=tl.int32)

    # Persistent: each program walks blocks pid, pid + programs, ... (any of the group's tensors).
    for block in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
        row = table_ptr + tl.load(block_tensor_ptr + block).to(tl.int64) * COLUMNS
        start = (block - tl.load(row + FIRST_BLOCK)) * BLOCK_N  # int64: N·H can pass 2**31
        numel = tl.load(row + NUMEL)
        mask = n < numel - start
        code = tl.load(row + DTYPE)
        layer_stride = numel * H
        theta_in = tl.load(row + THETA_IN)
        theta_out = tl.load(row + THETA_OUT)
        grad_at = tl.load(row + GRAD)
        # the state's block base in int64, offsets within it in int32: half the address arithmetic
        h_in = tl.load(row + H_IN).to(tl.pointer_type(STATE_DTYPE))
        h_out = tl.load(row + H_OUT).to(tl.pointer_type(STATE_DTYPE))
        c_in = tl.load(row + C_IN).to(tl.pointer_type(STATE_DTYPE))
        c_out = tl.load(row + C_OUT).to(tl.pointer_type(STATE_DTYPE))
        if ALIGNED:  # the launcher checked: every address 16-byte aligned, so groups of G units vectorise
            h_in, h_out = tl.multiple_of(h_in, 16), tl.multiple_of(h_out, 16)
            c_in, c_out = tl.multiple_of(c_in, 16), tl.multiple_of(c_out, 16)
        h_in, h_out, c_in, c_out = h_in + start * H, h_out + start * H, c_in + start * H, c_out + start * H

        grad = _load_f32(grad_at, start + n, mask, code)
        write = mask  # θ written
        keep = mask  # state written, and the learned update applied
        if GROUP_STEP:
            # A NaN or ±inf gradient's coordinate is not written at all (the step is in place), so θ and
            # the state stay as they were: a NaN would poison the state for good. They are counted, one
            # atomic per program at the end, so nothing waits for the host. A zero gradient's coordinate
            # keeps its state and gets no learned update (only weight decay): no gradient signal, no drift.
            bad = mask & ((grad != grad) | (tl.abs(grad) == float("inf")))
            write = mask & ~bad
            keep = write & (grad != 0.0)
            grad = tl.where(bad, 0.0, grad)  # its outputs are dropped; no NaN arithmetic on the way
            skipped += bad.to(tl.int32)
            if MAXIMIZE:
                grad = -grad
        x0, x1 = _features(grad, inv_p, threshold, exp_p, PREPROCESS)

        # layer 0: [h | x0 (x1) | 1] · W0
        a = _bottom_operand(h_in, n, mask, x0, x1, K0, H, G, IN)
        c = _load_state(c_in, n, mask, HP, H, G)
        c, x = _layer(a, t_ptr, K0, a, t_ptr, K0, False, c, BLOCK_N, HP, PER_GATE, EXACT, not GROUP_STEP)
        _store_state(h_out, n, keep, x, HP, H, G)
        _store_state(c_out, n, keep, c, HP, H, G)
        for layer in tl.static_range(1, L):
            at = layer * layer_stride
            tiles = t_ptr + UPPER + (layer - 1) * PER_LAYER
            h = _load_state(h_in + at, n, mask, K1, H, G)
            c = _load_state(c_in + at, n, mask, HP, H, G)
            c, x = _layer(x, tiles, HP, tl.where(k1[None, :] == H, 1.0, h), tiles + HP * 4 * HP * PARTS, K1, True, c,
                          BLOCK_N, HP, PER_GATE, EXACT, False)
            _store_state(h_out + at, n, keep, x, HP, H, G)
            _store_state(c_out + at, n, keep, c, HP, H, G)

        delta = output_scale * (tl.sum(x * w_out[None, :], axis=1) + b_out)
        if GROUP_STEP:
            delta = tl.where(keep, lr * delta, -0.0)  # θ·decay + (-0.0) is θ·decay exactly
        _store_theta_plus(theta_in, theta_out, start + n, write, code, decay, delta)
    if GROUP_STEP:
        tl.atomic_add(skipped_ptr, tl.sum(skipped, axis=0).to(tl.int64))


# -------------------------------------------------------------------------------------------- launcher

def check_weights(weights: Tensor, shape: NetShape, device: torch.device) -> None:
    """Packed φ (:mod:`l2l_fused.ops.layout`) of a net the kernels take, where they run."""
    problem = shape.size_problem()
    if problem:
        raise ValueError(f"the triton kernel {problem}")
    if weights.shape != (shape.packed_size,) or weights.dtype != torch.float32 or weights.device != device \
            or not weights.is_contiguous():
        raise ValueError(f"weights must be φ packed, contiguous float32 [{shape.packed_size}] on {device}, got "
                         f"{weights.dtype} {list(weights.shape)} on {weights.device}")


def padded(values: int) -> int:
    """A register tile's side holding ``values`` (H, or a dot operand's inputs): a power of two, at least 16
    (a dot's smallest side)."""
    return max(16, triton.next_power_of_2(values))


# Each gate's columns (i, f, g, o) are multiplied by what its activation first multiplies by: the kernel's
# pre-activations arrive scaled, and no program spends a multiply per gate element on it. Exact:
# σ(z) = 1/(1 + 2^(−z·log₂e)) and tanh(z) = 2/(1 + 2^(−2z·log₂e)) − 1; fast: σ(z) = ½ + ½·tanh(z/2). The
# scaled weight is rounded to float32 once (≤ 2⁻²⁴ relative, against the products' 2⁻²⁰ or 2⁻¹⁰).
GATE_SCALES = {
    "exact": (-math.log2(math.e), -math.log2(math.e), -2 * math.log2(math.e), -math.log2(math.e)),
    "fast": (0.5, 0.5, 1.0, 0.5),
}


def round_tf32(t: Tensor) -> Tensor:
    """``t`` (float32) rounded to TF32, to nearest even (NaN kept): exactly what the tensor cores multiply."""
    bits = t.view(torch.int32)  # int32 arithmetic wraps as the kernel's uint32 does: the same bits
    rounded = ((bits + 0xFFF + ((bits >> 13) & 1)) & -0x2000).view(torch.float32)
    return torch.where(t != t, t, rounded)


def operand_tiles(weights: Tensor, shape: NetShape) -> list[Tensor]:
    """φ per dot operand, as a ``[K, 4·HP]`` matrix, column gate·HP + unit (zero for units ≥ H), rows
    zero-padded to K: layer 0's operand ``[h | x | 1]`` (K0 rows), then per upper layer ``x`` (HP rows)
    and ``[h | 1]`` (K1 rows), from packed φ (:mod:`l2l_fused.ops.layout`); :func:`packed_from_tiles`
    maps such matrices back."""
    H, HP = shape.hidden, padded(shape.hidden)
    tiles = []
    for layer in range(shape.layers):
        start = shape.layer_offset(layer)
        matrix = weights[start:start + shape.rows(layer) * 4 * H].view(shape.rows(layer), 4, H)
        for operand in range(1 if layer == 0 else 2):
            rows = operand_rows(shape, layer, operand)
            out = weights.new_zeros(padded(len(rows)), 4, HP)  # K rows: K0, HP or K1
            out[:len(rows), :, :H] = matrix[rows]
            tiles.append(out.reshape(-1, 4 * HP))
    return tiles


def operand_rows(shape: NetShape, layer: int, operand: int) -> list[int]:
    """The rows of layer ``layer``'s packed matrix that its ``operand``-th dot operand holds, in order."""
    H, IN = shape.hidden, shape.features
    if layer == 0:
        return [IN + k for k in range(H)] + list(range(IN)) + [IN + H]
    return list(range(H)) if operand == 0 else [H + k for k in range(H)] + [2 * H]


def packed_from_tiles(flat: Tensor, shape: NetShape, scales: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Packed φ's layout (:mod:`l2l_fused.ops.layout`) of matrices laid out as :func:`operand_tiles` makes
    them, one after another, each gate's columns times ``scales[gate]``, then the head (``w_out`` padded to
    HP, ``b_out``): how the backward kernel returns weight gradients."""
    H, HP = shape.hidden, padded(shape.hidden)
    gates = flat.new_tensor(scales).view(1, 4, 1)
    out = flat.new_zeros(shape.packed_size)
    at = 0
    for layer in range(shape.layers):
        start = shape.layer_offset(layer)
        matrix = out[start:start + shape.rows(layer) * 4 * H].view(shape.rows(layer), 4, H)
        for operand in range(1 if layer == 0 else 2):
            rows = operand_rows(shape, layer, operand)
            K = padded(len(rows))
            matrix[rows] = flat[at:at + K * 4 * HP].view(K, 4, HP)[:len(rows), :, :H] * gates
            at += K * 4 * HP
    out[shape.layer_offset(shape.layers):] = torch.cat([flat[at:at + H], flat[at + HP:at + HP + 1]])
    return out


def tensor_core_weights(weights: Tensor, shape: NetShape, precision: str) -> Tensor:
    """φ as the forward kernel's dots take it: :func:`operand_tiles`, each gate's columns times its
    pre-scale (:data:`GATE_SCALES`), then TF32-split: hi (and, in exact mode, lo) part; then the head,
    ``w_out`` padded to HP and ``b_out``. Made once per φ and precision (the launch table keeps it), so the
    kernel's tile loads are unmasked, aligned and contiguous, and no program rounds a weight."""
    H, HP = shape.hidden, padded(shape.hidden)
    scales = weights.new_tensor(GATE_SCALES[precision]).repeat_interleave(HP)
    head = weights[shape.layer_offset(shape.layers):]
    parts = []
    for t in operand_tiles(weights, shape):
        hi = round_tf32(t * scales)
        parts += [hi.reshape(-1), round_tf32(t * scales - hi).reshape(-1)] if precision == "exact" else [hi.reshape(-1)]
    return torch.cat(parts + [torch.nn.functional.pad(head[:H], (0, HP - H)), head[H:]])


def launch_config(shape: NetShape, precision: str) -> tuple[int, int, int]:
    """(BLOCK_N, warps, pipeline stages) of the default launch. Nets of H > 32 take dots gate by gate, in
    blocks of 64 by one warpgroup, unpipelined: their tiles leave no room for prefetched copies."""
    if per_gate_dots(shape):
        return 64, 4, 1
    return BLOCK_N, NUM_WARPS, NUM_STAGES[precision]


def per_gate_dots(shape: NetShape) -> bool:
    """Whether the forward's dots go gate by gate: when the largest all-gates tile (K0 × 4·HP float32, hi
    and lo) would not leave room in shared memory (227 KB a block) for the others and the loads in flight."""
    return padded(shape.hidden) > 32


def vector_units(hidden: int, state_dtype: torch.dtype) -> int:
    """Units of a coordinate's state that load as one vector: the largest power of two that divides H, up
    to 16 bytes (the launcher checks the tensors' 16-byte alignment and falls back to ALIGNED=False)."""
    units = 16 * 8 // torch.finfo(state_dtype).bits
    while hidden % units:
        units //= 2
    return units


def launch_forward(
    rows: list[tuple[Tensor, ...]],
    weights: Tensor,
    shape: NetShape,
    table: Optional[LaunchTable] = None,
    precision: str = "exact",
    skipped: Optional[Tensor] = None,
    update: Update = Update(),
    block_n: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    programs: Optional[int] = None,
) -> None:
    """One launch over every row ``(θ_in, θ_out, ∇, h_in, h_out, c_in, c_out)``, through ``table`` (a
    temporary one if None), in ``precision`` (``"exact"`` or ``"fast"``: :mod:`l2l_fused.ops.precision`).

    With ``skipped`` (an int64 on the device; every row then in place, outputs the inputs) this is the
    optimizer's step: a coordinate whose ∇ is NaN or ±inf is not written, so it keeps θ and its state, and
    is counted into ``skipped``; one whose ∇ is zero keeps its state and gets no learned update; θ' =
    θ·(1 − lr·wd) + lr·Δ with ``update``'s options (:class:`~l2l_fused.ops.update.Update`). Without it,
    θ' = θ + Δ for every coordinate (meta-training's step) and ``update`` must be the default.

    θ and ∇ are contiguous, of one dtype per row (float32, bfloat16, float16 or float64); the state is
    contiguous ``[L, numel, H]``, float32 or bfloat16, one dtype for all rows. Outputs may alias inputs
    (the optimizer updates in place): every element is read by the program that writes it, before it
    writes it. ``block_n``, ``num_warps``, ``num_stages`` override :func:`launch_config`; ``programs``
    (default: :data:`PROGRAMS_PER_SM` per SM) sizes the persistent grid.
    """
    if not rows:
        return
    device = rows[0][0].device
    check_weights(weights, shape, device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    state_dtype = rows[0][3].dtype
    for row in rows:
        theta_in, theta_out, grad, h_in, h_out, c_in, c_out = row
        n = theta_in.numel()
        if theta_in.dtype not in supported_dtypes() or theta_out.dtype != theta_in.dtype or grad.dtype != theta_in.dtype:
            raise ValueError(f"θ and ∇ must share one of {supported_dtypes()}, got {theta_in.dtype}, {grad.dtype}")
        if theta_out.numel() != n or grad.numel() != n:
            raise ValueError(f"θ in/out and ∇ must have {n} elements")
        for s in (h_in, h_out, c_in, c_out):
            if tuple(s.shape) != (shape.layers, n, shape.hidden) or s.dtype != state_dtype:
                raise ValueError(f"state must be {state_dtype} [{shape.layers}, {n}, {shape.hidden}], got {s.dtype} "
                                 f"{list(s.shape)}")
        for t in row:
            if t.device != device or not t.is_contiguous():
                raise ValueError(f"every tensor must be contiguous and on {device}")
    lr_tensor = isinstance(update.lr, Tensor)
    if skipped is not None:
        if skipped.dtype != torch.int64 or skipped.numel() != 1 or skipped.device != device:
            raise ValueError(f"skipped must be one int64 on {device}")
        if any(row[1] is not row[0] or row[4] is not row[3] or row[6] is not row[5] for row in rows):
            raise ValueError("skipping non-finite gradients needs an in-place step (outputs the inputs)")
        if lr_tensor and (update.lr.dtype != torch.float32 or update.lr.numel() != 1 or update.lr.device != device):
            raise ValueError(f"a tensor lr must be one float32 on {device}, got {update.lr.dtype} on {update.lr.device}")
    elif lr_tensor or update != Update():
        raise ValueError("lr, weight decay and maximize are options of the optimizer's step (pass skipped)")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state dtype must be one of {list(STATE_DTYPES)}, got {state_dtype}")
    default_block, default_warps, default_stages = launch_config(shape, precision)
    block_n, num_warps, num_stages = block_n or default_block, num_warps or default_warps, num_stages or default_stages
    table = table or LaunchTable()
    tiles = table.derived(weights, precision, lambda: tensor_core_weights(weights, shape, precision))
    table, block_tensor, num_blocks = table.get(rows, block_n, device)
    programs = min(num_blocks, programs or default_programs(device))
    p = 1.0 if shape.preprocess_p is None else float(shape.preprocess_p)
    _l2l_fwd_kernel[(programs,)](
        table, block_tensor, tiles,
        table if skipped is None else skipped,  # any pointer where nothing is counted
        update.lr if lr_tensor else weights,  # any pointer where lr is a number
        num_blocks,
        float(shape.output_scale), 1.0 / p, math.exp(-p), math.exp(p), 1.0 if lr_tensor else float(update.lr),
        float(update.weight_decay),
        **kernel_constants(shape, state_dtype, precision, block_n), GROUP_STEP=skipped is not None,
        LR_TENSOR=lr_tensor, MAXIMIZE=update.maximize, ALIGNED=all(t.data_ptr() % 16 == 0 for row in rows for t in row),
        num_warps=num_warps, num_stages=num_stages,
    )


def kernel_constants(shape: NetShape, state_dtype: torch.dtype, precision: str, block_n: int = BLOCK_N) -> dict:
    """The constexprs of a forward launch that follow from the net, the state dtype and the precision."""
    return dict(
        L=shape.layers, H=shape.hidden, HP=padded(shape.hidden),
        K0=padded(shape.hidden + shape.features + 1), K1=padded(shape.hidden + 1),
        G=vector_units(shape.hidden, state_dtype), IN=shape.features,
        PREPROCESS=shape.preprocess_p is not None,
        STATE_DTYPE=tl.float32 if state_dtype == torch.float32 else tl.bfloat16,
        BLOCK_N=block_n, EXACT=precision == "exact", PER_GATE=per_gate_dots(shape),
    )


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ---------------------------------------------------------------------------------------- entry points

def forward(theta: Tensor, grad: Tensor, h: Tensor, c: Tensor, weights: Tensor, shape: NetShape,
            precision: Optional[str] = None):
    """``(θ + Δ, h', c')`` of a flat θ, out of place (meta-training's step)."""
    theta_out, h_out, c_out = torch.empty_like(theta), torch.empty_like(h), torch.empty_like(c)
    launch_forward([(theta, theta_out, grad, h, h_out, c, c_out)], weights, shape, META_TABLE, resolve(precision))
    return theta_out, h_out, c_out


def group_step(params, grads, hs, cs, skipped: Tensor, weights: Tensor, shape: NetShape, update: Update = Update(),
               table: Optional[LaunchTable] = None, precision: Optional[str] = None) -> None:
    """The optimizer's in-place step of a param group in one launch, through ``table``."""
    _group_step_op(params, grads, hs, cs, skipped, weights, shape.layers, shape.hidden, shape.features,
                   shape.preprocess_p, shape.output_scale, *update.lr_arguments(), update.weight_decay, update.maximize,
                   -1 if table is None else table.handle, precision)


@torch.library.custom_op("l2l_fused::triton_group_step", mutates_args=("params", "h", "c", "skipped"))
def _group_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    h: list[Tensor],
    c: list[Tensor],
    skipped: Tensor,
    weights: Tensor,
    layers: int,
    hidden: int,
    features: int,
    preprocess_p: Optional[float],
    output_scale: float,
    lr_tensor: Optional[Tensor] = None,
    lr: float = 1.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
    table: int = -1,
    precision: Optional[str] = None,
) -> None:
    """Opaque to torch.compile, which sees only what it mutates. ``lr_tensor`` (a float32 on the device),
    when given, is the lr and ``lr`` is not read; ``table`` is a LaunchTable's handle; ``precision`` None is
    resolved here, when the op runs (:mod:`l2l_fused.ops.precision`)."""
    rows, write_back = [], []
    for p, g, hs, cs in zip(params, grads, h, c):
        # Non-contiguous tensors (rare for parameters) are stepped through a contiguous copy, written back
        # after the launch: the state's coordinate order stays the logical one, as in the reference.
        work = p if p.is_contiguous() else p.contiguous()
        if work is not p:
            write_back.append((p, work))
        rows.append((work, work, g.contiguous(), hs, hs, cs, cs))
    update = Update(lr if lr_tensor is None else lr_tensor, weight_decay, maximize)
    shape = NetShape(layers, hidden, features, preprocess_p, output_scale)
    launch_forward(rows, weights, shape, LaunchTable.find(table), resolve(precision), skipped=skipped, update=update)
    for p, work in write_back:
        p.copy_(work)


@_group_step_op.register_fake
def _(params, grads, h, c, skipped, weights, layers, hidden, features, preprocess_p, output_scale, lr_tensor=None,
      lr=1.0, weight_decay=0.0, maximize=False, table=-1, precision=None) -> None:
    return None
