"""EPIC against independent oracles: greedy facility location against brute-force
enumeration, gradient distances against explicit per-example gradients, the selection on
constructed clusters and against a numpy nearest-medoid search, the kernel-regime arms
against numpy KRR and a scipy matrix exponential of the piecewise-linear flow, and the
training-engine filter against numpy gradients."""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ntk_poison import flow, kernels, krr
from ntk_poison.defences import EPIC, epic, epic_select


def _optimum(S, k):
    return max(epic.facility_value(S, A) for A in itertools.combinations(range(len(S)), k))


@pytest.mark.parametrize("seed", range(4))
def test_greedy_within_1_minus_1_over_e_of_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(8, 2))
    S = np.exp(-np.linalg.norm(X[:, None] - X[None], axis=-1))
    for k in (1, 2, 3):
        A = epic.facility_location(S, k)
        assert len(set(A.tolist())) == k
        assert epic.facility_value(S, A) >= (1 - 1 / math.e) * _optimum(S, k) - 1e-12
    # k = 1: greedy is exact (the best single medoid)
    assert epic.facility_value(S, epic.facility_location(S, 1)) == pytest.approx(_optimum(S, 1))


def test_greedy_is_optimal_on_separated_clusters():
    """Three far-apart clusters of 3, 2, 3 points: the optimum puts one medoid in each
    cluster (at its centre), and greedy finds it."""
    pts = np.array([[0, 0], [0.1, 0], [-0.1, 0], [50, 0], [50.1, 0],
                    [0, 50], [0.1, 50], [-0.1, 50]])
    S = np.exp(-np.linalg.norm(pts[:, None] - pts[None], axis=-1))
    A = epic.facility_location(S, 3)
    assert epic.facility_value(S, A) == pytest.approx(_optimum(S, 3), rel=1e-12)
    assert sorted(A.tolist()) == [0, 3, 5]          # the centres (ties: smallest index)
    assert A[0] == 0                                # the largest cluster's centre first


@pytest.mark.parametrize("C", [1, 3])
def test_gradient_distances_equal_explicit_per_example_gradients(C):
    """phi = random features, K = Phi Phi^T, f = Phi W: the gradient of the squared loss
    of example i w.r.t. W is phi_i r_i^T; its distances, computed explicitly."""
    rng = np.random.default_rng(0)
    Phi = rng.normal(size=(7, 5))
    r = rng.normal(size=(7, C)) if C > 1 else rng.normal(size=7)
    G = np.einsum("ip,ic->ipc", Phi, r.reshape(7, -1)).reshape(7, -1)
    want = np.linalg.norm(G[:, None] - G[None], axis=-1)
    got = epic.gradient_distances(Phi @ Phi.T, r)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert np.all(np.diag(got) == 0)


@pytest.mark.parametrize("args, match", [
    ((np.ones((2, 3)), 1), "square"), ((-np.eye(3), 1), ">= 0"),
    ((np.eye(3), 0), "`k`"), ((np.eye(3), 4), "`k`"),
    ((np.full((2, 2), np.nan), 1), "S")])
def test_facility_location_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        epic.facility_location(*args)


def test_gradient_distances_bad_inputs():
    with pytest.raises(ValueError, match="residuals"):
        epic.gradient_distances(np.eye(3), np.ones(4))
    with pytest.raises(ValueError, match="square"):
        epic.gradient_distances(np.ones((2, 3)), np.ones(2))


# --------------------------------------------------------------------------- selection

def _clusters(centres, sizes, rng, sd=0.02):
    return np.concatenate([np.asarray(c) + sd * rng.normal(size=(s, 2))
                           for c, s in zip(centres, sizes)])


def _brute_assignment(D, cls, medoids):
    """Each point's nearest medoid of its class (first in pick order on ties)."""
    out = np.empty(len(cls), int)
    for i in range(len(cls)):
        own = [m for m in medoids if cls[m] == cls[i]]
        out[i] = own[int(np.argmin([D[i, m] for m in own]))]
    return out


