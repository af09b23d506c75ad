"""The ``"native"`` backend: the C++/CUDA kernels of csrc/ (``l2l_fused._C``, ops ``torch.ops.l2l_fused.native_*``).

The extension is optional: without it the package imports and works, and asking for ``backend="native"``
raises an error that says how to build it. The ops take φ packed (per layer the transposed
``[W_ih | W_hh]`` and ``b_ih + b_hh``, then the head; ``csrc/l2l_math.h``). Packing is made of
differentiable operations, so the autograd Function (:mod:`l2l_fused.fused`) returns the packed gradient and
autograd carries it back to every weight; the optimizer packs once per version of the weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, capture
from .fused import Kernels, float32_problem, fused_step, size_problem

try:
    from . import _C  # loading it registers the ops

    BUILD_ERROR: Optional[BaseException] = None
except ImportError as error:  # not built, or built against another torch
    BUILD_ERROR = error

BUILD_HINT = (
    "build it with `pip install -e . --no-build-isolation` in the repository (needs CMake, ninja and a C++17 "
    "compiler; nvcc for the CUDA kernel; L2L_BUILD_NATIVE=1 turns a failed build into an error)"
)


def has_cuda_kernel() -> bool:
    return BUILD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("l2l_fused::native_forward", "CUDA")


def _available(device: torch.device) -> bool:
    return BUILD_ERROR is None and (device.type == "cpu" or (device.type == "cuda" and has_cuda_kernel()))


def _unavailable_reason(device: torch.device) -> str:
    if BUILD_ERROR is not None:
        return f"the extension l2l_fused._C is not built ({BUILD_ERROR}); {BUILD_HINT}"
    return f"l2l_fused._C was built without a kernel for {device.type}; {BUILD_HINT} with nvcc on PATH"


def _supports(net) -> Optional[str]:
    if BUILD_ERROR is not None:  # the sizes come from the extension; without it, resolving says why
        return float32_problem(net)
    return float32_problem(net) or size_problem(net.num_layers, net.hidden_size, _C.MAX_LAYERS, _C.MAX_HIDDEN)


def pack(net) -> Tensor:
    """φ packed for the native kernels, by differentiable operations (float32, on the net's device)."""
    parts = []
    for cell in net.cells:
        parts += [torch.cat([cell.weight_ih, cell.weight_hh], 1).t().reshape(-1), cell.bias_ih + cell.bias_hh]
    parts += [net.head.weight.reshape(-1), net.head.bias]
    return torch.cat(parts).float()


def _shape(net) -> tuple:
    return (net.num_layers, net.hidden_size, net.cells[0].input_size, net.preprocess_p, net.output_scale)


class _PackedCache:
    """The optimizer's packed weights, remade only when a weight's version (an in-place update, say a
    meta-training step) or the device changes."""

    def __init__(self) -> None:
        self.key, self.packed = None, None

    def get(self, net, device: torch.device) -> Tensor:
        key = (device,) + tuple((id(p), p._version) for p in net.parameters())
        if key != self.key:
            with torch.no_grad():
                self.packed = pack(net).to(device).contiguous()
            self.key = key
        return self.packed


_PACKED: dict[int, _PackedCache] = {}


def group_step(net, params, grads, hs, cs, skipped, update: backends.Update = backends.Update()):
    if torch.compiler.is_compiling() or capture.capturing():
        # Traced or captured, the packing joins the graph, so every run of it packs φ as it is then: the
        # cache's version check is host code, which neither a compiled graph nor a CUDA-graph replay repeats.
        with torch.no_grad():
            packed = pack(net).to(params[0].device)
    else:
        packed = _PACKED.setdefault(id(net), _PackedCache()).get(net, params[0].device)
    torch.ops.l2l_fused.native_group_step(params, grads, hs, cs, packed, skipped, *_shape(net), *update.lr_arguments(),
                                          update.weight_decay, update.maximize)


def _sizes(h: Tensor, preprocess_p) -> tuple[int, int, int]:
    """(layers, hidden, features) from a state [L, N, H] and the preprocessing."""
    return h.shape[0], h.shape[2], 1 if preprocess_p is None else 2


def _forward(theta, grad, h, c, weights, preprocess_p, output_scale):
    (packed,) = weights
    return torch.ops.l2l_fused.native_forward(theta, grad, h, c, packed, *_sizes(h, preprocess_p), preprocess_p,
                                              output_scale)


def _backward(grad, h, c, dtheta, dh_next, dc_next, weights, preprocess_p, output_scale):
    (packed,) = weights
    dh, dc, d_packed = torch.ops.l2l_fused.native_backward(grad, h, c, dtheta, dh_next, dc_next, packed,
                                                           *_sizes(h, preprocess_p), preprocess_p, output_scale)
    return dh, dc, [d_packed]


KERNELS = Kernels(name="native", weights=lambda net: [pack(net)], forward=_forward, backward=_backward)


def step(net, theta, grad, h, c, saved_state_dtype=None):
    return fused_step(KERNELS, net, theta, grad, h, c, saved_state_dtype)


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


backends.register(
    backends.Backend(
        name="native", priority=lambda device: 5, is_available=_available, step=step, group_step=group_step,
        supports=_supports, unavailable_reason=_unavailable_reason,
    )
)
