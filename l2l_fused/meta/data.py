"""Image classification data for the neural-network tasks: the digits scikit-learn ships, and loaders for
the MNIST IDX files and the CIFAR-10 python batches a user already has. Nothing is downloaded.

Every loader returns a :class:`Dataset` of float images in [0, 1] shaped ``[N, C, H, W]`` and int64
labels, and says exactly what is wrong with a file it rejects.
"""

from __future__ import annotations

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


DATASETS = {"digits": load_digits, "mnist": load_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, directory: str | None = None, split: str = "train") -> Dataset:
    """``"digits"`` (embedded), or ``"mnist"`` / ``"cifar10"`` from ``directory``."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    if name == "digits":
        if directory is not None:
            raise ValueError("the digits dataset is embedded; it takes no data directory")
        return load_digits()
    if directory is None:
        raise ValueError(f"the {name} dataset needs a data directory (--data-dir)")
    return DATASETS[name](directory, split)
