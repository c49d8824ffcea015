"""Exact kernel certificates (ntk_poison.certify.kernel) against independent oracles:
every bound is checked by enumerating all label vectors within the budget and
refitting KRR with a numpy solve per vector; the flow weights against
flow.kernel_flow; the clone worst case against explicit refits; the MILP against
enumeration. All in float64."""

import itertools

import numpy as np
import pytest

from ntk_poison import certify, flow, kernels, x64_scope

RIDGE = 0.1


@pytest.fixture(autouse=True)
def _x64():
    with x64_scope():
        yield


def _problem(seed, n=8, m=5, d=2):
    """Two clusters of alternating labels along the first axis; test points spread
    from one cluster to the other (so radii and joint counts vary)."""
    r = np.random.default_rng(seed)
    y = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    X = 0.8 * r.normal(size=(n, d))
    X[:, 0] += 1.5 * y
    xt = 0.8 * r.normal(size=(m, d))
    xt[:, 0] += np.linspace(2.0, -2.0, m)
    return kernels.rbf(1.5), X, y, xt


def _refit(k, X, Y, ridge, xt):
    """numpy KRR refit for every column of Y (n, B): predictions (m, B)."""
    n = len(X)
    K = np.asarray(k(X, X))
    A = K + n * ridge * np.eye(n)
    return np.asarray(k(xt, X)) @ np.linalg.solve(A, Y)


def _all_flips(y):
    """Every +-1 label vector (n, 2^n) and its number of flips from y."""
    n = len(y)
    Z = np.array(list(itertools.product([0, 1], repeat=n)), bool).T        # (n, 2^n)
    return np.where(Z, -y[:, None], y[:, None]), Z.sum(0)


@pytest.mark.parametrize("seed", [0, 1])
def test_label_flip_bounds_and_radius_match_enumeration(seed):
    k, X, y, xt = _problem(seed)
    Ys, counts = _all_flips(y)
    F = _refit(k, X, Ys, RIDGE, xt)                                         # (m, 2^n)
    f0 = F[:, counts == 0][:, 0]
    for n_flips in (0, 1, 2, 3, 8, 12):
        lo, hi = certify.label_flip_bounds(k, X, y, RIDGE, xt, n_flips)
        ok = counts <= n_flips
        np.testing.assert_allclose(lo, F[:, ok].min(1), rtol=0, atol=1e-10)
        np.testing.assert_allclose(hi, F[:, ok].max(1), rtol=0, atol=1e-10)
    # radius: the largest budget under which every refit keeps the strict sign
    same = np.sign(F) == np.sign(f0)[:, None]
    want = np.array([max(b for b in range(len(y) + 1) if same[j, counts <= b].all())
                     for j in range(len(xt))])
    r = np.asarray(certify.certified_radius(k, X, y, RIDGE, xt))
    np.testing.assert_array_equal(r, want)
    assert len(np.unique(want)) >= 2          # the check sees more than one radius
    # certified accuracy: correct (against a labelling) and radius >= k
    y_test = np.sign(f0) * np.array([1, 1, -1, 1, 1])
    acc = certify.certified_accuracy(k, X, y, RIDGE, xt, y_test, [0, 1, 2, 8])
    correct = np.sign(f0) == y_test
    np.testing.assert_allclose(acc, [np.mean(correct & (want >= b)) for b in (0, 1, 2, 8)])


