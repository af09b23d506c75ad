"""The two arithmetic modes (l2l_fused.ops.precision): how a call picks one, the fast mode of the Triton
forward against the float64 reference (tolerances in helpers.py), its weight tiles, and that the other
backends compute exactly in both."""

import pytest
import torch

from l2l_fused import L2LOptimizer
from l2l_fused.ops import interface, precision
from l2l_fused.ops.layout import NetShape
from helpers import (CASES, F32_TOL, TANH_APPROX, assert_within, backend_or_skip, check_step, group_inputs,
                     random_net, random_state, reference64, unrolled_meta_gradients)


@pytest.fixture
def matmul_precision():
    """Sets torch.set_float32_matmul_precision for a test, restoring it after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def test_none_follows_the_float32_matmul_precision(matmul_precision):
    assert precision.resolve("fast") == "fast" and precision.resolve("exact") == "exact"
    for setting, mode in (("highest", "exact"), ("high", "fast"), ("medium", "fast")):
        matmul_precision(setting)
        assert precision.resolve(None) == mode


def test_bad_precision_is_refused_by_name_and_changes_nothing():
    net = random_net()
    with pytest.raises(ValueError, match="precision must be None .* got 'tf32'"):
        L2LOptimizer([torch.nn.Parameter(torch.randn(3))], net=net, precision="tf32")
    with pytest.raises(ValueError, match="param group 1: precision must be"):
        L2LOptimizer([{"params": [torch.nn.Parameter(torch.randn(3))]},
                      {"params": [torch.nn.Parameter(torch.randn(3))], "precision": "half"}], net=net)
    theta = torch.randn(4)
    state = net.init_state(4)
    with pytest.raises(ValueError, match="precision must be"):
        net(theta, torch.randn(4), state, precision="bf16")
    p = torch.nn.Parameter(torch.randn(5))
    opt = L2LOptimizer([p], net=net)
    p.grad = torch.randn(5)
    before = p.detach().clone()
    opt.param_groups[0]["precision"] = "quick"  # as a scheduler or a user might
    with pytest.raises(ValueError, match="param group 0: precision must be"):
        opt.step()
    assert torch.equal(p, before) and not opt.state


@pytest.mark.parametrize("name,device", [("reference", "cpu"), ("native", "cpu"), ("native", "cuda")])
def test_backends_without_a_fast_path_compute_exactly_in_both(seed, name, device):
    """The fast mode changes only the Triton kernels: elsewhere both modes give the same bits."""
    name, device = backend_or_skip(name, device)
    net = random_net().to(device)
    n = 300
    theta, grad = torch.randn(n, device=device), torch.randn(n, device=device)
    h, c = (s.to(device) for s in random_state(net, n))
    impl = interface.resolve(name, device, net)
    exact = impl.step(net, theta, grad, h, c, precision="exact")
    fast = impl.step(net, theta, grad, h, c, precision="fast")
    for a, b in zip(exact, fast):
        assert torch.equal(a, b)


def _triton(kernel_device):
    backend_or_skip("triton", kernel_device.type)
    from l2l_fused.ops.triton import forward

    return forward


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,layers,hidden,scale,sizes", CASES)
def test_fast_launch_matches_reference(seed, kernel_device, state_dtype, p, layers, hidden, scale, sizes):
    """Out of place over mixed-dtype tensors, outputs poisoned first; within the float32 bounds plus the
    fast mode's derived bound (helpers.fast_bounds)."""
    forward = _triton(kernel_device)
    net = random_net(hidden, layers, p, scale)
    thetas, grads, hs, cs = group_inputs(net, sizes, state_dtype, kernel_device)
    outs = [[torch.full_like(t, float("nan")) for t in ts] for ts in (thetas, hs, cs)]
    rows = list(zip(thetas, outs[0], grads, hs, outs[1], cs, outs[2]))
    forward.launch_forward(rows, net.kernel_weights(kernel_device), NetShape.of(net), precision="fast")
    check_step(net, thetas, grads, hs, cs, *outs, state_dtype, precision="fast")


def _tf32(t: torch.Tensor) -> torch.Tensor:
    return (t.float().view(torch.int32) & -0x2000).view(torch.float32)


