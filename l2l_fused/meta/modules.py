"""Optimizees that are ordinary ``nn.Module``s: B copies of one module, each with its own initialisation
and minibatches, run as one batched call (``torch.func.vmap`` over ``functional_call``), so a batch of
functions costs a few kernel calls, not B. :class:`Family` names a module, its data and its loss;
:class:`CompositeProblem` runs several families' batches as one problem (a mixture in every batch).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .data import SPLITS, check_split, load_splits, split_bounds
from .tasks import Problem, draw_minibatch, random_scales, shard_slice
from .text import CORPORA, corpus_splits

OBJECTIVES = ("classify", "reconstruct", "next-token")


def _pooled_mnist() -> dict[str, tuple[Tensor, Tensor]]:
    """The 5,000 MNIST digits at 14×14 (2×2 average pooling): a quarter of the coordinates per input weight."""
    return {s: (F.avg_pool2d(d.images, 2), d.labels) for s, d in load_splits("mnist5k").items()}


def _breast_cancer() -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's Wisconsin breast-cancer table (569 × 30, two classes), split 60/20/20 by a fixed
    permutation and standardised by the training rows' mean and deviation."""
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer()
    x, y = torch.from_numpy(table.data).float(), torch.from_numpy(table.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    parts = {s: order[a:b] for s, (a, b) in zip(SPLITS, split_bounds(len(y)))}
    mean, std = x[parts["train"]].mean(0), x[parts["train"]].std(0)
    return {s: ((x[i] - mean) / std, y[i]) for s, i in parts.items()}


# Per split: (inputs, targets) for tables and images; (tokens, None) for text.
DATA: dict[str, Callable[[], dict[str, tuple[Tensor, Optional[Tensor]]]]] = {
    "mnist5k-14": _pooled_mnist,
    "digits": lambda: {s: (d.images, d.labels) for s, d in load_splits("digits").items()},
    "breast-cancer": _breast_cancer,
    **{name: functools.partial(lambda n: {s: (t, None) for s, t in corpus_splits(n).items()}, name) for name in CORPORA},
}


@functools.lru_cache(maxsize=None)
def load_data(name: str) -> dict[str, tuple[Tensor, Optional[Tensor]]]:
    if name not in DATA:
        raise ValueError(f"data must be one of {list(DATA)}, got {name!r}")
    return DATA[name]()


@dataclass
class ModuleProblem(Problem):
    """B copies of ``model`` (a template on the meta device; its parameters come from ``init``)."""

    model: nn.Module
    names: list[str]  # the model's parameter names, in the order of init
    init: list[Tensor]  # each [B, *shape]
    inputs: Tensor  # the split's examples [N, ...], or its tokens [N]
    targets: Optional[Tensor]  # [N] labels; None for "reconstruct" and "next-token"
    objective: str  # one of OBJECTIVES
    batch_size: int  # examples (or sequences) per minibatch
    context: int  # tokens per sequence ("next-token")
    seed: int  # step t's minibatches come from seed + t
    sampled_functions: int
    first_function: int = 0
    scales: Optional[list[Tensor]] = None  # random parameter scaling c: the function is f(c ⊙ θ)
    loss_scales: Optional[Tensor] = None  # [B]: the function is s·f

    @property
    def params(self) -> list[Tensor]:
        return self.init

    def shard(self, index: int, count: int) -> "ModuleProblem":
        part = shard_slice(self.init[0].shape[0], index, count)
        return dataclasses.replace(
            self, init=[p[part] for p in self.init], first_function=self.first_function + part.start,
            scales=None if self.scales is None else [c[part] for c in self.scales],
            loss_scales=None if self.loss_scales is None else self.loss_scales[part])

    def minibatch(self, step: int) -> tuple[Tensor, Optional[Tensor]]:
        """Step's ``(inputs [B, M, ...], targets)`` per function."""
        n = self.init[0].shape[0]
        if self.objective == "next-token":
            starts = draw_minibatch(self.seed, step, len(self.inputs) - self.context, self.batch_size,
                                    self.sampled_functions, self.first_function, n).to(self.inputs.device)
            tokens = self.inputs[starts[..., None] + torch.arange(self.context + 1, device=starts.device)]
            return tokens[..., :-1], tokens[..., 1:]
        index = draw_minibatch(self.seed, step, len(self.inputs), self.batch_size, self.sampled_functions,
                               self.first_function, n).to(self.inputs.device)
        return self.inputs[index], None if self.targets is None else self.targets[index]

    def loss(self, params: list[Tensor], step: int) -> Tensor:
        if self.scales is not None:
            params = [p * c for p, c in zip(params, self.scales)]
        x, y = self.minibatch(step)

        def one(values: list[Tensor], inputs: Tensor) -> Tensor:
            return functional_call(self.model, dict(zip(self.names, values)), (inputs,))

        out = vmap(one)(params, x)
        b = out.shape[0]
        if self.objective == "reconstruct":
            losses = (out - x.flatten(2)).pow(2).flatten(1).mean(1)
        else:
            losses = F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="none").view(b, -1).mean(1)
        return losses if self.loss_scales is None else losses * self.loss_scales


