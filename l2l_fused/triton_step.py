"""The ``"triton"`` backend: the whole step (preprocessing, L LSTM layers, head, update) in one kernel.

Reads top to bottom: kernel helpers → forward kernel → launch tables → launcher → custom op → backend.
The reference it must match is :func:`l2l_fused.reference.l2l_update_ref`.

One launch covers every tensor of a param group, whatever their shapes and dtypes: the launcher writes a
table with one row per tensor (addresses of θ in/out, ∇, h in/out, c in/out, its size, dtype code and
first block) and a block→tensor map, as PyTorch's fused Adam and apex's multi_tensor_apply do. A program
takes one block of ``BLOCK_N`` coordinates of one tensor, so it branches on that tensor's dtype once,
uniformly, and nothing is copied or concatenated: θ, ∇ and the state are read and written where they
live. The tables depend only on addresses and sizes, so they are cached; a step whose tensors did not
move is exactly one kernel launch.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import backends

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; this backend then reports itself unavailable
    triton = None

# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before importing l2l_fused to run the
# kernels on the CPU (that is how CI tests them).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Columns of the launch table, one row per tensor.
THETA_IN, THETA_OUT, GRAD, H_IN, H_OUT, C_IN, C_OUT, NUMEL, DTYPE, FIRST_BLOCK = range(10)
TABLE_COLUMNS = 10
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
STATE_DTYPES = (torch.float32, torch.bfloat16)

MAX_HIDDEN = 64
MAX_LAYERS = 3
BLOCK_N = 64  # coordinates per program
NUM_WARPS = 4
# tf32x3 splits each float32 operand into two tf32 halves and keeps three of the four products: the gate
# products run on tensor cores with an error near float32's (plain "tf32" rounds operands to 10 bits,
# ~5e-4 relative, too coarse for a state that is fed back every step).
DOT_PRECISION = "tf32x3"


if triton is not None:

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
    def _store_theta_plus(in_addr, out_addr, offs, mask, code, delta):
        """θ' = θ + Δ, added in float32 (float64 for float64 θ) and rounded once to θ's dtype.

        Nothing is assigned inside the branches: compiled Triton needs one type per variable across them."""
        if code == 0:
            tl.store(out_addr.to(tl.pointer_type(tl.float32)) + offs,
                     tl.load(in_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask) + delta, mask=mask)
        elif code == 1:
            tl.store(out_addr.to(tl.pointer_type(tl.bfloat16)) + offs,
                     _to_bf16(tl.load(in_addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask).to(tl.float32) + delta),
                     mask=mask)
        elif code == 2:
            tl.store(out_addr.to(tl.pointer_type(tl.float16)) + offs,
                     (tl.load(in_addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask).to(tl.float32) + delta).to(tl.float16),
                     mask=mask)
        else:
            tl.store(out_addr.to(tl.pointer_type(tl.float64)) + offs,
                     tl.load(in_addr.to(tl.pointer_type(tl.float64)) + offs, mask=mask) + delta.to(tl.float64), mask=mask)

    @triton.jit
    def _gate_preact(x, x0, x1, h, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, gate: tl.constexpr,
                     FIRST: tl.constexpr, IN: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
        """z of one gate for a block: ``[BLOCK_N, HP]``, zero in the padded columns j >= H."""
        j = tl.arange(0, HP)  # output unit
        k = tl.arange(0, HP)  # input unit
        rows = gate * H + j
        wmask = (k[:, None] < H) & (j[None, :] < H)
        # B[k, j] = W[gate*H + j, k]: the transposed gate block, read straight from nn.LSTMCell's layout.
        w_hh = tl.load(w_hh_ptr + rows[None, :] * H + k[:, None], mask=wmask, other=0.0)
        z = tl.dot(h, w_hh, input_precision=DOT_PRECISION)
        if FIRST:
            # 1 or 2 input features: rank-1 updates (a dot needs an inner size of at least 16)
            z += x0[:, None] * tl.load(w_ih_ptr + rows * IN, mask=j < H, other=0.0)[None, :]
            if IN == 2:
                z += x1[:, None] * tl.load(w_ih_ptr + rows * IN + 1, mask=j < H, other=0.0)[None, :]
        else:
            w_ih = tl.load(w_ih_ptr + rows[None, :] * H + k[:, None], mask=wmask, other=0.0)
            z = tl.dot(x, w_ih, z, input_precision=DOT_PRECISION)
        bias = tl.load(b_ih_ptr + rows, mask=j < H, other=0.0) + tl.load(b_hh_ptr + rows, mask=j < H, other=0.0)
        return z + bias[None, :]

    @triton.jit
    def _l2l_fwd_kernel(
        table_ptr, block_tensor_ptr, cells, head_w_ptr, head_b_ptr,
        output_scale, inv_p, threshold, exp_p,
        L: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, IN: tl.constexpr, PREPROCESS: tl.constexpr,
        STATE_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * 10
        numel = tl.load(row + 7)
        code = tl.load(row + 8)
        offs = (pid - tl.load(row + 9)) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N*H can pass 2**31
        mask = offs < numel

        g = _load_f32(tl.load(row + 2), offs, mask, code)
        if PREPROCESS:
            mag = tl.abs(g)
            large = mag >= threshold
            x0 = tl.where(large, tl.log(tl.where(large, mag, 1.0)) * inv_p, -1.0)
            x1 = tl.where(large, tl.where(g > 0, 1.0, -1.0), g * exp_p)
        else:
            x0 = g
            x1 = g

        k = tl.arange(0, HP)
        state_offs = offs[:, None] * H + k[None, :]
        state_mask = mask[:, None] & (k[None, :] < H)
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
            first = layer == 0
            # Gates one after another, in the order their products are consumed, to keep few tiles live.
            z_i = _gate_preact(x, x0, x1, h, w_ih, w_hh, b_ih, b_hh, 0, first, IN, H, HP, DOT_PRECISION)
            z_g = _gate_preact(x, x0, x1, h, w_ih, w_hh, b_ih, b_hh, 2, first, IN, H, HP, DOT_PRECISION)
            ig = tl.sigmoid(z_i) * _tanh(z_g)
            z_f = _gate_preact(x, x0, x1, h, w_ih, w_hh, b_ih, b_hh, 1, first, IN, H, HP, DOT_PRECISION)
            c = tl.sigmoid(z_f) * c + ig
            z_o = _gate_preact(x, x0, x1, h, w_ih, w_hh, b_ih, b_hh, 3, first, IN, H, HP, DOT_PRECISION)
            x = tl.sigmoid(z_o) * _tanh(c)  # padded columns: 0.5 * tanh(0) = 0
            tl.store(h_out + at, _to_state(x, STATE_DTYPE), mask=state_mask)
            tl.store(c_out + at, _to_state(c, STATE_DTYPE), mask=state_mask)

        w_out = tl.load(head_w_ptr + k, mask=k < H, other=0.0)
        delta = output_scale * (tl.sum(x * w_out[None, :], axis=1) + tl.load(head_b_ptr))
        _store_theta_plus(tl.load(row + 0), tl.load(row + 1), offs, mask, code, delta)


# ---------------------------------------------------------------------------------------------- tables

class _LaunchTables:
    """Small LRU of device tables keyed by every address, size and dtype they encode: a hit is exact."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()

    def get(self, rows: list[tuple[Tensor, ...]], block_n: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
        key = (device, block_n) + tuple((t.data_ptr(), t.numel(), t.dtype) for r in rows for t in r)
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            return hit
        table, blocks, first = [], [], 0
        for index, (theta_in, theta_out, grad, h_in, h_out, c_in, c_out) in enumerate(rows):
            n = theta_in.numel()
            table.append([theta_in.data_ptr(), theta_out.data_ptr(), grad.data_ptr(), h_in.data_ptr(),
                          h_out.data_ptr(), c_in.data_ptr(), c_out.data_ptr(), n, DTYPE_CODES[theta_in.dtype], first])
            count = triton.cdiv(n, block_n)
            blocks.append(count)
            first += count
        block_tensor = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), torch.tensor(blocks))
        hit = (torch.tensor(table, dtype=torch.int64).to(device), block_tensor.to(device), first)
        self.entries[key] = hit
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return hit


