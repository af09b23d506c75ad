"""``L2LOptimizer``: the learned optimizer as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import copy
import math
import numbers
import sys
from collections import defaultdict
from typing import Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import capture
from .ops import interface
from .ops import precision as precisions
from .ops.launch_table import LaunchTable
from .ops.update import Update
from .net import LSTMOptimizerNet

_STATE_KEYS = ("h", "c")
STATE_DTYPES = (torch.float32, torch.bfloat16)


def _check_net(net, where: str) -> None:
    if net is None:
        raise ValueError(f"{where}: no net; pass net= to L2LOptimizer or put 'net' in the param group")
    if not isinstance(net, LSTMOptimizerNet):
        raise TypeError(f"{where}: net must be an l2l_fused.LSTMOptimizerNet, got {type(net).__name__}")


def _check_state_dtype(dtype, where: str) -> None:
    if dtype not in STATE_DTYPES:
        raise ValueError(f"{where} must be one of {list(STATE_DTYPES)}, got {dtype!r}")


def _check_bool(value, where: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{where} must be a bool, got {value!r}")


def _is_number(value) -> bool:
    """A real number a scheduler may leave in a group: a float, an int, a NumPy scalar; not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, Tensor))


def _check_lr(value, where: str) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{where} as a tensor must hold one real floating value, got {value.dtype} "
                             f"of shape {list(value.shape)}")
    elif not _is_number(value) or not 0.0 <= value < math.inf:
        raise ValueError(f"{where} must be a finite float >= 0 or a one-element tensor, got {value!r}")


def _check_weight_decay(value, where: str) -> None:
    if not _is_number(value) or not 0.0 <= value < math.inf:
        raise ValueError(f"{where} must be a finite float >= 0, got {value!r}")


# Hyperparameters of torch.optim's optimizers that this one has no use for. A group that sets one is
# refused by name rather than silently ignored (a user moving from SGD or Adam expects it to act). The
# flags in _NEUTRAL are accepted at the value that asks for nothing (torch itself adds differentiable=False).
_NOT_HONOURED = frozenset({
    "momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "alpha", "centered", "rho", "lr_decay",
    "initial_accumulator_value", "momentum_decay", "decoupled_weight_decay", "lambd", "t0", "etas", "step_sizes",
    "beta2_decay", "d", "max_iter", "max_eval", "tolerance_grad", "tolerance_change", "history_size",
    "line_search_fn", "ns_coefficients", "ns_steps", "adjust_lr_fn", "foreach", "fused", "differentiable",
})
_NEUTRAL = {"differentiable": False, "foreach": None, "fused": None, "decoupled_weight_decay": True}


def _check_values(options: dict, prefix: str) -> None:
    """The values of the numeric and flag options, each error naming ``prefix`` and the option."""
    _check_state_dtype(options["state_dtype"], f"{prefix}state_dtype")
    _check_bool(options["capturable"], f"{prefix}capturable")
    _check_lr(options["lr"], f"{prefix}lr")
    _check_weight_decay(options["weight_decay"], f"{prefix}weight_decay")
    _check_bool(options["maximize"], f"{prefix}maximize")
    precisions.check(options["precision"], f"{prefix}precision")


def _check_options(group: dict, where: str) -> None:
    """Every option of a group, named in any error; types only (a tensor lr's value is never read here)."""
    for key in sorted(_NOT_HONOURED.intersection(group)):
        if key not in _NEUTRAL or group[key] is not _NEUTRAL[key]:
            hint = " (weight decay here is always decoupled, AdamW's)" if key == "decoupled_weight_decay" else ""
            raise ValueError(f"{where}: {key}={group[key]!r} is a torch.optim option that L2LOptimizer does not "
                             f"have{hint}; its options are {sorted(_OPTIONS)}")
    _check_net(group["net"], where)
    interface.check_name(group["backend"], group["net"])
    _check_values(group, f"{where}: ")


_OPTIONS = ("net", "backend", "state_dtype", "capturable", "lr", "weight_decay", "maximize", "precision")


