"""The paper's neural-network tasks (§3.2, §3.3): train a small classifier from a random initialisation on
minibatches. One sampled function is one initialisation plus one sequence of minibatches.

B functions run as one batched network (``bmm`` for dense layers, grouped convolution for conv layers) so a
batch of functions costs a few kernel calls, not B.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Dataset, load_dataset
from .tasks import Problem, Task, shard_slice

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu}


def _batch_norm(x: Tensor) -> Tensor:
    """Batch normalisation without affine parameters or running statistics: per channel (dim 1) over
    every other dim, which in the layouts below is one function's minibatch."""
    return F.batch_norm(x, None, None, training=True, eps=1e-5)


class BatchedMLP:
    """Fully connected layers ``in → hidden… → classes``, weights ``[B, in, out]`` and biases ``[B, out]``."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], activation: str, classes: int) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.sizes = (in_features, *hidden, classes)
        self.activation = ACTIVATIONS[activation]

    def shapes(self) -> list[tuple[int, ...]]:
        return [s for i, o in zip(self.sizes, self.sizes[1:]) for s in ((i, o), (o,))]

    def groups(self) -> None:
        return None

    def logits(self, params: list[Tensor], x: Tensor) -> Tensor:
        """``x [B, M, C, H, W]`` → logits ``[B, M, classes]``."""
        h = x.flatten(2)
        layers = len(self.sizes) - 1
        for k in range(layers):
            h = torch.baddbmm(params[2 * k + 1].unsqueeze(1), h, params[2 * k])
            if k < layers - 1:
                h = self.activation(h)
        return h


class BatchedConvNet:
    """Conv 3×3 (padding 1) → batch norm → ReLU → max-pool 2, per entry of ``channels``; then a fully
    connected hidden layer (batch norm, ReLU) and the classifier: the paper's CIFAR net, scaled to the
    images. Conv weights ``[B, out, in, 3, 3]``; dense weights ``[B, in, out]``."""

    def __init__(self, image_shape: tuple[int, int, int], channels: tuple[int, ...], fc_hidden: int, classes: int) -> None:
        c, h, w = image_shape
        if h >> len(channels) < 1 or w >> len(channels) < 1:
            raise ValueError(f"{len(channels)} conv layers pool {h}×{w} images below one pixel")
        self.channels = (c, *channels)
        flat = channels[-1] * (h >> len(channels)) * (w >> len(channels))
        self.fc = BatchedMLP(flat, (fc_hidden,), "relu", classes)

    def shapes(self) -> list[tuple[int, ...]]:
        conv = [s for i, o in zip(self.channels, self.channels[1:]) for s in ((o, i, 3, 3), (o,))]
        return conv + self.fc.shapes()

    def groups(self) -> dict[str, list[int]]:
        n_conv = 2 * (len(self.channels) - 1)
        return {"conv": list(range(n_conv)), "fc": list(range(n_conv, len(self.shapes())))}

    def logits(self, params: list[Tensor], x: Tensor) -> Tensor:
        b, m = x.shape[:2]
        # Function b's images become channel group b of one [M, B·C, H, W] batch: a grouped convolution
        # (groups = B) then applies function b's filters to function b's images only.
        h = x.transpose(0, 1).flatten(1, 2)
        n_conv = len(self.channels) - 1
        for k in range(n_conv):
            weight, bias = params[2 * k], params[2 * k + 1]
            h = F.conv2d(h, weight.flatten(0, 1), bias.flatten(), padding=1, groups=b)
            h = F.max_pool2d(torch.relu(_batch_norm(h)), 2)
        h = h.view(m, b, -1).transpose(0, 1)  # [B, M, features]
        (w1, b1, w2, b2) = params[2 * n_conv:]
        h = torch.baddbmm(b1.unsqueeze(1), h, w1)  # [B, M, hidden]
        h = torch.relu(_batch_norm(h.transpose(0, 1).flatten(1)).view(m, b, -1).transpose(0, 1))
        return torch.baddbmm(b2.unsqueeze(1), h, w2)


@dataclass
class ClassificationProblem(Problem):
    images: Tensor  # the whole dataset, [N, C, H, W]
    labels: Tensor  # [N]
    init: list[Tensor]  # initial parameters, each [B, *shape]
    model: object  # BatchedMLP or BatchedConvNet
    batch_size: int
    seed: int  # decides every minibatch: step t draws from seed + t
    # This batch's place among the functions it was sampled with (shard keeps their minibatches).
    sampled_functions: int
    first_function: int = 0

    @property
    def params(self) -> list[Tensor]:
        return self.init

    @property
    def groups(self) -> dict[str, list[int]] | None:
        return self.model.groups()

    def minibatch(self, step: int) -> Tensor:
        """Indices ``[B, batch_size]`` of step's minibatch per function (drawn with replacement), the same
        for every optimizer run on this problem and on any device."""
        generator = torch.Generator().manual_seed(self.seed + step)
        index = torch.randint(len(self.labels), (self.sampled_functions, self.batch_size), generator=generator)
        return index[self.first_function:self.first_function + self.init[0].shape[0]]

    def shard(self, index: int, count: int) -> "ClassificationProblem":
        part = shard_slice(self.init[0].shape[0], index, count)
        return dataclasses.replace(self, init=[p[part] for p in self.init], first_function=self.first_function + part.start)

    def loss(self, params: list[Tensor], step: int) -> Tensor:
        index = self.minibatch(step).to(self.labels.device)
        logits = self.model.logits(params, self.images[index])
        per_example = F.cross_entropy(logits.flatten(0, 1), self.labels[index].flatten(), reduction="none")
        return per_example.view(index.shape).mean(1)


class ClassificationTask(Task):
    """Train a classifier from N(0, init_std²) weights (0.01, as the paper's published code) on minibatches
    of ``batch_size`` examples. ``data`` is ``"digits"`` (embedded) or a loader name with ``data_dir``."""

    preprocess_p = 10.0
    output_scale = 0.1
    # Sized so meta-training takes minutes, not hours, on a 2-core CPU (the shipped nets' recipe).
    train_defaults = {"batch_size": 32, "epochs": 12, "iterations_per_epoch": 10, "lr": 2e-3, "val_functions": 128}
    eval_defaults = {"test_functions": 256, "tune_functions": 128}

    def __init__(self, data: str = "digits", data_dir: Optional[str] = None, batch_size: int = 128,
                 init_std: float = 0.01) -> None:
        self.dataset: Dataset = load_dataset(data, data_dir)
        self.batch_size, self.init_std = batch_size, init_std
        self.model = self.build_model()

    def build_model(self):
        raise NotImplementedError

    @property
    def groups(self) -> tuple[str, ...] | None:
        """The model's parameter groups that get their own net (the conv net's "conv" and "fc")."""
        groups = self.model.groups()
        return None if groups is None else tuple(groups)

    def sample(self, n_functions: int, generator: torch.Generator) -> ClassificationProblem:
        init = [self.init_std * torch.randn(n_functions, *shape, generator=generator) for shape in self.model.shapes()]
        seed = int(torch.randint(2**62, (), generator=generator))
        return ClassificationProblem(images=self.dataset.images, labels=self.dataset.labels, init=init,
                                     model=self.model, batch_size=self.batch_size, seed=seed,
                                     sampled_functions=n_functions)

    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.model.shapes())


class MLPTask(ClassificationTask):
    """Paper §3.2: one hidden layer of 20 sigmoid units, cross-entropy, minibatches of 128, 100 steps,
    preprocessing p = 10, output scale 0.1. The variants are the paper's transfer tests (Fig. 5-6)."""

    name = "mlp"
    variants = {
        "base": ({}, None),
        "hidden40": ({"hidden": (40,)}, None),
        "layers2": ({"hidden": (20, 20)}, None),
        "relu": ({"activation": "relu"}, None),
        "steps200": ({}, 200),
    }

    def __init__(self, hidden: tuple[int, ...] = (20,), activation: str = "sigmoid", **options) -> None:
        self.hidden, self.activation = tuple(hidden), activation
        super().__init__(**options)

    def build_model(self) -> BatchedMLP:
        return BatchedMLP(math.prod(self.dataset.image_shape), self.hidden, self.activation, self.dataset.classes)


