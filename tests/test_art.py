"""The neural-art task: its loss against a direct computation, its gradients, its data, the picture."""

import pytest
import torch

pytest.importorskip("sklearn")

from l2l_fused.meta.art import (BANDS, CONTENT_LAYER, ArtTask, RandomFeatures, content_crops, crop_positions, gram,
                                photographs, style_image, write_grid)


def test_loss_matches_a_direct_computation_on_a_tiny_image(seed):
    """Gatys et al.'s loss written out with explicit sums on an 8×8 image, in float64 (only summation order
    differs: ~1e-15 relative)."""
    torch.manual_seed(seed)
    features = RandomFeatures(channels=(4, 5, 6), seed=seed % 1000).double()
    task = ArtTask(size=8, content_weight=0.7, style_weight=3.0, features=features)
    problem = task.sample(3, torch.Generator().manual_seed(seed), "test")
    image = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    problem.content, problem.style = problem.content.double(), problem.style.double()
    got = problem.loss([image], 0)
    for b in range(3):
        x, c, s = image[b:b + 1], problem.content[b:b + 1], problem.style[None]
        fx, fc, fs = features(x), features(c), features(s)
        diff = fx[CONTENT_LAYER] - fc[CONTENT_LAYER]
        content = (diff * diff).sum() / diff.numel()
        style = 0
        for a, t in zip(fx, fs):
            n = a.shape[2] * a.shape[3]
            ga = torch.einsum("cij,dij->cd", a[0], a[0]) / n
            gt = torch.einsum("cij,dij->cd", t[0], t[0]) / n
            style = style + ((ga - gt) ** 2).sum() / ga.numel()
        torch.testing.assert_close(got[b], 0.7 * content + 3.0 * style, rtol=1e-12, atol=1e-15)


def test_gradients_match_finite_differences(seed):
    features = RandomFeatures(channels=(3, 4, 5), seed=seed % 1000).double()
    problem = ArtTask(size=4, features=features).sample(2, torch.Generator().manual_seed(seed), "train")
    problem.content, problem.style = problem.content.double(), problem.style.double()
    image = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: problem.loss([x], 0), (image,))


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


def test_styles_are_textures_in_range_and_gram_is_size_free():
    for name in ("stripes", "dots"):
        small, large = style_image(name, 64), style_image(name, 128)
        assert small.shape == (3, 64, 64) and 0 <= small.min() and small.max() <= 1
        assert small.std() > 0.1
    f = torch.rand(2, 5, 7, 9)
    torch.testing.assert_close(gram(f), torch.einsum("bcn,bdn->bcd", f.flatten(2), f.flatten(2)) / 63)
    with pytest.raises(ValueError, match="style must be one of"):
        style_image("cubism", 8)


def test_grid_is_written(tmp_path):
    path = tmp_path / "grid.png"
    rows = [("a", [torch.rand(3, 8, 8), style_image("dots", 8)]), ("b", [torch.zeros(3, 8, 8)])]
    write_grid(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
