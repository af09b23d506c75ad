"""Inputs and checks for tests: gradients that hit every preprocessing case, nets with random weights,
and the comparison of a fused step with the float64 reference.

Tolerances of a fused step (float32 math), from the arithmetic:
* float32: every output is a sum of at most 2H + 2 <= 130 products through σ/tanh (Lipschitz <= 1);
  float32 rounding gives ~sqrt(K) * 2**-24 * Σ|terms| ≈ 1e-6 on these inputs, tf32x3 on the GPU drops the
  lo*lo product (~2**-21 per product). F32_TOL = 1e-5 (absolute and relative) leaves a margin of ~10.
* bfloat16 state: a kernel rounds its float32 result once, to nearest: |error| <= 2**-8 |h| + F32_TOL.
* θ' in a narrow dtype: θ + Δ rounded to it, so the dtype's unit roundoff times |θ'|, plus F32_TOL on Δ.
* The optimizer's θ' = θ·decay + lr·Δ: Δ's bound times lr; where decay ≠ 1 (weight decay), θ·decay is
  rounded once more, adding the unit roundoff times |θ·decay|. At decay = 1 that product is exact.
* Fast mode (Triton): the float32 bounds plus :func:`fast_bounds`, a first-order worst case of its TF32
  products and one-instruction activations, computed per coordinate from the reference's own values.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from l2l_fused import LSTMOptimizerNet, available_backends, l2l_update_ref
from l2l_fused.ops.reference import lstm_cell_ref, preprocess
from l2l_fused.ops.update import Update

F32_TOL = 1e-5
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CASES = [  # (preprocess_p, num_layers, hidden_size, output_scale, sizes)
    (10.0, 2, 20, 0.1, [1, 7, 1000, 12345]),  # the paper's net; sizes not multiples of any block
    (None, 1, 20, 1.0, [7, 1000, 3]),  # raw gradient input (quadratics)
    (3.0, 3, 64, 0.5, [1, 777]),  # the largest net the kernels take
    (10.0, 2, 5, 0.3, [130, 7]),  # hidden padded from 5 to 16 (Triton)
    (10.0, 1, 33, 0.2, [65, 2]),  # hidden padded from 33 to 64 (Triton)
    (10.0, 3, 20, 0.3, [131, 5]),  # H = 20 (the native CUDA tiled kernel) with a layer past the second
]


def adversarial_grad(n: int, p: float | None, dtype=torch.float32, generator=None) -> torch.Tensor:
    """n gradient values mixing both preprocessing branches, zeros, tiny, huge and threshold values."""
    g = torch.randn(n, generator=generator, dtype=torch.float64)
    scale = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-25.0, 15.0, generator=generator))
    g = g * scale  # magnitudes from ~1e-11 to ~1e7: both branches of p = 10, many of them
    special = [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 1.0, -1.0]
    if p is not None:
        t = math.exp(-p)
        special += [t, -t, t * (1 + 1e-6), -t * (1 - 1e-6), t * 2, -t / 2]
    k = min(n, len(special))
    idx = torch.randperm(n, generator=generator)[:k]
    g[idx] = torch.tensor(special[:k], dtype=torch.float64)
    return g.to(dtype)


def random_net(hidden_size=20, num_layers=2, preprocess_p=10.0, output_scale=0.1, dtype=torch.float32) -> LSTMOptimizerNet:
    """A net with weights larger than nn.LSTMCell's default, so gates saturate and every term matters."""
    net = LSTMOptimizerNet(hidden_size, num_layers, preprocess_p, output_scale).to(dtype)
    with torch.no_grad():
        for w in net.parameters():
            w.uniform_(-0.7, 0.7)
    return net


def random_state(net: LSTMOptimizerNet, n: int, dtype=torch.float32):
    shape = (net.num_layers, n, net.hidden_size)
    return torch.randn(shape, dtype=dtype) * 0.5, torch.randn(shape, dtype=dtype)


