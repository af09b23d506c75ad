"""Meta-training of φ (docs/spec.md §3): K steps per sampled batch of functions, in truncations of T, Adam on φ."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..net import Nets, net_config, net_from_config
from .tasks import Task
from .unroll import Trajectory, learned_losses


@dataclass
class TrainConfig:
    epochs: int = 20
    iterations_per_epoch: int = 50  # sampled batches of functions per epoch
    batch_size: int = 128  # functions per batch
    steps: int = 100  # K, optimizee steps per batch
    truncation: int = 20  # T, steps per backpropagation
    lr: float = 1e-3  # Adam on φ
    grad_clip: Optional[float] = 1.0  # max norm of φ's gradient per update; None = no clipping
    val_functions: int = 256
    seed: int = 0
    # The meta-objective, per function: "sum", the paper's Σ_t f(θ_t) (w_t = 1); "log", Σ_t log f(θ_t),
    # which weights each step by 1/f(θ_t), so halving a small late loss counts as much as halving the first
    # one; or "relative", Σ_t f(θ_t)/f(θ_0), which weights every function alike whatever its loss's scale and
    # charges a loss that climbs above its start in proportion (log would charge a blow-up little). Validation
    # scores φ by the same: the mean (relative) loss over steps, or the geometric mean.
    objective: str = "sum"

    def __post_init__(self) -> None:
        if self.steps % self.truncation:
            raise ValueError(f"steps ({self.steps}) must be a multiple of truncation ({self.truncation})")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")


# Per step and function, the term the meta-objective sums, from the losses [T, B] and the initial ones [B].
# The floor keeps log finite at a loss of 0.
OBJECTIVES = {"sum": lambda losses, initial: losses, "log": lambda losses, initial: losses.clamp_min(1e-12).log(),
              "relative": lambda losses, initial: losses / initial}


@dataclass
class TrainState:
    epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = -1
    history: list = field(default_factory=list)  # per epoch: {"epoch", "train_loss", "val_loss"}
    skipped_updates: int = 0  # φ updates skipped for a non-finite meta-gradient


class MetaTrainer:
    """Meta-trains ``net`` (``task.make_net()``: one net, or one per parameter group) on ``task``; keeps
    the φ with the best validation loss.

    Functions are drawn from a generator seeded by ``config.seed``; the validation functions are drawn
    once from seed + 1. A checkpoint at an epoch boundary holds everything that decides the rest of the
    run (φ, best φ, Adam, the generator, the epoch), so a resumed run is bit-identical to an uninterrupted
    one on the same machine and backend.

    Data-parallel: when ``torch.distributed`` is initialised (``torchrun``), every rank draws the same
    batch of ``batch_size`` functions and unrolls its own share of them (``Problem.shard``); φ's gradients
    are averaged over ranks before clipping and Adam, so every rank holds the same φ, the one a single
    process would compute on the whole batch (up to the order of float additions). Validation is sharded
    the same way; only rank 0 writes checkpoints.
    """

    def __init__(self, net: Nets, task: Task, config: TrainConfig, backend: str = "auto",
                 device="cpu", recipe: Optional[dict] = None) -> None:
        self.device = torch.device(device)
        # How the task and φ's start were chosen (command-line options), kept in checkpoints for export.
        self.recipe = dict(recipe or {})
        self.net, self.task, self.config, self.backend = net.to(self.device), task, config, backend
        self.meta_optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.world = torch.distributed.get_world_size() if distributed else 1
        if config.batch_size % self.world or config.val_functions % self.world:
            raise ValueError(f"batch_size ({config.batch_size}) and val_functions ({config.val_functions}) must "
                             f"split evenly over {self.world} ranks")
        if self.world > 1:  # every rank starts from rank 0's φ, whatever its own initialisation
            for p in self.net.parameters():
                torch.distributed.broadcast(p.data, src=0)
        validation = task.sample(config.val_functions, torch.Generator().manual_seed(config.seed + 1), "val")
        self.validation = self._share(validation)
        self.best_state = copy.deepcopy(net.state_dict())
        self.state = TrainState()

    def _share(self, problem):
        """This rank's functions of a batch, on the device."""
        return (problem.shard(self.rank, self.world) if self.world > 1 else problem).to(self.device)

    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def train_batch(self) -> float:
        """One sampled batch: K steps, a φ update after every truncation. Returns the mean loss."""
        cfg = self.config
        problem = self._share(self.task.sample(cfg.batch_size, self.generator))
        trajectory = Trajectory(self.net, problem, self.backend)
        total = 0.0
        for _ in range(cfg.steps // cfg.truncation):
            losses = trajectory.advance(cfg.truncation)  # [T, B]
            # mean over the batch of functions
            meta_loss = OBJECTIVES[cfg.objective](losses, trajectory.initial_loss.detach()).sum(0).mean()
            self.meta_optimizer.zero_grad()
            meta_loss.backward()
            grads = [p.grad for p in self.net.parameters() if p.grad is not None]
            for g in grads:  # equal shares: the mean of the ranks' means is the batch mean
                self._mean_over_ranks(g)
            # A function that blew up (inf or NaN loss) would make φ NaN for good: that truncation teaches
            # nothing, and every rank sees the same averaged gradients, so every rank skips it.
            if all(bool(torch.isfinite(g).all()) for g in grads):
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
                self.meta_optimizer.step()
            else:
                self.state.skipped_updates += 1
            trajectory.detach()
            total += self._mean_over_ranks(losses.detach().mean()).item()
        return total / (cfg.steps // cfg.truncation)

    def validate(self) -> float:
        """The meta-objective on the validation functions, per step and function: the mean loss ("sum"), its
        geometric mean ("log"), or the mean loss relative to each function's start ("relative"). A diverged run (inf or NaN) is worse than any finite one."""
        losses = learned_losses(self.net, self.validation, self.config.steps, self.backend)
        value = self._mean_over_ranks(OBJECTIVES[self.config.objective](losses[1:], losses[0]).mean()).item()
        if self.config.objective == "log":
            value = math.exp(value) if math.isfinite(value) else value
        return value if math.isfinite(value) else math.inf

    def train(self, checkpoint_path: Optional[str] = None, progress: bool = True) -> TrainState:
        """Run the remaining epochs; after each, validate, keep the best φ, and checkpoint."""
        cfg = self.config
        epochs = range(self.state.epoch, cfg.epochs)
        bar = tqdm(total=len(epochs) * cfg.iterations_per_epoch, disable=not progress or self.rank != 0,
                   desc="meta-train")
        for epoch in epochs:
            train_loss = sum(self.train_batch() for _ in _ticking(bar, cfg.iterations_per_epoch)) / cfg.iterations_per_epoch
            val = self.validate()
            if val < self.state.best_val:
                self.state.best_val, self.state.best_epoch = val, epoch
                self.best_state = copy.deepcopy(self.net.state_dict())
            self.state.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val})
            self.state.epoch = epoch + 1
            bar.set_postfix(val=f"{val:.4g}", best=f"{self.state.best_val:.4g}")
            if checkpoint_path and self.rank == 0:
                self.save(checkpoint_path)
        bar.close()
        return self.state

    def best_net(self) -> Nets:
        best = copy.deepcopy(self.net)
        best.load_state_dict(self.best_state)
        return best.cpu()

    def save(self, path: str) -> None:
        """Checkpoint, written atomically (a crash mid-write leaves the previous one intact)."""
        payload = {
            "net_config": net_config(self.net),
            "net": self.net.state_dict(),
            "best_net": self.best_state,
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "train_config": asdict(self.config),
            "task": self.task.name,
            "recipe": self.recipe,
            "state": asdict(self.state),
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        """Resume from :meth:`save`'s checkpoint; the net's config and the task must match."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["net_config"] != net_config(self.net):
            raise ValueError(f"checkpoint {path} is for a net {payload['net_config']}, not {net_config(self.net)}")
        if payload["task"] != self.task.name:
            raise ValueError(f"checkpoint {path} is for task {payload['task']!r}, not {self.task.name!r}")
        self.net.load_state_dict(payload["net"])
        self.best_state = payload["best_net"]
        self.meta_optimizer.load_state_dict(payload["meta_optimizer"])
        self.generator.set_state(payload["generator"])
        self.state = TrainState(**payload["state"])


def _ticking(bar, n: int):
    for i in range(n):
        yield i
        bar.update(1)


def load_best_net(path: str) -> Nets:
    """The best φ of a trainer checkpoint, ready: an ``LSTMOptimizerNet`` or a ``ModuleDict`` of them."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    net = net_from_config(payload["net_config"])
    net.load_state_dict(payload["best_net"])
    return net
