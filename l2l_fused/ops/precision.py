"""The two arithmetic modes of the fused kernels, and how a call picks one, as PyTorch's matmuls do.

* ``"exact"``: float32-accurate. The Triton kernels split every tensor-core operand into two TF32 parts
  and keep three of the four products (error ≤ 3·2⁻²² per product, below float32's own rounding of the
  sums); the native kernels use float32 FMAs.
* ``"fast"``: one TF32 pass on the tensor cores (error ≤ 2·2⁻¹¹ per product, float32 accumulation), what
  ``torch.backends.cuda.matmul.allow_tf32`` gives matmuls and cuDNN's LSTM does by default. Only the
  Triton kernels have such a path; the native and reference backends compute in float32 in both modes.

Activations: exact, one ``ex2.approx`` and one approximate reciprocal per gate, float32-accurate; fast,
one ``tanh.approx`` (docs/kernels.md, "Arithmetic modes", has the error budget and the measurements).
The Triton forward and backward both follow the mode.

``precision=None`` (the default everywhere) follows ``torch.get_float32_matmul_precision()`` when the
step runs: ``"highest"`` (PyTorch's default) → exact; ``"high"`` or ``"medium"`` → fast.
"""

from __future__ import annotations

from typing import Optional

import torch

PRECISIONS = ("exact", "fast")


def check(precision: Optional[str], name: str = "precision") -> None:
    """Raise a ValueError naming ``name`` unless ``precision`` is None or one of :data:`PRECISIONS`."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"{name} must be None (follow torch.get_float32_matmul_precision()) or one of "
                         f"{list(PRECISIONS)}, got {precision!r}")


def resolve(precision: Optional[str]) -> str:
    """The mode a step runs in: ``precision``, or the one ``torch.get_float32_matmul_precision()`` implies."""
    check(precision)
    if precision is not None:
        return precision
    return "exact" if torch.get_float32_matmul_precision() == "highest" else "fast"
