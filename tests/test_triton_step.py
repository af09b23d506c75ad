"""The Triton forward: its out-of-place launch, poisoned first, against the float64 reference (tolerances
in helpers.py), its custom op, backend selection, and launches per step. What every fused backend must do
(optimizer contract, gradients) is in test_fused_backends.py."""

import pytest
import torch

from l2l_fused import L2LOptimizer, available_backends
from l2l_fused.ops import interface
from l2l_fused.ops.layout import NetShape
from helpers import CASES, check_step, group_inputs, random_net, random_state

pytest.importorskip("triton")
from l2l_fused.ops.triton import forward as triton_forward  # noqa: E402


def _check_launch(net, sizes, state_dtype, device):
    """Out-of-place launch over mixed-dtype tensors, outputs poisoned with NaN first."""
    thetas, grads, hs, cs = group_inputs(net, sizes, state_dtype, device)
    outs = [[torch.full_like(t, float("nan")) for t in ts] for ts in (thetas, hs, cs)]
    rows = list(zip(thetas, outs[0], grads, hs, outs[1], cs, outs[2]))
    triton_forward.launch_forward(rows, net.kernel_weights(device), NetShape.of(net))
    check_step(net, thetas, grads, hs, cs, *outs, state_dtype)


@pytest.mark.parametrize("p,layers,hidden,scale,sizes", CASES)
def test_launch_matches_reference_float32_state(seed, kernel_device, p, layers, hidden, scale, sizes):
    _check_launch(random_net(hidden, layers, p, scale), sizes, torch.float32, kernel_device)


@pytest.mark.parametrize("p,layers,hidden,scale,sizes", [CASES[0], CASES[2]])
def test_launch_matches_reference_bf16_state(seed, kernel_device, p, layers, hidden, scale, sizes):
    _check_launch(random_net(hidden, layers, p, scale), sizes, torch.bfloat16, kernel_device)


def test_auto_never_takes_the_interpreter_nor_a_net_the_kernel_cannot_run():
    assert interface.resolve("auto", "cpu").name != "triton"
    assert ("triton" in available_backends("cpu")) == interface.TRITON_INTERPRETED  # on the CPU only through the interpreter
    big = random_net(hidden_size=65)
    assert interface.resolve("auto", "cpu", big).name == "reference"
    with pytest.raises(ValueError, match="hidden_size up to 64, not 65"):
        L2LOptimizer([torch.nn.Parameter(torch.randn(3))], net=big, backend="triton")
    with pytest.raises(ValueError, match="1 to 3 layers, not 4"):
        L2LOptimizer([torch.nn.Parameter(torch.randn(3))], net=random_net(num_layers=4), backend="triton")


@pytest.mark.cuda
def test_auto_picks_triton_on_cuda():
    assert interface.resolve("auto", "cuda").name == "triton"


def test_launcher_rejects_mismatched_state(kernel_device):
    net = random_net()
    theta = torch.randn(5, device=kernel_device)
    h = torch.zeros(2, 4, 20, device=kernel_device)
    with pytest.raises(ValueError, match=r"state must be torch.float32 \[2, 5, 20\]"):
        triton_forward.launch_forward([(theta, theta, theta, h, h, h, h)], net.kernel_weights(kernel_device),
                                      NetShape.of(net))


def test_custom_op_passes_opcheck(seed, kernel_device):
    net = random_net()
    params = [torch.randn(n, device=kernel_device) for n in (5, 70)]
    grads = [torch.randn(n, device=kernel_device) for n in (5, 70)]
    states = [random_state(net, n) for n in (5, 70)]
    h = [s[0].to(kernel_device) for s in states]
    c = [s[1].to(kernel_device) for s in states]
    shape = NetShape.of(net)
    torch.library.opcheck(triton_forward._group_step_op,
                          (params, grads, h, c, torch.zeros((), dtype=torch.int64, device=kernel_device),
                           net.kernel_weights(kernel_device), shape.layers, shape.hidden, shape.features,
                           shape.preprocess_p, shape.output_scale))


def test_compiled_training_step_has_no_graph_break_in_the_optimizer(seed, kernel_device):
    net = random_net().to(kernel_device)
    x = torch.randn(16, 5, device=kernel_device)

    def make():
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 1)).to(kernel_device)
        return model, L2LOptimizer(model.parameters(), net=net, backend="triton")

    def train_step(model, opt, step):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        step()
        return loss

    # A whole training step: whatever Dynamo breaks on (Tensor.backward() without compiled autograd, in
    # some torch versions) is not in l2l_fused.
    model, opt = make()
    explanation = torch._dynamo.explain(train_step)(model, opt, opt.step)
    for reason in explanation.break_reasons:
        frames = [frame.filename for frame in reason.user_stack]
        assert not any("l2l_fused" in f and "tests" not in f for f in frames), reason.reason

    # The optimizer step alone compiles to one graph (fullgraph raises on any break) and matches eager.
    eager_model, eager_opt = make()
    compiled_model, compiled_opt = make()
    compiled_step = torch.compile(compiled_opt.step, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        train_step(eager_model, eager_opt, eager_opt.step)
        train_step(compiled_model, compiled_opt, compiled_step)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _cuda_activity(fn):
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
def test_one_kernel_launch_per_group_per_step(seed):
    net = random_net().cuda()
    groups = [[torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes] for shapes in ([(300, 7), (11,)], [(5,)])]
    params = sum(groups, [])
    opt = L2LOptimizer([{"params": g} for g in groups], net=net, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # creates the state and the launch tables

    for p in params:  # new gradient tensors, as after zero_grad(set_to_none=True): tables may go up again
        p.grad = torch.randn_like(p)
    activity = _cuda_activity(opt.step)
    assert [a for a in activity if "Memcpy" not in a] == ["_l2l_fwd_kernel"] * 2, activity

    for p in params:  # gradients written in place: nothing but the two launches
        p.grad.copy_(torch.randn_like(p))
    assert _cuda_activity(opt.step) == ["_l2l_fwd_kernel"] * 2
