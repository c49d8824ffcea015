"""ntk_poison.linear: the closed-form input Hessian against autodiff, its top eigenpair
against numpy, one SGD epoch and the models within an epoch (fractional epochs) against
a hand-written numpy replica, the evaluation times by hand, determinism, and bad inputs.
Float64 (the session turns x64 on)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntk_poison import linear

D, C = 12, 4


def _model(rng, scale=1.0):
    return linear.Linear(jnp.asarray(scale * rng.normal(size=(C, D))),
                         jnp.asarray(rng.normal(size=C)))


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_hessian(W, b, x, kind):
    """The numpy oracle: W^T A W with A = diag p - p p^T (softmax) or I (squares)."""
    if kind == "squares":
        return W.T @ W
    p = _np_softmax(W @ x + b)
    return W.T @ (np.diag(p) - np.outer(p, p)) @ W


@pytest.mark.parametrize("kind", linear.LOSSES)
def test_input_hessian_matches_autodiff_for_any_label(kind, rng):
    params = _model(rng)
    X = rng.normal(size=(3, D))
    H = np.asarray(linear.input_hessian(params, X, kind))
    assert H.shape == (3, D, D)
    auto = jax.jit(jax.vmap(jax.hessian(lambda v, y: linear.example_loss(params, v, y, kind)),
                            in_axes=(0, None)))
    for label in (0, C - 1):                         # label-free: two labels, one Hessian
        np.testing.assert_allclose(H, np.asarray(auto(jnp.asarray(X), jnp.eye(C)[label])),
                                   rtol=1e-10, atol=1e-12)
    for i, x in enumerate(X):
        np.testing.assert_allclose(H[i], _np_hessian(np.asarray(params.W),
                                                     np.asarray(params.b), x, kind),
                                   rtol=1e-12, atol=1e-13)
    if kind == "squares":                            # constant in x
        np.testing.assert_allclose(H[0], H[1], rtol=0, atol=1e-13)
    else:                                            # not zero, and varies with x
        assert np.abs(H[0]).max() > 1e-3
        assert np.abs(H[0] - H[1]).max() > 1e-3


@pytest.mark.parametrize("kind", linear.LOSSES)
def test_top_eigenpair_matches_numpy_eigh(kind, rng):
    params = _model(rng)
    X = 2.0 * rng.normal(size=(5, D))
    vals, vecs = (np.asarray(a) for a in linear.top_eigenpair(params, X, kind))
    assert vals.shape == (5,) and vecs.shape == (5, D)
    W, b = np.asarray(params.W), np.asarray(params.b)
    for i, x in enumerate(X):
        w, V = np.linalg.eigh(_np_hessian(W, b, x, kind))
        assert w[-1] - w[-2] > 1e-6 * w[-1]          # a simple top eigenvalue
        np.testing.assert_allclose(vals[i], w[-1], rtol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(vecs[i]), 1.0, rtol=1e-10)
        np.testing.assert_allclose(abs(vecs[i] @ V[:, -1]), 1.0, rtol=1e-9)


@pytest.mark.parametrize("kind", linear.LOSSES)
def test_one_full_batch_step_is_the_hand_gradient_step(kind, rng):
    n, lr = 20, 0.3
    X = rng.normal(size=(n, D))
    Y = np.eye(C)[rng.integers(0, C, n)]
    p0 = _model(rng, 0.1)
    traj, losses = linear.train(p0, X, Y, kind, optax.sgd(lr), 1)
    W, b = np.asarray(p0.W), np.asarray(p0.b)
    Z = X @ W.T + b
    R = (_np_softmax(Z) if kind == "softmax" else Z) - Y       # dl/dz
    np.testing.assert_allclose(np.asarray(traj.W[1]), W - lr * R.T @ X / n, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(traj.b[1]), b - lr * R.mean(0), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(traj.W[0]), W)
    if kind == "softmax":
        want = np.mean(np.log(np.exp(Z).sum(1)) - (Z * Y).sum(1))
    else:
        want = 0.5 * np.mean(((Z - Y) ** 2).sum(1))
    np.testing.assert_allclose(losses[0], want, rtol=1e-12)


def test_minibatch_epoch_matches_a_numpy_replica(rng):
    n, bs, lr = 23, 5, 0.2                           # 4 minibatches, 3 rows skipped
    X = rng.normal(size=(n, D))
    Y = np.eye(C)[rng.integers(0, C, n)]
    p0 = _model(rng, 0.1)
    traj, _ = linear.train(p0, X, Y, "softmax", optax.sgd(lr), 2, batch_size=bs, key=7)
    W, b = np.asarray(p0.W), np.asarray(p0.b)
    for e in range(2):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.PRNGKey(7), e),
                                                 n))
        for k in range(n // bs):
            idx = perm[k * bs:(k + 1) * bs]
            R = _np_softmax(X[idx] @ W.T + b) - Y[idx]
            W, b = W - lr * R.T @ X[idx] / bs, b - lr * R.mean(0)
        np.testing.assert_allclose(np.asarray(traj.W[e + 1]), W, rtol=1e-11)
        np.testing.assert_allclose(np.asarray(traj.b[e + 1]), b, rtol=1e-11)


def test_fractional_epoch_models_match_a_numpy_replica(rng):
    """4 steps an epoch cut into k = 3 chunks (floor(j 4 / 3) = 0, 1, 2, 4 steps) in the
    first epoch, one chunk in the second: the models after 1, 2, 4 and 8 steps."""
    n, bs, lr = 23, 5, 0.2
    X = rng.normal(size=(n, D))
    Y = np.eye(C)[rng.integers(0, C, n)]
    p0 = _model(rng, 0.1)
    np.testing.assert_array_equal(linear.eval_times(2, n, bs, 3, fine_epochs=1),
                                  [0, 0.25, 0.5, 1.0, 2.0])
    traj, losses = linear.train(p0, X, Y, "softmax", optax.sgd(lr), 2, batch_size=bs, key=7,
                                evals_per_epoch=3, fine_epochs=1)
    assert traj.W.shape == (5, C, D) and losses.shape == (4,)
    W, b = np.asarray(p0.W), np.asarray(p0.b)
    models, chunk_losses, step_losses = [], [], []
    for e in range(2):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.PRNGKey(7), e),
                                                 n))
        for k in range(n // bs):
            idx = perm[k * bs:(k + 1) * bs]
            Z = X[idx] @ W.T + b
            step_losses.append(np.mean(np.log(np.exp(Z).sum(1)) - (Z * Y[idx]).sum(1)))
            R = _np_softmax(Z) - Y[idx]
            W, b = W - lr * R.T @ X[idx] / bs, b - lr * R.mean(0)
            if (e, k) in ((0, 0), (0, 1), (0, 3), (1, 3)):        # after 1, 2, 4, 8 steps
                models.append((W, b))
                chunk_losses.append(np.mean(step_losses))
                step_losses = []
    for i, (W, b) in enumerate(models):
        np.testing.assert_allclose(np.asarray(traj.W[i + 1]), W, rtol=1e-11)
        np.testing.assert_allclose(np.asarray(traj.b[i + 1]), b, rtol=1e-11)
    np.testing.assert_allclose(losses, chunk_losses, rtol=1e-12)
    whole, _ = linear.train(p0, X, Y, "softmax", optax.sgd(lr), 2, batch_size=bs, key=7)
    np.testing.assert_allclose(np.asarray(whole.W[1:]), np.asarray(traj.W[[3, 4]]), rtol=1e-13)


def test_chunk_bounds_and_times_by_hand():
    np.testing.assert_array_equal(linear.chunk_bounds(600, 20), np.arange(21) * 30)
    np.testing.assert_array_equal(linear.chunk_bounds(17, 4), [0, 4, 8, 12, 17])
    np.testing.assert_array_equal(linear.chunk_bounds(3, 8), [0, 1, 2, 3])   # cut to 3
    np.testing.assert_array_equal(linear.chunk_bounds(1, 4), [0, 1])         # full batch
    assert linear.steps_per_epoch(60000, 100) == 600 and linear.steps_per_epoch(50) == 1
    t = linear.eval_times(3, 1700, 100, 4, fine_epochs=2)    # 17 steps an epoch
    np.testing.assert_allclose(t, [0, 4 / 17, 8 / 17, 12 / 17, 1, 1 + 4 / 17, 1 + 8 / 17,
                                   1 + 12 / 17, 2, 3], rtol=1e-15)
    np.testing.assert_allclose(linear.eval_times(3, 1700, 100, 4),        # fine in all
                               np.r_[t[:9], 2 + t[1:4], 3], rtol=1e-15)


def test_same_seed_same_numbers(rng):
    X = rng.normal(size=(30, D)).astype(np.float32)
    Y = np.eye(C, dtype=np.float32)[rng.integers(0, C, 30)]
    opt = optax.sgd(0.1)
    p0 = linear.init(D, C, seed=3, scale=0.5, dtype=np.float32)
    assert p0.W.dtype == np.float32 and np.abs(p0.W).max() > 0 and not p0.b.any()
    np.testing.assert_array_equal(p0.W, linear.init(D, C, 3, 0.5, np.float32).W)
    runs = [linear.train(p0, X, Y, "squares", opt, 3, batch_size=4, key=k)[0] for k in
            (1, 1, 2)]
    np.testing.assert_array_equal(np.asarray(runs[0].W), np.asarray(runs[1].W))
    assert runs[0].W.dtype == np.float32
    assert not np.allclose(np.asarray(runs[0].W[-1]), np.asarray(runs[2].W[-1]))


def test_bad_inputs_name_the_argument(rng):
    p = _model(rng)
    X, Y = rng.normal(size=(6, D)), np.eye(C)[[0, 1, 2, 3, 0, 1]]
    opt = optax.sgd(0.1)
    cases = [
        (lambda: linear.top_eigenpair(p, X, "hinge"), "kind"),
        (lambda: linear.top_eigenpair((p.W, p.b), X, "softmax"), "params"),
        (lambda: linear.top_eigenpair(p, X[:, :-1], "softmax"), "X"),
        (lambda: linear.input_hessian(p, np.full(D, np.nan), "softmax"), "x"),
        (lambda: linear.loss(p, X, Y[:, :-1], "softmax"), "Y"),
        (lambda: linear.train(p, X, Y[:-1], "softmax", opt, 1), "Y"),
        (lambda: linear.train(p, X, Y, "softmax", opt, 0), "epochs"),
        (lambda: linear.train(p, X, Y, "softmax", opt, 1, batch_size=0), "batch_size"),
        (lambda: linear.train(p, X, Y, "softmax", "sgd", 1), "optimizer"),
        (lambda: linear.train(p, X, Y, "softmax", opt, 1, evals_per_epoch=0),
         "evals_per_epoch"),
        (lambda: linear.train(p, X, Y, "softmax", opt, 1, fine_epochs=0), "fine_epochs"),
        (lambda: linear.eval_times(2, 10, 2, 1.5), "evals_per_epoch"),
        (lambda: linear.init(D, 0), "c"),
        (lambda: linear.init(D, C, scale=-1.0), "scale"),
        (lambda: linear.Linear(p.W, p.b[:-1]) and linear.logit_hessian(
            linear.Linear(p.W, p.b[:-1]), X, "softmax"), "params.b"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=f"`{name}`"):
            call()
