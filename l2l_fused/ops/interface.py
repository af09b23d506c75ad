"""Where every op enters: which backend runs it, and the autograd Function of the fused backends.

A backend (``"reference"``, ``"native"``, ``"triton"``) has three entry points (:class:`Ops`), the same
signatures everywhere; :mod:`l2l_fused.ops.reference` is their specification:

* ``forward(theta, grad, h, c, weights, shape, precision) -> (theta', h', c')``: one step of a flat θ, out
  of place;
* ``backward(grad, h, c, dtheta, dh_next, dc_next, weights, shape, precision) -> (dh, dc, dweights)``: its
  adjoints from what the forward read, the weight gradient in ``weights``' layout;
* ``group_step(params, grads, hs, cs, skipped, weights, shape, update, table, precision)``: the optimizer's update of
  every tensor of a param group together, in place, without autograd. ``hs[i]``/``cs[i]`` are
  ``[L, params[i].numel(), H]``; ``update`` carries the group's lr, weight decay and maximize
  (:class:`Update`). A coordinate whose gradient is NaN or ±inf keeps its parameter and state and is added
  to ``skipped``, a 0-dim int64 on the parameters' device (no host synchronisation). One whose gradient is
  exactly zero keeps its state and gets no learned update (weight decay still applies). ``table`` is the
  group's :class:`~l2l_fused.ops.launch_table.LaunchTable` on that device (None: a temporary one).

``weights`` is φ in the one layout of :mod:`l2l_fused.ops.layout`, ``shape`` its
:class:`~l2l_fused.ops.layout.NetShape`, ``precision`` ``"exact"`` or ``"fast"``
(:mod:`l2l_fused.ops.precision`), or None: a backend with a fast path resolves it where it launches,
inside what torch.compile sees as one opaque op, so a compiled step reads the setting at every run. :class:`Backend` adds the net: it packs φ (the net caches the
packed copy, :meth:`~l2l_fused.net.LSTMOptimizerNet.kernel_weights`), and for a fused backend wraps
``forward``/``backward`` in :class:`FusedStep` when autograd needs them.

``"auto"`` picks the available backend of highest priority for the tensors' device and the net; a negative
priority means "only when asked for by name" (the Triton interpreter on the CPU, for instance). This
module is the only place that chooses: the registry is at its end.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import native  # loads the extension, if built: whether it was is known no other way
from .layout import NetShape, pack
from .update import Update

AUTO = "auto"


class FusedStep(torch.autograd.Function):
    """``(θ', h', c') = step(θ, ∇, h, c; φ)`` with a fused backend's forward and backward kernels.

    It saves only what the step read (∇ and the incoming state, optionally in bfloat16), never a gate: the
    backward kernels recompute the gates from those inputs. No gradient flows into ∇ (the paper's
    assumption), and dθ = dθ' because θ' = θ + Δ with ∂Δ/∂θ = 0. φ enters packed, by differentiable
    operations, so autograd carries the packed gradient back to the net's parameters.
    """

    @staticmethod
    def forward(ctx, ops, theta, grad, h, c, weights, kernel_weights, shape, saved_state_dtype, precision):
        # ``weights`` (packed by differentiable operations) takes the gradient; the kernels read
        # ``kernel_weights``, the same values as the net's cached copy, one tensor across the unrolled steps
        # (a backend can keep what it derives from it).
        outputs = ops.forward(theta, grad, h, c, kernel_weights, shape, precision)
        if saved_state_dtype is not None and saved_state_dtype != h.dtype:
            h, c = h.to(saved_state_dtype), c.to(saved_state_dtype)
        ctx.save_for_backward(grad, h, c, kernel_weights)
        ctx.ops, ctx.shape, ctx.precision = ops, shape, precision
        return outputs

    @staticmethod
    def backward(ctx, dtheta, dh_next, dc_next):
        grad, h, c, weights = ctx.saved_tensors
        dh, dc, dweights = ctx.ops.backward(grad, h, c, dtheta.contiguous(), dh_next.contiguous(),
                                            dc_next.contiguous(), weights, ctx.shape, ctx.precision)
        dtheta = dtheta if ctx.needs_input_grad[1] else None
        return None, dtheta, None, dh, dc, dweights, None, None, None, None


class Ops(NamedTuple):
    """A backend's entry points (see the module's docstring)."""

    forward: Callable
    backward: Callable
    group_step: Callable


# Each backend's entry points once imported: a plain lookup, which torch.compile traces through.
_LOADED: dict[str, Ops] = {}


def _runs_anything(net) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    priority: Callable[[torch.device], int]
    is_available: Callable[[torch.device], bool]
    # Imports the backend's entry points (triton, say, which importing l2l_fused does not import).
    importer: Callable[[], Ops]
    # None if the backend runs this net, else why not (a size it has no kernel for, say).
    supports: Callable[[object], Optional[str]] = _runs_anything
    # Why it is not available on a device, and what would make it so.
    unavailable_reason: Optional[Callable[[torch.device], str]] = None
    # Whether autograd goes through FusedStep (the backend's own backward) or through its forward itself.
    fused: bool = True

    def load(self) -> Ops:
        """The backend's entry points, imported at the first call."""
        ops = _LOADED.get(self.name)
        if ops is None:
            ops = _LOADED[self.name] = self.importer()
        return ops

    def step(self, net, theta: Tensor, grad: Tensor, h: Tensor, c: Tensor,
             saved_state_dtype: Optional[torch.dtype] = None,
             precision: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
        """One step of a flat θ, out of place; differentiable with respect to θ, h, c and φ when autograd
        needs it (a fused backend then saves only ∇ and the incoming state, in ``saved_state_dtype`` if given)."""
        ops, shape = self.load(), NetShape.of(net)
        theta, grad, h, c = theta.contiguous(), grad.detach().contiguous(), h.contiguous(), c.contiguous()
        if not self.fused:
            if saved_state_dtype is not None:
                raise ValueError(f"saved_state_dtype needs a fused backend: autograd through {self.name} keeps every gate")
            return ops.forward(theta, grad, h, c, pack(net), shape, precision)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (theta, h, c, *net.parameters())):
            return FusedStep.apply(ops, theta, grad, h, c, pack(net), net.kernel_weights(theta.device), shape,
                                   saved_state_dtype, precision)
        with torch.no_grad():
            return ops.forward(theta, grad, h, c, net.kernel_weights(theta.device), shape, precision)

    def group_step(self, net, params, grads, hs, cs, skipped: Tensor, update: Update = Update(), table=None,
                   precision: Optional[str] = None) -> None:
        """The optimizer's in-place step of a param group on one device (see the module's docstring)."""
        weights = net.kernel_weights(params[0].device)
        self.load().group_step(params, grads, hs, cs, skipped, weights, NetShape.of(net), update, table, precision)


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def available(device, net=None) -> list[str]:
    """Names of the backends that run on ``device`` (and run ``net``, if given), fastest first."""
    device = torch.device(device)
    ready = [b for b in _REGISTRY.values() if b.is_available(device) and (net is None or b.supports(net) is None)]
    return [b.name for b in sorted(ready, key=lambda b: -b.priority(device))]


