"""The ``torch.optim`` contract, from PyTorch's generic optimizer tests (``test/test_optim.py``, class
``TestOptimRenewed``, the tests every optimizer in ``optim_db`` runs), adapted to the learned optimizer.

Each test's docstring names the PyTorch test it comes from. PyTorch runs each test over every "optim input"
(hyperparameter set) of an optimizer; here that is ``_options``. Where PyTorch compares a fused or foreach
implementation to the for-loop one, the ground truth here is the documented update computed by the float64
reference (``helpers.reference64``), within the tolerances derived in ``helpers.py``.

The PyTorch tests left out, and why:
* test_optim_infos_do_not_specify_global_cliquey_kwargs: checks PyTorch's own OptimizerInfo database.
* test_rosenbrock_sparse: sparse gradients; L2LOptimizer raises on them
  (test_optim.py::test_bad_gradients_raise_and_change_nothing).
* test_complex, test_complex_2d: L2LOptimizer takes real floating parameters only, as documented
  (test_optim.py::test_constructor_errors checks the refusal).
* test_foreach_matches_forloop, test_fused_matches_forloop, test_fused_cpu_matches_cuda,
  test_set_default_dtype_works_with_foreach (its foreach part), test_defaults_changed_to_foreach: there is
  no foreach/fused flag, one fused kernel per backend and device, each compared to the reference by
  test_fused_backends.py; "auto"'s choice is checked by test_native.py and test_triton_step.py. Their
  model scenario (a layer frozen for two steps, a step without gradients, a 0-dim parameter) is
  test_model_scenario_steps_are_the_documented_update below.
* test_foreach_large_tensor, test_fused_large_tensor, test_peak_memory_foreach: 2**32-element tensors on a
  72 GB GPU and foreach-vs-forloop peak memory; the LSTM state alone is 320 B a coordinate (1.4 TB there).
* test_fused_error_on_params_on_meta, test_fused_does_not_step_if_foundinf: the ``fused=True`` flag and the
  ``grad_scale``/``found_inf`` attributes GradScaler hands to fused optimizers; GradScaler skips an
  overflowing step itself (test_optim.py::test_grad_scaler_skips_overflowing_steps_and_unscales_the_others).
* test_load_nontensor_step: the state has no ``step`` counter (only ``h`` and ``c``).
* test_second_order_optims_return_consistent_types: LBFGS-only (optimizers whose step needs a closure).
* test_adamw_serialization: AdamW's ``decoupled_weight_decay`` key; this weight decay is always decoupled.
* test_forloop_goes_right_direction_multigpu, test_mixed_device_dtype: two GPUs; the CPU + one GPU version
  is test_goes_right_direction_on_two_devices (CUDA), the mixed dtypes are in test_step_is_the_documented_update.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
import tempfile

import numpy as np
import pytest
import torch
from torch.nn import Parameter
from torch.optim import SGD, Optimizer
from torch.optim import lr_scheduler as lrs
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.optim.swa_utils import SWALR

from l2l_fused import L2LOptimizer, available_backends, pretrained
from l2l_fused.ops.update import Update
from helpers import assert_unchanged, backend_or_skip, check_group_step, grad_for, random_net, snapshot

CUDA = pytest.mark.cuda
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
BACKENDS = [  # (backend, device) that every update rule runs through
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("native", "cpu"), id="native"),
    pytest.param(("auto", "cuda"), id="cuda", marks=CUDA),
]
STEPS = 20
# Group options a state dict of the first L2LOptimizer did not have (it held only net and backend).
NEWER_FLAGS = ("state_dtype", "capturable", "lr", "weight_decay", "maximize")
OPTION_NAMES = ["default", "lr", "tensor_lr", "weight_decay", "maximize", "bf16_state", "all"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: intra-op threads only add synchronisation, which on two busy cores cost
    more than the math (a reference step: 9 ms on two threads, 1.5 ms on one, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _options(name: str, device="cpu") -> dict:
    """Fresh keyword arguments per call: a scheduler or a test may change a tensor lr in place."""
    return {
        "default": {},
        "lr": {"lr": 0.5},
        "tensor_lr": {"lr": torch.tensor(0.5, device=device)},
        "weight_decay": {"weight_decay": 0.1},
        "maximize": {"maximize": True},
        "bf16_state": {"state_dtype": torch.bfloat16},
        "all": {"lr": torch.tensor(0.3, device=device), "weight_decay": 0.05, "maximize": True},
    }[name]


@functools.lru_cache(maxsize=None)
def _shipped_quadratic_net():
    return pretrained("quadratic")


def _quadratic_net(device="cpu"):
    """The shipped net meta-trained on quadratics. Whether a learned optimizer descends depends on its
    meta-training, so the "goes the right direction" tests use the quadratic losses this one learned on
    (worst final/initial loss over 300 seeds of PyTorch's problem: 0.03). A copy, as .to() moves in place."""
    return copy.deepcopy(_shipped_quadratic_net()).to(device)


def _linear_problem(device="cpu", contiguous=True):
    """PyTorch's problem: loss = ‖W x + b‖², W 10×5; non-contiguous W and b are strided views."""
    if contiguous:
        weight = Parameter(torch.randn(10, 5, device=device))
        bias = Parameter(torch.randn(10, device=device))
    else:
        weight = Parameter(torch.randn(10, 5, 2, device=device)[..., 0])
        bias = Parameter(torch.randn(10, 2, device=device)[..., 0])
    return weight, bias, torch.randn(5, device=device)


def _loss(opt, weight, bias, x):
    opt.zero_grad()
    loss = (weight.mv(x) + bias).pow(2).sum()
    loss.backward()
    return loss


def _assert_right_direction(initial: float, final: float, maximize: bool):
    if maximize:
        assert final > initial, f"maximize: the loss fell from {initial} to {final}"
    else:
        assert final < initial, f"the loss rose from {initial} to {final}"


def _assert_equal_nested(a, b, where="state_dict"):
    """Equal, tensors bit for bit, through dicts and lists (torch's assertEqual for state dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            _assert_equal_nested(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _without_param_names(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


def _round_trip(state_dict, weights_only=True):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


def _step_and_check(opt: L2LOptimizer):
    """``opt.step()``, each group checked against the documented update by :func:`helpers.check_group_step`
    (θ' = θ·(1 − lr·wd) + lr·Δ(±∇) from the float64 reference; zero gradients hold the state, non-finite
    ones hold everything and are counted); parameters without a gradient keep their value and state bit
    for bit."""
    before = []
    for group in opt.param_groups:
        live = [p for p in group["params"] if p.grad is not None]
        if not live:
            continue
        net, dtype = group["net"], group["state_dtype"]
        shape = lambda p: (net.num_layers, p.numel(), net.hidden_size)  # noqa: E731
        states = [[opt.state[p][k].clone() if opt.state.get(p) else torch.zeros(shape(p), dtype=dtype) for p in live]
                  for k in ("h", "c")]
        before.append((group, live, [p.detach().clone().flatten() for p in live],
                       [p.grad.detach().clone().flatten() for p in live], *states))
    idle = [p for g in opt.param_groups for p in g["params"] if p.grad is None]
    idle_before = [(p.detach().clone(), {k: t.clone() for k, t in opt.state[p].items()} if opt.state.get(p) else None)
                   for p in idle]
    skipped = opt.skipped_coordinates().item()
    opt.step()
    bad = 0
    for group, live, thetas, grads, hs, cs in before:
        update = Update(group["lr"], float(group["weight_decay"]), group["maximize"])
        bad += check_group_step(group["net"], thetas, grads, hs, cs, [p.detach().flatten() for p in live],
                                [opt.state[p]["h"] for p in live], [opt.state[p]["c"] for p in live],
                                group["state_dtype"], update)
    for p, (value, state) in zip(idle, idle_before):
        assert torch.equal(p, value), "a parameter without a gradient moved"
        if state is None:
            assert not opt.state.get(p), "a parameter that never had a gradient got state"
        else:
            assert all(torch.equal(opt.state[p][k], t) for k, t in state.items()), "state without a gradient changed"
    assert opt.skipped_coordinates().item() == skipped + bad, "only NaN and ±inf gradients count as skipped"


# --- the update: lr, weight decay, maximize, zero and missing gradients ---------------------------------


@pytest.mark.parametrize("option", OPTION_NAMES)
@pytest.mark.parametrize("backend_device", BACKENDS + [pytest.param(("triton", "cpu"), id="triton-interpreted")])
def test_step_is_the_documented_update(seed, backend_device, option):
    """The update rule every PyTorch test relies on (test_forloop_goes_right_direction's ground truth; the
    dtype half of test_mixed_device_dtype): every option, a group of four parameter dtypes, adversarial
    gradients with exact zeros, NaN and ±inf, and a parameter without a gradient."""
    backend, device = backend_or_skip(*backend_device)
    net = random_net().to(device)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    shapes = [(6, 5), (7,), (3, 3), (4,)]
    params = [Parameter(torch.randn(s, dtype=torch.float64).to(dt).to(device)) for s, dt in zip(shapes, dtypes)]
    idle = Parameter(torch.randn(5, device=device))
    opt = L2LOptimizer(params + [idle], net=net, backend=backend, **_options(option, device))
    for step in range(3):
        for p in params:
            p.grad = grad_for(p.numel(), net.preprocess_p, p.dtype).view_as(p).to(device)
        if step == 1:
            params[0].grad[1, 2], params[1].grad[3], params[3].grad[0] = float("nan"), float("inf"), -float("inf")
        _step_and_check(opt)
    assert idle not in opt.state


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("lr", [1.0, 0.3])
def test_maximize_is_the_step_on_the_negated_gradient(seed, backend_device, lr):
    """maximize=True (in test_forloop_goes_right_direction's optim inputs): the net sees −∇; bit for bit
    the step of maximize=False on −∇, state included."""
    backend, device = backend_or_skip(*backend_device)
    net = random_net().to(device)
    up = [Parameter(torch.randn(s, device=device)) for s in [(6, 5), (9,)]]
    down = [Parameter(p.detach().clone()) for p in up]
    opt_up = L2LOptimizer(up, net=net, backend=backend, lr=lr, weight_decay=0.1, maximize=True)
    opt_down = L2LOptimizer(down, net=net, backend=backend, lr=lr, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(up, down):
            p.grad = grad_for(p.numel(), net.preprocess_p, p.dtype).view_as(p).to(device)
            q.grad = -p.grad
        opt_up.step()
        opt_down.step()
        for p, q in zip(up, down):
            assert torch.equal(p, q)
            assert all(torch.equal(opt_up.state[p][k], opt_down.state[q][k]) for k in ("h", "c"))


@pytest.mark.parametrize("option", OPTION_NAMES)
def test_step_is_noop_when_params_have_no_grad(seed, option):
    """test_step_is_noop_when_params_have_no_grad: parameters that do not require grad; step(closure)
    returns the closure's value and touches nothing, weight decay included."""
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone() for p in params]
    opt = L2LOptimizer(params, net=random_net(), **_options(option))
    loss = torch.tensor([1.0])
    assert opt.step(lambda: loss) is loss
    assert all(torch.equal(p, o) for p, o in zip(params, old))
    assert not opt.state


@pytest.mark.parametrize("option", OPTION_NAMES)
@pytest.mark.parametrize("backend_device", BACKENDS)
def test_step_is_noop_for_zero_grads(seed, backend_device, option):
    """test_step_is_noop_for_zero_grads: a zero gradient moves nothing. PyTorch skips its weight-decay
    inputs (decay moves θ whatever the gradient); here they keep the LSTM state and only decay. Checked
    before any step and after steps that left the state non-zero (where the net, stepped, would move θ),
    and through zero_grad(set_to_none=False), the usual way a gradient is exactly zero."""
    backend, device = backend_or_skip(*backend_device)
    net = random_net().to(device)
    model = torch.nn.Linear(5, 1).to(device)
    opt = L2LOptimizer(model.parameters(), net=net, backend=backend, **_options(option, device))
    x = torch.randn(8, 5, device=device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    _step_and_check(opt)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    _step_and_check(opt)
    if float(opt.param_groups[0]["weight_decay"]) == 0:
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option", ["default", "all"])
def test_model_scenario_steps_are_the_documented_update(seed, backend_device, dtype, option):
    """The scenario of _test_derived_optimizers/_compare_between (test_foreach_matches_forloop,
    test_fused_matches_forloop): a sigmoid MLP in each float dtype plus a 0-dim parameter (and here a
    0-element one), 7 steps, no gradients at step 2, the last layer frozen at steps 3-4. PyTorch compares
    the fused kernel with the for-loop; each backend is compared with the documented update here."""
    backend, device = backend_or_skip(*backend_device)
    net = random_net().to(device)
    inputs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype, device=device).reshape(3, 2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    model.to(dtype=dtype, device=device)
    scalar = torch.randn((), device=device, dtype=dtype, requires_grad=True)  # PyTorch's is torch.empty: maybe NaN
    empty = torch.empty(0, device=device, dtype=dtype, requires_grad=True)
    scalar.grad, empty.grad = torch.rand_like(scalar), torch.rand_like(empty)
    opt = L2LOptimizer(list(model.parameters()) + [scalar, empty], net=net, backend=backend, **_options(option, device))
    _step_and_check(opt)
    for i in range(1, 7):
        opt.zero_grad()
        if i == 3:
            model[2].requires_grad_(False)
        if i == 5:
            model[2].requires_grad_(True)
        if i != 2:
            model(inputs).sum().backward()
        _step_and_check(opt)
    assert opt.state[empty]["h"].shape == (2, 0, 20)


# --- goes the right direction, with and without schedulers ---------------------------------------------


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("option", OPTION_NAMES)
def test_goes_right_direction(seed, option, contiguous):
    """test_forloop_goes_right_direction (with_lrsched=False): 20 steps through step(closure) lower the
    loss (raise it with maximize), on contiguous and strided parameters; step returns the closure's loss."""
    weight, bias, x = _linear_problem(contiguous=contiguous)
    opt = L2LOptimizer([weight, bias], net=_quadratic_net(), **_options(option))
    closure = functools.partial(_loss, opt, weight, bias, x)
    initial = closure().item()
    for _ in range(STEPS):
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert weight.is_contiguous() == contiguous  # stepped in place, not replaced
    _assert_right_direction(initial, closure().item(), opt.param_groups[0]["maximize"])


@CUDA
def test_goes_right_direction_on_two_devices(seed):
    """test_forloop_goes_right_direction_multigpu, with the CPU as the second device: one group, one
    parameter on each device."""
    weight, _, x = _linear_problem("cuda")
    bias = Parameter(torch.randn(10))
    opt = L2LOptimizer([weight, bias], net=_quadratic_net("cuda"))

    def closure():
        opt.zero_grad()
        loss = (weight.mv(x).cpu() + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(STEPS):
        opt.step(closure)
    _assert_right_direction(initial, closure().item(), False)
    assert opt.state[weight]["h"].is_cuda and not opt.state[bias]["h"].is_cuda


SCHEDULERS = {  # every scheduler of torch.optim.lr_scheduler (and SWALR); none may need momentum or betas
    "LambdaLR": lambda opt: [lrs.LambdaLR(opt, lambda epoch: 0.9**epoch)],
    # a lambda of NumPy float32s makes lr a np.float32 (not a float subclass); torch.optim takes it
    "LambdaLR-numpy": lambda opt: [lrs.LambdaLR(opt, lambda epoch: np.float32(0.9) ** epoch)],
    "MultiplicativeLR": lambda opt: [lrs.MultiplicativeLR(opt, lambda epoch: 0.9)],
    "StepLR": lambda opt: [lrs.StepLR(opt, step_size=3, gamma=0.5)],
    "MultiStepLR": lambda opt: [lrs.MultiStepLR(opt, milestones=[2, 5], gamma=0.5)],
    "ConstantLR": lambda opt: [lrs.ConstantLR(opt, factor=0.4, total_iters=4)],
    "LinearLR": lambda opt: [lrs.LinearLR(opt, start_factor=0.4, total_iters=4)],
    "ExponentialLR": lambda opt: [lrs.ExponentialLR(opt, gamma=0.9)],
    "SequentialLR": lambda opt: [lrs.SequentialLR(
        opt, [lrs.ConstantLR(opt, factor=0.5, total_iters=2), lrs.ExponentialLR(opt, gamma=0.9)], milestones=[2])],
    "CosineAnnealingLR": lambda opt: [lrs.CosineAnnealingLR(opt, T_max=5)],
    "ChainedScheduler": lambda opt: [lrs.ChainedScheduler(
        [lrs.ConstantLR(opt, factor=0.5, total_iters=3), lrs.ExponentialLR(opt, gamma=0.9)])],
    "ReduceLROnPlateau": lambda opt: [lrs.ReduceLROnPlateau(opt, factor=0.5, patience=0)],
    "CyclicLR": lambda opt: [lrs.CyclicLR(opt, base_lr=0.1, max_lr=1.0, step_size_up=3, cycle_momentum=False)],
    "CosineAnnealingWarmRestarts": lambda opt: [lrs.CosineAnnealingWarmRestarts(opt, T_0=3)],
    "OneCycleLR": lambda opt: [lrs.OneCycleLR(opt, max_lr=1.0, total_steps=STEPS + 1, cycle_momentum=False)],
    "PolynomialLR": lambda opt: [lrs.PolynomialLR(opt, total_iters=4, power=0.9)],
    "SWALR": lambda opt: [SWALR(opt, swa_lr=0.05, anneal_epochs=3)],
    # optim_db's default scheduler_inputs: two schedulers at once
    "StepLR+ReduceLROnPlateau": lambda opt: [lrs.StepLR(opt, gamma=0.9, step_size=10), lrs.ReduceLROnPlateau(opt)],
}


def _scheduler_step(schedulers, metric):
    for s in schedulers:
        if isinstance(s, lrs.ReduceLROnPlateau):
            s.step(metric)
        else:
            s.step()


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_param_group_with_lrscheduler_goes_right_direction(seed, scheduler):
    """test_param_group_with_lrscheduler_goes_right_direction (and test_forloop_goes_right_direction with
    with_lrsched=True): two groups, one with lr 0.01, under each scheduler; ReduceLROnPlateau gets the loss."""
    weight = Parameter(torch.randn(10, 5))
    weight2 = Parameter(torch.randn(10, 5))
    x = torch.randn(5)
    opt = L2LOptimizer([{"params": [weight]}, {"params": [weight2], "lr": 0.01}], net=_quadratic_net())
    schedulers = SCHEDULERS[scheduler](opt)

    def closure():
        opt.zero_grad()
        loss = (weight.mv(x) + weight2.mv(x)).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(STEPS):
        loss = opt.step(closure)
        _scheduler_step(schedulers, loss.item())
    _assert_right_direction(initial, closure().item(), False)


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("device", DEVICES)
def test_every_scheduler_sets_the_lr_the_step_uses(seed, device, scheduler, lr_kind):
    """What the direction tests take on trust: at every step the update is lr·Δ (and the decay lr·wd) with
    the lr the scheduler set, per group. A tensor lr is changed in place by the scheduler (PyTorch's
    schedulers fill_ it) and read by the kernel, on the parameters' device. The options a scheduler adds to
    the groups (initial_lr, max_lr, min_lr, swa_lr) survive a state-dict round trip, after which the run
    continues bit for bit."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    net = random_net().to(device)

    def make():
        lr = (lambda v: torch.tensor(v, device=device)) if lr_kind == "tensor" else float
        params = [Parameter(torch.randn(6, 5, device=device)), Parameter(torch.randn(7, device=device))]
        opt = L2LOptimizer([{"params": params[:1], "lr": lr(1.0), "weight_decay": 0.1},
                            {"params": params[1:], "lr": lr(0.3)}], net=net)
        return params, opt

    params, opt = make()
    lr_objects = [g["lr"] for g in opt.param_groups]
    schedulers = SCHEDULERS[scheduler](opt)
    lrs_seen = []
    for _ in range(6):
        for p in params:
            p.grad = grad_for(p.numel(), net.preprocess_p, p.dtype).view_as(p).to(device)
        lrs_seen.append([float(g["lr"]) for g in opt.param_groups])
        _step_and_check(opt)  # reads each group's lr as it is now
        _scheduler_step(schedulers, 1.0)  # a metric that never improves: ReduceLROnPlateau decays
        if lr_kind == "tensor":
            assert all(g["lr"] is t for g, t in zip(opt.param_groups, lr_objects)), "the tensor lr was replaced"
            assert all(g["lr"].device == params[0].device for g in opt.param_groups)
    if scheduler != "StepLR+ReduceLROnPlateau":  # both wait 10 steps
        assert len({tuple(s) for s in lrs_seen}) > 1, "the scheduler never changed lr"

    saved_opt, saved_scheds = _round_trip(opt.state_dict()), [s.state_dict() for s in schedulers]
    twin_params, twin = make()
    with torch.no_grad():
        for p, q in zip(params, twin_params):
            q.copy_(p)
    twin_schedulers = SCHEDULERS[scheduler](twin)
    twin.load_state_dict(saved_opt)
    for s, state in zip(twin_schedulers, saved_scheds):
        s.load_state_dict(state)
    for _ in range(2):
        for p, q in zip(params, twin_params):
            p.grad = grad_for(p.numel(), net.preprocess_p, p.dtype).view_as(p).to(device)
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
        _scheduler_step(schedulers, 1.0)
        _scheduler_step(twin_schedulers, 1.0)
        assert all(torch.equal(p, q) for p, q in zip(params, twin_params))
        assert [float(g["lr"]) for g in opt.param_groups] == [float(g["lr"]) for g in twin.param_groups]


def test_momentum_cycling_schedulers_are_refused():
    """CyclicLR and OneCycleLR cycle momentum by default, and refuse an optimizer with neither momentum nor
    betas among its defaults: the learned optimizer has no momentum to cycle (cycle_momentum=False works,
    above)."""
    opt = L2LOptimizer([Parameter(torch.randn(3))], net=random_net())
    with pytest.raises(ValueError, match="momentum"):
        lrs.CyclicLR(opt, base_lr=0.1, max_lr=1.0)
    with pytest.raises(ValueError, match="momentum"):
        lrs.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    assert all(k not in opt.param_groups[0] for k in ("momentum", "betas"))


# --- lr and weight decay per param group -----------------------------------------------------------------


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device,lr_device", [("cpu", "cpu"), pytest.param("cuda", "cuda", marks=CUDA),
                                              pytest.param("cuda", "cpu", marks=CUDA)])
def test_tensor_lr(seed, device, lr_device, lr_dtype):
    """test_tensor_lr (num_dim=0): a 0-dim tensor lr steps as the same float lr, on the parameters' device
    and, as PyTorch also checks, on the CPU for CUDA parameters."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    weight, bias, x = _linear_problem(device)
    weight_c, bias_c = (Parameter(t.detach().clone()) for t in (weight, bias))
    net = random_net().to(device)
    opt_r = L2LOptimizer([weight, bias], net=net, lr=1e-3)
    opt = L2LOptimizer([weight_c, bias_c], net=net, lr=torch.tensor(1e-3, dtype=lr_dtype, device=lr_device))
    initial = weight.detach().clone()
    for _ in range(5):
        _loss(opt_r, weight, bias, x)
        opt_r.step()
        _loss(opt, weight_c, bias_c, x)
        opt.step()
        torch.testing.assert_close(weight, weight_c)
        torch.testing.assert_close(bias, bias_c)
    assert not torch.equal(weight, initial)


@pytest.mark.parametrize("option", OPTION_NAMES)
def test_param_groups_lr(seed, option):
    """test_param_groups_lr: the optimizer-wide lr is 1e-28 and one group brings its own; that group goes
    the right direction and the other group's parameter, though it has gradients, does not move."""
    weight, bias, x = _linear_problem()
    irrelevant = Parameter(torch.randn(2))
    irrelevant_clone = irrelevant.detach().clone()
    kwargs = _options(option)
    kwargs.setdefault("lr", 1.0)
    groups = [dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])]
    opt = L2LOptimizer(groups, net=_quadratic_net(), lr=1e-28)
    initial = _loss(opt, weight, bias, x).item()
    for _ in range(STEPS):
        _loss(opt, weight, bias, x)
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    _assert_right_direction(initial, _loss(opt, weight, bias, x).item(), kwargs.get("maximize", False))
    assert torch.equal(irrelevant, irrelevant_clone)
    assert opt.param_groups[1]["lr"] == 1e-28 and irrelevant in opt.state  # stepped, by 1e-28·Δ


@pytest.mark.parametrize("option", OPTION_NAMES)
def test_param_groups_weight_decay(seed, option):
    """test_param_groups_weight_decay: weight decay on the weight's group, none on the bias's; the loss
    still goes the right direction, and the decay is the group's own."""
    weight, bias, x = _linear_problem()
    weight_kwargs = {**_options(option), "weight_decay": 0.1}
    bias_kwargs = {**_options(option), "weight_decay": 0.0}
    groups = [dict(params=[weight], **weight_kwargs), dict(params=[bias], **bias_kwargs)]
    opt = L2LOptimizer(groups, net=_quadratic_net())
    initial = _loss(opt, weight, bias, x).item()
    for _ in range(STEPS):
        _loss(opt, weight, bias, x)
        opt.step()
    _assert_right_direction(initial, _loss(opt, weight, bias, x).item(), weight_kwargs.get("maximize", False))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    _loss(opt, weight, bias, x)
    _step_and_check(opt)


@pytest.mark.parametrize("option", ["default", "all"])
def test_set_default_dtype_does_not_change_the_step(seed, option):
    """test_set_default_dtype_works_with_foreach: under a float64 default dtype the state keeps its
    state_dtype, the count stays int64, and the steps are bit for bit those under float32."""
    net = random_net()
    grads = [[grad_for(n, 10.0, torch.float32) for n in (30, 7)] for _ in range(3)]
    runs = []
    for default in (torch.float32, torch.float64):
        old = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            params = [Parameter(torch.zeros(n, dtype=torch.float32)) for n in (30, 7)]
            kwargs = _options(option)
            if isinstance(kwargs.get("lr"), torch.Tensor):
                kwargs["lr"] = float(kwargs["lr"])  # a tensor lr made here would be float64: test_tensor_lr has that
            opt = L2LOptimizer(params, net=net, **kwargs)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                opt.step()
            assert all(opt.state[p][k].dtype == torch.float32 for p in params for k in ("h", "c"))
            assert opt.skipped_coordinates().dtype == torch.int64
            runs.append([p.detach().clone() for p in params])
        finally:
            torch.set_default_dtype(old)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# --- state and state dicts -------------------------------------------------------------------------------


@pytest.mark.parametrize("option", OPTION_NAMES)
def test_optimizer_can_be_printed(option):
    """test_optimizer_can_be_printed; the repr lists each group's options."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    text = repr(L2LOptimizer(params, net=random_net(), **_options(option)))
    assert "Parameter Group 0" in text
    for key in ("lr", "weight_decay", "maximize"):
        assert f"    {key}: " in text


def test_non_empty_state(seed):
    """test_non_empty_state: after a step every parameter's state holds h and c, [L, numel, H]."""
    model = torch.nn.Linear(5, 5)
    opt = L2LOptimizer(model.parameters(), net=random_net())
    opt.zero_grad()
    model(torch.rand(2, 5)).sum().backward()
    opt.step()
    assert set(opt.state) == set(model.parameters())
    for p, state in opt.state.items():
        assert set(state) == {"h", "c"} and all(state[k].shape == (2, p.numel(), 20) for k in ("h", "c"))


@pytest.mark.parametrize("option,named0,named1", [(o, False, False) for o in OPTION_NAMES]
                         + [("all", True, True), ("all", True, False), ("all", False, True)])
def test_state_dict_deterministic(seed, option, named0, named1):
    """test_state_dict_deterministic: a state dict loaded into an optimizer of equal (not identical)
    parameters continues bit for bit, and both then give equal state dicts (param_names aside); repeated
    groups have identical representations."""
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    x = torch.randn(3)
    named = lambda ps, on: [(f"name{i}", p) for i, p in enumerate(ps)] if on else ps  # noqa: E731
    net = random_net()
    opt = L2LOptimizer(named([weight, bias], named0), net=net, **_options(option))
    for _ in range(10):
        opt.step(functools.partial(_loss, opt, weight, bias, x))
    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    opt_c = L2LOptimizer(named([weight_c, bias_c], named1), net=net, **_options(option))
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(10):
        opt.step(functools.partial(_loss, opt, weight, bias, x))
        opt_c.step(functools.partial(_loss, opt_c, weight_c, bias_c, x))
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    _assert_equal_nested(_without_param_names(opt.state_dict()), _without_param_names(opt_c.state_dict()))
    opt_c.param_groups.extend(opt_c.param_groups)
    _assert_equal_nested(_without_param_names(opt.state_dict())["param_groups"][-1],
                         _without_param_names(opt_c.state_dict())["param_groups"][-1])


def _conv_bn():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    return model, torch.rand(1, 4, 16, 16)


def _model_step(opt, model, x):
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()


def test_can_load_older_state_dict(seed):
    """test_can_load_older_state_dict: a state dict without the group options added since the first
    release (PyTorch's not_og_supported_flags) loads with their defaults and steps on, bit for bit as the
    optimizer that kept them."""
    net = random_net()
    model, x = _conv_bn()
    opt = L2LOptimizer(model.parameters(), net=net)
    for _ in range(3):
        _model_step(opt, model, x)
    twin_model = copy.deepcopy(model)
    twin = L2LOptimizer(twin_model.parameters(), net=net)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in NEWER_FLAGS:
            group.pop(flag)
    opt.load_state_dict(old)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["maximize"]) == (1.0, 0.0, False)
    assert (group["state_dtype"], group["capturable"]) == (torch.float32, False)
    for _ in range(2):
        _model_step(opt, model, x)
        _model_step(twin, twin_model, x)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))


