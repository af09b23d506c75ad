import copy
import io

import pytest
import torch

from l2l_fused import L2LOptimizer, LSTMOptimizerNet, l2l_update_ref
from helpers import adversarial_grad, assert_unchanged, backend_or_skip, grad_for, random_net, snapshot


def _params(shapes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]


def _set_grads(params, generator=None):
    for p in params:
        p.grad = grad_for(p.numel(), 10.0, p.dtype, generator).view_as(p)


def _expected_update(net, params, states):
    """The reference on the group's concatenated coordinates, in float32, where a zero gradient's
    coordinate gets no update (-0.0: θ + Δ is θ exactly) and keeps its state."""
    grad = torch.cat([p.grad.float().flatten() for p in params])
    h_old = torch.cat([s[0] for s in states], 1)
    c_old = torch.cat([s[1] for s in states], 1)
    delta, h, c = l2l_update_ref(grad, h_old, c_old, net.cell_weights(), net.head.weight, net.head.bias,
                                 preprocess_p=net.preprocess_p, output_scale=net.output_scale)
    zero = grad == 0
    h, c = (torch.where(zero[None, :, None], old, new) for old, new in ((h_old, h), (c_old, c)))
    return delta.detach().masked_fill(zero, -0.0), h.detach(), c.detach()


def test_group_step_is_the_reference_over_the_flat_group(seed):
    net = random_net()
    params = _params([(5, 3), (5,), (7, 1, 2)])
    before = [p.detach().clone() for p in params]
    opt = L2LOptimizer(params, net=net, backend="reference")
    for step in range(3):
        _set_grads(params)
        states = [(opt.state[p]["h"].clone(), opt.state[p]["c"].clone()) if step else net.init_state(p.numel())
                  for p in params]
        delta, h, c = _expected_update(net, params, states)
        before = [p.detach().clone() for p in params]
        opt.step()
        sizes = [p.numel() for p in params]
        for p, b, d, hh, cc in zip(params, before, delta.split(sizes), h.split(sizes, 1), c.split(sizes, 1)):
            torch.testing.assert_close(p.detach(), b + d.view_as(p), rtol=0, atol=0)
            torch.testing.assert_close(opt.state[p]["h"], hh, rtol=0, atol=0)
            torch.testing.assert_close(opt.state[p]["c"], cc, rtol=0, atol=0)
            assert opt.state[p]["h"].shape == (2, p.numel(), 20) and opt.state[p]["h"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_float_dtype_math_in_float32(seed, dtype):
    net = random_net()
    (p,) = _params([(4, 9)], dtype)
    _set_grads([p])
    before = p.detach().clone()
    delta, _, _ = _expected_update(net, [p], [net.init_state(p.numel())])
    L2LOptimizer([p], net=net, backend="reference").step()
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (before.to(wide) + delta.view_as(p).to(wide)).to(dtype)
    assert p.dtype == dtype
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0)


def _train(opt, params, grads):
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()


def test_state_dict_round_trip_continues_bit_identically(seed):
    net = random_net()
    params = _params([(6, 5), (11,)]) + _params([(3, 3)], torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    grads = [[adversarial_grad(p.numel(), 10.0, generator=gen).view_as(p).to(p.dtype) for p in params] for _ in range(6)]
    opt = L2LOptimizer([{"params": params[:2]}, {"params": params[2:], "backend": "reference"}], net=net)
    _train(opt, params, grads[:3])

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved_params = [p.detach().clone() for p in params]
    _train(opt, params, grads[3:])

    resumed_params = [torch.nn.Parameter(p) for p in saved_params]
    resumed = L2LOptimizer([{"params": resumed_params[:2]}, {"params": resumed_params[2:]}], net=copy.deepcopy(net))
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.param_groups[1]["backend"] == "reference"
    assert resumed.state[resumed_params[2]]["h"].dtype == torch.float32  # not cast to the bf16 parameter's dtype
    _train(resumed, resumed_params, grads[3:])
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
        for key in ("h", "c"):
            assert torch.equal(opt.state[a][key], resumed.state[b][key])


def test_params_without_grad_are_skipped(seed):
    net = random_net()
    a, b = _params([(4,), (5,)])
    opt = L2LOptimizer([a, b], net=net)
    _set_grads([a, b])
    opt.step()
    b_value, b_h = b.detach().clone(), opt.state[b]["h"].clone()
    a.grad = None
    b.grad = None
    a_value = a.detach().clone()
    a_h = opt.state[a]["h"].clone()
    _set_grads([b])
    b.grad = None
    opt.step()  # nothing has a gradient: nothing moves
    assert torch.equal(a, a_value) and torch.equal(opt.state[a]["h"], a_h)
    _set_grads([b])
    opt.step()
    assert torch.equal(a, a_value) and torch.equal(opt.state[a]["h"], a_h)
    assert not torch.equal(b, b_value) and not torch.equal(opt.state[b]["h"], b_h)
    c = torch.nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [c]})
    opt.step()
    assert c not in opt.state  # never had a gradient: no state