class ConvTask(ClassificationTask):
    """Paper §3.3: conv layers and a fully connected layer, with one LSTM optimizer for the conv parameters
    and another for the fully connected ones. Two conv layers of 16 channels for images of 8×8 (digits),
    three for larger ones (CIFAR-10, MNIST), then 32 hidden units; minibatches of 32."""

    name = "conv"
    # Convolution makes every step several times the MLP's on the CPU: minibatches of 32 images and
    # smaller batches of functions keep meta-training to minutes on 2 cores.
    train_defaults = {"batch_size": 16, "epochs": 8, "iterations_per_epoch": 5, "lr": 2e-3, "val_functions": 64}
    eval_defaults = {"test_functions": 64, "tune_functions": 16}

    def __init__(self, channels: Optional[tuple[int, ...]] = None, fc_hidden: int = 32, batch_size: int = 32,
                 **options) -> None:
        self.channels, self.fc_hidden = channels, fc_hidden
        super().__init__(batch_size=batch_size, **options)

    def build_model(self) -> BatchedConvNet:
        shape = self.dataset.image_shape
        channels = self.channels or ((16, 16) if shape[1] <= 8 else (16, 16, 16))
        return BatchedConvNet(shape, tuple(channels), self.fc_hidden, self.dataset.classes)