@pytest.mark.parametrize("named1", [True, False])
@pytest.mark.parametrize("named0", [True, False])
def test_can_load_from_to_named_state_dict(seed, named0, named1):
    """test_can_load_from_to_named_state_dict: between optimizers made from parameters() and
    named_parameters(), either way; the names survive when either side had them."""
    model, x = _conv_bn()
    net = random_net()
    opt = L2LOptimizer(model.named_parameters() if named0 else model.parameters(), net=net, lr=0.5)
    for _ in range(3):
        _model_step(opt, model, x)
    saved = copy.deepcopy(opt.state_dict())
    opt2 = L2LOptimizer(model.named_parameters() if named1 else model.parameters(), net=net)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 0.5
    assert all(torch.equal(opt2.state[p]["h"], opt.state[p]["h"]) for p in model.parameters())
    _model_step(opt2, model, x)
    names = ["0.weight", "0.bias", "1.weight", "1.bias"]
    if named0 or named1:
        assert opt2.state_dict()["param_groups"][0]["param_names"] == names
        assert opt2.param_groups[0]["param_names"] == names
    else:
        assert "param_names" not in opt2.state_dict()["param_groups"][0]


@pytest.mark.parametrize("option,named", [(o, False) for o in OPTION_NAMES] + [("all", True)])
def test_save_load_equality_with_weights_only(seed, option, named):
    """test_save_load_equality_with_weights_only: torch.save then torch.load, with and without
    weights_only, gives back an equal state dict (the nets as their configs)."""
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    x = torch.randn(3)
    params = [("name0", weight), ("name1", bias)] if named else [weight, bias]
    opt = L2LOptimizer(params, net=random_net(), **_options(option))
    for _ in range(3):
        opt.step(functools.partial(_loss, opt, weight, bias, x))
    sd = opt.state_dict()
    assert isinstance(sd["param_groups"][0]["net"], dict)
    with tempfile.TemporaryFile() as f:
        torch.save(sd, f)
        f.seek(0)
        _assert_equal_nested(torch.load(f, weights_only=False), sd)
        f.seek(0)
        _assert_equal_nested(torch.load(f, weights_only=True), sd)


