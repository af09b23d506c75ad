"""Small ``nn.Module`` optimizees for the general optimizer's training mixture and the held-out suite.

Plain PyTorch modules with PyTorch's default initialisation, as a user would write them. They hold no
buffers (batch norm keeps no running statistics): B copies run as one batched call of
``torch.func.vmap`` (:mod:`l2l_fused.meta.modules`), and a buffer would be state the copies share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class MLP(nn.Sequential):
    """Flatten, then ``in → hidden… → out`` linear layers with ``activation`` between them (no hidden
    layers: a linear model)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], out_features: int, activation: str = "relu") -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        sizes = (in_features, *hidden, out_features)
        layers: list[nn.Module] = [nn.Flatten()]
        for k, (i, o) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(i, o))
            if k < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)


class SmallCNN(nn.Sequential):
    """Per entry of ``channels``: conv 3×3 (padding 1), batch norm if asked (no running statistics), ReLU,
    max-pool 2; then a linear classifier."""

    def __init__(self, image_shape: tuple[int, int, int], channels: tuple[int, ...], classes: int,
                 batch_norm: bool) -> None:
        c, h, w = image_shape
        if h >> len(channels) < 1 or w >> len(channels) < 1:
            raise ValueError(f"{len(channels)} conv layers pool {h}×{w} images below one pixel")
        layers: list[nn.Module] = []
        for i, o in zip((c, *channels), channels):
            layers.append(nn.Conv2d(i, o, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(o, track_running_stats=False))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
        flat = channels[-1] * (h >> len(channels)) * (w >> len(channels))
        super().__init__(*layers, nn.Flatten(), nn.Linear(flat, classes))


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4× GELU MLP, each residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        m, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(m, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than scaled_dot_product_attention, which vmap runs one function at a time.
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attention = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        x = x + self.proj(attention.transpose(1, 2).reshape(m, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformerLM(nn.Module):
    """A GPT-style character model: token and learned position embeddings, ``layers`` blocks, a final layer
    norm and an untied output layer. ``[M, T]`` token ids → logits ``[M, T, vocab]``."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(self.norm(self.blocks(self.embed(tokens) + self.position[: tokens.shape[-1]])))
