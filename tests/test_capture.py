"""``capturable=True`` and CUDA graphs: a captured ``step()`` replays exactly what eager steps do.

Without a GPU, capture is simulated (``l2l_fused.capture.capturing`` answers True) to check what the
optimizer and the launch tables do on the host while a graph is captured; the graphs themselves are
captured and replayed by the tests marked ``cuda``.
"""

import copy

import pytest
import torch

from l2l_fused import L2LOptimizer, available_backends, capture
from l2l_fused.ops.launch_table import LaunchTable
from helpers import F32_TOL, adversarial_grad, assert_unchanged, backend_or_skip, random_net, snapshot


def _grads_with_nonfinite(params, generator=None):
    """Adversarial gradients with a NaN, +inf and -inf in every tensor that has room for them."""
    grads = []
    for p in params:
        g = adversarial_grad(p.numel(), 10.0, generator=generator)
        g[: min(3, p.numel())] = torch.tensor([float("nan"), float("inf"), -float("inf")])[: min(3, p.numel())]
        grads.append(g[torch.randperm(p.numel(), generator=generator)].view_as(p).to(p.device))
    return grads


@pytest.fixture
def simulated_capture(monkeypatch):
    monkeypatch.setattr(capture, "capturing", lambda: True)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_capturable_makes_state_up_front_and_steps_as_without(seed, state_dtype):
    net = random_net()
    shapes = [(6, 5), (7,), (3,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    params[2].requires_grad_(False)  # frozen: no state for it
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = L2LOptimizer(params, net=net, backend="native" if "native" in available_backends("cpu") else "reference",
                       state_dtype=state_dtype, capturable=True)
    plain = L2LOptimizer(twins[:2], net=net, backend=opt.defaults["backend"], state_dtype=state_dtype)

    assert set(opt.state) == set(params[:2])
    for p in params[:2]:
        for key in ("h", "c"):
            t = opt.state[p][key]
            assert t.shape == (2, p.numel(), 20) and t.dtype == state_dtype and not t.any()
    addresses = {p: [opt.state[p][k].data_ptr() for k in ("h", "c")] for p in params[:2]}
    for _ in range(3):
        grads = _grads_with_nonfinite(params[:2])
        for p, twin, g in zip(params, twins, grads):
            p.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        plain.step()
    for p, twin in zip(params[:2], twins):
        assert torch.equal(p, twin)
        for key in ("h", "c"):
            assert torch.equal(opt.state[p][key], plain.state[twin][key])
    assert {p: [opt.state[p][k].data_ptr() for k in ("h", "c")] for p in params[:2]} == addresses  # stepped in place
    assert opt.skipped_coordinates().item() == plain.skipped_coordinates().item() == 3 * 6

    group = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": [group]})
    assert not opt.state[group]["h"].any()


def test_capturable_must_be_a_bool():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="capturable must be a bool, got 'yes'"):
        L2LOptimizer([p], net=random_net(), capturable="yes")
    opt = L2LOptimizer([p], net=random_net())
    with pytest.raises(TypeError, match="param group 1: capturable must be a bool"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "capturable": 1})
    assert len(opt.param_groups) == 1


def test_a_capture_that_a_replay_could_not_repeat_raises_and_changes_nothing(seed, simulated_capture):
    net = random_net()
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3), requires_grad=False)
    plain = L2LOptimizer([a], net=net)
    a.grad = torch.randn(5)
    before = snapshot(plain, [a])
    with pytest.raises(RuntimeError, match="param group 0 has capturable=False; make the optimizer with capturable=True"):
        plain.step()
    assert_unchanged(plain, [a], before)

    opt = L2LOptimizer([b, a], net=net, capturable=True)
    b.requires_grad_(True)  # after the state was made: a captured step would have to make b's
    b.grad = torch.randn(3)
    before = snapshot(opt, [a, b])
    with pytest.raises(RuntimeError, match="without its torch.float32 state .* run one step\\(\\) before capturing"):
        opt.step()
    assert_unchanged(opt, [a, b], before)

    b.grad = None
    opt.param_groups[0]["state_dtype"] = torch.bfloat16  # converting the state would allocate too
    with pytest.raises(RuntimeError, match="without its torch.bfloat16 state"):
        opt.step()
    opt.param_groups[0]["state_dtype"] = torch.float32
    with pytest.raises(RuntimeError, match="a parameter on cpu; a CUDA graph replays CUDA work only"):
        opt.step()
    assert_unchanged(opt, [a, b], before)


