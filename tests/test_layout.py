"""φ packed (ops/layout.py): its offsets, packing and unpacking, the net's cached copy, and the constants
shared with C++ (ops/constants.py → csrc/l2l_constants.h)."""

import copy
import os
import pickle

import pytest
import torch

from l2l_fused.ops import constants
from l2l_fused.ops.layout import NetShape, pack, unpack
from helpers import random_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("hidden,layers,p", [(20, 2, 10.0), (5, 3, None), (33, 1, 3.0)])
def test_packed_rows_are_the_inputs_weights_then_the_bias(hidden, layers, p):
    net = random_net(hidden, layers, p)
    shape = NetShape.of(net)
    packed = pack(net)
    assert packed.shape == (shape.packed_size,)
    for layer, cell in enumerate(net.cells):
        n_x = shape.inputs(layer)
        start = shape.layer_offset(layer)
        matrix = packed[start:start + shape.rows(layer) * 4 * hidden].view(-1, 4 * hidden)
        assert torch.equal(matrix[:n_x], cell.weight_ih.t())
        assert torch.equal(matrix[n_x:n_x + hidden], cell.weight_hh.t())
        assert torch.equal(matrix[-1], cell.bias_ih + cell.bias_hh)
    head = shape.layer_offset(layers)
    assert torch.equal(packed[head:head + hidden], net.head.weight[0])
    assert packed[-1] == net.head.bias[0]


def test_unpack_gives_what_the_reference_computes_with(seed):
    net = random_net(7, 2, 10.0).double()
    cells, head_w, head_b = unpack(pack(net), NetShape.of(net))
    for (w_ih, w_hh, b, zero), cell in zip(cells, net.cells):
        assert torch.equal(w_ih, cell.weight_ih) and torch.equal(w_hh, cell.weight_hh)
        assert torch.equal(b, cell.bias_ih + cell.bias_hh) and not zero.any()
    assert torch.equal(head_w, net.head.weight) and torch.equal(head_b, net.head.bias)


def test_the_packed_gradient_reaches_every_weight(seed):
    """Autograd through pack: a gradient in the packed layout is each weight's gradient (the bias row's
    goes to b_ih and to b_hh both), so packing the weights' gradients gives it back, bias rows doubled."""
    net = random_net(5, 2, 10.0).double()
    shape = NetShape.of(net)
    d_packed = torch.randn(shape.packed_size, dtype=torch.float64)
    (pack(net) * d_packed).sum().backward()
    grads = copy.deepcopy(net)
    for target, w in zip(grads.parameters(), net.parameters()):
        target.data = w.grad
    expected = d_packed.clone()
    for layer in range(shape.layers):
        bias = shape.layer_offset(layer + 1) - 4 * shape.hidden
        expected[bias:bias + 4 * shape.hidden] *= 2
    assert torch.equal(pack(grads).detach(), expected)


def test_the_net_keeps_its_packed_weights_until_a_weight_changes():
    net = random_net()
    first = net.kernel_weights("cpu")
    assert net.kernel_weights("cpu") is first and not first.requires_grad
    with torch.no_grad():
        net.head.bias.add_(1.0)  # in place, as a meta-training step or load_state_dict
    second = net.kernel_weights("cpu")
    assert second is not first and second[-1] == first[-1] + 1.0
    net.load_state_dict(random_net().state_dict())
    assert torch.equal(net.kernel_weights("cpu"), pack(net).detach())
    net.double()  # replaced tensors, new dtype: packed again, still float32
    assert net.kernel_weights("cpu").dtype == torch.float32
    assert torch.equal(net.kernel_weights("cpu"), pack(net).detach().float())


def test_copies_of_a_net_pack_their_own():
    net = random_net()
    cached = net.kernel_weights("cpu")
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert other._packed is None
        with torch.no_grad():
            other.head.bias.zero_()
        assert other.kernel_weights("cpu")[-1] == 0
    assert net.kernel_weights("cpu") is cached


def test_the_constants_header_is_generated_from_constants_py():
    """csrc/l2l_constants.h must be what `python l2l_fused/ops/constants.py` writes."""
    with open(os.path.join(ROOT, "csrc", "l2l_constants.h")) as f:
        assert f.read() == constants.cpp_header(), "stale header: run python l2l_fused/ops/constants.py"
    header = constants.cpp_header()
    assert f"kMaxHidden = {constants.MAX_HIDDEN};" in header
    for name, index in constants.COLUMN.items():
        assert f"= {index}," in header
    assert list(constants.COLUMN.values()) == list(range(len(constants.TABLE_COLUMNS)))
