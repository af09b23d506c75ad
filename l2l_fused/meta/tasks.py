"""Tasks: distributions over optimizee functions f that a learned optimizer is meta-trained on.

A task samples a batch of B independent functions at once as one :class:`Problem`. Its parameters carry a
leading batch dimension and ``loss`` returns one loss per function, so any coordinatewise optimizer
(the learned one, SGD, Adam, ...) run on the batch optimizes each function independently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..net import LSTMOptimizerNet


class Problem:
    """B sampled functions: their initial parameters and their losses. Subclasses are dataclasses whose
    tensor fields (tensors, or lists of them) describe the functions."""

    params: list[Tensor]  # initial values, each [B, ...], not requiring grad
    # Parameter groups that get their own optimizer net, as {name: indices into params}; None = one net.
    groups: dict[str, list[int]] | None = None

    def to(self, device) -> "Problem":
        """The same functions with every tensor field on ``device``."""
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                moved[f.name] = value.to(device)
            elif isinstance(value, list) and value and all(isinstance(v, Tensor) for v in value):
                moved[f.name] = [v.to(device) for v in value]
        return dataclasses.replace(self, **moved)

    def shard(self, index: int, count: int) -> "Problem":
        """Functions ``[index·B/count, (index+1)·B/count)`` of this batch, each exactly as it is here (the
        same losses and minibatches): one rank's share in data-parallel meta-training."""
        raise NotImplementedError

    def loss(self, params: list[Tensor], step: int) -> Tensor:
        """Per-function losses ``[B]`` at ``params`` (same shapes as ``self.params``) at optimization step
        ``step`` (tasks with minibatches draw step's batch; deterministic ones ignore it)."""
        raise NotImplementedError


class Task:
    """A distribution over functions, with the optimizer settings the paper used for it.

    ``variants`` names the related tasks the paper tested transfer on: constructor options, and the number
    of steps to run them for (None = the trained K). ``train_defaults`` and ``eval_defaults`` override the
    generic ``TrainConfig`` and evaluation sizes where a task needs others to finish on a laptop.
    """

    name: str
    preprocess_p: float | None
    output_scale: float
    groups: tuple[str, ...] | None = None  # names of the parameter groups with their own net; None = one net
    variants: dict[str, tuple[dict, int | None]] = {"base": ({}, None)}
    train_defaults: dict = {}
    eval_defaults: dict = {}

    def sample(self, n_functions: int, generator: torch.Generator, split: str = "train") -> Problem:
        """B functions drawn with ``generator`` (a CPU generator: a seed gives the same functions on any
        device; move them with ``Problem.to``). ``split`` is the data they are built from: ``"train"`` for
        meta-training, ``"val"`` for choosing φ and tuning baselines, ``"test"`` for reported results.
        Tasks without data (quadratics) draw every function fresh and ignore it."""
        raise NotImplementedError

    def net_options(self) -> dict:
        return {"preprocess_p": self.preprocess_p, "output_scale": self.output_scale}

    def make_net(self) -> nn.Module:
        """A freshly initialised optimizer for this task: one ``LSTMOptimizerNet``, or an ``nn.ModuleDict`` of
        them keyed by ``groups``."""
        if self.groups is None:
            return LSTMOptimizerNet(**self.net_options())
        return nn.ModuleDict({name: LSTMOptimizerNet(**self.net_options()) for name in self.groups})


def shard_slice(n: int, index: int, count: int) -> slice:
    if n % count:
        raise ValueError(f"a batch of {n} functions does not split evenly into {count} shards")
    size = n // count
    return slice(index * size, (index + 1) * size)


@dataclass
class QuadraticProblem(Problem):
    w: Tensor  # [B, d, d]
    y: Tensor  # [B, d]
    theta0: Tensor  # [B, d]

    @property
    def params(self) -> list[Tensor]:
        return [self.theta0]

    def shard(self, index: int, count: int) -> "QuadraticProblem":
        part = shard_slice(self.theta0.shape[0], index, count)
        return QuadraticProblem(w=self.w[part], y=self.y[part], theta0=self.theta0[part])

    def loss(self, params: list[Tensor], step: int) -> Tensor:
        (theta,) = params
        residual = torch.einsum("bij,bj->bi", self.w, theta) - self.y
        return residual.pow(2).sum(-1)


class QuadraticTask(Task):
    """``f(θ) = ‖Wθ − y‖²`` with W and y IID standard Gaussian (paper §3.1).

    θ starts at N(0, init_std²), as in the paper's published code (0.01). The paper feeds the raw gradient
    (no preprocessing) with output scale 1.
    """

    name = "quadratic"
    preprocess_p = None
    output_scale = 1.0

    def __init__(self, dim: int = 10, init_std: float = 0.01) -> None:
        self.dim = dim
        self.init_std = init_std

    def sample(self, n_functions: int, generator: torch.Generator, split: str = "train") -> QuadraticProblem:
        d = self.dim
        w = torch.randn(n_functions, d, d, generator=generator)
        y = torch.randn(n_functions, d, generator=generator)
        theta0 = self.init_std * torch.randn(n_functions, d, generator=generator)
        return QuadraticProblem(w=w, y=y, theta0=theta0)



def draw_minibatch(seed: int, step: int, high: int, size: int, sampled_functions: int, first_function: int,
                   n_functions: int) -> Tensor:
    """Step's minibatch, ``size`` indices in ``[0, high)`` (with replacement) per function, for functions
    ``[first_function, first_function + n_functions)`` of the ``sampled_functions`` drawn together: the same
    for every optimizer run on them, on any device, and after ``Problem.shard``."""
    generator = torch.Generator().manual_seed(seed + step)
    index = torch.randint(high, (sampled_functions, size), generator=generator)
    return index[first_function:first_function + n_functions]


def random_scales(init: list[Tensor], scale: float, generator: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    """Lv et al. (2017)'s random scaling: per coordinate c = exp(U(−λ, λ)), λ = ``scale``. Returns ``(c, θ₀ / c)``:
    the function becomes f(c ⊙ θ), started where the unscaled one would be."""
    scales = [torch.empty_like(p).uniform_(-scale, scale, generator=generator).exp_() for p in init]
    return scales, [p / c for p, c in zip(init, scales)]
