"""Tests for ntk_poison.theory: the clone-poison laws against refits, closed forms,
finite differences and dense solves."""

from __future__ import annotations

from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from ntk_poison import attacks, kernels, krr, linalg, theory
from oracles import arccos
from oracles import closed_forms as cf
from oracles import finite_diff as fd
from oracles.util import eps

N = 20
LAM = 1e-3


@pytest.fixture
def clean(rng):
    X = rng.standard_normal((N, 3))
    y = np.tanh(X[:, 0] - X[:, 2]) + 0.1 * rng.standard_normal(N)
    zeta = 0.5 * rng.standard_normal(3)
    x0 = attacks.near_clone(zeta, 0.3, seed=1)
    return X, y, zeta, x0


def refit_effect(k, X, y, lam, zeta, y_t, m, x0):
    """Delta f(x0) by two explicit fits at the same absolute ridge (N+m)*lam."""
    n_clean = len(X)
    Xp, yp = attacks.clone_cluster(X, y, zeta, y_t, m)
    poisoned = krr.fit(k, Xp, yp, ridge=lam)
    clean_model = krr.fit(k, X, y, ridge=lam * (n_clean + m) / n_clean)
    x0 = np.atleast_2d(x0) if k.input_rank == 1 else x0
    return poisoned, clean_model, (np.asarray(poisoned.predict(x0))
                                   - np.asarray(clean_model.predict(x0)))


# --------------------------------------------------------------------------- scalar laws

GAIN_GRID = [(m, n, lam, kzz) for m in (0, 1, 2, 7, 150) for n in (10, 57)
             for lam in (1e-3, 0.5) for kzz in (1.0, 0.3)] + [(3, 12, 0.0, 0.7)]


@pytest.mark.parametrize("m,n,lam,kzz", GAIN_GRID)
def test_poison_gain_matches_exact_rational_formula(m, n, lam, kzz):
    exact = Fraction(m) / (Fraction(n) * Fraction(lam) + Fraction(m) * Fraction(kzz))
    got = float(theory.poison_gain(m, n, lam, kzz))
    assert abs(Fraction(got) - exact) <= 4 * eps(np.float64) * abs(exact)
    y_t, k0 = -0.8, 0.9
    np.testing.assert_allclose(float(theory.efficacy_law(m, n, lam, k0, kzz, y_t)),
                               float(Fraction(y_t) * Fraction(k0) * exact), rtol=1e-15)


def test_poison_gain_vectorised_over_m_and_saturates():
    ms = np.array([0, 1, 10, 10 ** 6])
    S = np.asarray(theory.poison_gain(ms, 100, 1e-2, 0.5))
    ref = [float(Fraction(int(m)) / (100 * Fraction(1e-2) + int(m) * Fraction(0.5)))
           for m in ms]
    np.testing.assert_allclose(S, ref, rtol=1e-15)
    assert np.all(np.diff(S) > 0) and S[-1] < 1 / 0.5


@pytest.mark.parametrize("args", [(-1, 10, 1e-3, 1.0), (1, 0, 1e-3, 1.0), (1, 10, -1e-3, 1.0),
                                  (1, 10, 1e-3, 0.0), (np.array([1, -2]), 10, 1e-3, 1.0)])
def test_poison_gain_bad_inputs(args):
    with pytest.raises(ValueError):
        theory.poison_gain(*args)


def test_spike_law_and_visibility_threshold_closed_forms():
    np.testing.assert_allclose(theory.spike_law(np.array([0.5, -2.0]), 3.0), [0.75, 12.0])
    thr = theory.visibility_threshold(2.0, 8.0)
    np.testing.assert_allclose(thr, 0.5, rtol=1e-15)
    # at the threshold the spike equals the clean curvature
    np.testing.assert_allclose(theory.spike_law(thr, 8.0), 2.0, rtol=1e-15)
    with pytest.raises(ValueError):
        theory.visibility_threshold(1.0, 0.0)
    with pytest.raises(ValueError):
        theory.visibility_threshold(-1.0, 1.0)


# --------------------------------------------------------------------------- exact law vs refit

KERNELS = {
    "rbf": lambda: kernels.rbf(1.0),
    "linear": lambda: kernels.linear(bias=0.5),
    "nt_fc": lambda: kernels.nt_fc(depth=2, W_std=1.5, b_std=0.1),
    "matern52": lambda: kernels.matern52(1.2),
}
MS = [0, 1, 5 * N, 20 * N]       # shifts (N+m) lam fall in three Neumann-series groups


