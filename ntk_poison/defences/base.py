"""The one detector interface, and the helpers every detector shares.

Following the Adversarial Robustness Toolbox's poison detectors (Nicolae et al. 2018,
``art.defences.detector.poison``), a detector has one method::

    scores, flagged = detector.detect(...)

* ``scores``: float ``(n,)``, higher = more suspicious;
* ``flagged``: bool ``(n,)``, the detector's own decision (True = poison).

What ``detect`` takes depends on what the detector looks at: training
representations and labels (:class:`~ntk_poison.defences.SpectralSignatures`), or a
fitted model and test inputs (:class:`~ntk_poison.defences.CurvatureDetector`). The
evaluator (:mod:`ntk_poison.defences.evaluate`) only needs the pair.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Tuple, runtime_checkable

import numpy as np

from ntk_poison import _validate

Array = Any

__all__ = ["Detector", "check_output", "class_ids", "feature_classes",
           "top_fraction_count", "flag_top_per_group"]


@runtime_checkable
class Detector(Protocol):
    """Anything with ``detect(...) -> (scores, flagged)``."""

    def detect(self, *args: Any, **kwargs: Any) -> Tuple[np.ndarray, np.ndarray]:
        ...


def check_output(scores: Array, flagged: Array) -> Tuple[np.ndarray, np.ndarray]:
    """Validate a detector's output: float scores and bool flags of the same length."""
    _validate.array("scores", scores, ndim=1, finite=False)
    _validate.array("flagged", flagged, ndim=1)
    s = np.asarray(scores, dtype=np.float64)
    f = np.asarray(flagged)
    if f.dtype != bool:
        raise ValueError(f"`flagged` must be a boolean array, got dtype {f.dtype}.")
    if np.isnan(s).any():
        raise ValueError("`scores` contains NaN; a detector must score every point.")
    _validate.same_rows("scores", s, "flagged", f)
    return s, f


def class_ids(labels: Array) -> np.ndarray:
    """Integer class ids ``(n,)`` from labels in any of the project's encodings.

    * ``(n,)`` integers: used as they are.
    * ``(n,)`` floats (e.g. +-1 regression targets): one class per distinct value
      (ids ``0..C-1`` in increasing value).
    * ``(n, c)`` (one-hot, or +-1 coded): ``argmax`` over the last axis.
    """
    _validate.array("labels", labels, ndim=(1, 2))
    lab = np.asarray(labels)
    if lab.ndim == 2 and lab.shape[1] == 0:
        raise ValueError("`labels` of shape (n, 0) has no classes; pass (n,) class ids or "
                         "(n, c) one-hot rows with c >= 1.")
    if lab.ndim == 2:
        return np.argmax(lab, axis=1).astype(np.int64)
    if np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool:
        return lab.astype(np.int64)
    _, inv = np.unique(lab, return_inverse=True)
    return inv.astype(np.int64).reshape(-1)


def feature_classes(features: Array, labels: Array) -> np.ndarray:
    """The input check of a detector that reads training representations: ``features``
    ``(n, p)`` (or ``(n, ...)``) with one row per label; returns the class ids
    (:func:`class_ids`)."""
    _validate.array("features", features, ndim=(2, 3, 4))
    if np.shape(features)[0] == 0:
        raise ValueError("`features` is empty; pass at least one training point.")
    classes = class_ids(labels)
    _validate.same_rows("features", np.asarray(features), "labels", classes)
    return classes


def top_fraction_count(n: int, fraction: float) -> int:
    """``round(fraction * n)``, rounding halves up, clipped to ``[0, n]``."""
    return int(min(n, max(0, math.floor(fraction * n + 0.5))))


def flag_top_per_group(scores: np.ndarray, groups: np.ndarray, fraction: float
                       ) -> np.ndarray:
    """Flag the ``top_fraction_count(n_g, fraction)`` highest scores in each group.

    Exactly that many per group: ties at the cut are broken by row order (the earlier
    row is flagged first), through a stable sort.
    """
    flagged = np.zeros(scores.shape[0], dtype=bool)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        count = top_fraction_count(rows.size, fraction)
        order = np.argsort(-scores[rows], kind="stable")
        flagged[rows[order[:count]]] = True
    return flagged
