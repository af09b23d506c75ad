"""What the fast arithmetic mode changes in the learned optimizer's results: each shipped net on held-out
functions of its task (the evaluate command's test functions, seed 0, fewer of them), stepped by the
Triton forward in exact and in fast mode from the same start, side by side.

Without a GPU the Triton kernels run in Triton's interpreter (set here): the fast mode's TF32 products
are exactly the GPU's (the operands' truncation is emulated), its ``tanh.approx`` is not (the interpreter
computes the formula exactly), so this measures the products' effect, the larger of the two errors
(2⁻¹⁰ against 2⁻¹¹; docs/kernels.md, "Arithmetic modes").

    python bench/precision_effect.py --out bench/results/precision-effect-cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before l2l_fused imports triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, write_results  # noqa: E402

from l2l_fused import pretrained  # noqa: E402
from l2l_fused.meta import TASKS, TrainConfig  # noqa: E402
from l2l_fused.meta.unroll import learned_losses  # noqa: E402

# held-out functions per task: the interpreter takes ~0.1 s per block of 128 coordinates
FUNCTIONS = {"quadratic": 128, "mlp": 2, "conv": 1}
MODES = {"exact": "highest", "fast": "high"}  # precision=None follows torch.get_float32_matmul_precision()


def effect(name: str, functions: int, steps: int, device: torch.device) -> dict:
    task = TASKS[name]()
    test = task.sample(functions, torch.Generator().manual_seed(0 + 3)).to(device)  # evaluate's test seed
    net = pretrained(name).to(device)
    before = torch.get_float32_matmul_precision()
    losses, seconds = {}, {}
    try:
        for mode, setting in MODES.items():
            torch.set_float32_matmul_precision(setting)
            start = time.perf_counter()
            losses[mode] = learned_losses(net, test, steps, backend="triton").double().cpu()
            seconds[mode] = time.perf_counter() - start
    finally:
        torch.set_float32_matmul_precision(before)
    row = {"task": name, "functions": functions, "steps": steps, "seconds": seconds}
    for mode, loss in losses.items():
        row[mode] = {"final_mean": loss[-1].mean().item(), "trajectory_mean": loss[1:].mean().item()}
    for key in ("final_mean", "trajectory_mean"):
        row[f"fast_vs_exact_{key}"] = row["fast"][key] / row["exact"][key] - 1
    final = losses["fast"][-1] / losses["exact"][-1] - 1  # per function
    row["functions_final_loss_within_1pct"] = (final.abs() <= 0.01).double().mean().item()
    print(f"{name:>9}: {functions} functions, {steps} steps; final mean exact {row['exact']['final_mean']:.5g} fast "
          f"{row['fast']['final_mean']:.5g} ({row['fast_vs_exact_final_mean']:+.3%}); trajectory mean "
          f"{row['fast_vs_exact_trajectory_mean']:+.3%}; functions whose final loss moved ≤ 1%: "
          f"{row['functions_final_loss_within_1pct']:.0%} ({seconds['exact']:.0f} s + {seconds['fast']:.0f} s)", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=list(FUNCTIONS))
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [effect(name, FUNCTIONS[name], args.steps, device) for name in args.tasks]
    if args.out:
        write_results(args.out, {**device_info(device), "command": "python bench/precision_effect.py",
                                 "interpreted": os.environ.get("TRITON_INTERPRET") == "1", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