def grad_for(n, p, dtype, generator=None):
    """Adversarial gradients that stay finite in ``dtype`` (non-finite ones have tests of their own)."""
    g = adversarial_grad(n, p, torch.float64, generator)
    limit = torch.finfo(dtype).max / 2
    return g.clamp(-limit, limit).to(dtype)


def reference64(net, grads, hs, cs):
    """Δ, h', c' of the flat group in float64 on the CPU, from exactly the values a kernel read."""
    net64 = copy.deepcopy(net).double().cpu()
    grad = torch.cat([g.cpu().double().flatten() for g in grads])
    h = torch.cat([t.cpu().double() for t in hs], 1)
    c = torch.cat([t.cpu().double() for t in cs], 1)
    with torch.no_grad():
        return l2l_update_ref(grad, h, c, net64.cell_weights(), net64.head.weight, net64.head.bias,
                              preprocess_p=net.preprocess_p, output_scale=net.output_scale)


# Fast mode's per-product error: an operand truncated to TF32 (≤ 2⁻¹⁰ relative), a weight rounded to it
# (≤ 2⁻¹¹). tanh.approx.f32's relative error, where fast mode runs it (the GPU; PTX ISA: 2⁻¹⁰·⁹⁸⁷).
TF32_PRODUCT = 2.0**-10 + 2.0**-11
TANH_APPROX = 2.0**-10.987


def fast_bounds(net, grads, hs, cs):
    """``(Δ, h', c')`` bounds on |fast − exact| of one step, first order, per coordinate (float64).

    Per layer, with ``a`` its inputs [x | h | 1] and ``δa`` their errors (the layer below's h' bound):
    |δz_j| ≤ TF32_PRODUCT·Σ_k |w_jk a_k| + Σ_k |w_jk| δa_k. Activations: σ = ½ + ½·tanh(z/2) errs by
    ≤ ¼|δz| + ½A, tanh by ≤ |δz| + A (A = TANH_APPROX; |σ|, |tanh| ≤ 1). So c' = f·c + i·g errs by
    ≤ (¼δz_f + ½A)|c| + ¼δz_i + ½A + δz_g + A, and h' = o·tanh(c') by ≤ ¼δz_o + ½A + δc' + A. Δ = s(w·h' + b)
    by ≤ s·Σ|w| δh' of the top layer. Worst-case signs throughout: loose, but derived."""
    net64 = copy.deepcopy(net).double().cpu()
    grad = torch.cat([g.cpu().double().flatten() for g in grads])
    h = torch.cat([t.cpu().double() for t in hs], 1)
    c = torch.cat([t.cpu().double() for t in cs], 1)
    x = preprocess(grad, net.preprocess_p)
    dx = torch.zeros_like(x)
    a_half = TANH_APPROX / 2
    bounds_h, bounds_c = [], []
    with torch.no_grad():
        for layer, weights in enumerate(net64.cell_weights()):
            w = torch.cat([weights[0], weights[1]], 1).abs()  # [4H, n_x + H]
            inputs = torch.cat([x, h[layer]], 1).abs()
            da = torch.cat([dx, torch.zeros_like(h[layer])], 1)
            dz = TF32_PRODUCT * (inputs @ w.t() + (weights[2] + weights[3]).abs()) + da @ w.t()
            dzi, dzf, dzg, dzo = dz.chunk(4, 1)
            dc = (dzf / 4 + a_half) * c[layer].abs() + dzi / 4 + a_half + dzg + TANH_APPROX
            dh = dzo / 4 + a_half + dc + TANH_APPROX
            bounds_h.append(dh)
            bounds_c.append(dc)
            x, _ = lstm_cell_ref(x, h[layer], c[layer], weights)
            dx = dh
        delta = net.output_scale * (dx @ net64.head.weight.abs().t()).squeeze(-1)
    return delta, torch.stack(bounds_h), torch.stack(bounds_c)