def test_epic_select_drops_exactly_the_isolated_points(rng):
    """Class 0: three tight clusters of 3 and one far point (n = 10, k = 4); class 1: two
    tight clusters of 3 and one far point (n = 7, k = 3). The optimum puts one medoid
    per cluster and one on each loner, which alone form singleton clusters."""
    P0 = np.r_[_clusters([(0, 0), (3, 0), (0, 3)], [3, 3, 3], rng), [[30, 30]]]
    P1 = np.r_[_clusters([(10, 0), (10, 3)], [3, 3], rng), [[-30, 30]]]
    pts = np.r_[P0, P1]
    lab = np.r_[np.zeros(10, int), np.ones(7, int)]
    D = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    sel = epic_select(D, lab, 0.4)
    isolated = np.zeros(17, bool)
    isolated[[9, 16]] = True
    np.testing.assert_array_equal(sel.drop, isolated)
    assert [int(np.sum(lab[sel.medoids] == c)) for c in (0, 1)] == [4, 3]   # floor(.4n+.5)
    np.testing.assert_array_equal(sel.assignment, _brute_assignment(D, lab, sel.medoids))
    np.testing.assert_array_equal(sel.cluster_size, np.r_[[3] * 9, 1, [3] * 6, 1])


@pytest.mark.parametrize("subset_size", [0.1, 0.2, 0.3])
def test_epic_select_matches_per_class_greedy_and_a_brute_force_assignment(rng, subset_size):
    """Random gradients of 3 unequal classes: per class, the medoids are facility
    location on exp(-D_cc / C), their count round-half-up(subset_size n_c) >= 1, every
    point goes to its nearest medoid, and drop = cluster size <= 1."""
    sizes = (23, 9, 4)
    lab = np.repeat(np.arange(3), sizes)
    G = rng.normal(size=(lab.size, 3))
    D = np.linalg.norm(G[:, None] - G[None], axis=-1)
    sel = epic_select(D, lab, subset_size)
    for c, n_c in enumerate(sizes):
        rows = np.flatnonzero(lab == c)
        k_c = max(1, math.floor(subset_size * n_c + 0.5))
        want = rows[epic.facility_location(np.exp(-D[np.ix_(rows, rows)] / 3), k_c)]
        np.testing.assert_array_equal(sel.medoids[lab[sel.medoids] == c], want)
    assign = _brute_assignment(D, lab, sel.medoids)
    np.testing.assert_array_equal(sel.assignment, assign)
    size = np.array([np.sum(assign == a) for a in assign])
    np.testing.assert_array_equal(sel.cluster_size, size)
    np.testing.assert_array_equal(sel.drop, size <= 1)


def test_pairwise_distances_and_last_layer_gradients_against_numpy(rng):
    G = rng.normal(size=(37, 4))
    want = np.linalg.norm(G[:, None] - G[None], axis=-1)
    np.testing.assert_allclose(epic.pairwise_distances(G, block=8), want, rtol=1e-12,
                               atol=1e-12)
    z, y = rng.normal(size=(6, 3)), rng.integers(0, 3, size=6)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(epic.last_layer_gradients(z, y), p - np.eye(3)[y],
                               rtol=1e-12, atol=1e-14)


def test_detector_output_and_ranking(rng):
    """Singletons are flagged and score above every clustered point."""
    pts = np.r_[_clusters([(0, 0), (5, 0)], [4, 4], rng), [[40, 0]]]
    lab = np.zeros(9, int)
    scores, flagged = EPIC(subset_size=0.3).detect(pts, lab)
    assert scores.shape == (9,) and scores.dtype == np.float64 and flagged.dtype == bool
    np.testing.assert_array_equal(flagged, np.arange(9) == 8)
    assert scores[8] > scores[:8].max()
    s2, f2 = EPIC(subset_size=0.3).detect_distances(
        np.linalg.norm(pts[:, None] - pts[None], axis=-1), lab)
    np.testing.assert_array_equal(f2, flagged)
    np.testing.assert_allclose(s2, scores, rtol=1e-10)


