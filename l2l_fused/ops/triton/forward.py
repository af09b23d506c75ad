"""The fused forward step in Triton: preprocessing, L LSTM layers, head and update in one kernel.

Reads top to bottom: the kernel → its launcher → the public entry points, :func:`forward` (meta-training's
out-of-place step) and :func:`group_step` (the optimizer's in-place step, a custom op). The specification
they must match is :mod:`l2l_fused.ops.reference`; the per-coordinate math is in
:mod:`l2l_fused.ops.triton.math`, shared with the backward.

One launch covers every tensor of a param group, whatever their shapes and dtypes: the launcher writes a
table with one row per tensor (:mod:`l2l_fused.ops.constants` names its columns) and a block→tensor map,
as PyTorch's fused Adam and apex's multi_tensor_apply do. A program takes one block of ``BLOCK_N``
coordinates of one tensor, so it branches on that tensor's dtype once, uniformly, and nothing is copied
or concatenated: θ, ∇ and the state are read and written where they live. The tables are the optimizer's
(:class:`~l2l_fused.ops.launch_table.LaunchTable`, which also keeps them valid under CUDA-graph capture):
a step whose tensors did not move is exactly one kernel launch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..constants import COLUMN
from ..launch_table import LaunchTable, supported_dtypes
from ..layout import NetShape
from ..update import Update
from .math import _features, _layer_step, _layer_weights, _load_f32, _store_theta_plus, _to_state

STATE_DTYPES = (torch.float32, torch.bfloat16)

BLOCK_N = 64  # coordinates per program
NUM_WARPS = 4
# tf32x3 splits each float32 operand into two tf32 halves and keeps three of the four products: the gate
# products run on tensor cores with an error near float32's (plain "tf32" rounds operands to 10 bits,
# ~5e-4 relative, too coarse for a state that is fed back every step).
DOT_PRECISION = "tf32x3"

# The launch table's columns, as the kernel reads them (a jitted function sees only constexpr globals).
COLUMNS = tl.constexpr(len(COLUMN))
THETA_IN, THETA_OUT, GRAD = (tl.constexpr(COLUMN[name]) for name in ("theta_in", "theta_out", "grad"))
H_IN, H_OUT, C_IN, C_OUT = (tl.constexpr(COLUMN[name]) for name in ("h_in", "h_out", "c_in", "c_out"))
NUMEL, DTYPE, FIRST_BLOCK = (tl.constexpr(COLUMN[name]) for name in ("numel", "dtype", "first_block"))


@triton.jit
def _l2l_fwd_kernel(
    table_ptr, block_tensor_ptr, w_ptr, skipped_ptr, lr_ptr,
    output_scale, inv_p, threshold, exp_p, lr, weight_decay,
    L: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, IN: tl.constexpr, PREPROCESS: tl.constexpr,
    STATE_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_STEP: tl.constexpr,
    LR_TENSOR: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * COLUMNS
    numel = tl.load(row + NUMEL)
    code = tl.load(row + DTYPE)
    offs = (pid - tl.load(row + FIRST_BLOCK)) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N*H can pass 2**31
    mask = offs < numel

    grad = _load_f32(tl.load(row + GRAD), offs, mask, code)
    write = mask  # θ written
    keep = mask  # state written, and the learned update applied
    if GROUP_STEP:
        # A NaN or ±inf gradient's coordinate is not written at all (the step is in place), so θ and
        # the state stay as they were: a NaN would poison the state for good. Not keeping the old
        # values in registers matters: the kernel is at its register limit. One atomic per program
        # counts them, so nothing waits for the host. A zero gradient's coordinate keeps its state and
        # gets no learned update (only weight decay): no gradient signal, no drift.
        bad = mask & ((grad != grad) | (tl.abs(grad) == float("inf")))
        write = mask & ~bad
        keep = write & (grad != 0.0)
        grad = tl.where(bad, 0.0, grad)  # its outputs are dropped; no NaN arithmetic on the way
        tl.atomic_add(skipped_ptr, tl.sum(bad.to(tl.int64), axis=0))
        if MAXIMIZE:
            grad = -grad
    x0, x1 = _features(grad, inv_p, threshold, exp_p, PREPROCESS)

    k = tl.arange(0, HP)
    state_offs = offs[:, None] * H + k[None, :]
    state_mask = mask[:, None] & (k[None, :] < H)
    store_mask = keep[:, None] & (k[None, :] < H)
    layer_stride = numel * H
    h_in = tl.load(row + H_IN).to(tl.pointer_type(STATE_DTYPE))
    h_out = tl.load(row + H_OUT).to(tl.pointer_type(STATE_DTYPE))
    c_in = tl.load(row + C_IN).to(tl.pointer_type(STATE_DTYPE))
    c_out = tl.load(row + C_OUT).to(tl.pointer_type(STATE_DTYPE))

    x = tl.zeros([BLOCK_N, HP], dtype=tl.float32)
    for layer in tl.static_range(L):
        at = layer * layer_stride + state_offs
        c, x = _layer_step(x, x0, x1, h_in, c_in, at, state_mask, w_ptr, layer, IN, H, HP, DOT_PRECISION)
        tl.store(h_out + at, _to_state(x, STATE_DTYPE), mask=store_mask)
        tl.store(c_out + at, _to_state(c, STATE_DTYPE), mask=store_mask)

    head = _layer_weights(w_ptr, L, IN, H)  # w_out [H], b_out
    w_out = tl.load(head + k, mask=k < H, other=0.0)
    delta = output_scale * (tl.sum(x * w_out[None, :], axis=1) + tl.load(head + H))
    decay = 1.0
    if GROUP_STEP:
        if LR_TENSOR:  # read when the kernel runs: a scheduler's in-place change needs no new launch setup
            lr = tl.load(lr_ptr)
        # in float64, where lr·wd is exact: the same bits fused or not, as every backend computes it
        decay = (1.0 - tl.cast(lr, tl.float64) * tl.cast(weight_decay, tl.float64)).to(tl.float32)
        delta = tl.where(keep, lr * delta, -0.0)  # θ·decay + (-0.0) is θ·decay exactly
    _store_theta_plus(tl.load(row + THETA_IN), tl.load(row + THETA_OUT), offs, write, code, decay, delta)


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


def padded(hidden: int) -> int:
    """H as the kernels' register tiles hold it: a power of two, at least 16 (a dot's smallest side)."""
    return max(16, triton.next_power_of_2(hidden))


def launch_forward(
    rows: list[tuple[Tensor, ...]],
    weights: Tensor,
    shape: NetShape,
    table: Optional[LaunchTable] = None,
    block_n: Optional[int] = None,
    dot_precision: str = DOT_PRECISION,
    num_warps: int = NUM_WARPS,
    skipped: Optional[Tensor] = None,
    update: Update = Update(),
) -> None:
    """One launch over every row ``(θ_in, θ_out, ∇, h_in, h_out, c_in, c_out)``, through ``table`` (a
    temporary one if None).

    With ``skipped`` (an int64 on the device; every row then in place, outputs the inputs) this is the
    optimizer's step: a coordinate whose ∇ is NaN or ±inf is not written, so it keeps θ and its state, and
    is counted into ``skipped``; one whose ∇ is zero keeps its state and gets no learned update; θ' =
    θ·(1 − lr·wd) + lr·Δ with ``update``'s options (:class:`~l2l_fused.ops.update.Update`). Without it,
    θ' = θ + Δ for every coordinate (meta-training's step) and ``update`` must be the default.

    θ and ∇ are contiguous, of one dtype per row (float32, bfloat16, float16 or float64); the state is
    contiguous ``[L, numel, H]``, float32 or bfloat16, one dtype for all rows. Outputs may alias inputs
    (the optimizer updates in place): every element is read by the program that writes it, before it
    writes it.
    """
    if not rows:
        return
    device = rows[0][0].device
    check_weights(weights, shape, device)
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
    block_n = block_n or forward_block(padded(shape.hidden))
    table, block_tensor, num_blocks = (table or LaunchTable()).get(rows, block_n, device)
    p = 1.0 if shape.preprocess_p is None else float(shape.preprocess_p)
    _l2l_fwd_kernel[(num_blocks,)](
        table, block_tensor, weights,
        table if skipped is None else skipped,  # any pointer where nothing is counted
        update.lr if lr_tensor else weights,  # any pointer where lr is a number
        float(shape.output_scale), 1.0 / p, math.exp(-p), math.exp(p), 1.0 if lr_tensor else float(update.lr),
        float(update.weight_decay),
        L=shape.layers, H=shape.hidden, HP=padded(shape.hidden), IN=shape.features,
        PREPROCESS=shape.preprocess_p is not None,
        STATE_DTYPE=tl.float32 if state_dtype == torch.float32 else tl.bfloat16,
        BLOCK_N=block_n, DOT_PRECISION=dot_precision, GROUP_STEP=skipped is not None, LR_TENSOR=lr_tensor,
        MAXIMIZE=update.maximize, num_warps=num_warps,
    )


def forward_block(padded_hidden: int) -> int:
    """Coordinates per program. At H padded to 64 the default launch (wgmma, 1.6 KB of spills) computed
    wrong rows of the last layer, in runs of 8, on an H100 under compute-sanitizer memcheck (0 memory
    errors; correct without it, and with BLOCK_N=32, which takes mma.sync): that size gets 32."""
    return BLOCK_N if padded_hidden < 64 else 32


# ---------------------------------------------------------------------------------------- entry points

def forward(theta: Tensor, grad: Tensor, h: Tensor, c: Tensor, weights: Tensor, shape: NetShape):
    """``(θ + Δ, h', c')`` of a flat θ, out of place (meta-training's step)."""
    theta_out, h_out, c_out = torch.empty_like(theta), torch.empty_like(h), torch.empty_like(c)
    launch_forward([(theta, theta_out, grad, h, h_out, c, c_out)], weights, shape)
    return theta_out, h_out, c_out


def group_step(params, grads, hs, cs, skipped: Tensor, weights: Tensor, shape: NetShape, update: Update = Update(),
               table: Optional[LaunchTable] = None) -> None:
    """The optimizer's in-place step of a param group in one launch, through ``table``."""
    _group_step_op(params, grads, hs, cs, skipped, weights, shape.layers, shape.hidden, shape.features,
                   shape.preprocess_p, shape.output_scale, *update.lr_arguments(), update.weight_decay, update.maximize,
                   -1 if table is None else table.handle)


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
) -> None:
    """Opaque to torch.compile, which sees only what it mutates. ``lr_tensor`` (a float32 on the device),
    when given, is the lr and ``lr`` is not read; ``table`` is a LaunchTable's handle."""
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
    launch_forward(rows, weights, shape, LaunchTable.find(table), skipped=skipped, update=update)
    for p, work in write_back:
        p.copy_(work)


@_group_step_op.register_fake
def _(params, grads, h, c, skipped, weights, layers, hidden, features, preprocess_p, output_scale, lr_tensor=None,
      lr=1.0, weight_decay=0.0, maximize=False, table=-1) -> None:
    return None
