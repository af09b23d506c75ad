"""The fused backward of the step (SPEC §2) in Triton.

Reads top to bottom: backward kernel → launcher → the ``Kernels`` record that :mod:`l2l_fused.fused`'s
autograd Function runs. That Function saves only what the step read (∇ and the incoming state), never a
gate: this kernel recomputes the gates of each layer from those inputs, so an unrolled step costs 324 B
per coordinate in float32 (164 B with bfloat16 saving) where autograd through ``nn.LSTMCell`` keeps every
gate of every layer, kilobytes.

Weight gradients are sums over all coordinates. They are reduced deterministically: a fixed number of
programs (``MAX_PROGRAMS``, whatever the GPU) each walk their own blocks in a fixed order and add into
their own row of a ``[programs, weights]`` buffer, with plain loads and stores (a row has one owner, and
at ~5k floats it stays in L2); one ``sum`` over the rows finishes. Atomic adds into a single row instead
would give every block ~5k atomics on the same ~5k addresses (800M serialized read-modify-writes at 10M
coordinates) and an order, hence a rounding, that changes from run to run.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .fused import Kernels
from .triton_math import triton
from .triton_step import BLOCK_N, DOT_PRECISION, NUM_WARPS, _check_weights, flat_weights, launch_forward

if triton is not None:
    import triton.language as tl

    from .triton_math import _features, _gates, _tanh

MAX_PROGRAMS = 1024
# No software pipelining of the loop over blocks: it would keep num_stages copies of every tile the loop
# loads in shared memory (527 KB at H = 20, over the 227 KB a block may have), for loads whose latency
# the recomputation already covers.
NUM_STAGES = 1


def weight_grad_layout(num_layers: int, hidden: int, features: int) -> list[tuple[int, int]]:
    """(offset, size) in a row of the partial-sum buffer of dW_ih, dW_hh and db for each layer (db_ih and
    db_hh are the same sum), then dW_out and db_out."""
    layout, offset = [], 0
    for layer in range(num_layers):
        n_in = features if layer == 0 else hidden
        for size in (4 * hidden * n_in, 4 * hidden * hidden, 4 * hidden):
            layout.append((offset, size))
            offset += size
    layout += [(offset, hidden), (offset + hidden, 1)]
    return layout


if triton is not None:

    @triton.jit
    def _acc_tile(ptr, tile, row0, N_COLS: tl.constexpr, H: tl.constexpr, HP: tl.constexpr):
        """row[row0 + j, k] += tile[j, k] for j < H, k < N_COLS, in a row-major [., N_COLS] matrix."""
        j = tl.arange(0, HP)[:, None]
        k = tl.arange(0, HP)[None, :]
        mask = (j < H) & (k < N_COLS)
        at = ptr + (row0 + j) * N_COLS + k
        tl.store(at, tl.load(at, mask=mask, other=0.0) + tile, mask=mask)

    @triton.jit
    def _acc_vec(ptr, vec, H: tl.constexpr, HP: tl.constexpr, STRIDE: tl.constexpr):
        j = tl.arange(0, HP)
        at = ptr + j * STRIDE
        tl.store(at, tl.load(at, mask=j < H, other=0.0) + vec, mask=j < H)

    @triton.jit
    def _w_rows(w_ptr, gate: tl.constexpr, N_COLS: tl.constexpr, H: tl.constexpr, HP: tl.constexpr):
        """W[gate*H + j, k] as a [HP, HP] tile (j rows, k columns), zero outside j < H, k < N_COLS."""
        j = tl.arange(0, HP)[:, None]
        k = tl.arange(0, HP)[None, :]
        return tl.load(w_ptr + (gate * H + j) * N_COLS + k, mask=(j < H) & (k < N_COLS), other=0.0)

    @triton.jit
    def _layer_input(x0, x1, h_ptr, c_ptr, cells, state_offs, state_mask, layer_stride, UPTO: tl.constexpr,
                     IN: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
        """h' of layer UPTO - 1 (the input of layer UPTO), recomputed from the saved state."""
        x = tl.zeros([BLOCK_N, HP], dtype=tl.float32)
        for layer in tl.static_range(UPTO):
            at = layer * layer_stride + state_offs
            h = tl.load(h_ptr + at, mask=state_mask, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + at, mask=state_mask, other=0.0).to(tl.float32)
            i, f, g, o = _gates(x, x0, x1, h, cells[4 * layer], cells[4 * layer + 1], cells[4 * layer + 2],
                                cells[4 * layer + 3], layer == 0, IN, H, HP, DOT_PRECISION)
            x = o * _tanh(f * c + i * g)
        return x

    @triton.jit
    def _acc_gate(base, gate: tl.constexpr, dz, x, x0, x1, h, FIRST: tl.constexpr, IN: tl.constexpr,
                  H: tl.constexpr, HP: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One gate's share of a block's weight gradients, added into this program's row: the layer's
        part of the row holds dW_ih [4H, N_IN], then dW_hh [4H, H], then db [4H]."""
        N_IN: tl.constexpr = IN if FIRST else H
        W_HH: tl.constexpr = 4 * H * N_IN
        B: tl.constexpr = W_HH + 4 * H * H
        if FIRST:  # one or two input features: sums, no dot
            _acc_vec(base + gate * H * N_IN, tl.sum(dz * x0[:, None], axis=0), H, HP, N_IN)
            if N_IN == 2:
                _acc_vec(base + gate * H * N_IN + 1, tl.sum(dz * x1[:, None], axis=0), H, HP, N_IN)
        else:
            _acc_tile(base, tl.dot(tl.trans(dz), x, input_precision=DOT_PRECISION), gate * H, N_IN, H, HP)
        _acc_tile(base + W_HH, tl.dot(tl.trans(dz), h, input_precision=DOT_PRECISION), gate * H, H, H, HP)
        _acc_vec(base + B + gate * H, tl.sum(dz, axis=0), H, HP, 1)

    @triton.jit
    def _l2l_bwd_kernel(
        grad_ptr, h_ptr, c_ptr, dtheta_ptr, dh_next_ptr, dc_next_ptr, dh_ptr, dc_ptr, partial_ptr,
        cells, head_w_ptr, head_b_ptr, n, num_blocks, output_scale, inv_p, threshold, exp_p,
        L: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, IN: tl.constexpr, PREPROCESS: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW: tl.constexpr, LAYER0: tl.constexpr,
        LAYER: tl.constexpr,
    ):
        pid = tl.program_id(0)
        part = partial_ptr + pid * ROW  # this program's row of partial sums (< 1024 * ~5k: int32)
        k = tl.arange(0, HP)
        w_out = tl.load(head_w_ptr + k, mask=k < H, other=0.0)
        head = part + LAYER0 + (L - 1) * LAYER  # dW_out, then db_out
        layer_stride = n * H
        for block in range(pid, num_blocks, tl.num_programs(0)):
            offs = (block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: N*H can pass 2**31
            mask = offs < n
            x0, x1 = _features(tl.load(grad_ptr + offs, mask=mask, other=0.0), inv_p, threshold, exp_p, PREPROCESS)
            state_offs = offs[:, None] * H + k[None, :]
            state_mask = mask[:, None] & (k[None, :] < H)

            # head: Δ = s (w_out · h'_L + b_out); rows past n load zero adjoints and contribute nothing
            du = output_scale * tl.load(dtheta_ptr + offs, mask=mask, other=0.0)
            top = _layer_input(x0, x1, h_ptr, c_ptr, cells, state_offs, state_mask, layer_stride, L, IN, H, HP,
                               BLOCK_N, DOT_PRECISION)
            _acc_vec(head, tl.sum(du[:, None] * top, axis=0), H, HP, 1)
            tl.store(head + H, tl.load(head + H) + tl.sum(du, axis=0))
            dh = tl.load(dh_next_ptr + (L - 1) * layer_stride + state_offs, mask=state_mask, other=0.0) \
                + du[:, None] * w_out[None, :]

            for layer in tl.static_range(L - 1, -1, -1):
                w_ih, w_hh = cells[4 * layer], cells[4 * layer + 1]
                base = part + (0 if layer == 0 else LAYER0 + (layer - 1) * LAYER)
                at = layer * layer_stride + state_offs
                x = _layer_input(x0, x1, h_ptr, c_ptr, cells, state_offs, state_mask, layer_stride, layer, IN, H,
                                 HP, BLOCK_N, DOT_PRECISION)
                h = tl.load(h_ptr + at, mask=state_mask, other=0.0).to(tl.float32)
                c = tl.load(c_ptr + at, mask=state_mask, other=0.0).to(tl.float32)
                i, f, g, o = _gates(x, x0, x1, h, w_ih, w_hh, cells[4 * layer + 2], cells[4 * layer + 3],
                                    layer == 0, IN, H, HP, DOT_PRECISION)
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
                dh_prev = tl.dot(dz_i, _w_rows(w_hh, 0, H, H, HP), input_precision=DOT_PRECISION)
                dh_prev = tl.dot(dz_f, _w_rows(w_hh, 1, H, H, HP), dh_prev, input_precision=DOT_PRECISION)
                dh_prev = tl.dot(dz_g, _w_rows(w_hh, 2, H, H, HP), dh_prev, input_precision=DOT_PRECISION)
                dh_prev = tl.dot(dz_o, _w_rows(w_hh, 3, H, H, HP), dh_prev, input_precision=DOT_PRECISION)
                tl.store(dh_ptr + at, dh_prev, mask=state_mask)
                if layer > 0:
                    below = (layer - 1) * layer_stride + state_offs
                    dh = tl.load(dh_next_ptr + below, mask=state_mask, other=0.0)
                    dh = tl.dot(dz_i, _w_rows(w_ih, 0, H, H, HP), dh, input_precision=DOT_PRECISION)
                    dh = tl.dot(dz_f, _w_rows(w_ih, 1, H, H, HP), dh, input_precision=DOT_PRECISION)
                    dh = tl.dot(dz_g, _w_rows(w_ih, 2, H, H, HP), dh, input_precision=DOT_PRECISION)
                    dh = tl.dot(dz_o, _w_rows(w_ih, 3, H, H, HP), dh, input_precision=DOT_PRECISION)


# -------------------------------------------------------------------------------------------- launcher

def launch_backward(
    grad: Tensor, h: Tensor, c: Tensor, dtheta: Tensor, dh_next: Tensor, dc_next: Tensor,
    weights: list[Tensor], preprocess_p: Optional[float], output_scale: float, block_n: int = BLOCK_N,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Adjoints of one step: ``(dh, dc, weight grads)`` from the saved ∇, h, c and the incoming adjoints.

    ``grad`` and ``dtheta`` are flat [N]; ``h``, ``c`` (float32 or bfloat16), ``dh_next``, ``dc_next``
    are [L, N, H]. Weight grads come in the order of ``weights``.
    """
    device = grad.device
    num_layers, hidden, features = _check_weights(weights, device)
    n = grad.numel()
    shape = (num_layers, n, hidden)
    for name, t in (("h", h), ("c", c), ("dh_next", dh_next), ("dc_next", dc_next)):
        if tuple(t.shape) != shape or not t.is_contiguous() or t.device != device:
            raise ValueError(f"{name} must be contiguous {list(shape)} on {device}, got {list(t.shape)}")
    layout = weight_grad_layout(num_layers, hidden, features)
    row = layout[-1][0] + 1
    num_blocks = triton.cdiv(n, block_n)
    programs = max(1, min(num_blocks, MAX_PROGRAMS))
    partial = torch.zeros(programs, row, device=device, dtype=torch.float32)
    dh = torch.empty(shape, device=device, dtype=torch.float32)
    dc = torch.empty(shape, device=device, dtype=torch.float32)
    if n:
        p = 1.0 if preprocess_p is None else float(preprocess_p)
        _l2l_bwd_kernel[(programs,)](
            grad, h, c, dtheta, dh_next, dc_next, dh, dc, partial,
            tuple(weights[:-2]), weights[-2], weights[-1], n, num_blocks,
            float(output_scale), 1.0 / p, math.exp(-p), math.exp(p),
            L=num_layers, H=hidden, HP=max(16, triton.next_power_of_2(hidden)), IN=features,
            PREPROCESS=preprocess_p is not None, BLOCK_N=block_n, DOT_PRECISION=DOT_PRECISION,
            ROW=row, LAYER0=sum(size for _, size in layout[:3]),
            LAYER=sum(size for _, size in layout[3:6]) if num_layers > 1 else 0, num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
        )
    sums = partial.sum(0)  # the second, deterministic, stage of the reduction
    pieces = [sums[offset:offset + size] for offset, size in layout]
    grads = []
    for layer in range(num_layers):
        d_ih, d_hh, d_b = pieces[3 * layer:3 * layer + 3]
        grads += [d_ih.view_as(weights[4 * layer]), d_hh.view_as(weights[4 * layer + 1]), d_b, d_b.clone()]
    grads += [pieces[-2].view_as(weights[-2]), pieces[-1].view_as(weights[-1])]
    return dh, dc, grads


# ----------------------------------------------------------------------------------- kernels record

def _forward(theta, grad, h, c, weights, preprocess_p, output_scale):
    theta_out, h_out, c_out = torch.empty_like(theta), torch.empty_like(h), torch.empty_like(c)
    launch_forward([(theta, theta_out, grad, h, h_out, c, c_out)], weights, preprocess_p, output_scale)
    return theta_out, h_out, c_out


KERNELS = Kernels(name="triton", weights=flat_weights, forward=_forward, backward=launch_backward)