def test_param_groups_use_their_own_net(seed):
    net_a, net_b = random_net(), random_net(hidden_size=6, num_layers=1, preprocess_p=None, output_scale=1.0)
    a, b = _params([(8,), (9,)])
    opt = L2LOptimizer([{"params": [a]}, {"params": [b], "net": net_b}], net=net_a, backend="reference")
    _set_grads([a, b])
    expect_a = a.detach() + _expected_update(net_a, [a], [net_a.init_state(8)])[0]
    expect_b = b.detach() + _expected_update(net_b, [b], [net_b.init_state(9)])[0]
    opt.step()
    torch.testing.assert_close(a.detach(), expect_a, rtol=0, atol=0)
    torch.testing.assert_close(b.detach(), expect_b, rtol=0, atol=0)
    assert opt.state[b]["h"].shape == (1, 9, 6)


def test_closure_runs_with_grad_enabled_and_its_loss_is_returned(seed):
    model = torch.nn.Linear(3, 1)
    opt = L2LOptimizer(model.parameters(), net=random_net())
    x = torch.randn(8, 3)
    before = model.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not torch.equal(model.weight, before)
    opt.zero_grad()
    assert model.weight.grad is None


def test_bad_gradients_raise_and_change_nothing(seed):
    net = random_net()
    a, b = _params([(4,), (3, 2)])
    opt = L2LOptimizer([a, b], net=net)
    _set_grads([a, b])
    opt.step()
    before = snapshot(opt, [a, b])
    _set_grads([a])
    b.grad = torch.randn(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, [a, b], before)
    b.grad = None
    old_b = b.data
    b.data = torch.randn(7)  # a parameter resized under the optimizer: its state no longer fits
    b.grad = torch.randn(7)
    with pytest.raises(ValueError, match="cannot change shape"):
        opt.step()
    b.data = old_b
    assert_unchanged(opt, [a, b], before)


def test_constructor_errors():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="net must be an l2l_fused.LSTMOptimizerNet, got LSTMCell"):
        L2LOptimizer([p], net=torch.nn.LSTMCell(2, 20))
    with pytest.raises(ValueError, match="no net"):
        L2LOptimizer([p])
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        L2LOptimizer([p], net=LSTMOptimizerNet(), backend="cuda-magic")
    with pytest.raises(ValueError, match="complex64"):
        L2LOptimizer([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], net=LSTMOptimizerNet())
    opt = L2LOptimizer([p], net=LSTMOptimizerNet())
    with pytest.raises(TypeError, match="param group 1: net must be"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "net": "adam"})
    assert len(opt.param_groups) == 1


