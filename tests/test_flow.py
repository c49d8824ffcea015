"""Tests for ntk_poison.flow: the input-gradient-penalty defence (THEORY.md section 3).

The independent references are the primal solutions of an explicit finite feature map
(tests/oracles/feature_maps.py: numpy, analytic Jacobians, no autodiff), KRR,
neural-tangents' closed-form gradient-descent predictor, and the objective itself
(stationarity under perturbations).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import pytest  # noqa: E402

from ntk_poison import flow, joint, kernels, krr, linalg, penalized  # noqa: E402
from oracles.feature_maps import TrigFeatures  # noqa: E402

LAM = 1e-2
RBF = kernels.rbf(1.2)                  # one kernel and one shape (15, 3) for most tests:
NT = kernels.nt_fc(depth=2, b_std=0.1)  # jit compiles once per kernel and shape
KAPPAS = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 13)])


def _problem(seed, n=15, d=3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] + 0.1 * rng.standard_normal(n)
    return X, y, rng.standard_normal((6, d))


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trig():
    """An explicit feature map with D = 43 > n = 12 (so the restricted model differs)."""
    rng = np.random.default_rng(7)
    n, d, p = 12, 2, 40
    A = rng.standard_normal((p, d))
    b = rng.uniform(0.0, 2 * np.pi, p)
    fm = TrigFeatures(A, b)
    Aj, bj = jnp.asarray(A), jnp.asarray(b)

    def phi(x):
        return jnp.concatenate([x, jnp.sin(x @ Aj.T + bj),
                                0.5 * jnp.sum(x * x, axis=1, keepdims=True)], axis=1)

    k = kernels.Kernel(lambda x1, x2: phi(x1) @ phi(x2).T, "trig_features")
    X = rng.standard_normal((n, d))
    y = np.sin(2 * X[:, 0]) + 0.3 * rng.standard_normal(n)
    x = rng.standard_normal((7, d))
    return fm, k, X, y, x


@pytest.fixture(scope="module")
def rbf_problem():
    return (RBF,) + _problem(11)


def _w_from_model(fm, model):
    """The feature-space weight of a model: w = Phi^T alpha + sum_j J_j beta_j."""
    X = np.asarray(model.X)
    w = fm.phi(X).T @ np.asarray(model.alpha)
    if model.beta is not None:
        w = w + np.einsum("nDd,nd->D", fm.jac(X), np.asarray(model.beta))
    return w


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# --------------------------------------------------------------------------- exact minimiser

@pytest.mark.parametrize("kappa", [0.3, 3.0])
def test_exact_minimiser_matches_primal_of_feature_map(trig, kappa):
    fm, k, X, y, x = trig
    model = penalized.fit_penalized(k, X, y, LAM, kappa)
    w = fm.fit_output(X, y, LAM, kappa)
    assert _max_abs(model.predict(x), fm.predict(w, x)) < 1e-10
    assert _max_abs(model.input_grad(x), fm.input_grad(w, x)) < 1e-10
    assert _max_abs(model.predict(X), fm.predict(w, X)) < 1e-10
    # the model's own (matrix-free) objective equals the primal objective
    assert abs(float(model.objective()) - fm.output_objective(w, X, y, LAM, kappa)) < 1e-12
    assert model.model == "exact" and model.penalty == "output" and model.kappa == kappa


def test_effective_dof_matches_primal_hat_trace(trig):
    fm, k, X, _, _ = trig
    kappas = np.array([0.0, 0.3, 3.0, 30.0])
    df = np.asarray(penalized.effective_dof(k, X, LAM, kappas))
    ref = np.array([fm.dof(X, LAM, kap) for kap in kappas])
    np.testing.assert_allclose(df, ref, rtol=0, atol=1e-10)
    assert isinstance(penalized.effective_dof(k, X, LAM, 0.3), float)


@pytest.mark.parametrize("kappa", [0.3, 3.0])
def test_restricted_model_matches_its_primal_and_differs_from_exact(trig, kappa):
    fm, k, X, y, x = trig
    r = penalized.fit_restricted(k, X, y, LAM, kappa)
    e = penalized.fit_penalized(k, X, y, LAM, kappa)
    wr = fm.fit_restricted(X, y, LAM, kappa)
    assert _max_abs(r.predict(x), fm.predict(wr, x)) < 1e-10
    assert _max_abs(r.input_grad(x), fm.input_grad(wr, x)) < 1e-10
    assert r.model == "restricted" and r.beta is None
    # a different model: predictions differ at O(0.1) (THEORY.md: "off by 0.19")
    assert _max_abs(r.predict(x), e.predict(x)) > 1e-2
    # ... and the exact one attains a lower value of the shared objective
    assert float(e.objective()) < float(r.objective())


def test_restricted_agrees_with_exact_at_kappa_zero(trig):
    fm, k, X, y, x = trig
    r = penalized.fit_restricted(k, X, y, LAM, 0.0)
    e = penalized.fit_penalized(k, X, y, LAM, 0.0)
    assert _max_abs(r.predict(x), e.predict(x)) < 1e-10
    assert abs(penalized.effective_dof(k, X, LAM, 0.0, restricted=True)
               - penalized.effective_dof(k, X, LAM, 0.0)) < 1e-10


def test_exact_minimiser_is_stationary_for_rbf(rbf_problem):
    """No representer direction (value or derivative function) lowers the objective."""
    k, X, y, _ = rbf_problem
    model = penalized.fit_penalized(k, X, y, LAM, 0.7)
    J0 = float(model.objective())
    rng = np.random.default_rng(3)
    eps = 1e-4
    for _ in range(3):
        da = rng.standard_normal(model.alpha.shape)
        db = rng.standard_normal(model.beta.shape)

        def J(t):
            m = dataclasses.replace(model, alpha=model.alpha + t * da,
                                    beta=model.beta + t * db)
            return float(m.objective())

        Jp, Jm = J(eps), J(-eps)
        assert Jp > J0 and Jm > J0
        slope = (Jp - Jm) / (2 * eps)
        curvature = (Jp + Jm - 2 * J0) / eps ** 2
        assert abs(slope) < 1e-6 * max(1.0, curvature)


def test_kappa_zero_is_krr(rbf_problem):
    k, X, y, x = rbf_problem
    ref = krr.fit(k, X, y, LAM)
    model = penalized.fit_penalized(k, X, y, LAM, 0.0)
    np.testing.assert_array_equal(np.asarray(model.alpha), np.asarray(ref.alpha))
    assert not np.any(np.asarray(model.beta))
    np.testing.assert_allclose(np.asarray(model.predict(x)), np.asarray(ref.predict(x)),
                               rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(np.asarray(model.input_grad(x)),
                               np.asarray(ref.input_grad(x)), rtol=1e-13, atol=1e-14)
    # the loss penalty, the sweep (Schur path) and the restricted model agree too
    loss = penalized.fit_penalized(k, X, y, LAM, 0.0, penalty="loss")
    assert _max_abs(loss.predict(x), ref.predict(x)) < 1e-14
    sweep = penalized.fit_penalized_sweep(k, X, y, LAM, [0.0])
    assert _max_abs(sweep.predict(x)[0], ref.predict(x)) < 1e-10
    restricted = penalized.fit_restricted(k, X, y, LAM, 0.0)
    assert _max_abs(restricted.predict(x), ref.predict(x)) < 1e-10


def test_small_kappa_is_continuous_at_krr(rbf_problem):
    k, X, y, x = rbf_problem
    ref = krr.fit(k, X, y, LAM)
    m = penalized.fit_penalized(k, X, y, LAM, 1e-9)
    assert _max_abs(m.predict(x), ref.predict(x)) < 1e-7


def test_sweep_matches_direct_fits(rbf_problem):
    """One Schur-complement eigendecomposition for all kappas vs one Cholesky each."""
    k, X, y, _ = rbf_problem
    sweep = penalized.fit_penalized_sweep(k, X, y, LAM, KAPPAS)
    P, G = np.asarray(sweep.predict(X)), np.asarray(sweep.input_grad(X))
    assert P.shape == (len(KAPPAS), len(X)) and G.shape == (len(KAPPAS),) + X.shape
    for i, kap in enumerate(KAPPAS):
        m = penalized.fit_penalized(k, X, y, LAM, kap)
        assert _max_abs(P[i], m.predict(X)) < 1e-9
        assert _max_abs(G[i], m.input_grad(X)) < 1e-9
        assert sweep.at(i).kappa == kap and sweep.at(i).time is None
    assert _max_abs(sweep.at(5).predict(X), P[5]) < 1e-13


def test_restricted_sweep_matches_single_fits(rbf_problem):
    k, X, y, _ = rbf_problem
    sweep = penalized.fit_penalized_sweep(k, X, y, LAM, KAPPAS, restricted=True)
    P = np.asarray(sweep.predict(X))
    for i, kap in enumerate(KAPPAS):
        assert _max_abs(P[i], penalized.fit_restricted(k, X, y, LAM, kap).predict(X)) < 1e-12


def test_restricted_solves_its_normal_equations(rbf_problem):
    """(K^2 + n lam K + kappa G) alpha = K y with G from the RBF closed-form gradient."""
    k, X, y, _ = rbf_problem
    kappa, ls = 2.0, 1.2
    r = penalized.fit_restricted(k, X, y, LAM, kappa)
    n = len(X)
    diff = X[:, None, :] - X[None, :, :]                      # x_i - x_j
    K = np.exp(-np.sum(diff ** 2, axis=-1) / (2 * ls ** 2))
    grad = -diff / ls ** 2 * K[:, :, None]                   # grad_x k(x_i, x_j)
    G = np.einsum("ija,ila->jl", grad, grad)
    lhs = (K @ K + n * LAM * K + kappa * G) @ np.asarray(r.alpha)
    np.testing.assert_allclose(lhs, K @ y, rtol=0, atol=1e-10 * np.max(np.abs(K @ y)))


def test_vector_targets_hat_matrix_and_effective_dof(rbf_problem):
    """Fit y = I (n outputs): each column is a scalar fit, the fitted values are the
    hat matrix, and its trace is effective_dof."""
    k, X, _, x = rbf_problem
    n = len(X)
    Y = np.eye(n)
    for kappa in (0.5, 5.0):
        m = penalized.fit_penalized(k, X, Y, LAM, kappa)
        P, J = np.asarray(m.predict(x)), np.asarray(m.input_jacobian(x))
        assert P.shape == (len(x), n) and J.shape == (len(x), n, X.shape[1])
        for j in (0, 7):
            mj = penalized.fit_penalized(k, X, Y[:, j], LAM, kappa)
            assert _max_abs(P[:, j], mj.predict(x)) < 1e-11
            assert _max_abs(J[:, j], mj.input_grad(x)) < 1e-11
        hat = np.asarray(m.predict(X))
        assert abs(np.trace(hat) - penalized.effective_dof(k, X, LAM, kappa)) < 1e-10
        hat_r = np.asarray(penalized.fit_restricted(k, X, Y, LAM, kappa).predict(X))
        assert abs(np.trace(hat_r)
                   - penalized.effective_dof(k, X, LAM, kappa, restricted=True)) < 1e-10


def test_model_interface(rbf_problem):
    k, X, y, x = rbf_problem
    m = penalized.fit_penalized(k, X, y, LAM, 0.5)
    f = m.as_function()
    assert _max_abs(jax.vmap(jax.grad(f))(jnp.asarray(x)), m.input_grad(x)) < 1e-13
    assert _max_abs(jax.vmap(f)(jnp.asarray(x)), m.predict(x)) < 1e-13
    # Hessian against central differences of the gradient (a batch of 2d = 6 points)
    H = np.asarray(m.input_hessian(x[:2]))
    h = 1e-4
    for i in range(2):
        E = h * np.eye(X.shape[1])
        G = np.asarray(m.input_grad(np.concatenate([x[i] + E, x[i] - E])))
        ref = (G[:3] - G[3:]) / (2 * h)                      # row a: d grad / dx_a
        np.testing.assert_allclose(H[i], ref, rtol=0, atol=1e-7)
    # a pytree: flattening and unflattening gives the same model
    leaves, tree = jax.tree_util.tree_flatten(m)
    m2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert _max_abs(m2.predict(x), m.predict(x)) == 0.0


# --------------------------------------------------------------------------- loss penalty

def test_loss_penalty_matches_primal_minimiser(trig):
    fm, k, X, y, x = trig
    kappa = 3.0
    ml = penalized.fit_penalized(k, X, y, LAM, kappa, penalty="loss", tol=1e-10)
    mo = penalized.fit_penalized(k, X, y, LAM, kappa)
    info = ml.info_dict
    assert info["converged"] and info["grad_norm"] < 1e-9 * info["grad_norm0"]
    w = _w_from_model(fm, ml)
    # an independent gradient (analytic, in feature space) vanishes at the solution
    assert np.linalg.norm(fm.loss_gradient(w, X, y, LAM, kappa)) < 1e-9
    # it minimises the loss-penalty objective: below the output-penalty solution's value
    J_loss = fm.loss_objective(w, X, y, LAM, kappa)
    J_out = fm.loss_objective(_w_from_model(fm, mo), X, y, LAM, kappa)
    assert J_loss < J_out
    assert abs(float(ml.objective()) - J_loss) < 1e-12
    assert abs(float(mo.objective("loss")) - J_out) < 1e-12
    # ... and agrees with scipy's BFGS on the primal problem
    wl = fm.fit_loss(X, y, LAM, kappa)
    assert _max_abs(ml.predict(x), fm.predict(wl, x)) < 1e-6


def test_loss_penalty_stops_and_says_so_at_the_rounding_floor(trig):
    _, k, X, y, _ = trig
    with pytest.warns(linalg.ConvergenceWarning, match="J stopped decreasing.*pass tol >=") as w:
        m = penalized.fit_penalized(k, X, y, 0.1, 3.0, penalty="loss", tol=1e-14)
    info = m.info_dict
    assert info["stalled"] and not info["converged"] and info["iterations"] < 100
    # the tolerance the warning names is reachable: it is not below the achieved ratio
    hint = float(re.search(r"pass tol >= (\S+) to", str(w[0].message)).group(1))
    assert info["grad_norm"] <= hint * info["grad_norm0"]
    # the stalled solution is as good as a converged one at a looser tolerance
    ref = penalized.fit_penalized(k, X, y, 0.1, 3.0, penalty="loss", tol=1e-8)
    assert ref.info_dict["converged"]
    J, J_ref = float(m.objective()), float(ref.objective())
    assert abs(J - J_ref) <= 1e-13 * J_ref


def test_loss_penalty_warns_when_not_converged(trig):
    fm, k, X, y, _ = trig
    with pytest.warns(linalg.ConvergenceWarning, match="did not reach tol.*raise `maxiter`"):
        m = penalized.fit_penalized(k, X, y, LAM, 3.0, penalty="loss", maxiter=1)
    assert not m.info_dict["converged"] and m.info_dict["iterations"] == 1
    assert not m.info_dict["stalled"]


# --------------------------------------------------------------------------- flow

TIMES = np.array([0.0, 0.5, 2.0, 10.0, 40.0])


@pytest.mark.parametrize("kappa", [0.0, 0.5, 5.0])
def test_flow_closed_form_matches_ode(rbf_problem, kappa):
    k, X, y, x = rbf_problem
    closed = flow.kernel_flow(k, X, y, LAM, kappa, TIMES)
    ode = flow.kernel_flow(k, X, y, LAM, kappa, TIMES, method="ode")
    assert closed.predict(x).shape == (len(TIMES), len(x))
    assert ode.input_grad(x).shape == (len(TIMES), len(x), X.shape[1])
    assert _max_abs(closed.predict(x), ode.predict(x)) < 1e-6
    assert _max_abs(closed.input_grad(x), ode.input_grad(x)) < 1e-6
    assert _max_abs(closed.predict(x)[0], 0.0) == 0.0          # f(0) = 0
    np.testing.assert_array_equal(np.asarray(closed.times), TIMES)
    assert closed.at(2).time == 2.0
    assert _max_abs(closed.at(3).predict(x), closed.predict(x)[3]) < 1e-14


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_flow_reaches_minimiser(rbf_problem, kappa):
    k, X, y, x = rbf_problem
    traj = flow.kernel_flow(k, X, y, LAM, kappa, [0.0, 1.0, 10.0, 100.0, 1e7])
    m = penalized.fit_penalized(k, X, y, LAM, kappa)
    assert _max_abs(traj.predict(x)[-1], m.predict(x)) < 1e-10
    assert _max_abs(traj.input_grad(x)[-1], m.input_grad(x)) < 1e-10


def test_flow_at_kappa_zero_matches_neural_tangents(rbf_problem):
    """nt trains (1/2n)|f-y|^2 on the kernel K + diag_reg I: same test predictions with
    learning_rate=1, diag_reg=n*lam (absolute), same t; its train predictions include
    the nugget, fx_train_nt = f(X) + n lam alpha(t)."""
    import neural_tangents as nt

    k, X, y, x = rbf_problem
    n = len(X)
    traj = flow.kernel_flow(k, X, y, LAM, 0.0, TIMES)
    predict_fn = nt.predict.gradient_descent_mse(
        k(X, X), jnp.asarray(y)[:, None], learning_rate=1.0, diag_reg=n * LAM,
        diag_reg_absolute_scale=True)
    f_train, f_test = predict_fn(TIMES, 0.0, 0.0, k(x, X))
    assert _max_abs(np.asarray(f_test)[..., 0], traj.predict(x)) < 1e-12
    ours_train = np.asarray(traj.predict(X)) + n * LAM * np.asarray(traj.alpha)
    assert _max_abs(np.asarray(f_train)[..., 0], ours_train) < 1e-12


def _numpy_mse_flow(K, Y, ridge, times):
    """Independent oracle: c(t) = Q diag((1 - exp(-e t/n))/e) Q^T y, K + n lam I = Q e Q^T."""
    n = K.shape[0]
    e, Q = np.linalg.eigh(K + n * ridge * np.eye(n))
    g = -np.expm1(-np.outer(times, e) / n) / e                     # (T, n)
    qy = Q.T @ Y.reshape(n, -1)                                     # (n, r)
    return np.einsum("ij,tj,jr->tir", Q, g, qy)                    # (T, n, r)


@pytest.mark.parametrize("vector", [False, True])
def test_flow_at_kappa_zero_skips_the_joint_gram(rbf_problem, vector):
    """kappa = 0 runs on the n x n Gram; it equals the joint-Gram closed form (the old
    path, S = diag(1, 0)) and a numpy eigh oracle to 1e-10, for either penalty and
    method; beta is 0."""
    k, X, y, x = rbf_problem
    Y = np.stack([y, np.cos(X[:, 1])], 1) if vector else y
    n, dt = len(X), jnp.float64
    Kfull, A, sw = joint.exact_system(k, jnp.asarray(X), jnp.asarray(LAM, dt),
                                      jnp.asarray(0.0, dt))
    Yj = jnp.asarray(Y.reshape(n, -1))
    old_a, old_b = joint.unpack(flow._flow_closed_form(A, sw, Yj, jnp.asarray(TIMES)),
                                X.shape[1:], not vector)
    oracle = _numpy_mse_flow(np.asarray(k(X, X)), Y, LAM, TIMES)
    oracle = oracle[..., 0] if not vector else oracle
    path = flow.kernel_flow(k, X, Y, LAM, 0.0, TIMES)
    assert path.info_dict["gram"] == "n x n (kappa = 0)"
    assert path.alpha.shape == old_a.shape and path.beta.shape == old_b.shape
    assert not np.any(np.asarray(path.beta))
    assert _max_abs(path.alpha, old_a) < 1e-10
    assert _max_abs(path.alpha, oracle) < 1e-10
    old = penalized.PenalizedPath(kernel=k, X=jnp.asarray(X), y=jnp.asarray(Y), alpha=old_a,
                             beta=old_b, kappas=jnp.zeros(len(TIMES)),
                             times=jnp.asarray(TIMES), ridge=LAM)
    assert _max_abs(path.predict(x), old.predict(x)) < 1e-10
    ode = flow.kernel_flow(k, X, Y, LAM, 0.0, TIMES, method="ode")
    loss = flow.kernel_flow(k, X, Y, LAM, 0.0, TIMES, penalty="loss")
    assert ode.info_dict["method"] == loss.info_dict["method"] == "ode"
    assert loss.penalty == "loss" and not np.any(np.asarray(ode.beta))
    for other in (ode, loss):
        assert _max_abs(other.predict(x), path.predict(x)) < 1e-6
    if not vector:
        assert _max_abs(path.input_grad(x), old.input_grad(x)) < 1e-10
        assert path.at(1).kappa == 0.0 and path.at(1).time == TIMES[1]


def test_flow_at_kappa_zero_is_not_limited_by_the_joint_gram():
    """n = 300, d = 784: the joint Gram (n(1+d) = 235500 rows) is far over any memory
    budget, so kappa > 0 raises; kappa = 0 needs only K and runs (both methods)."""
    rng = np.random.default_rng(3)
    n, d = 300, 784
    X = rng.uniform(0.0, 1.0, (n, d))
    y = np.sign(rng.standard_normal(n))
    k = kernels.rbf(8.0)
    times = np.array([0.5, 5.0, 50.0])
    with pytest.raises(ValueError, match="memory budget"):
        flow.kernel_flow(k, X, y, LAM, 0.1, times)
    path = flow.kernel_flow(k, X, y, LAM, 0.0, times)
    oracle = _numpy_mse_flow(np.asarray(k(X, X)), y, LAM, times)[..., 0]
    assert _max_abs(path.alpha, oracle) < 1e-10
    assert path.beta.shape == (len(times), n, d) and not np.any(np.asarray(path.beta))
    ode = flow.kernel_flow(k, X, y, LAM, 0.0, times, method="ode")
    assert _max_abs(ode.alpha, oracle) < 1e-6


@pytest.mark.parametrize("kappa", [0.5, 5.0])
def test_objective_decreases_along_output_flow(rbf_problem, kappa):
    k, X, y, _ = rbf_problem
    traj = flow.kernel_flow(k, X, y, LAM, kappa, np.geomspace(1e-2, 1e3, 12))
    J = np.asarray(traj.objective())
    assert np.all(np.diff(J) < 0)
    assert J[-1] >= float(penalized.fit_penalized(k, X, y, LAM, kappa).objective()) - 1e-12


def test_loss_flow_equals_output_flow_at_kappa_zero(trig):
    _, k, X, y, x = trig
    out = flow.kernel_flow(k, X, y, LAM, 0.0, TIMES)
    loss = flow.kernel_flow(k, X, y, LAM, 0.0, TIMES, penalty="loss")
    assert loss.penalty == "loss" and loss.info_dict["method"] == "ode"
    assert _max_abs(loss.predict(x), out.predict(x)) < 1e-6


def test_loss_flow_decreases_objective_and_approaches_minimiser(trig):
    _, k, X, y, _ = trig
    kappa, ridge = 3.0, 0.1
    times = np.array([0.0, 2.0, 10.0, 40.0, 150.0])
    traj = flow.kernel_flow(k, X, y, ridge, kappa, times, penalty="loss")
    J = np.asarray(traj.objective())
    assert np.all(np.diff(J) < 0)
    # this problem's rounding floor is a relative |grad J| of ~9e-10 (below it, at
    # tol 1e-10, Newton stalls and warns); at 1e-8 J agrees with the floor to 1e-16
    J_min = float(penalized.fit_penalized(k, X, y, ridge, kappa, penalty="loss",
                                     tol=1e-8).objective())
    assert J[-1] >= J_min - 1e-12
    assert J[-1] - J_min < 1e-6 * J_min


# --------------------------------------------------------------------------- monotonicity

def _restricted_dof_reference(k, X, lam, kappas):
    """``tr[K (K^2 + n lam K + kappa G)^-1 K]`` with the dual ``G_jl = sum_i grad_x
    k(x_i, x_j) . grad_x k(x_i, x_l)`` from jax.jacfwd of the kernel alone, in numpy."""
    n = len(X)
    K = np.asarray(k(X, X))
    Xj = jnp.asarray(X)
    J = np.asarray(jax.vmap(jax.jacfwd(lambda x: k(x[None], Xj)[0]))(Xj))   # (i, j, a)
    G = np.einsum("ija,ila->jl", J, J)
    return np.array([np.trace(K @ np.linalg.solve(K @ K + n * lam * K + kap * G, K))
                     for kap in kappas])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kernel,restricted", [
    ("rbf", False), ("rbf", True), ("nt_fc", True)])
def test_capacity_falls_with_kappa(seed, kernel, restricted):
    """df(kappa) strictly decreases (a theorem, THEORY.md 3), checked on an independent
    computation of df: the exact model's hat-matrix trace from the closed-form RBF joint
    Gram (tests/oracles/rbf_joint.py), the restricted one's from its normal equations
    with G built from the kernel's own input Jacobians. The training residual is
    measured, not asserted: it is not monotone in general
    (test_training_residual_is_not_monotone_in_general).

    nt_fc is tested in the restricted model only: its exact model is not defined
    (see test_nonsmooth_kernel_warns_for_exact_model_only)."""
    from oracles.rbf_joint import exact_hat_trace, rbf_joint_gram
    X, _, _ = _problem(100 + seed)
    y = np.random.default_rng(seed).standard_normal(len(X))
    k = RBF if kernel == "rbf" else NT
    df = np.asarray(penalized.effective_dof(k, X, LAM, KAPPAS, restricted=restricted))
    if restricted:
        ref = _restricted_dof_reference(k, X, LAM, KAPPAS)
    else:
        Kf = rbf_joint_gram(X, 1.2)
        ref = np.array([exact_hat_trace(Kf, len(X), LAM, kap) for kap in KAPPAS])
    np.testing.assert_allclose(df, ref, rtol=1e-6, atol=1e-8)
    assert np.all(np.diff(ref) < 0) and np.all(np.diff(df) < 0)
    sweep = penalized.fit_penalized_sweep(k, X, y, LAM, KAPPAS, restricted=restricted)
    residual = np.linalg.norm(np.asarray(sweep.predict(X)) - y[None], axis=1)
    print(f"{kernel} restricted={restricted}: residual {np.round(residual, 4)} (measured)")


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_plus_ridge_rises_and_penalty_falls_with_kappa(seed):
    """What minimisation guarantees: for min A + kappa B, A rises and B falls."""
    X, _, _ = _problem(100 + seed)
    y = np.random.default_rng(seed).standard_normal(len(X))
    sweep = penalized.fit_penalized_sweep(RBF, X, y, LAM, KAPPAS)
    A, B = [], []
    for i in range(len(KAPPAS)):
        m = sweep.at(i)
        g = np.asarray(m.input_grad(m.X))
        B.append(float(np.sum(g * g)) / (2 * len(X)))
        A.append(float(m.objective()) - m.kappa * B[-1])
    assert np.all(np.diff(A) > 0) and np.all(np.diff(B) < 0)


def test_training_residual_is_not_monotone_in_general():
    """A counterexample to 'the training residual strictly increases' (found by a random
    search): the penalty can buy flatter gradients with more RKHS norm and a *better*
    fit. Only fit + ridge term is guaranteed to rise (and the penalty to fall)."""
    rng = np.random.default_rng(9460)
    X = rng.standard_normal((15, 3)) * np.array(
        [rng.uniform(0.5, 3), rng.uniform(0.01, 1), rng.uniform(0.01, 1)])
    y = np.sin(X[:, 0]) + 0.3 * rng.standard_normal(15)
    ridge = 10 ** rng.uniform(-4, -1)
    assert KAPPAS[0] == 0.0 and KAPPAS[1] == 1e-3
    sweep = penalized.fit_penalized_sweep(RBF, X, y, ridge, KAPPAS)
    residual = np.linalg.norm(np.asarray(sweep.predict(X)) - y[None], axis=1)
    assert residual[1] < residual[0] - 2e-4
    direct = penalized.fit_penalized(RBF, X, y, ridge, 1e-3)                 # not an artefact
    assert abs(np.linalg.norm(np.asarray(direct.predict(X)) - y) - residual[1]) < 1e-10
    assert np.all(np.diff(np.asarray(penalized.effective_dof(RBF, X, ridge, KAPPAS))) < 0)


def test_nonsmooth_kernel_warns_for_exact_model_only(monkeypatch):
    """The ReLU NTK has a cusp at x = x': the exact model's derivative blocks are
    artefacts, so the exact-model functions warn (before any memory check: a tiny
    budget stops the call right after the warning) and the restricted model does not."""
    X, y, _ = _problem(100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        penalized.effective_dof(NT, X, LAM, KAPPAS, restricted=True)
        penalized.effective_dof(RBF, X, LAM, KAPPAS)
    monkeypatch.setenv("NTK_POISON_MEMORY_BUDGET", "1000")
    for call in (lambda: penalized.effective_dof(NT, X, LAM, 1.0),
                 lambda: penalized.fit_penalized(NT, X, y, LAM, 1.0),
                 lambda: flow.kernel_flow(NT, X, y, LAM, 1.0, [1.0])):
        with pytest.warns(joint.NonSmoothKernelWarning, match="fit_restricted"):
            with pytest.raises(ValueError, match="memory budget"):
                call()


# --------------------------------------------------------------------------- large problems

@pytest.mark.parametrize("kappa", [0.5, 50.0])
def test_cg_matches_direct_solve(rbf_problem, kappa):
    k, X, y, x = rbf_problem
    direct = penalized.fit_penalized(k, X, y, LAM, kappa)
    cg = penalized.fit_penalized(k, X, y, LAM, kappa, solver="cg", block_size=4, tol=1e-12)
    assert cg.info_dict["converged"] and cg.info_dict["solver"] == "cg"
    assert _max_abs(cg.predict(x), direct.predict(x)) < 1e-8
    assert _max_abs(cg.input_grad(x), direct.input_grad(x)) < 1e-8
    assert _max_abs(cg.alpha, direct.alpha) < 1e-8 * max(1.0, np.max(np.abs(direct.alpha)))


def test_memory_guard_names_the_alternatives(rbf_problem, monkeypatch):
    k, X, y, x = rbf_problem
    ref = penalized.fit_penalized(k, X, y, LAM, 0.5)
    N = len(X) * (1 + X.shape[1])
    monkeypatch.setenv("NTK_POISON_MEMORY_BUDGET", str(N * N * 8))  # < the dense need
    calls = [lambda: penalized.fit_penalized(k, X, y, LAM, 0.5),
             lambda: penalized.fit_penalized_sweep(k, X, y, LAM, [0.5]),
             lambda: penalized.effective_dof(k, X, LAM, 0.5),
             lambda: flow.kernel_flow(k, X, y, LAM, 0.5, [1.0])]
    for call in calls:
        with pytest.raises(ValueError, match="fit_restricted") as err:
            call()
        assert 'solver="cg"' in str(err.value)
    # both named alternatives run under the same budget
    cg = penalized.fit_penalized(k, X, y, LAM, 0.5, solver="cg", block_size=4, tol=1e-12)
    assert _max_abs(cg.predict(x), ref.predict(x)) < 1e-8
    penalized.fit_restricted(k, X, y, LAM, 0.5, block_size=len(X))


# --------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_value_errors(rbf_problem):
    k, X, y, _ = rbf_problem
    cases = [
        (lambda: penalized.fit_penalized(k, X, y, LAM, -1.0), "kappa"),
        (lambda: penalized.fit_penalized(k, X, y, -1e-3, 1.0), "ridge"),
        (lambda: penalized.fit_penalized(k, X, y, LAM, [1.0, 2.0]), "fit_penalized_sweep"),
        (lambda: penalized.fit_penalized(k, X, y, LAM, 1.0, penalty="l2"), "penalty"),
        (lambda: penalized.fit_penalized(k, X, y, LAM, 1.0, solver="lu"), "solver"),
        (lambda: penalized.fit_penalized(k, X, y, LAM, 1.0, penalty="loss", solver="cg"),
         "output"),
        (lambda: penalized.fit_penalized(k, X, np.arange(len(X)), LAM, 1.0), "y"),
        (lambda: penalized.fit_penalized(k, X, y[:-1], LAM, 1.0), "rows"),
        (lambda: penalized.fit_penalized(k, X[:, :, None], y, LAM, 1.0), "X"),
        (lambda: penalized.fit_penalized_sweep(k, X, y, LAM, [1.0, -1.0]), "kappas"),
        (lambda: penalized.fit_penalized_sweep(k, X, y, LAM, [[1.0]]), "kappas"),
        (lambda: penalized.effective_dof(k, X, LAM, -0.5), "kappas"),
        (lambda: penalized.fit_restricted(k, X, y, LAM, -0.5), "kappa"),
        (lambda: flow.kernel_flow(k, X, y, LAM, 1.0, [2.0, 1.0]), "increasing"),
        (lambda: flow.kernel_flow(k, X, y, LAM, 1.0, [1.0, 1.0]), "increasing"),
        (lambda: flow.kernel_flow(k, X, y, LAM, 1.0, [-1.0, 1.0]), "times"),
        (lambda: flow.kernel_flow(k, X, y, LAM, 1.0, [0.0, np.inf]), "times"),
        (lambda: flow.kernel_flow(k, X, y, LAM, 1.0, [1.0], penalty="hinge"), "penalty"),
        (lambda: flow.kernel_flow(k, X, y, LAM, 1.0, [1.0], method="euler"), "method"),
        (lambda: flow.kernel_flow(k, X, y, LAM, 1.0, [1.0], penalty="loss",
                                  method="closed_form"), "closed form"),
        (lambda: flow.kernel_flow(k, X, y, LAM, 1.0, [100.0], method="ode",
                                  max_steps=10), "max_steps"),
        (lambda: penalized.fit_penalized("rbf", X, y, LAM, 1.0), "Kernel"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    sweep = penalized.fit_penalized_sweep(k, X, y, LAM, [1.0])
    with pytest.raises(ValueError, match="index"):
        sweep.at(3)


# --------------------------------------------------------------------------- contraction

def _rbf_problem(rng, n=14, d=3, ell=1.3):
    X = rng.standard_normal((n, d))
    y = np.sign(X[:, 0] + 0.3 * rng.standard_normal(n))
    return kernels.rbf(ell), X, y


def test_functional_coefficients_give_the_directional_derivative(rng):
    k, X, y = _rbf_problem(rng)
    model = penalized.fit_penalized(k, X, y, 0.05, 0.2)
    x0, u = rng.standard_normal(3), rng.standard_normal(3)
    u /= np.linalg.norm(u)
    b, c = flow.functional_coefficients(model, x0, u)
    h = 1e-5
    fd = (float(model.predict((x0 + h * u)[None])[0])
          - float(model.predict((x0 - h * u)[None])[0])) / (2 * h)
    np.testing.assert_allclose(b @ c, fd, rtol=1e-7)


@pytest.mark.parametrize("kappa", [0.05, 0.6])
def test_contraction_matches_the_c_space_flow_by_expm(kappa, rng):
    """The theta-space flow against an independent c-space solution with scipy expm:
    dc/dt = -(1/n) [(W Kfull + n lam I) c - [y; 0]] (flow's module docstring), from the
    kappa = 0 minimiser; and its limit is fit_penalized's."""
    k, X, y = _rbf_problem(rng)
    n, d, lam = len(X), X.shape[1], 0.05
    m0 = penalized.fit_penalized(k, X, y, lam, 0.0)
    x0, u = rng.standard_normal(d), rng.standard_normal(d)
    u /= np.linalg.norm(u)
    b, c0 = flow.functional_coefficients(m0, x0, u)
    Kf, U, s = flow.joint_coordinates(k, X)
    times = np.array([0.0, 0.3, 2.0, 10.0, 1e5])
    r = flow.contraction(U, s, n, y, lam, kappa, b, c0, times)
    W = np.r_[np.ones(n), np.full(n * d, kappa)]
    M = W[:, None] * Kf + n * lam * np.eye(len(W))
    ybar = np.r_[y, np.zeros(n * d)]
    cs = np.linalg.solve(M, ybar)
    g_ref = [b @ (cs + scipy.linalg.expm(-M * t / n) @ (c0 - cs)) for t in times]
    np.testing.assert_allclose(r["g"], g_ref, rtol=1e-7, atol=1e-9)
    g_fit = u @ np.asarray(penalized.fit_penalized(k, X, y, lam, kappa).input_grad(x0[None]))[0]
    np.testing.assert_allclose(r["g_inf"], g_fit, rtol=1e-7)
    np.testing.assert_allclose(r["g"][-1], g_fit, rtol=1e-7)




def test_flow_rate_is_the_top_eigenvalue_of_the_flow_matrix(rng):
    k, X, y = _rbf_problem(rng, n=6, d=2)
    Kf = np.asarray(joint.joint_gram(k, X))
    n, kappa, lam = 6, 0.4, 0.05
    sw = np.r_[np.ones(n), np.full(len(Kf) - n, np.sqrt(kappa))]
    want = np.linalg.eigvalsh(sw[:, None] * Kf * sw[None]).max() / n + lam
    assert flow.flow_rate(Kf, n, kappa, lam) == pytest.approx(want, rel=1e-12)


def test_flow_pair_matches_the_numpy_closed_form():
    """kernel_flow at kappa = 0 and flow_pair (the poisoned flow on n = N + m points, the
    clean one on N with the same absolute ridge n lam and the same 1/n) against the
    numpy eigh closed form."""
    from ntk_poison import attacks, data
    from oracles.closed_forms import mse_flow_alpha
    xtr, ytr, xte, _ = data.load("digits")
    X = xtr[:24].astype(np.float64)
    y = np.where(ytr[:24] >= 5, 1.0, -1.0)
    xt = xte[:7].astype(np.float64)
    k = kernels.get("rbf", length_scale=3.0)
    ridge, times = 1e-2, np.array([0.1, 3.0, 50.0, 2000.0])
    path = flow.kernel_flow(k, X, y, ridge, 0.0, times)
    n = len(X)
    alpha = mse_flow_alpha(np.asarray(k(X, X)), y, n * ridge, n, times)
    np.testing.assert_allclose(alpha @ np.asarray(k(xt, X)).T, np.asarray(path.predict(xt)),
                               rtol=1e-8, atol=1e-10)
    m = 5
    Xp, yp = attacks.clone_cluster(X, y, xt[0], 1.0, m)
    ap, ac = flow.flow_pair(k, X, y, Xp, yp, ridge, times)
    n = n + m
    np.testing.assert_allclose(ap, mse_flow_alpha(np.asarray(k(Xp, Xp)), yp, n * ridge, n,
                                                  times), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ac, mse_flow_alpha(np.asarray(k(X, X)), y, n * ridge, n,
                                                  times), rtol=1e-9, atol=1e-12)