def assert_within(got, want, bound, what):
    got = got.cpu().double()
    if got.numel() == 0:  # nothing to compare (a tensor whose every coordinate was skipped, say)
        return
    assert not torch.isnan(got).any(), f"{what}: unwritten (poisoned) or NaN elements"
    excess = (got - want).abs() - bound
    worst = excess.argmax()
    assert excess.max() <= 0, (
        f"{what}: |got - want| exceeds the bound by {excess.max().item():.3g} at {worst.item()} "
        f"(got {got.flatten()[worst].item()!r}, want {want.flatten()[worst].item()!r})"
    )


def group_inputs(net, sizes, state_dtype, device):
    """θ of mixed dtypes (cycling through DTYPES), finite adversarial ∇ and random state, per size."""
    thetas, grads, hs, cs = [], [], [], []
    for i, n in enumerate(sizes):
        dtype = DTYPES[i % len(DTYPES)]
        thetas.append(torch.randn(n, dtype=torch.float64).to(dtype).to(device))
        grads.append(grad_for(n, net.preprocess_p, dtype).to(device))
        h, c = (s.to(state_dtype).to(device) for s in random_state(net, n))
        hs.append(h), cs.append(c)
    return thetas, grads, hs, cs


def check_step(net, thetas, grads, hs, cs, theta_outs, h_outs, c_outs, state_dtype, lr=1.0, decay=1.0,
               precision="exact"):
    """Outputs of one step of a group against the float64 reference, within the bounds above:
    θ' = θ·decay + lr·Δ. The bound on Δ scales with lr; a decay other than 1 adds the rounding of θ·decay;
    ``precision="fast"`` adds :func:`fast_bounds`."""
    delta, h_ref, c_ref = reference64(net, grads, hs, cs)
    fast = fast_bounds(net, grads, hs, cs) if precision == "fast" else (0.0, 0.0, 0.0)
    offset = 0
    for theta, theta_out, h_out, c_out in zip(thetas, theta_outs, h_outs, c_outs):
        n = theta.numel()
        step = lr * delta[offset:offset + n]
        decayed = theta.cpu().double() * decay
        want = decayed + step
        u = UNIT_ROUNDOFF[theta.dtype] + UNIT_ROUNDOFF[torch.float32]
        bound = u * want.abs() + F32_TOL * (lr + step.abs()) + (0.0 if decay == 1.0 else u * decayed.abs())
        bound = bound + lr * (fast[0] if precision == "exact" else fast[0][offset:offset + n])
        assert_within(theta_out, want, bound, f"θ' ({theta.dtype}, n={n}, lr={lr}, decay={decay})")
        for got, ref, name, extra in ((h_out, h_ref, "h'", fast[1]), (c_out, c_ref, "c'", fast[2])):
            ref = ref[:, offset:offset + n]
            extra = extra if precision == "exact" else extra[:, offset:offset + n]
            bound = F32_TOL * (1 + ref.abs()) + UNIT_ROUNDOFF[state_dtype] * (ref.abs() + extra) + extra
            assert_within(got, ref, bound, f"{name} ({state_dtype}, n={n})")
        offset += n


def factors(update: Update) -> tuple[float, float]:
    """``(lr, 1 − lr·wd)`` as the kernels compute them (float32 lr and wd, the product and difference in
    float64, rounded to float32), as exact Python floats."""
    lr = torch.as_tensor(update.lr, dtype=torch.float32).cpu()
    weight_decay = torch.tensor(update.weight_decay, dtype=torch.float32)
    return lr.item(), (1.0 - lr.double() * weight_decay.double()).float().item()


