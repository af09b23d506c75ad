"""Inputs for tests: gradients that hit every preprocessing case, nets with random weights."""

from __future__ import annotations

import math

import torch

from l2l_fused import LSTMOptimizerNet


def adversarial_grad(n: int, p: float | None, dtype=torch.float32, generator=None) -> torch.Tensor:
    """n gradient values mixing both preprocessing branches, zeros, tiny, huge and threshold values."""
    g = torch.randn(n, generator=generator, dtype=torch.float64)
    scale = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-25.0, 15.0, generator=generator))
    g = g * scale  # magnitudes from ~1e-11 to ~1e7: both branches of p = 10, many of them
    special = [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 1.0, -1.0]
    if p is not None:
        t = math.exp(-p)
        special += [t, -t, t * (1 + 1e-6), -t * (1 - 1e-6), t * 2, -t / 2]
    k = min(n, len(special))
    idx = torch.randperm(n, generator=generator)[:k]
    g[idx] = torch.tensor(special[:k], dtype=torch.float64)
    return g.to(dtype)


def random_net(hidden_size=20, num_layers=2, preprocess_p=10.0, output_scale=0.1, dtype=torch.float32) -> LSTMOptimizerNet:
    """A net with weights larger than nn.LSTMCell's default, so gates saturate and every term matters."""
    net = LSTMOptimizerNet(hidden_size, num_layers, preprocess_p, output_scale).to(dtype)
    with torch.no_grad():
        for w in net.parameters():
            w.uniform_(-0.7, 0.7)
    return net


def random_state(net: LSTMOptimizerNet, n: int, dtype=torch.float32):
    shape = (net.num_layers, n, net.hidden_size)
    return torch.randn(shape, dtype=dtype) * 0.5, torch.randn(shape, dtype=dtype)