def resolve(name: str, device, net=None) -> Backend:
    """The backend called ``name`` (or the fastest, for ``"auto"``) for ``net`` on ``device``."""
    names = available(device, net)
    if name == AUTO:
        return _REGISTRY[names[0]]  # "reference" runs everything everywhere, at priority 0
    if name not in names:
        if name not in _REGISTRY:
            why = "no such backend"
        elif net is not None and _REGISTRY[name].supports(net) is not None:
            why = _REGISTRY[name].supports(net)
        elif _REGISTRY[name].unavailable_reason is not None:
            why = _REGISTRY[name].unavailable_reason(torch.device(device))
        else:
            why = f"not available on {torch.device(device)}"
        raise ValueError(f"backend {name!r}: {why}; available: {[AUTO] + names}")
    return _REGISTRY[name]


def preload(name: str, device, net=None) -> None:
    """Load the kernels of the backend that ``name`` resolves to on ``device``, if it resolves there: done
    when a param group is added, so that no step (which torch.compile may trace, or a CUDA graph capture)
    is the first to import them. Resolution errors are left to the step, which reports them."""
    try:
        backend = resolve(name, device, net)
    except ValueError:
        return
    backend.load()


def check_name(name, net=None) -> None:
    """Fail early, at construction, on a name no device could ever resolve or a net it cannot run."""
    if name == AUTO:
        return
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {[AUTO] + sorted(_REGISTRY)}")
    why = _REGISTRY[name].supports(net) if net is not None else None
    if why is not None:
        raise ValueError(f"backend {name!r}: {why}")


def fused_problem(net) -> Optional[str]:
    """Why a fused backend, whose kernels compute in float32 on nets of limited size, cannot run ``net``; or None."""
    if net.head.weight.dtype != torch.float32:
        return f"runs float32 nets, not {net.head.weight.dtype}"
    return NetShape.of(net).size_problem()


# ------------------------------------------------------------------------------------------- registry

def _ops(name: str) -> Callable[[], Ops]:
    """Imports module ``name`` of this package, for its three entry points."""
    return lambda: Ops(*(getattr(importlib.import_module(name, __package__), entry) for entry in Ops._fields))


def _triton_ops() -> Ops:
    from .triton import backward, forward

    return Ops(forward.forward, backward.backward, forward.group_step)


register(Backend(name="reference", priority=lambda device: 0, is_available=lambda device: True,
                 importer=_ops(".reference"), fused=False))

register(Backend(
    name="native", priority=lambda device: 5, is_available=native.available, importer=_ops(".native"),
    supports=fused_problem, unavailable_reason=native.unavailable_reason,
))

# Whether triton is installed, asked without importing it (over half a second).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before importing l2l_fused to run the
# kernels on the CPU (that is how CI tests them).
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

register(Backend(
    name="triton",
    # fastest on CUDA; on the CPU only by name (the interpreter is a test vehicle, not a speed-up)
    priority=lambda device: 10 if device.type == "cuda" else -1,
    is_available=lambda device: TRITON_INSTALLED and (device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRETED)),
    importer=_triton_ops,
    supports=fused_problem,
))
