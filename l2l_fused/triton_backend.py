"""The ``"triton"`` backend: the fused kernels behind the registry's two entry points.

Registering it imports neither triton nor the kernels: ``import l2l_fused`` stays cheap on machines that
never run them. They are imported when a group that will use them is added to an optimizer
(``backends.preload``) or at the first step.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from . import backends
from .fused import float32_problem, fused_step, size_problem

# The largest net the kernels are compiled for (their register tiles are [BLOCK_N, 64] at most).
MAX_HIDDEN = 64
MAX_LAYERS = 3
# Whether triton is installed, asked without importing it (over half a second).
INSTALLED = importlib.util.find_spec("triton") is not None
# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before importing l2l_fused to run the
# kernels on the CPU (that is how CI tests them).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    from . import triton_backward, triton_step

    return triton_step, triton_backward


def step(net, theta, grad, h, c, saved_state_dtype=None):
    return fused_step(_kernels()[1].KERNELS, net, theta, grad, h, c, saved_state_dtype)


def group_step(net, params, grads, hs, cs, skipped, update: backends.Update = backends.Update()):
    triton_step = _kernels()[0]
    triton_step._group_step_op(params, grads, hs, cs, skipped, triton_step.net_weights(net, params[0].device),
                               net.preprocess_p, net.output_scale, *update.lr_arguments(), update.weight_decay,
                               update.maximize)


def supports(net) -> Optional[str]:
    """Why the Triton kernels cannot run ``net``, or None."""
    return float32_problem(net) or size_problem(net.num_layers, net.hidden_size, MAX_LAYERS, MAX_HIDDEN)


def _priority(device: torch.device) -> int:
    """Fastest on CUDA; on the CPU only by name (the interpreter is a test vehicle, not a speed-up)."""
    return 10 if device.type == "cuda" else -1


def _available(device: torch.device) -> bool:
    return INSTALLED and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED))


backends.register(
    backends.Backend(
        name="triton", priority=_priority, is_available=_available, step=step, group_step=group_step,
        supports=supports, load=_kernels,
    )
)