@dataclass(frozen=True)
class Family:
    """A kind of optimizee: ``model()`` builds one copy with its default initialisation; ``data`` (a key of
    ``DATA``) and ``objective`` (one of ``OBJECTIVES``) say what it is trained on."""

    name: str
    model: Callable[[], nn.Module]
    data: str
    objective: str = "classify"
    batch_size: int = 32
    context: int = 32

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.data not in DATA:
            raise ValueError(f"data must be one of {list(DATA)}, got {self.data!r}")

    def sample(self, n_functions: int, generator: torch.Generator, split: str = "train", param_scale: float = 0.0,
               loss_scale: float = 0.0) -> ModuleProblem:
        """``n_functions`` copies initialised from a seed drawn with ``generator``, on ``split``'s data.
        ``param_scale`` = λ > 0: random parameter scaling (``random_scales``); ``loss_scale`` = μ > 0: each
        function's loss times exp(U(−μ, μ)). Both change the gradients' scale, not the function's minima."""
        check_split(split)
        seed = int(torch.randint(2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            copies = [self.model() for _ in range(n_functions)]
        if any(True for _ in copies[0].buffers()):
            raise ValueError(f"{self.name}: the model has buffers (running statistics?); copies run batched "
                             "and cannot share them: use track_running_stats=False")
        names = [name for name, _ in copies[0].named_parameters()]
        init = [torch.stack([dict(c.named_parameters())[name].detach() for c in copies]) for name in names]
        scales = loss_scales = None
        if param_scale > 0:
            scales, init = random_scales(init, param_scale, generator)
        if loss_scale > 0:
            loss_scales = torch.empty(n_functions).uniform_(-loss_scale, loss_scale, generator=generator).exp_()
        inputs, targets = load_data(self.data)[split]
        return ModuleProblem(model=copies[0].to("meta"), names=names, init=init, inputs=inputs, targets=targets,
                             objective=self.objective, batch_size=self.batch_size, context=self.context,
                             seed=int(torch.randint(2**62, (), generator=generator)), sampled_functions=n_functions,
                             scales=scales, loss_scales=loss_scales)

    def parameter_count(self) -> int:
        with torch.device("meta"):  # shapes only: no memory, and no draw from the global generator
            return sum(p.numel() for p in self.model().parameters())


@dataclass
class CompositeProblem(Problem):
    """Several problems' functions as one: their parameters side by side, their losses concatenated."""

    parts: list[Problem]

    @property
    def params(self) -> list[Tensor]:
        return [p for part in self.parts for p in part.params]

    def to(self, device) -> "CompositeProblem":
        return CompositeProblem([part.to(device) for part in self.parts])

    def shard(self, index: int, count: int) -> "CompositeProblem":
        return CompositeProblem([part.shard(index, count) for part in self.parts])

    def loss(self, params: list[Tensor], step: int) -> Tensor:
        losses, start = [], 0
        for part in self.parts:
            n = len(part.params)
            losses.append(part.loss(params[start:start + n], step))
            start += n
        return torch.cat(losses)
