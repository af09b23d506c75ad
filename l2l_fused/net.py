"""The learned optimizer m_φ: two (or L) LSTM cells shared by every coordinate, and a linear head."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .capture import capturing

from .ops import interface
from .ops import precision as precisions
from .ops.layout import pack
from .ops.reference import CellWeights, input_size

State = tuple[Tensor, Tensor]
Nets = nn.Module  # an LSTMOptimizerNet, or an nn.ModuleDict of them, one per named parameter group


class LSTMOptimizerNet(nn.Module):
    """φ of Andrychowicz et al. (2016): ``cells`` (L ``nn.LSTMCell``) and ``head`` (``nn.Linear(H, 1)``).

    Its state dict is a plain PyTorch state dict of those modules. Each coordinate carries its own state
    ``(h, c)``, each ``[L, N, H]``; the weights are shared by all coordinates.

    Args:
        hidden_size: H, units per layer (paper: 20).
        num_layers: L (paper: 2).
        preprocess_p: p of the log/sign gradient preprocessing (paper: 10), or None to feed the raw
            gradient as a single feature (the paper's quadratic experiment).
        output_scale: s, the update is ``s * head(h_L)`` (paper: 0.1 on MNIST, 1.0 on quadratics).
    """

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        preprocess_p: Optional[float] = 10.0,
        output_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if preprocess_p is not None and not preprocess_p > 0:
            raise ValueError(f"preprocess_p must be > 0 or None, got {preprocess_p!r}")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.preprocess_p = None if preprocess_p is None else float(preprocess_p)
        self.output_scale = float(output_scale)
        sizes = [input_size(self.preprocess_p)] + [hidden_size] * (num_layers - 1)
        self.cells = nn.ModuleList(nn.LSTMCell(n_in, hidden_size) for n_in in sizes)
        self.head = nn.Linear(hidden_size, 1)
        self._packed: Optional[tuple[tuple, Tensor]] = None  # (what it was packed from, φ packed)

    def kernel_weights(self, device) -> Tensor:
        """φ as the kernels read it (:mod:`l2l_fused.ops.layout`): float32, on ``device``, no autograd.

        Packed once and kept until a weight changes (in place, as a meta-training step or
        ``load_state_dict`` does; or replaced, as ``.to()`` does) or another device asks. Traced by
        torch.compile or captured in a CUDA graph, it is packed afresh: whether φ changed is a host-side
        question, which neither a compiled graph nor a graph replay asks again, and packing within the
        graph reads φ as it is at each run.
        """
        device = torch.device(device)
        if torch.compiler.is_compiling() or capturing():
            with torch.no_grad():
                return pack(self).to(device, torch.float32)
        key = (device,) + tuple((id(p), p.data_ptr(), p._version, p.dtype) for p in self.parameters())
        cached = getattr(self, "_packed", None)  # a net pickled before the cache existed has none
        if cached is None or cached[0] != key:
            with torch.no_grad():
                self._packed = (key, pack(self).to(device, torch.float32).contiguous())
        return self._packed[1]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_packed"] = None  # a cache: a copy (or an unpickled net) packs its own
        return state

    def config(self) -> dict:
        """The constructor arguments: what a checkpoint needs besides the state dict."""
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "preprocess_p": self.preprocess_p,
            "output_scale": self.output_scale,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())

    def cell_weights(self) -> list[CellWeights]:
        return [(cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh) for cell in self.cells]

    def init_state(self, n: int, device=None, dtype=None) -> State:
        """Zero state ``(h, c)`` for n coordinates, each ``[L, n, H]``."""
        dtype = dtype if dtype is not None else self.head.weight.dtype
        device = device if device is not None else self.head.weight.device
        shape = (self.num_layers, n, self.hidden_size)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def forward(
        self,
        theta: Tensor,
        grad: Tensor,
        state: State,
        backend: str = "auto",
        saved_state_dtype: Optional[torch.dtype] = None,
        precision: Optional[str] = None,
    ) -> tuple[Tensor, State]:
        """One step: returns ``(theta + Δ, (h', c'))``, theta's shape kept.

        Differentiable with respect to φ, ``theta`` and ``state``; no gradient flows into ``grad``. On the
        fused backends autograd saves only ``grad`` and the incoming state, in ``saved_state_dtype``
        (e.g. ``torch.bfloat16``, half the memory of an unrolled step) if given. ``precision``: ``"exact"``,
        ``"fast"`` (TF32 tensor-core products on the Triton backend), or None to follow
        ``torch.get_float32_matmul_precision()`` (:mod:`l2l_fused.ops.precision`).
        """
        if not isinstance(theta, Tensor) or not isinstance(grad, Tensor):
            raise TypeError("theta and grad must be tensors")
        precisions.check(precision)
        if grad.shape != theta.shape:
            raise ValueError(f"grad must have theta's shape {tuple(theta.shape)}, got {tuple(grad.shape)}")
        h, c = state
        expected = (self.num_layers, theta.numel(), self.hidden_size)
        if tuple(h.shape) != expected or tuple(c.shape) != expected:
            raise ValueError(
                f"state must be (h, c) of shape [L, N, H] = {list(expected)}, got {list(h.shape)} and {list(c.shape)}"
            )
        dtype = self.head.weight.dtype
        for name, t in (("theta", theta), ("grad", grad), ("h", h), ("c", c)):
            if t.dtype != dtype:
                raise ValueError(f"{name} has dtype {t.dtype}, the net's weights {dtype}: cast one of them")
        impl = interface.resolve(backend, theta.device, self)
        theta_next, h_next, c_next = impl.step(self, theta.reshape(-1), grad.reshape(-1), h, c, saved_state_dtype,
                                               precision)
        return theta_next.view(theta.shape), (h_next, c_next)


def net_config(net: Nets) -> dict:
    """What rebuilds ``net`` (weights aside): the net's config, or ``{"groups": {name: config}}``."""
    if isinstance(net, LSTMOptimizerNet):
        return net.config()
    return {"groups": {name: member.config() for name, member in net.items()}}


def net_from_config(config: dict) -> Nets:
    if "groups" in config:
        return nn.ModuleDict({name: LSTMOptimizerNet(**c) for name, c in config["groups"].items()})
    return LSTMOptimizerNet(**config)
