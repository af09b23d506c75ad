"""Registry of implementations of the step.

A backend provides two entry points:

* ``step(net, theta, grad, h, c, saved_state_dtype) -> (theta', h', c')`` on one flat tensor,
  differentiable with respect to φ, theta and the state: what ``LSTMOptimizerNet.forward`` and
  meta-training call.
* ``group_step(net, params, grads, hs, cs, skipped, update=Update())``: the optimizer's update of every
  tensor of a param group together, in place and without autograd. ``hs[i]``/``cs[i]`` are
  ``[L, params[i].numel(), H]``. ``update`` carries the group's lr, weight decay and maximize (see
  :class:`Update`). A coordinate whose gradient is NaN or ±inf keeps its parameter and state and is added
  to ``skipped``, a 0-dim int64 tensor on the parameters' device (no host synchronisation). A coordinate
  whose gradient is exactly zero keeps its state and gets no learned update (weight decay still applies).

``"auto"`` picks the available backend of highest priority for the tensors' device and the net; a
negative priority means "only when asked for by name" (the Triton interpreter on the CPU, for instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

AUTO = "auto"


@dataclass(frozen=True)
class Update:
    """A param group's options of the optimizer step, applied inside every backend's kernel:

        θ' = θ · (1 − lr · weight_decay) + lr · Δ(±∇)

    Δ is the learned update of the gradient ∇, or of −∇ with ``maximize``. ``lr`` and ``wd`` are rounded to
    float32; ``1 − lr · wd`` is computed in float64 (where the product of two float32 is exact, so fused
    or not, every kernel gets the same bits) and rounded to float32; ``lr · Δ`` is float32; the sum is taken
    in float32 (float64 for float64 θ) and rounded once to θ's dtype. At ``lr = 1``, ``weight_decay = 0``
    both factors are exact, so the step is bit for bit ``θ + Δ``. ``lr`` may be a 0-dim float32 tensor on
    the parameters' device, read by the kernel when it runs (a scheduler's in-place change needs no host
    sync and no new CUDA graph).
    """

    lr: Union[float, Tensor] = 1.0
    weight_decay: float = 0.0
    maximize: bool = False

    def lr_arguments(self) -> tuple[Optional[Tensor], float]:
        """``(lr tensor or None, lr number)`` as the kernels take them: the number is read only without a tensor."""
        return (self.lr, 1.0) if isinstance(self.lr, Tensor) else (None, self.lr)


def _supports_any(net) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    priority: Callable[[torch.device], int]
    is_available: Callable[[torch.device], bool]
    step: Callable
    group_step: Callable
    # None if the backend runs this net, else why not (a size it has no kernel for, say).
    supports: Callable[[object], Optional[str]] = _supports_any
    # Why it is not available on a device, and what would make it so.
    unavailable_reason: Optional[Callable[[torch.device], str]] = None
    # Imports the backend's kernels (triton, say), which importing l2l_fused does not do.
    load: Optional[Callable[[], None]] = None


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
    if backend.load is not None:
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
