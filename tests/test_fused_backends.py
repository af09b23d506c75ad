"""What every fused backend ("triton", "native") must do, on each device it runs on: the optimizer's group
step and the differentiable step against the float64 reference (tolerances in helpers.py), and the
backward's contract (gradients, determinism, memory, no gradient into ∇)."""

import pytest
import torch

from l2l_fused import L2LOptimizer, LSTMOptimizerNet
from l2l_fused.ops import interface, reference
from l2l_fused.ops.layout import NetShape, pack
from l2l_fused.ops.update import Update
from l2l_fused.meta import MetaTrainer, QuadraticTask, TrainConfig
from helpers import (CASES, F32_TOL, UNIT_ROUNDOFF, adversarial_grad, assert_within, backend_or_skip, check_group_step,
                     factors, grad_for, group_inputs, random_net, random_state, unroll_grads, unroll_problem,
                     unrolled_meta_gradients)

FUSED = [("triton", "cuda"), ("triton", "cpu"), ("native", "cpu"), ("native", "cuda")]


@pytest.fixture(params=FUSED, ids=[f"{b}-{d}" for b, d in FUSED])
def fused(request):
    """(backend name, device) for each fused backend and device it is available on here."""
    return backend_or_skip(*request.param)


@pytest.fixture(params=[("reference", "cpu")] + FUSED, ids=["reference-cpu"] + [f"{b}-{d}" for b, d in FUSED])
def any_backend(request):
    """The fused backends, and the reference that specifies them."""
    return backend_or_skip(*request.param)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,layers,hidden,scale,sizes", CASES[:3] + CASES[-1:])
def test_group_step_matches_reference(seed, fused, state_dtype, p, layers, hidden, scale, sizes):
    """In place, as the optimizer calls it: an element left unwritten keeps its old value and fails."""
    name, device = fused
    net = random_net(hidden, layers, p, scale).to(device)
    thetas, grads, hs, cs = group_inputs(net, sizes, state_dtype, device)
    outs = [[t.clone() for t in ts] for ts in (thetas, hs, cs)]
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    interface.resolve(name, device, net).group_step(net, *outs[:1], grads, *outs[1:], skipped)
    check_group_step(net, thetas, grads, hs, cs, *outs, state_dtype)
    assert skipped.item() == 0


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_gradients_leave_their_coordinates_alone(seed, any_backend, state_dtype):
    """NaN and ±inf gradients, scattered among adversarial finite ones in every parameter dtype: those
    coordinates keep θ, h and c bit for bit and are counted on the device; every other coordinate gets
    exactly the step the reference gives it."""
    name, device = any_backend
    p, layers, hidden, scale, sizes = CASES[0]
    net = random_net(hidden, layers, p, scale).to(device)
    thetas, grads, hs, cs = group_inputs(net, sizes, state_dtype, device)
    generator = torch.Generator().manual_seed(seed)
    bads = []
    for g in grads:
        bad = torch.rand(g.numel(), generator=generator) < 0.3
        values = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(3, (g.numel(),), generator=generator)]
        g[bad.to(device)] = values[bad].to(g.dtype).to(device)
        bads.append(bad)
    outs = [[t.clone() for t in ts] for ts in (thetas, hs, cs)]
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    impl = interface.resolve(name, device, net)
    impl.group_step(net, *outs[:1], grads, *outs[1:], skipped)
    total = check_group_step(net, thetas, grads, hs, cs, *outs, state_dtype)
    assert skipped.item() == total == sum(int(b.sum()) for b in bads) > 0

    impl.group_step(net, *outs[:1], grads, *outs[1:], skipped)  # the count accumulates, step after step
    assert skipped.item() == 2 * total


OPTIONS = [  # (lr, weight_decay, maximize); "tensor" is a 0-dim float32 lr on the device
    (0.3, 0.1, True),
    ("tensor", 0.0, False),
    (0.0, 0.5, False),
    (2.5, 0.0, True),
]


@pytest.mark.parametrize("lr,weight_decay,maximize", OPTIONS)
def test_group_step_options_match_reference(seed, any_backend, lr, weight_decay, maximize):
    """lr, decoupled weight decay and maximize inside each backend's step, against the float64 reference,
    over every parameter dtype and both preprocessing branches, with zero and non-finite gradients."""
    name, device = any_backend
    p, layers, hidden, scale, _ = CASES[0]
    net = random_net(hidden, layers, p, scale).to(device)
    thetas, grads, hs, cs = group_inputs(net, [1, 7, 1000, 130], torch.float32, device)
    for g in grads:
        g[:: 97] = float("nan")
    lr = torch.tensor(1.7, device=device) if lr == "tensor" else lr
    update = Update(lr, weight_decay, maximize)
    outs = [[t.clone() for t in ts] for ts in (thetas, hs, cs)]
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    interface.resolve(name, device, net).group_step(net, *outs[:1], grads, *outs[1:], skipped, update)
    assert skipped.item() == check_group_step(net, thetas, grads, hs, cs, *outs, torch.float32, update) > 0