def test_load_state_dict_writes_into_a_capturable_optimizers_state(seed):
    net = random_net()
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))
    saved = L2LOptimizer([a, b], net=net)
    a.grad = torch.randn(5)  # b gets no gradient: the state dict has no state for it
    saved.step()
    saved.step()
    sd = copy.deepcopy(saved.state_dict())

    x, y = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))
    opt = L2LOptimizer([x, y], net=net, capturable=True)
    x.grad, y.grad = torch.randn(5), torch.randn(2, 3)
    opt.step()
    tensors = {p: [opt.state[p][k] for k in ("h", "c")] for p in (x, y)}
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["capturable"] is True  # saved without capture; this process captures
    for p in (x, y):
        assert [opt.state[p][k] for k in ("h", "c")] == tensors[p]  # the very tensors a graph would read
    for key in ("h", "c"):
        assert torch.equal(opt.state[x][key], saved.state[a][key])
        assert not opt.state[y][key].any()  # no saved state: fresh, as at construction

    reloaded = L2LOptimizer([a, b], net=net)
    reloaded.load_state_dict(opt.state_dict())
    assert reloaded.param_groups[0]["capturable"] is False


def test_launch_tables_are_remade_only_when_their_tensors_change_and_kept_for_captured_graphs(monkeypatch):
    table = LaunchTable()
    cpu = torch.device("cpu")

    def rows(n):
        t, g, s = torch.zeros(n), torch.zeros(n), torch.zeros(1, n, 4)
        return [(t, t, g, s, s, s, s)]

    eager_rows, captured_rows, other_rows = rows(5), rows(7), rows(9)
    monkeypatch.setattr(capture, "capturing", lambda: False)
    eager_table, eager_blocks, _ = table.get(eager_rows, 4, cpu)
    assert table.get(eager_rows, 4, cpu)[0] is eager_table  # same tensors: nothing made
    assert table.get(eager_rows, 8, cpu)[0] is not eager_table  # another block size: another map
    eager_table, eager_blocks, _ = table.get(eager_rows, 4, cpu)

    monkeypatch.setattr(capture, "capturing", lambda: True)
    captured, blocks, _ = table.get(eager_rows, 4, cpu)
    assert captured is eager_table and blocks is eager_blocks  # ready before the capture: used, and kept
    made_in_graph, _, num_blocks = table.get(captured_rows, 4, cpu)
    assert num_blocks == 2 and made_in_graph[0, 7] == 7
    assert table.get(captured_rows, 4, cpu)[0] is made_in_graph and len(table.captured) == 2  # a recapture adds none

    monkeypatch.setattr(capture, "capturing", lambda: False)
    table.get(other_rows, 4, cpu)  # the eager table is replaced; what graphs read stays
    assert {id(entry.table) for entry in table.captured.values()} == {id(eager_table), id(made_in_graph)}
    again, _, _ = table.get(captured_rows, 4, cpu)
    assert again is not made_in_graph and torch.equal(again, made_in_graph)  # its contents come with its graph


def test_the_optimizer_keeps_one_launch_table_per_group_and_device(kernel_device):
    backend_or_skip("triton", kernel_device.type)
    net = random_net().to(kernel_device)
    params = [torch.nn.Parameter(torch.randn(n, device=kernel_device)) for n in (5, 7)]
    opt = L2LOptimizer([{"params": params[:1]}, {"params": params[1:]}], net=net, backend="triton")
    assert set(opt._tables) == {(0, kernel_device), (1, kernel_device)}
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    first = [opt._tables[(i, kernel_device)].current.table for i in (0, 1)]
    for p in params:
        p.grad.copy_(torch.randn_like(p))
    opt.step()
    assert all(opt._tables[(i, kernel_device)].current.table is first[i] for i in (0, 1))  # the very tensors
    params[0].grad = torch.randn_like(params[0])  # a new gradient tensor, as after zero_grad(set_to_none=True)
    opt.step()
    assert opt._tables[(0, kernel_device)].current.table is not first[0]
    assert opt._tables[(1, kernel_device)].current.table is first[1]


# --------------------------------------------------------------------------------------------- on CUDA

@pytest.fixture(params=["triton", "native", "reference"])
def cuda_backend(request):
    return backend_or_skip(request.param, "cuda")[0]


def _warm_up(net, backend, **options):
    """Triton compiles and loads a kernel at its first launch: host work, done before any capture."""
    warm = torch.nn.Parameter(torch.randn(3, device="cuda"))
    warm.grad = torch.randn_like(warm)
    L2LOptimizer([warm], net=net, backend=backend, **options).step()


def _capture_step(opt, params):
    """``opt.step()`` captured as the optimizer's first step, reading gradients that replays refill in place."""
    for p in params:
        p.grad = torch.zeros_like(p)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


