"""The neural-art task: its loss against a direct computation, its gradients, its data, meta-training on it,
the picture."""

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from l2l_fused.meta import MetaTrainer, TrainConfig
from l2l_fused.meta.art import (BANDS, ArtProblem, ArtTask, RandomFeatures, content_crops, crop_positions, gram,
                                photographs, style_image, write_grid)

PNG = b"\x89PNG\r\n\x1a\n"


def _double_problem(seed: int, size: int, content_layer: int, **weights) -> ArtProblem:
    """Test content crops and the style in float64, through small random features in float64."""
    features = RandomFeatures(channels=(4, 5, 6), seed=seed % 1000).double()
    generator = torch.Generator().manual_seed(seed)
    content = content_crops(3, size, "test", generator).double()
    return ArtProblem(init=content.clone(), content=content, style=style_image("dots", size).double(),
                      features=features, content_layer=content_layer, **weights)


@pytest.mark.parametrize("content_layer", [1, 2])
def test_loss_matches_a_direct_computation_on_a_tiny_image(seed, content_layer):
    """Gatys et al.'s loss written out with explicit sums on an 8×8 image, in float64 (only summation order
    differs: ~1e-15 relative)."""
    problem = _double_problem(seed, 8, content_layer, content_weight=0.7, style_weight=3.0)
    features = problem.features
    image = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    got = problem.loss([image], 0)
    for b in range(3):
        fx, fc, fs = features(image[b:b + 1]), features(problem.content[b:b + 1]), features(problem.style[None])
        diff = fx[content_layer] - fc[content_layer]
        content = (diff * diff).sum() / diff.numel()
        style = 0
        for a, t in zip(fx, fs):
            n = a.shape[2] * a.shape[3]
            ga = torch.einsum("cij,dij->cd", a[0], a[0]) / n
            gt = torch.einsum("cij,dij->cd", t[0], t[0]) / n
            style = style + ((ga - gt) ** 2).sum() / ga.numel()
        torch.testing.assert_close(got[b], 64 * (0.7 * content + 3.0 * style), rtol=1e-12, atol=1e-12)


def test_gradients_match_finite_differences(seed):
    problem = _double_problem(seed, 4, 1, content_weight=1.0, style_weight=10.0)
    image = torch.rand(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: problem.loss([x], 0), (image,))


def test_a_pixels_gradient_has_one_scale_at_every_size(seed):
    """The loss is summed over pixels, so doubling the side leaves a pixel's gradient the same size (within
    2x: the images differ); a mean over pixels would shrink it 4x."""
    scales = []
    for size in (32, 64):
        problem = ArtTask(size=size, init="noise").sample(4, torch.Generator().manual_seed(seed), "val")
        image = problem.init.clone().requires_grad_()
        (grad,) = torch.autograd.grad(problem.loss([image], 0).sum(), image)
        scales.append(grad.abs().mean().item())
    assert 0.5 < scales[1] / scales[0] < 2, scales


def test_functions_start_at_their_content_or_at_noise_and_split_exactly(seed):
    task = ArtTask(size=16)
    problem = task.sample(4, torch.Generator().manual_seed(seed), "train")
    assert torch.equal(problem.init, problem.content)
    pure_style = ArtTask(size=16, content_weight=0.0).sample(4, torch.Generator().manual_seed(seed), "train")
    torch.testing.assert_close(problem.loss(problem.params, 0), pure_style.loss(problem.params, 0))  # content 0

    noise = ArtTask(size=16, init="noise").sample(4, torch.Generator().manual_seed(seed), "train")
    assert torch.equal(noise.content, problem.content) and not torch.equal(noise.init, noise.content)
    assert 0 <= noise.init.min() and noise.init.max() <= 1 and noise.init.std() > 0.2

    image = torch.rand(4, 3, 16, 16)
    whole = problem.loss([image], 0)
    halves = [problem.shard(i, 2) for i in range(2)]
    torch.testing.assert_close(torch.cat([h.loss([image[2 * i:2 * i + 2]], 0) for i, h in enumerate(halves)]), whole)
    assert torch.equal(problem.select(slice(1)).content_target, problem.content_target[:1])


def test_bad_options_are_refused_by_name():
    for options, message in (({"style": "cubism"}, "style must be one of"), ({"size": 2}, "size must be an int"),
                             ({"init": "zeros"}, "init must be one of"), ({"style_weight": -1.0}, "style_weight must"),
                             ({"content_weight": float("nan")}, "content_weight must")):
        with pytest.raises(ValueError, match=message):
            ArtTask(**options)
    with pytest.raises(ValueError, match="features must return a list of feature maps with an entry at "
                                         "content_layer 1, got Tensor"):
        ArtTask(size=8, features=nn.Conv2d(3, 4, 3)).sample(1, torch.Generator(), "val")
    with pytest.raises(ValueError, match="content_layer 5"):
        ArtTask(size=8, content_layer=5).sample(1, torch.Generator(), "val")


