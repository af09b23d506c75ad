"""The fused Triton forward against the float64 reference.

Tolerances, from the arithmetic:
* float32: every output is a sum of at most 2H + 2 <= 130 products through σ/tanh (Lipschitz <= 1);
  float32 rounding gives ~sqrt(K) * 2**-24 * Σ|terms| ≈ 1e-6 on these inputs, tf32x3 on the GPU drops the
  lo*lo product (~2**-21 per product). F32_TOL = 1e-5 (absolute and relative) leaves a margin of ~10.
* bfloat16 state: the kernel rounds its float32 result once, to nearest: |error| <= 2**-8 |h| + F32_TOL.
* θ' in a narrow dtype: θ + Δ rounded to it, so the dtype's unit roundoff times |θ'|, plus F32_TOL on Δ.
"""

import copy

import pytest
import torch

from l2l_fused import L2LOptimizer, available_backends, l2l_update_ref
from l2l_fused import backends, triton_step
from l2l_fused.triton_math import INTERPRETED
from helpers import adversarial_grad, random_net, random_state

pytestmark = pytest.mark.skipif(triton_step.triton is None, reason="needs triton")

F32_TOL = 1e-5
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _grad_for(n, p, dtype):
    """Adversarial gradients that stay finite in ``dtype`` (non-finite ones are the optimizer's business)."""
    g = adversarial_grad(n, p, torch.float64)
    limit = torch.finfo(dtype).max / 2
    return g.clamp(-limit, limit).to(dtype)


def _reference64(net, grads, hs, cs):
    """Δ, h', c' of the flat group in float64 on the CPU, from exactly the values the kernel read."""
    net64 = copy.deepcopy(net).double().cpu()
    grad = torch.cat([g.cpu().double().flatten() for g in grads])
    h = torch.cat([t.cpu().double() for t in hs], 1)
    c = torch.cat([t.cpu().double() for t in cs], 1)
    with torch.no_grad():
        return l2l_update_ref(grad, h, c, net64.cell_weights(), net64.head.weight, net64.head.bias,
                              preprocess_p=net.preprocess_p, output_scale=net.output_scale)


def _assert_within(got, want, bound, what):
    got = got.cpu().double()
    assert not torch.isnan(got).any(), f"{what}: unwritten (poisoned) or NaN elements"
    excess = (got - want).abs() - bound
    worst = excess.argmax()
    assert excess.max() <= 0, (
        f"{what}: |got - want| exceeds the bound by {excess.max().item():.3g} at {worst.item()} "
        f"(got {got.flatten()[worst].item()!r}, want {want.flatten()[worst].item()!r})"
    )


def _check_launch(net, sizes, state_dtype, device):
    """Out-of-place launch over mixed-dtype tensors, outputs poisoned with NaN first."""
    rows, thetas, grads, hs, cs = [], [], [], [], []
    for i, n in enumerate(sizes):
        dtype = DTYPES[i % len(DTYPES)]
        theta = torch.randn(n, dtype=torch.float64).to(dtype).to(device)
        grad = _grad_for(n, net.preprocess_p, dtype).to(device)
        h, c = (s.to(state_dtype).to(device) for s in random_state(net, n))
        outs = [torch.full_like(t, float("nan")) for t in (theta, h, c)]
        rows.append((theta, outs[0], grad, h, outs[1], c, outs[2]))
        thetas.append(theta), grads.append(grad), hs.append(h), cs.append(c)
    triton_step.launch_forward(rows, triton_step.net_weights(net, device), net.preprocess_p, net.output_scale)

    delta, h_ref, c_ref = _reference64(net, grads, hs, cs)
    offset = 0
    for (theta, theta_out, _, _, h_out, _, c_out), n in zip(rows, sizes):
        d = delta[offset:offset + n]
        want = theta.cpu().double() + d
        u = UNIT_ROUNDOFF[theta.dtype] + UNIT_ROUNDOFF[torch.float32]
        _assert_within(theta_out, want, u * want.abs() + F32_TOL * (1 + d.abs()), f"θ' ({theta.dtype}, n={n})")
        for got, ref, name in ((h_out, h_ref, "h'"), (c_out, c_ref, "c'")):
            ref = ref[:, offset:offset + n]
            bound = F32_TOL * (1 + ref.abs()) + UNIT_ROUNDOFF[state_dtype] * ref.abs()
            _assert_within(got, ref, bound, f"{name} ({state_dtype}, n={n})")
        offset += n


CASES = [  # (preprocess_p, num_layers, hidden_size, output_scale, sizes)
    (10.0, 2, 20, 0.1, [1, 7, 1000, 12345]),  # the paper's net; sizes not multiples of the block
    (None, 1, 20, 1.0, [7, 1000, 3]),  # raw gradient input (quadratics)
    (3.0, 3, 64, 0.5, [1, 777]),  # the largest net the kernel takes
    (10.0, 2, 5, 0.3, [130, 7]),  # hidden padded from 5 to 16
    (10.0, 1, 33, 0.2, [65, 2]),  # hidden padded from 33 to 64
]


@pytest.mark.parametrize("p,layers,hidden,scale,sizes", CASES)
def test_launch_matches_reference_float32_state(seed, kernel_device, p, layers, hidden, scale, sizes):
    _check_launch(random_net(hidden, layers, p, scale), sizes, torch.float32, kernel_device)


@pytest.mark.parametrize("p,layers,hidden,scale,sizes", [CASES[0], CASES[2]])
def test_launch_matches_reference_bf16_state(seed, kernel_device, p, layers, hidden, scale, sizes):
    _check_launch(random_net(hidden, layers, p, scale), sizes, torch.bfloat16, kernel_device)


