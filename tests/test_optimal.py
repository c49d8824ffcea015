"""The optimal invisible clone poison (ntk_poison.attacks.optimal, issue 13).

Oracles: KRR refitted on the concatenated poisoned set (krr.fit), the rank-one law of
theory.clone_law, the curvature detector's dense score on the refitted model, and
central finite differences (tests/oracles/finite_diff.py), all in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import finite_diff

from ntk_poison import kernels, krr, theory
from ntk_poison.attacks import clone_cluster
from ntk_poison.attacks import optimal
from ntk_poison.defences import CurvatureDetector

N, D, C, LAM = 24, 4, 3, 1e-2


@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(3)
    X = rng.uniform(0.0, 1.0, (N, D))
    lab = rng.integers(0, C, N)
    Y = np.eye(C)[lab] - 1.0 / C                         # centred one-hot
    ys = np.where(lab == 0, 1.0, -1.0)
    x_trig = rng.uniform(0.0, 1.0, (3, D))
    zeta = rng.uniform(0.2, 0.8, D)
    k = kernels.rbf(length_scale=0.7)
    return dict(k=k, X=X, ys=ys, Y=Y, x_trig=x_trig, zeta=zeta,
                yt_vec=2.0 * (np.eye(C)[0] - 1.0 / C), x_clean=rng.uniform(0, 1, (12, D)))


def _targets(task, vector):
    return (task["Y"], task["yt_vec"]) if vector else (task["ys"], 1.0)


def _directions():
    """Two fixed random unit directions for directional finite differences."""
    v = np.random.default_rng(11).standard_normal((2, D))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _refit(task, y, yt, zeta, m):
    Xp, yp = clone_cluster(task["X"], y, zeta, yt, m)
    return krr.fit(task["k"], Xp, yp, LAM)


@pytest.mark.parametrize("vector", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_poisoned_outputs_equal_a_refit(task, vector):
    y, yt = _targets(task, vector)
    s = optimal.prepare(task["k"], task["X"], y, LAM)
    for m in (0, 4):
        got = optimal.poisoned_outputs(task["k"], task["X"], y, LAM, task["zeta"], m,
                                       task["x_trig"], y_target=yt, solver=s)
        ref = _refit(task, y, yt, task["zeta"], m).predict(task["x_trig"])
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-9)
    one = optimal.poisoned_outputs(task["k"], task["X"], y, LAM, task["zeta"], 4,
                                   task["x_trig"][0], y_target=yt)       # one input
    np.testing.assert_allclose(np.asarray(one), np.asarray(ref)[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("vector", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_efficacy_gradient_matches_finite_differences_of_the_clone_law(task, vector):
    y, yt = _targets(task, vector)
    k, X, xt, m = task["k"], task["X"], task["x_trig"], 5

    def law_efficacy(z):
        law = theory.clone_law(k, X, y, LAM, z, yt, [m], xt)
        if not vector:
            return float(np.mean(yt * np.asarray(law.delta_f)[0]))
        f = np.asarray(law.f_poisoned)[0]                       # (P, C)
        return float(np.mean(f[:, 0] - f[:, 1:].max(axis=1)))

    s = optimal.prepare(k, X, y, LAM)
    fn = lambda z: jnp.mean(optimal.efficacy(k, X, y, LAM, z, m, xt, y_target=yt,
                                             solver=s))
    np.testing.assert_allclose(float(fn(task["zeta"])), law_efficacy(task["zeta"]),
                               rtol=1e-10, atol=1e-12)
    g = np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(task["zeta"])))
    for v in _directions():
        d_fd = finite_diff.directional_derivative(law_efficacy, task["zeta"], v, h=1e-3)
        assert g @ v == pytest.approx(float(d_fd), rel=1e-6, abs=1e-9)


def _detector_score(task, y, yt, zeta, m):
    model = _refit(task, y, yt, zeta, m)
    return CurvatureDetector(method="dense").spectrum(model, task["x_trig"])[
        "eigenvalues"][:, 0]


@pytest.mark.parametrize("vector, methods", [
    (True, ("dense",)),
    pytest.param(False, ("dense",), marks=pytest.mark.slow),
    pytest.param(True, ("lanczos",), marks=pytest.mark.slow),
    pytest.param(False, ("lanczos",), marks=pytest.mark.slow)])
def test_visibility_equals_the_detector_score_on_the_refit(task, vector, methods):
    y, yt = _targets(task, vector)
    s = optimal.prepare(task["k"], task["X"], y, LAM)
    ref = _detector_score(task, y, yt, task["zeta"], 4)
    for method in methods:
        got = optimal.visibility(task["k"], task["X"], y, LAM, task["zeta"], 4,
                                 task["x_trig"], y_target=yt, method=method, solver=s)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-8, err_msg=method)


@pytest.mark.parametrize("vector, methods, oracle", [
    (False, ("dense",), "refit"),
    pytest.param(False, ("lanczos",), "law", marks=pytest.mark.slow),
    pytest.param(True, ("dense", "lanczos"), "refit", marks=pytest.mark.slow)])
def test_visibility_gradient_matches_finite_differences(task, vector, methods, oracle):
    """Dense (through eigvalsh) and Lanczos (Hellmann-Feynman) gradients against
    central differences of the visibility: of the clone law's values ("law", dense
    eigvalsh, no derivative taken) or of the detector's score on refitted models."""
    y, yt = _targets(task, vector)
    s = optimal.prepare(task["k"], task["X"], y, LAM)
    w = np.array([1.0, 0.5, 2.0])                       # a weighted sum over the points

    def fd_fn(z):
        if oracle == "law":
            return float(w @ np.asarray(optimal.visibility(
                task["k"], task["X"], y, LAM, z, 4, task["x_trig"], y_target=yt,
                solver=s)))
        return float(w @ _detector_score(task, y, yt, z, 4))

    d_fd = [float(finite_diff.directional_derivative(fd_fn, task["zeta"], v, h=1e-3))
            for v in _directions()]
    for method in methods:
        fn = lambda z: w @ optimal.visibility(task["k"], task["X"], y, LAM, z, 4,
                                              task["x_trig"], y_target=yt, method=method,
                                              solver=s)
        g = np.asarray(jax.grad(fn)(jnp.asarray(task["zeta"])))
        np.testing.assert_allclose(g @ _directions().T, d_fd, rtol=1e-6, atol=1e-8,
                                   err_msg=method)


