"""Tests for ntk_poison.attacks: clone clusters, near clones, the attack builders."""

from __future__ import annotations

import numpy as np
import pytest

from ntk_poison import artefact, attacks, flow, poison, triggers


@pytest.mark.parametrize("m", [0, 1, 7])
@pytest.mark.parametrize("input_shape", [(3,), (4, 4, 1)])
def test_clone_cluster_appends_exactly_m_copies_at_the_end(m, input_shape, rng):
    n = 5
    X = rng.standard_normal((n,) + input_shape)
    y = rng.standard_normal(n)
    zeta = rng.standard_normal(input_shape)
    Xp, yp = attacks.clone_cluster(X, y, zeta, 0.75, m)
    assert Xp.shape == (n + m,) + input_shape and yp.shape == (n + m,)
    assert Xp.dtype == X.dtype and yp.dtype == y.dtype
    np.testing.assert_array_equal(Xp[:n], X)
    np.testing.assert_array_equal(yp[:n], y)
    for i in range(n, n + m):
        np.testing.assert_array_equal(Xp[i], zeta)
        assert yp[i] == 0.75


def test_clone_cluster_m0_is_identity(rng):
    X = rng.standard_normal((4, 2))
    y = rng.standard_normal(4)
    Xp, yp = attacks.clone_cluster(X, y, np.ones(2), 1.0, 0)
    np.testing.assert_array_equal(Xp, X)
    np.testing.assert_array_equal(yp, y)


def test_clone_cluster_vector_targets(rng):
    X = rng.standard_normal((4, 2))
    Y = rng.standard_normal((4, 3))
    yt = np.array([0.0, 1.0, 0.0])
    Xp, Yp = attacks.clone_cluster(X, Y, np.zeros(2), yt, 2)
    assert Yp.shape == (6, 3)
    np.testing.assert_array_equal(Yp[4:], np.stack([yt, yt]))
    np.testing.assert_array_equal(Yp[:4], Y)


def test_clone_cluster_accepts_whole_float_m(rng):
    X, y = rng.standard_normal((3, 2)), rng.standard_normal(3)
    Xp, _ = attacks.clone_cluster(X, y, np.zeros(2), 1.0, 2.0)
    assert Xp.shape == (5, 2)


@pytest.mark.parametrize("case", ["m_negative", "m_fraction", "m_nan", "zeta_shape",
                                  "zeta_batch", "y_target_shape", "y_target_scalar_for_2d",
                                  "rows_mismatch", "integer_y", "nan_zeta"])
def test_clone_cluster_bad_inputs_are_value_errors(case, rng):
    X = rng.standard_normal((4, 3))
    y = rng.standard_normal(4)
    zeta = rng.standard_normal(3)
    args = dict(X=X, y=y, zeta=zeta, y_target=1.0, m=2)
    if case == "m_negative":
        args["m"] = -1
    elif case == "m_fraction":
        args["m"] = 1.5
    elif case == "m_nan":
        args["m"] = float("nan")
    elif case == "zeta_shape":
        args["zeta"] = np.zeros(4)
    elif case == "zeta_batch":
        args["zeta"] = np.zeros((1, 3))
    elif case == "y_target_shape":
        args["y_target"] = np.array([1.0, 0.0])
    elif case == "y_target_scalar_for_2d":
        args["y"] = rng.standard_normal((4, 2))
        args["y_target"] = 1.0
    elif case == "rows_mismatch":
        args["y"] = y[:3]
    elif case == "integer_y":
        args["y"] = np.arange(4)
    elif case == "nan_zeta":
        args["zeta"] = np.array([0.0, np.nan, 1.0])
    with pytest.raises(ValueError):
        attacks.clone_cluster(**args)


@pytest.mark.parametrize("r", [0.0, 1e-3, 0.25, 3.0])
@pytest.mark.parametrize("shape", [(5,), (4, 4, 1)])
def test_near_clone_is_at_distance_exactly_r(r, shape, rng):
    x0 = rng.standard_normal(shape)
    zeta = attacks.near_clone(x0, r, seed=3)
    assert zeta.shape == shape
    np.testing.assert_allclose(np.linalg.norm(zeta - x0), r, rtol=1e-14, atol=1e-15)
    # deterministic in the seed, different across seeds
    np.testing.assert_array_equal(zeta, attacks.near_clone(x0, r, seed=3))
    if r > 0:
        assert not np.allclose(zeta, attacks.near_clone(x0, r, seed=4))


