"""The ``"reference"`` backend: :func:`l2l_step_ref` driven through autograd."""

from __future__ import annotations

import torch

from . import backends
from .reference import l2l_step_ref, l2l_update_ref


def step(net, theta, grad, h, c, saved_state_dtype=None):
    if saved_state_dtype is not None:
        raise ValueError("saved_state_dtype needs a fused backend: autograd through the reference keeps every gate")
    return l2l_step_ref(
        theta, grad, h, c, net.cell_weights(), net.head.weight, net.head.bias,
        preprocess_p=net.preprocess_p, output_scale=net.output_scale,
    )


def update_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Δ is computed in float32; ``θ + Δ`` is added in float32, or in θ's dtype where that is wider."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _factors(update: backends.Update, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lr, 1 − lr · wd)`` as the kernels compute them (:class:`~l2l_fused.backends.Update`): float32, 0-dim,
    on ``device``, made there (fills, not copies from the host: nothing waits, and a CUDA graph may capture
    them)."""
    if isinstance(update.lr, torch.Tensor):
        lr = update.lr.to(device, torch.float32)
    else:
        lr = torch.full((), update.lr, dtype=torch.float32, device=device)
    weight_decay = torch.full((), update.weight_decay, dtype=torch.float32, device=device)
    return lr, (1.0 - lr.double() * weight_decay.double()).float()


def group_step(net, params, grads, hs, cs, skipped, update: backends.Update = backends.Update()):
    """Concatenate the group into one flat float32 problem, step it once, write the pieces back.

    ``θ' = θ · (1 − lr · wd) + lr · Δ`` as :class:`~l2l_fused.backends.Update` defines it. A coordinate whose
    gradient is NaN or ±inf keeps θ and its state, and is counted into ``skipped`` (an int64 on the device;
    no host synchronisation). One whose gradient is exactly zero keeps its state and gets no learned update
    (a parameter that gets no gradient signal stays where it is; weight decay still applies). This costs a
    copy of everything; it is the specification of what the fused kernels do in one launch.
    """
    device = params[0].device
    cells = [tuple(w.detach().to(device, torch.float32) for w in ws) for ws in net.cell_weights()]
    head_w = net.head.weight.detach().to(device, torch.float32)
    head_b = net.head.bias.detach().to(device, torch.float32)
    grad = torch.cat([g.reshape(-1).float() for g in grads])
    bad = ~torch.isfinite(grad)
    skipped.add_(bad.sum())
    hold = bad | (grad == 0)  # coordinates whose state is kept
    if update.maximize:
        grad = -grad
    h_old = torch.cat([s.float() for s in hs], dim=1)
    c_old = torch.cat([s.float() for s in cs], dim=1)
    delta, h, c = l2l_update_ref(
        grad.masked_fill(bad, 0.0), h_old, c_old, cells, head_w, head_b, preprocess_p=net.preprocess_p,
        output_scale=net.output_scale,
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


backends.register(
    backends.Backend(name="reference", priority=lambda device: 0, is_available=lambda device: True, step=step, group_step=group_step)
)
