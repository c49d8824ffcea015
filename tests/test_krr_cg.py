"""Large-n KRR by preconditioned CG (krr.fit(solver="cg"), ntk_poison.gram, the
low-rank preconditioner of ntk_poison.linalg, clone_law(solver="cg")).

Oracles: numpy (the RBF Gram matrix from its formula and ``np.linalg.solve``), the
Woodbury identity checked against an explicit inverse, and the dense Cholesky paths
(themselves tested against numpy/scipy in test_krr.py and test_theory.py).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_poison import gram, kernels, krr, linalg, spectra, theory
from ntk_poison.defences.curvature import CurvatureDetector

LS = 1.5


def rbf_np(A, B, ls=LS):
    d2 = (A ** 2).sum(1)[:, None] + (B ** 2).sum(1)[None] - 2 * A @ B.T
    return np.exp(-np.maximum(d2, 0) / (2 * ls ** 2))


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    n, d = 400, 5
    X = rng.standard_normal((n, d))
    Y = np.sin(X[:, :3]) + 0.1 * rng.standard_normal((n, 3))
    Xt = rng.standard_normal((30, d))
    ridge = 1e-3
    K = rbf_np(X, X)
    alpha = np.linalg.solve(K + n * ridge * np.eye(n), Y)
    return dict(X=X, Y=Y, Xt=Xt, ridge=ridge, K=K, alpha=alpha,
                pred=rbf_np(Xt, X) @ alpha, k=kernels.rbf(LS))


BS = 96         # one block size (does not divide n = 400): one compilation per path


@pytest.mark.parametrize("pre,gram_dtype", [
    ("nystrom", None), ("pivoted_cholesky", "blockwise"), ("jacobi", None)])
def test_cg_matches_numpy_solve(problem, pre, gram_dtype):
    p = problem
    m = krr.fit(p["k"], p["X"], p["Y"], p["ridge"], solver="cg", preconditioner=pre,
                gram_dtype=gram_dtype, block_size=BS)
    assert m.alpha.shape == (400, 3)
    assert float(m.info.residual) <= 1e-9
    np.testing.assert_allclose(np.asarray(m.predict(p["Xt"])), p["pred"], rtol=0,
                               atol=1e-8)
    # the recorded residual is the true one
    r = p["Y"] - (p["K"] + 400 * p["ridge"] * np.eye(400)) @ np.asarray(m.alpha)
    true = np.max(np.linalg.norm(r, axis=0) / np.linalg.norm(p["Y"], axis=0))
    np.testing.assert_allclose(float(m.info.residual), true, rtol=1e-2, atol=1e-13)


def test_preconditioner_cuts_iterations(problem):
    p = problem
    its = {pre: int(krr.fit(p["k"], p["X"], p["Y"], p["ridge"], solver="cg",
                            preconditioner=pre, precond_rank=100, block_size=BS).info.iterations)
           for pre in ("nystrom", "none")}
    assert its["nystrom"] < its["none"] / 2


def test_scalar_targets_and_float32_stored_gram(problem):
    p = problem
    y = p["Y"][:, 0]
    m = krr.fit(p["k"], p["X"], y, p["ridge"], solver="cg", gram_dtype=jnp.float32,
                block_size=BS)
    assert m.alpha.shape == (400,)
    # the float32-rounded Gram matrix (relative error ~6e-8 per entry) moves alpha by
    # at most cond * 6e-8 relative; predictions agree to ~1e-6
    np.testing.assert_allclose(np.asarray(m.predict(p["Xt"])), p["pred"][:, 0], atol=1e-5)
    K32 = p["K"].astype(np.float32).astype(np.float64)
    a32 = np.linalg.solve(K32 + 400 * p["ridge"] * np.eye(400), y)
    np.testing.assert_allclose(np.asarray(m.alpha), a32, rtol=0,
                               atol=1e-8 * np.abs(a32).max())


def test_auto_is_cholesky_at_small_n_and_cg_over_budget(problem, monkeypatch):
    p = problem
    a = krr.fit(p["k"], p["X"], p["Y"], p["ridge"])
    c = krr.fit(p["k"], p["X"], p["Y"], p["ridge"], solver="cholesky")
    assert a.info is None
    np.testing.assert_array_equal(np.asarray(a.alpha), np.asarray(c.alpha))
    # a budget below the dense path's 3 n^2 numbers but above CG's working set
    monkeypatch.setenv("NTK_POISON_MEMORY_BUDGET", str(3 * 400 * 400 * 8 - 1))
    g = krr.fit(p["k"], p["X"], p["Y"], p["ridge"], block_size=BS)
    assert g.info is not None
    np.testing.assert_allclose(np.asarray(g.predict(p["Xt"])), p["pred"], atol=1e-8)
    with pytest.raises(ValueError, match="solver=.cg"):
        krr.fit(p["k"], p["X"], p["Y"], p["ridge"], solver="cholesky")
    # even CG's working set does not fit: the message names the fix
    monkeypatch.setenv("NTK_POISON_MEMORY_BUDGET", "100000")
    with pytest.raises(ValueError, match="block_size.*precond_rank"):
        krr.fit(p["k"], p["X"], p["Y"], p["ridge"])
    # the working set fits (block 96: ~1.9 MB), the stored Gram (1.3 MB more) not
    monkeypatch.setenv("NTK_POISON_MEMORY_BUDGET", "2500000")
    with pytest.raises(ValueError, match="blockwise"):
        krr.fit(p["k"], p["X"], p["Y"], p["ridge"], solver="cg", gram_dtype=jnp.float64,
                block_size=BS)


def test_convergence_warning_and_strict(problem):
    p = problem
    with pytest.warns(linalg.ConvergenceWarning, match="2 iterations"):
        m = krr.fit(p["k"], p["X"], p["Y"], p["ridge"], solver="cg", maxiter=2,
                    preconditioner=None, block_size=BS)
    assert int(m.info.iterations) == 2 and float(m.info.residual) > 1e-6
    with pytest.raises(linalg.ConvergenceError):
        krr.fit(p["k"], p["X"], p["Y"], p["ridge"], solver="cg", maxiter=2,
                preconditioner=None, strict=True, block_size=BS)


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver="lu"), "solver"), (dict(solver="cg", preconditioner="ilu"), "preconditioner"),
    (dict(solver="cg", precond_rank=401), "precond_rank"),
    (dict(solver="cg", gram_dtype=jnp.int32), "gram_dtype"),
    (dict(solver="cg", tol=-1.0), "tol"), (dict(solver="cg", block_size=0), "block_size"),
    (dict(solver="cholesky", mesh=object()), "mesh")])
def test_bad_options(problem, kwargs, match):
    p = problem
    with pytest.raises(ValueError, match=match):
        krr.fit(p["k"], p["X"], p["Y"], p["ridge"], **kwargs)


def test_gram_pieces_against_numpy(problem):
    p = problem
    X, K = jnp.asarray(p["X"]), p["K"]
    V = np.random.default_rng(1).standard_normal((400, 2))
    np.testing.assert_allclose(np.asarray(gram.gram_matvec(p["k"], X, block_size=BS)(V)),
                               K @ V, atol=1e-12)
    G = gram.stored_gram(p["k"], X, BS, np.dtype(np.float64))
    n = len(K)            # the stored tiles, mirrored, are the Gram matrix; pads dropped
    np.testing.assert_allclose(np.asarray(G).reshape(-1, G.shape[2])[:n, :n], K, atol=1e-13)
    G1 = gram.stored_gram(p["k"], X[:397], 10**6, np.dtype(np.float32))   # tiles of 256
    assert G1.shape == (2, 256, 512) and G1.dtype == np.float32
    np.testing.assert_allclose(np.asarray(G1).reshape(512, 512)[:397, :397], K[:397, :397],
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(gram.stored_matvec(G)(V[:, 0])), K @ V[:, 0],
                               atol=1e-12)
    # full rank: both factors reproduce K
    B = np.asarray(gram.nystrom_factor(p["k"], X[:70], 70, jax.random.PRNGKey(0)))
    np.testing.assert_allclose(B @ B.T, K[:70, :70], atol=1e-6)
    C = np.asarray(gram.pivoted_cholesky_factor(p["k"], X[:70], 70))
    np.testing.assert_allclose(C @ C.T, K[:70, :70], atol=1e-10)
    K = K[:70, :70]
    V = V[:70]
    # Woodbury against the explicit inverse
    P = linalg.low_rank_preconditioner(C[:, :10], 0.3)
    M = C[:, :10] @ C[:, :10].T + 0.3 * np.eye(70)
    np.testing.assert_allclose(np.asarray(P(jnp.asarray(V))), np.linalg.solve(M, V),
                               atol=1e-10)


def rbf_grad_hess(x, X, alpha, ls=LS):
    """Closed-form input gradient and Hessian of f(x) = sum_j alpha_j k(x, x_j), RBF."""
    D = X - x                                            # (n, d): x_j - x
    w = alpha * rbf_np(x[None], X)[0]                    # (n,)
    g = w @ D / ls ** 2
    H = (D * w[:, None]).T @ D / ls ** 4 - w.sum() * np.eye(len(x)) / ls ** 2
    return g, H


def test_downstream_on_cg_model(problem):
    p = problem
    y = p["Y"][:, 0]
    cg = krr.fit(p["k"], p["X"], y, p["ridge"], solver="cg", tol=1e-12, block_size=BS)
    a_ref = np.linalg.solve(p["K"] + 400 * p["ridge"] * np.eye(400), y)
    x = p["Xt"][:3]
    ref = [rbf_grad_hess(xi, p["X"], a_ref) for xi in x]
    np.testing.assert_allclose(np.asarray(cg.input_grad(x)), [g for g, _ in ref], atol=1e-8)
    np.testing.assert_allclose(np.asarray(cg.input_hessian(x)), [H for _, H in ref],
                               atol=1e-8)
    # the model (with its info) is a pytree through jit
    out = jax.jit(lambda m, z: m.predict(z))(cg, x)
    np.testing.assert_allclose(np.asarray(out), rbf_np(x, p["X"]) @ a_ref, atol=1e-8)
    vals = spectra.top_eigenpairs(cg, x[0], k=2)[0]
    np.testing.assert_allclose(np.asarray(vals), np.linalg.eigvalsh(ref[0][1])[::-1][:2],
                               atol=1e-8)
    # a detector scores the CG model as the same function with the oracle's weights
    oracle = krr.KRRModel(kernel=p["k"], X=cg.X, alpha=jnp.asarray(a_ref), ridge=cg.ridge,
                          info=cg.info)
    det = CurvatureDetector().fit(cg, x)
    np.testing.assert_allclose(det.detect(cg, x)[0], det.detect(oracle, x)[0],
                               rtol=1e-6, atol=1e-9)


def test_clone_law_cg_matches_refits(problem):
    """clone_law(solver="cg") against numpy refits of the poisoned and clean sets."""
    p = problem
    X, Y, lam = p["X"], p["Y"], p["ridge"]
    zeta, x0, yt = p["Xt"][0], p["Xt"][1:4], np.ones(3)
    ms = [0, 5, 40]
    law = theory.clone_law(p["k"], X, Y, lam, zeta, yt, ms, x0, solver="cg", block_size=BS)
    N = len(X)
    for i, m in enumerate(ms):
        shift = (N + m) * lam
        Xp = np.concatenate([X, np.repeat(zeta[None], m, 0)])
        Yp = np.concatenate([Y, np.repeat(yt[None], m, 0)])
        fp = rbf_np(x0, Xp) @ np.linalg.solve(rbf_np(Xp, Xp) + shift * np.eye(N + m), Yp)
        fc = rbf_np(x0, X) @ np.linalg.solve(p["K"] + shift * np.eye(N), Y)
        np.testing.assert_allclose(np.asarray(law.f_clean)[i], fc, atol=1e-8)
        np.testing.assert_allclose(np.asarray(law.delta_f)[i], fp - fc, atol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theory.clone_law(p["k"], X, Y, lam, zeta, yt, ms, x0, solver="cg", tol=1e-6,
                         block_size=BS)


@pytest.mark.slow
def test_cg_equals_cholesky_at_4000():
    rng = np.random.default_rng(3)
    n, d = 4000, 30
    X = rng.standard_normal((n, d))
    Y = np.eye(10)[rng.integers(0, 10, n)]
    Xt = rng.standard_normal((200, d))
    k = kernels.rbf(float(np.sqrt(d)))
    ch = krr.fit(k, X, Y, 1e-4, solver="cholesky")
    for gd in (None, "blockwise"):
        cg = krr.fit(k, X, Y, 1e-4, solver="cg", gram_dtype=gd)
        assert float(cg.info.residual) <= 1e-9
        np.testing.assert_allclose(np.asarray(cg.predict(Xt)), np.asarray(ch.predict(Xt)),
                                   rtol=0, atol=1e-8)