@pytest.mark.slow
def test_clean_threshold_is_the_quantile_of_the_unpoisoned_visibility(task):
    """m = 0 in the rank-one law is the clean model at ridge N lam: its visibility's
    quantile (numpy) equals the detector-based threshold of the refitted clean KRR."""
    y, yt = _targets(task, False)
    x_clean = task["x_clean"]
    thr = optimal.clean_threshold(task["k"], task["X"], y, LAM, x_clean, q=0.9)
    v0 = optimal.visibility(task["k"], task["X"], y, LAM, task["zeta"], 0, x_clean,
                            y_target=yt)
    assert thr == pytest.approx(float(np.quantile(np.asarray(v0), 0.9)), rel=1e-9)


@pytest.mark.parametrize("vector", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_optimiser_is_feasible_projected_and_beats_its_start(task, vector):
    y, yt = _targets(task, vector)
    k, X, xt = task["k"], task["X"], task["x_trig"]
    anchor = np.full(D, 0.05)                           # near the box's edge
    kw = dict(radius=0.3, y_target=yt, ms=(2, 6), steps=8, lr=0.05, box=(0.0, 1.0),
              vis_method="dense")
    free = optimal.optimal_poison(k, X, y, LAM, xt, anchor, threshold=np.inf, **kw)
    assert free.feasible and free.per_m["feasible"].all()
    # unconstrained: at least the clone at the anchor, for every m
    assert np.all(free.per_m["efficacy"] >= free.per_m["efficacy_start"] - 1e-12)
    assert free.per_m["efficacy"].max() > free.per_m["efficacy_start"].max()
    for z in free.per_m["zeta"]:
        assert np.all(np.abs(z - anchor) <= 0.3 + 1e-12)
        assert np.all(z >= 0.0) and np.all(z <= 0.3 + 0.05 + 1e-12)
    # the reported numbers are the law's at the returned point
    eff = optimal.efficacy(k, X, y, LAM, free.zeta, free.m, xt, y_target=yt)
    assert free.efficacy == pytest.approx(float(np.mean(eff)), rel=1e-10)
    # a threshold the anchor meets: the result is feasible and no worse than the anchor
    v_anchor = optimal.visibility(k, X, y, LAM, anchor, 2, xt, y_target=yt)
    thr = 1.0001 * float(np.max(v_anchor))
    con = optimal.optimal_poison(k, X, y, LAM, xt, anchor, threshold=thr,
                                 **dict(kw, ms=(2,)))
    assert con.feasible and np.max(con.visibility) <= thr
    assert con.efficacy >= con.per_m["efficacy_start"][0] - 1e-12
    pen = optimal.optimal_poison(k, X, y, LAM, xt, anchor, threshold=thr,
                                 **dict(kw, ms=(2,), method="penalty", radius=np.inf))
    assert pen.feasible and pen.efficacy >= pen.per_m["efficacy_start"][0] - 1e-12
    assert np.all(pen.zeta >= 0.0) and np.all(pen.zeta <= 1.0)     # the box alone


@pytest.mark.slow
def test_frontier_matches_the_pointwise_functions(task):
    y, yt = _targets(task, False)
    k, X, xt = task["k"], task["X"], task["x_trig"]
    fr = optimal.frontier(k, X, y, LAM, xt, y_target=yt, ms=(1, 5),
                          zetas={"a": task["zeta"], "b": xt[0]}, threshold=1.0,
                          method="dense")
    for name, z in (("a", task["zeta"]), ("b", xt[0])):
        row = fr["placements"][name]
        v = optimal.visibility(k, X, y, LAM, z, 5, xt, y_target=yt)
        np.testing.assert_allclose(row["visibility"][1], np.asarray(v), rtol=1e-10)
        f = np.asarray(_refit(task, y, yt, z, 5).predict(xt))
        assert row["asr"][1] == pytest.approx(np.mean(f > 0))
        assert row["flagged"][1] == pytest.approx(np.mean(np.asarray(v) > 1.0))


@pytest.mark.parametrize("bad, name", [
    (dict(radius=-1.0), "radius"), (dict(radius=np.nan), "radius"),
    (dict(threshold=0.0), "threshold"),
    (dict(ms=()), "ms"), (dict(ms=(0,)), "ms"), (dict(method="sgd"), "method"),
    (dict(box=(1.0, 0.0)), "box"), (dict(anchor=np.zeros(D + 1)), "anchor"),
    (dict(y_target=np.ones(C + 1)), "y_target"), (dict(target_class=C), "target_class"),
    (dict(steps=0), "steps"), (dict(lr=0.0), "lr"), (dict(solver="s"), "solver"),
    (dict(ridge=0.0), "ridge"), (dict(vis_method="power"), "method"),
])
def test_bad_inputs_name_the_argument(task, bad, name):
    y, yt = _targets(task, True)
    kw = dict(radius=0.2, y_target=yt, ms=(2,), threshold=1.0, steps=1,
              anchor=task["zeta"], ridge=LAM)
    kw.update(bad)
    anchor, ridge = kw.pop("anchor"), kw.pop("ridge")
    with pytest.raises(ValueError, match=name):
        optimal.optimal_poison(task["k"], task["X"], y, ridge, task["x_trig"], anchor, **kw)


def test_bad_inputs_of_the_pointwise_functions(task):
    y, yt = _targets(task, False)
    k, X = task["k"], task["X"]
    with pytest.raises(ValueError, match="m"):
        optimal.poisoned_outputs(k, X, y, LAM, task["zeta"], -1, task["x_trig"], y_target=yt)
    with pytest.raises(ValueError, match="zeta"):
        optimal.poisoned_outputs(k, X, y, LAM, task["x_trig"], 1, task["x_trig"],
                                 y_target=yt)
    with pytest.raises(ValueError, match="q"):
        optimal.clean_threshold(k, X, y, LAM, task["x_clean"], q=1.0)
    with pytest.raises(ValueError, match="method"):
        optimal.visibility(k, X, y, LAM, task["zeta"], 1, task["x_trig"], y_target=yt,
                           method="eig")
