"""Tests for ntk_poison.linalg: the solvers on matrix-vector products, each against numpy
or scipy (dense eigh, dense solves), in float64 and float32."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ntk_poison import _validate, flow, linalg, spectra
from oracles import closed_forms as cf
from oracles.util import eps, rel_err


def _planted(rng, top, d, bulk=(-1.0, 1.0)):
    """A symmetric matrix with eigenvalues ``top`` and a uniform bulk, and its pairs."""
    lam = np.r_[np.asarray(top, float), rng.uniform(*bulk, d - len(top))]
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (Q * lam) @ Q.T, lam, Q


# --------------------------------------------------------------------------- shared pieces

def test_one_convergence_class_and_one_default_tol():
    assert spectra.ConvergenceWarning is linalg.ConvergenceWarning
    assert spectra.ConvergenceError is linalg.ConvergenceError
    with pytest.warns(DeprecationWarning):
        assert flow.ConvergenceWarning is linalg.ConvergenceWarning
    assert issubclass(linalg.ConvergenceError, ValueError)
    assert _validate.default_tol(np.float64) == 1e-8
    assert _validate.default_tol(np.float32) == 1e-4


def test_sign_fix_and_matrix_of(rng):
    V = rng.standard_normal((3, 2, 7))
    F = np.asarray(linalg.sign_fix(jnp.asarray(V)))
    idx = np.argmax(np.abs(V), axis=-1)
    assert np.all(np.take_along_axis(F, idx[..., None], -1) > 0)
    np.testing.assert_array_equal(np.abs(F), np.abs(V))
    A = rng.standard_normal((6, 6))
    np.testing.assert_array_equal(np.asarray(linalg.matrix_of(lambda v: jnp.asarray(A) @ v,
                                                              6, jnp.float64)), A)


# --------------------------------------------------------------------------- eigsh

@pytest.mark.parametrize("which", ["LA", "LM"])
def test_eigsh_matches_numpy_eigh(which, rng):
    top = [5.0, -4.5, 4.0, 3.5] if which == "LM" else [5.0, 4.0, 3.5, 3.0]
    A, lam, Q = _planted(rng, top, 80)
    Aj = jnp.asarray(A)
    vals, vecs, info = linalg.eigsh(lambda v: Aj @ v, 80, 4, which=which, return_info=True)
    order = np.argsort(-np.abs(lam) if which == "LM" else -lam)[:4]
    np.testing.assert_allclose(np.asarray(vals), lam[order], rtol=1e-9)
    for i, j in enumerate(order):
        assert abs(float(np.asarray(vecs[i]) @ Q[:, j])) == pytest.approx(1.0, abs=1e-8)
    assert info.converged and info.tol == 1e-8
    res = np.linalg.norm(np.asarray(vecs) @ A - np.asarray(vals)[:, None] * np.asarray(vecs),
                         axis=1)
    np.testing.assert_allclose(np.asarray(info.residuals), res, atol=1e-12)


def test_eigsh_float32_and_bad_inputs(rng):
    A, lam, _ = _planted(rng, [6.0, 5.0], 40)
    Aj = jnp.asarray(A, jnp.float32)
    vals, _ = linalg.eigsh(lambda v: Aj @ v, 40, 2, dtype=jnp.float32)
    assert vals.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(vals), lam[:2], rtol=1e-4)
    with pytest.raises(ValueError, match="matvec"):
        linalg.eigsh(A, 40, 2)
    with pytest.raises(ValueError, match="`k`"):
        linalg.eigsh(lambda v: Aj @ v, 40, 41)
    with pytest.raises(ValueError, match="which"):
        linalg.eigsh(lambda v: Aj @ v, 40, 2, which="SM")


def test_eigsh_warns_or_raises_without_convergence(rng):
    A, _, _ = _planted(rng, [10.0, 9.99, 9.98], 300, bulk=(-9.9, 9.9))
    Aj = jnp.asarray(A)
    f = lambda v: Aj @ v  # noqa: E731
    with pytest.warns(linalg.ConvergenceWarning, match="max_iters"):
        linalg.eigsh(f, 300, 3, max_iters=4)
    with pytest.raises(linalg.ConvergenceError):
        linalg.eigsh(f, 300, 3, max_iters=4, strict=True)


# --------------------------------------------------------------------------- CG

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cg_matches_a_dense_solve(dtype, rng):
    K = cf.rbf_gram(*(2 * [rng.standard_normal((40, 3))]), 1.0) + 0.1 * np.eye(40)
    b = rng.standard_normal((40, 2))
    Kj = jnp.asarray(K, dtype)
    x, info = linalg.cg(lambda v: Kj @ v, b.astype(dtype), precond=np.diag(K))
    ref = np.linalg.solve(K, b)
    assert x.dtype == dtype and info["converged"]
    tol = _validate.default_tol(dtype)
    assert rel_err(x, ref) < 10 * tol * np.linalg.cond(K) + 100 * eps(dtype)
    x1, _ = linalg.cg(lambda v: Kj @ v, b[:, 0].astype(dtype))       # a vector rhs
    assert x1.shape == (40,)
    np.testing.assert_allclose(np.asarray(x1), np.asarray(x)[:, 0], rtol=50 * tol, atol=50 * tol)


def test_cg_reports_non_convergence_and_bad_inputs(rng):
    K = cf.rbf_gram(*(2 * [rng.standard_normal((60, 2))]), 1.0) + 1e-6 * np.eye(60)
    Kj = jnp.asarray(K)
    with pytest.warns(linalg.ConvergenceWarning, match="CG stopped"):
        _, info = linalg.cg(lambda v: Kj @ v, np.ones(60), maxiter=3)
    assert not info["converged"] and info["iterations"] == 3
    with pytest.raises(linalg.ConvergenceError):
        linalg.cg(lambda v: Kj @ v, np.ones(60), maxiter=3, strict=True)
    with pytest.raises(ValueError, match="precond"):
        linalg.cg(lambda v: Kj @ v, np.ones(60), precond=-np.ones(60))
    with pytest.raises(ValueError, match="`b`"):
        linalg.cg(lambda v: Kj @ v, np.ones((60, 2, 2)))


# --------------------------------------------------------------------------- Newton-LM

def test_newton_lm_reaches_the_closed_form_minimiser(rng):
    """phi(u) = 1/2 |u - t|^2: J(c) = 1/2 |G c - t|^2 + lam/2 c^T G c, minimised at
    (G + lam I) c = t for G positive definite."""
    import jax
    B = rng.standard_normal((12, 12))
    G = B @ B.T / 12 + 0.2 * np.eye(12)
    t = rng.standard_normal((12, 2))
    lam = 0.3
    tj = jnp.asarray(t)
    obj = lambda u: 0.5 * jnp.sum((u - tj) ** 2)  # noqa: E731
    run = jax.jit(linalg.newton_lm, static_argnums=0)
    c, it, g, g0, conv, stalled = run(obj, jnp.asarray(G), jnp.asarray(lam),
                                      jnp.zeros((12, 2)), jnp.asarray(1e-12), 50)
    np.testing.assert_allclose(np.asarray(c), np.linalg.solve(G + lam * np.eye(12), t),
                               rtol=1e-10, atol=1e-12)
    assert bool(conv) and int(it) <= 3 and float(g) <= 1e-12 * float(g0)


# --------------------------------------------------------------------------- direct solves

def test_cholesky_solve_and_its_error(rng):
    B = rng.standard_normal((8, 8))
    A = B @ B.T + np.eye(8)
    b = rng.standard_normal(8)
    np.testing.assert_allclose(np.asarray(linalg.cholesky_solve(jnp.asarray(A), b)),
                               np.linalg.solve(A, b), rtol=1e-12)
    with pytest.raises(ValueError, match="the test matrix is not positive definite"):
        linalg.cholesky_solve(-jnp.asarray(A), b, what="the test matrix")


def test_shifted_solve_takes_a_matvec(rng):
    B = rng.standard_normal((10, 10))
    K = B @ B.T / 10
    rhs = rng.standard_normal((10, 1))
    Kj = jnp.asarray(K)
    out = np.asarray(linalg.shifted_solve(lambda v: Kj @ v, jnp.asarray(rhs), [0.1, 0.12]))
    for i, mu in enumerate([0.1, 0.12]):
        np.testing.assert_allclose(out[i], np.linalg.solve(K + mu * np.eye(10), rhs),
                                   rtol=1e-10)


# --------------------------------------------------------------------------- shifted solves

def _psd(rng, n, rank=None):
    B = rng.standard_normal((n, rank or n))
    return B @ B.T / (rank or n)


def test_shifted_solve_several_groups_matches_dense_solves(rng):
    K = cf.rbf_gram(*(2 * [rng.standard_normal((25, 2))]), 1.0)
    rhs = rng.standard_normal((25, 3))
    shifts = [1e-3, 1.3e-3, 2e-3, 5e-3, 0.03, 0.1, 0.25, 1.0, 10.0, 100.0]
    assert len(linalg._shift_groups(np.asarray(shifts))) >= 4
    out = np.asarray(linalg.shifted_solve(jnp.asarray(K), jnp.asarray(rhs), shifts))
    assert out.shape == (len(shifts), 25, 3)
    for i, mu in enumerate(shifts):
        ref = np.linalg.solve(K + mu * np.eye(25), rhs)
        cond = np.linalg.cond(K + mu * np.eye(25))
        assert rel_err(out[i], ref) < 20 * eps(np.float64) * cond


@pytest.mark.parametrize("shift", [0.0, 0.37])
def test_shifted_solve_single_shift(shift, rng):
    K = _psd(rng, 15) + 0.5 * np.eye(15)          # PD, so shift 0 is allowed
    rhs = rng.standard_normal((15, 2))
    out = np.asarray(linalg.shifted_solve(K, rhs, [shift]))
    assert out.shape == (1, 15, 2)
    np.testing.assert_allclose(out[0], np.linalg.solve(K + shift * np.eye(15), rhs),
                               rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype,shifts", [
    (np.float64, [1e-8, 1.4e-8, 2.5e-8]),
    (np.float32, [0.01, 0.02, 0.029]),
])
def test_shifted_solve_small_shifts_of_singular_kernel(dtype, shifts, rng):
    """A rank-deficient K with small shifts: the Neumann terms (K + mu0 I)^-j grow like
    mu0^-j and overflowed before the series was rescaled (NaN output)."""
    K = _psd(rng, 20, rank=4)
    rhs = rng.standard_normal((20, 2))
    out = np.asarray(linalg.shifted_solve(K.astype(dtype), rhs.astype(dtype), shifts))
    assert out.dtype == dtype and np.all(np.isfinite(out))
    for i, mu in enumerate(shifts):
        A = K + mu * np.eye(20)
        assert rel_err(out[i], np.linalg.solve(A, rhs)) < 50 * eps(dtype) * np.linalg.cond(A)


def test_shifted_solve_errors(rng):
    K = _psd(rng, 6, rank=2)
    with pytest.raises(ValueError):
        linalg.shifted_solve(K, np.ones((6, 1)), [-1.0])
    with pytest.raises(ValueError, match="positive definite"):
        linalg.shifted_solve(-np.eye(6), np.ones((6, 1)), [0.5])


