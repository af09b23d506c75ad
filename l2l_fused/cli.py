"""Command line: ``python -m l2l_fused {run,train,evaluate,export}``.

``run`` is the main job: meta-train on a task, then compare with the tuned baselines on held-out
functions. Seeds: training functions from ``seed``, validation ``seed + 1``, baseline tuning ``seed + 2``,
test ``seed + 3``; the net's initial weights from ``seed``. ``evaluate`` also runs the task's transfer
variants (``--variant``), each against baselines tuned on that variant. ``export`` writes a checkpoint's
best net as a small file for :func:`l2l_fused.pretrained`.

Under ``torchrun`` (``WORLD_SIZE`` > 1), ``train`` and ``run`` meta-train data-parallel: each rank unrolls its
share of every batch of functions (gloo on the CPU, NCCL with ``--device cuda``, a GPU per local rank);
rank 0 writes the checkpoint and runs the evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, fields

import torch

from .meta import SUITE, TASKS, ArtTask, ClassificationTask, GeneralTask, MetaTrainer, TrainConfig, load_best_net
from .meta import suite
from .meta.art import render
from .meta.classification import DEFAULT_DATA, INITS
from .meta.evaluate import evaluate, plot, table, write_json
from .pretrained_nets import PRETRAINED, export, load_net, pretrained

EVAL_DEFAULTS = {"test_functions": 512, "tune_functions": 512}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2l-fused", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "meta-train, then evaluate against tuned baselines (the main job)"),
        ("train", "meta-train only"),
        ("evaluate", "evaluate a checkpoint's best net (or a shipped one) against tuned baselines"),
        ("export", "write a checkpoint's best net as a pretrained-net file"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--task", choices=sorted(TASKS), default="quadratic")
        p.add_argument("--out", default=None, help="output directory (default runs/<task>)")
        if name == "export":
            p.add_argument("--to", default=None, help="the file to write (default l2l_fused/weights/<task>.pt)")
            continue
        p.add_argument("--data", default=None, help="mlp, conv: mnist5k (embedded, default; the extra "
                       "l2l_fused[mnist]), digits (embedded), mnist or cifar10 (files in --data-dir)")
        p.add_argument("--data-dir", default=None, help="directory holding the mnist or cifar10 files")
        if name == "evaluate":
            p.add_argument("--init", action="append", choices=INITS, default=None,
                           help="mlp, conv: the optimizees' initialisation, repeatable (default: paper and torch)")
        else:
            p.add_argument("--init", choices=INITS, default=None,
                           help="mlp, conv: the optimizees' initialisation (default paper; mixed = either per function)")
            p.add_argument("--param-scale", type=float, default=None,
                           help="mlp, conv, general: random scaling of training functions' parameters, "
                                "c = exp(U(-λ, λ)) (default 0; general 0.5)")
            p.add_argument("--loss-scale", type=float, default=None,
                           help="general: training functions' losses times exp(U(-μ, μ)) (default 2)")
            p.add_argument("--init-net", default=None,
                           help=f"start φ from a shipped net ({', '.join(PRETRAINED)}) or a file export wrote")
        p.add_argument("--backend", default="auto")
        p.add_argument("--device", default="cpu", help="where the functions and the optimizer run (cpu, cuda)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--test-functions", type=int, default=None, help="(default: per task, 512 or 256)")
        p.add_argument("--tune-functions", type=int, default=None, help="(default: per task, 512 or 128)")
        if name != "train":
            p.add_argument("--variant", action="append", default=None,
                           help="transfer variant to evaluate, repeatable (default: all of the task's; see README)")
            p.add_argument("--problem", action="append", choices=list(SUITE), default=None,
                           help="the held-out suite (evaluate --suite, run --task general): a problem to run, "
                                "repeatable (default all)")
        if name == "evaluate":
            p.add_argument("--suite", action="store_true",
                           help="the held-out suite: models and data no net was trained on, against AdamW")
            p.add_argument("--net", action="append", default=None,
                           help="--suite: a shipped net or a file export wrote, repeatable (default general)")
            p.add_argument("--lr", action="append", type=float, default=None,
                           help="--suite: the learned optimizer's lr multiplier, repeatable (default 1)")
            source = p.add_mutually_exclusive_group()
            source.add_argument("--checkpoint", default=None, help="default <out>/checkpoint.pt")
            source.add_argument("--pretrained", action="store_true", help="the net shipped for --task")
            p.add_argument("--seed", type=int, default=TrainConfig.seed)
            p.add_argument("--steps", type=int, default=None, help="default: the task's K (100)")
        else:
            p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if present")
            for f in fields(TrainConfig):
                flag = "--" + f.name.replace("_", "-")
                kind = {"lr": float, "grad_clip": float, "objective": str}.get(f.name, int)
                p.add_argument(flag, type=kind, default=None, help=f"(default {f.default}, unless the task sets one)")
    return parser


def _classification(args) -> bool:
    return issubclass(TASKS[args.task], ClassificationTask)


# The task options each kind of task takes from the command line.
_CLASSIFICATION_OPTIONS = ("data", "data_dir", "param_scale", "init")
_GENERAL_OPTIONS = ("param_scale", "loss_scale")


def _task_options(args) -> dict:
    """The task's options given on the command line (for evaluate, without its list of inits)."""
    given = {"data": args.data, "data_dir": args.data_dir, "param_scale": getattr(args, "param_scale", None),
             "loss_scale": getattr(args, "loss_scale", None), "init": args.init}
    options = {k: v for k, v in given.items() if v is not None}
    allowed = (_CLASSIFICATION_OPTIONS if _classification(args) else
               _GENERAL_OPTIONS if TASKS[args.task] is GeneralTask else ())
    refused = [k for k in options if k not in allowed]
    if refused:
        raise SystemExit(f"{', '.join('--' + k.replace('_', '-') for k in refused)}: not an option of the "
                         f"{args.task} task")
    if args.command == "evaluate":
        options.pop("init", None)  # evaluate's --init is a list: each is a separate evaluation (_inits)
    return options


