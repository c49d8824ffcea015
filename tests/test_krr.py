"""Tests for ntk_poison.krr against direct numpy solves, closed-form RBF derivatives,
finite differences and scikit-learn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_poison import kernels, krr
from oracles import closed_forms as cf
from oracles import finite_diff as fd
from oracles.util import eps, rel_err


@pytest.fixture
def data(rng):
    X = rng.standard_normal((30, 3))
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] + 0.1 * rng.standard_normal(30)
    x = rng.standard_normal((9, 3))
    return X, y, x


# --------------------------------------------------------------------------- predictions

@pytest.mark.parametrize("ridge", [1e-4, 1e-2, 0.3])
@pytest.mark.parametrize("length_scale", [0.6, 1.5])
def test_rbf_prediction_matches_numpy_solve(data, length_scale, ridge):
    X, y, x = data
    model = krr.fit(kernels.rbf(length_scale), X, y, ridge=ridge)
    alpha = cf.krr_alpha(cf.rbf_gram(X, X, length_scale), y, ridge)
    ref = cf.rbf_gram(x, X, length_scale) @ alpha
    # error of a solve ~ eps * cond(K + n lam I) <= eps * (n + n lam) / (n lam)
    cond = (len(X) + len(X) * ridge) / (len(X) * ridge)
    tol = 50 * eps(np.float64) * cond
    np.testing.assert_allclose(np.asarray(model.alpha), alpha, rtol=0,
                               atol=tol * np.max(np.abs(alpha)))
    np.testing.assert_allclose(np.asarray(model.predict(x)), ref, rtol=0,
                               atol=tol * max(1.0, np.max(np.abs(ref))))
    assert model.n == 30 and model.ridge == ridge and model.scalar_output


@pytest.mark.parametrize("ridge", [1e-3, 0.1])
@pytest.mark.parametrize("length_scale", [0.8, 2.0])
def test_rbf_prediction_matches_sklearn_kernel_ridge(data, length_scale, ridge):
    from sklearn.kernel_ridge import KernelRidge

    X, y, x = data
    n = len(X)
    sk = KernelRidge(alpha=n * ridge, kernel="rbf", gamma=1.0 / (2 * length_scale ** 2))
    sk.fit(X, y)
    model = krr.fit(kernels.rbf(length_scale), X, y, ridge=ridge)
    np.testing.assert_allclose(np.asarray(model.predict(x)), sk.predict(x), rtol=1e-9,
                               atol=1e-10)


@pytest.mark.parametrize("name,params,oracle", [
    ("matern52", {"length_scale": 1.1}, cf.matern52_gram),
    ("linear", {"bias": 0.5, "scale": 2.0}, cf.linear_gram),
])
def test_other_kernels_prediction_matches_numpy_solve(data, name, params, oracle):
    X, y, x = data
    model = krr.fit(kernels.get(name, **params), X, y, ridge=1e-2)
    ref = cf.krr_predict(oracle, X, y, 1e-2, x, **params)
    np.testing.assert_allclose(np.asarray(model.predict(x)), ref, rtol=1e-10, atol=1e-11)


def test_prediction_in_batches_equals_unbatched(data, rng):
    X, y, _ = data
    x = rng.standard_normal((11, 3))
    model = krr.fit(kernels.rbf(1.0), X, y, ridge=1e-2)
    ref = cf.krr_predict(cf.rbf_gram, X, y, 1e-2, x, length_scale=1.0)
    np.testing.assert_allclose(np.asarray(model.predict(x, batch_size=4)), ref, rtol=1e-11,
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(model.input_grad(x, batch_size=3)),
                               cf.rbf_krr_grad(X, np.asarray(model.alpha), x, 1.0),
                               rtol=1e-11, atol=1e-12)


def test_multi_output_predict_shape_and_per_column_fits(data, rng):
    X, y, x = data
    Y = np.stack([y, np.cos(X[:, 1]), rng.standard_normal(30)], axis=1)     # (n, 3)
    k = kernels.rbf(1.2)
    model = krr.fit(k, X, Y, ridge=1e-2)
    F = np.asarray(model.predict(x))
    assert F.shape == (9, 3) and not model.scalar_output
    for j in range(3):
        col = np.asarray(krr.fit(k, X, Y[:, j], ridge=1e-2).predict(x))
        np.testing.assert_allclose(F[:, j], col, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(F[:, j], cf.krr_predict(cf.rbf_gram, X, Y[:, j], 1e-2, x,
                                                           length_scale=1.2),
                                   rtol=1e-10, atol=1e-11)
    J = np.asarray(model.input_jacobian(x))
    assert J.shape == (9, 3, 3)
    for j in range(3):
        np.testing.assert_allclose(J[:, j, :], cf.rbf_krr_grad(X, np.asarray(model.alpha)[:, j],
                                                               x, 1.2), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="input_jacobian"):
        model.input_grad(x)
    with pytest.raises(ValueError):
        model.input_hessian(x)


# --------------------------------------------------------------------------- derivatives

@pytest.mark.parametrize("length_scale", [0.7, 1.8])
def test_input_grad_matches_closed_form_and_finite_differences(data, length_scale):
    X, y, x = data
    model = krr.fit(kernels.rbf(length_scale), X, y, ridge=1e-2)
    alpha = cf.krr_alpha(cf.rbf_gram(X, X, length_scale), y, 1e-2)
    G = np.asarray(model.input_grad(x))
    assert G.shape == x.shape
    np.testing.assert_allclose(G, cf.rbf_krr_grad(X, alpha, x, length_scale), rtol=1e-9,
                               atol=1e-11)
    f = lambda v: float(model.predict(jnp.asarray(v)[None])[0])  # noqa: E731
    for p in range(3):
        np.testing.assert_allclose(G[p], fd.gradient(f, x[p]), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("length_scale", [0.7, 1.8])
def test_input_hessian_matches_closed_form_and_finite_differences(data, length_scale):
    X, y, x = data
    model = krr.fit(kernels.rbf(length_scale), X, y, ridge=1e-2)
    alpha = cf.krr_alpha(cf.rbf_gram(X, X, length_scale), y, 1e-2)
    H = np.asarray(model.input_hessian(x))
    assert H.shape == (9, 3, 3)
    np.testing.assert_allclose(H, cf.rbf_krr_hessian(X, alpha, x, length_scale), rtol=1e-9,
                               atol=1e-10)
    np.testing.assert_allclose(H, np.swapaxes(H, 1, 2), rtol=0, atol=1e-12)
    g = lambda v: np.asarray(model.input_grad(jnp.asarray(v)[None])[0])  # noqa: E731
    for p in range(2):
        np.testing.assert_allclose(H[p], fd.jacobian(g, x[p]), rtol=1e-7, atol=1e-9)
    # batched evaluation agrees
    np.testing.assert_allclose(np.asarray(model.input_hessian(x, batch_size=2)), H,
                               rtol=1e-13, atol=1e-14)


def test_matern52_input_derivatives_match_finite_differences_of_numpy_oracle(data):
    X, y, x = data
    ls = 1.3
    model = krr.fit(kernels.matern52(ls), X, y, ridge=1e-2)
    alpha = cf.krr_alpha(cf.matern52_gram(X, X, ls), y, 1e-2)
    f = lambda v: float(cf.matern52_gram(np.asarray(v)[None], X, ls)[0] @ alpha)  # noqa
    G = np.asarray(model.input_grad(x[:2]))
    H = np.asarray(model.input_hessian(x[:2]))
    for p in range(2):
        np.testing.assert_allclose(G[p], fd.gradient(f, x[p]), rtol=1e-7, atol=1e-9)
        hess_fd = fd.jacobian(lambda v: fd.gradient(f, v, h=1e-3), x[p], h=1e-2)
        np.testing.assert_allclose(H[p], hess_fd, rtol=1e-5, atol=1e-6)


def test_image_inputs_with_nt_cnn_grad_has_image_shape_and_matches_fd(rng):
    X = rng.standard_normal((6, 8, 8, 1))
    y = rng.standard_normal(6)
    x = rng.standard_normal((2, 8, 8, 1))
    model = krr.fit(kernels.nt_cnn(depth=1, W_std=1.5, b_std=0.1), X, y, ridge=1e-2)
    F = np.asarray(model.predict(x))
    assert F.shape == (2,)
    G = np.asarray(model.input_grad(x))
    assert G.shape == (2, 8, 8, 1)
    coords = [0, 27, 63]
    for p in range(2):
        f = lambda v: float(model.predict(jnp.asarray(v)[None])[0])  # noqa: E731
        np.testing.assert_allclose(G[p].reshape(-1)[coords],
                                   fd.gradient(f, x[p], h=1e-4, coords=coords),
                                   rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- dtypes

def test_float32_run_stays_float32_and_matches_float64_oracle(data):
    X, y, x = data
    ridge = 1e-2
    model = krr.fit(kernels.rbf(1.0), X.astype(np.float32), y.astype(np.float32), ridge)
    assert model.alpha.dtype == jnp.float32 and model.X.dtype == jnp.float32
    F = model.predict(x.astype(np.float32))
    G = model.input_grad(x.astype(np.float32))
    assert F.dtype == jnp.float32 and G.dtype == jnp.float32
    alpha = cf.krr_alpha(cf.rbf_gram(X, X, 1.0), y, ridge)
    cond = (len(X) + len(X) * ridge) / (len(X) * ridge)
    tol = 10 * eps(np.float32) * cond                      # ~1.2e-4
    assert rel_err(F, cf.rbf_gram(x, X, 1.0) @ alpha) < tol
    assert rel_err(G, cf.rbf_krr_grad(X, alpha, x, 1.0)) < tol
    # ...and float64 is far more accurate: the tolerance really is dtype-aware
    F64 = krr.fit(kernels.rbf(1.0), X, y, ridge).predict(x)
    assert rel_err(F64, cf.rbf_gram(x, X, 1.0) @ alpha) < 10 * eps(np.float64) * cond


def test_integer_inputs_are_promoted_to_float(rng):
    X = rng.integers(-3, 4, size=(12, 2))
    y = rng.standard_normal(12)
    model = krr.fit(kernels.rbf(2.0), X, y, ridge=1e-2)
    assert jnp.issubdtype(model.X.dtype, jnp.floating)
    ref = cf.krr_predict(cf.rbf_gram, X.astype(float), y, 1e-2, X[:3].astype(float),
                         length_scale=2.0)
    np.testing.assert_allclose(np.asarray(model.predict(X[:3])), ref, rtol=1e-10)


# --------------------------------------------------------------------------- errors

def _bad_fit_cases(X, y):
    Xnan = X.copy()
    Xnan[3, 1] = np.nan
    yinf = y.copy()
    yinf[5] = np.inf
    return {
        "rows_mismatch": (X, y[:-1], 1e-3, "rows"),
        "nan_in_X": (Xnan, y, 1e-3, "NaN"),
        "inf_in_y": (X, yinf, 1e-3, "NaN or inf"),
        "negative_ridge": (X, y, -1e-3, ">= 0"),
        "integer_y": (X, np.arange(len(y)), 1e-3, "dtype"),
        "y_3d": (X, y[:, None, None], 1e-3, "dimensions"),
        "X_1d": (X[:, 0], y, 1e-3, "batch"),
        "empty": (X[:0], y[:0], 1e-3, "empty"),
    }


@pytest.mark.parametrize("case", ["rows_mismatch", "nan_in_X", "inf_in_y", "negative_ridge",
                                  "integer_y", "y_3d", "X_1d", "empty"])
def test_fit_bad_inputs_are_value_errors(data, case):
    X, y, _ = data
    Xb, yb, ridge, match = _bad_fit_cases(X, y)[case]
    with pytest.raises(ValueError, match=match):
        krr.fit(kernels.rbf(1.0), Xb, yb, ridge=ridge)


def test_fit_rejects_non_kernel():
    with pytest.raises(ValueError, match="Kernel"):
        krr.fit(lambda a, b: a @ b.T, np.zeros((3, 2)), np.zeros(3))


def test_non_positive_definite_custom_kernel_is_value_error(data):
    X, y, _ = data
    negative = kernels.Kernel(lambda a, b: -(a @ b.T) - 1.0, name="negative_linear")
    with pytest.raises(ValueError, match="positive definite"):
        krr.fit(negative, X, y, ridge=1e-3)


def test_duplicate_points_with_zero_ridge_is_value_error(data):
    X, y, _ = data
    Xd = np.concatenate([X, X[:2]])
    yd = np.concatenate([y, y[:2] + 1.0])
    with pytest.raises(ValueError, match="positive definite"):
        krr.fit(kernels.rbf(1.0), Xd, yd, ridge=0.0)
    # the same data are fine with a ridge, and zero ridge is fine without duplicates
    krr.fit(kernels.rbf(1.0), Xd, yd, ridge=1e-3)
    model = krr.fit(kernels.rbf(1.0), X[:8] * 3, y[:8], ridge=0.0)
    np.testing.assert_allclose(np.asarray(model.predict(X[:8] * 3)), y[:8], rtol=1e-8,
                               atol=1e-9)


def test_memory_budget_is_enforced(data, monkeypatch):
    X, y, x = data
    model = krr.fit(kernels.rbf(1.0), X, y, ridge=1e-2)
    monkeypatch.setenv("NTK_POISON_MEMORY_BUDGET", "1000")      # 3*30*30*8 bytes > 1000
    with pytest.raises(ValueError, match="memory budget"):
        krr.fit(kernels.rbf(1.0), X, y, ridge=1e-2)
    monkeypatch.setenv("NTK_POISON_MEMORY_BUDGET", "50")        # 9*3*3*8 bytes > 50
    with pytest.raises(ValueError, match="memory budget"):
        model.input_hessian(x)
    monkeypatch.setenv("NTK_POISON_MEMORY_BUDGET", str(10 ** 9))
    krr.fit(kernels.rbf(1.0), X, y, ridge=1e-2)


def test_predict_rejects_wrong_input_space(data):
    X, y, _ = data
    model = krr.fit(kernels.rbf(1.0), X, y, ridge=1e-2)
    with pytest.raises(ValueError, match="same input space"):
        model.predict(np.zeros((2, 4)))
    with pytest.raises(ValueError):
        model.predict(np.full((2, 3), np.nan))
    with pytest.raises(ValueError):
        model.predict(np.zeros((2, 3)), batch_size=0)


# --------------------------------------------------------------------------- jax transforms

def test_jit_over_a_function_calling_the_kernel_on_tracers(data):
    X, y, x = data
    k = kernels.rbf(1.1)

    @jax.jit
    def krr_predict(Xt, yt, xq):
        K = k(Xt, Xt)
        alpha = jnp.linalg.solve(K + Xt.shape[0] * 1e-2 * jnp.eye(Xt.shape[0]), yt)
        return k(xq, Xt) @ alpha

    out = krr_predict(jnp.asarray(X), jnp.asarray(y), jnp.asarray(x))
    ref = cf.krr_predict(cf.rbf_gram, X, y, 1e-2, x, length_scale=1.1)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-10, atol=1e-11)


def test_model_is_a_pytree_and_passes_through_jit(data):
    X, y, x = data
    model = krr.fit(kernels.rbf(1.0), X, y, ridge=1e-2)
    leaves, treedef = jax.tree_util.tree_flatten(model)
    assert len(leaves) == 2
    assert leaves[0] is model.X and leaves[1] is model.alpha
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.kernel == model.kernel and rebuilt.ridge == model.ridge
    out = jax.jit(lambda mdl, xq: mdl.predict(xq))(model, jnp.asarray(x))
    ref = cf.krr_predict(cf.rbf_gram, X, y, 1e-2, x, length_scale=1.0)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-10, atol=1e-11)
    # a tree_map over the leaves acts on X and alpha only
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, model)
    np.testing.assert_allclose(np.asarray(doubled.alpha), 2 * np.asarray(model.alpha))


def test_as_function_is_the_one_input_prediction(data):
    X, y, x = data
    ls = 1.4
    model = krr.fit(kernels.rbf(ls), X, y, ridge=1e-2)
    alpha = cf.krr_alpha(cf.rbf_gram(X, X, ls), y, 1e-2)
    f = model.as_function()
    v = f(jnp.asarray(x[0]))
    assert np.ndim(v) == 0
    np.testing.assert_allclose(float(v), cf.rbf_gram(x[:1], X, ls)[0] @ alpha, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(f))(jnp.asarray(x))),
                               cf.rbf_gram(x, X, ls) @ alpha, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(f))(jnp.asarray(x[1]))),
                               cf.rbf_krr_grad(X, alpha, x[1:2], ls)[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.hessian(f))(jnp.asarray(x[2]))),
                               cf.rbf_krr_hessian(X, alpha, x[2:3], ls)[0], rtol=1e-9,
                               atol=1e-10)
    Y = np.stack([y, -2 * y], axis=1)
    fv = krr.fit(kernels.rbf(ls), X, Y, ridge=1e-2).as_function()
    np.testing.assert_allclose(np.asarray(fv(jnp.asarray(x[0]))),
                               float(v) * np.array([1.0, -2.0]), rtol=1e-10)


# --------------------------------------------------------------------------- all-to-one

def test_multi_output_matches_sklearn_kernel_ridge_and_clone_fits(data, rng):
    """Multi-output KRR (one-hot-like targets (n, C)) against scikit-learn's
    multi-output KernelRidge, and ``fit_clones`` / ``clone_model`` with a vector
    target row against a plain refit on the stacked set."""
    from sklearn.kernel_ridge import KernelRidge

    X, _, x = data
    n, C, ls, lam = len(X), 4, 1.3, 1e-2
    Y = np.eye(C)[rng.integers(0, C, n)] - 1.0 / C                       # centred one-hot
    sk = KernelRidge(alpha=n * lam, kernel="rbf", gamma=1.0 / (2 * ls ** 2)).fit(X, Y)
    k = kernels.rbf(ls)
    model = krr.fit(k, X, Y, ridge=lam)
    np.testing.assert_allclose(np.asarray(model.predict(x)), sk.predict(x), rtol=1e-9,
                               atol=1e-10)
    zeta, yt, m = rng.standard_normal(3), np.eye(C)[2] - 1.0 / C, 7
    merged = krr.fit_clones(k, krr.clone_gram(k, X, zeta), X, Y, zeta, yt, m, lam)
    ref = krr.fit(k, np.vstack([X, np.repeat(zeta[None], m, 0)]),
                  np.vstack([Y, np.repeat(yt[None], m, 0)]), ridge=lam)
    assert merged.alpha.shape == (n + 1, C)
    np.testing.assert_allclose(np.asarray(merged.predict(x)), np.asarray(ref.predict(x)),
                               rtol=1e-9, atol=1e-11)
    # a scalar poison weight is broadcast over the outputs
    cm = krr.clone_model(k, X, np.asarray(model.alpha), 0.0, zeta, lam)
    np.testing.assert_allclose(np.asarray(cm.predict(x)), sk.predict(x), rtol=1e-9,
                               atol=1e-10)
