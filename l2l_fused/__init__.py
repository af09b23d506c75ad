"""l2l_fused: the learned LSTM optimizer of Andrychowicz et al. (2016), fused for real models.

The user's side: :class:`LSTMOptimizerNet` (net.py), :class:`L2LOptimizer` (optim.py), the shipped nets
(pretrained_nets.py). The kernels and their specification: :mod:`l2l_fused.ops`. Meta-training:
:mod:`l2l_fused.meta`, loaded only when imported.
"""

from .net import LSTMOptimizerNet
from .ops.interface import available as available_backends
from .ops.reference import l2l_step_ref, l2l_update_ref, preprocess
from .optim import L2LOptimizer
from .pretrained_nets import param_groups_by_layer, pretrained, pretrained_info

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