@pytest.mark.parametrize("loader_lr", ["tensor", "float"])
def test_load_state_dict_does_not_alias_the_source(seed, loader_lr):
    """torch.optim's load_state_dict deep-copies the saved param groups: loading another optimizer's live
    state_dict() (no copy) leaves the two independent, so a scheduler changing the source's tensor lr in
    place, or a step of the source, does not reach the loader, whatever lr it had."""
    net = random_net()
    a, b = Parameter(torch.randn(6)), Parameter(torch.randn(6))
    opt_a = L2LOptimizer([a], net=net, lr=torch.tensor(0.5))
    scheduler = lrs.ExponentialLR(opt_a, gamma=0.5)
    opt_b = L2LOptimizer([b], net=net, lr=torch.tensor(0.5) if loader_lr == "tensor" else 0.5)
    a.grad = torch.randn(6)
    opt_a.step()
    opt_b.load_state_dict(opt_a.state_dict())
    group_b = opt_b.param_groups[0]
    assert float(group_b["lr"]) == 0.5 and float(group_b["initial_lr"]) == 0.5
    shared = [k for k, v in group_b.items() if isinstance(v, torch.Tensor)
              and any(v is w for w in opt_a.param_groups[0].values())]
    assert not shared, f"options {shared} are the source's own tensors"
    scheduler.step()
    assert float(opt_a.param_groups[0]["lr"]) == 0.25
    assert float(group_b["lr"]) == 0.5, "the loaded lr follows the source's scheduler"
    h_b = opt_b.state[b]["h"].clone()
    a.grad = torch.randn(6)
    opt_a.step()
    assert torch.equal(opt_b.state[b]["h"], h_b)


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"weight_decay": -0.5}, {"momentum": 0.9}, {"betas": (0.9, 0.999)}])
def test_load_state_dict_validates_group_options_before_changing_anything(seed, bad):
    """The group options a state dict brings are checked as the constructor checks them, and a bad one
    changes nothing (PyTorch's test_errors, for the state-dict door)."""
    net = random_net()
    p = Parameter(torch.randn(6))
    opt = L2LOptimizer([p], net=net, lr=0.5)
    p.grad = torch.randn(6)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0].update(bad)
    sd["state"][0]["h"].fill_(7.0)
    options = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    h = opt.state[p]["h"].clone()
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(sd)
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == options
    assert torch.equal(opt.state[p]["h"], h)


