"""Tests for ntk_poison.spectra: planted spectra, the closed-form RBF KRR Hessian,
finite differences of numpy loss gradients, the clone-poison GN spike, and Lanczos
against dense up to d = 3072.

Lanczos compiles once per (function structure, shape, k, block size, max_iters,
which); the tests share those where they can (a pytree ``Quadratic``, one KRR shape per
test) to keep the suite short.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ntk_poison import attacks, kernels, krr, spectra  # noqa: E402
from oracles import closed_forms as cf  # noqa: E402
from oracles import finite_diff as fd  # noqa: E402
from oracles.util import cache_size  # noqa: E402


@functools.partial(jax.tree_util.register_dataclass, data_fields=["A"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Quadratic:
    """``f(x) = 1/2 x^T A x`` (Hessian A everywhere); a pytree, so Lanczos compiles once
    per shape, not once per matrix."""

    A: jax.Array

    def __call__(self, x):
        return 0.5 * x @ self.A @ x


def planted(rng, top, d, bulk=(-1.0, 1.0), dtype=np.float64):
    """``A = Q diag(lam) Q^T``, ``top`` first, then a uniform bulk; returns (A, lam, Q)."""
    lam = np.concatenate([np.asarray(top, float), rng.uniform(*bulk, d - len(top))])
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = (Q * lam) @ Q.T
    return jnp.asarray(0.5 * (A + A.T), dtype), lam, Q


def overlaps(vecs, ref):
    """``|<v_i, r_i>|`` row by row (eigenvectors have no sign)."""
    return np.abs(np.sum(np.asarray(vecs) * np.asarray(ref), axis=1))


def assert_same_pairs(vals, vecs, ref_vals, ref_vecs, rtol=1e-6):
    """Eigenvalues to ``rtol`` relative, eigenvectors to ``|<v, q>| >= 1 - rtol``."""
    np.testing.assert_allclose(np.asarray(vals), ref_vals, rtol=rtol, atol=0)
    assert np.all(overlaps(vecs, ref_vecs) > 1 - rtol), overlaps(vecs, ref_vecs)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(vecs), axis=1), 1.0, atol=1e-12)


def numpy_top(H, k, which="LA"):
    w, V = np.linalg.eigh(np.asarray(H))
    order = np.argsort(-(w if which == "LA" else np.abs(w)), kind="stable")[:k]
    return w[order], V[:, order].T


# --------------------------------------------------------------------------- planted

TOP = [10.0, 8.0, 6.0, 5.0, 4.0]


@pytest.mark.parametrize("method", ["dense", "lanczos"])
@pytest.mark.parametrize("d", [50, 300])
def test_planted_spectrum_top5(d, method, rng):
    A, lam, Q = planted(rng, TOP, d)
    x = rng.standard_normal(d)
    vals, vecs, info = spectra.top_eigenpairs(Quadratic(A), x, k=5, method=method,
                                              return_info=True)
    assert vals.shape == (5,) and vecs.shape == (5, d)
    assert_same_pairs(vals, vecs, lam[:5], Q[:, :5].T, rtol=1e-9)
    assert info.converged and info.method == method
    assert np.all(np.asarray(info.residuals) <= 1e-8 * 10.0)
    if method == "lanczos":
        # Matrix-free: a fraction of the d HVPs the dense Hessian needs at d = 300.
        assert info.n_hvp < d or d == 50
        assert 0 < info.iterations <= info.max_iters


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_negative_eigenvalue_which_LA_vs_LM(method, rng):
    d = 50
    A, lam, Q = planted(rng, [-20.0] + TOP[:4], d)  # -20 is the largest in magnitude
    f = Quadratic(A)
    x = np.zeros(d)
    la, la_vecs = spectra.top_eigenpairs(f, x, 5, method, which="LA")
    lm, lm_vecs = spectra.top_eigenpairs(f, x, 5, method, which="LM")
    ref_la, ref_la_vecs = numpy_top(A, 5, "LA")
    np.testing.assert_allclose(np.asarray(la)[:4], TOP[:4], rtol=1e-9)
    assert_same_pairs(la, la_vecs, ref_la, ref_la_vecs, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(lm), [-20.0] + TOP[:4], rtol=1e-9)
    assert overlaps(lm_vecs[:1], Q[:, :1].T)[0] > 1 - 1e-9
    assert np.all(np.diff(np.abs(np.asarray(lm))) <= 0)  # ordered by |value|
    assert np.all(np.diff(np.asarray(la)) <= 0)


def test_all_negative_spectrum_LA_is_least_negative(rng):
    top = [-0.5, -1.0, -1.5, -2.0, -2.5]
    A, lam, Q = planted(rng, top, 50, bulk=(-9.0, -3.0))
    vals, vecs = spectra.top_eigenpairs(Quadratic(A), np.zeros(50), 5, "lanczos")
    assert_same_pairs(vals, vecs, lam[:5], Q[:, :5].T, rtol=1e-9)


def test_float32_keeps_dtype_and_default_tol(rng):
    A, lam, Q = planted(rng, TOP, 50, dtype=np.float32)
    x = np.zeros(50, np.float32)
    vals, vecs, info = spectra.top_eigenpairs(Quadratic(A), x, 5, "lanczos",
                                              return_info=True)
    assert vals.dtype == jnp.float32 and vecs.dtype == jnp.float32
    assert info.converged and info.tol == 1e-4
    np.testing.assert_allclose(np.asarray(vals), lam[:5], rtol=1e-4)


@pytest.mark.parametrize("d,block_size", [(7, 2), (50, None)])
def test_exhausted_krylov_space_low_rank_and_zero_hessian(d, block_size, rng):
    # Rank 3: the Krylov space closes after 3 directions; deflation must restart with
    # fresh vectors and still return exact pairs, zeros included. With d = 7 and
    # blocks of 2 the last block overshoots R^7 (a row is dropped as invalid).
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = jnp.asarray((Q[:, :3] * [3.0, 2.0, 1.0]) @ Q[:, :3].T)
    vals, vecs, info = spectra.top_eigenpairs(Quadratic(A), np.ones(d), 5, "lanczos",
                                              block_size=block_size, return_info=True)
    np.testing.assert_allclose(np.asarray(vals), [3, 2, 1, 0, 0], atol=1e-12)
    assert info.converged
    np.testing.assert_allclose(np.asarray(vecs) @ np.asarray(vecs).T, np.eye(5),
                               atol=1e-10)
    assert np.all(overlaps(vecs[:3], Q[:, :3].T) > 1 - 1e-12)
    z, zv, zinfo = spectra.top_eigenpairs(Quadratic(jnp.zeros((d, d))), np.ones(d), 5,
                                          "lanczos", block_size=block_size,
                                          return_info=True)
    np.testing.assert_allclose(np.asarray(z), 0.0, atol=0)
    assert zinfo.converged
    np.testing.assert_allclose(np.linalg.norm(np.asarray(zv), axis=1), 1.0)
    np.testing.assert_allclose(np.asarray(zv) @ np.asarray(zv).T, np.eye(5), atol=1e-10)


# --------------------------------------------------------------------------- RBF KRR

LS = 1.3


@pytest.fixture
def rbf_model(rng):
    X = rng.standard_normal((30, 8))
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2]
    model = krr.fit(kernels.rbf(LS), X, y, ridge=1e-3)
    x = 0.5 * rng.standard_normal((3, 8))
    return model, X, y, x


def numpy_rbf_hessian(model, x):
    """hess_x f(x) = sum_i alpha_i k(x, x_i) [(x - x_i)(x - x_i)^T / l^4 - I / l^2]."""
    X = np.asarray(model.X)
    alpha = np.asarray(model.alpha)
    diff = x[None, :] - X                                      # (n, d)
    kx = np.exp(-np.sum(diff ** 2, axis=1) / (2 * LS ** 2)) * alpha
    return (np.einsum("n,nd,ne->de", kx, diff, diff) / LS ** 4
            - np.eye(X.shape[1]) * kx.sum() / LS ** 2)


def numpy_loss_grad(model, y0):
    """The loss gradient (f(x) - y0) grad f(x) of RBF KRR in numpy (closed forms)."""
    X = np.asarray(model.X)
    alpha = np.asarray(model.alpha)

    def grad(x):
        f = cf.rbf_gram(x[None], X, LS)[0] @ alpha
        return (f - y0) * cf.rbf_krr_grad(X, alpha, x[None], LS)[0]

    return grad


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_prediction_hessian_matches_closed_form_rbf(rbf_model, method):
    model, X, y, x = rbf_model
    H = numpy_rbf_hessian(model, x[0])
    ref_vals, ref_vecs = numpy_top(H, 3)
    w = np.sort(np.linalg.eigvalsh(H))[::-1]
    assert np.min(-np.diff(w[:4])) > 1e-3 * abs(w[0])  # a clear gap (the test's premise)
    vals, vecs = spectra.top_eigenpairs(model, x[0], k=3, method=method)
    assert_same_pairs(vals, vecs, ref_vals, ref_vecs, rtol=1e-8)


def test_loss_hessian_matches_closed_form_and_finite_differences(rbf_model):
    model, X, y, x = rbf_model
    y0 = np.array([0.3, -1.0, 2.0])
    H = np.asarray(spectra.loss_hessian(model, x, y0))
    assert H.shape == (3, 8, 8)
    alpha = np.asarray(model.alpha)
    for i in range(3):
        f = cf.rbf_gram(x[i:i + 1], X, LS)[0] @ alpha
        g = cf.rbf_krr_grad(X, alpha, x[i:i + 1], LS)[0]
        ref = np.outer(g, g) + (f - y0[i]) * numpy_rbf_hessian(model, x[i])
        np.testing.assert_allclose(H[i], ref, rtol=0, atol=1e-11 * np.abs(ref).max())
        H_fd = fd.jacobian(numpy_loss_grad(model, y0[i]), x[i])
        np.testing.assert_allclose(H[i], H_fd, rtol=0, atol=1e-8 * np.abs(ref).max())
    # A single point with a scalar label gets a batch axis.
    H0 = spectra.loss_hessian(model, x[0], y0[0])
    np.testing.assert_allclose(np.asarray(H0)[0], H[0], rtol=1e-13)


def test_hvp_and_gauss_newton_top(rbf_model, rng):
    model, X, y, x = rbf_model
    v = rng.standard_normal(8)
    Hv = spectra.hvp(model, x[0], v)
    np.testing.assert_allclose(np.asarray(Hv), numpy_rbf_hessian(model, x[0]) @ v,
                               rtol=1e-10)
    lam, u = spectra.gauss_newton_top(model, x[0])
    g = cf.rbf_krr_grad(X, np.asarray(model.alpha), x[:1], LS)[0]
    np.testing.assert_allclose(float(lam), g @ g, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(u), g / np.linalg.norm(g), rtol=1e-10)
    # A flat function: eigenvalue 0 and the zero vector (alignment then refuses it).
    lam0, u0 = spectra.gauss_newton_top(lambda z: jnp.sum(z) * 0.0, x[0])
    assert float(lam0) == 0.0 and not np.any(np.asarray(u0))
    with pytest.raises(ValueError, match="zero vector"):
        spectra.alignment(u0, x[0])


def test_input_fisher_matches_mean_of_fd_outer_products(rbf_model, rng):
    model, X, y, x = rbf_model
    pts = rng.standard_normal((7, 8)) * 0.7
    labels = rng.standard_normal(7)
    F = np.asarray(spectra.input_fisher(model, pts, labels))
    alpha = np.asarray(model.alpha)
    G = []
    for p, lab in zip(pts, labels):
        def loss(z, lab=lab):
            return 0.5 * (cf.rbf_gram(z[None], X, LS)[0] @ alpha - lab) ** 2
        G.append(fd.gradient(loss, p))
    G = np.asarray(G)
    ref = G.T @ G / len(G)
    np.testing.assert_allclose(F, ref, rtol=0, atol=1e-8 * np.abs(ref).max())
    assert F.shape == (8, 8)
    np.testing.assert_allclose(F, F.T, atol=0)
    assert np.linalg.eigvalsh(F).min() > -1e-12 * np.abs(F).max()
    # At one point it is the GN term times the squared residual.
    F1 = np.asarray(spectra.input_fisher(model, pts[0], labels[0]))
    lam, u = spectra.gauss_newton_top(model, pts[0])
    r = float(model.predict(pts[:1])[0]) - labels[0]
    np.testing.assert_allclose(F1, r ** 2 * float(lam) * np.outer(u, u), rtol=1e-10,
                               atol=1e-14)


# --------------------------------------------------------------------------- GN spike

def test_clone_poison_spike_is_the_top_loss_eigenvector(rng):
    """THEORY.md section 2: many clones at zeta, a far target, x0 at distance l."""
    N, d, ls = 40, 10, 1.0
    X = rng.standard_normal((N, d))
    y = np.tanh(X[:, 0])
    zeta = 0.3 * rng.standard_normal(d)
    u = rng.standard_normal(d)
    x0 = zeta + ls * u / np.linalg.norm(u)
    Xp, yp = attacks.clone_cluster(X, y, zeta, 10.0, 50)
    model = krr.fit(kernels.rbf(ls), Xp, yp, ridge=1e-3)
    clean = krr.fit(kernels.rbf(ls), X, y, ridge=1e-3)
    y0 = float(clean.predict(x0[None])[0])  # the clean label at the trigger

    vals, vecs = spectra.top_eigenpairs(spectra.loss_fn(model, y0), x0, k=3,
                                        method="lanczos")
    g = np.asarray(model.input_grad(x0[None]))[0]
    assert float(spectra.alignment(vecs[0], g)) > 0.95
    assert float(spectra.alignment(vecs[0], x0 - zeta)) > 0.95  # points at the poison
    lam_gn, u_gn = spectra.gauss_newton_top(model, x0)
    assert float(spectra.alignment(vecs[0], u_gn)) > 0.95
    # The spike dominates: lambda_1 ~ ||g||^2 + residual * curvature along u.
    resid = float(model.predict(x0[None])[0]) - y0
    Hf = np.asarray(model.input_hessian(x0[None]))[0]
    un = np.asarray(u_gn)
    first_order = float(lam_gn) + resid * un @ Hf @ un
    assert abs(float(vals[0]) - first_order) < 0.05 * float(vals[0])
    assert 0.9 < float(vals[0]) / float(lam_gn) < 1.1
    # Exactly the formula H = g g^T + (f - y) hess f (built from the model) ...
    formula = np.outer(g, g) + resid * Hf
    np.testing.assert_allclose(float(vals[0]), np.linalg.eigvalsh(formula)[-1],
                               rtol=1e-9)
    # ... and the independent oracle: finite differences of the numpy loss gradient.
    alpha = np.asarray(model.alpha)

    def loss_grad(z):
        f = cf.rbf_gram(z[None], Xp, ls)[0] @ alpha
        return (f - y0) * cf.rbf_krr_grad(Xp, alpha, z[None], ls)[0]

    H_fd = fd.jacobian(loss_grad, x0)
    w_fd, V_fd = np.linalg.eigh(0.5 * (H_fd + H_fd.T))
    np.testing.assert_allclose(float(vals[0]), w_fd[-1], rtol=1e-7)
    assert float(spectra.alignment(vecs[0], V_fd[:, -1])) > 1 - 1e-8


# --------------------------------------------------------------------------- scale

def krr_on_cube(rng, n, d):
    X = rng.random((n, d))
    y = rng.standard_normal(n)
    ls = float(np.sqrt(d / 6.0))  # about the median distance of uniform points
    return krr.fit(kernels.rbf(ls), X, y, ridge=1e-3), rng.random(d)


def check_lanczos_matches_dense(fn, x, k=3):
    dv, dvec = spectra.top_eigenpairs(fn, x, k, "dense")
    lv, lvec, info = spectra.top_eigenpairs(fn, x, k, "lanczos", return_info=True)
    assert info.converged
    assert_same_pairs(lv, lvec, np.asarray(dv), np.asarray(dvec), rtol=1e-6)
    return info


def test_lanczos_matches_dense_d784_rbf_loss(rng):
    model, x0 = krr_on_cube(rng, 100, 784)
    info = check_lanczos_matches_dense(spectra.loss_fn(model, 0.3), x0)
    assert info.n_hvp < 784 // 2


@pytest.mark.slow
def test_lanczos_matches_dense_d3072_cifar_shaped(rng):
    X = rng.random((200, 32, 32, 3))
    y = rng.standard_normal(200)
    k = kernels.Kernel(lambda a, b: jnp.exp(-kernels.sq_dists(a, b) / (2 * 512.0)),
                       "rbf_img", (), input_rank=3)
    model = krr.fit(k, X, y, ridge=1e-3)
    x0 = rng.random((32, 32, 3))
    info = check_lanczos_matches_dense(spectra.loss_fn(model, 0.3), x0)
    assert info.n_hvp < 3072 // 10


def test_image_inputs_nt_cnn_lanczos_matches_dense(rng):
    X = rng.standard_normal((20, 8, 8, 1))
    y = rng.standard_normal(20)
    model = krr.fit(kernels.nt_cnn(depth=1, filter_size=3), X, y, ridge=1e-2)
    x0 = rng.standard_normal((8, 8, 1))
    dv, dvec = spectra.top_eigenpairs(model, x0, 3, "dense")
    assert dvec.shape == (3, 64)
    lv, lvec = spectra.top_eigenpairs(model, x0, 3, "lanczos")
    assert_same_pairs(lv, lvec, np.asarray(dv), np.asarray(dvec), rtol=1e-6)
    # The image-shaped direction is flattened by alignment.
    assert float(spectra.alignment(lvec[0], np.asarray(dvec[0]).reshape(8, 8, 1))) > 0.999


def test_image_shaped_loss_hessian_and_fisher(rng):
    # f(z) = sum_ij w_ij z_ij^3 on (4, 4, 2) images: hess f = diag(6 w z), flattened.
    w = rng.standard_normal((4, 4, 2))
    f = lambda z: jnp.sum(jnp.asarray(w) * z ** 3)  # noqa: E731
    x = rng.standard_normal((3, 4, 4, 2))
    y = rng.standard_normal(3)
    H = np.asarray(spectra.loss_hessian(f, x, y))
    assert H.shape == (3, 32, 32)
    for i in range(3):
        g = (3 * w * x[i] ** 2).ravel()
        r = np.sum(w * x[i] ** 3) - y[i]
        ref = np.outer(g, g) + r * np.diag((6 * w * x[i]).ravel())
        np.testing.assert_allclose(H[i], ref, rtol=1e-12, atol=1e-12)
    F = np.asarray(spectra.input_fisher(f, x, y))
    G = np.stack([(np.sum(w * x[i] ** 3) - y[i]) * (3 * w * x[i] ** 2).ravel()
                  for i in range(3)])
    np.testing.assert_allclose(F, G.T @ G / 3, rtol=1e-12, atol=1e-12)


def test_models_of_the_same_shapes_share_one_compilation(rbf_model, rng):
    # A model is passed as a pytree: its arrays are jit arguments, not constants.
    model, X, y, x = rbf_model
    # (The kernel and the ridge are static fields of KRRModel: keep them.)
    other = krr.fit(kernels.rbf(LS), X + 0.1 * rng.standard_normal(X.shape), -y, 1e-3)
    v1, _ = spectra.top_eigenpairs(model, x[1], 3, "lanczos")
    size = cache_size(spectra.lanczos_hessian)
    v2, _ = spectra.top_eigenpairs(other, x[1], 3, "lanczos")
    assert cache_size(spectra.lanczos_hessian) == size
    for m, v in ((model, v1), (other, v2)):
        ref = numpy_top(numpy_rbf_hessian(m, x[1]), 3)[0]
        np.testing.assert_allclose(np.asarray(v), ref, rtol=1e-9)


# --------------------------------------------------------------------------- reports

def test_non_convergence_warns_or_raises(rng):
    A, lam, Q = planted(rng, [10.0, 9.9, 9.8, 9.7, 9.6], 300, bulk=(-9.5, 9.5))
    f = Quadratic(A)
    x = np.zeros(300)
    with pytest.warns(spectra.ConvergenceWarning, match="max_iters=2.*tol"):
        vals, vecs, info = spectra.top_eigenpairs(f, x, 5, "lanczos", max_iters=2,
                                                  return_info=True)
    assert info.converged is False and info.iterations == 2
    assert np.max(np.asarray(info.residuals)) > info.tol * info.scale
    with pytest.raises(spectra.ConvergenceError, match="max_iters"):
        spectra.top_eigenpairs(f, x, 5, "lanczos", max_iters=2, strict=True)
    assert issubclass(spectra.ConvergenceError, ValueError)


def test_same_key_same_output_and_key_independence(rng):
    A, lam, Q = planted(rng, TOP, 300)
    f = Quadratic(A)
    x = np.zeros(300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converges: no warning
        a = spectra.top_eigenpairs(f, x, 5, "lanczos", key=jax.random.PRNGKey(3))
        b = spectra.top_eigenpairs(f, x, 5, "lanczos", key=jax.random.PRNGKey(3))
        c = spectra.top_eigenpairs(f, x, 5, "lanczos", key=7)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    np.testing.assert_allclose(np.asarray(c[0]), np.asarray(a[0]), rtol=1e-10)
    assert np.all(overlaps(c[1], a[1]) > 1 - 1e-9)


def test_traceable_under_jit_and_vmap():
    A = jnp.diag(jnp.arange(20.0))
    f = lambda z: 0.5 * z @ A @ z + jnp.sum(z ** 4)  # noqa: E731  (hess: A + 12 z^2)
    xs = jnp.stack([jnp.full(20, 0.1), jnp.full(20, 0.2)])
    ref = np.arange(20.0)[::-1][:3] + 12 * np.asarray(xs)[:, :1] ** 2
    lz = jax.vmap(lambda z: spectra.top_eigenpairs(f, z, 3, "lanczos")[0])(xs)
    dn = jax.jit(jax.vmap(lambda z: spectra.top_eigenpairs(f, z, 3, "dense")[0]))(xs)
    np.testing.assert_allclose(np.asarray(lz), ref, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(dn), ref, rtol=1e-12)


# --------------------------------------------------------------------------- alignment

def test_alignment_known_values():
    e1, e2 = np.eye(3)[0], np.eye(3)[1]
    assert float(spectra.alignment(e1, e1)) == 1.0
    assert float(spectra.alignment(e1, e2)) == 0.0
    np.testing.assert_allclose(float(spectra.alignment(e1, e1 + e2)), 0.5, rtol=1e-15)
    np.testing.assert_allclose(float(spectra.alignment(-3 * e1, e1 + e2)), 0.5,
                               rtol=1e-15)
    v = np.array([1.0, 2.0, 2.0, 0.0])  # |v| = 3; cos = 1/3 with e_0
    np.testing.assert_allclose(float(spectra.alignment(v, np.eye(4)[0].reshape(2, 2, 1))),
                               1 / 9, rtol=1e-14)
    with pytest.raises(ValueError, match="zero vector"):
        spectra.alignment(e1, np.zeros(3))
    with pytest.raises(ValueError, match="entries"):
        spectra.alignment(e1, np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        spectra.alignment(e1, np.array([np.nan, 0, 0]))


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "`k`"),
    (dict(k=11), "`k`"),
    (dict(k=2.0), "`k`"),
    (dict(method="arnoldi"), "`method`"),
    (dict(which="SA"), "`which`"),
    (dict(method="lanczos", tol=-1.0), "`tol`"),
    (dict(method="lanczos", max_iters=0), "`max_iters`"),
    (dict(method="lanczos", block_size=11), "`block_size`"),
    (dict(method="lanczos", max_iters=1, block_size=1, k=2), "max_iters"),
    (dict(method="lanczos", key="seed"), "`key`"),
])
def test_top_eigenpairs_bad_arguments(kwargs, match):
    f = Quadratic(jnp.eye(10))
    with pytest.raises(ValueError, match=match):
        spectra.top_eigenpairs(f, np.ones(10), **kwargs)


def test_bad_inputs_are_value_errors(rbf_model):
    model, X, y, x = rbf_model
    f = Quadratic(jnp.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        spectra.top_eigenpairs(f, np.array([1.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="scalar"):
        spectra.top_eigenpairs(lambda z: z * 2.0, np.ones(4), k=1)  # vector output
    with pytest.raises(ValueError, match="could not be evaluated"):
        spectra.top_eigenpairs(f, np.ones(5), k=1)  # wrong shape for fn
    with pytest.raises(ValueError, match="shape"):
        spectra.top_eigenpairs(model, np.ones(5), k=1)  # model trained on d = 8
    with pytest.raises(ValueError, match="scalar"):
        spectra.top_eigenpairs(f, np.float64(1.0))
    with pytest.raises(ValueError, match="rows"):
        spectra.loss_hessian(model, x, np.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        spectra.input_fisher(model, np.ones((3, 5)), np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        spectra.loss_hessian(model, x, np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="callable"):
        spectra.loss_fn(3.0, 0.0)
    with pytest.raises(ValueError, match="scalar label"):
        spectra.loss_fn(model, np.zeros(2))
    with pytest.raises(ValueError, match="same shape|`v`"):
        spectra.hvp(f, np.ones(4), np.ones(3))


# --------------------------------------------------------------------------- vector outputs

def test_loss_of_a_vector_output_is_summed_over_outputs(rbf_model, rng):
    """1/2 |f(x) - y|^2 for a C-output model: its input Hessian is
    sum_c [g_c g_c^T + (f_c - y_c) hess f_c] (numpy closed forms per output); Lanczos
    and loss_hessian agree with it; the input Fisher is mean J^T r r^T J; the poison
    spike of two models is sigma_max(J_p - J_c)^2."""
    _, X, _, x = rbf_model
    C = 3
    Y = np.eye(C)[rng.integers(0, C, len(X))] - 1.0 / C
    model = krr.fit(kernels.rbf(LS), X, Y, ridge=1e-3)
    alpha = np.asarray(model.alpha)
    y0 = np.eye(C)[[0, 2, 1]] - 1.0 / C                                  # (3, C) labels
    refs, grads = [], []
    for i in range(3):
        f = cf.rbf_gram(x[i:i + 1], X, LS)[0] @ alpha                    # (C,)
        J = np.stack([cf.rbf_krr_grad(X, alpha[:, c], x[i:i + 1], LS)[0] for c in range(C)])
        Hf = np.stack([cf.rbf_krr_hessian(X, alpha[:, c], x[i:i + 1], LS)[0]
                       for c in range(C)])
        refs.append(J.T @ J + np.einsum("c,cde->de", f - y0[i], Hf))
        grads.append(J.T @ (f - y0[i]))
    H = np.asarray(spectra.loss_hessian(model, x, y0))
    np.testing.assert_allclose(H, np.stack(refs), rtol=0, atol=1e-11 * np.abs(refs).max())
    vals, _ = spectra.top_eigenpairs(spectra.loss_fn(model, y0[0]), x[0], k=2,
                                     method="lanczos", tol=1e-10)
    np.testing.assert_allclose(np.asarray(vals), np.linalg.eigvalsh(refs[0])[::-1][:2],
                               rtol=1e-8)
    G = np.stack(grads)
    np.testing.assert_allclose(np.asarray(spectra.input_fisher(model, x, y0)), G.T @ G / 3,
                               rtol=1e-10, atol=1e-14)
    other = krr.fit(kernels.rbf(LS), X, np.roll(Y, 1, axis=1), ridge=1e-3)
    sp = spectra.poison_spike(model, other, x[0])
    dJ = (np.asarray(model.input_jacobian(x[:1]))[0]
          - np.asarray(other.input_jacobian(x[:1]))[0])
    assert sp["spike_x0"] == pytest.approx(np.linalg.eigvalsh(dJ.T @ dJ)[-1], rel=1e-10)
    with pytest.raises(ValueError, match="output shape"):
        spectra.loss_fn(model, np.zeros(C + 1))
    with pytest.raises(ValueError, match="outputs of shape"):
        spectra.loss_hessian(model, x, np.zeros((3, 2)))
