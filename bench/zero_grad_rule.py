"""What the zero-gradient rule does to the shipped optimizers' results.

``L2LOptimizer`` leaves a coordinate whose gradient is exactly zero where it is (state kept, no learned
update); meta-training and ``net(...)`` step every coordinate, as the paper does. This runs each shipped net
on its task's held-out functions (the seeds ``python -m l2l_fused evaluate --pretrained`` uses) both ways:
through the net (every coordinate steps) and through ``L2LOptimizer`` (the rule), and reports the mean
losses, how many coordinate updates saw an exactly zero gradient, and how far those coordinates moved
without the rule. Writes ``bench/results/zero-grad-rule-<date>-<commit>.json``.

    python bench/zero_grad_rule.py [--functions 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import device_info  # noqa: E402
from l2l_fused import L2LOptimizer, pretrained  # noqa: E402
from l2l_fused.meta import TrainConfig  # noqa: E402
from l2l_fused.meta.baselines import optimizer_losses  # noqa: E402
from l2l_fused.meta.nets import l2l_param_groups  # noqa: E402
from l2l_fused.meta.unroll import Trajectory  # noqa: E402
from l2l_fused.cli import TASKS  # noqa: E402

TEST_SEED = TrainConfig.seed + 3  # what evaluate uses for the held-out functions


def _through_net(net, problem, steps):
    """Losses ``[steps + 1, B]`` stepping every coordinate; also the zero-gradient count and drift."""
    trajectory = Trajectory(net, problem)
    losses, zeros, total = [trajectory.initial_loss.detach()], 0, 0
    start = [t.clone() for t in trajectory.thetas]
    never = [torch.ones_like(t, dtype=torch.bool) for t in trajectory.thetas]  # zero gradient at every step
    with torch.no_grad():
        for _ in range(steps):
            for k, g in enumerate(trajectory.grads):
                zeros += int((g == 0).sum())
                total += g.numel()
                never[k] &= g == 0
            losses.append(trajectory.advance(1)[0])
    drift = [(t - s).abs()[m] for t, s, m in zip(trajectory.thetas, start, never)]
    moved = torch.cat(drift) if drift else torch.zeros(0)
    return torch.stack(losses), zeros / total, int(moved.numel()), (moved.max().item() if moved.numel() else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--functions", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in ("quadratic", "mlp", "conv"):
        net = pretrained(name)
        for variant, (options, variant_steps) in TASKS[name].variants.items():
            task = TASKS[name](**options)
            steps = variant_steps or TrainConfig.steps
            problem = task.sample(args.functions, torch.Generator().manual_seed(TEST_SEED))
            plain, zero_fraction, never_count, never_drift = _through_net(net, problem, steps)
            rule = optimizer_losses(lambda ps: L2LOptimizer(l2l_param_groups(net, ps, problem.groups)), problem, steps)
            row = {"net": name, "variant": variant, "steps": steps, "functions": args.functions,
                   "zero_gradient_fraction": zero_fraction, "coordinates_never_given_a_gradient": never_count,
                   "their_largest_drift_without_the_rule": never_drift,
                   "final_mean_every_coordinate_steps": plain[-1].mean().item(),
                   "final_mean_zero_rule": rule[-1].mean().item(),
                   "trajectory_mean_every_coordinate_steps": plain[1:].mean().item(),
                   "trajectory_mean_zero_rule": rule[1:].mean().item()}
            rows.append(row)
            print(json.dumps(row))
    info = device_info(torch.device("cpu"))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"zero-grad-rule-cpu-{info['date'][:10]}-{info['commit']}.json")
    with open(path, "w") as f:
        json.dump({**info, "command": "python bench/zero_grad_rule.py", "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