def test_near_clone_along_a_direction(rng):
    x0 = rng.standard_normal(3)
    d = np.array([3.0, 0.0, 4.0])
    zeta = attacks.near_clone(x0, 0.5, direction=d)
    np.testing.assert_allclose(zeta, x0 + 0.5 * np.array([0.6, 0.0, 0.8]), rtol=1e-15)


@pytest.mark.parametrize("kwargs", [{"r": -0.1}, {"r": 1.0, "direction": np.zeros(3)},
                                    {"r": 1.0, "direction": np.ones(2)}])
def test_near_clone_bad_inputs(kwargs):
    with pytest.raises(ValueError):
        attacks.near_clone(np.zeros(3), **kwargs)

def _clean(rng, n=20, d=16):
    X = rng.standard_normal((n, d))
    y = np.where(rng.standard_normal(n) > 0, 1.0, -1.0)
    return X, y


# ----------------------------------------------------------------- builders

@pytest.mark.parametrize("m", [0, 1, 7])
def test_clone_attack_places_m_poisons(m, rng):
    X, y = _clean(rng, n=10, d=3)
    zeta = rng.standard_normal(3)
    trig = triggers.CrossTrigger(strength=0.1, image_shape=(1, 3))
    a = attacks.clone_attack(X, y, zeta, -1.0, m, trigger=trig, seed=5,
                              meta={"r": 0.1})
    Xp, yp = attacks.clone_cluster(X, y, zeta, -1.0, m)
    np.testing.assert_array_equal(a.x, Xp)
    np.testing.assert_array_equal(a.y, yp)
    np.testing.assert_array_equal(a.poison_idx, np.arange(10, 10 + m))
    np.testing.assert_array_equal(a.x[a.is_poison], np.broadcast_to(zeta, (m, 3)))
    np.testing.assert_array_equal(a.clean()[0], X)
    assert a.meta == {"attack": "clone", "m": m, "n_clean": 10, "r": 0.1}
    assert a.target == -1.0 and a.seed == 5 and a.trigger == trig


def test_backdoor_attack_append(rng):
    X, y = _clean(rng, n=30)
    trig = triggers.CrossTrigger(strength=0.5)
    a = attacks.backdoor_attack(X, y, trig, 1.0, n_poison=5, seed=0)
    np.testing.assert_array_equal(a.x[:30], X)  # the clean set is intact
    np.testing.assert_array_equal(a.poison_idx, np.arange(30, 35))
    src = np.asarray(a.meta["source_idx"])
    assert np.all(y[src] == -1.0)  # sources are non-target points
    np.testing.assert_allclose(a.x[30:], trig.apply(X[src]))
    np.testing.assert_array_equal(a.y[30:], 1.0)


def test_backdoor_attack_replace_and_rate(rng):
    X, y = _clean(rng, n=40)
    trig = triggers.PatchTrigger(size=2)
    a = attacks.backdoor_attack(X, y, trig, 1.0, rate=0.1, seed=1, mode="replace")
    assert a.n == 40 and a.n_poison == 4
    np.testing.assert_array_equal(a.poison_idx, a.meta["source_idx"])
    keep = ~a.is_poison
    np.testing.assert_array_equal(a.x[keep], X[keep])
    np.testing.assert_array_equal(a.x[a.poison_idx], trig.apply(X[a.poison_idx]))
    np.testing.assert_array_equal(a.y[a.poison_idx], 1.0)


def test_backdoor_attack_is_deterministic_given_seed(rng):
    X, y = _clean(rng, n=50)
    trig = triggers.CrossTrigger(strength=0.5, stochastic=True, jitter=0.5)
    a = attacks.backdoor_attack(X, y, trig, 1.0, n_poison=6, seed=11)
    b = attacks.backdoor_attack(X, y, trig, 1.0, n_poison=6, seed=11)
    c = attacks.backdoor_attack(X, y, trig, 1.0, n_poison=6, seed=12)
    assert a == b
    assert a != c


