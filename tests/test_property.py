"""Property test: L2LOptimizer on random groups of tensors (shapes, dtypes, gradients with NaN, ±inf and
zeros; lr, weight decay, maximize) steps every finite nonzero coordinate as the float64 reference does,
only decays zero-gradient ones and leaves non-finite ones alone."""

import pytest
import torch

from l2l_fused import L2LOptimizer
from l2l_fused.ops.update import Update
from helpers import backend_or_skip, check_group_step, random_net

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, 1e4]

shapes = st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple)
tensors = st.tuples(shapes, st.sampled_from(DTYPES))
groups = st.lists(tensors, min_size=1, max_size=4)


@st.composite
def problems(draw):
    specs = draw(groups)
    seed = draw(st.integers(0, 2**31 - 1))
    special_fraction = draw(st.sampled_from([0.0, 0.2, 1.0]))
    generator = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape, dtype in specs:
        params.append(torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)))
        g = torch.randn(shape, generator=generator, dtype=torch.float64) * 10 ** torch.empty(shape, dtype=torch.float64).uniform_(-8, 3, generator=generator)
        mask = torch.rand(shape, generator=generator) < special_fraction
        picks = torch.tensor(SPECIAL, dtype=torch.float64)[torch.randint(len(SPECIAL), shape, generator=generator)]
        grads.append(torch.where(mask, picks, g).to(dtype))
    options = {"lr": draw(st.sampled_from([1.0, 0.37, 0.0, "tensor"])), "weight_decay": draw(st.sampled_from([0.0, 0.1])),
               "maximize": draw(st.booleans())}
    if options["lr"] == "tensor":  # a tensor lr of another dtype: the optimizer reads it as float32
        options["lr"] = torch.tensor(2.5, dtype=torch.float64)
    return params, grads, draw(st.sampled_from([torch.float32, torch.bfloat16])), options


@pytest.mark.parametrize("backend", ["reference", "native"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
def test_optimizer_matches_reference_and_never_corrupts(backend, problem):
    backend_or_skip(backend, "cpu")
    params, grads, state_dtype, options = problem
    net = random_net()
    opt = L2LOptimizer(params, net=net, backend=backend, state_dtype=state_dtype, **options)
    total = 0
    for step in range(2):  # the first step starts from zero state; the second from what the first left
        for p, g in zip(params, grads):
            p.grad = g.clone()
        thetas = [p.detach().clone().flatten() for p in params]
        states = [(opt.state[p]["h"].clone(), opt.state[p]["c"].clone()) if opt.state[p]
                  else net.init_state(p.numel(), dtype=state_dtype) for p in params]
        hs, cs = [h for h, _ in states], [c for _, c in states]
        opt.step()
        total += check_group_step(net, thetas, [g.flatten() for g in grads], hs, cs,
                                  [p.detach().flatten() for p in params], [opt.state[p]["h"] for p in params],
                                  [opt.state[p]["c"] for p in params], state_dtype, Update(**options))
        assert all(torch.isfinite(opt.state[p][k]).all() for p in params for k in ("h", "c"))
    assert opt.skipped_coordinates().item() == total
