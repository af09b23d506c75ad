"""Held-out comparison of a learned optimizer with the tuned baselines: table, JSON, plot."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..optim import L2LOptimizer
from .baselines import BASELINES, baseline_losses, optimizer_losses, tune
from ..net import Nets
from .nets import l2l_param_groups
from .tasks import Task
from .unroll import learned_losses

LEARNED = "LSTM (learned)"
LEARNED_BF16 = "LSTM (learned), bf16 state"


@dataclass
class Run:
    name: str
    lr: float | None  # tuned learning rate; None for the learned optimizer
    losses: torch.Tensor  # [steps + 1, functions]

    def summary(self) -> dict:
        final = self.losses[-1]
        return {
            "lr": self.lr,
            "final_mean": final.mean().item(),
            "final_median": final.median().item(),
            "trajectory_mean": self.losses[1:].mean().item(),
        }


def evaluate(
    net: Nets,
    task: Task,
    steps: int,
    test_functions: int,
    test_seed: int,
    tune_functions: int,
    tune_seed: int,
    backend: str = "auto",
    device="cpu",
) -> list[Run]:
    """The learned optimizer (float32 state, and bfloat16 state through ``L2LOptimizer(state_dtype=...)``)
    and every baseline (tuned on separate functions) on the same test functions."""
    test = task.sample(test_functions, torch.Generator().manual_seed(test_seed), "test").to(device)
    net = net.to(device)
    bf16 = optimizer_losses(lambda ps: L2LOptimizer(l2l_param_groups(net, ps, test.groups), backend=backend,
                                                    state_dtype=torch.bfloat16), test, steps)
    runs = [Run(LEARNED, None, learned_losses(net, test, steps, backend).cpu()), Run(LEARNED_BF16, None, bf16.cpu())]
    for name in BASELINES:
        lr, _ = tune(name, task, steps, tune_functions, tune_seed, device=device)
        runs.append(Run(name, lr, baseline_losses(name, lr, test, steps).cpu()))
    return runs


def table(runs: list[Run], steps: int) -> str:
    """Markdown table: mean and median loss at the last step, mean over the trajectory, tuned lr."""
    lines = [
        f"| optimizer | lr (tuned) | mean loss @ {steps} | median loss @ {steps} | mean loss, steps 1-{steps} |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        s = run.summary()
        lr = "-" if s["lr"] is None else f"{s['lr']:.3g}"
        lines.append(
            f"| {run.name} | {lr} | {s['final_mean']:.4g} | {s['final_median']:.4g} | {s['trajectory_mean']:.4g} |"
        )
    return "\n".join(lines)


def write_json(variants: dict[str, dict], path: str, **metadata) -> None:
    """``variants``: name → ``{"runs": [Run], ...}``; every other entry is written as it is."""
    payload = dict(metadata)
    payload["variants"] = {
        name: {**{k: v for k, v in entry.items() if k != "runs"},
               "optimizers": {run.name: {**run.summary(), "mean_loss_per_step": run.losses.mean(1).tolist()}
                              for run in entry["runs"]}}
        for name, entry in variants.items()
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def plot(runs: list[Run], path: str, title: str) -> None:
    """Mean loss per step on a log scale, as the paper's Figure 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        label = run.name if run.lr is None else f"{run.name} (lr {run.lr:.3g})"
        ax.plot(run.losses.mean(1).numpy(), label=label, linewidth=2 if run.lr is None else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