def _dtensor_type():
    """``DTensor`` if ``torch.distributed.tensor`` is loaded, else None: a parameter cannot be a DTensor
    before that module is, and importing it costs over a second that most users never need."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


class L2LOptimizer(Optimizer):
    """Updates every coordinate with a learned LSTM optimizer: ``p ← p·(1 − lr·wd) + lr·net(p.grad, state)``.

    Each param group is updated as one flat set of coordinates (one kernel launch per group and device
    on the fused backends). Per parameter the state holds ``h`` and ``c``, each ``[L, numel, H]`` in
    ``state_dtype``, zero at the first step. Parameters of any floating dtype are supported; the network
    runs in float32 and the update is added in float32 (float64 for float64 parameters).

    A coordinate whose gradient is exactly zero gets no learned update and keeps its state: a parameter
    that receives no gradient signal (a padding or never-seen embedding row, a weight on an always-zero
    input, a layer frozen under ``zero_grad(set_to_none=False)``) stays where it is, as under SGD, instead
    of drifting with the net's bias. Weight decay still applies to it, as AdamW's does.

    A coordinate whose gradient is NaN or ±inf is skipped: its parameter and state stay as they were (a
    NaN would otherwise poison its state for good). :meth:`skipped_coordinates` counts them on the device.
    With ``torch.amp.GradScaler``, ``scaler.step(opt)`` unscales the gradients and skips the whole step on
    an overflow, as for any optimizer.

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs (``model.named_parameters()``),
            or of param-group dicts, as for any ``torch.optim`` optimizer.
        net: the ``LSTMOptimizerNet`` for groups that name none (groups may each bring their own, e.g.
            one net for conv and one for fully connected parameters). Its weights are read, not trained.
        lr: a multiplier of the learned update (default 1.0: the update the net was meta-trained to make).
            A float >= 0, or a one-element tensor, which the kernels read on the device when they run: a
            scheduler then changes it in place without a host sync and without a new CUDA graph capture
            (put it on the parameters' device for that). Every ``torch.optim.lr_scheduler`` works on it.
        weight_decay: decoupled weight decay, AdamW's form: ``p ← p·(1 − lr·weight_decay)`` before the
            update is added (default 0).
        maximize: maximize the objective: the net sees ``−grad`` (default False).
        backend: ``"auto"`` (fastest available for the parameters' device and the net), or a name from
            ``l2l_fused.available_backends(device)``.
        state_dtype: ``torch.float32`` (default) or ``torch.bfloat16``, which halves the state's memory
            and traffic (the math stays float32; h and c are rounded to bfloat16 when stored). Changing it
            on a group converts that group's state at its next step.
        capturable: lets ``step()`` be captured in a CUDA graph and replayed. The group's state (for every
            parameter that requires grad) and the skipped-coordinate counter are made here, not at the
            first step, so no step allocates them: the optimizer's first step may be captured (once the
            Triton kernel is compiled, which its first launch does: PyTorch's warm-up recipe sees to it).
            A capture checks that everything a replay reads exists and lives where the graph runs, and
            raises otherwise; ``load_state_dict`` writes into the state tensors a graph reads. Without it,
            capturing ``step()`` raises, as for ``torch.optim`` optimizers.
        precision: the arithmetic of the step: ``"exact"`` (float32-accurate), ``"fast"`` (TF32
            tensor-core products and one-instruction activations on the Triton backend; the others
            compute exactly in both), or None (default): ``torch.get_float32_matmul_precision()`` when
            the step runs, ``"highest"`` (PyTorch's default) → exact, ``"high"``/``"medium"`` → fast.
            ``docs/kernels.md`` ("Arithmetic modes") has what each costs and changes.

    Group keys of other ``torch.optim`` optimizers (``momentum``, ``betas``, ``eps``, ...) are refused with
    a ``ValueError`` that names them, never ignored.
    """

    def __init__(
        self,
        params,
        net: Optional[LSTMOptimizerNet] = None,
        lr: Union[float, Tensor] = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: torch.dtype = torch.float32,
        capturable: bool = False,
        precision: Optional[str] = None,
    ) -> None:
        defaults = {"net": net, "backend": backend, "state_dtype": state_dtype, "capturable": capturable, "lr": lr,
                    "weight_decay": weight_decay, "maximize": maximize, "precision": precision}
        if net is not None:  # else every group must bring its own, which add_param_group checks
            _check_net(net, "net")
        interface.check_name(backend, net)
        _check_values(defaults, "")
        self._skipped: dict[torch.device, Tensor] = {}  # per device: coordinates skipped for a non-finite ∇
        self._tables: dict[tuple[int, torch.device], LaunchTable] = {}  # per param group and device
        self._dtensor = None
        super().__init__(params, defaults)
        # The net is a module, not a hyperparameter: a state dict carries its config only, so it stays
        # loadable with torch.load(weights_only=True) and is checked against the net on load.
        self.register_state_dict_post_hook(_nets_to_configs, prepend=True)

    def add_param_group(self, param_group: dict) -> None:
        index = len(self.param_groups)
        where = f"param group {index}"
        candidate = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_options(candidate, where)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if not p.is_floating_point():
                self.param_groups.pop()
                raise ValueError(f"params: L2LOptimizer needs real floating-point parameters, got one of dtype {p.dtype}")
        self._dtensor = _dtensor_type()
        for device in {p.device for p in group["params"]}:
            interface.preload(group["backend"], device, group["net"])
            self._tables[(index, device)] = LaunchTable()  # made here, not in a step torch.compile may trace
        if group["capturable"]:
            for p in group["params"]:
                if p.requires_grad:
                    self._state_of(group, p)
                    self._counter(p.device)

    def __getstate__(self) -> dict:
        # torch.optim pickles defaults, state and param groups only; the skipped counts are state too.
        return {**super().__getstate__(), "_skipped": self._skipped}

    def __setstate__(self, state: dict) -> None:
        # Also called by load_state_dict with state and param groups only: what it does not carry stays.
        self._skipped = state.pop("_skipped", getattr(self, "_skipped", {}))
        # launch tables hold addresses: a copy (or an unpickled optimizer) makes its own
        self._tables = getattr(self, "_tables", {})
        super().__setstate__(state)
        self._dtensor = _dtensor_type()
        if _nets_to_configs not in self._optimizer_state_dict_post_hooks.values():  # unpickled: hooks are not
            self.register_state_dict_post_hook(_nets_to_configs, prepend=True)

    def _local(self, t: Tensor) -> Tensor:
        """The part of ``t`` this process holds: a DTensor's (FSDP2's sharded parameters) local shard, else ``t``."""
        return t.to_local() if self._dtensor is not None and isinstance(t, self._dtensor) else t

    def _state_shape(self, net: LSTMOptimizerNet, p: Tensor) -> tuple[int, int, int]:
        return (net.num_layers, self._local(p).numel(), net.hidden_size)

    def _plan(self):
        """Validate every group's options, gradients and state before anything is written.

        Returns ``(group, backend, params, update, launch table)`` per group and device. A bad option or gradient, or a
        capture that a replay could not repeat, raises here, leaving all parameters and state as they were.
        """
        graph = capture.capturing()
        plan = []
        for index, group in enumerate(self.param_groups):
            _check_options(group, f"param group {index}")  # a scheduler or a user may have set anything
            net = group["net"]
            by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("L2LOptimizer does not support sparse gradients")
                if g.shape != p.shape or g.device != p.device or g.dtype != p.dtype:
                    raise ValueError(
                        f"param group {index}: a gradient of shape {tuple(g.shape)}, {g.dtype} on {g.device} "
                        f"does not match its parameter ({tuple(p.shape)}, {p.dtype} on {p.device})"
                    )
                state = self.state.get(p)
                if state and tuple(state["h"].shape) != self._state_shape(net, p):
                    raise ValueError(
                        f"param group {index}: a parameter's optimizer state is {list(state['h'].shape)} but the "
                        f"parameter ({tuple(p.shape)}) and net need {list(self._state_shape(net, p))}; a "
                        "parameter cannot change shape, nor a group its net size, while keeping its state"
                    )
                if graph:
                    self._check_replayable(index, group, p)
                by_device[p.device].append(p)
            for device, params in by_device.items():
                lr = group["lr"]
                if isinstance(lr, Tensor):  # read where the kernel runs, as one float32 (no-ops when it is so)
                    lr = lr.to(device=device, dtype=torch.float32).reshape(())
                else:
                    lr = float(lr)
                update = Update(lr, float(group["weight_decay"]), group["maximize"])
                table = self._tables.get((index, device))
                if table is None:  # a parameter moved to another device since its group was added
                    table = self._tables[(index, device)] = LaunchTable()
                plan.append((group, interface.resolve(group["backend"], device, net), params, update, table))
        return plan

    def _check_replayable(self, index: int, group: dict, p: Tensor) -> None:
        """Under CUDA-graph capture: what a replay of this step reads must already exist, on the GPU."""
        where = f"CUDA graph capture of L2LOptimizer.step(): param group {index}"
        if not group["capturable"]:
            raise RuntimeError(f"{where} has capturable=False; make the optimizer with capturable=True")
        state = self.state.get(p)
        if not state or state["h"].dtype != group["state_dtype"] or p.device not in self._skipped:
            raise RuntimeError(
                f"{where} has a parameter without its {group['state_dtype']} state (it did not require grad "
                "when the group was added, or state_dtype changed since): run one step() before capturing, so "
                "that no captured step makes it (the graph would remake it at every replay)"
            )
        if p.device.type != "cuda":
            raise RuntimeError(f"{where} has a parameter on {p.device}; a CUDA graph replays CUDA work only")
        weight = group["net"].head.weight
        if weight.device != p.device:
            raise RuntimeError(
                f"{where} has its net on {weight.device}, its parameters on {p.device}; a replay would copy φ "
                "every time: move the net (net.to(device)) before capturing"
            )
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device != p.device:
            raise RuntimeError(
                f"{where} has its lr tensor on {lr.device}, its parameters on {p.device}: put lr on {p.device} "
                "so that replays read its value there"
            )

    def _counter(self, device: torch.device) -> Tensor:
        if device not in self._skipped:
            self._skipped[device] = torch.zeros((), dtype=torch.int64, device=device)
        return self._skipped[device]

    def _state_of(self, group: dict, p: Tensor) -> dict:
        state, dtype = self.state[p], group["state_dtype"]
        if not state:
            shape = self._state_shape(group["net"], p)
            for key in _STATE_KEYS:
                state[key] = torch.zeros(shape, device=p.device, dtype=dtype)
        elif state["h"].dtype != dtype:
            for key in _STATE_KEYS:
                state[key] = state[key].to(dtype)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; parameters with ``grad is None`` are
        skipped and their state left as it is."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, impl, params, update, table in self._plan():
            states = [self._state_of(group, p) for p in params]
            impl.group_step(  # under FSDP2 each rank steps (and keeps state for) its own shards only
                group["net"], [self._local(p) for p in params], [self._local(p.grad) for p in params],
                [s["h"] for s in states], [s["c"] for s in states], self._counter(params[0].device), update, table,
                group["precision"],
            )
        return loss

    def skipped_coordinates(self) -> Tensor:
        """How many coordinate updates were skipped for a NaN or ±inf gradient since this optimizer was made.

        Such a coordinate keeps its parameter and its LSTM state as they were. The count is an int64 tensor
        on the parameters' device, kept there by the kernels: ``step()`` never waits for the host to read
        it (``.item()`` does).
        """
        counts = list(self._skipped.values())
        if not counts:
            first = next((p for g in self.param_groups for p in g["params"]), None)
            return torch.zeros((), dtype=torch.int64, device=None if first is None else first.device)
        total = counts[0].clone()
        for count in counts[1:]:
            total += count.to(total.device, non_blocking=True)
        return total

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from :meth:`state_dict`, exactly: the LSTM state keeps its saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` would cast state to each parameter's dtype (rounding a
        float32 state to a bfloat16 parameter's precision), so this one is written out. Everything is
        checked before anything is replaced: a state dict for another layout or net, or with an option this
        optimizer does not have, raises ``ValueError`` and leaves the optimizer as it was. Options a state
        dict predates (``lr``, ``weight_decay``, ``maximize``) take their defaults. A group whose ``lr`` is a
        tensor keeps that tensor and gets the saved value written into it. ``param_names`` are kept where
        the state dict has none, as ``torch.optim`` does. A capturable group keeps its ``capturable`` and its state tensors:
        the loaded state is copied into them (a parameter the state dict has no state for starts from zeros
        again), so a graph captured before the load replays from the loaded state.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        # A copy, as torch.optim takes: the loaded groups must share nothing (a tensor lr, say) with the source.
        groups, saved_groups = self.param_groups, copy.deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer {len(groups)}"
            )
        id_map, new_groups = {}, []
        for index, (group, saved) in enumerate(zip(groups, saved_groups)):
            where = f"state_dict param group {index}"
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"{where} has {len(saved['params'])} parameters, this optimizer's {len(group['params'])}")
            if saved.get("net") != group["net"].config():
                raise ValueError(f"{where} was saved for a net {saved.get('net')}, this group's net is {group['net'].config()}")
            new_group = {k: v for k, v in saved.items() if k not in ("params", "net")}
            for key, default in self.defaults.items():  # options newer than the state dict
                new_group.setdefault(key, default)
            # Whether steps are captured is this process's business, not the checkpoint's.
            new_group.update(params=group["params"], net=group["net"], capturable=group["capturable"])
            if "param_names" in group and "param_names" not in new_group:  # as torch.optim keeps them
                new_group["param_names"] = group["param_names"]
            _check_options(new_group, where)
            new_groups.append(new_group)
            id_map.update({saved_id: (p, group["net"]) for saved_id, p in zip(saved["params"], group["params"])})
        state = defaultdict(dict)
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id not in id_map:
                raise ValueError(f"state_dict has state for parameter id {saved_id}, which no param group lists")
            p, net = id_map[saved_id]
            if set(saved_state) != set(_STATE_KEYS):
                raise ValueError(f"state_dict state {saved_id} has keys {sorted(saved_state)}, expected {list(_STATE_KEYS)}")
            for key in _STATE_KEYS:
                if tuple(saved_state[key].shape) != self._state_shape(net, p):
                    raise ValueError(
                        f"state_dict state {saved_id}[{key!r}] is {list(saved_state[key].shape)}, but its parameter "
                        f"{tuple(p.shape)} with this net needs {list(self._state_shape(net, p))}"
                    )
            state[p] = {key: saved_state[key].to(device=p.device, copy=True) for key in _STATE_KEYS}
        # Checked: from here on nothing raises.
        for group, new_group in zip(groups, new_groups):
            if isinstance(group["lr"], Tensor):  # the live tensor keeps being the one read (a graph, a scheduler)
                group["lr"].copy_(torch.as_tensor(new_group["lr"]))
                new_group["lr"] = group["lr"]
            if group["capturable"]:  # into the tensors a captured graph reads (unless the dtype changes)
                for p in group["params"]:
                    live, loaded = self.state.get(p), state.get(p)
                    if live and (loaded is None or loaded["h"].dtype == live["h"].dtype):
                        for key in _STATE_KEYS:
                            if loaded is None:
                                live[key].zero_()
                            else:
                                live[key].copy_(loaded[key])
                        state[p] = live
        self.__setstate__({"state": state, "param_groups": new_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _nets_to_configs(optimizer: L2LOptimizer, state_dict: dict) -> dict:
    """Keeps a state dict loadable with ``torch.load(weights_only=True)``: each net as its config, and a
    NumPy lr (a ``LambdaLR`` whose lambda returns ``np.float32``, say) as a Python float."""
    for group in state_dict["param_groups"]:
        group["net"] = group["net"].config()
        for key in ("lr", "weight_decay"):
            if _is_number(group[key]) and type(group[key]) is not float:
                group[key] = float(group[key])
    return state_dict
