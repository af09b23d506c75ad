"""The autograd Function shared by the fused backends ("triton", "native").

It saves only what the step read (∇ and the incoming state, optionally in bfloat16), never a gate: each
backend's backward kernel recomputes the gates from those inputs. No gradient flows into ∇ (the paper's
assumption), and dθ = dθ' because θ' = θ + Δ with ∂Δ/∂θ = 0. A backend brings its ``Kernels``: the
weight tensors its kernels take (built from φ by differentiable operations, so autograd carries their
gradients back to the net's parameters), an out-of-place forward and a backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Kernels:
    name: str
    weights: Callable  # net -> list[Tensor]
    forward: Callable  # (theta, grad, h, c, weights, preprocess_p, output_scale) -> (theta', h', c')
    backward: Callable  # (grad, h, c, dtheta, dh_next, dc_next, weights, p, s) -> (dh, dc, weight grads)


def float32_problem(net) -> Optional[str]:
    """The fused kernels compute in float32 and read φ as float32: why a net of another dtype cannot run."""
    if net.head.weight.dtype != torch.float32:
        return f"runs float32 nets, not {net.head.weight.dtype}"
    return None


def size_problem(num_layers: int, hidden: int, max_layers: int, max_hidden: int) -> Optional[str]:
    """Why a backend whose kernels take at most ``max_layers`` × ``max_hidden`` cannot run this size, or None."""
    if not 1 <= num_layers <= max_layers:
        return f"runs 1 to {max_layers} layers, not {num_layers}"
    if not 1 <= hidden <= max_hidden:
        return f"runs hidden_size up to {max_hidden}, not {hidden}"
    return None


class FusedStep(torch.autograd.Function):
    """``(θ', h', c') = step(θ, ∇, h, c; φ)`` with a backend's fused forward and backward kernels."""

    @staticmethod
    def forward(ctx, kernels, theta, grad, h, c, preprocess_p, output_scale, saved_state_dtype, *weights):
        outputs = kernels.forward(theta, grad, h, c, weights, preprocess_p, output_scale)
        if saved_state_dtype is not None and saved_state_dtype != h.dtype:
            h, c = h.to(saved_state_dtype), c.to(saved_state_dtype)
        ctx.save_for_backward(grad, h, c, *weights)
        ctx.kernels, ctx.options = kernels, (preprocess_p, output_scale)
        return outputs

    @staticmethod
    def backward(ctx, dtheta, dh_next, dc_next):
        grad, h, c, *weights = ctx.saved_tensors
        dh, dc, dweights = ctx.kernels.backward(grad, h, c, dtheta.contiguous(), dh_next.contiguous(),
                                                dc_next.contiguous(), weights, *ctx.options)
        dtheta = dtheta if ctx.needs_input_grad[1] else None
        return (None, dtheta, None, dh, dc, None, None, None, *dweights)


def fused_step(kernels: Kernels, net, theta: Tensor, grad: Tensor, h: Tensor, c: Tensor,
               saved_state_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One step of a flat θ, out of place; differentiable with respect to θ, h, c and φ when autograd
    needs it (saving only ∇ and the incoming state, in ``saved_state_dtype`` if given)."""
    theta, grad, h, c = theta.contiguous(), grad.detach().contiguous(), h.contiguous(), c.contiguous()
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (theta, h, c, *net.parameters()))
    if differentiable:
        return FusedStep.apply(kernels, theta, grad, h, c, net.preprocess_p, net.output_scale, saved_state_dtype,
                               *kernels.weights(net))
    with torch.no_grad():
        return kernels.forward(theta, grad, h, c, kernels.weights(net), net.preprocess_p, net.output_scale)