@CUDA
def test_state_dict_with_cuda_params(seed):
    """test_state_dict_with_cuda_params: a CPU optimizer's state dict loads into one over the same
    parameters on CUDA (state moved there, the state dict unchanged), and the two runs then agree."""
    net = random_net()
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = L2LOptimizer(params, net=net, lr=torch.tensor(0.5), weight_decay=0.1)
    for _ in range(3):
        opt.step()
    with torch.no_grad():
        params_cuda = [Parameter(p.cuda()) for p in params]
    for p, q in zip(params, params_cuda):
        q.grad = p.grad.cuda()
    opt_cuda = L2LOptimizer(params_cuda, net=copy.deepcopy(net).cuda(), lr=torch.tensor(0.5, device="cuda"),
                            weight_decay=0.1)
    sd_cpu, sd_cuda = copy.deepcopy(opt.state_dict()), copy.deepcopy(opt.state_dict())
    opt_cuda.load_state_dict(sd_cuda)
    _assert_equal_nested(sd_cpu, sd_cuda)
    assert all(opt_cuda.state[q][k].is_cuda for q in params_cuda for k in ("h", "c"))
    for _ in range(5):
        opt.step()
        opt_cuda.step()
        for p, q in zip(params, params_cuda):
            torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-5)


@CUDA
def test_cpu_state_dict_loads_into_a_capturable_cuda_optimizer(seed):
    """test_cpu_load_state_dict (impl=capturable): a checkpoint on the CPU (torch.load map_location="cpu")
    with capturable=True in its groups loads into a capturable CUDA optimizer, which then steps."""
    net = random_net()
    param = Parameter(torch.tensor([0.1, 0.2]))
    opt = L2LOptimizer([param], net=net)
    param.grad = torch.rand_like(param)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["capturable"] = True
    param_cuda = Parameter(param.detach().cuda())
    opt_cuda = L2LOptimizer([param_cuda], net=copy.deepcopy(net).cuda(), capturable=True)
    opt_cuda.load_state_dict(sd)
    assert opt_cuda.state[param_cuda]["h"].is_cuda
    param_cuda.grad = torch.rand_like(param_cuda)
    opt_cuda.step()


