"""Meta-training: tasks, the unrolled trajectory, the trainer, the tuned baselines, evaluation."""

from .art import ArtTask
from .baselines import BASELINES, baseline_losses, lr_grid, optimizer_losses, tune
from .classification import ClassificationTask, ConvTask, MLPTask
from .data import (Dataset, DataError, MissingExtraError, load_cifar10, load_dataset, load_digits, load_mnist,
                   load_mnist5k, load_splits, read_idx, read_mnist_csv)
from ..net import net_config, net_from_config
from .nets import l2l_param_groups
from .general import GeneralTask
from .modules import CompositeProblem, Family, ModuleProblem
from .suite import SUITE, evaluate_suite
from .tasks import Problem, QuadraticTask, Task
from .trainer import MetaTrainer, TrainConfig, load_best_net
from .unroll import Trajectory, learned_losses

TASKS: dict[str, type[Task]] = {"quadratic": QuadraticTask, "mlp": MLPTask, "conv": ConvTask, "general": GeneralTask,
                              "neural-art": ArtTask}

__all__ = [
    "BASELINES", "baseline_losses", "lr_grid", "optimizer_losses", "tune", "ClassificationTask", "ConvTask",
    "MLPTask", "Dataset",
    "DataError", "MissingExtraError", "load_cifar10", "load_dataset", "load_digits", "load_mnist", "load_mnist5k",
    "load_splits", "read_idx", "read_mnist_csv", "l2l_param_groups",
    "net_config", "net_from_config", "Problem", "QuadraticTask", "Task", "TASKS", "MetaTrainer", "TrainConfig",
    "load_best_net", "Trajectory", "learned_losses", "GeneralTask", "CompositeProblem", "Family", "ModuleProblem",
    "SUITE", "evaluate_suite", "ArtTask",
]