def test_load_state_dict_rejects_another_layout_or_net(seed):
    net = random_net()
    a, b = _params([(4,), (5,)])
    opt = L2LOptimizer([a, b], net=net)
    _set_grads([a, b])
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    before = snapshot(opt, [a, b])

    other = L2LOptimizer([a, b], net=random_net(hidden_size=8))
    with pytest.raises(ValueError, match="saved for a net"):
        other.load_state_dict(sd)
    assert not other.state

    with pytest.raises(ValueError, match="has 2 parameters, this optimizer.s 1"):
        L2LOptimizer([a], net=net).load_state_dict(sd)
    with pytest.raises(ValueError, match="param groups"):
        L2LOptimizer([{"params": [a]}, {"params": [b]}], net=net).load_state_dict(sd)

    c, d = _params([(4,), (6,)])
    wrong_shape = L2LOptimizer([c, d], net=net)
    with pytest.raises(ValueError, match=r"needs \[2, 6, 20\]"):
        wrong_shape.load_state_dict(sd)
    assert not wrong_shape.state
    assert_unchanged(opt, [a, b], before)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_nonfinite_gradients_are_skipped_and_counted_without_poisoning_the_state(seed, backend):
    backend_or_skip(backend, "cpu")
    net = random_net()
    params = _params([(6, 5), (9,)])
    opt = L2LOptimizer(params, net=net, backend=backend)
    assert opt.skipped_coordinates().item() == 0
    _set_grads(params)
    opt.step()
    before = [p.detach().clone() for p in params]
    states = [(opt.state[p]["h"].clone(), opt.state[p]["c"].clone()) for p in params]
    _set_grads(params)
    params[0].grad[1, 2], params[0].grad[4, 0], params[1].grad[8] = float("nan"), float("inf"), -float("inf")
    opt.step()
    count = opt.skipped_coordinates()
    assert count.dtype == torch.int64 and count.item() == 3
    flat = [(0, 1 * 5 + 2), (0, 4 * 5 + 0), (1, 8)]
    for i, j in flat:
        assert params[i].detach().flatten()[j] == before[i].flatten()[j]
        assert torch.equal(opt.state[params[i]]["h"][:, j], states[i][0][:, j])
        assert torch.equal(opt.state[params[i]]["c"][:, j], states[i][1][:, j])
    moving = (params[0].grad != 0).sum() - 2  # every other coordinate with a gradient signal moved
    assert (params[0].detach() != before[0]).sum() == moving

    _set_grads(params)  # finite again: those coordinates step on from their kept state
    opt.step()
    assert all(torch.isfinite(opt.state[p][k]).all() and torch.isfinite(p).all() for p in params for k in ("h", "c"))
    assert opt.skipped_coordinates().item() == 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_grad_scaler_skips_overflowing_steps_and_unscales_the_others(seed, device):
    """scaler.step(opt) as with Adam: a step whose scaled gradients overflow changes nothing; otherwise the
    optimizer sees the unscaled gradients."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3).to(device)
    twin = copy.deepcopy(model)
    net = random_net().to(device)
    opt, twin_opt = L2LOptimizer(model.parameters(), net=net), L2LOptimizer(twin.parameters(), net=net)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    x = torch.randn(8, 4, device=device)
    for overflow in (False, True, False):
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        scaler.scale(loss).backward()
        if overflow:
            model.weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if overflow:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert scaler.get_scale() == scale / 2
        else:
            twin_opt.zero_grad()
            twin(x).pow(2).sum().backward()
            twin_opt.step()
            for a, b in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert opt.skipped_coordinates().item() == 0  # the scaler skipped the whole step before the optimizer ran


def test_an_empty_group_is_allowed_and_steps_nothing(seed):
    """As in torch.optim: a group may be empty (say, a filter matched no parameter); it is carried through
    step and state_dict like any other."""
    net = random_net()
    (a,) = _params([(6,)])
    opt = L2LOptimizer([{"params": [a]}, {"params": []}], net=net)
    _set_grads([a])
    opt.step()
    saved = opt.state_dict()
    assert [len(g["params"]) for g in saved["param_groups"]] == [1, 0]
    again = L2LOptimizer([{"params": [a]}, {"params": []}], net=net)
    again.load_state_dict(saved)
    assert torch.equal(again.state[a]["h"], opt.state[a]["h"])


@pytest.mark.parametrize("saved_on, loaded_on", [("native", "reference"), ("reference", "native"),
                                                 ("native", "triton"), ("triton", "native")])
def test_state_dict_moves_between_backends(seed, saved_on, loaded_on):
    """State saved under one backend continues under another: the state layout is the public [L, N, H]
    whatever the kernel, so the runs agree to float32 rounding (different kernels, different roundings)."""
    for name in (saved_on, loaded_on):
        backend_or_skip(name, "cpu")
    net = random_net()
    params = _params([(5, 3), (4,)])
    gen = torch.Generator().manual_seed(seed)
    grads = [[grad_for(p.numel(), 10.0, p.dtype, gen).view_as(p) for p in params] for _ in range(4)]
    straight = [p.detach().clone().requires_grad_() for p in params]
    _train(L2LOptimizer(straight, net=net, backend=saved_on), straight, grads)

    first = L2LOptimizer(params, net=net, backend=saved_on)
    _train(first, params, grads[:2])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = L2LOptimizer(params, net=net, backend=loaded_on)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second.param_groups[0]["backend"] == saved_on  # the state dict's options come with it
    second.param_groups[0]["backend"] = loaded_on
    _train(second, params, grads[2:])
    for a, b in zip(params, straight):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_state_dict_moves_between_cuda_and_cpu(seed):
    """Saved on CUDA, loaded on the CPU (state moved to each parameter's device), and back, unchanged."""
    net = random_net()
    on_gpu = [torch.nn.Parameter(p.detach().cuda()) for p in _params([(5, 3), (4,)])]
    gpu_opt = L2LOptimizer(on_gpu, net=net.cuda())
    _set_grads(on_gpu)
    gpu_opt.step()
    buffer = io.BytesIO()
    torch.save(gpu_opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True, map_location="cpu")
    on_cpu = [torch.nn.Parameter(p.detach().cpu()) for p in on_gpu]
    cpu_opt = L2LOptimizer(on_cpu, net=random_net().cpu())
    cpu_opt.load_state_dict(saved)
    back = L2LOptimizer(on_gpu, net=net)
    back.load_state_dict(cpu_opt.state_dict())
    for p_cpu, p_gpu in zip(on_cpu, on_gpu):
        for key in ("h", "c"):
            assert cpu_opt.state[p_cpu][key].device.type == "cpu"
            assert torch.equal(cpu_opt.state[p_cpu][key], gpu_opt.state[p_gpu][key].cpu())
            assert back.state[p_gpu][key].is_cuda and torch.equal(back.state[p_gpu][key], gpu_opt.state[p_gpu][key])


BAD_OPTIONS = [
    ({"lr": -0.1}, ValueError, "lr must be a finite float >= 0"),
    ({"lr": float("nan")}, ValueError, "lr must be"),
    ({"lr": "1e-3"}, ValueError, "lr must be"),
    ({"lr": True}, ValueError, "lr must be"),
    ({"lr": torch.ones(2)}, ValueError, "lr as a tensor must hold one real floating value"),
    ({"lr": torch.tensor(1)}, ValueError, "lr as a tensor must hold one real floating value"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay must be a finite float >= 0"),
    ({"weight_decay": torch.tensor(0.1)}, ValueError, "weight_decay must be a finite float"),
    ({"maximize": 1}, TypeError, "maximize must be a bool"),
    ({"momentum": 0.9}, ValueError, "momentum=0.9 is a torch.optim option that L2LOptimizer does not have"),
    ({"betas": (0.9, 0.999)}, ValueError, "betas="),
    ({"eps": 1e-8}, ValueError, "eps="),
    ({"nesterov": True}, ValueError, "nesterov="),
    ({"amsgrad": False}, ValueError, "amsgrad="),
    ({"foreach": True}, ValueError, "foreach="),
    ({"differentiable": True}, ValueError, "differentiable="),
    ({"decoupled_weight_decay": False}, ValueError, "always decoupled"),
]


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS)
def test_bad_options_are_refused_by_name_and_change_nothing(seed, options, error, message):
    """At construction, in add_param_group, and at step() for an option set on a group afterwards (by a
    user or a scheduler): refused by name, the parameters and the state as they were."""
    net = random_net()
    (a,) = _params([(4,)])
    with pytest.raises(error, match=message):
        if set(options) <= {"lr", "weight_decay", "maximize"}:  # constructor arguments
            L2LOptimizer([a], net=net, **options)
        else:
            L2LOptimizer([{"params": [a], **options}], net=net)
    opt = L2LOptimizer([a], net=net)
    with pytest.raises(error, match=f"param group 1: .*{message}"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], **options})
    assert len(opt.param_groups) == 1
    _set_grads([a])
    opt.step()
    before = snapshot(opt, [a])
    opt.param_groups[0].update(options)
    _set_grads([a])
    with pytest.raises(error, match=f"param group 0: .*{message}"):
        opt.step()
    assert_unchanged(opt, [a], before)


