"""The general optimizer's task: a mixture of MLPs, small CNNs and tiny transformer language models, so
that one φ serves models it never saw (the held-out :mod:`l2l_fused.meta.suite`)."""

from __future__ import annotations

import functools

import torch

from .models import MLP, SmallCNN, TinyTransformerLM
from .modules import CompositeProblem, Family
from .tasks import Task
from .text import VOCAB

# What each sampled batch draws from, per kind; one configuration of each kind per batch.
MLP_WIDTHS, MLP_DEPTHS, MLP_ACTIVATIONS = (16, 32, 64, 128), (1, 2), ("sigmoid", "tanh", "relu", "gelu")
CNN_CHANNELS, CNN_BATCH_NORM = ((8, 16), (16, 16), (16, 32)), (False, True)
LM_WIDTHS, LM_LAYERS = (16, 32), (1, 2)
KINDS = ("mlp", "cnn", "transformer")


def _choice(options: tuple, generator: torch.Generator):
    return options[int(torch.randint(len(options), (), generator=generator))]


def draw_family(kind: str, generator: torch.Generator) -> Family:
    """One configuration of ``kind``: an MLP or CNN on the 14×14 MNIST digits, or a character transformer on
    CPython's documentation."""
    if kind == "mlp":
        width, depth, activation = (_choice(o, generator) for o in (MLP_WIDTHS, MLP_DEPTHS, MLP_ACTIVATIONS))
        hidden = (width,) * depth
        return Family(f"mlp{hidden}-{activation}", functools.partial(MLP, 196, hidden, 10, activation), "mnist5k-14")
    if kind == "cnn":
        channels, batch_norm = _choice(CNN_CHANNELS, generator), _choice(CNN_BATCH_NORM, generator)
        return Family(f"cnn{channels}{'-bn' if batch_norm else ''}",
                      functools.partial(SmallCNN, (1, 14, 14), channels, 10, batch_norm), "mnist5k-14")
    if kind == "transformer":
        width, layers = _choice(LM_WIDTHS, generator), _choice(LM_LAYERS, generator)
        return Family(f"transformer-w{width}-l{layers}",
                      functools.partial(TinyTransformerLM, len(VOCAB), width, layers, 2, 32), "python-docs",
                      "next-token", batch_size=8)
    raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")


class GeneralTask(Task):
    """Every sampled batch of B functions holds B/3 of each kind (``KINDS``), each kind in a configuration
    drawn afresh, all from PyTorch's default initialisation. Training functions (not validation or test
    ones) are randomly rescaled: parameters by exp(U(−λ, λ)) per coordinate (``param_scale``), losses by
    exp(U(−μ, μ)) per function (``loss_scale``), so φ meets gradients of many scales. The paper's φ (two
    LSTM layers of 20, p = 10, output scale 0.1). The meta-objective is each function's loss relative to
    its start ("relative"): the kinds' losses differ in scale, and a blow-up must cost in proportion, where
    "log" charges it only its logarithm."""

    name = "general"
    preprocess_p = 10.0
    output_scale = 0.1
    variants = {"base": ({}, None)}
    train_defaults = {"batch_size": 12, "epochs": 8, "iterations_per_epoch": 8, "truncation": 50, "lr": 3e-4,
                      "objective": "relative", "val_functions": 12}

    def __init__(self, param_scale: float = 0.5, loss_scale: float = 2.0) -> None:
        for name, value in (("param_scale", param_scale), ("loss_scale", loss_scale)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.param_scale, self.loss_scale = param_scale, loss_scale

    def sample(self, n_functions: int, generator: torch.Generator, split: str = "train") -> CompositeProblem:
        if n_functions % len(KINDS):
            raise ValueError(f"the general task samples its {len(KINDS)} kinds equally: n_functions must be a "
                             f"multiple of {len(KINDS)}, got {n_functions}")
        scaling = {"param_scale": self.param_scale, "loss_scale": self.loss_scale} if split == "train" else {}
        families = [draw_family(kind, generator) for kind in KINDS]
        return CompositeProblem([f.sample(n_functions // len(KINDS), generator, split, **scaling) for f in families])