def _model_params(device):
    shapes_dtypes = [((13, 7), torch.float32), ((7,), torch.float32), ((5, 3, 4), torch.bfloat16), ((1,), torch.float16)]
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float64).to(d).to(device)) for s, d in shapes_dtypes]


def _run(backend, params, grads, net, steps, **options):
    opt = L2LOptimizer(params, net=net, backend=backend, **options)
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return opt


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_optimizer_triton_equals_reference_backend(seed, kernel_device, state_dtype):
    net = random_net().to(kernel_device)
    params = _model_params(kernel_device)
    grads = [_grad_for(p.numel(), 10.0, p.dtype).view_as(p).to(kernel_device) for p in params]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = _run("triton", params, grads, net, 1, state_dtype=state_dtype)
    plain = _run("reference", twins, grads, net, 1, state_dtype=state_dtype)
    for p, q in zip(params, twins):
        u = UNIT_ROUNDOFF[p.dtype] + UNIT_ROUNDOFF[torch.float32]
        want = q.detach().cpu().double()
        _assert_within(p.detach(), want, 2 * u * want.abs() + F32_TOL, f"param {p.dtype}")
        for key in ("h", "c"):
            assert fused.state[p][key].dtype == state_dtype
            ref = plain.state[q][key].cpu().double()
            _assert_within(fused.state[p][key], ref, F32_TOL * (1 + ref.abs()) + 2 * UNIT_ROUNDOFF[state_dtype] * ref.abs(), key)


def test_optimizer_skips_params_without_grad_and_handles_strided_ones(seed, kernel_device):
    net = random_net().to(kernel_device)
    strided = torch.nn.Parameter(torch.randn(6, 5, device=kernel_device).t())  # non-contiguous parameter
    idle = torch.nn.Parameter(torch.randn(4, device=kernel_device))
    twin = torch.nn.Parameter(strided.detach().clone())
    grad = torch.randn(6, 5, device=kernel_device).t()  # non-contiguous gradient
    opt = L2LOptimizer([strided, idle], net=net, backend="triton")
    strided.grad = grad
    idle_before = idle.detach().clone()
    opt.step()
    assert not strided.is_contiguous() and torch.equal(idle, idle_before) and idle not in opt.state
    ref = _run("reference", [twin], [grad], net, 1)
    _assert_within(strided.detach(), twin.detach().cpu().double(), 2e-7 * twin.detach().cpu().double().abs() + F32_TOL, "θ'")
    torch.testing.assert_close(opt.state[strided]["h"], ref.state[twin]["h"], rtol=F32_TOL, atol=F32_TOL)


def test_net_forward_triton_matches_reference(seed, kernel_device):
    net = random_net().to(kernel_device)
    theta = torch.randn(3, 7, device=kernel_device)
    grad = _grad_for(21, 10.0, torch.float32).view(3, 7).to(kernel_device)
    state = tuple(s.to(kernel_device) for s in random_state(net, 21))
    with torch.no_grad():
        got, (h, c) = net(theta, grad, state, backend="triton")
        want, (h_ref, c_ref) = net(theta, grad, state, backend="reference")
    assert got.shape == theta.shape
    torch.testing.assert_close(got, want, rtol=F32_TOL, atol=F32_TOL)
    torch.testing.assert_close(h, h_ref, rtol=F32_TOL, atol=F32_TOL)
    torch.testing.assert_close(c, c_ref, rtol=F32_TOL, atol=F32_TOL)


def test_auto_keeps_the_reference_on_cpu_and_nets_the_kernel_cannot_run():
    assert backends.resolve("auto", "cpu").name == "reference"
    assert ("triton" in available_backends("cpu")) == INTERPRETED  # on the CPU only through the interpreter
    big = random_net(hidden_size=65)
    assert backends.resolve("auto", "cpu", big).name == "reference"
    with pytest.raises(ValueError, match="hidden_size up to 64, not 65"):
        L2LOptimizer([torch.nn.Parameter(torch.randn(3))], net=big, backend="triton")
    with pytest.raises(ValueError, match="1 to 3 layers, not 4"):
        L2LOptimizer([torch.nn.Parameter(torch.randn(3))], net=random_net(num_layers=4), backend="triton")


@pytest.mark.cuda
def test_auto_picks_triton_on_cuda():
    assert backends.resolve("auto", "cuda").name == "triton"


def test_launcher_rejects_mismatched_state(kernel_device):
    net = random_net()
    theta = torch.randn(5, device=kernel_device)
    h = torch.zeros(2, 4, 20, device=kernel_device)
    with pytest.raises(ValueError, match=r"state must be torch.float32 \[2, 5, 20\]"):
        triton_step.launch_forward([(theta, theta, theta, h, h, h, h)], triton_step.net_weights(net, kernel_device), 10.0, 0.1)


def test_custom_op_passes_opcheck(seed, kernel_device):
    net = random_net()
    params = [torch.randn(n, device=kernel_device) for n in (5, 70)]
    grads = [torch.randn(n, device=kernel_device) for n in (5, 70)]
    states = [random_state(net, n) for n in (5, 70)]
    h = [s[0].to(kernel_device) for s in states]
    c = [s[1].to(kernel_device) for s in states]
    torch.library.opcheck(triton_step._group_step_op,
                          (params, grads, h, c, triton_step.net_weights(net, kernel_device), 10.0, 0.1))


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