def _task(args, variant_options: dict | None = None):
    return TASKS[args.task](**{**_task_options(args), **(variant_options or {})})


def _train_config(args, task) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    return TrainConfig(**{**task.train_defaults, **given})


def _train(args, out: str, task) -> tuple[str, TrainConfig]:
    config = _train_config(args, task)
    torch.manual_seed(config.seed)
    net = task.make_net()
    if args.init_net is not None:
        net.load_state_dict(load_net(args.init_net).state_dict())
    recipe = {**_task_options(args), "init_net": args.init_net}
    trainer = MetaTrainer(net, task, config, backend=args.backend, device=args.device,
                          recipe={k: v for k, v in recipe.items() if v is not None})
    checkpoint = os.path.join(out, "checkpoint.pt")
    if args.resume and os.path.exists(checkpoint):
        trainer.load(checkpoint)
        print(f"resumed {checkpoint} at epoch {trainer.state.epoch}")
    start = time.perf_counter()
    state = trainer.train(checkpoint_path=checkpoint, progress=not args.no_progress)
    if trainer.rank == 0:
        print(f"meta-training: {time.perf_counter() - start:.1f} s; best validation loss {state.best_val:.4g} "
              f"at epoch {state.best_epoch}; checkpoint {checkpoint}")
    return checkpoint, config


def _variants(args) -> list[str]:
    variants = TASKS[args.task].variants
    chosen = args.variant or list(variants)
    unknown = sorted(set(chosen) - set(variants))
    if unknown:
        raise SystemExit(f"--variant: {args.task} has variants {list(variants)}, not {unknown}")
    return chosen


def _inits(args) -> list[str | None]:
    """The optimizee initialisations to evaluate on: for the mlp and conv tasks, each one evaluate was given,
    else the paper's and PyTorch's default (whatever run trained on)."""
    if not _classification(args):
        return [None]
    return (args.init if args.command == "evaluate" else None) or ["paper", "torch"]


def _evaluate(args, out: str, net, source: str, seed: int, steps: int | None, extra: dict) -> None:
    variants, chosen = TASKS[args.task].variants, _variants(args)
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else TASKS[args.task].eval_defaults.get(k, v)
             for k, v in EVAL_DEFAULTS.items()}
    report, results = [], {}
    for init in _inits(args):
        for variant in chosen:
            options, variant_steps = variants[variant]
            task = _task(args, {**options, **({} if init is None else {"init": init})})
            k = variant_steps or steps or TrainConfig.steps
            start = time.perf_counter()
            runs = evaluate(net, task, k, sizes["test_functions"], seed + 3, sizes["tune_functions"], seed + 2,
                            args.backend, args.device)
            elapsed = time.perf_counter() - start
            text = table(runs, k)
            name = variant if init in (None, "paper") else f"{variant}-{init}"
            heading = (f"{task.name}, variant {variant}{'' if init is None else f', {init} init'}: "
                       f"{sizes['test_functions']} held-out functions, {k} steps")
            print(f"\n{heading} ({elapsed:.0f} s)\n{text}")
            report.append(f"### {heading}\n\n{text}\n")
            results[name] = {"steps": k, "init": init,
                             "options": {k_: list(v) if isinstance(v, tuple) else v for k_, v in options.items()},
                             "evaluate_seconds": elapsed, "runs": runs}
            plot(runs, os.path.join(out, "loss.png" if name == "base" else f"loss-{name}.png"),
                 f"{task.name} ({variant}{'' if init is None else f', {init} init'}): "
                 f"mean loss over {sizes['test_functions']} test functions")
            if isinstance(task, ArtTask):  # the pictures: what each optimizer made of the first test images
                render(task, net, runs, k, sizes["test_functions"], seed + 3,
                       os.path.join(out, "grid.png" if name == "base" else f"grid-{name}.png"),
                       backend=args.backend, device=args.device)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(report))
    write_json(
        results, os.path.join(out, "results.json"), task=args.task, data=args.data or (DEFAULT_DATA if _classification(args) else None),
        **sizes, seed=seed,
        net=source, backend=args.backend, device=args.device, torch=torch.__version__,
        machine=platform.machine(), processor=platform.processor(), cpu_count=os.cpu_count(), **extra,
    )
    print(f"wrote {out}/table.md, results.json, plots{', pictures' if TASKS[args.task] is ArtTask else ''}")


