"""Activation clustering (Chen et al. 2019, "Detecting Backdoor Attacks on Deep Neural
Networks by Activation Clustering", SafeAI@AAAI), as in the Adversarial Robustness
Toolbox's ``ActivationDefence``.

Within each class ``c`` with representations ``h_i`` (rows of a feature matrix: a
network's penultimate layer, or in the kernel regime its kernel-PCA features,
:func:`ntk_poison.defences.features.kernel_pca_features`):

1. centre and project on the top ``k_c = min(n_components, n_c, p)`` principal axes::

       mu_c = mean_{i in c} h_i,   [h_i - mu_c]_{i in c} = U S V^T   (thin SVD)
       z_i  = V[:, :k_c]^T (h_i - mu_c)

2. split ``{z_i}`` into two clusters ``A, B`` by k-means (Lloyd; scikit-learn's
   ``KMeans``, ``n_init`` restarts, a fixed ``random_state``);
3. the relative size of a point's cluster, ``s_i = |A| / n_c`` for ``i in A``;

    score_i   = 1 - s_i                      (in [0, 1]; small clusters score high)
    flagged_i = s_i < size_threshold         (default 0.35)

A backdoor's poisons in their target class are activated by the trigger, not by the
class's own features, so they form their own, small cluster. With two clusters,
``s_i < 0.35`` holds only for the smaller one: this is ART's "smaller" analysis (the
smaller cluster is the poison) gated by its "relative-size" analysis (only when it
holds under 35% of the class). A 50/50 split, the signature of a clean class with two
modes, flags nothing. A class of one point, or whose points all coincide, is one
cluster: score 0, not flagged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import numpy as np

from ntk_poison import _validate
from ntk_poison.defences.base import feature_classes

Array = Any

__all__ = ["ActivationClustering", "cluster_relative_sizes"]


def cluster_relative_sizes(features: Array, classes: np.ndarray, *,
                           n_components: int = 10, n_init: int = 10,
                           random_state: int = 0) -> np.ndarray:
    """The relative size ``s_i = |cluster(i)| / n_c`` of each point's 2-means cluster.

    Per class: centre, project on the top ``min(n_components, n_c, p)`` principal axes
    (numpy thin SVD, float64), then scikit-learn ``KMeans(n_clusters=2,
    n_init=n_init, random_state=random_state)``. A class with fewer than two distinct
    points is one cluster (``s = 1``). Cost per class: the SVD ``O(n_c p min(n_c,
    p))`` plus ``n_init`` Lloyd runs on ``(n_c, k_c)``. k-means runs on ONE OpenMP
    thread: the blocks are small, and on a loaded machine scikit-learn's threaded
    Lloyd loop was about 5x slower (OpenMP spin-waits), with the same result.

    Args:
      features: ``(n, p)`` representations (``(n, ...)`` is flattened).
      classes: ``(n,)`` integer class ids (:func:`ntk_poison.defences.base.class_ids`).

    Returns:
      ``(n,)`` float64 in ``(0, 1]``.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    H = np.asarray(features, dtype=np.float64).reshape(len(classes), -1)
    sizes = np.ones(H.shape[0], dtype=np.float64)
    for c in np.unique(classes):
        rows = np.flatnonzero(classes == c)
        C = H[rows] - H[rows].mean(axis=0)
        if rows.size < 2 or np.unique(C, axis=0).shape[0] < 2:
            continue
        k = min(n_components, rows.size, C.shape[1])
        _, _, Vt = np.linalg.svd(C, full_matrices=False)
        Z = C @ Vt[:k].T
        with threadpool_limits(limits=1, user_api="openmp"):
            assign = KMeans(n_clusters=2, n_init=n_init,
                            random_state=random_state).fit_predict(Z)
        counts = np.bincount(assign, minlength=2)
        sizes[rows] = counts[assign] / rows.size
    return sizes


@dataclasses.dataclass(frozen=True)
class ActivationClustering:
    """The activation-clustering detector (Chen et al. 2019; ART's ActivationDefence).

    Attributes:
      n_components: PCA dimension before clustering (ART's ``nb_dims``, 10); fewer
        where a class has fewer points or features.
      size_threshold: a cluster under this fraction of its class is flagged (ART's
        relative-size analysis, 0.35), in [0, 1]. Above 0.5 the smaller cluster is
        always flagged; 0 flags nothing.
      n_init: k-means restarts (the best inertia wins), >= 1.
      random_state: k-means seed, an int >= 0: the detector is deterministic.
    """

    n_components: int = 10
    size_threshold: float = 0.35
    n_init: int = 10
    random_state: int = 0

    def __post_init__(self):
        _validate.positive_int("n_components", self.n_components)
        _validate.positive_int("n_init", self.n_init)
        if not _validate.is_int_scalar(self.random_state) or self.random_state < 0:
            raise ValueError(f"`random_state` must be an integer >= 0 (the k-means "
                             f"seed), got {self.random_state!r}.")
        _validate.scalar("size_threshold", self.size_threshold)
        if self.size_threshold > 1:
            raise ValueError(f"`size_threshold` is a fraction of the class in [0, 1], "
                             f"got {self.size_threshold}.")

    def detect(self, features: Array, labels: Array) -> Tuple[np.ndarray, np.ndarray]:
        """Score and flag every row.

        Args:
          features: representations ``(n, p)`` (or ``(n, ...)``, flattened).
          labels: the training labels ``(n,)`` (ints or float +-1 targets) or
            ``(n, c)`` (one-hot): classes come from
            :func:`ntk_poison.defences.base.class_ids`. Use the POISONED labels: a
            dirty-label poison sits in its target class.

        Returns:
          ``(scores, flagged)``: float ``(n,)``, ``1 - s_i``, and bool ``(n,)``,
          ``s_i < size_threshold``, with ``s_i`` the relative size of the point's
          cluster in its class (:func:`cluster_relative_sizes`).
        """
        classes = feature_classes(features, labels)
        sizes = cluster_relative_sizes(
            features, classes, n_components=self.n_components, n_init=self.n_init,
            random_state=self.random_state)
        return 1.0 - sizes, sizes < self.size_threshold
