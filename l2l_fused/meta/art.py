"""The paper's neural-art task (§3.4): optimize an image's pixels to match one image's content and another's
style (Gatys et al., 2016), every content-style pair a new problem.

No pretrained VGG can be downloaded here, so the features come from a fixed, seeded, randomly initialised
multi-scale conv net: random filters support texture synthesis (Ustyuzhaninov et al., 2017, "What does it
take to generate natural textures?"; He, Wang & Hopcroft, 2016, "A powerful generative model using random
weights for the deep image representation"). A user with other features passes their own module
(``features=``, returning a list of feature maps).

Content images are random crops of the two photographs scikit-learn ships (``load_sample_images``), cut
from disjoint column bands for training, validation and test. Style images are generated textures, so
nothing is downloaded and any size exists.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim import L2LOptimizer
from .baselines import BASELINES, optimize
from .data import check_split
from .evaluate import LEARNED_BF16
from .tasks import Problem, Task, shard_slice

# Column bands of the 640-pixel-wide photographs: crops for each split come from its own band only.
BANDS = {"train": (0, 384), "val": (384, 512), "test": (512, 640)}
FEATURE_SEED = 0
CONTENT_LAYER = 1  # the stage whose features the content loss compares
STYLES = ("stripes", "dots")
INITS = ("content", "noise")


class RandomFeatures(nn.Module):
    """Three stages of 3×3 conv (32, 64, 128 channels) and ReLU, 2×2 average pooling between them, He-normal
    weights from a fixed seed, never trained. ``[B, 3, H, W]`` → the three stages' feature maps."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), seed: int = FEATURE_SEED) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        for i, o in zip((3, *channels), channels):
            conv = nn.Conv2d(i, o, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2 / (9 * i)))
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for k, conv in enumerate(self.convs):
            x = torch.relu(conv(x if k == 0 else F.avg_pool2d(x, 2)))
            features.append(x)
        return features


def gram(features: Tensor) -> Tensor:
    """``[B, C, H, W]`` → ``[B, C, C]``, normalised by H·W so images of any size compare."""
    flat = features.flatten(2)
    return flat @ flat.transpose(1, 2) / flat.shape[-1]


def style_image(name: str, size: int) -> Tensor:
    """A generated texture ``[3, size, size]`` in [0, 1], the same pattern at every size (in units of the
    image), so the style at 128×128 is the one at 64×64, finer-grained in pixels."""
    if name not in STYLES:
        raise ValueError(f"style must be one of {list(STYLES)}, got {name!r}")
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    if name == "stripes":  # diagonal bands, orange on blue
        t = 0.5 + 0.5 * torch.sin(2 * math.pi * 6 * (x + y))
        colours = (torch.tensor([0.95, 0.55, 0.1]), torch.tensor([0.1, 0.2, 0.6]))
    else:  # a grid of spots, green on pale yellow
        t = ((torch.sin(2 * math.pi * 8 * x) * torch.sin(2 * math.pi * 8 * y)).abs() > 0.6).float()
        colours = (torch.tensor([0.1, 0.5, 0.2]), torch.tensor([0.95, 0.9, 0.7]))
    return t * colours[0].view(3, 1, 1) + (1 - t) * colours[1].view(3, 1, 1)


@functools.lru_cache(maxsize=None)
def photographs() -> Tensor:
    """scikit-learn's two sample photographs (china.jpg, flower.jpg; CC BY 2.0), ``[2, 3, 427, 640]`` in [0, 1]."""
    from sklearn.datasets import load_sample_images

    images = [torch.tensor(i).permute(2, 0, 1).float() / 255 for i in load_sample_images().images]
    return torch.stack(images)


def crop_positions(n: int, size: int, split: str, generator: torch.Generator) -> Tensor:
    """``[n, 3]``: per crop, the photograph, the top row and the left column, inside ``split``'s band."""
    check_split(split)
    count, _, height, _ = photographs().shape
    left, right = BANDS[split]
    if size > right - left or size > height:
        raise ValueError(f"size {size} does not fit the {split} band ({right - left} × {height} pixels)")
    which = torch.randint(count, (n,), generator=generator)
    top = torch.randint(height - size + 1, (n,), generator=generator)
    start = left + torch.randint(right - left - size + 1, (n,), generator=generator)
    return torch.stack([which, top, start], 1)


def content_crops(n: int, size: int, split: str, generator: torch.Generator) -> Tensor:
    """``n`` random ``size``×``size`` crops ``[n, 3, size, size]`` from ``split``'s column band."""
    images = photographs()
    return torch.stack([images[i, :, t:t + size, s:s + size]
                        for i, t, s in crop_positions(n, size, split, generator).tolist()])


