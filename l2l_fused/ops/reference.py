"""The specification: one step of the learned optimizer in plain PyTorch (docs/spec.md §1), and the
``"reference"`` backend.

Every kernel is tested against :func:`l2l_step_ref`. It is differentiable by autograd in float32 and
float64 with respect to theta, the state and the weights; the optimizee's gradient is a constant (the
paper's "dotted line"), so it is detached on entry. :func:`forward`, :func:`backward` and
:func:`group_step` are the same math with the signatures of the fused backends' entry points
(:mod:`l2l_fused.ops.interface`): φ packed, as the kernels read it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .layout import NetShape, unpack
from .update import Update

# (w_ih [4H, I], w_hh [4H, H], b_ih [4H], b_hh [4H]) for one layer, gate order (i, f, g, o) as nn.LSTMCell.
CellWeights = tuple[Tensor, Tensor, Tensor, Tensor]


def input_size(preprocess_p: Optional[float]) -> int:
    """Features per coordinate fed to the first LSTM layer."""
    return 1 if preprocess_p is None else 2


def preprocess(grad: Tensor, preprocess_p: Optional[float]) -> Tensor:
    """Gradient features, shape ``grad.shape + (input_size,)`` (paper, Appendix A).

    With p: ``(log|g|/p, sign g)`` where ``|g| >= exp(-p)``, else ``(-1, exp(p) g)``. The two branches
    agree at the threshold, so a kernel that rounds the threshold differently differs only by rounding.
    The threshold is compared in grad's dtype, as a kernel working in that dtype does.
    """
    if preprocess_p is None:
        return grad.unsqueeze(-1)
    p = float(preprocess_p)
    mag = grad.abs()
    large = mag >= math.exp(-p)
    # log of 1 in the unselected lanes keeps -inf (log 0) out of the where.
    log_mag = torch.log(torch.where(large, mag, torch.ones_like(mag))) / p
    first = torch.where(large, log_mag, torch.full_like(grad, -1.0))
    second = torch.where(large, torch.sign(grad), grad * math.exp(p))
    return torch.stack([first, second], dim=-1)


def lstm_cell_ref(x: Tensor, h: Tensor, c: Tensor, weights: CellWeights) -> tuple[Tensor, Tensor]:
    """One ``nn.LSTMCell`` step over rows: x [N, I], h and c [N, H]."""
    w_ih, w_hh, b_ih, b_hh = weights
    # The two biases are summed first, as packed φ holds them (ops/layout.py): the same float32 bits
    # whether the weights come from the net or from the packed copy.
    z = x @ w_ih.t() + h @ w_hh.t() + (b_ih + b_hh)
    i, f, g, o = z.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_next = f * c + i * g
    h_next = o * torch.tanh(c_next)
    return h_next, c_next


def l2l_update_ref(
    grad: Tensor,
    h: Tensor,
    c: Tensor,
    cells: Sequence[CellWeights],
    head_weight: Tensor,
    head_bias: Tensor,
    *,
    preprocess_p: Optional[float],
    output_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The proposed update Δ for N coordinates and their next state.

    Args:
        grad: flat ``[N]`` gradient of the optimizee (detached here: no gradient flows into it).
        h, c: state ``[L, N, H]`` (the layout of ``torch.nn.LSTM``).
        cells: L tuples ``(w_ih, w_hh, b_ih, b_hh)``.
        head_weight ``[1, H]``, head_bias ``[1]``: the output ``nn.Linear(H, 1)``.
        preprocess_p: p of the log/sign preprocessing, or None for the raw gradient as one feature.
        output_scale: s in ``Δ = s (w_out·h + b_out)``.

    Returns ``(delta [N], h_next, c_next)``. No casting is done: pass tensors of one dtype.
    """
    n = grad.shape[0]
    if grad.dim() != 1:
        raise ValueError(f"grad must be flat, got shape {tuple(grad.shape)}")
    if h.dim() != 3 or h.shape[:2] != (len(cells), n) or c.shape != h.shape:
        raise ValueError(f"h and c must be [L={len(cells)}, N={n}, H], got {tuple(h.shape)} and {tuple(c.shape)}")
    x = preprocess(grad.detach(), preprocess_p)
    hs, cs = [], []
    for layer, weights in enumerate(cells):
        h_next, c_next = lstm_cell_ref(x, h[layer], c[layer], weights)
        hs.append(h_next)
        cs.append(c_next)
        x = h_next
    delta = output_scale * (x @ head_weight.t() + head_bias).squeeze(-1)
    return delta, torch.stack(hs), torch.stack(cs)


