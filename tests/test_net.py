import pytest
import torch
from torch import nn
from torch.func import functional_call

import l2l_fused
from l2l_fused import LSTMOptimizerNet, l2l_step_ref
from helpers import adversarial_grad, random_net, random_state


def test_weights_are_plain_lstmcells_and_linear():
    net = LSTMOptimizerNet(hidden_size=20, num_layers=2, preprocess_p=10.0, output_scale=0.1)
    assert isinstance(net.cells, nn.ModuleList) and all(type(c) is nn.LSTMCell for c in net.cells)
    assert type(net.head) is nn.Linear and net.head.out_features == 1
    assert [c.input_size for c in net.cells] == [2, 20]
    assert LSTMOptimizerNet(preprocess_p=None).cells[0].input_size == 1
    # A state dict of φ loads into plain PyTorch modules.
    cell = nn.LSTMCell(2, 20)
    cell.load_state_dict({k.removeprefix("cells.0."): v for k, v in net.state_dict().items() if k.startswith("cells.0.")})
    assert set(net.state_dict()) == {
        f"cells.{i}.{w}" for i in range(2) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    } | {"head.weight", "head.bias"}


def test_init_state():
    net = LSTMOptimizerNet(hidden_size=7, num_layers=3).double()
    h, c = net.init_state(11)
    assert h.shape == c.shape == (3, 11, 7) and h.dtype == torch.float64
    assert not h.any() and not c.any()
    h, _ = net.init_state(2, dtype=torch.float32, device="cpu")
    assert h.dtype == torch.float32


@pytest.mark.parametrize("kwargs", [dict(hidden_size=0), dict(num_layers=0), dict(preprocess_p=0.0), dict(hidden_size=2.5)])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LSTMOptimizerNet(**kwargs)


def test_forward_matches_reference_and_keeps_shape(seed):
    net = random_net()
    theta = torch.randn(3, 5, 7)
    grad = adversarial_grad(theta.numel(), 10.0).view_as(theta)
    h, c = random_state(net, theta.numel())
    out, (h2, c2) = net(theta, grad, (h, c), backend="reference")
    ref = l2l_step_ref(theta.flatten(), grad.flatten(), h, c, net.cell_weights(), net.head.weight, net.head.bias,
                       preprocess_p=10.0, output_scale=0.1)
    assert out.shape == theta.shape
    torch.testing.assert_close(out.flatten(), ref[0], rtol=0, atol=0)
    torch.testing.assert_close(h2, ref[1], rtol=0, atol=0)
    torch.testing.assert_close(c2, ref[2], rtol=0, atol=0)


@pytest.mark.parametrize("preprocess_p,num_layers", [(10.0, 2), (None, 1)])
def test_forward_gradcheck_float64(seed, preprocess_p, num_layers):
    net = random_net(4, num_layers, preprocess_p, 0.3, dtype=torch.float64)
    n = 6
    grad = adversarial_grad(n, preprocess_p, torch.float64)
    theta = torch.randn(n, dtype=torch.float64, requires_grad=True)
    h, c = (s.requires_grad_() for s in random_state(net, n, torch.float64))
    names = [name for name, _ in net.named_parameters()]
    weights = [w.detach().requires_grad_() for w in net.parameters()]

    def f(theta, h, c, *ws):
        out, (h2, c2) = functional_call(net, dict(zip(names, ws)), (theta, grad, (h, c)))
        return out, h2, c2

    assert torch.autograd.gradcheck(f, (theta, h, c, *weights))


def test_forward_rejects_bad_input():
    net = LSTMOptimizerNet()
    state = net.init_state(4)
    with pytest.raises(ValueError, match="grad must have theta's shape"):
        net(torch.zeros(4), torch.zeros(5), state)
    with pytest.raises(ValueError, match=r"state must be \(h, c\)"):
        net(torch.zeros(5), torch.zeros(5), state)
    with pytest.raises(ValueError, match="theta has dtype torch.float64"):
        net(torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), state)


def test_backend_registry_errors_list_available():
    net = LSTMOptimizerNet()
    with pytest.raises(ValueError, match=r"backend 'nope': no such backend; available: \['auto', .*'reference'"):
        net(torch.zeros(4), torch.zeros(4), net.init_state(4), backend="nope")
    assert "reference" in l2l_fused.available_backends("cpu")


def test_reference_rejects_saved_state_dtype():
    net = LSTMOptimizerNet()
    with pytest.raises(ValueError, match="needs a fused backend"):
        net(torch.zeros(3), torch.zeros(3), net.init_state(3), backend="reference", saved_state_dtype=torch.bfloat16)