def _suite(args, out: str, nets: dict, extra: dict) -> None:
    """The held-out suite for ``nets``: table, JSON, plot."""
    sizes = {"test_functions": args.test_functions or suite.TEST_FUNCTIONS,
             "tune_functions": args.tune_functions or suite.TUNE_FUNCTIONS}
    # run's --seed and --steps are meta-training's: the suite keeps its own functions and 200 steps there.
    evaluating = args.command == "evaluate"
    lrs = (args.lr if evaluating else None) or [1.0]
    seed = args.seed if evaluating else TrainConfig.seed
    steps = (args.steps if evaluating else None) or suite.STEPS
    start = time.perf_counter()
    results = suite.evaluate_suite(nets, lrs, steps, sizes["test_functions"], sizes["tune_functions"], seed,
                                   args.backend, args.problem)
    elapsed = time.perf_counter() - start
    heading = (f"held-out suite: {sizes['test_functions']} test functions a problem, {steps} steps, AdamW tuned "
               f"on {sizes['tune_functions']} validation functions ({elapsed:.0f} s)")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"### {heading}\n\n{suite.table(results)}\n")
    suite.write_json(results, os.path.join(out, "results.json"), steps=steps, **sizes, seed=seed, lr_multipliers=lrs,
                     evaluate_seconds=elapsed, date=time.strftime("%Y-%m-%d"), backend=args.backend, torch=torch.__version__,
                     machine=platform.machine(), processor=platform.processor(), cpu_count=os.cpu_count(), **extra)
    suite.plot(results, os.path.join(out, "suite.png"))
    print(f"\n{heading}\nwrote {out}/table.md, results.json, suite.png")


def _init_distributed(args) -> int:
    """Join torchrun's process group; returns this rank."""
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return torch.distributed.get_rank()


def _check_suite_options(args) -> None:
    """The suite's options where no suite runs are refused, not ignored."""
    suite_runs = getattr(args, "suite", False) or (args.command == "run" and TASKS[args.task] is GeneralTask)
    given = [flag for flag, value in (("--problem", args.problem), ("--net", getattr(args, "net", None)),
                                      ("--lr", getattr(args, "lr", None) if args.command == "evaluate" else None))
             if value is not None]
    if given and not suite_runs:
        raise SystemExit(f"{', '.join(given)}: for the held-out suite only (evaluate --suite, run --task general)")
    if args.command == "run" and suite_runs and args.variant:
        raise SystemExit("--variant: the general task is evaluated on the suite; choose its problems with --problem")
    if args.command == "evaluate" and TASKS[args.task] is GeneralTask and not suite_runs:
        raise SystemExit("--task general: its held-out evaluation is the suite: evaluate --suite --net FILE")


def _command(argv) -> str:
    return shlex.join(["python", "-m", "l2l_fused", *(argv or sys.argv[1:])])


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = args.out or os.path.join("runs", "suite" if getattr(args, "suite", False) else args.task)
    start = time.perf_counter()
    if args.command == "export":
        checkpoint = os.path.join(out, "checkpoint.pt")
        path = export(checkpoint, args.to or os.path.join(os.path.dirname(__file__), "weights", f"{args.task}.pt"))
        print(f"wrote {path} from {checkpoint}")
        return 0
    if args.command != "train":
        _variants(args)  # a bad --variant fails before minutes of training
        _check_suite_options(args)
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command != "evaluate":
        rank = _init_distributed(args)
    os.makedirs(out, exist_ok=True)
    if args.command == "evaluate" and args.suite:
        if args.pretrained:
            raise SystemExit("--pretrained: with --suite, name the nets with --net (default general)")
        names = args.net or ([] if args.checkpoint else ["general"])
        nets = {name: load_net(name) for name in names}
        if args.checkpoint:
            nets[args.checkpoint] = load_best_net(args.checkpoint)
        _suite(args, out, nets, {"nets": list(nets), "command": _command(argv)})
    elif args.command == "evaluate":
        if args.pretrained:
            net, source = pretrained(args.task), f"l2l_fused.pretrained({args.task!r})"
        else:
            source = args.checkpoint or os.path.join(out, "checkpoint.pt")
            net = load_best_net(source)
        _evaluate(args, out, net, source, args.seed, args.steps, {})
    else:
        task = _task(args)
        checkpoint, config = _train(args, out, task)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0's last checkpoint is written
            torch.distributed.destroy_process_group()
        if args.command == "run" and rank == 0:
            extra = {"train_config": asdict(config), "command": _command(argv)}
            if TASKS[args.task] is GeneralTask:  # its held-out test is the suite, not more of its mixture
                _suite(args, out, {checkpoint: load_best_net(checkpoint)}, extra)
            else:
                _evaluate(args, out, load_best_net(checkpoint), checkpoint, config.seed, config.steps, extra)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
