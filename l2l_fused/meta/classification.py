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

from .data import Dataset, check_split, load_splits
from .tasks import Problem, Task, draw_minibatch, random_scales, shard_slice

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu}
# "paper": every parameter N(0, init_std²), as the paper's published code. "torch": PyTorch's default for
# nn.Linear and nn.Conv2d, weights and biases U(±1/√fan_in). "mixed": each function draws one of the two.
INITS = ("paper", "torch", "mixed")
DEFAULT_DATA = "mnist5k"


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

    def fan_ins(self) -> list[int]:
        """Per parameter, the inputs of its layer's units (what PyTorch's default initialisation scales by)."""
        return [i for i in self.sizes[:-1] for _ in range(2)]

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

    def fan_ins(self) -> list[int]:
        return [9 * i for i in self.channels[:-1] for _ in range(2)] + self.fc.fan_ins()

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
    # Random scaling (Lv et al. 2017): the function is f(c ⊙ θ) for these per-coordinate c, each
    # [B, *shape]; None = c = 1.
    scales: Optional[list[Tensor]] = None

    @property
    def params(self) -> list[Tensor]:
        return self.init

    @property
    def groups(self) -> dict[str, list[int]] | None:
        return self.model.groups()

    def minibatch(self, step: int) -> Tensor:
        """Indices ``[B, batch_size]`` of step's minibatch per function (``draw_minibatch``)."""
        return draw_minibatch(self.seed, step, len(self.labels), self.batch_size, self.sampled_functions,
                              self.first_function, self.init[0].shape[0])

    def shard(self, index: int, count: int) -> "ClassificationProblem":
        part = shard_slice(self.init[0].shape[0], index, count)
        scales = None if self.scales is None else [c[part] for c in self.scales]
        return dataclasses.replace(self, init=[p[part] for p in self.init], scales=scales,
                                   first_function=self.first_function + part.start)

    def loss(self, params: list[Tensor], step: int) -> Tensor:
        if self.scales is not None:
            params = [p * c for p, c in zip(params, self.scales)]
        index = self.minibatch(step).to(self.labels.device)
        logits = self.model.logits(params, self.images[index])
        per_example = F.cross_entropy(logits.flatten(0, 1), self.labels[index].flatten(), reduction="none")
        return per_example.view(index.shape).mean(1)


class ClassificationTask(Task):
    """Train a classifier from a random initialisation (``init``, one of ``INITS``; "paper" draws
    N(0, init_std²), 0.01 as the paper's published code) on minibatches of ``batch_size`` examples.

    ``data`` is ``"mnist5k"`` (embedded, the default), ``"digits"`` (embedded) or a loader name with
    ``data_dir``. Functions of each split draw their minibatches from that split's images only
    (``load_splits``). ``param_scale`` = λ > 0 makes training functions (not validation or test ones)
    f(c ⊙ θ) with c = exp(U(−λ, λ)) per coordinate and θ₀ divided by c, so each starts where the unscaled
    function would: Lv et al. (2017)'s random scaling, which trains the optimizer for gradients and
    curvatures of other scales than the task's own.
    """

    preprocess_p = 10.0
    output_scale = 0.1
    # Sized so meta-training takes minutes, not hours, on a 2-core CPU (the shipped nets' recipe).
    train_defaults = {"batch_size": 32, "epochs": 12, "iterations_per_epoch": 10, "lr": 2e-3, "val_functions": 128}
    # Every baseline is tuned on the full grid for each variant and initialisation: 84 runs of 100 steps on
    # MNIST per table row, which is what sets the tuning functions' count on 2 cores.
    eval_defaults = {"test_functions": 64, "tune_functions": 16}

    def __init__(self, data: str = DEFAULT_DATA, data_dir: Optional[str] = None, batch_size: int = 128,
                 init: str = "paper", init_std: float = 0.01, param_scale: float = 0.0) -> None:
        if init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
        if not param_scale >= 0:
            raise ValueError(f"param_scale must be >= 0, got {param_scale}")
        self.splits: dict[str, Dataset] = load_splits(data, data_dir)
        self.dataset = self.splits["train"]
        self.batch_size, self.init, self.init_std, self.param_scale = batch_size, init, init_std, param_scale
        self.model = self.build_model()

    def build_model(self):
        raise NotImplementedError

    @property
    def groups(self) -> tuple[str, ...] | None:
        """The model's parameter groups that get their own net (the conv net's "conv" and "fc")."""
        groups = self.model.groups()
        return None if groups is None else tuple(groups)

    def sample(self, n_functions: int, generator: torch.Generator, split: str = "train") -> ClassificationProblem:
        check_split(split)
        init = self._init(n_functions, generator)
        seed = int(torch.randint(2**62, (), generator=generator))
        scales = None
        if split == "train" and self.param_scale > 0:
            scales, init = random_scales(init, self.param_scale, generator)
        data = self.splits[split]
        return ClassificationProblem(images=data.images, labels=data.labels, init=init, model=self.model,
                                     batch_size=self.batch_size, seed=seed, sampled_functions=n_functions,
                                     scales=scales)

    def _init(self, n: int, generator: torch.Generator) -> list[Tensor]:
        shapes, fan_ins = self.model.shapes(), self.model.fan_ins()
        paper = [self.init_std * torch.randn(n, *shape, generator=generator) for shape in shapes]
        if self.init == "paper":
            return paper
        torch_default = [(2 * torch.rand(n, *shape, generator=generator) - 1) / math.sqrt(fan_in)
                         for shape, fan_in in zip(shapes, fan_ins)]
        if self.init == "torch":
            return torch_default
        use_torch = torch.rand(n, generator=generator) < 0.5
        return [torch.where(use_torch.view(-1, *[1] * len(shape)), t, p)
                for p, t, shape in zip(paper, torch_default, shapes)]

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
    eval_defaults = {"test_functions": 32, "tune_functions": 8}

    def __init__(self, channels: Optional[tuple[int, ...]] = None, fc_hidden: int = 32, batch_size: int = 32,
                 **options) -> None:
        self.channels, self.fc_hidden = channels, fc_hidden
        super().__init__(batch_size=batch_size, **options)

    def build_model(self) -> BatchedConvNet:
        shape = self.dataset.image_shape
        channels = self.channels or ((16, 16) if shape[1] <= 8 else (16, 16, 16))
        return BatchedConvNet(shape, tuple(channels), self.fc_hidden, self.dataset.classes)
