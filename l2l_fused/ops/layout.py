"""The one layout of φ that every fused kernel reads, and in which their weight gradients come back.

Per layer l, a row-major matrix ``W_l`` of ``K_l = n_x + H + 1`` rows and ``4H`` columns: row k holds the
weights of input k, the layer's input x first (the ``n_x`` gradient features for layer 0, the layer
below's h' above it), then the layer's own h, then a last row for an input that is always 1: the bias
``b_ih + b_hh``; column ``gate·H + unit``, gates (i, f, g, o) as ``nn.LSTMCell``. After the layers, the
head: ``w_out`` (H values), ``b_out``. One flat float32 tensor (:func:`pack`), offsets from
:class:`NetShape`, mirrored by ``csrc/l2l_math.h``.

Why this layout (docs/kernels.md has the longer story): a row is contiguous over the 4H gate units, the
loop the CPU kernel vectorises (4·20 = 80 = five AVX-512 vectors) and the order in which CUDA threads
read the same weight at once (a broadcast); a persistent GPU kernel reads φ once per program, so padding
H to a power of two (Triton's register tiles) is done where it loads, not in memory, where it would cost
the CPU 60% more multiply-adds. The bias as the weight of a constant input lets one matrix product
take it, and the weight gradients of a layer are one outer-product sum over ``[x | h | 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .constants import MAX_HIDDEN, MAX_LAYERS


@dataclass(frozen=True)
class NetShape:
    """What a kernel needs to know of a net besides φ: ``(L, H, n_x of layer 0, p, s)``."""

    layers: int
    hidden: int
    features: int  # inputs of the first layer: 2 with preprocessing, 1 without
    preprocess_p: Optional[float]
    output_scale: float

    @classmethod
    def of(cls, net) -> "NetShape":
        return cls(net.num_layers, net.hidden_size, net.cells[0].input_size, net.preprocess_p, net.output_scale)

    def inputs(self, layer: int) -> int:
        """n_x of ``layer``."""
        return self.features if layer == 0 else self.hidden

    def rows(self, layer: int) -> int:
        """K of ``layer``: its inputs x, its h, and the constant 1 of the bias."""
        return self.inputs(layer) + self.hidden + 1

    def layer_offset(self, layer: int) -> int:
        """Where ``W_layer`` starts; ``layer_offset(layers)`` is the head's offset."""
        return sum(self.rows(i) * 4 * self.hidden for i in range(layer))

    def size_problem(self) -> Optional[str]:
        """Why no fused kernel takes a net of this size (the limits of ops/constants.py), or None."""
        if not 1 <= self.layers <= MAX_LAYERS:
            return f"runs 1 to {MAX_LAYERS} layers, not {self.layers}"
        if not 1 <= self.hidden <= MAX_HIDDEN:
            return f"runs hidden_size up to {MAX_HIDDEN}, not {self.hidden}"
        return None

    @property
    def packed_size(self) -> int:
        return self.layer_offset(self.layers) + self.hidden + 1


def pack(net) -> Tensor:
    """φ in the kernels' layout, in the net's dtype and on its device, made of differentiable operations:
    autograd carries a gradient in this layout back to every weight of the net."""
    parts = []
    for cell in net.cells:
        rows = torch.cat([cell.weight_ih, cell.weight_hh], 1).t()  # [n_x + H, 4H]
        parts += [rows.reshape(-1), cell.bias_ih + cell.bias_hh]
    parts += [net.head.weight.reshape(-1), net.head.bias]
    return torch.cat(parts)


def unpack(weights: Tensor, shape: NetShape) -> tuple[list[tuple[Tensor, Tensor, Tensor, Tensor]], Tensor, Tensor]:
    """``(cells, head_weight, head_bias)`` as :func:`~l2l_fused.ops.reference.l2l_update_ref` takes them, made
    from ``weights`` by differentiable operations: each cell ``(w_ih, w_hh, b, 0)``, the bias whole in
    ``b_ih``. The matrices are laid out as ``nn.LSTMCell`` holds them, so a matrix product over them runs
    the same kernel, with the same rounding, as over the net's own weights."""
    hidden, cells = shape.hidden, []
    for layer in range(shape.layers):
        start, n_x = shape.layer_offset(layer), shape.inputs(layer)
        matrix = weights[start:start + shape.rows(layer) * 4 * hidden].view(shape.rows(layer), 4 * hidden)
        bias = matrix[-1]
        cells.append((matrix[:n_x].t().contiguous(), matrix[n_x:-1].t().contiguous(), bias, torch.zeros_like(bias)))
    head = shape.layer_offset(shape.layers)
    return cells, weights[head:head + hidden].view(1, hidden), weights[head + hidden:head + hidden + 1]