def test_lr_one_is_bit_identical_to_the_plain_step(seed, any_backend):
    """lr = 1 (a float or a tensor) and no weight decay multiply by exactly 1: the optimizer's step is bit for
    bit θ + Δ, the step meta-training takes (``step``, the same kernel without the optimizer's options), on
    every coordinate with a gradient signal."""
    name, device = any_backend
    net = random_net().to(device)
    n = 1000
    theta = torch.randn(n, device=device)
    grad = grad_for(n, 10.0, torch.float32).to(device)
    h, c = (s.to(device) for s in random_state(net, n))
    impl = interface.resolve(name, device, net)
    with torch.no_grad():
        plain, h_plain, c_plain = impl.step(net, theta, grad, h, c)
    moving = grad != 0
    assert moving.sum() < n  # the adversarial gradients have exact zeros, which the optimizer holds
    for update in (Update(), Update(1.0, 0.0, False), Update(torch.tensor(1.0, device=device))):
        outs = [theta.clone()], [h.clone()], [c.clone()]
        impl.group_step(net, outs[0], [grad], *outs[1:], torch.zeros((), dtype=torch.int64, device=device), update)
        assert torch.equal(outs[0][0][moving], plain[moving])
        assert torch.equal(outs[1][0][:, moving], h_plain[:, moving]) and torch.equal(outs[2][0][:, moving], c_plain[:, moving])


@pytest.mark.parametrize("kind", ["mlp", "quadratic"])
def test_zero_gradients_leave_parameters_where_they_are(any_backend, kind):
    """The issue that set the rule: ``p.grad = zeros`` for 100 steps moved 1.0 to 2.0 (mlp net) or 2.9
    (quadratic net). Now such a parameter stays put, and with weight decay it only decays, exactly as
    AdamW's does: (1 − lr·wd)^steps."""
    from l2l_fused import pretrained

    name, device = any_backend
    steps = 5 if device.type == "cpu" and name == "triton" else 100  # the interpreter takes seconds a step
    net = pretrained(kind).to(device)
    still, decayed = (torch.nn.Parameter(torch.ones(4, 3, device=device)) for _ in range(2))
    opt = L2LOptimizer([{"params": [still]}, {"params": [decayed], "weight_decay": 0.01, "lr": 0.5}], net=net,
                       backend=name)
    for _ in range(steps):
        for p in (still, decayed):
            p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.equal(still, torch.ones_like(still))
    assert not opt.state[still]["h"].any() and not opt.state[still]["c"].any()
    decay = torch.tensor(factors(Update(0.5, 0.01))[1])
    expected = torch.tensor(1.0)
    for _ in range(steps):
        expected = expected * decay  # rounded to float32 at each step, as the kernels do
    assert torch.equal(decayed.cpu(), torch.full((4, 3), expected.item()))


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
def test_optimizer_equals_the_reference_backend(seed, fused, state_dtype):
    name, device = fused
    net = random_net().to(device)
    params = _model_params(device)
    grads = [grad_for(p.numel(), 10.0, p.dtype).view_as(p).to(device) for p in params]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fast = _run(name, params, grads, net, 1, state_dtype=state_dtype)
    plain = _run("reference", twins, grads, net, 1, state_dtype=state_dtype)
    for p, q in zip(params, twins):
        u = UNIT_ROUNDOFF[p.dtype] + UNIT_ROUNDOFF[torch.float32]
        want = q.detach().cpu().double()
        assert_within(p.detach(), want, 2 * u * want.abs() + F32_TOL, f"param {p.dtype}")
        for key in ("h", "c"):
            assert fast.state[p][key].dtype == state_dtype
            ref = plain.state[q][key].cpu().double()
            assert_within(fast.state[p][key], ref, F32_TOL * (1 + ref.abs()) + 2 * UNIT_ROUNDOFF[state_dtype] * ref.abs(), key)


