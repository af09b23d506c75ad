"""The specification: one step of the learned optimizer in plain PyTorch (SPEC §1).

Every kernel is tested against :func:`l2l_step_ref`. It is differentiable by autograd in float32 and
float64 with respect to theta, the state and the weights; the optimizee's gradient is a constant (the
paper's "dotted line"), so it is detached on entry.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

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
    z = x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh
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
