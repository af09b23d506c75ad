"""The ``"triton"`` backend: the fused kernels behind the registry's two entry points."""

from __future__ import annotations

import torch

from . import backends
from .fused import fused_step
from .triton_backward import KERNELS
from .triton_math import INTERPRETED, triton
from .triton_step import _group_step_op, net_weights, supports


def step(net, theta, grad, h, c, saved_state_dtype=None):
    return fused_step(KERNELS, net, theta, grad, h, c, saved_state_dtype)


def group_step(net, params, grads, hs, cs, skipped):
    _group_step_op(params, grads, hs, cs, skipped, net_weights(net, params[0].device), net.preprocess_p, net.output_scale)


def _priority(device: torch.device) -> int:
    """Fastest on CUDA; on the CPU only by name (the interpreter is a test vehicle, not a speed-up)."""
    return 10 if device.type == "cuda" else -1


def _available(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED))


backends.register(
    backends.Backend(
        name="triton", priority=_priority, is_available=_available, step=step, group_step=group_step,
        supports=supports,
    )
)
