"""Meta-training: tasks, the unrolled trajectory, the trainer, the tuned baselines, evaluation."""

from .baselines import BASELINES, baseline_losses, lr_grid, optimizer_losses, tune
from .tasks import TASKS, Problem, QuadraticTask, Task
from .trainer import MetaTrainer, TrainConfig, load_best_net
from .unroll import Trajectory, learned_losses

__all__ = [
    "BASELINES", "baseline_losses", "lr_grid", "optimizer_losses", "tune", "TASKS", "Problem", "QuadraticTask", "Task",
    "MetaTrainer", "TrainConfig", "load_best_net", "Trajectory", "learned_losses",
]
