"""Spectral signatures (Tran, Li & Madry 2018, "Spectral Signatures in Backdoor
Attacks", NeurIPS): the standard spectral baseline detector (THEORY.md section 5).

Within each class ``c`` with representations ``h_i`` (rows of a feature matrix):

    mu_c = mean_{i in c} h_i,    v_c = top right singular vector of [h_i - mu_c]_{i in c}
    score_i = ((h_i - mu_c) . v_c)^2

A backdoor's poisons in a class share a direction of shift, so they dominate the top
singular direction of the centred class and get the large scores. The paper removes
the ``1.5 * eps`` fraction of highest scores in each class, ``eps`` an upper bound on
the poison fraction.

The detector takes ANY feature matrix: the inputs themselves, kernel-PCA features, the
empirical NTK features of a network (:mod:`ntk_poison.defences.features`), or a
network's penultimate layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import numpy as np

from ntk_poison import _validate
from ntk_poison.defences.base import feature_classes, flag_top_per_group

Array = Any

__all__ = ["SpectralSignatures", "spectral_scores"]


def spectral_scores(features: Array, classes: np.ndarray) -> np.ndarray:
    """The per-class spectral-signature scores ``((h - mu_c) . v_c)^2``, ``(n,)``.

    ``v_c`` is computed by a thin SVD of the centred class block (numpy, float64):
    ``O(n_c p min(n_c, p))`` per class. A class of one point scores 0.
    """
    H = np.asarray(features, dtype=np.float64).reshape(len(classes), -1)
    scores = np.zeros(H.shape[0], dtype=np.float64)
    for c in np.unique(classes):
        rows = np.flatnonzero(classes == c)
        C = H[rows] - H[rows].mean(axis=0)
        if rows.size < 2 or not np.any(C):
            continue
        _, _, Vt = np.linalg.svd(C, full_matrices=False)
        scores[rows] = (C @ Vt[0]) ** 2
    return scores


@dataclasses.dataclass(frozen=True)
class SpectralSignatures:
    """The spectral-signature detector (Tran et al. 2018).

    Attributes:
      eps: an upper bound on the poison fraction of a class, in [0, 1].
      multiplier: the paper's safety factor (1.5): each class flags
        ``round(multiplier * eps * n_c)`` points (halves round up; clipped to
        ``[0, n_c]``), exactly that many, ties at the cut broken by row order.
    """

    eps: float = 0.05
    multiplier: float = 1.5

    def __post_init__(self):
        _validate.nonneg("eps", self.eps)
        _validate.nonneg("multiplier", self.multiplier)
        if self.eps > 1:
            raise ValueError(f"`eps` is a fraction in [0, 1], got {self.eps}.")

    def detect(self, features: Array, labels: Array) -> Tuple[np.ndarray, np.ndarray]:
        """Score and flag every row.

        Args:
          features: representations ``(n, p)`` (or ``(n, ...)``, flattened).
          labels: the training labels ``(n,)`` (ints or float +-1 targets) or
            ``(n, c)`` (one-hot): classes come from
            :func:`ntk_poison.defences.base.class_ids`. Use the POISONED labels: a
            dirty-label poison sits in its target class.

        Returns:
          ``(scores, flagged)``: float ``(n,)`` and bool ``(n,)``.
        """
        classes = feature_classes(features, labels)
        scores = spectral_scores(features, classes)
        flagged = flag_top_per_group(scores, classes, self.multiplier * self.eps)
        return scores, flagged
