"""Deferred poisoning (ntk_poison.attacks.deferred), against independent oracles:

* Hutchinson's estimator against the exact ``||H||_F^2`` of ``jax.hessian`` (within
  four standard errors from the closed-form Rademacher variance), exact for diagonal H;
* the attack objectives' gradients against central finite differences (float64), the
  kernel objective's loss and Frobenius terms against a numpy RBF-KRR oracle (closed-form
  input Hessians, the documented probes);
* one PGD step of each attack at beta = 0 against the projected signed gradient;
* PGD evasion of a linear model against its closed-form l_inf worst case;
* the projections (budget, box, rows) and bad inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_poison import kernels, krr, metrics, nets, train
from ntk_poison.attacks import deferred as D


def _rademacher_sd(H, P):
    """The standard error of the P-probe Hutchinson mean of ``||H||_F^2``:
    ``var ||H v||^2 = 2 (||M||_F^2 - sum_j M_jj^2)``, M = H^T H."""
    M = H.T @ H
    return np.sqrt(2.0 * (np.sum(M * M) - np.sum(np.diag(M) ** 2)) / P)


# --------------------------------------------------------------------------- Hutchinson

def test_hutchinson_matches_exact_frobenius(rng):
    d, P = 5, 4000
    W = jnp.asarray(rng.standard_normal((4, d)))
    x = jnp.asarray(rng.standard_normal(d))

    def loss_x(z):
        return jnp.sum(jnp.sin(W @ z)) + 0.1 * jnp.sum(z * z) ** 2

    H = np.asarray(jax.jit(jax.hessian(loss_x))(x))
    exact = np.sum(H * H)
    est = float(D.loss_hessian_frobenius(loss_x, x, key=3, num_probes=P))
    assert abs(est - exact) < 4 * _rademacher_sd(H, P)
    assert abs(est - exact) > 1e-3 * _rademacher_sd(H, P)      # an estimate, not exact


def test_hutchinson_is_exact_for_a_diagonal_hessian(rng):
    a = jnp.asarray(rng.uniform(0.5, 2.0, 6))
    x = jnp.asarray(rng.standard_normal(6))
    loss_x = lambda z: jnp.sum(jnp.exp(a * z))            # hess = diag(a^2 e^{a x})
    exact = float(np.sum((np.asarray(a) ** 2 * np.exp(np.asarray(a * x))) ** 2))
    assert float(D.loss_hessian_frobenius(loss_x, x, 7, 3)) == pytest.approx(exact, rel=1e-12)
    h = jnp.asarray(rng.standard_normal((2, 3)))
    est = D.hutchinson_frobenius(lambda v: h * v, (2, 3), 1, 2)
    assert float(est) == pytest.approx(float(np.sum(np.asarray(h) ** 2)), rel=1e-12)


# --------------------------------------------------------------------------- kernel objective
# Every kernel test uses the same shapes, kernel and P, so the attack's one compiled
# program is built once.

P_KERNEL = 2


@pytest.fixture(scope="module")
def kernel_problem():
    r = np.random.default_rng(11)
    X = r.uniform(0.2, 0.8, (8, 3))
    y = np.where(r.standard_normal(8) > 0, 1.0, -1.0)
    return kernels.rbf(0.6), X, y, 1e-2, 0.05 * r.standard_normal((8, 3))


def _rbf_krr_loss_hessians(X, y, ridge, ell):
    """numpy oracle: the KRR fit's per-point loss and loss input-Hessians at its
    training points, for the unit-variance RBF kernel:
    ``hess 1/2 (f - y)^2 = g g^T + (f - y) hess f``, ``hess f = sum_j a_j k_j
    ((x - x_j)(x - x_j)^T / l^4 - I / l^2)``, ``g = -sum_j a_j k_j (x - x_j) / l^2``."""
    n, d = X.shape
    diff = X[:, None, :] - X[None, :, :]                          # (i, j, d)
    Kmat = np.exp(-np.sum(diff ** 2, -1) / (2 * ell ** 2))
    a = np.linalg.solve(Kmat + n * ridge * np.eye(n), y)
    f = Kmat @ a
    ak = Kmat * a[None, :]
    g = -np.einsum("ij,ijd->id", ak, diff) / ell ** 2
    hf = (np.einsum("ij,ijd,ije->ide", ak, diff, diff) / ell ** 4
          - ak.sum(1)[:, None, None] * np.eye(d) / ell ** 2)
    H = np.einsum("id,ie->ide", g, g) + (f - y)[:, None, None] * hf
    return 0.5 * (f - y) ** 2, H


def test_kernel_objective_gradient_matches_finite_differences(kernel_problem):
    k, X, y, ridge, delta = kernel_problem

    def obj(d):
        return D.kernel_objective(k, X, y, ridge, d, beta=0.3, key=4, num_probes=P_KERNEL)

    g = np.asarray(obj(delta)[3])
    h = 1e-6
    for u in np.random.default_rng(2).standard_normal((3,) + delta.shape):
        fd = (float(obj(delta + h * u)[0]) - float(obj(delta - h * u)[0])) / (2 * h)
        assert np.sum(g * u) == pytest.approx(fd, rel=1e-6, abs=1e-8)


def test_kernel_objective_terms_match_a_numpy_oracle(kernel_problem):
    k, X, y, ridge, delta = kernel_problem
    obj, L, F, _ = D.kernel_objective(k, X, y, ridge, delta, beta=0.5, key=9,
                                      num_probes=P_KERNEL)
    losses, H = _rbf_krr_loss_hessians(X + delta, y, ridge, 0.6)
    assert float(L) == pytest.approx(np.mean(losses), rel=1e-10)
    # the documented probes: rademacher(key, (n, P, d)), row i's are v[i]
    v = np.asarray(jax.random.rademacher(jax.random.PRNGKey(9), (8, P_KERNEL, 3),
                                         jnp.float64))
    Hv = np.einsum("ide,ipe->ipd", H, v)
    assert float(F) == pytest.approx(np.mean(np.sum(Hv ** 2, -1)), rel=1e-9)
    assert float(obj) == pytest.approx(float(L) - 0.5 * float(F), rel=1e-12)


def test_kernel_step_is_the_projected_signed_gradient(kernel_problem):
    k, X, y, ridge, _ = kernel_problem
    eps, a = 0.05, 0.03
    res = D.deferred_kernel(k, X, y, ridge, eps=eps, beta=0.0, steps=1, step_size=a,
                            num_probes=P_KERNEL, box=(0.0, 1.0), fraction=0.5, seed=1)
    _, L0, _, g = D.kernel_objective(k, X, y, ridge, np.zeros_like(X), beta=0.0,
                                     num_probes=P_KERNEL)
    g = np.asarray(g)
    want = np.zeros_like(X)
    want[res.rows] = np.clip(X[res.rows] - a * np.sign(g[res.rows]), 0, 1) - X[res.rows]
    assert len(res.rows) == 4 and np.all(np.diff(res.rows) > 0)
    np.testing.assert_allclose(res.delta, want, atol=1e-15)
    np.testing.assert_allclose(res.X_poisoned, X + want, atol=1e-15)
    losses, _ = _rbf_krr_loss_hessians(X, y, ridge, 0.6)
    assert res.history["loss"][0] == pytest.approx(np.mean(losses), rel=1e-10)


def test_kernel_attack_respects_budget_and_box_and_raises_curvature(kernel_problem):
    k, X, y, ridge, _ = kernel_problem
    X = X.copy()
    X[0, 0] = 0.0                                          # a pixel on the box edge
    eps = 0.1
    res = D.deferred_kernel(k, X, y, ridge, eps=eps, beta=1.0, steps=6,
                            num_probes=P_KERNEL, box=(0.0, 1.0))
    assert np.abs(res.delta).max() <= eps + 1e-15
    assert res.X_poisoned.min() >= 0.0 and res.X_poisoned.max() <= 1.0
    assert len(res.history["frobenius"]) == 6
    _, H0 = _rbf_krr_loss_hessians(X, y, ridge, 0.6)
    _, H1 = _rbf_krr_loss_hessians(res.X_poisoned, y, ridge, 0.6)
    assert np.mean(np.sum(H1 ** 2, (1, 2))) > 2 * np.mean(np.sum(H0 ** 2, (1, 2)))
    free = D.deferred_kernel(k, X, y, ridge, eps=eps, beta=1.0, steps=2,
                             num_probes=P_KERNEL, box=None)
    assert np.abs(free.delta).max() <= eps + 1e-15


# --------------------------------------------------------------------------- net objective
# Both net tests run the same compiled program: n = 6 rows in chunks of 4, P = 1.

@pytest.fixture(scope="module")
def tiny_mlp():
    r = np.random.default_rng(5)
    X = r.uniform(0.1, 0.9, (6, 3))
    y = np.where(r.standard_normal(6) > 0, 1.0, -1.0)
    params = nets.init(jax.random.PRNGKey(0), 3, 8, depth=1, activation="erf")
    return params, X, y


def test_net_objective_gradient_matches_finite_differences(tiny_mlp):
    params, X, y = tiny_mlp
    delta = 0.05 * np.random.default_rng(1).standard_normal(X.shape)

    def obj(d):
        return D.net_objective(params, nets.apply_fn, X, y, d, loss="mse", beta=0.7, key=2,
                               batch_size=4)

    o, L, _, g = obj(delta)
    h = 1e-6
    for u in np.random.default_rng(3).standard_normal((3,) + X.shape):
        fd = (float(obj(delta + h * u)[0]) - float(obj(delta - h * u)[0])) / (2 * h)
        assert np.sum(np.asarray(g) * u) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # the loss term is the per-example mse loss of the net's outputs
    out = np.asarray(nets.apply_fn(params, jnp.asarray(X + delta)))
    assert float(L) == pytest.approx(np.mean(0.5 * (out - y) ** 2), rel=1e-12)


def test_net_step_is_the_projected_signed_gradient(tiny_mlp):
    params, X, y = tiny_mlp
    cfg = train.TrainConfig(lr=0.05, batch_size=3, epochs=1, loss="mse", seed=4)
    eps, a = 0.05, 0.02
    res = D.deferred_net(params, nets.apply_fn, X, y, cfg, eps=eps, beta=0.0, rounds=1,
                         surrogate_epochs=1, delta_steps=1, step_size=a, batch_size=4,
                         box=(0.0, 1.0))
    trained, _ = train.train(params, nets.apply_fn, X, y, cfg, progress=False)
    _, L, _, g = D.net_objective(trained, nets.apply_fn, X, y, np.zeros_like(X), loss="mse",
                                 beta=0.0, batch_size=4)
    want = np.clip(X - a * np.sign(np.asarray(g)), 0, 1) - X
    np.testing.assert_allclose(res.delta, want, atol=1e-15)
    np.testing.assert_array_equal(res.rows, np.arange(6))
    assert res.history["loss"] == [pytest.approx(float(L), rel=1e-12)]
    assert len(res.history["surrogate_loss"]) == 1


# --------------------------------------------------------------------------- evasion

def test_pgd_reaches_the_linear_worst_case(rng):
    w = jnp.asarray(rng.standard_normal(4))
    X = rng.uniform(0.0, 1.0, (10, 4))
    y = np.where(rng.standard_normal(10) > 0, 1.0, -1.0)
    eps = 0.1
    loss_fn = lambda x, t: -t * (x @ w)                   # margin loss of a linear model
    x_adv = np.asarray(D.pgd_evasion(loss_fn, X, y, eps=eps, steps=10))
    want = np.clip(X - eps * y[:, None] * np.sign(np.asarray(w)), 0.0, 1.0)
    np.testing.assert_allclose(x_adv, want, atol=1e-12)
    # the kernel builder on a linear-kernel KRR model: f(x) = x . (X^T alpha)
    model = krr.fit(kernels.linear(), X, y, 1e-2)
    wk = np.asarray(model.X).T @ np.asarray(model.alpha)
    x_adv = np.asarray(D.pgd_evasion(D.kernel_pgd_loss(model, "margin"), X, y, eps=eps,
                                     steps=5, box=None))
    np.testing.assert_allclose(x_adv, X - eps * y[:, None] * np.sign(wk), atol=1e-12)


def test_robustness_of_a_linear_classifier(rng):
    w = rng.standard_normal(4)
    X = rng.uniform(0.0, 1.0, (40, 4))
    y = np.where(X @ w + 0.2 * rng.standard_normal(40) > np.median(X @ w), 1.0, -1.0)
    b = -np.median(X @ w)
    predict = lambda x: jnp.asarray(x) @ w + b
    loss_fn = lambda x, t: -t * (x @ jnp.asarray(w) + b)
    out = D.robustness(predict, X, y, sigmas=(0.0, 0.1), pgd_eps=(0.05,), loss_fn=loss_fn,
                       multiclass=False)
    clean = float(metrics.clean_accuracy(X @ w + b, y))
    assert out["clean"] == clean and out["noise_0"] == clean
    worst = np.clip(X - 0.05 * y[:, None] * np.sign(w), 0, 1)
    assert out["pgd_0.05"] == float(metrics.clean_accuracy(worst @ w + b, y))
    assert out["pgd_0.05"] < clean
    assert set(out) == {"clean", "noise_0", "noise_0.1", "pgd_0.05"}


def test_net_pgd_loss_is_the_cross_entropy(rng):
    model = nets.cnn(jax.random.PRNGKey(1), input_shape=(4, 4, 1), channels=2, depth=1,
                     pool=1, num_outputs=3)
    x = jnp.asarray(rng.uniform(0, 1, (5, 4, 4, 1)))
    t = jnp.asarray([0, 1, 2, 1, 0])
    logits = np.asarray(nets.apply_fn(model, x))
    want = -(logits - np.log(np.exp(logits).sum(1, keepdims=True)))[np.arange(5), t]
    np.testing.assert_allclose(np.asarray(D.net_pgd_loss(model, nets.apply_fn)(x, t)), want,
                               rtol=1e-12)


# --------------------------------------------------------------------------- checks

def test_project_keeps_budget_and_box(rng):
    X = rng.uniform(0, 1, (7, 3))
    delta = rng.uniform(-1, 1, (7, 3))
    p = np.asarray(D.project(delta, X, 0.2))
    assert np.abs(p).max() <= 0.2 + 1e-15
    assert (X + p).min() >= 0 and (X + p).max() <= 1
    inside = (np.abs(delta) <= 0.2) & (X + delta >= 0) & (X + delta <= 1)
    np.testing.assert_array_equal(p[inside], delta[inside])


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0), "eps"), (dict(eps=-0.1), "eps"), (dict(fraction=0.0), "fraction"),
    (dict(fraction=1.5), "fraction"), (dict(box=(1.0, 0.0)), "box"),
    (dict(num_probes=0), "num_probes"), (dict(steps=0), "steps"), (dict(beta=-1.0), "beta"),
    (dict(box=(0.0, 0.5)), "outside `box`"), (dict(step_size=0.0), "step_size"),
])
def test_bad_inputs_raise(kernel_problem, kwargs, match):
    k, X, y, ridge, _ = kernel_problem
    args = dict(eps=0.1, beta=1.0, steps=1, num_probes=P_KERNEL)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        D.deferred_kernel(k, X, y, ridge, **args)


def test_bad_inputs_raise_elsewhere(kernel_problem, tiny_mlp):
    k, X, y, ridge, _ = kernel_problem
    with pytest.raises(ValueError, match="rows"):
        D.deferred_kernel(k, X, y[:5], ridge, eps=0.1, beta=1.0)
    with pytest.raises(ValueError, match="shape"):
        D.hutchinson_frobenius(lambda v: v, ("a",), 0, 1)
    with pytest.raises(ValueError, match="one loss per example"):
        D.pgd_evasion(lambda x, t: jnp.sum(x), X, y, eps=0.1)
    params, Xn, yn = tiny_mlp
    with pytest.raises(ValueError, match="xent"):
        D.deferred_net(params, nets.apply_fn, Xn, yn.astype(int), train.TrainConfig(),
                       eps=0.1, beta=1.0)
    with pytest.raises(ValueError, match="TrainConfig"):
        D.deferred_net(params, nets.apply_fn, Xn, yn, {}, eps=0.1, beta=1.0)