@pytest.mark.cuda
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_captured_step_replays_exactly_the_eager_steps(seed, cuda_backend, state_dtype):
    """The optimizer's step alone, captured as its first step, with gradients the graph reads in place:
    replays give bit for bit the eager steps, skipping included, and read φ as it is when they run."""
    net = random_net().cuda()
    _warm_up(net, cuda_backend, state_dtype=state_dtype)
    shapes = [(300, 7), (11,), (5, 5), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    eager = L2LOptimizer(twins, net=net, backend=cuda_backend, state_dtype=state_dtype)
    opt = L2LOptimizer(params, net=net, backend=cuda_backend, state_dtype=state_dtype, capturable=True)
    graph = _capture_step(opt, params)
    for step in range(4):
        if step == 2:
            with torch.no_grad():
                net.head.bias.add_(0.05)  # in place, as meta-training does: the next replay sees it
        for p, twin, g in zip(params, twins, _grads_with_nonfinite(params)):
            p.grad.copy_(g)
            twin.grad = g.clone()
        eager.step()
        graph.replay()
    torch.cuda.synchronize()
    for p, twin in zip(params, twins):
        assert torch.equal(p, twin)
        for key in ("h", "c"):
            assert torch.equal(opt.state[p][key], eager.state[twin][key])
    assert opt.skipped_coordinates().item() == eager.skipped_coordinates().item() == 4 * 10


@pytest.mark.cuda
def test_a_scheduler_changes_a_tensor_lr_between_replays(seed, cuda_backend):
    """A tensor lr on the device is read by the kernel when the graph runs: a scheduler's in-place change
    reaches every replay, with no new capture, and the replays follow eager steps at the same lr."""
    net = random_net().cuda()
    _warm_up(net, cuda_backend)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(40, 7), (9,)]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr = torch.tensor(1.0, device="cuda")
    opt = L2LOptimizer(params, net=net, backend=cuda_backend, capturable=True, lr=lr, weight_decay=0.1)
    eager = L2LOptimizer(twins, net=net, backend=cuda_backend, lr=1.0, weight_decay=0.1)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, eager)]
    graph = _capture_step(opt, params)
    for _ in range(3):
        for p, twin, g in zip(params, twins, _grads_with_nonfinite(params)):
            p.grad.copy_(g)
            twin.grad = g.clone()
        graph.replay()
        eager.step()
        for schedule in schedules:
            schedule.step()
    torch.cuda.synchronize()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == eager.param_groups[0]["lr"] == 0.125
    for p, twin in zip(params, twins):
        assert torch.equal(p, twin)


@pytest.mark.cuda
def test_a_capture_with_the_lr_tensor_elsewhere_raises(seed):
    p = torch.nn.Parameter(torch.randn(4, device="cuda"))
    opt = L2LOptimizer([p], net=random_net().cuda(), capturable=True, lr=torch.tensor(0.5))  # on the CPU
    p.grad = torch.randn_like(p)
    before = snapshot(opt, [p])
    with pytest.raises(RuntimeError, match="lr tensor on cpu"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    assert_unchanged(opt, [p], before)


@pytest.mark.cuda
def test_whole_training_step_is_captured_as_pytorch_documents(seed, cuda_backend):
    """PyTorch's whole-network recipe: warm-up on a side stream, ``zero_grad(set_to_none=True)``, then
    forward, backward and ``step()`` captured (the gradients, and so the launch tables, are made inside the
    graph). Replays follow eager training on the same batches. The same kernels run on the same inputs, but
    cuBLAS may pick other algorithms under capture: float32 rounding apart (F32_TOL), they agree."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Sigmoid(), torch.nn.Linear(16, 3)).cuda()
    twin = copy.deepcopy(model)
    net = random_net().cuda()
    opt = L2LOptimizer(model.parameters(), net=net, backend=cuda_backend, capturable=True)
    eager = L2LOptimizer(twin.parameters(), net=net, backend=cuda_backend)
    batches = [(torch.randn(32, 8, device="cuda"), torch.randint(0, 3, (32,), device="cuda")) for _ in range(8)]

    def train_step(m, o, x, y):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        o.step()
        return loss

    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            opt.zero_grad(set_to_none=True)
            train_step(model, opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:3]:
        eager.zero_grad(set_to_none=True)
        train_step(twin, eager, x, y)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = train_step(model, opt, static_x, static_y)
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        loss = train_step(twin, eager, x, y)
        torch.testing.assert_close(static_loss, loss, rtol=F32_TOL, atol=F32_TOL)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.cuda
def test_captures_a_replay_could_not_repeat_raise_on_cuda(seed):
    p = torch.nn.Parameter(torch.randn(4, device="cuda"))
    p.grad = torch.randn_like(p)
    for opt, message in ((L2LOptimizer([p], net=random_net().cuda()), "capturable=False"),
                         (L2LOptimizer([p], net=random_net(), capturable=True), "its net on cpu")):
        before = snapshot(opt, [p])
        with pytest.raises(RuntimeError, match=message):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                opt.step()
        assert_unchanged(opt, [p], before)
