"""The fused backward (autograd through backend="triton") against autograd through the float64 reference.

Tolerance: the backward is float32 arithmetic of the same depth as the forward, plus weight gradients
that are sums over all coordinates (each block's partial by a tf32x3 dot, then float32 sums): the
error stays near sqrt(terms) * 2**-24 of the largest gradient, so 1e-5 of each tensor's largest value
(max-norm relative) leaves a wide margin and still catches any wrong term (those are O(1) relative).
"""

import copy

import pytest
import torch

from l2l_fused import LSTMOptimizerNet
from l2l_fused.meta import MetaTrainer, QuadraticTask, TrainConfig
from l2l_fused.triton_math import triton
from helpers import adversarial_grad, random_net, random_state

pytestmark = pytest.mark.skipif(triton is None, reason="needs triton")

REL_TOL = 1e-5


def _unroll_grads(net, backend, thetas, states, grads, weights_out, device, dtype=torch.float32, **options):
    """Summed meta-loss of a 3-step unroll of several θ tensors; gradients wrt each θ, h0, c0 and φ."""
    net = copy.deepcopy(net).to(device=device, dtype=dtype)
    leaves, total = [], 0
    for theta0, (h0, c0), steps, w in zip(thetas, states, grads, weights_out):
        theta = theta0.to(device, dtype).requires_grad_()
        h, c = h0.to(device, dtype).requires_grad_(), c0.to(device, dtype).requires_grad_()
        leaves += [theta, h, c]
        x, state = theta, (h, c)
        for g in steps:
            x, state = net(x, g.to(device, dtype), state, backend=backend, **options)
            # a loss on θ' (what meta-training has) and on the state, so every adjoint input is non-zero
            total = total + (x * w.to(device, dtype)).sum() + 0.1 * state[0].sum() + 0.05 * state[1].pow(2).sum()
    return torch.autograd.grad(total, leaves + list(net.parameters()))


def _problem(net, sizes, generator):
    thetas = [torch.randn(n, generator=generator) for n in sizes]
    states = [tuple(s for s in random_state(net, n)) for n in sizes]
    grads = [[adversarial_grad(n, net.preprocess_p, generator=generator) for _ in range(3)] for n in sizes]
    weights_out = [torch.randn(n, generator=generator) for n in sizes]
    return thetas, states, grads, weights_out


@pytest.mark.parametrize("preprocess_p,num_layers", [(10.0, 2), (10.0, 1), (None, 2), (None, 1)])
def test_unrolled_meta_gradient_matches_float64_reference(seed, kernel_device, preprocess_p, num_layers):
    net = random_net(20, num_layers, preprocess_p, 0.3)
    problem = _problem(net, [1000, 7, 65], torch.Generator().manual_seed(seed))
    got = _unroll_grads(net, "triton", *problem, kernel_device)
    want = _unroll_grads(net, "reference", *problem, "cpu", torch.float64)
    names = [f"{kind}{i}" for i in range(3) for kind in ("theta", "h", "c")] + [n for n, _ in net.named_parameters()]
    for name, a, b in zip(names, got, want):
        scale = b.abs().max().item()
        err = (a.cpu().double() - b).abs().max().item()
        assert err <= REL_TOL * scale, f"{name}: max error {err:.3g}, {err / scale:.3g} of its largest value"


def test_repeated_backward_gives_bit_identical_weight_gradients(seed, kernel_device):
    net = random_net().to(kernel_device)
    n = 3000  # several blocks per program and a final partial block
    h, c = (s.to(kernel_device) for s in random_state(net, n))
    grad = adversarial_grad(n, 10.0).to(kernel_device)
    theta = torch.randn(n, device=kernel_device, requires_grad=True)
    w = torch.randn(n, device=kernel_device)

    def weight_grads():
        x, (h2, c2) = net(theta, grad, (h, c), backend="triton")
        return torch.autograd.grad((x * w).sum() + h2.sum() + c2.pow(2).sum(), list(net.parameters()))

    first = weight_grads()
    for a, b in zip(first, weight_grads()):
        assert torch.equal(a, b)


def test_no_gradient_flows_into_the_optimizee_gradient(seed, kernel_device):
    net = random_net().to(kernel_device)
    grad = torch.randn(50, device=kernel_device, requires_grad=True)
    theta = torch.randn(50, device=kernel_device, requires_grad=True)
    x, _ = net(theta, grad, net.init_state(50, device=kernel_device), backend="triton")
    x.sum().backward()
    assert grad.grad is None and theta.grad is not None and net.head.bias.grad is not None


@pytest.mark.parametrize("saved_state_dtype,limit", [(None, 340), (torch.bfloat16, 180)])
def test_saved_bytes_per_coordinate_per_step(kernel_device, saved_state_dtype, limit):
    """Counts what autograd keeps for one step (the weights, shared by all coordinates, aside)."""
    net = random_net().to(kernel_device)
    n = 4096
    saved = []

    def pack(t):
        saved.append(t)
        return t

    theta = torch.randn(n, device=kernel_device, requires_grad=True)
    state = tuple(s.to(kernel_device).requires_grad_() for s in random_state(net, n))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(theta, torch.randn(n, device=kernel_device), state, backend="triton", saved_state_dtype=saved_state_dtype)
    per_coordinate = [t for t in saved if t.numel() >= n]
    total = sum(t.numel() * t.element_size() for t in per_coordinate) / n
    assert total <= limit, [(tuple(t.shape), t.dtype) for t in per_coordinate]
    assert total == (4 + 2 * 2 * 20 * (2 if saved_state_dtype else 4))  # ∇ in float32, h and c


def test_bf16_saved_state_bounds_the_gradient_error(seed, kernel_device):
    """Saving h and c rounded to bfloat16 (relative error <= 2**-8) moves the recomputed gates by as much,
    and through sigmoid/tanh (slopes <= 1) and weights of norm ~1 the gradients by a few times that:
    the bound is 4 * 2**-8 of each tensor's largest value."""
    net = random_net(20, 2, 10.0, 0.3)
    problem = _problem(net, [500], torch.Generator().manual_seed(seed))
    exact = _unroll_grads(net, "triton", *problem, kernel_device)
    rounded = _unroll_grads(net, "triton", *problem, kernel_device, saved_state_dtype=torch.bfloat16)
    for a, b in zip(rounded, exact):
        assert (a - b).abs().max() <= 4 * 2**-8 * b.abs().max()


def test_reference_rejects_saved_state_dtype():
    net = LSTMOptimizerNet()
    with pytest.raises(ValueError, match="needs a fused backend"):
        net(torch.zeros(3), torch.zeros(3), net.init_state(3), backend="reference", saved_state_dtype=torch.bfloat16)


def test_meta_training_on_the_fused_backend_matches_the_reference(seed, kernel_device):
    """A few meta-updates through backend="triton" land where the reference's do (to float32 noise)."""
    config = TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=4, steps=6, truncation=3, val_functions=4, seed=seed)
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(seed)
        net = LSTMOptimizerNet(**QuadraticTask().net_options())
        trainer = MetaTrainer(net, QuadraticTask(), config, backend=backend, device=kernel_device)
        trainer.train(progress=False)
        results.append([p.detach().cpu().clone() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
