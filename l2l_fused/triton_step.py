"""The fused forward step in Triton: preprocessing, L LSTM layers, head and update in one kernel.

Reads top to bottom: forward kernel → launcher → custom op (the optimizer's in-place group step). The
reference it must match is :func:`l2l_fused.reference.l2l_update_ref`; the per-coordinate math is in
:mod:`l2l_fused.triton_math`, shared with the backward.

One launch covers every tensor of a param group, whatever their shapes and dtypes: the launcher writes a
table with one row per tensor (addresses of θ in/out, ∇, h in/out, c in/out, its size, dtype code and
first block) and a block→tensor map, as PyTorch's fused Adam and apex's multi_tensor_apply do. A program
takes one block of ``BLOCK_N`` coordinates of one tensor, so it branches on that tensor's dtype once,
uniformly, and nothing is copied or concatenated: θ, ∇ and the state are read and written where they
live. The tables are cached (:mod:`l2l_fused.launch_tables`, which also keeps them valid under CUDA-graph
capture): a step whose tensors did not move is exactly one kernel launch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .backends import Update
from .fused import size_problem
from .launch_tables import DTYPE_CODES, LaunchTables
from .triton_backend import MAX_HIDDEN, MAX_LAYERS
from .triton_math import triton

if triton is not None:
    import triton.language as tl

    from .triton_math import _features, _gates, _load_f32, _store_theta_plus, _tanh, _to_state  # noqa: F401

STATE_DTYPES = (torch.float32, torch.bfloat16)

BLOCK_N = 64  # coordinates per program
NUM_WARPS = 4
# tf32x3 splits each float32 operand into two tf32 halves and keeps three of the four products: the gate
# products run on tensor cores with an error near float32's (plain "tf32" rounds operands to 10 bits,
# ~5e-4 relative, too coarse for a state that is fed back every step).
DOT_PRECISION = "tf32x3"


if triton is not None:

    @triton.jit
    def _l2l_fwd_kernel(
        table_ptr, block_tensor_ptr, cells, head_w_ptr, head_b_ptr, skipped_ptr, lr_ptr,
        output_scale, inv_p, threshold, exp_p, lr, weight_decay,
        L: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, IN: tl.constexpr, PREPROCESS: tl.constexpr,
        STATE_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_STEP: tl.constexpr,
        LR_TENSOR: tl.constexpr, MAXIMIZE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * 10
        numel = tl.load(row + 7)
        code = tl.load(row + 8)
        offs = (pid - tl.load(row + 9)) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N*H can pass 2**31
        mask = offs < numel

        grad = _load_f32(tl.load(row + 2), offs, mask, code)
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
        h_in = tl.load(row + 3).to(tl.pointer_type(STATE_DTYPE))
        h_out = tl.load(row + 4).to(tl.pointer_type(STATE_DTYPE))
        c_in = tl.load(row + 5).to(tl.pointer_type(STATE_DTYPE))
        c_out = tl.load(row + 6).to(tl.pointer_type(STATE_DTYPE))

        x = tl.zeros([BLOCK_N, HP], dtype=tl.float32)
        for layer in tl.static_range(L):
            w_ih, w_hh, b_ih, b_hh = cells[4 * layer], cells[4 * layer + 1], cells[4 * layer + 2], cells[4 * layer + 3]
            at = layer * layer_stride + state_offs
            h = tl.load(h_in + at, mask=state_mask, other=0.0).to(tl.float32)
            c = tl.load(c_in + at, mask=state_mask, other=0.0).to(tl.float32)
            i, f, g, o = _gates(x, x0, x1, h, w_ih, w_hh, b_ih, b_hh, layer == 0, IN, H, HP, DOT_PRECISION)
            c = f * c + i * g
            x = o * _tanh(c)
            tl.store(h_out + at, _to_state(x, STATE_DTYPE), mask=store_mask)
            tl.store(c_out + at, _to_state(c, STATE_DTYPE), mask=store_mask)

        w_out = tl.load(head_w_ptr + k, mask=k < H, other=0.0)
        delta = output_scale * (tl.sum(x * w_out[None, :], axis=1) + tl.load(head_b_ptr))
        decay = 1.0
        if GROUP_STEP:
            if LR_TENSOR:  # read when the kernel runs: a scheduler's in-place change needs no new launch setup
                lr = tl.load(lr_ptr)
            # in float64, where lr·wd is exact: the same bits fused or not, as every backend computes it
            decay = (1.0 - tl.cast(lr, tl.float64) * tl.cast(weight_decay, tl.float64)).to(tl.float32)
            delta = tl.where(keep, lr * delta, -0.0)  # θ·decay + (-0.0) is θ·decay exactly
        _store_theta_plus(tl.load(row + 0), tl.load(row + 1), offs, write, code, decay, delta)


_TABLES = LaunchTables()


# -------------------------------------------------------------------------------------------- launcher

def _check_weights(weights: Sequence[Tensor], device: torch.device) -> tuple[int, int, int]:
    """(L, H, input features) of a flat weight list ``[w_ih, w_hh, b_ih, b_hh] * L + [head_w, head_b]``."""
    num_layers, rest = divmod(len(weights) - 2, 4)
    hidden = weights[1].shape[1] if len(weights) > 1 else 0
    problem = "needs [w_ih, w_hh, b_ih, b_hh] * L + [head_w, head_b]" if rest else size_problem(num_layers, hidden, MAX_LAYERS, MAX_HIDDEN)
    if problem:
        raise ValueError(f"the triton kernel {problem}")
    for w in weights:
        if w.dtype != torch.float32 or w.device != device or not w.is_contiguous():
            raise ValueError(f"weights must be contiguous float32 on {device}, got {w.dtype} on {w.device}")
    return num_layers, hidden, weights[0].shape[1]


def launch_forward(
    rows: list[tuple[Tensor, ...]],
    weights: Sequence[Tensor],
    preprocess_p: Optional[float],
    output_scale: float,
    block_n: Optional[int] = None,
    dot_precision: str = DOT_PRECISION,
    num_warps: int = NUM_WARPS,
    skipped: Optional[Tensor] = None,
    update: Update = Update(),
) -> None:
    """One launch over every row ``(θ_in, θ_out, ∇, h_in, h_out, c_in, c_out)``.

    With ``skipped`` (an int64 on the device; every row then in place, outputs the inputs) this is the
    optimizer's step: a coordinate whose ∇ is NaN or ±inf is not written, so it keeps θ and its state, and
    is counted into ``skipped``; one whose ∇ is zero keeps its state and gets no learned update; θ' =
    θ·(1 − lr·wd) + lr·Δ with ``update``'s options (:class:`l2l_fused.backends.Update`). Without it,
    θ' = θ + Δ for every coordinate (meta-training's step) and ``update`` must be the default.

    θ and ∇ are contiguous, of one dtype per row (float32, bfloat16, float16 or float64); the state is
    contiguous ``[L, numel, H]``, float32 or bfloat16, one dtype for all rows. Outputs may alias inputs
    (the optimizer updates in place): every element is read by the program that writes it, before it
    writes it.
    """
    if not rows:
        return
    device = rows[0][0].device
    num_layers, hidden, features = _check_weights(weights, device)
    state_dtype = rows[0][3].dtype
    for row in rows:
        theta_in, theta_out, grad, h_in, h_out, c_in, c_out = row
        n = theta_in.numel()
        if theta_in.dtype not in DTYPE_CODES or theta_out.dtype != theta_in.dtype or grad.dtype != theta_in.dtype:
            raise ValueError(f"θ and ∇ must share one of {list(DTYPE_CODES)}, got {theta_in.dtype}, {grad.dtype}")
        if theta_out.numel() != n or grad.numel() != n:
            raise ValueError(f"θ in/out and ∇ must have {n} elements")
        for s in (h_in, h_out, c_in, c_out):
            if tuple(s.shape) != (num_layers, n, hidden) or s.dtype != state_dtype:
                raise ValueError(f"state must be {state_dtype} [{num_layers}, {n}, {hidden}], got {s.dtype} {list(s.shape)}")
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
    padded = max(16, triton.next_power_of_2(hidden))
    block_n = block_n or forward_block(padded)
    table, block_tensor, num_blocks = _TABLES.get(rows, block_n, device)
    p = 1.0 if preprocess_p is None else float(preprocess_p)
    _l2l_fwd_kernel[(num_blocks,)](
        table, block_tensor, tuple(weights[:-2]), weights[-2], weights[-1],
        table if skipped is None else skipped,  # any pointer where nothing is counted
        update.lr if lr_tensor else table,  # any pointer where lr is a number
        float(output_scale), 1.0 / p, math.exp(-p), math.exp(p), 1.0 if lr_tensor else float(update.lr),
        float(update.weight_decay),
        L=num_layers, H=hidden, HP=padded, IN=features,
        PREPROCESS=preprocess_p is not None,
        STATE_DTYPE=tl.float32 if state_dtype == torch.float32 else tl.bfloat16,
        BLOCK_N=block_n, DOT_PRECISION=dot_precision, GROUP_STEP=skipped is not None, LR_TENSOR=lr_tensor,
        MAXIMIZE=update.maximize, num_warps=num_warps,
    )


def forward_block(padded_hidden: int) -> int:
    """Coordinates per program. At H padded to 64 the default launch (wgmma, 1.6 KB of spills) computed
    wrong rows of the last layer, in runs of 8, on an H100 under compute-sanitizer memcheck (0 memory
    errors; correct without it, and with BLOCK_N=32, which takes mma.sync): that size gets 32."""
    return BLOCK_N if padded_hidden < 64 else 32


def flat_weights(net) -> list[Tensor]:
    """φ in the kernels' order, ``[w_ih, w_hh, b_ih, b_hh] * L + [head_w, head_b]``, contiguous and still
    differentiable (meta-training's autograd Function takes them as they are)."""
    return [w.contiguous() for cell in net.cell_weights() for w in cell] + [net.head.weight, net.head.bias]


def net_weights(net, device: torch.device) -> list[Tensor]:
    """:func:`flat_weights` as the optimizer's step reads them: detached, float32 on ``device``.

    Free (no copy, no launch) when the net already lives there in float32.
    """
    return [w.detach().to(device=device, dtype=torch.float32).contiguous() for w in flat_weights(net)]


# ------------------------------------------------------------------------------------------- custom op

@torch.library.custom_op("l2l_fused::triton_group_step", mutates_args=("params", "h", "c", "skipped"))
def _group_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    h: list[Tensor],
    c: list[Tensor],
    skipped: Tensor,
    weights: list[Tensor],
    preprocess_p: Optional[float],
    output_scale: float,
    lr_tensor: Optional[Tensor] = None,
    lr: float = 1.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """In-place fused step of a param group; opaque to torch.compile, which sees only what it mutates.
    ``lr_tensor`` (a float32 on the device), when given, is the lr and ``lr`` is not read."""
    rows, write_back = [], []
    for p, g, hs, cs in zip(params, grads, h, c):
        # Non-contiguous tensors (rare for parameters) are stepped through a contiguous copy, written back
        # after the launch: the state's coordinate order stays the logical one, as in the reference.
        work = p if p.is_contiguous() else p.contiguous()
        if work is not p:
            write_back.append((p, work))
        rows.append((work, work, g.contiguous(), hs, hs, cs, cs))
    update = Update(lr if lr_tensor is None else lr_tensor, weight_decay, maximize)
    launch_forward(rows, weights, preprocess_p, output_scale, skipped=skipped, update=update)
    for p, work in write_back:
        p.copy_(work)


@_group_step_op.register_fake
def _(params, grads, h, c, skipped, weights, preprocess_p, output_scale, lr_tensor=None, lr=1.0, weight_decay=0.0,
      maximize=False) -> None:
    return None
