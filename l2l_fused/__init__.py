"""l2l_fused: the learned LSTM optimizer of Andrychowicz et al. (2016), fused for real models."""

from . import native, reference_backend, triton_backend  # noqa: F401  (register the backends)
from .backends import available as available_backends
from .net import LSTMOptimizerNet
from .optim import L2LOptimizer
from .pretrained_nets import param_groups_by_layer, pretrained, pretrained_info
from .reference import l2l_step_ref, l2l_update_ref, preprocess

__all__ = [
    "LSTMOptimizerNet",
    "L2LOptimizer",
    "available_backends",
    "l2l_step_ref",
    "l2l_update_ref",
    "preprocess",
    "pretrained",
    "pretrained_info",
    "param_groups_by_layer",
]