@pytest.mark.parametrize("name", list(KERNELS))
def test_clone_effect_matches_refitting(name, clean):
    X, y, zeta, x0 = clean
    k = KERNELS[name]()
    y_t = -1.5
    shifts = (N + np.asarray(MS)) * LAM
    assert len(linalg._shift_groups(shifts)) >= 3      # several Neumann-series groups
    got = np.asarray(theory.clone_effect(k, X, y, LAM, zeta, y_t, MS, x0))
    assert got.shape == (len(MS),)
    ref = np.array([refit_effect(k, X, y, LAM, zeta, y_t, m, x0)[2][0] for m in MS])
    assert got[0] == 0.0 and ref[0] == 0.0
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)
    assert np.max(np.abs(ref)) > 1e-2                   # the poison has an effect to match


@pytest.mark.parametrize("name", ["rbf", "matern52", "nt_fc"])
def test_clone_law_fields_and_gradients_match_refit(name, clean, rng):
    X, y, zeta, _ = clean
    k = KERNELS[name]()
    x0 = zeta + 0.4 * rng.standard_normal((4, 3))       # a batch of P = 4 triggers
    ms = [0, 1, 5 * N]
    law = theory.clone_law(k, X, y, LAM, zeta, 1.0, ms, x0, with_grad=True)
    assert law.delta_f.shape == (3, 4) and law.f_clean.shape == (3, 4)
    assert law.kt.shape == (3, 4) and law.k0.shape == (4,)
    assert law.alpha_p.shape == (3,) and law.s2.shape == (3,)
    assert law.grad_poisoned.shape == (3, 4, 3) and law.grad_clean.shape == (3, 4, 3)
    np.testing.assert_array_equal(law.ms, ms)
    np.testing.assert_array_equal(law.n, N + np.asarray(ms))
    for i, m in enumerate(ms):
        poisoned, clean_model, delta = refit_effect(k, X, y, LAM, zeta, 1.0, m, x0)
        np.testing.assert_allclose(np.asarray(law.delta_f[i]), delta, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(np.asarray(law.f_clean[i]),
                                   np.asarray(clean_model.predict(x0)), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(np.asarray(law.f_poisoned[i]),
                                   np.asarray(poisoned.predict(x0)), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(np.asarray(law.grad_clean[i]),
                                   np.asarray(clean_model.input_grad(x0)), rtol=1e-8,
                                   atol=1e-10)
        np.testing.assert_allclose(np.asarray(law.grad_poisoned[i]),
                                   np.asarray(poisoned.input_grad(x0)), rtol=1e-8, atol=1e-10)
        if m > 0:
            # each clone's dual weight in the refit is alpha_p
            np.testing.assert_allclose(np.asarray(poisoned.alpha[N:]), float(law.alpha_p[i]),
                                       rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(np.asarray(law.fc_zeta[i]),
                                       float(clean_model.predict(zeta[None])[0]), rtol=1e-8,
                                       atol=1e-10)


def test_clone_law_rbf_against_numpy_dense_solves(clean):
    """Fully independent of krr: poisoned and clean systems solved with np.linalg.solve,
    gradients from the closed form of the RBF KRR gradient."""
    X, y, zeta, x0 = clean
    ls, y_t, ms = 0.9, 2.0, [0, 1, 4, 60]
    law = theory.clone_law(kernels.rbf(ls), X, y, LAM, zeta, y_t, ms, x0, with_grad=True)
    assert law.delta_f.shape == (4,) and law.grad_poisoned.shape == (4, 3)
    k0 = cf.rbf_gram(x0[None], zeta[None], ls)[0, 0]
    np.testing.assert_allclose(float(law.k0), k0, rtol=1e-14)
    np.testing.assert_allclose(float(law.k_zz), 1.0, rtol=1e-15)
    np.testing.assert_allclose(np.asarray(law.grad_k0), -(x0 - zeta) / ls ** 2 * k0,
                               rtol=1e-12, atol=1e-15)
    for i, m in enumerate(ms):
        Xp = np.concatenate([X, np.repeat(zeta[None], m, 0)])
        yp = np.concatenate([y, np.full(m, y_t)])
        ap = cf.krr_alpha(cf.rbf_gram(Xp, Xp, ls), yp, LAM)
        ac = cf.krr_alpha(cf.rbf_gram(X, X, ls), y, LAM * (N + m) / N)
        fp = cf.rbf_gram(x0[None], Xp, ls)[0] @ ap
        fc = cf.rbf_gram(x0[None], X, ls)[0] @ ac
        np.testing.assert_allclose(float(law.delta_f[i]), fp - fc, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.asarray(law.grad_poisoned[i]),
                                   cf.rbf_krr_grad(Xp, ap, x0[None], ls)[0], rtol=1e-9,
                                   atol=1e-12)


def _image_rbf(length_scale):
    """An RBF kernel on images (input_rank 3), as a custom Kernel."""
    def fn(a, b):
        return jnp.exp(-kernels.sq_dists(a, b) / (2.0 * length_scale ** 2))
    return kernels.Kernel(fn, name="image_rbf", input_rank=3)


def test_clone_law_on_images_matches_numpy_and_refit(rng):
    """Image-shaped inputs (N, H, W, C): shapes keep the image axes, values match a
    dense numpy solve of the flattened problem."""
    X = rng.standard_normal((10, 4, 4, 1))
    y = rng.standard_normal(10)
    zeta = rng.standard_normal((4, 4, 1))
    x0 = zeta + 0.2 * rng.standard_normal((4, 4, 1))
    ls, lam, m = 3.0, 1e-2, 4
    k = _image_rbf(ls)
    law = theory.clone_law(k, X, y, lam, zeta, 1.0, [0, m], x0, with_grad=True)
    assert law.delta_f.shape == (2,) and law.grad_poisoned.shape == (2, 4, 4, 1)
    Xf, zf, xf = X.reshape(10, -1), zeta.reshape(1, -1), x0.reshape(1, -1)
    Xp = np.concatenate([Xf, np.repeat(zf, m, 0)])
    yp = np.concatenate([y, np.ones(m)])
    ap = cf.krr_alpha(cf.rbf_gram(Xp, Xp, ls), yp, lam)
    ac = cf.krr_alpha(cf.rbf_gram(Xf, Xf, ls), y, lam * (10 + m) / 10)
    ref = cf.rbf_gram(xf, Xp, ls)[0] @ ap - cf.rbf_gram(xf, Xf, ls)[0] @ ac
    np.testing.assert_allclose(float(law.delta_f[1]), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(law.grad_poisoned[1]).reshape(-1),
                               cf.rbf_krr_grad(Xp, ap, xf, ls)[0], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_clone_law_on_images_with_nt_cnn(rng):
    X = rng.standard_normal((8, 6, 6, 1))
    y = rng.standard_normal(8)
    zeta = rng.standard_normal((6, 6, 1))
    x0 = zeta + 0.1 * rng.standard_normal((6, 6, 1))
    k = kernels.nt_cnn(depth=1, W_std=1.5, b_std=0.1)
    law = theory.clone_law(k, X, y, 1e-2, zeta, 1.0, [0, 3], x0, with_grad=True)
    assert law.delta_f.shape == (2,) and law.grad_poisoned.shape == (2, 6, 6, 1)
    poisoned, _, delta = refit_effect(k, X, y, 1e-2, zeta, 1.0, 3, x0[None])
    np.testing.assert_allclose(float(law.delta_f[1]), delta[0], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.asarray(law.grad_poisoned[1]),
                               np.asarray(poisoned.input_grad(x0[None]))[0], rtol=1e-7,
                               atol=1e-10)


def test_clone_law_batch_of_poisons_matches_single_poison_laws_and_refits(clean, rng):
    """A batch of Q alternative poisons: one law per zeta, shapes (M, Q, P)."""
    X, y, zeta, _ = clean
    k = kernels.rbf(1.0)
    zetas = np.stack([zeta, 0.5 * rng.standard_normal(3), 0.5 * rng.standard_normal(3)])
    x0 = rng.standard_normal((4, 3))
    ms = [0, 1, 5 * N]
    law = theory.clone_law(k, X, y, LAM, zetas, 1.0, ms, x0, with_grad=True)
    assert law.delta_f.shape == (3, 3, 4) and law.alpha_p.shape == (3, 3)
    assert law.grad_poisoned.shape == (3, 3, 4, 3) and law.grad_k0.shape == (3, 4, 3)
    for q in range(3):
        one = theory.clone_law(k, X, y, LAM, zetas[q], 1.0, ms, x0, with_grad=True)
        np.testing.assert_allclose(np.asarray(law.delta_f[:, q]), np.asarray(one.delta_f),
                                   rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(law.grad_poisoned[:, q]),
                                   np.asarray(one.grad_poisoned), rtol=1e-12, atol=1e-14)
        _, _, delta = refit_effect(k, X, y, LAM, zetas[q], 1.0, 5 * N, x0)
        np.testing.assert_allclose(np.asarray(law.delta_f[2, q]), delta, rtol=1e-8,
                                   atol=1e-10)


def test_clone_effect_batch_of_triggers_has_shape_m_by_p(clean, rng):
    X, y, zeta, _ = clean
    x0 = rng.standard_normal((5, 3))
    out = theory.clone_effect(kernels.rbf(1.0), X, y, LAM, zeta, 1.0, [0, 1, 2], x0)
    assert out.shape == (3, 5)
    single = theory.clone_effect(kernels.rbf(1.0), X, y, LAM, zeta, 1.0, [0, 1, 2], x0[2])
    assert single.shape == (3,)
    np.testing.assert_allclose(np.asarray(out[:, 2]), np.asarray(single), rtol=1e-13)


def test_ridge_zero_with_positive_definite_kernel(clean):
    X, y, zeta, x0 = clean
    k = kernels.rbf(0.7)
    law = theory.clone_law(k, X, y, 0.0, zeta, 1.0, [0, 1, 4], x0)
    assert np.all(np.isfinite(np.asarray(law.delta_f)))
    assert float(law.delta_f[0]) == 0.0
    _, _, delta = refit_effect(k, X, y, 0.0, zeta, 1.0, 1, x0)
    np.testing.assert_allclose(float(law.delta_f[1]), delta[0], rtol=1e-7, atol=1e-9)
    # with no ridge every m >= 1 interpolates (zeta, y_t): the effect no longer grows
    np.testing.assert_allclose(float(law.delta_f[2]), float(law.delta_f[1]), rtol=1e-9)
    # and the poisoned interpolant passes through the poison label at zeta
    at_zeta = theory.clone_law(k, X, y, 0.0, zeta, 1.0, [1], zeta)
    np.testing.assert_allclose(float(at_zeta.f_poisoned[0]), 1.0, rtol=1e-9)


# --------------------------------------------------------------------------- spike factor

@pytest.mark.parametrize("r", [0.0, 0.05, 0.7, 2.5])
@pytest.mark.parametrize("ls", [0.5, 1.0, 3.0])
def test_spike_factor_rbf_is_r2_over_l4(r, ls, rng):
    x0 = rng.standard_normal(4)
    zeta = attacks.near_clone(x0, r, seed=2) if r > 0 else x0.copy()
    R = float(theory.spike_factor(kernels.rbf(ls, variance=2.0), x0, zeta))
    # at r = 0 the gradient is a difference of equal terms: zero up to a few ulp
    np.testing.assert_allclose(R, r ** 2 / ls ** 4, rtol=1e-12, atol=1e-28)


SPIKE_ORACLES = {
    "matern52": (lambda: kernels.matern52(1.3, variance=0.7),
                 lambda a, b: cf.matern52_gram(a[None], b[None], 1.3, 0.7)[0, 0]),
    "linear": (lambda: kernels.linear(bias=0.5, scale=2.0),
               lambda a, b: cf.linear_gram(a[None], b[None], 0.5, 2.0)[0, 0]),
    "nt_fc": (lambda: kernels.nt_fc(depth=2, W_std=1.5, b_std=0.1),
              lambda a, b: arccos.relu_ntk(a[None], b[None], 2, 1.5, 0.1)[0, 0]),
}


@pytest.mark.parametrize("r", [0.1, 1.0])
@pytest.mark.parametrize("name", list(SPIKE_ORACLES))
def test_spike_factor_other_kernels_against_finite_differences(name, r, rng):
    make, k_np = SPIKE_ORACLES[name]
    x0 = rng.standard_normal(3)
    zeta = attacks.near_clone(x0, r, seed=5)
    R = float(theory.spike_factor(make(), x0, zeta))
    g = fd.gradient(lambda v: k_np(v, zeta), x0, h=1e-3 * min(1.0, r))
    ref = float(np.sum(g ** 2) / k_np(x0, zeta) ** 2)
    np.testing.assert_allclose(R, ref, rtol=1e-7)


def test_spike_factor_on_images_and_bad_shapes(rng):
    k = kernels.rbf(2.0)
    x0 = rng.standard_normal((3, 3, 1))
    zeta = x0 + 0.2 * rng.standard_normal((3, 3, 1))
    r2 = float(np.sum((x0 - zeta) ** 2))
    np.testing.assert_allclose(float(theory.spike_factor(k, x0.reshape(-1), zeta.reshape(-1))),
                               r2 / 16.0, rtol=1e-12)
    with pytest.raises(ValueError):
        theory.spike_factor(k, np.zeros(3), np.zeros(4))


# --------------------------------------------------------------------------- paper's law

def test_tight_cluster_law_holds_when_clean_data_are_far(rng):
    """With every clean point >> l away from zeta and x0, the cross terms vanish
    (k ~ exp(-450)), and the paper's y_t k0 S(m) equals the refitted effect."""
    ls, y_t = 1.0, 1.3
    X = rng.standard_normal((N, 3))
    y = rng.standard_normal(N)
    zeta = np.array([30.0, 0.0, 0.0])
    x0 = attacks.near_clone(zeta, 0.4, seed=0)
    k = kernels.rbf(ls)
    k0 = float(cf.rbf_gram(x0[None], zeta[None], ls)[0, 0])
    for m in (1, 5, 50):
        law = float(theory.efficacy_law(m, N + m, LAM, k0, 1.0, y_t))
        _, _, delta = refit_effect(k, X, y, LAM, zeta, y_t, m, x0)
        np.testing.assert_allclose(law, delta[0], rtol=1e-10)


def test_tight_cluster_law_fails_when_clean_data_are_close(rng):
    """Same attack, but clean points already labelled y_t sit around zeta: the clean
    model predicts ~y_t there, so the exact effect is small while the paper's law
    (which ignores the clean data) still predicts y_t k0 S(m). The previous test can
    therefore fail."""
    ls, y_t = 1.0, 1.3
    zeta = np.array([0.0, 0.0, 0.0])
    X = zeta + 0.5 * rng.standard_normal((N, 3))
    y = np.full(N, y_t)
    x0 = attacks.near_clone(zeta, 0.4, seed=0)
    k = kernels.rbf(ls)
    k0 = float(cf.rbf_gram(x0[None], zeta[None], ls)[0, 0])
    for m in (1, 5, 50):
        law = float(theory.efficacy_law(m, N + m, LAM, k0, 1.0, y_t))
        _, _, delta = refit_effect(k, X, y, LAM, zeta, y_t, m, x0)
        exact = float(theory.clone_effect(k, X, y, LAM, zeta, y_t, [m], x0)[0])
        np.testing.assert_allclose(exact, delta[0], rtol=1e-8)
        assert abs(law - delta[0]) > 0.5 * abs(law)


# --------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("case", ["ms_negative", "ms_fraction", "ms_empty", "ms_2d",
                                  "zeta_rank", "zeta_shape", "y_2d", "y_rows", "y_target_vec",
                                  "ridge_negative", "x0_shape", "X_nan"])
def test_clone_law_bad_inputs_are_value_errors(case, clean):
    X, y, zeta, x0 = clean
    args = dict(k=kernels.rbf(1.0), X=X, y=y, ridge=LAM, zeta=zeta, y_target=1.0,
                ms=[0, 1], x0=x0)
    if case == "ms_negative":
        args["ms"] = [1, -1]
    elif case == "ms_fraction":
        args["ms"] = [1, 2.5]
    elif case == "ms_empty":
        args["ms"] = []
    elif case == "ms_2d":
        args["ms"] = [[1, 2]]
    elif case == "zeta_rank":
        args["zeta"] = np.zeros((2, 2, 3))
    elif case == "zeta_shape":
        args["zeta"] = np.zeros(4)
    elif case == "y_2d":
        args["y"] = np.stack([y, y], axis=1)
    elif case == "y_rows":
        args["y"] = y[:-1]
    elif case == "y_target_vec":
        args["y_target"] = np.array([1.0, 0.0])
    elif case == "ridge_negative":
        args["ridge"] = -1e-3
    elif case == "x0_shape":
        args["x0"] = np.zeros(5)
    elif case == "X_nan":
        args["X"] = np.where(np.arange(N)[:, None] == 3, np.nan, X)
    with pytest.raises(ValueError):
        theory.clone_law(**args)
    with pytest.raises(ValueError):
        theory.clone_effect(*args.values())


# --------------------------------------------------------------------------- the paper's law, decomposed

@pytest.mark.parametrize("name", ["rbf", "nt_fc"])
def test_efficacy_law_factors_multiply_to_the_paper_over_refit_ratio(name, rng):
    """(k0/kt) (y_t/(y_t - fc)) ((n lam + m s2)/(n lam + m k_zz)) is exactly
    y_t k0 S(m) / Delta f: an identity, checked against Delta f from two refits and
    S from poison_gain; clean data near zeta make every factor differ from 1."""
    X = rng.standard_normal((N, 3))
    y = np.tanh(X[:, 0]) + 0.1 * rng.standard_normal(N)
    zeta = X[0] + 0.2 * rng.standard_normal(3)
    x0 = attacks.near_clone(zeta, 0.3, seed=2)
    k = KERNELS[name]()
    y_t, lam, ms = 1.4, 0.05, [1, 60]
    # the ReLU NTK's k(x, x) carries an O(sqrt(eps)) round-off (test_kernels), which the
    # refit's Gram and the law's diagonal see differently: 1e-8 there, 1e-10 for RBF
    rtol = 1e-10 if name == "rbf" else 1e-8
    law = theory.clone_law(k, X, y, lam, zeta, y_t, ms, x0)
    fac = theory.efficacy_law_factors(law, lam, y_t)
    k0 = float(k(jnp.asarray(x0[None]), jnp.asarray(zeta[None]))[0, 0])
    kzz = float(k(jnp.asarray(zeta[None]), jnp.asarray(zeta[None]))[0, 0])
    for i, m in enumerate(ms):
        delta = refit_effect(k, X, y, lam, zeta, y_t, m, x0)[2][0]
        paper = float(theory.efficacy_law(m, N + m, lam, k0, kzz, y_t))
        np.testing.assert_allclose(fac["product"][i], paper / delta, rtol=rtol)
        cov = theory.posterior_covariance(k, X, (N + m) * lam, zeta, x0)
        np.testing.assert_allclose(fac["k0_over_kt"][i], k0 / cov["kt"], rtol=rtol)
    for key in ("k0_over_kt", "target_over_residual", "s2_term"):
        assert np.all(np.abs(fac[key] - 1) > 1e-4), key
    assert fac["product"].shape == (len(ms),)


def test_posterior_covariance_spike_is_the_exact_spike_over_delta_f_squared(clean):
    """||grad Delta f||^2 = R_k(kt) Delta f^2 (grad Delta f / Delta f = grad kt / kt):
    the clone law's gradient (shifted solves) against a direct Cholesky solve and
    autodiff of kt, and grad kt against finite differences of the numpy RBF kt."""
    X, y, zeta, x0 = clean
    k = kernels.rbf(1.1)
    for m in (1, 30):
        law = theory.clone_law(k, X, y, LAM, zeta, -1.0, [m], x0, with_grad=True)
        cov = theory.posterior_covariance(k, X, (N + m) * LAM, zeta, x0)
        spike = float(np.sum(np.asarray(law.grad_delta[0]) ** 2))
        np.testing.assert_allclose(spike, cov["R_kt"] * float(law.delta_f[0]) ** 2,
                                   rtol=1e-9)
        np.testing.assert_allclose(cov["kt"], float(law.kt[0]), rtol=1e-10)
        A = cf.rbf_gram(X, X, 1.1) + (N + m) * LAM * np.eye(N)
        v = np.linalg.solve(A, cf.rbf_gram(X, zeta[None], 1.1)[:, 0])
        kt_np = lambda a: (cf.rbf_gram(a[None], zeta[None], 1.1)[0, 0]  # noqa: E731
                           - cf.rbf_gram(a[None], X, 1.1)[0] @ v)
        np.testing.assert_allclose(cov["grad_kt"], fd.gradient(kt_np, x0), rtol=1e-7,
                                   atol=1e-11)
    with pytest.raises(ValueError, match="shift"):
        theory.posterior_covariance(k, X, 0.0, zeta, x0)
    with pytest.raises(ValueError, match="law"):
        theory.efficacy_law_factors("not a law", LAM, 1.0)


def test_spike_value_is_r_k_of_kt_at_every_m(clean):
    """spike_value's R_k(kt) = spike / Delta f^2 equals the direct solve's R_k(kt) at the
    first and last m, and its factors are efficacy_law_factors'."""
    X, y, zeta, x0 = clean
    k = kernels.rbf(1.1)
    ms = np.array([0, 1, 5, 30])
    law = theory.clone_law(k, X, y, LAM, zeta, -1.0, ms, x0, with_grad=True)
    spike = (np.asarray(law.grad_delta).reshape(len(ms), -1) ** 2).sum(1)
    sv = theory.spike_value(k, X, LAM, zeta, x0, ms, law, spike, -1.0)
    assert list(sv["R_kt_ms"]) == [1, 5, 30] and list(sv["R_kt_direct"]["ms"]) == [1, 30]
    for m, r in zip((1, 30), sv["R_kt_direct"]["R_kt"]):
        cov = theory.posterior_covariance(k, X, (N + m) * LAM, zeta, x0)
        np.testing.assert_allclose(r, cov["R_kt"], rtol=1e-12)
        np.testing.assert_allclose(sv["R_kt"][list(sv["R_kt_ms"]).index(m)], cov["R_kt"],
                                   rtol=1e-9)
    np.testing.assert_allclose(sv["law_factors"]["product"],
                               theory.efficacy_law_factors(law, LAM, -1.0)["product"])

# --------------------------------------------------------------------------- vector targets

def test_clone_law_with_vector_targets_matches_multi_output_refits(clean, rng):
    """The rank-one law is linear in y: with centred one-hot targets (N, C) and a vector
    poison label every output follows it; checked against multi-output refits (dense
    scipy solves of the (N+m)-point system, krr.fit_clones, itself checked against
    krr.fit in test_krr): values, the clones' dual weights, f_clean at zeta, input
    Jacobians."""
    X, _, zeta, _ = clean
    C = 4
    Y = np.eye(C)[rng.integers(0, C, N)] - 1.0 / C
    yt = np.eye(C)[1] - 1.0 / C
    k = KERNELS["rbf"]()
    Kb = krr.clone_gram(k, X, zeta)
    x0 = zeta + 0.4 * rng.standard_normal((3, 3))
    ms = [0, 2, 3 * N]
    law = theory.clone_law(k, X, Y, LAM, zeta, yt, ms, x0, with_grad=True)
    assert law.delta_f.shape == (3, 3, C) and law.f_clean.shape == (3, 3, C)
    assert law.alpha_p.shape == (3, C) and law.kt.shape == (3, 3)
    assert law.grad_poisoned.shape == (3, 3, C, 3)
    for i, m in enumerate(ms):
        poisoned = krr.fit_clones(k, Kb, X, Y, zeta, yt, m, LAM)
        clean_model = krr.fit_clean(k, Kb, X, Y, zeta, LAM * (N + m), LAM)
        delta = np.asarray(poisoned.predict(x0)) - np.asarray(clean_model.predict(x0))
        np.testing.assert_allclose(np.asarray(law.delta_f[i]), delta, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(np.asarray(law.f_poisoned[i]),
                                   np.asarray(poisoned.predict(x0)), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(np.asarray(law.grad_poisoned[i]),
                                   np.asarray(poisoned.input_jacobian(x0)), rtol=1e-8,
                                   atol=1e-10)
        np.testing.assert_allclose(np.asarray(law.grad_clean[i]),
                                   np.asarray(clean_model.input_jacobian(x0)), rtol=1e-8,
                                   atol=1e-10)
        # the merged clone row carries m alpha_p (zero at m = 0)
        np.testing.assert_allclose(np.asarray(poisoned.alpha[N]),
                                   m * np.asarray(law.alpha_p[i]) if m else 0.0,
                                   rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(np.asarray(law.fc_zeta[i]),
                                   np.asarray(clean_model.predict(zeta[None])[0]),
                                   rtol=1e-8, atol=1e-10)
    # every output moves along the one posterior covariance kt(x0, zeta): rank one
    np.testing.assert_allclose(np.asarray(law.delta_f[-1]),
                               np.outer(law.kt[-1], ms[-1] * np.asarray(law.alpha_p[-1])),
                               rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="y_target"):
        theory.clone_law(k, X, Y, LAM, zeta, 1.0, ms, x0)