def test_group_of_more_tensors_than_one_launch_table_holds(seed, fused):
    """300 tensors, empty ones among them: the native CUDA kernel takes its table as a kernel parameter,
    256 rows at most, so this group takes two launches; every tensor must get the reference's step."""
    name, device = fused
    net = random_net().to(device)
    sizes = [0 if i % 97 == 5 else 1 + i % 9 for i in range(300)]
    thetas, grads, hs, cs = group_inputs(net, sizes, torch.float32, device)
    outs = [[t.clone() for t in ts] for ts in (thetas, hs, cs)]
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    interface.resolve(name, device, net).group_step(net, *outs[:1], grads, *outs[1:], skipped)
    check_group_step(net, thetas, grads, hs, cs, *outs, torch.float32)


def test_optimizer_skips_params_without_grad_and_handles_strided_ones(seed, fused):
    name, device = fused
    net = random_net().to(device)
    strided = torch.nn.Parameter(torch.randn(6, 5, device=device).t())  # non-contiguous parameter
    idle = torch.nn.Parameter(torch.randn(4, device=device))
    twin = torch.nn.Parameter(strided.detach().clone())
    grad = torch.randn(6, 5, device=device).t()  # non-contiguous gradient
    opt = L2LOptimizer([strided, idle], net=net, backend=name)
    strided.grad = grad
    idle_before = idle.detach().clone()
    opt.step()
    assert not strided.is_contiguous() and torch.equal(idle, idle_before) and idle not in opt.state
    ref = _run("reference", [twin], [grad], net, 1)
    want = twin.detach().cpu().double()
    assert_within(strided.detach(), want, 2e-7 * want.abs() + F32_TOL, "θ'")
    torch.testing.assert_close(opt.state[strided]["h"], ref.state[twin]["h"], rtol=F32_TOL, atol=F32_TOL)


def test_net_forward_matches_reference(seed, fused):
    name, device = fused
    net = random_net().to(device)
    theta = torch.randn(3, 7, device=device)
    grad = grad_for(21, 10.0, torch.float32).view(3, 7).to(device)
    state = tuple(s.to(device) for s in random_state(net, 21))
    with torch.no_grad():
        got, (h, c) = net(theta, grad, state, backend=name)
        want, (h_ref, c_ref) = net(theta, grad, state, backend="reference")
    assert got.shape == theta.shape
    torch.testing.assert_close(got, want, rtol=F32_TOL, atol=F32_TOL)
    torch.testing.assert_close(h, h_ref, rtol=F32_TOL, atol=F32_TOL)
    torch.testing.assert_close(c, c_ref, rtol=F32_TOL, atol=F32_TOL)


# ------------------------------------------------------------------------------------------ backward
# Tolerance: 1e-5 of each gradient's largest value (float32 arithmetic of the forward's depth), plus twice
# what PyTorch's own float32 autograd through the reference misses the float64 one by (STYLE.md's rule).
# The second term matters for the weight gradients, sums over every coordinate of terms of both signs: a
# bias gradient of size 1 made of a thousand terms of size 1 loses ~1e-5 to cancellation in any float32
# summation order, and PyTorch's error measures how much. A wrong term is O(1) relative and fails either way.
REL_TOL = 1e-5


