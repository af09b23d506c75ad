"""The held-out suite: models and data the general optimizer never met in meta-training, each run as a user
would run it, against AdamW at its default learning rate and AdamW tuned on separate functions.

Every family here differs from the training mixture (:mod:`l2l_fused.meta.general`, MLPs and CNNs on
14×14 MNIST, transformers on CPython's documentation) in its data, and most in the model too: the 8×8
digits, the breast-cancer table and CPython's source are never trained on; a 256-wide layer, a linear
model, an autoencoder's squared error and a 4-head 48-wide transformer are not in the mixture.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..net import LSTMOptimizerNet
from ..optim import L2LOptimizer
from .baselines import lr_grid, optimize
from .models import MLP, SmallCNN, TinyTransformerLM
from .modules import Family
from .text import VOCAB

SUITE: dict[str, Family] = {
    "relu-mlp-256/digits": Family("relu-mlp-256", functools.partial(MLP, 64, (256,), 10, "relu"), "digits"),
    "cnn-bn/digits": Family("cnn-bn", functools.partial(SmallCNN, (1, 8, 8), (16, 32), 10, True), "digits"),
    "cnn/digits": Family("cnn", functools.partial(SmallCNN, (1, 8, 8), (16, 32), 10, False), "digits"),
    "transformer/python-source": Family(
        "transformer-w48-l2", functools.partial(TinyTransformerLM, len(VOCAB), 48, 2, 4, 32), "python-source",
        "next-token", batch_size=8),
    "logistic/breast-cancer": Family("logistic", functools.partial(MLP, 30, (), 2), "breast-cancer"),
    "autoencoder/digits": Family("autoencoder", functools.partial(MLP, 64, (32,), 64, "tanh"), "digits",
                                 "reconstruct"),
}
STEPS = 200
LAST = 10  # "final loss": the mean of the last LAST losses, which a single noisy minibatch does not decide
ADAMW_LR = 1e-3  # torch.optim.AdamW's default
ADAMW_GRID = lr_grid(1e-4, 1e-1, per_decade=2)
TEST_FUNCTIONS, TUNE_FUNCTIONS = 8, 4  # per problem: sized so the suite takes minutes on 2 cores
WITHIN = 1.2  # the target: final loss within 1.2× of AdamW at its default lr
BOUND = 4.0  # how far beyond AdamW's largest |θ| a run may end before it counts as blown up (``targets``)


def final_loss(losses: Tensor) -> float:
    """Mean over functions of the mean of the last ``LAST`` losses; a diverged run (NaN, inf) is inf."""
    value = losses[-LAST:].mean().item()
    return value if math.isfinite(value) else math.inf


@dataclass
class SuiteRun:
    name: str
    lr: float  # AdamW's learning rate, or the learned optimizer's multiplier
    losses: Tensor  # [steps + 1, functions]
    max_abs: float  # the largest |θ| at the end, over every function's parameters

    def summary(self) -> dict:
        return {"lr": self.lr, "initial": self.losses[0].mean().item(), "final": final_loss(self.losses),
                "max_abs_param": self.max_abs, "mean_loss_per_step": self.losses.mean(1).tolist()}


def _label(run: SuiteRun) -> str:
    """A run's name with the learning rate that tells AdamW's two runs apart."""
    return {"AdamW": f"AdamW (lr {run.lr:g})", "AdamW (tuned)": f"AdamW (tuned, lr {run.lr:.3g})"}.get(run.name, run.name)


def _run(name: str, lr: float, make_optimizer, problem, steps: int) -> SuiteRun:
    losses, params = optimize(make_optimizer, problem, steps)
    max_abs = max(p.abs().max().item() for p in params)
    return SuiteRun(name, lr, losses, max_abs if math.isfinite(max_abs) else math.inf)


def tune_adamw(family: Family, steps: int, n_functions: int, seed: int) -> tuple[float, dict[float, float]]:
    """AdamW's learning rate on ``ADAMW_GRID`` with the lowest final loss on functions of the validation data."""
    problem = family.sample(n_functions, torch.Generator().manual_seed(seed), "val")
    scores = {lr: final_loss(optimize(lambda ps: torch.optim.AdamW(ps, lr=lr), problem, steps)[0])
              for lr in ADAMW_GRID}
    return min(scores, key=scores.get), scores


def targets(learned: SuiteRun, adamw: SuiteRun, tuned: SuiteRun) -> dict:
    """The issue's targets for one learned run against AdamW at its default lr. Bounded: no |θ| beyond
    ``BOUND`` times the largest that either AdamW reached (or 1): room for a faster optimizer to go further,
    none for one that blows up (the mlp net's 8.2 on the CNN without batch norm, where AdamW stays near 1)."""
    summary = learned.summary()
    bounded = learned.max_abs <= BOUND * max(adamw.max_abs, tuned.max_abs, 1.0)
    no_divergence = math.isfinite(summary["final"]) and summary["final"] < summary["initial"] and bounded
    ratio = summary["final"] / adamw.summary()["final"]
    return {"no_divergence": no_divergence, "bounded": bounded, "ratio_to_adamw": ratio,
            "within": ratio <= WITHIN, "better": ratio < 1.0}