@pytest.mark.parametrize("hidden,sizes", [(20, [1, 1000, 333]), (5, [130])])
def test_fast_mode_is_exact_on_tf32_operands(seed, kernel_device, hidden, sizes):
    """One layer fed the raw gradient, with every operand of its one product (weights, gradient, h, and
    the bias) already in TF32: then the tensor cores multiply exactly and the fast mode's only errors are
    float32 sums and, on the GPU, tanh.approx. The float32 bound (plus tanh.approx's on the GPU, through
    at most three activations of Lipschitz ≤ 1 and |values| ≤ 1) is tight enough to catch a wrong gate
    scale, tile or activation, which the worst-case bound of a deep net would not."""
    forward = _triton(kernel_device)
    net = random_net(hidden, 1, None, 0.5)
    with torch.no_grad():
        for w in net.cells[0].parameters():
            w.copy_(_tf32(w))
        net.cells[0].bias_hh.zero_()  # the packed bias is their sum: keep it a TF32 value
    thetas, grads, hs, cs = [], [], [], []
    for n in sizes:
        thetas.append(torch.randn(n, device=kernel_device))
        grads.append(_tf32(torch.randn(n) * 3).to(kernel_device))
        h, c = random_state(net, n)
        hs.append(_tf32(h).to(kernel_device)), cs.append(c.to(kernel_device))
    outs = [[torch.full_like(t, float("nan")) for t in ts] for ts in (thetas, hs, cs)]
    rows = list(zip(thetas, outs[0], grads, hs, outs[1], cs, outs[2]))
    forward.launch_forward(rows, net.kernel_weights(kernel_device), NetShape.of(net), precision="fast")
    delta, h_ref, c_ref = reference64(net, grads, hs, cs)
    approx = 3 * TANH_APPROX if kernel_device.type == "cuda" else 0.0
    offset = 0
    for theta, theta_out, h_out, c_out in zip(thetas, *outs):
        n = theta.numel()
        d = delta[offset:offset + n]
        want = theta.cpu().double() + d
        head = net.output_scale * net.head.weight.abs().sum().item()
        assert_within(theta_out, want, F32_TOL * (1 + want.abs()) + head * approx, "θ'")
        for got, ref in ((h_out, h_ref), (c_out, c_ref)):
            ref = ref[:, offset:offset + n]
            assert_within(got, ref, F32_TOL * (1 + ref.abs()) + approx * (1 + ref.abs()), "state")
        offset += n


def test_tensor_core_weights_hold_the_scaled_net(seed, kernel_device):
    """Each tile is the layer's weights in gate·HP + unit columns, times the gate's pre-scale; exact mode's
    hi + lo give them back to 2⁻²² relative, fast mode's hi to 2⁻¹¹; padding is zero; the head follows."""
    forward = _triton(kernel_device)
    net = random_net(20, 2, 10.0, 0.1)
    shape = NetShape.of(net)
    weights = net.kernel_weights(kernel_device)
    c = forward.kernel_constants(shape, torch.float32, "exact")
    H, HP, K0, K1 = 20, c["HP"], c["K0"], c["K1"]
    cells = net.cell_weights()
    for mode, parts, tol in (("exact", 2, 2.0**-22), ("fast", 1, 2.0**-11)):
        tiles = forward.tensor_core_weights(weights, shape, mode).cpu()
        scales = torch.tensor(forward.GATE_SCALES[mode]).repeat_interleave(H)
        w_ih0, w_hh0, b_ih0, b_hh0 = (t.detach() for t in cells[0])
        w_ih1, w_hh1, b_ih1, b_hh1 = (t.detach() for t in cells[1])
        wanted = [  # rows of each tile, each [4H] in the net's gate order
            (K0, [w_hh0[:, k] for k in range(H)] + [w_ih0[:, 0], w_ih0[:, 1], b_ih0 + b_hh0]),
            (HP, [w_ih1[:, k] for k in range(H)]),
            (K1, [w_hh1[:, k] for k in range(H)] + [b_ih1 + b_hh1]),
        ]
        at = 0
        for rows, columns in wanted:
            block = tiles[at:at + parts * rows * 4 * HP].view(parts, rows, 4, HP).sum(0)
            want = torch.zeros(rows, 4, HP)
            want[:len(columns), :, :H] = (torch.stack(columns) * scales).view(len(columns), 4, H)
            assert torch.all((block - want).abs() <= tol * want.abs()), mode
            at += parts * rows * 4 * HP
        head = tiles[at:]
        assert torch.equal(head[:H], net.head.weight.detach()[0]) and torch.all(head[H:HP] == 0)
        assert torch.equal(head[HP:], net.head.bias.detach())