def l2l_step_ref(
    theta: Tensor,
    grad: Tensor,
    h: Tensor,
    c: Tensor,
    cells: Sequence[CellWeights],
    head_weight: Tensor,
    head_bias: Tensor,
    *,
    preprocess_p: Optional[float],
    output_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step, ``theta' = theta + Δ``: returns ``(theta_next, h_next, c_next)``.

    ``theta`` is flat ``[N]`` like ``grad``; the other arguments are those of :func:`l2l_update_ref`.
    """
    if theta.shape != grad.shape:
        raise ValueError(f"theta and grad must have one shape, got {tuple(theta.shape)} and {tuple(grad.shape)}")
    delta, h_next, c_next = l2l_update_ref(
        grad, h, c, cells, head_weight, head_bias, preprocess_p=preprocess_p, output_scale=output_scale
    )
    return theta + delta, h_next, c_next


# ------------------------------------------------------------- the entry points of every backend, specified

# ``precision`` (:mod:`l2l_fused.ops.precision`) is in the signatures for the fused backends: the
# specification has one arithmetic, its inputs' dtype's, in both.

def forward(theta: Tensor, grad: Tensor, h: Tensor, c: Tensor, weights: Tensor, shape: NetShape,
            precision: Optional[str] = None):
    """:func:`l2l_step_ref` of packed φ; differentiable by autograd (the ``"reference"`` backend's step)."""
    cells, head_weight, head_bias = unpack(weights, shape)
    return l2l_step_ref(theta, grad, h, c, cells, head_weight, head_bias, preprocess_p=shape.preprocess_p,
                        output_scale=shape.output_scale)


def backward(grad: Tensor, h: Tensor, c: Tensor, dtheta: Tensor, dh_next: Tensor, dc_next: Tensor, weights: Tensor,
             shape: NetShape, precision: Optional[str] = None):
    """``(dh, dc, dweights)`` of :func:`forward`, by autograd: what the fused backward kernels compute."""
    with torch.enable_grad():
        weights = weights.detach().requires_grad_()
        h, c = (t.detach().to(weights.dtype).requires_grad_() for t in (h, c))  # a saved bfloat16 state, say
        theta = torch.zeros_like(grad)  # Δ does not depend on θ: its value is irrelevant
        outputs = forward(theta, grad, h, c, weights, shape)
        return torch.autograd.grad(outputs, (h, c, weights), (dtheta, dh_next, dc_next))


def update_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Δ is computed in float32; ``θ + Δ`` is added in float32, or in θ's dtype where that is wider."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _factors(update: Update, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lr, 1 − lr · wd)`` as the kernels compute them (:class:`~l2l_fused.ops.update.Update`): float32, 0-dim,
    on ``device``, made there (fills, not copies from the host: nothing waits, and a CUDA graph may capture
    them)."""
    if isinstance(update.lr, torch.Tensor):
        lr = update.lr.to(device, torch.float32)
    else:
        lr = torch.full((), update.lr, dtype=torch.float32, device=device)
    weight_decay = torch.full((), update.weight_decay, dtype=torch.float32, device=device)
    return lr, (1.0 - lr.double() * weight_decay.double()).float()


def group_step(params, grads, hs, cs, skipped: Tensor, weights: Tensor, shape: NetShape, update: Update = Update(),
               table=None, precision: Optional[str] = None) -> None:
    """Concatenate the group into one flat float32 problem, step it once, write the pieces back (``table``,
    the fused launchers' business, is not used).

    ``θ' = θ · (1 − lr · wd) + lr · Δ`` as :class:`~l2l_fused.ops.update.Update` defines it. A coordinate whose
    gradient is NaN or ±inf keeps θ and its state, and is counted into ``skipped`` (an int64 on the device;
    no host synchronisation). One whose gradient is exactly zero keeps its state and gets no learned update
    (a parameter that gets no gradient signal stays where it is; weight decay still applies). This costs a
    copy of everything; it is the specification of what the fused kernels do in one launch.
    """
    device = params[0].device
    cells, head_w, head_b = unpack(weights.to(device, torch.float32), shape)
    grad = torch.cat([g.reshape(-1).float() for g in grads])
    bad = ~torch.isfinite(grad)
    skipped.add_(bad.sum())
    hold = bad | (grad == 0)  # coordinates whose state is kept
    if update.maximize:
        grad = -grad
    h_old = torch.cat([s.float() for s in hs], dim=1)
    c_old = torch.cat([s.float() for s in cs], dim=1)
    delta, h, c = l2l_update_ref(
        grad.masked_fill(bad, 0.0), h_old, c_old, cells, head_w, head_b, preprocess_p=shape.preprocess_p,
        output_scale=shape.output_scale,
    )
    lr, decay = _factors(update, device)
    step = (lr * delta).masked_fill(hold, -0.0)  # θ + (-0.0) is θ exactly, signed zeros included
    h = torch.where(hold[None, :, None], h_old, h)
    c = torch.where(hold[None, :, None], c_old, c)
    sizes = [p.numel() for p in params]
    offset = 0
    for p, s in zip(params, step.split(sizes)):
        wide = update_dtype(p.dtype)
        new = p.to(wide) * decay + s.view_as(p).to(wide)
        # a skipped coordinate is not written at all: θ exactly, whatever the decay
        p.copy_(torch.where(bad[offset:offset + p.numel()].view_as(p), p, new.to(p.dtype)))
        offset += p.numel()
    for dst, src in zip(hs, h.split(sizes, dim=1)):
        dst.copy_(src)
    for dst, src in zip(cs, c.split(sizes, dim=1)):
        dst.copy_(src)