def check_group_step(net, thetas, grads, hs, cs, theta_outs, h_outs, c_outs, state_dtype, update=Update()):
    """The optimizer's step of a group (``Update`` options) against the float64 reference. A coordinate
    whose gradient is NaN or ±inf keeps θ, h and c bit for bit; one whose gradient is zero keeps h and c bit
    for bit and θ becomes θ·(1 − lr·wd), rounded once; every other one gets θ' = θ·(1 − lr·wd) + lr·Δ(±∇)
    within :func:`check_step`'s bounds. Returns how many coordinates were non-finite."""
    lr, decay = factors(update)
    finite = [torch.isfinite(g.flatten()) for g in grads]
    moving = [f & (g.flatten() != 0) for f, g in zip(finite, grads)]
    for ok, move, *tensors in zip(finite, moving, thetas, hs, cs, theta_outs, h_outs, c_outs):
        ok, move = ok.cpu(), move.cpu()
        theta, h, c, theta_out, h_out, c_out = (t.cpu() for t in tensors)
        hold = ~move
        assert torch.equal(theta_out.flatten()[~ok], theta.flatten()[~ok]), "θ of a non-finite coordinate changed"
        assert torch.equal(h_out[:, hold], h[:, hold]) and torch.equal(c_out[:, hold], c[:, hold]), \
            "state of a non-finite or zero-gradient coordinate changed"
        still = ok & hold
        wide = torch.float64 if theta.dtype == torch.float64 else torch.float32
        decayed = (theta.flatten()[still].to(wide) * decay).to(theta.dtype)
        assert torch.equal(theta_out.flatten()[still], decayed), "θ of a zero-gradient coordinate is not θ·(1 − lr·wd)"

    def pick(ts, dim=0):  # the moving coordinates: of flattened θ and ∇ (dim 0), of h and c (dim 1)
        return [(t.flatten() if dim == 0 else t).index_select(dim, torch.nonzero(m.to(t.device)).flatten())
                for t, m in zip(ts, moving)]

    sign = -1.0 if update.maximize else 1.0
    check_step(net, pick(thetas), [sign * g for g in pick(grads)], pick(hs, 1), pick(cs, 1), pick(theta_outs),
               pick(h_outs, 1), pick(c_outs, 1), state_dtype, lr, decay)
    return sum(int((~f).sum()) for f in finite)


def snapshot(opt, params):
    """Copies of the parameters' values and of an optimizer's whole state, for :func:`assert_unchanged`."""
    return [p.detach().clone() for p in params], {p: {k: t.clone() for k, t in s.items()} for p, s in opt.state.items()}


def assert_unchanged(opt, params, snapshot):
    """Nothing lost: the parameters and the optimizer's state are bit for bit what ``snapshot`` saw."""
    values, state = snapshot
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    assert set(opt.state) == set(state)
    for p, s in state.items():
        for k, t in s.items():
            assert torch.equal(opt.state[p][k], t)


def backend_or_skip(name: str, device: str) -> tuple[str, torch.device]:
    """``(name, device)`` where that backend (or "auto") runs here; the calling test is skipped otherwise."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name != "auto" and name not in available_backends(device):
        pytest.skip(f"{name} is not available on {device} here")
    return name, torch.device(device)


# ------------------------------------------------------------------------------ meta-gradients

def unroll_grads(net, backend, thetas, states, grads, weights_out, device, dtype=torch.float32, **options):
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


def unroll_problem(net, sizes, generator):
    thetas = [torch.randn(n, generator=generator) for n in sizes]
    states = [tuple(s for s in random_state(net, n)) for n in sizes]
    grads = [[adversarial_grad(n, net.preprocess_p, generator=generator) for _ in range(3)] for n in sizes]
    weights_out = [torch.randn(n, generator=generator) for n in sizes]
    return thetas, states, grads, weights_out


def unrolled_meta_gradients(net, name, device, seed, **options):
    """(names, fused, float64 reference, float32 reference) gradients of a 3-step unroll of three θ tensors."""
    problem = unroll_problem(net, [1000, 7, 65], torch.Generator().manual_seed(seed))
    got = unroll_grads(net, name, *problem, device, **options)
    want = unroll_grads(net, "reference", *problem, "cpu", torch.float64)
    torch32 = unroll_grads(net, "reference", *problem, "cpu", torch.float32)
    names = [f"{kind}{i}" for i in range(3) for kind in ("theta", "h", "c")] + [n for n, _ in net.named_parameters()]
    return names, got, want, torch32