# --- hooks -----------------------------------------------------------------------------------------------


def _state_dict_pre_hook(optimizer: Optimizer) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer: Optimizer, state_dict: dict) -> dict:
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    state_dict["saw_net_configs"] = all(isinstance(g["net"], dict) for g in state_dict["param_groups"])
    return state_dict


def _hooked_optimizer():
    return L2LOptimizer([torch.rand(2, 3, requires_grad=True)], net=random_net())


def test_state_dict_pre_hook():
    """test_state_dict_pre_hook."""
    opt = _hooked_optimizer()
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert opt.state_dict()["state"]["test"] == 1


def test_state_dict_post_hook():
    """test_state_dict_post_hook; a user's post hook runs after the one that turns nets into configs."""
    opt = _hooked_optimizer()
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = opt.state_dict()
    assert state_dict["ran_state_dict_pre_hook"] is False
    assert state_dict["saw_net_configs"] is True


def test_state_dict_pre_post_hook():
    """test_state_dict_pre_post_hook."""
    opt = _hooked_optimizer()
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = opt.state_dict()
    assert "test" not in state_dict["state"]
    assert state_dict["ran_state_dict_pre_hook"] is True


def _load_state_dict_pre_hook1(optimizer: Optimizer, state_dict: dict) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer: Optimizer, state_dict: dict) -> dict:
    # a hook that returns a new state dict (a deep copy here) must have that one loaded
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer: Optimizer) -> None:
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