def evaluate_family(family: Family, nets: dict[str, LSTMOptimizerNet], lrs: list[float], steps: int,
                    test_functions: int, tune_functions: int, seed: int, backend: str = "auto") -> dict:
    """Each net at each ``lrs`` multiplier (through ``L2LOptimizer``, as a user runs it), AdamW at its
    default lr and AdamW tuned on ``tune_functions`` validation functions (seed + 2), all on the same
    ``test_functions`` test functions (seed + 3)."""
    test = family.sample(test_functions, torch.Generator().manual_seed(seed + 3), "test")
    adamw = _run("AdamW", ADAMW_LR, lambda ps: torch.optim.AdamW(ps, lr=ADAMW_LR), test, steps)
    tuned_lr, scores = tune_adamw(family, steps, tune_functions, seed + 2)
    tuned = _run("AdamW (tuned)", tuned_lr, lambda ps: torch.optim.AdamW(ps, lr=tuned_lr), test, steps)
    learned = [_run(f"{name}" + ("" if lr == 1.0 else f" (lr {lr:g})"), lr,
                    lambda ps, net=net, lr=lr: L2LOptimizer(ps, net=net, lr=lr, backend=backend), test, steps)
               for name, net in nets.items() for lr in lrs]
    return {"family": family.name, "data": family.data, "objective": family.objective,
            "parameters": family.parameter_count(), "adamw_tuning": scores,
            "runs": [*learned, adamw, tuned], "targets": {run.name: targets(run, adamw, tuned) for run in learned}}


def evaluate_suite(nets: dict[str, LSTMOptimizerNet], lrs: list[float] = (1.0,), steps: int = STEPS,
                   test_functions: int = TEST_FUNCTIONS, tune_functions: int = TUNE_FUNCTIONS, seed: int = 0,
                   backend: str = "auto", problems: list[str] | None = None, log=print) -> dict[str, dict]:
    """:func:`evaluate_family` on each of ``problems`` (default: the whole ``SUITE``), each net at each
    multiplier in ``lrs``; ``log`` gets each problem's table as it finishes."""
    for name, net in nets.items():
        if not isinstance(net, LSTMOptimizerNet):
            raise TypeError(f"net {name!r}: the suite runs one LSTMOptimizerNet on every parameter, got "
                            f"{type(net).__name__} (a per-layer ModuleDict needs its model's layer split)")
    unknown = sorted(set(problems or ()) - set(SUITE))
    if unknown:
        raise ValueError(f"problems must be among {list(SUITE)}, got {unknown}")
    results = {}
    for name in problems or SUITE:
        results[name] = evaluate_family(SUITE[name], nets, list(lrs), steps, test_functions, tune_functions, seed,
                                        backend)
        log(f"\n{name}\n{table({name: results[name]})}")
    return results


def table(results: dict[str, dict]) -> str:
    """Markdown: per problem and learned run, its final loss beside AdamW's, the ratio, tuned AdamW, the
    largest |θ|, and which targets it meets."""
    lines = ["| problem | optimizer | initial | final (mean of last 10) | × AdamW 1e-3 | max abs param | targets |",
             "|---|---|---|---|---|---|---|"]
    for problem, entry in results.items():
        for run in entry["runs"]:
            s = run.summary()
            t = entry["targets"].get(run.name)
            ratio = "" if t is None else f"{t['ratio_to_adamw']:.2f}"
            verdict = "" if t is None else ", ".join(
                [("no divergence" if t["no_divergence"] else "**diverges**"),
                 ("within 1.2×" if t["within"] else "**not within 1.2×**"), ("better" if t["better"] else "worse")])
            lines.append(f"| {problem} | {_label(run)} | {s['initial']:.4g} | {s['final']:.4g} | {ratio} | "
                         f"{s['max_abs_param']:.3g} | {verdict} |")
    return "\n".join(lines)


def write_json(results: dict[str, dict], path: str, **metadata) -> None:
    payload = {**metadata, "problems": {
        name: {**{k: v for k, v in entry.items() if k not in ("runs", "adamw_tuning")},
               "adamw_tuning": {f"{lr:.3g}": score for lr, score in entry["adamw_tuning"].items()},
               "optimizers": {run.name: run.summary() for run in entry["runs"]}}
        for name, entry in results.items()}}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def plot(results: dict[str, dict], path: str) -> None:
    """Mean loss per step of every run, one panel per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, (name, entry) in zip(axes.flat, results.items()):
        for run in entry["runs"]:
            ax.plot(run.losses.mean(1).numpy(), label=_label(run), linewidth=2 if "AdamW" not in run.name else 1)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