@dataclass
class ArtProblem(Problem):
    """B images to optimize, each toward its content image's features and the style's Gram matrices. The
    targets (the content's features and the style's Gram matrices) are computed once, at construction."""

    init: Tensor  # [B, 3, H, W]
    content: Tensor  # [B, 3, H, W]
    style: Tensor  # [3, H, W]
    content_weight: float
    style_weight: float
    features: Optional[nn.Module] = None  # default: RandomFeatures()
    content_layer: int = CONTENT_LAYER
    content_target: Optional[Tensor] = None  # the content's features at content_layer
    style_grams: Optional[list[Tensor]] = None  # the style's Gram matrix at every stage, each [C, C]

    def __post_init__(self) -> None:
        if self.features is None:
            self.features = RandomFeatures()
        if self.content_target is None or self.style_grams is None:
            with torch.no_grad():
                content, style = self.features(self.content), self.features(self.style[None])
            if not isinstance(content, (list, tuple)) or not len(content) > self.content_layer >= 0:
                raise ValueError(f"features must return a list of feature maps with an entry at content_layer "
                                 f"{self.content_layer}, got {type(content).__name__}")
            self.content_target = content[self.content_layer]
            self.style_grams = [gram(f)[0] for f in style]

    @property
    def params(self) -> list[Tensor]:
        return [self.init]

    def to(self, device) -> "ArtProblem":
        moved = super().to(device)
        moved.features = self.features.to(device)
        return moved

    def select(self, part: slice) -> "ArtProblem":
        """Functions ``part`` of this batch, exactly as they are here."""
        return dataclasses.replace(self, init=self.init[part], content=self.content[part],
                                   content_target=self.content_target[part])

    def shard(self, index: int, count: int) -> "ArtProblem":
        return self.select(shard_slice(self.init.shape[0], index, count))

    def loss(self, params: list[Tensor], step: int) -> Tensor:
        (image,) = params
        features = self.features(image)
        content = (features[self.content_layer] - self.content_target).pow(2).flatten(1).mean(1)
        style = sum((gram(f) - g).pow(2).flatten(1).mean(1) for f, g in zip(features, self.style_grams))
        # Summed over the image's pixels, so a pixel's gradient has one scale at 64×64 and at 128×128.
        return image[0, 0].numel() * (self.content_weight * content + self.style_weight * style)


class ArtTask(Task):
    """Functions: a ``size``×``size`` content crop of ``split``'s band and the ``style`` texture. The loss is
    Gatys et al.'s: ``content_weight`` times the mean squared feature difference at ``content_layer``, plus
    ``style_weight`` times the mean squared Gram difference summed over every stage, times the pixel count.
    The image starts as the content crop (``init="content"``, so 100 steps show the style on the photograph)
    or as uniform noise (``"noise"``, as Gatys et al. did). ``features``: any module mapping ``[B, 3, H, W]``
    to a list of feature maps (default :class:`RandomFeatures`). Variants: the paper's transfer tests, to
    128×128 and to a new style. φ is the paper's (p = 10, output scale 0.1)."""

    name = "neural-art"
    preprocess_p = 10.0
    output_scale = 0.1
    variants = {"base": ({}, None), "size128": ({"size": 128}, None), "new-style": ({"style": "dots"}, None)}
    train_defaults = {"batch_size": 8, "epochs": 12, "iterations_per_epoch": 10, "lr": 3e-4,
                      "objective": "log", "val_functions": 8}
    eval_defaults = {"test_functions": 16, "tune_functions": 4}

    def __init__(self, size: int = 64, style: str = "stripes", content_weight: float = 1.0,
                 style_weight: float = 30.0, init: str = "content", features: Optional[nn.Module] = None,
                 content_layer: int = CONTENT_LAYER) -> None:
        if style not in STYLES:
            raise ValueError(f"style must be one of {list(STYLES)}, got {style!r}")
        if not isinstance(size, int) or size < 4:
            raise ValueError(f"size must be an int >= 4, got {size!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
        for name, value in (("content_weight", content_weight), ("style_weight", style_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.size, self.style, self.init, self.content_layer = size, style, init, content_layer
        self.content_weight, self.style_weight = content_weight, style_weight
        self.features = RandomFeatures() if features is None else features

    def sample(self, n_functions: int, generator: torch.Generator, split: str = "train") -> ArtProblem:
        content = content_crops(n_functions, self.size, split, generator)
        init = content.clone() if self.init == "content" else torch.rand(content.shape, generator=generator)
        return ArtProblem(init=init, content=content, style=style_image(self.style, self.size),
                          content_weight=self.content_weight, style_weight=self.style_weight,
                          features=self.features, content_layer=self.content_layer)


def write_grid(rows: list[list[Tensor]], columns: list[str], path: str) -> None:
    """A PNG of images ``[3, H, W]`` (values clipped to [0, 1]), one row per list, ``columns`` the titles
    above the first row: e.g. per test function its content, the style, and the image each optimizer reached."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(len(row) != len(columns) for row in rows):
        raise ValueError(f"every row must hold one image per column ({len(columns)})")
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.6 * len(columns), 1.6 * len(rows) + 0.3),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            axes[r, c].imshow(image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
            axes[r, c].set_axis_off()
    for c, title in enumerate(columns):
        axes[0, c].set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(task: ArtTask, net: nn.Module, runs: list, steps: int, test_functions: int, test_seed: int, path: str,
           rows: int = 3, backend: str = "auto", device="cpu") -> None:
    """The grid for the first ``rows`` of ``evaluate``'s test functions (``test_functions`` drawn from
    ``test_seed``): content, style, then the image each run in ``runs`` (``evaluate``'s, the bf16-state twin
    left out) reached after ``steps`` steps: the learned optimizer through ``L2LOptimizer``, each baseline
    at its tuned lr."""
    generator = torch.Generator().manual_seed(test_seed)
    problem = task.sample(test_functions, generator, "test").select(slice(rows)).to(device)
    columns, reached = ["content", "style"], []
    for run in (r for r in runs if r.name != LEARNED_BF16):
        if run.lr is None:
            make = lambda ps: L2LOptimizer(ps, net=net, backend=backend)  # noqa: E731
        else:
            make = lambda ps, run=run: BASELINES[run.name](ps, run.lr)  # noqa: E731
        reached.append(optimize(make, problem, steps)[1][0])
        columns.append(run.name if run.lr is None else f"{run.name} (lr {run.lr:.3g})")
    write_grid([[problem.content[r], problem.style, *(images[r] for images in reached)]
                for r in range(problem.init.shape[0])], columns, path)