def test_load_state_dict_pre_hook_and_prepend():
    """test_load_state_dict_pre_hook_and_prepend: hooks may rewrite the state dict, prepended hooks first."""
    opt = _hooked_optimizer()
    state_dict = opt.state_dict()
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002  # 0.003 had hook2 run last


def test_load_state_dict_post_hook():
    """test_load_state_dict_post_hook."""
    opt = _hooked_optimizer()
    opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is False
    assert opt.state["ran_load_state_dict_post_hook"] is True


def test_load_state_dict_pre_post_hook():
    """test_load_state_dict_pre_post_hook."""
    opt = _hooked_optimizer()
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
    opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is True
    assert opt.state["ran_load_state_dict_post_hook"] is True


def _stepping_optimizer():
    """PyTorch's hook tests step a parameter without a gradient; this one moves, so a hook's place
    (before or after the update) shows."""
    p = Parameter(torch.tensor([1.0, 1.0]))
    p.grad = torch.tensor([0.5, -0.5])
    return p, L2LOptimizer([p], net=random_net())


@pytest.mark.parametrize("when", ["pre", "post"])
def test_step_pre_and_post_hooks(seed, when):
    """test_step_pre_hook, test_step_post_hook: a hook runs before (pre) or after (post) the update, at
    every step, until removed."""
    p, opt = _stepping_optimizer()
    calls, seen = [0], []

    def hook(opt, args, kwargs):
        calls[0] += 1
        seen.append(p.detach().clone())

    handle = (opt.register_step_pre_hook if when == "pre" else opt.register_step_post_hook)(hook)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p, before) and torch.equal(seen[0], before if when == "pre" else p)
    opt.step()
    assert calls[0] == 2
    handle.remove()
    opt.step()
    assert calls[0] == 2


