"""Learned optimizers shipped with the package (``l2l_fused/weights/<task>.pt``), meta-trained by the
recipes in the README, and the helper that splits a model's parameters the way the conv optimizer wants."""

from __future__ import annotations

import os
import shlex
from dataclasses import asdict

import torch
from torch import nn

from .net import Nets, net_from_config

WEIGHTS = os.path.join(os.path.dirname(__file__), "weights")
# "mlp" and "conv" are meta-trained on real MNIST; the "-digits" nets, on the 8×8 digits, are what they
# start from. "general" (from "mlp") on a mixture of MLPs, CNNs and transformers: the one for other models.
# "neural-art" (from "general") on the pixels of 64×64 style-transfer images.
PRETRAINED = ("quadratic", "mlp", "conv", "mlp-digits", "conv-digits", "general", "neural-art")


def _path(name: str) -> str:
    if name not in PRETRAINED:
        raise ValueError(f"name must be one of {list(PRETRAINED)}, got {name!r}")
    return os.path.join(WEIGHTS, f"{name}.pt")


def pretrained_info(name: str) -> dict:
    """How the shipped net for task ``name`` was made: ``recipe`` (the command), ``train_config``,
    ``best_val`` (validation meta-loss) and ``best_epoch``."""
    payload = torch.load(_path(name), map_location="cpu", weights_only=True)
    return {k: v for k, v in payload.items() if k not in ("net", "net_config")}


def pretrained(name: str) -> Nets:
    """The learned optimizer meta-trained on task ``name``: ``"general"`` (MLPs, CNNs with and without batch
    norm and tiny transformers: the one for a model of your own), ``"quadratic"`` (raw gradients, output
    scale 1), ``"mlp"`` (the paper's MNIST MLP; p = 10, output scale 0.1), each an ``LSTMOptimizerNet``; or
    ``"conv"``, an ``nn.ModuleDict`` with one net for convolution parameters (``"conv"``) and one for the
    rest (``"fc"``): pass ``param_groups_by_layer(model, pretrained("conv"))`` to ``L2LOptimizer``;
    ``"neural-art"``, an ``LSTMOptimizerNet`` for an image's pixels under a style-transfer loss."""
    return load_net(_path(name)).requires_grad_(False)


def load_net(source: str) -> Nets:
    """A shipped net by name (one of ``PRETRAINED``), or the net in a file :func:`export` wrote."""
    path = _path(source) if source in PRETRAINED else source
    if not os.path.isfile(path):
        raise ValueError(f"no shipped net or file {source!r} (shipped: {list(PRETRAINED)})")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    net = net_from_config(payload["net_config"])
    net.load_state_dict(payload["net"])
    return net


def param_groups_by_layer(model: nn.Module, nets: nn.ModuleDict) -> list[dict]:
    """``L2LOptimizer`` param groups: parameters of convolution modules with ``nets["conv"]``, every other
    parameter with ``nets["fc"]`` (the paper's split for its CIFAR net)."""
    conv = {id(p) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) for p in m.parameters(recurse=False)}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) in conv], "net": nets["conv"]},
              {"params": [p for p in params if id(p) not in conv], "net": nets["fc"]}]
    return [g for g in groups if g["params"]]


def export(checkpoint: str, path: str) -> str:
    """Write the best net of a trainer checkpoint, with the command that reproduces it, to ``path``."""
    from .meta.trainer import TrainConfig  # meta-training (and tqdm) load only for those who export

    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    command = ["python", "-m", "l2l_fused", "train", "--task", payload["task"]]
    for key, value in payload.get("recipe", {}).items():  # the task's options and φ's start
        command += ["--" + key.replace("_", "-"), "DATA_DIR" if key == "data_dir" else str(value)]
    state = payload["state"]
    # A run stopped early is reproduced by asking for the epochs it ran: the first E epochs of a longer run
    # are bit-identical to a run of E epochs. A checkpoint from before a TrainConfig field existed was
    # trained with that field's default.
    config = asdict(TrainConfig(**{**payload["train_config"], "epochs": state["epoch"]}))
    for key in TrainConfig.__dataclass_fields__:
        command += ["--" + key.replace("_", "-"), str(config[key])]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"task": payload["task"], "net_config": payload["net_config"], "net": payload["best_net"],
                "train_config": config, "recipe": shlex.join(command), "best_val": state["best_val"],
                "best_epoch": state["best_epoch"]}, path)
    return path
