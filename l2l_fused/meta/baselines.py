"""Hand-designed baselines (SGD, RMSprop, Adam, NAG) with learning rates tuned on a log grid."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .tasks import Problem, Task

BASELINES: dict[str, Callable[[list[Tensor], float], torch.optim.Optimizer]] = {
    "SGD": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "RMSprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "Adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "NAG": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
}


def lr_grid(low: float = 1e-4, high: float = 10.0, per_decade: int = 4) -> list[float]:
    """Log-spaced learning rates from ``low`` to ``high``, ``per_decade`` per factor of ten."""
    n = round(math.log10(high / low) * per_decade)
    return [low * 10 ** (k / per_decade) for k in range(n + 1)]


def optimize(make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer], problem: Problem,
             steps: int) -> tuple[Tensor, list[Tensor]]:
    """Losses ``[steps + 1, B]`` (step 0 = initial) of a ``torch.optim`` optimizer on a batch of functions,
    and the parameters it ends at.

    The optimizers here are coordinatewise, so stepping on the summed loss of B functions optimizes each
    one independently, exactly as if it ran alone.
    """
    params = [p.detach().clone().requires_grad_() for p in problem.params]
    optimizer = make_optimizer(params)
    losses = []
    for step in range(steps + 1):
        loss = problem.loss(params, step)
        losses.append(loss.detach())
        if step == steps:
            break
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
    return torch.stack(losses), [p.detach() for p in params]


def optimizer_losses(make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer], problem: Problem, steps: int) -> Tensor:
    """:func:`optimize`'s losses."""
    return optimize(make_optimizer, problem, steps)[0]


def baseline_losses(name: str, lr: float, problem: Problem, steps: int) -> Tensor:
    return optimizer_losses(lambda params: BASELINES[name](params, lr), problem, steps)


def final_score(losses: Tensor) -> float:
    """What tuning minimizes: the mean final loss, with a diverged run (NaN/inf) counting as worst."""
    value = losses[-1].mean().item()
    return value if math.isfinite(value) else math.inf


def tune(name: str, task: Task, steps: int, n_functions: int, seed: int, grid: list[float] | None = None,
         device="cpu") -> tuple[float, dict[float, float]]:
    """The learning rate on ``grid`` with the lowest mean final loss on ``n_functions`` tuning functions
    drawn from ``seed`` (kept apart from training, validation and test seeds) on the validation data, as the
    learned optimizer's φ is chosen. Returns ``(lr, scores)``."""
    problem = task.sample(n_functions, torch.Generator().manual_seed(seed), "val").to(device)
    scores = {lr: final_score(baseline_losses(name, lr, problem, steps)) for lr in grid or lr_grid()}
    best = min(scores, key=scores.get)
    if not math.isfinite(scores[best]):
        raise RuntimeError(f"{name}: every learning rate on the grid diverged")
    return best, scores