def test_step_all_hooks(seed):
    """test_step_all_hooks: global and per-optimizer hooks in PyTorch's order, next to an SGD."""
    _, opt = _stepping_optimizer()
    opt2 = SGD([torch.tensor([1.0, 1.0])])
    data = []
    handles = [register_optimizer_step_pre_hook(lambda *a: data.append(0)),
               register_optimizer_step_post_hook(lambda *a: data.append(5))]
    try:
        for o in (opt, opt2):
            handles += [o.register_step_pre_hook(lambda *a: data.append(1)),
                        o.register_step_post_hook(lambda *a: data.append(2))]
        opt.step()
        assert data == [0, 1, 2, 5]
        opt2.step()
        assert data == [0, 1, 2, 5] * 2
        opt.step()
        assert data == [0, 1, 2, 5] * 3
    finally:
        for handle in handles:
            handle.remove()
    opt.step()
    opt2.step()
    assert data == [0, 1, 2, 5] * 3


# --- copies ----------------------------------------------------------------------------------------------


def _copy_steps_on(opt, copied):
    """``copied`` (a deepcopy or an unpickled ``opt``) owns copies of the parameters and the state, steps
    as ``opt`` would, apart from it, and writes checkpoints that load."""
    params = [p for g in opt.param_groups for p in g["params"]]
    copied_params = [p for g in copied.param_groups for p in g["params"]]
    assert all(p is not q and torch.equal(p, q) for p, q in zip(params, copied_params))
    for p, q in zip(params, copied_params):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    copied.step()
    for p, q in zip(params, copied_params):
        assert torch.equal(p, q)
        assert all(torch.equal(opt.state[p][k], copied.state[q][k]) for k in ("h", "c"))
    counts = opt.skipped_coordinates().item(), copied.skipped_coordinates().item()
    copied_params[0].grad = torch.randn_like(copied_params[0])
    copied_params[0].grad.view(-1)[0] = float("nan")
    copied.step()
    assert copied.skipped_coordinates().item() == counts[1] + 1
    assert opt.skipped_coordinates().item() == counts[0]
    saved = _round_trip(copied.state_dict())
    fresh = L2LOptimizer([Parameter(p.detach().clone()) for p in copied_params], net=copied.param_groups[0]["net"])
    fresh.load_state_dict(saved)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("option", OPTION_NAMES)
