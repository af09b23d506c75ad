"""Command line: ``python -m l2l_fused {run,train,evaluate}``.

``run`` is the main job: meta-train on a task, then compare with the tuned baselines on held-out
functions. Seeds: training functions from ``seed``, validation ``seed + 1``, baseline tuning ``seed + 2``,
test ``seed + 3``; the net's initial weights from ``seed``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, fields

import torch

from .meta import TASKS, MetaTrainer, TrainConfig, load_best_net
from .meta.evaluate import evaluate, plot, table, write_json
from .net import LSTMOptimizerNet


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2l-fused", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "meta-train, then evaluate against tuned baselines (the main job)"),
        ("train", "meta-train only"),
        ("evaluate", "evaluate a checkpoint's best net against tuned baselines"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--task", choices=sorted(TASKS), default="quadratic")
        p.add_argument("--out", default=None, help="output directory (default runs/<task>)")
        p.add_argument("--backend", default="auto")
        p.add_argument("--device", default="cpu", help="where the functions and the optimizer run (cpu, cuda)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--test-functions", type=int, default=512)
        p.add_argument("--tune-functions", type=int, default=512)
        if name == "evaluate":
            p.add_argument("--checkpoint", default=None, help="default <out>/checkpoint.pt")
            p.add_argument("--seed", type=int, default=TrainConfig.seed)
            p.add_argument("--steps", type=int, default=TrainConfig.steps)
        else:
            p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if present")
            for f in fields(TrainConfig):
                flag = "--" + f.name.replace("_", "-")
                kind = float if f.name in ("lr", "grad_clip") else int
                p.add_argument(flag, type=kind, default=f.default, help=f"(default {f.default})")
    return parser


def _train(args, out: str) -> str:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    task = TASKS[args.task]()
    torch.manual_seed(config.seed)
    net = LSTMOptimizerNet(**task.net_options())
    trainer = MetaTrainer(net, task, config, backend=args.backend, device=args.device)
    checkpoint = os.path.join(out, "checkpoint.pt")
    if args.resume and os.path.exists(checkpoint):
        trainer.load(checkpoint)
        print(f"resumed {checkpoint} at epoch {trainer.state.epoch}")
    start = time.perf_counter()
    state = trainer.train(checkpoint_path=checkpoint, progress=not args.no_progress)
    print(f"meta-training: {time.perf_counter() - start:.1f} s; best validation loss {state.best_val:.4g} "
          f"at epoch {state.best_epoch}; checkpoint {checkpoint}")
    return checkpoint


def _evaluate(args, out: str, checkpoint: str, seed: int, steps: int, extra: dict) -> None:
    task = TASKS[args.task]()
    net = load_best_net(checkpoint)
    start = time.perf_counter()
    runs = evaluate(net, task, steps, args.test_functions, seed + 3, args.tune_functions, seed + 2, args.backend,
                    args.device)
    elapsed = time.perf_counter() - start
    text = table(runs, steps)
    print(f"\n{task.name}: {args.test_functions} held-out functions, {steps} steps\n{text}")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    write_json(
        runs, os.path.join(out, "results.json"), task=task.name, steps=steps, test_functions=args.test_functions,
        tune_functions=args.tune_functions, seed=seed, checkpoint=checkpoint, evaluate_seconds=elapsed,
        backend=args.backend, device=args.device, torch=torch.__version__, machine=platform.machine(),
        processor=platform.processor(),
        cpu_count=os.cpu_count(), **extra,
    )
    plot(runs, os.path.join(out, "loss.png"), f"{task.name}: mean loss over {args.test_functions} test functions")
    print(f"wrote {out}/table.md, results.json, loss.png")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = args.out or os.path.join("runs", args.task)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    if args.command == "evaluate":
        checkpoint = args.checkpoint or os.path.join(out, "checkpoint.pt")
        _evaluate(args, out, checkpoint, args.seed, args.steps, {})
    else:
        checkpoint = _train(args, out)
        if args.command == "run":
            config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
            _evaluate(args, out, checkpoint, args.seed, args.steps, {"train_config": asdict(config)})
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
