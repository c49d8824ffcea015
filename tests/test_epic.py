"""EPIC's building blocks: greedy facility location against brute-force enumeration, and
the kernel regime's gradient distances against explicit per-example gradients."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ntk_poison.defences import epic


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