def test_deepcopy_copies_all_public_attrs(seed, option, how):
    """test_deepcopy_copies_all_public_attrs, after some state, and the pickle round trip that
    Optimizer.__setstate__ supports (multiprocessing): the copy is a working optimizer of its own."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = L2LOptimizer(params, net=random_net(), **_options(option))
    for _ in range(3):
        opt.step()
    public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}  # noqa: E731
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert public(opt) == public(copied)
    _copy_steps_on(opt, copied)


@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy", "pickle"])
def test_add_param_group_after_a_restore(seed, how):
    """Optimizer.__setstate__ (run by load_state_dict, deepcopy and unpickling) adds defaults such as
    "differentiable"; a group added afterwards still gets valid options and steps."""
    net = random_net()
    p = Parameter(torch.randn(4))
    opt = L2LOptimizer([p], net=net, lr=0.5, weight_decay=0.1)
    p.grad = torch.randn(4)
    opt.step()
    if how == "load_state_dict":
        opt.load_state_dict(opt.state_dict())
    elif how == "deepcopy":
        opt = copy.deepcopy(opt)
    else:
        opt = pickle.loads(pickle.dumps(opt))
    q = Parameter(torch.randn(3))
    opt.add_param_group({"params": [q]})
    group = opt.param_groups[-1]
    assert (group["lr"], group["weight_decay"], group["maximize"]) == (0.5, 0.1, False)
    q.grad = torch.randn(3)
    for r in opt.param_groups[0]["params"]:
        r.grad = None
    _step_and_check(opt)


# --- errors ----------------------------------------------------------------------------------------------


_P = Parameter(torch.randn(1, 1))
_P2 = Parameter(torch.randn(1, 1))
ERRORS = {  # name: (params, kwargs, error, regex); get_error_inputs_for_all_optims, then Adam's own
    "invalid param type": (_P, {}, TypeError, "iterable of Tensors or dicts"),
    "duplicate across groups": ([{"params": _P}, {"params": _P}], {}, ValueError, "more than one parameter group"),
    "tensor lr of 2 elements": ([_P], {"lr": torch.tensor([1e-3, 1e-3])}, ValueError, "lr"),
    "params with and without names": ([("weight", _P), _P2], {}, ValueError, "with/without names"),
    "groups with and without names": ([{"params": [_P], "lr": 1e-2}, {"params": [("weight", _P2)]}], {}, ValueError,
                                      "with/without names"),
    "empty parameter list": ([], {}, ValueError, "empty parameter list"),
    "negative lr": ([_P], {"lr": -1e-2}, ValueError, "lr"),
    "negative weight_decay": ([_P], {"weight_decay": -0.5}, ValueError, "weight_decay"),
    "group negative lr": ([{"params": [_P], "lr": -1e-2}], {}, ValueError, "lr"),
    "group negative weight_decay": ([{"params": [_P], "weight_decay": -0.5}], {}, ValueError, "weight_decay"),
    "group momentum": ([{"params": [_P], "momentum": 0.9}], {}, ValueError, "momentum"),
    "group betas": ([{"params": [_P], "betas": (0.9, 0.999)}], {}, ValueError, "betas"),
    "group eps": ([{"params": [_P], "eps": 1e-8}], {}, ValueError, "eps"),
    "group nesterov": ([{"params": [_P], "nesterov": True}], {}, ValueError, "nesterov"),
    # PyTorch's "global cliquey" flags ask for an implementation this optimizer does not have
    "group foreach": ([{"params": [_P], "foreach": True}], {}, ValueError, "foreach"),
    "group fused": ([{"params": [_P], "fused": True}], {}, ValueError, "fused"),
    "group differentiable": ([{"params": [_P], "differentiable": True}], {}, ValueError, "differentiable"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors(case):
    """test_errors, construction errors: the inputs PyTorch gives every optimizer
    (get_error_inputs_for_all_optims), Adam's lr and weight_decay ones, and the keys of other optimizers
    that this one would otherwise ignore."""
    params, kwargs, error, regex = ERRORS[case]
    with pytest.raises(error, match=regex):
        L2LOptimizer(params, net=random_net(), **kwargs)


def test_errors_duplicate_parameters_warn():
    """test_errors: "a param group cannot have duplicate parameters" is a UserWarning in PyTorch."""
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
        L2LOptimizer([_P, _P], net=random_net())


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"weight_decay": -1.0}, {"momentum": 0.9}])
def test_errors_at_step_change_nothing(seed, bad):
    """test_errors' STEP_ERROR kind: a group option set after construction (by hand, or by a scheduler made
    for another optimizer) is checked when the step runs, before anything is written."""
    params = [Parameter(torch.randn(4)), Parameter(torch.randn(3))]
    opt = L2LOptimizer([{"params": params[:1]}, {"params": params[1:]}], net=random_net())
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(opt, params)
    opt.param_groups[1].update(bad)
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"weight_decay": -1.0}, {"momentum": 0.9}])
def test_add_param_group_errors_leave_the_groups_as_they_were(bad):
    """add_param_group checks a group as the constructor does, before adding it."""
    opt = L2LOptimizer([Parameter(torch.randn(3))], net=random_net())
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [Parameter(torch.randn(2))], **bad})
    assert len(opt.param_groups) == 1
