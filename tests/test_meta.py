import math

import pytest
import torch

from l2l_fused import L2LOptimizer, LSTMOptimizerNet, l2l_step_ref
from l2l_fused.meta import (BASELINES, MetaTrainer, QuadraticTask, TrainConfig, Trajectory, baseline_losses,
                            learned_losses, load_best_net, lr_grid, optimizer_losses, tune)
from l2l_fused.meta.baselines import final_score

SMALL = dict(batch_size=16, steps=20, truncation=5, val_functions=32, iterations_per_epoch=4)


def _net(seed):
    torch.manual_seed(seed)
    return LSTMOptimizerNet(**QuadraticTask().net_options())


def test_quadratic_task_matches_paper():
    task = QuadraticTask()
    problem = task.sample(3, torch.Generator().manual_seed(0))
    assert problem.w.shape == (3, 10, 10) and problem.y.shape == (3, 10) and problem.theta0.shape == (3, 10)
    theta = torch.randn(3, 10)
    expected = torch.stack([(problem.w[b] @ theta[b] - problem.y[b]).pow(2).sum() for b in range(3)])
    torch.testing.assert_close(problem.loss([theta], 0), expected)
    assert task.net_options() == {"preprocess_p": None, "output_scale": 1.0}


def test_unroll_meta_gradient_is_first_order(seed):
    """Trajectory's summed losses backpropagate like a hand-written unroll with detached gradients."""
    task = QuadraticTask()
    problem = task.sample(4, torch.Generator().manual_seed(seed))
    net = _net(seed).double()
    problem.w, problem.y, problem.theta0 = problem.w.double(), problem.y.double(), problem.theta0.double()

    trajectory = Trajectory(net, problem, backend="reference")
    losses = trajectory.advance(3)
    assert not any(g.requires_grad for g in trajectory.grads)
    got = torch.autograd.grad(losses.sum(0).mean(), list(net.parameters()))

    def f(theta):
        return (torch.einsum("bij,bj->bi", problem.w, theta) - problem.y).pow(2).sum(-1)

    def grad_f(theta):  # analytic ∇f, a constant: no second derivatives
        return (2 * torch.einsum("bji,bj->bi", problem.w, torch.einsum("bij,bj->bi", problem.w, theta) - problem.y)).detach()

    theta = problem.theta0.reshape(-1)
    h, c = net.init_state(theta.numel())
    total = 0
    for _ in range(3):
        g = grad_f(theta.view(4, 10)).reshape(-1)
        theta, h, c = l2l_step_ref(theta, g, h, c, net.cell_weights(), net.head.weight, net.head.bias,
                                   preprocess_p=None, output_scale=1.0)
        total = total + f(theta.view(4, 10))
    want = torch.autograd.grad(total.mean(), list(net.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("objective", ["sum", "log", "relative"])
def test_short_meta_training_lowers_validation_loss(seed, objective):
    """A net that starts by doing nothing (zero head: Δ = 0) must learn to descend. Over seeds, three short
    epochs bring validation to 0.14-0.26 of the do-nothing loss; a broken trainer leaves it at 1."""
    net = _net(seed)
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    trainer = MetaTrainer(net, QuadraticTask(), TrainConfig(epochs=3, seed=seed, lr=3e-3, objective=objective, **SMALL))
    before = trainer.validate()
    losses = learned_losses(net, trainer.validation, SMALL["steps"])[1:]
    initial = trainer.validation.loss(trainer.validation.params, 0)
    want = {"sum": losses.mean(), "log": losses.log().mean().exp(),  # the geometric mean
            "relative": (losses / initial).mean()}[objective]
    torch.testing.assert_close(torch.tensor(before), want)
    state = trainer.train(progress=False)
    assert state.best_val < 0.5 * before, (before, state.history)
    assert state.best_val == min(h["val_loss"] for h in state.history)
    trainer.net.load_state_dict(trainer.best_net().state_dict())
    assert trainer.validate() == state.best_val  # the kept φ is the one that scored best


def test_checkpoint_resume_is_bit_identical(seed, tmp_path):
    config = TrainConfig(epochs=3, seed=seed, **SMALL)
    straight = MetaTrainer(_net(seed), QuadraticTask(), config)
    straight.train(progress=False)

    path = str(tmp_path / "ckpt.pt")
    first = MetaTrainer(_net(seed), QuadraticTask(), TrainConfig(**{**config.__dict__, "epochs": 1}))
    first.train(checkpoint_path=path, progress=False)
    resumed = MetaTrainer(_net(seed + 1), QuadraticTask(), config)  # other initial weights: all must come from the file
    resumed.load(path)
    assert resumed.state.epoch == 1
    resumed.train(checkpoint_path=path, progress=False)

    for a, b in zip(straight.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)
    assert straight.state.history == resumed.state.history
    for a, b in zip(straight.best_net().parameters(), load_best_net(path).parameters()):
        assert torch.equal(a, b)


class _BlowingUpQuadratics(QuadraticTask):
    """Quadratics of which every other batch holds a function whose loss is inf."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def sample(self, n_functions, generator, split="train"):
        problem = super().sample(n_functions, generator, split)
        self.batches += 1
        if split == "train" and self.batches % 2 == 0:
            problem.w[0] = float("inf")
        return problem


def test_a_non_finite_meta_gradient_skips_the_update(seed):
    """An optimizee that blows up would make φ NaN for good; the trainer skips that update and counts it,
    and the finite batches still train φ."""
    net = _net(seed)
    trainer = MetaTrainer(net, _BlowingUpQuadratics(), TrainConfig(epochs=1, seed=seed, **SMALL))
    trainer.train(progress=False)
    truncations = SMALL["steps"] // SMALL["truncation"]
    assert trainer.state.skipped_updates == truncations * (SMALL["iterations_per_epoch"] // 2)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), _net(seed).parameters()))


def test_checkpoint_rejects_another_net(seed, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    trainer = MetaTrainer(_net(seed), QuadraticTask(), TrainConfig(epochs=1, **SMALL))
    trainer.train(checkpoint_path=path, progress=False)
    other = MetaTrainer(LSTMOptimizerNet(hidden_size=5, preprocess_p=None), QuadraticTask(), TrainConfig(**SMALL))
    with pytest.raises(ValueError, match="is for a net"):
        other.load(path)


def test_objective_must_be_known():
    with pytest.raises(ValueError, match=r"objective must be one of \['sum', 'log', 'relative'\], got 'max'"):
        TrainConfig(objective="max")


def test_truncation_must_divide_steps():
    with pytest.raises(ValueError, match="multiple of truncation"):
        TrainConfig(steps=100, truncation=30)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_on_a_batch_equal_independent_runs(seed, name):
    task = QuadraticTask()
    problem = task.sample(3, torch.Generator().manual_seed(seed))
    together = baseline_losses(name, 0.01, problem, 15)
    for b in range(3):
        alone = task.sample(3, torch.Generator().manual_seed(seed))
        alone.w, alone.y, alone.theta0 = alone.w[b:b + 1], alone.y[b:b + 1], alone.theta0[b:b + 1]
        torch.testing.assert_close(baseline_losses(name, 0.01, alone, 15)[:, 0], together[:, b], rtol=1e-5, atol=1e-6)


def test_tuning_picks_the_best_finite_learning_rate(seed):
    grid = [1e-3, 1e-2, 10.0]
    lr, scores = tune("SGD", QuadraticTask(), 30, 16, seed, grid)
    assert scores[10.0] == math.inf  # diverges on these quadratics
    assert lr == min(scores, key=scores.get) and math.isfinite(scores[lr])
    assert final_score(torch.tensor([[1.0], [float("nan")]])) == math.inf


def test_lr_grid_is_log_spaced():
    grid = lr_grid(1e-3, 1.0, 2)
    assert len(grid) == 7
    torch.testing.assert_close(torch.tensor(grid), torch.logspace(-3, 0, 7, dtype=torch.float64).float())


def test_learned_optimizer_through_l2loptimizer_equals_the_unrolled_net(seed):
    """The product path (L2LOptimizer on a model's parameters) and the meta-training path (net.forward
    on a flat θ) are the same optimizer."""
    problem = QuadraticTask().sample(8, torch.Generator().manual_seed(seed))
    net = _net(seed)
    unrolled = learned_losses(net, problem, 15)
    stepped = optimizer_losses(lambda ps: L2LOptimizer(ps, net=net), problem, 15)
    torch.testing.assert_close(stepped, unrolled, rtol=1e-5, atol=1e-6)