def test_backdoor_attack_one_hot_and_source_filter(rng):
    labels = rng.integers(0, 3, 30)
    Y = np.eye(3)[labels]
    X = rng.standard_normal((30, 9))
    trig = triggers.CrossTrigger(strength=1.0)
    a = attacks.backdoor_attack(X, Y, trig, np.eye(3)[0], n_poison=3, seed=0,
                                 source_filter=lambda X, Y: Y[:, 2] == 1)
    assert np.all(labels[a.meta["source_idx"]] == 2)
    np.testing.assert_array_equal(a.y[a.poison_idx], np.tile([1.0, 0, 0], (3, 1)))
    mask = labels == 1
    b = attacks.backdoor_attack(X, Y, trig, np.eye(3)[0], n_poison=2, seed=0,
                                 source_filter=mask)
    assert np.all(labels[b.meta["source_idx"]] == 1)


@pytest.mark.parametrize("case", ["both", "neither", "too_many", "rate", "mode",
                                  "target_shape", "no_trigger", "filter"])
def test_backdoor_attack_bad_inputs(case, rng):
    X, y = _clean(rng, n=10)
    kw = dict(X=X, y=y, trigger=triggers.CrossTrigger(0.5), target=1.0, n_poison=2)
    if case == "both":
        kw["rate"] = 0.1
    elif case == "neither":
        kw["n_poison"] = None
    elif case == "too_many":
        kw["n_poison"] = int((y != 1.0).sum()) + 1
    elif case == "rate":
        kw.update(n_poison=None, rate=1.5)
    elif case == "mode":
        kw["mode"] = "insert"
    elif case == "target_shape":
        kw["target"] = np.array([1.0, 0.0])
    elif case == "no_trigger":
        kw["trigger"] = None
    elif case == "filter":
        kw["source_filter"] = np.ones(3, dtype=bool)
    with pytest.raises(ValueError):
        attacks.backdoor_attack(**kw)


# ----------------------------------------------------------------- near clones, prototypes

def test_near_clone_attack_is_clone_attack_at_distance_r(rng):
    X, y = _clean(rng, n=12, d=5)
    x0 = rng.standard_normal(5)
    a = attacks.near_clone_attack(X, y, x0, 0.3, 1.0, 4, seed=2, meta={"k": "rbf"})
    zeta = a.poisons()[0][0]
    assert np.linalg.norm(zeta - x0) == pytest.approx(0.3, rel=1e-12)
    np.testing.assert_array_equal(a.poisons()[0], np.repeat(zeta[None], 4, 0))
    np.testing.assert_array_equal(a.clean()[0], X)
    assert a.meta["r"] == 0.3 and a.meta["k"] == "rbf" and a.meta["m"] == 4


@pytest.mark.parametrize("kind", ["prototype", "image"])
def test_prototype_poison_is_the_triggered_non_target_mean(kind, rng):
    X = rng.standard_normal((9, 16))
    y = np.array([1, -1, -1, 1, -1, 1, 1, -1, -1], float)
    trig = triggers.CrossTrigger(strength=0.7)
    z = attacks.prototype_poison(X, y, trig, kind, target=1.0)
    base = X[y < 0].mean(0) if kind == "prototype" else X[1]
    pat = np.zeros((4, 4))
    pat[2, :] = 1.0
    pat[:, 2] = 1.0
    np.testing.assert_allclose(z, base + 0.7 * pat.ravel() / np.linalg.norm(pat), atol=1e-15)
    # the target -1: the non-target points are the +1 ones
    z2 = attacks.prototype_poison(X, y, trig, "prototype", target=-1.0)
    np.testing.assert_allclose(z2, X[y > 0].mean(0) + 0.7 * pat.ravel() / np.linalg.norm(pat))
    with pytest.raises(ValueError, match="kind"):
        attacks.prototype_poison(X, y, trig, "mixture")
    with pytest.raises(ValueError, match="non-target"):
        attacks.prototype_poison(X, np.ones(9), trig)


def test_old_names_are_deprecated_aliases(rng):
    """One release of aliases for the names that moved (README's promise)."""
    X, y = _clean(rng, n=6, d=4)
    for mod, name, new in ((poison, "clone_cluster", attacks.clone_cluster),
                           (poison, "cross_pattern", triggers.cross_pattern),
                           (poison, "patch_trigger", triggers.patch_mask),
                           (artefact, "clone_attack", attacks.clone_attack),
                           (artefact, "backdoor_attack", attacks.backdoor_attack)):
        with pytest.warns(DeprecationWarning, match=name):
            assert getattr(mod, name) is new
    from ntk_poison import penalized
    with pytest.warns(DeprecationWarning, match="fit_penalized"):
        assert flow.fit_penalized is penalized.fit_penalized
    with pytest.raises(AttributeError):
        poison.no_such_name