def test_label_change_bounds_match_vertex_enumeration():
    k, X, y, xt = _problem(2)
    y = y * np.linspace(0.5, 2.0, len(y))           # any real targets
    eps = 0.3
    for k_points in (0, 1, 2, 3):
        cols = []
        for size in range(k_points + 1):
            for S in itertools.combinations(range(len(y)), size):
                for signs in itertools.product([-1.0, 1.0], repeat=size):
                    yy = y.copy()
                    yy[list(S)] += eps * np.array(signs)
                    cols.append(yy)
        F = _refit(k, X, np.array(cols).T, RIDGE, xt)
        lo, hi = certify.label_change_bounds(k, X, y, RIDGE, xt, eps, k_points)
        np.testing.assert_allclose(lo, F.min(1), rtol=0, atol=1e-10)
        np.testing.assert_allclose(hi, F.max(1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("encoding", ["one_hot", "centred", "pm1"])
def test_class_margins_and_radius_match_enumeration(encoding):
    r = np.random.default_rng(3)
    n, C, m = 6, 3, 5
    cls = np.array([0, 0, 0, 1, 1, 2])
    angle = 2 * np.pi * np.arange(C) / C
    centres = 2.5 * np.stack([np.cos(angle), np.sin(angle)], 1)
    X = centres[cls] + 0.5 * r.normal(size=(n, 2))
    xt = centres[[0, 0, 1, 2, 0]] + 0.8 * r.normal(size=(m, 2))
    rows = {"one_hot": np.eye(C), "centred": np.eye(C) - 1.0 / C,
            "pm1": 2 * np.eye(C) - 1}[encoding]
    k = kernels.rbf(1.2)
    labellings = np.array(list(itertools.product(range(C), repeat=n)))    # (C^n, n)
    counts = (labellings != cls).sum(1)
    L = len(labellings)
    Yall = np.moveaxis(rows[labellings], 0, 1).reshape(n, L * C)         # one solve
    F = np.moveaxis(_refit(k, X, Yall, RIDGE, xt).reshape(m, L, C), 1, 0)  # (L, m, C)
    p0 = np.argmax(F[counts == 0][0], axis=1)
    marg = np.take_along_axis(F, np.broadcast_to(p0[None, :, None], F.shape[:2] + (1,)),
                              axis=2) - F                                  # (L, m, C)
    for n_flips in (0, 1, 2, 4):
        pred, lo = certify.class_margin_bounds(k, X, rows[cls], RIDGE, xt, n_flips)
        np.testing.assert_array_equal(pred, p0)
        want = marg[counts <= n_flips].min(0)
        want[np.arange(m), p0] = np.inf
        np.testing.assert_allclose(lo, want, rtol=0, atol=1e-10)
    kept = np.argmax(F, axis=2) == p0[None]
    # a tie with the argmax counts as a change
    strict = kept & (np.sort(F, axis=2)[..., -2] < F.max(2))
    want_r = np.array([max(b for b in range(n + 1) if strict[counts <= b, j].all())
                       for j in range(m)])
    np.testing.assert_array_equal(certify.certified_radius(k, X, rows[cls], RIDGE, xt),
                                  want_r)
    assert want_r.max() >= 1
    y_test = p0.copy()
    y_test[2] = (p0[2] + 1) % C
    acc = certify.certified_accuracy(k, X, rows[cls], RIDGE, xt, y_test, [0, 1, 2])
    np.testing.assert_allclose(acc, [np.mean((p0 == y_test) & (want_r >= b))
                                     for b in (0, 1, 2)])


def test_flow_weights_match_kernel_flow():
    k, X, y, xt = _problem(4)
    Ys, counts = _all_flips(y)
    Ys = Ys[:, counts <= 2]
    times = [0.0, 3.0, 40.0]
    # kernel_flow on every label vector within 2 flips at once: (T, m, B)
    F = np.asarray(flow.kernel_flow(k, X, Ys, RIDGE, 0.0, times).predict(xt))
    for i, t in enumerate(times):
        W = certify.kernel_weights(k, X, RIDGE, xt, time=t)
        np.testing.assert_allclose(W @ y, F[i, :, 0], rtol=0, atol=1e-10)
        lo, hi = certify.label_flip_bounds(k, X, y, RIDGE, xt, 2, time=t)
        np.testing.assert_allclose(lo, F[i].min(1), rtol=0, atol=1e-10)
        np.testing.assert_allclose(hi, F[i].max(1), rtol=0, atol=1e-10)
    assert np.ptp(F[1].min(1) - F[2].min(1)) > 1e-3      # the times differ


@pytest.mark.parametrize("multi", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_clone_worst_case_matches_explicit_refits(multi):
    k, X, y, xt = _problem(5)
    r = np.random.default_rng(6)
    cand = np.concatenate([X[:3], r.normal(size=(3, 2))])
    m = 4
    if multi:
        y = np.eye(3)[r.integers(0, 3, len(X))] - 1.0 / 3
        yt = np.eye(3)[1] - 1.0 / 3
    else:
        yt = -1.0
    res = certify.clone_worst_case(k, X, y, RIDGE, xt, cand, m, yt)
    N = len(X)
    for q, z in enumerate(cand):
        Xp = np.concatenate([X, np.repeat(z[None], m, 0)])
        yp = np.concatenate([y, np.repeat(np.asarray(yt, float)[None], m, 0)])
        Kp = np.asarray(k(Xp, Xp))
        f = np.asarray(k(xt, Xp)) @ np.linalg.solve(Kp + (N + m) * RIDGE * np.eye(N + m), yp)
        np.testing.assert_allclose(res.f_poisoned[q], f, atol=1e-9)
        eff = f[:, 1] - np.delete(f, 1, axis=1).max(1) if multi else yt * f
        np.testing.assert_allclose(res.effects[q], eff, atol=1e-9)
    np.testing.assert_allclose(res.worst_effect, res.effects.max(0))
    np.testing.assert_array_equal(res.worst_candidate, res.effects.argmax(0))
    # several budgets share one factorisation: the same answers as one call each
    many = certify.clone_worst_case(k, X, y, RIDGE, xt, cand, [1, m], yt)
    np.testing.assert_allclose(many[1].effects, res.effects, atol=1e-12)
    one = certify.clone_worst_case(k, X, y, RIDGE, xt, cand, np.int64(1), yt)
    np.testing.assert_allclose(many[0].effects, one.effects, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 7])
def test_joint_milp_matches_enumeration(seed):
    k, X, y, xt = _problem(seed, n=8, m=3)
    Ys, counts = _all_flips(y)
    F = _refit(k, X, Ys, RIDGE, xt)
    s0 = np.sign(F[:, counts == 0][:, 0])
    turned = (s0[:, None] * F <= 0).sum(0)                   # per label vector
    seen = set()
    for n_flips in (0, 1, 2, 3):
        want = turned[counts <= n_flips].max()
        sol = certify.joint_flip_solution(k, X, y, RIDGE, xt, n_flips)
        assert sol.max_flipped == want
        assert certify.joint_flip_certificate(k, X, y, RIDGE, xt, n_flips) == want
        assert len(sol.flip_set) <= n_flips
        yy = y.copy()
        yy[sol.flip_set] *= -1
        fz = _refit(k, X, yy[:, None], RIDGE, xt)[:, 0]
        np.testing.assert_array_equal(sol.flipped, s0 * fz <= 0)
        seen.add(int(want))
    assert len(seen) >= 2


def test_bad_inputs_name_the_argument():
    k, X, y, xt = _problem(0)
    with pytest.raises(ValueError, match="`y` must be \\+-1"):
        certify.label_flip_bounds(k, X, 0.5 * y, RIDGE, xt, 1)
    with pytest.raises(ValueError, match="`n_flips`"):
        certify.label_flip_bounds(k, X, y, RIDGE, xt, -1)
    with pytest.raises(ValueError, match="`n_flips`"):
        certify.label_flip_bounds(k, X, y, RIDGE, xt, 1.5)
    with pytest.raises(ValueError, match="`x_test`"):
        certify.certified_radius(k, X, y, RIDGE, xt[:, :1])
    with pytest.raises(ValueError, match="`time`"):
        certify.kernel_weights(k, X, RIDGE, xt, time=-1.0)
    with pytest.raises(ValueError, match="`eps`"):
        certify.label_change_bounds(k, X, y, RIDGE, xt, -0.1, 1)
    with pytest.raises(ValueError, match="`y` rows"):
        certify.class_margin_bounds(k, X, np.ones((len(X), 3)), RIDGE, xt, 1)
    with pytest.raises(ValueError, match="max_variables"):
        certify.joint_flip_certificate(k, X, y, RIDGE, xt, 1, max_variables=10)
    with pytest.raises(ValueError, match="`m`"):
        certify.clone_worst_case(k, X, y, RIDGE, xt, X[:2], 0, 1.0)
    with pytest.raises(ValueError, match="`m`"):
        certify.clone_worst_case(k, X, y, RIDGE, xt, X[:2], [], 1.0)