@pytest.mark.parametrize("name,device", [("triton", "cpu"), ("triton", "cuda"), ("native", "cpu"), ("native", "cuda")])
def test_misaligned_tensors_take_the_unvectorised_path(seed, name, device):
    """θ, ∇ and state at addresses that are not 16-byte aligned (views into a buffer at an odd offset) take
    the kernels' unvectorised variants (Triton: ALIGNED=False; native CUDA: the generic kernel), correctly."""
    name, device = backend_or_skip(name, device)
    net = random_net().to(device)
    n = 77

    def odd(t: torch.Tensor) -> torch.Tensor:
        buffer = torch.empty(t.numel() + 1, device=device)
        buffer[1:] = t.flatten().to(device)
        return buffer[1:].view_as(t)

    theta, grad = odd(torch.randn(n)), odd(torch.randn(n) * 1e-3)
    h, c = (odd(s) for s in random_state(net, n))
    theta_out, h_out, c_out = interface.resolve(name, device, net).step(net, theta, grad, h, c, precision="exact")
    check_step(net, [theta], [grad], [h], [c], [theta_out], [h_out], [c_out], torch.float32)


def test_optimizer_precision_option_reaches_the_kernel(seed, kernel_device, matmul_precision):
    """precision="fast" on a group and precision=None under set_float32_matmul_precision("high") take the
    same fast path, bit for bit; "highest" the exact one."""
    backend_or_skip("triton", kernel_device.type)
    net = random_net().to(kernel_device)
    results = {}
    for label, option, setting in (("fast", "fast", "highest"), ("high", None, "high"), ("exact", None, "highest")):
        matmul_precision(setting)
        torch.manual_seed(seed)
        p = torch.nn.Parameter(torch.randn(500, device=kernel_device))
        opt = L2LOptimizer([p], net=net, backend="triton", precision=option)
        p.grad = torch.randn(500, device=kernel_device)
        opt.step()
        results[label] = p.detach().clone()
    assert torch.equal(results["fast"], results["high"])
    assert not torch.equal(results["fast"], results["exact"])


# Fast-mode weight gradients and adjoints: each unrolled step and layer perturbs what flows through it at
# a handful of sites, each relatively: the forward's product (1.5·2⁻¹⁰: a truncated, b rounded), five
# tanh.approx activations (≤ 2⁻¹¹ each: σ = ½ + ½·tanh halves it), the adjoint's product dZ·Wᵀ (1.5·2⁻¹⁰)
# and the weight gradient's aᵀ·dZ (2·2⁻¹⁰, both truncated): ≤ 7.5·2⁻¹⁰ per step and layer, 3·L of them on
# the longest chain of a 3-step unroll. Relative to each gradient's largest value (sums with cancellation
# are held to the same absolute bound), plus the float32 test's allowance. A wrong gate scale, tile or
# transposed tile errs by O(1) and fails it.
FAST_SITES_PER_LAYER_STEP = 7.5 * 2.0**-10


@pytest.mark.parametrize("preprocess_p,num_layers", [(10.0, 2), (None, 1), (10.0, 3)])
def test_fast_meta_gradient_is_within_its_derived_bound(seed, kernel_device, preprocess_p, num_layers):
    backend_or_skip("triton", kernel_device.type)
    net = random_net(20, num_layers, preprocess_p, 0.3)
    bound = 3 * num_layers * FAST_SITES_PER_LAYER_STEP
    for what, a, b, t in zip(*unrolled_meta_gradients(net, "triton", kernel_device, seed, precision="fast")):
        scale = b.abs().max().item()
        err = (a.cpu().double() - b).abs().max().item()
        err_torch = (t.double() - b).abs().max().item()
        assert err <= 2 * err_torch + (1e-5 + bound) * scale, f"{what}: {err / scale:.3g} of its largest value"


def test_tiles_map_back_to_packed_weights(seed, kernel_device):
    """The backward returns weight gradients in the tiles' layout: packed_from_tiles must invert
    operand_tiles (and the padded head) exactly, for a net whose H pads (5 → 16) and one that does not."""
    forward = _triton(kernel_device)

    for net in (random_net(20, 3, 10.0, 0.1), random_net(5, 2, None, 0.1)):
        shape = NetShape.of(net)
        weights = net.kernel_weights("cpu")
        HP = forward.padded(shape.hidden)
        head = weights[shape.layer_offset(shape.layers):]
        flat = torch.cat([t.reshape(-1) for t in forward.operand_tiles(weights, shape)]
                         + [torch.nn.functional.pad(head[:-1], (0, HP - shape.hidden)), head[-1:]])
        assert torch.equal(forward.packed_from_tiles(flat, shape), weights)