def test_neutral_torch_optim_flags_are_accepted(seed):
    """torch itself adds differentiable=False to an optimizer's defaults on load; foreach/fused=None ask for
    nothing, and weight decay here is decoupled."""
    (a,) = _params([(3,)])
    opt = L2LOptimizer([{"params": [a], "differentiable": False, "foreach": None, "fused": None,
                         "decoupled_weight_decay": True}], net=random_net())
    _set_grads([a])
    opt.step()
    opt.load_state_dict(opt.state_dict())
    opt.load_state_dict(opt.state_dict())  # the second load sees the differentiable=False torch added
    opt.step()


def _torch_optim_hyperparameters() -> dict:
    """Every key of every torch.optim optimizer's defaults, with one optimizer's default for it."""
    keys = {}
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
            continue
        param = torch.nn.Parameter(torch.zeros(2, 2))
        try:
            optimizer = cls([param], lr=0.01) if "lr" in cls.__init__.__code__.co_varnames else cls([param])
        except (TypeError, ValueError, RuntimeError):
            continue
        for key, value in optimizer.defaults.items():
            keys.setdefault(key, value)
    return keys


def test_every_torch_optim_hyperparameter_is_honoured_or_refused(seed):
    """Derived from the torch installed, so a key a new torch adds fails here until it is decided."""
    keys = _torch_optim_hyperparameters()
    assert {"lr", "momentum", "betas", "weight_decay", "maximize"} <= set(keys)
    (a,) = _params([(3,)])
    net = random_net()
    honoured = {"lr": 0.5, "weight_decay": 0.01, "maximize": True, "capturable": False}
    for key, default in sorted(keys.items()):
        if key in honoured:
            opt = L2LOptimizer([{"params": [a], key: honoured[key]}], net=net)
            assert opt.param_groups[0][key] == honoured[key]
            continue
        # a value other than the one that asks for nothing: True for flags, else the default itself
        value = (not default) if isinstance(default, bool) or default is None else default
        if key == "decoupled_weight_decay":
            value = False
        with pytest.raises(ValueError, match=f"{key}="):
            L2LOptimizer([{"params": [a], key: value}], net=net)


def test_import_loads_neither_triton_nor_distributed_tensor_nor_meta_training():
    """Over a second of imports that not every user needs; and meta-training, with its dependencies (tqdm:
    made unimportable here, which torch itself tolerates), is for those who import it. (Making any torch.optim optimizer, this one
    included, loads both anyway: Optimizer.add_param_group is wrapped by torch._disable_dynamo, whose first
    call imports torch._dynamo. What stays ours not to load is the Triton kernels, on a CPU step.)"""
    import subprocess
    import sys

    code = ("import sys\n"
            "sys.modules['tqdm'] = None\n"
            "import torch, l2l_fused\n"
            "assert 'triton' not in sys.modules and 'torch.distributed.tensor' not in sys.modules, 'on import'\n"
            "assert not any(m.startswith('l2l_fused.meta') for m in sys.modules), 'on import'\n"
            "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
            "opt = l2l_fused.L2LOptimizer([p], net=l2l_fused.LSTMOptimizerNet(), backend='reference'); opt.step()\n"
            "assert 'l2l_fused.ops.triton.math' not in sys.modules, 'on a CPU step'\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