def test_content_crops_come_from_their_splits_band(seed):
    images = photographs()
    assert images.shape == (2, 3, 427, 640) and 0 <= images.min() and images.max() <= 1
    for split, (left, right) in BANDS.items():
        positions = crop_positions(50, 64, split, torch.Generator().manual_seed(seed))
        assert (positions[:, 2] >= left).all() and (positions[:, 2] + 64 <= right).all()
        assert (positions[:, 1] + 64 <= 427).all() and set(positions[:, 0].tolist()) <= {0, 1}
        crops = content_crops(50, 64, split, torch.Generator().manual_seed(seed))
        i, t, s = positions[7].tolist()
        assert torch.equal(crops[7], images[i, :, t:t + 64, s:s + 64])
    assert content_crops(1, 128, "test", torch.Generator()).shape == (1, 3, 128, 128)
    with pytest.raises(ValueError, match="does not fit the val band"):
        content_crops(1, 200, "val", torch.Generator())
    with pytest.raises(ValueError, match="split must be one of"):
        content_crops(1, 8, "holdout", torch.Generator())


def test_styles_are_textures_in_range_and_gram_is_size_free():
    for name in ("stripes", "dots"):
        small, large = style_image(name, 64), style_image(name, 128)
        assert small.shape == (3, 64, 64) and large.shape == (3, 128, 128)
        assert 0 <= small.min() and small.max() <= 1 and small.std() > 0.1
        # the same pattern at both sizes: its colour statistics agree
        torch.testing.assert_close(small.mean((1, 2)), large.mean((1, 2)), atol=0.02, rtol=0)
    assert not torch.equal(style_image("stripes", 16), style_image("dots", 16))
    f = torch.rand(2, 5, 7, 9)
    torch.testing.assert_close(gram(f), torch.einsum("bcn,bdn->bcd", f.flatten(2), f.flatten(2)) / 63)
    with pytest.raises(ValueError, match="style must be one of"):
        style_image("cubism", 8)


def test_short_meta_training_lowers_the_meta_loss(seed):
    """φ starts doing nothing (zero head, Δ = 0), so validation starts at the untrained loss; the task's
    recipe (its objective, log) cut to seconds must bring it down."""
    task = ArtTask(size=16)
    config = TrainConfig(**{**task.train_defaults, "epochs": 5, "iterations_per_epoch": 3, "batch_size": 2,
                            "steps": 10, "truncation": 5, "val_functions": 2, "lr": 3e-2, "seed": seed % 1000})
    torch.manual_seed(seed)
    net = task.make_net()
    nn.init.zeros_(net.head.weight)
    nn.init.zeros_(net.head.bias)
    trainer = MetaTrainer(net, task, config)
    before = trainer.validate()
    state = trainer.train(progress=False)
    # With 3 epochs, 5 seeds gave 0.20-0.40 of before, but CI seed 1821081315 gave 0.81: 5 epochs pass it.
    assert state.best_val < 0.8 * before, (before, state.history)


def test_grid_is_written_and_checks_its_columns(tmp_path):
    path = tmp_path / "grid.png"
    rows = [[torch.rand(3, 8, 8), style_image("dots", 8)], [torch.zeros(3, 8, 8), torch.ones(3, 8, 8) * 2]]
    write_grid(rows, ["content", "style"], str(path))
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match=r"one image per column \(3\)"):
        write_grid(rows, ["content", "style", "Adam"], str(tmp_path / "bad.png"))


@pytest.mark.parametrize("size", [64, 128])
def test_shipped_net_transfers_the_style_through_l2loptimizer(seed, size):
    """As a user runs it, on held-out test images: 30 steps bring the loss below 20% of its start (seen over
    ten seeds: 1-15% per image at 64×64), and at 64×64 to less than half the loss a freshly initialised φ of
    the same shape reaches on the same images (seen: a quarter or less)."""
    from l2l_fused import L2LOptimizer, pretrained
    from l2l_fused.meta import learned_losses
    from l2l_fused.meta.baselines import optimize

    task = ArtTask(size=size)
    problem = task.sample(2, torch.Generator().manual_seed(seed), "test")
    losses, _ = optimize(lambda ps: L2LOptimizer(ps, net=pretrained("neural-art")), problem, 30)
    assert losses[-1].mean() < 0.2 * losses[0].mean(), losses.mean(1)
    if size == 64:
        torch.manual_seed(seed)
        fresh = learned_losses(task.make_net(), problem, 30)
        assert fresh[-1].mean() > 2 * losses[-1].mean(), (fresh.mean(1), losses.mean(1))
