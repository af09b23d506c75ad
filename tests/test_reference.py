import math

import pytest
import torch
from torch import nn

from l2l_fused import l2l_step_ref, preprocess
from helpers import adversarial_grad, random_net, random_state


def _lstmcell_composition(net, theta, grad, h, c):
    """The same step written with nn.LSTMCell modules called directly (the independent specification)."""
    x = preprocess(grad, net.preprocess_p)
    hs, cs = [], []
    for layer, cell in enumerate(net.cells):
        assert isinstance(cell, nn.LSTMCell)
        h_next, c_next = cell(x, (h[layer], c[layer]))
        hs.append(h_next)
        cs.append(c_next)
        x = h_next
    return theta + net.output_scale * net.head(x).squeeze(-1), torch.stack(hs), torch.stack(cs)


@pytest.mark.parametrize("preprocess_p", [10.0, 3.0, None])
@pytest.mark.parametrize("hidden_size,num_layers", [(20, 2), (7, 1), (33, 3)])
def test_reference_matches_lstmcell_float64(seed, preprocess_p, hidden_size, num_layers):
    n = 1013
    net = random_net(hidden_size, num_layers, preprocess_p, 0.37, dtype=torch.float64)
    theta = torch.randn(n, dtype=torch.float64)
    grad = adversarial_grad(n, preprocess_p, torch.float64)
    h, c = random_state(net, n, torch.float64)
    out = l2l_step_ref(theta, grad, h, c, net.cell_weights(), net.head.weight, net.head.bias,
                       preprocess_p=preprocess_p, output_scale=0.37)
    expected = _lstmcell_composition(net, theta, grad, h, c)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_preprocess_branches_by_hand():
    p = 10.0
    t = math.exp(-p)
    g = torch.tensor([0.0, 3.0, -2e-3, t, -t, t / 4, -1e-9, 1e6], dtype=torch.float64)
    x = preprocess(g, p)
    expected = torch.tensor([
        [-1.0, 0.0],                       # zero: small branch, 0 * e^p
        [math.log(3.0) / p, 1.0],          # large branch
        [math.log(2e-3) / p, -1.0],
        [-1.0, 1.0],                       # at the threshold: large branch, log(e^-p)/p = -1
        [-1.0, -1.0],
        [-1.0, 0.25],                      # small branch: e^p * g
        [-1.0, -1e-9 * math.exp(p)],
        [math.log(1e6) / p, 1.0],
    ], dtype=torch.float64)
    torch.testing.assert_close(x, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_preprocess_is_continuous_at_threshold(dtype):
    """Kernels may round exp(-p) differently: the two branches must agree where they meet."""
    p = 10.0
    t = math.exp(-p)
    eps = torch.finfo(dtype).eps
    g = torch.tensor([t * (1 - 4 * eps), t, t * (1 + 4 * eps)], dtype=dtype)
    x = preprocess(torch.cat([g, -g]), p)
    assert torch.all(x[:, 0] + 1 <= 16 * eps)
    assert torch.allclose(x[:, 1].abs(), torch.ones((), dtype=dtype), atol=16 * eps, rtol=0)


def test_raw_gradient_is_one_feature():
    g = torch.randn(5)
    assert torch.equal(preprocess(g, None), g[:, None])


def test_reference_gradcheck_float64(seed):
    n = 9
    net = random_net(5, 2, 10.0, 0.5, dtype=torch.float64)
    grad = adversarial_grad(n, 10.0, torch.float64)
    theta = torch.randn(n, dtype=torch.float64, requires_grad=True)
    h, c = (s.requires_grad_() for s in random_state(net, n, torch.float64))
    weights = [w.detach().requires_grad_() for w in net.parameters()]

    def f(theta, h, c, *flat):
        cells = [tuple(flat[4 * i:4 * i + 4]) for i in range(2)]
        return l2l_step_ref(theta, grad, h, c, cells, flat[8], flat[9], preprocess_p=10.0, output_scale=0.5)

    # net.parameters() order is cells.0.(w_ih, w_hh, b_ih, b_hh), cells.1..., head.(weight, bias)
    assert torch.autograd.gradcheck(f, (theta, h, c, *weights))


def test_no_gradient_into_grad(seed):
    net = random_net()
    grad = torch.randn(10, requires_grad=True)
    theta = torch.randn(10, requires_grad=True)
    h, c = net.init_state(10)
    out, _, _ = l2l_step_ref(theta, grad, h, c, net.cell_weights(), net.head.weight, net.head.bias,
                             preprocess_p=10.0, output_scale=0.1)
    out.sum().backward()
    assert grad.grad is None
    assert theta.grad is not None and net.head.weight.grad is not None


def test_reference_rejects_bad_shapes():
    net = random_net()
    h, c = net.init_state(4)
    args = (net.cell_weights(), net.head.weight, net.head.bias)
    with pytest.raises(ValueError, match="theta and grad"):
        l2l_step_ref(torch.zeros(4), torch.zeros(5), h, c, *args, preprocess_p=10.0, output_scale=0.1)
    with pytest.raises(ValueError, match="h and c"):
        l2l_step_ref(torch.zeros(3), torch.zeros(3), h, c, *args, preprocess_p=10.0, output_scale=0.1)
