"""Tests for ntk_poison.defences.activation_clustering: planted clusters, an independent
numpy-PCA + k-means recomputation, the size threshold, bad inputs, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from ntk_poison import attacks, kernels, triggers
from ntk_poison.defences import (ActivationClustering, Detector, auroc, evaluate,
                                 evaluate_artefact, kernel_pca_features)


def _planted(rng, sizes=((90, 10), (90, 10), (90, 10)), p=20, gap=12.0):
    """Per class, clusters of the given sizes: N(mu_c, I) and N(mu_c + gap e_c', I)
    with a class-specific unit direction; the second (and later) clusters are the
    'poison'. Rows are shuffled."""
    H, lab, poison = [], [], []
    for c, parts in enumerate(sizes):
        mu = 3.0 * rng.standard_normal(p)
        u = rng.standard_normal(p)
        u /= np.linalg.norm(u)
        for j, m in enumerate(parts):
            H.append(mu + j * gap * u + rng.standard_normal((m, p)))
            lab.append(np.full(m, c))
            poison.append(np.full(m, j > 0))
    H, lab, poison = map(np.concatenate, (H, lab, poison))
    order = rng.permutation(lab.size)
    return H[order], lab[order], poison[order]


def _oracle(H, lab, n_components=10, threshold=0.35, n_init=10, random_state=0):
    """Independent recomputation: PCA from the eigendecomposition of the class
    covariance (not an SVD of the data), then sklearn KMeans; relative cluster sizes."""
    sizes = np.ones(lab.size)
    for c in np.unique(lab):
        rows = np.flatnonzero(lab == c)
        X = H[rows] - H[rows].mean(axis=0)
        k = min(n_components, rows.size, X.shape[1])
        w, V = np.linalg.eigh(X.T @ X / rows.size)
        Z = X @ V[:, np.argsort(w)[::-1][:k]]
        with threadpool_limits(limits=1, user_api="openmp"):  # speed only
            a = KMeans(n_clusters=2, n_init=n_init,
                       random_state=random_state).fit_predict(Z)
        sizes[rows] = np.array([np.mean(a == a[i]) for i in range(rows.size)])
    return 1.0 - sizes, sizes < threshold


def test_planted_ten_percent_poison_clusters_are_all_flagged(rng):
    H, lab, poison = _planted(rng)
    det = ActivationClustering()
    assert isinstance(det, Detector)
    scores, flagged = det.detect(H, lab)
    np.testing.assert_array_equal(flagged, poison)
    assert auroc(scores, poison) == 1.0
    # Score = 1 - relative size of the point's cluster: 0.9 for poisons, 0.1 clean.
    np.testing.assert_allclose(scores, np.where(poison, 0.9, 0.1), rtol=0, atol=1e-12)
    out = evaluate(scores, flagged, poison)
    assert (out["recall"], out["precision"], out["fp"]) == (1.0, 1.0, 0)


def test_a_50_50_split_flags_nothing(rng):
    H, lab, _ = _planted(rng, sizes=((50, 50), (40, 40)))
    scores, flagged = ActivationClustering().detect(H, lab)
    assert not flagged.any()
    np.testing.assert_allclose(scores, 0.5, rtol=0, atol=1e-12)


def test_the_size_threshold_gates_the_smaller_cluster(rng):
    H, lab, minor = _planted(rng, sizes=((70, 30), (60, 40)))
    _, flagged = ActivationClustering().detect(H, lab)
    # 30% < 35%: flagged; 40% is not under 35%: the whole class passes.
    np.testing.assert_array_equal(flagged, minor & (lab == 0))
    _, flagged = ActivationClustering(size_threshold=0.5).detect(H, lab)
    np.testing.assert_array_equal(flagged, minor)
    _, flagged = ActivationClustering(size_threshold=0.0).detect(H, lab)
    assert not flagged.any()


@pytest.mark.parametrize("n_components,p,sizes", [
    (10, 20, ((80, 20), (95, 5))),
    (3, 20, ((80, 20), (60, 40))),
    (10, 4, ((80, 20), (70, 30))),        # fewer features than components
    (10, 20, ((6, 2), (4, 1))),           # fewer points than components
])
def test_flags_and_scores_match_an_independent_recomputation(rng, n_components, p,
                                                              sizes):
    H, lab, _ = _planted(rng, sizes=sizes, p=p, gap=4.0)
    scores, flagged = ActivationClustering(n_components=n_components).detect(H, lab)
    want_scores, want_flagged = _oracle(H, lab, n_components=n_components)
    np.testing.assert_array_equal(flagged, want_flagged)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-12)


def test_noisy_overlapping_classes_match_the_recomputation(rng):
    """No planted gap: k-means splits Gaussian noise somewhere; same split as oracle."""
    H = rng.standard_normal((150, 12))
    lab = rng.integers(0, 3, 150)
    scores, flagged = ActivationClustering(n_components=5).detect(H, lab)
    want_scores, want_flagged = _oracle(H, lab, n_components=5)
    np.testing.assert_array_equal(flagged, want_flagged)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-12)


def test_degenerate_classes_are_one_cluster(rng):
    H, lab, poison = _planted(rng, sizes=((45, 5),))
    H = np.concatenate([H, np.ones((4, H.shape[1])), rng.standard_normal((1, H.shape[1]))])
    lab = np.concatenate([lab, [1, 1, 1, 1, 2]])
    scores, flagged = ActivationClustering().detect(H, lab)
    np.testing.assert_array_equal(flagged, np.concatenate([poison, np.zeros(5, bool)]))
    np.testing.assert_array_equal(scores[-5:], 0.0)


def test_labels_in_every_encoding_and_image_shaped_features(rng):
    H, lab, poison = _planted(rng, sizes=((45, 5), (36, 4)), p=16)
    want = ActivationClustering().detect(H, lab)
    for features, labels in ((H, np.where(lab == 1, 1.0, -1.0)), (H, np.eye(2)[lab]),
                             (H.reshape(-1, 4, 4, 1), lab)):
        got = ActivationClustering().detect(features, labels)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(want[1], poison)


def test_deterministic_and_row_order_equivariant(rng):
    H, lab, _ = _planted(rng)
    a = ActivationClustering(random_state=3).detect(H, lab)
    b = ActivationClustering(random_state=3).detect(H.copy(), lab.copy())
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    perm = rng.permutation(lab.size)
    c = ActivationClustering(random_state=3).detect(H[perm], lab[perm])
    np.testing.assert_array_equal(c[0], a[0][perm])
    np.testing.assert_array_equal(c[1], a[1][perm])
    assert a[0].dtype == np.float64 and a[1].dtype == bool


def test_backdoor_artefact_in_the_kernel_regime(rng):
    """End to end: a cross-trigger backdoor (10 poisons in a class of about 160),
    detected on the rbf kernel-PCA features and scored by the evaluator."""
    n, d = 300, 64
    y = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    X = rng.standard_normal((n, d)) + 0.5 * y[:, None]
    a = attacks.backdoor_attack(X, y, triggers.CrossTrigger(strength=8.0), 1.0,
                                n_poison=10, seed=0)
    F = kernel_pca_features(kernels.rbf(length_scale=8.0), a.x, 20)
    out = evaluate_artefact(ActivationClustering().detect(F, a.y), a)
    assert out["auroc"] == 1.0
    assert (out["tp"], out["fp"], out["fn"]) == (10, 0, 0)


@pytest.mark.parametrize("bad,name", [
    (dict(n_components=0), "n_components"), (dict(n_components=2.5), "n_components"),
    (dict(size_threshold=-0.1), "size_threshold"),
    (dict(size_threshold=1.5), "size_threshold"),
    (dict(size_threshold=float("nan")), "size_threshold"),
    (dict(n_init=0), "n_init"), (dict(random_state=-1), "random_state"),
    (dict(random_state=None), "random_state"), (dict(random_state=1.0), "random_state"),
])
def test_bad_parameters_name_the_argument(bad, name):
    with pytest.raises(ValueError, match=name):
        ActivationClustering(**bad)


def test_bad_inputs_name_the_argument(rng):
    det = ActivationClustering()
    with pytest.raises(ValueError, match="`features` has 5 rows but `labels` has 4"):
        det.detect(rng.standard_normal((5, 3)), np.zeros(4, int))
    with pytest.raises(ValueError, match="`features` contains NaN"):
        det.detect(np.full((5, 3), np.nan), np.zeros(5, int))
    with pytest.raises(ValueError, match="`features` must have"):
        det.detect(rng.standard_normal(5), np.zeros(5, int))
    with pytest.raises(ValueError, match="`labels` must have"):
        det.detect(rng.standard_normal((5, 3)), np.zeros((5, 1, 1), int))
