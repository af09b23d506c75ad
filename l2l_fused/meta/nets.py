"""The learned optimizer of a task: one ``LSTMOptimizerNet`` for every parameter, or an ``nn.ModuleDict``
of them, one per named parameter group (the paper's separate LSTMs for conv and fully connected layers).
Their configs (``net_config``, ``net_from_config``) live with the net, in :mod:`l2l_fused.net`."""

from __future__ import annotations

from torch import Tensor, nn

from ..net import LSTMOptimizerNet, Nets


def net_parts(net: Nets, n_params: int, groups: dict[str, list[int]] | None) -> list[tuple[LSTMOptimizerNet, list[int]]]:
    """``(net, parameter indices)`` per group. A single net optimizes every parameter whatever the groups;
    a ``ModuleDict`` must name exactly the problem's groups."""
    if isinstance(net, LSTMOptimizerNet):
        return [(net, list(range(n_params)))]
    if not isinstance(net, nn.ModuleDict) or not all(isinstance(m, LSTMOptimizerNet) for m in net.values()):
        raise TypeError(f"net must be an LSTMOptimizerNet or an nn.ModuleDict of them, got {type(net).__name__}")
    if groups is None or set(groups) != set(net.keys()):
        raise ValueError(f"net has one LSTMOptimizerNet per group {sorted(net.keys())}, but the problem's "
                         f"parameter groups are {None if groups is None else sorted(groups)}")
    return [(net[name], indices) for name, indices in groups.items()]


def l2l_param_groups(net: Nets, params: list[Tensor], groups: dict[str, list[int]] | None) -> list[dict]:
    """``L2LOptimizer`` param groups that run each group's parameters with its own net."""
    return [{"params": [params[i] for i in indices], "net": member}
            for member, indices in net_parts(net, len(params), groups)]