@pytest.mark.parametrize("call, match", [
    (lambda: EPIC(subset_size=0.0), "subset_size"),
    (lambda: EPIC(subset_size=1.5), "subset_size"),
    (lambda: EPIC(num_classes=0), "num_classes"),
    (lambda: EPIC().detect(np.ones(4), np.zeros(4, int)), "gradients"),
    (lambda: EPIC().detect(np.ones((4, 2)), np.zeros(3, int)), "labels"),
    (lambda: EPIC().detect(np.full((2, 2), np.nan), np.zeros(2, int)), "gradients"),
    (lambda: epic_select(np.ones((2, 3)), np.zeros(2, int), 0.1), "square"),
    (lambda: epic_select(-np.ones((2, 2)), np.zeros(2, int), 0.1), ">= 0"),
    (lambda: epic.last_layer_gradients(np.ones((2, 3)), np.array([0.0, 1.0])), "labels"),
    (lambda: epic.last_layer_gradients(np.ones((2, 3)), np.array([0, 3])), "labels"),
    (lambda: epic.pairwise_distances(np.ones((3, 2)), block=0), "block"),
    (lambda: epic.epic_schedule(0), "epochs")])
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_epic_schedule_scales_10_of_40_and_2():
    assert epic.epic_schedule(40) == (10, 2)
    assert epic.epic_schedule(20) == (5, 1)
    assert epic.epic_schedule(200) == (50, 10)
    assert epic.epic_schedule(2) == (1, 1)


# --------------------------------------------------------------------------- kernel regime

def _planted(rng, poison=True):
    """Class +1: clusters of 3 at (0,0), (0,3); class -1: clusters of 3 at (3,0), (3,3);
    and (poison) one far point at (20, 20) labelled +1. subset_size 0.4 gives k = 3 for
    class +1 (two clusters and the poison) and k = 2 for class -1."""
    X = _clusters([(0, 0), (0, 3), (3, 0), (3, 3)], [3, 3, 3, 3], rng, sd=0.05)
    y = np.r_[np.ones(6), -np.ones(6)]
    if poison:
        X, y = np.r_[X, [[20.0, 20.0]]], np.r_[y, 1.0]
    return X, y


def test_epic_krr_drops_the_planted_point_and_refits_on_the_kept(rng):
    X, y = _planted(rng)
    k = kernels.rbf(1.0)
    res = epic.epic_krr(k, X, y, 0.01, subset_size=0.4, rounds=2)
    np.testing.assert_array_equal(res.keep, np.arange(13) < 12)
    np.testing.assert_array_equal(res.dropped_at, np.r_[-np.ones(12, int), 0])
    Xk, yk = X[:12], y[:12]
    K = np.exp(-np.sum((Xk[:, None] - Xk[None]) ** 2, -1) / 2)
    alpha = np.linalg.solve(K + 12 * 0.01 * np.eye(12), yk)          # numpy KRR
    np.testing.assert_allclose(res.model.alpha, alpha, rtol=1e-10, atol=1e-12)
    ref = krr.fit(k, Xk, yk, 0.01)
    xq = rng.normal(size=(5, 2))
    np.testing.assert_allclose(res.model.predict(xq), ref.predict(xq), rtol=1e-12, atol=1e-14)
    one_hot = np.eye(2)[(y < 0).astype(int)]                          # (n, C) targets
    res2 = epic.epic_krr(k, X, one_hot, 0.01, subset_size=0.4)
    np.testing.assert_array_equal(res2.keep, res.keep)


def _expm_flow(K, y, ridge, segments):
    """The flow da/dt = -(1/m) S (K a - y) - ridge a (S = diag(keep), m = |keep|), one
    scipy matrix exponential of the augmented system [a; 1] per segment."""
    n = len(y)
    a = np.zeros(n)
    for keep, tau in segments:
        S, m = np.diag(keep.astype(float)), keep.sum()
        M = np.zeros((n + 1, n + 1))
        M[:n, :n] = -(S @ K / m + ridge * np.eye(n))
        M[:n, n] = S @ y / m
        a = (scipy.linalg.expm(M * tau) @ np.r_[a, 1.0])[:n]
    return a


