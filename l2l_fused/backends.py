"""Registry of implementations of the step.

A backend provides two entry points:

* ``step(net, theta, grad, h, c) -> (theta', h', c')`` on one flat tensor, differentiable with respect to
  φ, theta and the state: what ``LSTMOptimizerNet.forward`` and meta-training call.
* ``group_step(net, params, grads, hs, cs)``: the optimizer's update of every tensor of a param group
  together, in place and without autograd. ``hs[i]``/``cs[i]`` are ``[L, params[i].numel(), H]``.

``"auto"`` picks the available backend of highest priority for the tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int
    is_available: Callable[[torch.device], bool]
    step: Callable
    group_step: Callable


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def available(device) -> list[str]:
    """Names of the backends that run on ``device``, fastest first."""
    device = torch.device(device)
    ready = [b for b in _REGISTRY.values() if b.is_available(device)]
    return [b.name for b in sorted(ready, key=lambda b: -b.priority)]


def resolve(name: str, device) -> Backend:
    """The backend called ``name`` (or the fastest, for ``"auto"``) for tensors on ``device``."""
    names = available(device)
    if name == AUTO:
        return _REGISTRY[names[0]]
    if name not in names:
        known = "" if name in _REGISTRY else " (no such backend)"
        raise ValueError(
            f"backend {name!r} is not available on {torch.device(device)}{known}; available: {[AUTO] + names}"
        )
    return _REGISTRY[name]


def check_name(name) -> None:
    """Fail early, at construction, on a name no device could ever resolve."""
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {[AUTO] + sorted(_REGISTRY)}")