@pytest.mark.parametrize("preprocess_p,num_layers", [(10.0, 2), (10.0, 1), (None, 2), (None, 1), (10.0, 3)])
def test_unrolled_meta_gradient_matches_float64_reference(seed, fused, preprocess_p, num_layers):
    name, device = fused
    net = random_net(20, num_layers, preprocess_p, 0.3)
    for what, a, b, t in zip(*unrolled_meta_gradients(net, name, device, seed, precision="exact")):
        scale = b.abs().max().item()
        err = (a.cpu().double() - b).abs().max().item()
        err_torch = (t.double() - b).abs().max().item()
        assert err <= 2 * err_torch + REL_TOL * scale, (
            f"{what}: max error {err:.3g} ({err / scale:.3g} of its largest value), PyTorch float32 {err_torch:.3g}")


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_backward_entry_point_matches_its_specification(seed, fused, state_dtype):
    """A fused backend's ``backward`` against ``reference.backward`` (same signature, packed φ) in float64,
    with the unrolled test's tolerance; from a saved state in either dtype."""
    name, device = fused
    net = random_net()
    shape = NetShape.of(net)
    generator = torch.Generator().manual_seed(seed)
    n = 1000
    h, c = (s.to(state_dtype) for s in random_state(net, n))
    inputs = [adversarial_grad(n, net.preprocess_p, generator=generator), h, c, torch.randn(n, generator=generator),
              torch.randn(h.shape, generator=generator), torch.randn(h.shape, generator=generator)]
    got = interface.resolve(name, device, net).load().backward(*(t.to(device) for t in inputs),
                                                                net.to(device).kernel_weights(device), shape)
    want = reference.backward(*(t.double() for t in inputs), pack(net).detach().cpu().double(), shape)
    torch32 = reference.backward(*(t.float() for t in inputs), pack(net).detach().cpu(), shape)
    for what, a, b, t in zip(("dh", "dc", "dweights"), got, want, torch32):
        assert a.shape == b.shape
        scale = b.abs().max().item()
        err = (a.cpu().double() - b).abs().max().item()
        err_torch = (t.double() - b).abs().max().item()
        assert err <= 2 * err_torch + REL_TOL * scale, f"{what}: max error {err:.3g}, PyTorch float32 {err_torch:.3g}"


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_repeated_backward_gives_bit_identical_weight_gradients(seed, fused, precision):
    name, device = fused
    net = random_net().to(device)
    n = 5000  # several blocks per program or chunk, and a partial last one
    h, c = (s.to(device) for s in random_state(net, n))
    grad = adversarial_grad(n, 10.0).to(device)
    theta = torch.randn(n, device=device, requires_grad=True)
    w = torch.randn(n, device=device)

    def weight_grads():
        x, (h2, c2) = net(theta, grad, (h, c), backend=name, precision=precision)
        return torch.autograd.grad((x * w).sum() + h2.sum() + c2.pow(2).sum(), list(net.parameters()))

    first = weight_grads()
    for a, b in zip(first, weight_grads()):
        assert torch.equal(a, b)


def test_no_gradient_flows_into_the_optimizee_gradient(seed, fused):
    name, device = fused
    net = random_net().to(device)
    grad = torch.randn(50, device=device, requires_grad=True)
    theta = torch.randn(50, device=device, requires_grad=True)
    x, _ = net(theta, grad, net.init_state(50, device=device), backend=name)
    x.sum().backward()
    assert grad.grad is None and theta.grad is not None and net.head.bias.grad is not None


@pytest.mark.parametrize("saved_state_dtype,limit", [(None, 340), (torch.bfloat16, 180)])
def test_saved_bytes_per_coordinate_per_step(fused, saved_state_dtype, limit):
    """Counts what autograd keeps for one step (the weights, shared by all coordinates, aside)."""
    name, device = fused
    net = random_net().to(device)
    n = 4096
    saved = []

    def pack(t):
        saved.append(t)
        return t

    theta = torch.randn(n, device=device, requires_grad=True)
    state = tuple(s.to(device).requires_grad_() for s in random_state(net, n))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(theta, torch.randn(n, device=device), state, backend=name, saved_state_dtype=saved_state_dtype)
    per_coordinate = [t for t in saved if n in t.shape]  # not the weights, however many there are
    total = sum(t.numel() * t.element_size() for t in per_coordinate) / n
    assert total <= limit, [(tuple(t.shape), t.dtype) for t in per_coordinate]
    assert total == (4 + 2 * 2 * 20 * (2 if saved_state_dtype else 4))  # ∇ in float32, h and c


def test_bf16_saved_state_bounds_the_gradient_error(seed, fused):
    """Saving h and c rounded to bfloat16 (relative error <= 2**-8) moves the recomputed gates by as much,
    and through sigmoid/tanh (slopes <= 1) and weights of norm ~1 the gradients by a few times that:
    the bound is 4 * 2**-8 of each tensor's largest value."""
    name, device = fused
    net = random_net(20, 2, 10.0, 0.3)
    problem = unroll_problem(net, [500], torch.Generator().manual_seed(seed))
    exact = unroll_grads(net, name, *problem, device)
    rounded = unroll_grads(net, name, *problem, device, saved_state_dtype=torch.bfloat16)
    for a, b in zip(rounded, exact):
        assert (a - b).abs().max() <= 4 * 2**-8 * b.abs().max()


def test_meta_training_on_the_fused_backend_matches_the_reference(seed, fused):
    """A few meta-updates through a fused backend land where the reference's do (to float32 noise)."""
    name, device = fused
    config = TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=4, steps=6, truncation=3, val_functions=4, seed=seed)
    results = []
    for backend in (name, "reference"):
        torch.manual_seed(seed)
        net = LSTMOptimizerNet(**QuadraticTask().net_options())
        trainer = MetaTrainer(net, QuadraticTask(), config, backend=backend, device=device)
        trainer.train(progress=False)
        results.append([p.detach().cpu().clone() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
