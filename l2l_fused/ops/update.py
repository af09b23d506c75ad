"""The optimizer's options of a group step, as every backend's kernel applies them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor


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