_TABLES = _LaunchTables()


# -------------------------------------------------------------------------------------------- launcher

def _size_problem(num_layers: int, hidden: int) -> Optional[str]:
    if not 1 <= num_layers <= MAX_LAYERS:
        return f"runs 1 to {MAX_LAYERS} layers, not {num_layers}"
    if not 1 <= hidden <= MAX_HIDDEN:
        return f"runs hidden_size up to {MAX_HIDDEN}, not {hidden}"
    return None


def _check_weights(weights: Sequence[Tensor], device: torch.device) -> tuple[int, int, int]:
    """(L, H, input features) of a flat weight list ``[w_ih, w_hh, b_ih, b_hh] * L + [head_w, head_b]``."""
    num_layers, rest = divmod(len(weights) - 2, 4)
    hidden = weights[1].shape[1] if len(weights) > 1 else 0
    problem = "needs [w_ih, w_hh, b_ih, b_hh] * L + [head_w, head_b]" if rest else _size_problem(num_layers, hidden)
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
    block_n: int = BLOCK_N,
    dot_precision: str = DOT_PRECISION,
    num_warps: int = NUM_WARPS,
) -> None:
    """One launch over every row ``(θ_in, θ_out, ∇, h_in, h_out, c_in, c_out)``.

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
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state dtype must be one of {list(STATE_DTYPES)}, got {state_dtype}")
    table, block_tensor, num_blocks = _TABLES.get(rows, block_n, device)
    p = 1.0 if preprocess_p is None else float(preprocess_p)
    _l2l_fwd_kernel[(num_blocks,)](
        table, block_tensor, tuple(weights[:-2]), weights[-2], weights[-1],
        float(output_scale), 1.0 / p, math.exp(-p), math.exp(p),
        L=num_layers, H=hidden, HP=max(16, triton.next_power_of_2(hidden)), IN=features,
        PREPROCESS=preprocess_p is not None,
        STATE_DTYPE=tl.float32 if state_dtype == torch.float32 else tl.bfloat16,
        BLOCK_N=block_n, DOT_PRECISION=dot_precision, num_warps=num_warps,
    )


def net_weights(net, device: torch.device) -> list[Tensor]:
    """φ as the kernels read it: ``[w_ih, w_hh, b_ih, b_hh] * L + [head_w, head_b]``, float32 on device.

    Free (no copy, no launch) when the net already lives there in float32.
    """
    flat = [w for cell in net.cell_weights() for w in cell] + [net.head.weight, net.head.bias]
    return [w.detach().to(device=device, dtype=torch.float32).contiguous() for w in flat]


# ------------------------------------------------------------------------------------------- custom op

@torch.library.custom_op("l2l_fused::triton_group_step", mutates_args=("params", "h", "c"))
def _group_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    h: list[Tensor],
    c: list[Tensor],
    weights: list[Tensor],
    preprocess_p: Optional[float],
    output_scale: float,
) -> None:
    """In-place fused step of a param group; opaque to torch.compile, which sees only what it mutates."""
    rows, write_back = [], []
    for p, g, hs, cs in zip(params, grads, h, c):
        # Non-contiguous tensors (rare for parameters) are stepped through a contiguous copy, written back
        # after the launch: the state's coordinate order stays the logical one, as in the reference.
        work = p if p.is_contiguous() else p.contiguous()
        if work is not p:
            write_back.append((p, work))
        rows.append((work, work, g.contiguous(), hs, hs, cs, cs))
    launch_forward(rows, weights, preprocess_p, output_scale)
    for p, work in write_back:
        p.copy_(work)


@_group_step_op.register_fake
def _(params, grads, h, c, weights, preprocess_p, output_scale) -> None:
    return None


# --------------------------------------------------------------------------------------------- backend

def group_step(net, params, grads, hs, cs):
    _group_step_op(params, grads, hs, cs, net_weights(net, params[0].device), net.preprocess_p, net.output_scale)


def step(net, theta, grad, h, c):
    """Out-of-place step of one flat tensor (``LSTMOptimizerNet.forward``); forward only for now."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (theta, h, c, *net.parameters())):
        raise NotImplementedError(
            "backend 'triton' has no backward yet: call it under torch.no_grad(), or use backend='reference' "
            "to differentiate through the step"
        )
    weights = net_weights(net, theta.device)
    theta_in, grad = theta.contiguous(), grad.contiguous()
    h, c = h.contiguous(), c.contiguous()
    theta_out, h_out, c_out = torch.empty_like(theta_in), torch.empty_like(h), torch.empty_like(c)
    launch_forward([(theta_in, theta_out, grad, h, h_out, c, c_out)], weights, net.preprocess_p, net.output_scale)
    return theta_out, h_out, c_out


def _priority(device: torch.device) -> int:
    """Fastest on CUDA; on the CPU only by name (the interpreter is a test vehicle, not a speed-up)."""
    return 10 if device.type == "cuda" else -1


def _available(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED))


backends.register(
    backends.Backend(
        name="triton", priority=_priority, is_available=_available, step=step, group_step=group_step,
        supports=lambda net: _size_problem(net.num_layers, net.hidden_size),
    )
)