@pytest.mark.parametrize("poison, warmup, freq", [(False, 5.0, 0.5), (True, 0.5, 10.0)])
def test_epic_flow_against_the_matrix_exponential(rng, poison, warmup, freq):
    """No poison, warmup past the end: no EPIC step, and no poison with steps at 0.5,
    1.0, ...: no drops (every cluster has 3 points); both are kernel_flow exactly. With
    the poison and one step at t = 0.5: it is dropped there, and the flow continues on
    the rest: a two-segment flow, against scipy's expm."""
    X, y = _planted(rng, poison)
    k, ridge, T = kernels.rbf(1.0), 0.01, 3.0
    n = len(y)
    K = np.exp(-np.sum((X[:, None] - X[None]) ** 2, -1) / 2)
    xq = rng.normal(size=(4, 2)) * 2
    for w in ((warmup, 0.5) if not poison else (warmup,)):
        res = epic.epic_flow(k, X, y, ridge, time=T, subset_size=0.4, subset_freq=freq,
                             warmup=w)
        assert len(res.times) == (1 if poison else 5 if w == 0.5 else 0)   # steps at 0.5 (+ k/2)
        if not poison:
            assert res.keep.all() and np.isnan(res.dropped_at).all()
            ref = flow.kernel_flow(k, X, y, ridge, 0.0, [T])
            np.testing.assert_allclose(res.predict(xq), ref.predict(xq)[0], rtol=1e-10,
                                       atol=1e-10)
            np.testing.assert_allclose(res.model.alpha, _expm_flow(K, y, ridge, [
                (np.ones(n, bool), T)]), rtol=1e-10, atol=1e-10)
        else:
            keep = np.arange(n) < n - 1
            np.testing.assert_array_equal(res.keep, keep)
            assert res.dropped_at[-1] == warmup and np.isnan(res.dropped_at[:-1]).all()
            want = _expm_flow(K, y, ridge, [(np.ones(n, bool), warmup), (keep, T - warmup)])
            np.testing.assert_allclose(res.model.alpha, want, rtol=1e-10, atol=1e-10)
            Kq = np.exp(-np.sum((xq[:, None] - X[None]) ** 2, -1) / 2)
            np.testing.assert_allclose(res.predict(xq), Kq @ want, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- training engine

def _lin_logits(p, x):
    return x @ p["W"] + p["b"]


def test_epic_filter_matches_numpy_gradients_and_the_schedule(rng):
    """At scheduled epochs the filter drops epic_select's choice on numpy softmax
    gradients of the kept rows; elsewhere it returns keep unchanged."""
    n, d, C = 40, 3, 3
    X, lab = rng.normal(size=(n, d)), rng.integers(0, C, size=n)
    p = {"W": jnp.asarray(rng.normal(size=(d, C))), "b": jnp.asarray(rng.normal(size=C))}
    filt = epic.epic_filter(_lin_logits, X, lab, subset_size=0.3, subset_freq=2, warmup=3,
                            batch=16, block=7)
    keep = rng.random(n) < 0.8
    for e in (1, 2, 4):
        np.testing.assert_array_equal(filt(p, e, keep), keep)
    rows = np.flatnonzero(keep)
    z = X[rows] @ np.asarray(p["W"]) + np.asarray(p["b"])
    P = np.exp(z - z.max(1, keepdims=True))
    G = P / P.sum(1, keepdims=True) - np.eye(C)[lab[rows]]
    D = np.linalg.norm(G[:, None] - G[None], axis=-1)
    drop = epic_select(D, lab[rows], 0.3, num_classes=C).drop
    assert drop.any()
    want = keep.copy()
    want[rows[drop]] = False
    for e in (3, 5):
        np.testing.assert_array_equal(filt(p, e, keep), want)
