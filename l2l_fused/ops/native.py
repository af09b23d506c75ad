"""The ``"native"`` backend: the C++/CUDA kernels of ``csrc/`` (``l2l_fused._C``, ops ``torch.ops.l2l_fused.native_*``).

The extension is optional: without it the package imports and works, and asking for ``backend="native"``
raises an error that says how to build it. The ops take φ packed (:mod:`l2l_fused.ops.layout`, mirrored by
``csrc/l2l_math.h``) and return its gradient in that layout. Here: the guarded import, the entry points
with the signatures of :mod:`l2l_fused.ops.interface`, and the ops' fake implementations for torch.compile.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .layout import NetShape
from .update import Update

try:
    from .. import _C  # loading it registers the ops

    BUILD_ERROR: Optional[BaseException] = None
except ImportError as error:  # not built, or built against another torch
    BUILD_ERROR = error

BUILD_HINT = (
    "build it with `pip install -e . --no-build-isolation` in the repository (needs CMake, ninja and a C++17 "
    "compiler; nvcc for the CUDA kernel; L2L_BUILD_NATIVE=1 turns a failed build into an error)"
)


def has_cuda_kernel() -> bool:
    return BUILD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("l2l_fused::native_forward", "CUDA")


def available(device: torch.device) -> bool:
    return BUILD_ERROR is None and (device.type == "cpu" or (device.type == "cuda" and has_cuda_kernel()))


def unavailable_reason(device: torch.device) -> str:
    if BUILD_ERROR is not None:
        return f"the extension l2l_fused._C is not built ({BUILD_ERROR}); {BUILD_HINT}"
    return f"l2l_fused._C was built without a kernel for {device.type}; {BUILD_HINT} with nvcc on PATH"


def _net(shape: NetShape) -> tuple:
    return shape.layers, shape.hidden, shape.features, shape.preprocess_p, shape.output_scale


# The native kernels compute in float32 in both precisions (:mod:`l2l_fused.ops.precision`): they take
# ``precision`` for the common signature and need nothing of it.

def forward(theta: Tensor, grad: Tensor, h: Tensor, c: Tensor, weights: Tensor, shape: NetShape,
            precision: Optional[str] = None):
    return torch.ops.l2l_fused.native_forward(theta, grad, h, c, weights, *_net(shape))


def backward(grad: Tensor, h: Tensor, c: Tensor, dtheta: Tensor, dh_next: Tensor, dc_next: Tensor, weights: Tensor,
             shape: NetShape, precision: Optional[str] = None):
    return torch.ops.l2l_fused.native_backward(grad, h, c, dtheta, dh_next, dc_next, weights, *_net(shape))


def group_step(params, grads, hs, cs, skipped: Tensor, weights: Tensor, shape: NetShape, update: Update = Update(),
               table=None, precision: Optional[str] = None) -> None:
    """``table`` is not used: the CUDA kernel takes its launch table as a kernel parameter (csrc/l2l_cuda.cpp)."""
    torch.ops.l2l_fused.native_group_step(params, grads, hs, cs, weights, skipped, *_net(shape), *update.lr_arguments(),
                                          update.weight_decay, update.maximize)


if BUILD_ERROR is None:

    @torch.library.register_fake("l2l_fused::native_group_step")
    def _(params, grads, h, c, weights, skipped, layers, hidden, features, preprocess_p, output_scale, lr_tensor=None,
          lr=1.0, weight_decay=0.0, maximize=False):
        return None

    @torch.library.register_fake("l2l_fused::native_forward")
    def _(theta, grad, h, c, weights, layers, hidden, features, preprocess_p, output_scale):
        return torch.empty_like(theta), torch.empty_like(h), torch.empty_like(c)

    @torch.library.register_fake("l2l_fused::native_backward")
    def _(grad, h, c, dtheta, dh_next, dc_next, weights, layers, hidden, features, preprocess_p, output_scale):
        return torch.empty_like(dh_next), torch.empty_like(dc_next), torch.empty_like(weights)
