"""AGT against the exact certificate where both exist (issue 14's tightness check).

A linear model f(x) = x W + b on fixed features, trained by full-batch gradient descent
on ``sum (f - y)^2`` (``agt.loss_per_sample``'s MSE, mean over the batch), is linear in
the labels: with phi = [x, 1], P = I - (2 lr / n) Phi^T Phi,

    w_T = P^T w_0 + sum_{s < T} P^s (2 lr / n) Phi^T y,   f_T(x) = phi(x) . w_T = c(x) + a(x) . y

so the exact worst case over changing at most k labels by at most eps each is
``f_T(x) +- eps * (sum of the k largest |a_i(x)|)`` (as ``certify.label_change_bounds``
for kernel models). AGT's box must contain it (soundness), and its width over the exact
width is the tightness ratio (>= 1).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ntk_poison import x64_scope
from ntk_poison.certify import agt


def _exact(X, y, W0, b0, lr, steps, x, eps, k):
    n = len(X)
    Phi = np.c_[X, np.ones(n)]
    P = np.eye(Phi.shape[1]) - 2 * lr / n * Phi.T @ Phi
    w0 = np.r_[W0[:, 0], b0]
    S = np.zeros_like(P)
    Pt = np.eye(P.shape[0])
    for _ in range(steps):
        S += Pt
        Pt = P @ Pt
    phi = np.c_[x, np.ones(len(x))]
    A = phi @ S @ (2 * lr / n * Phi.T)                 # (m, n): f = c + A y
    f = phi @ (Pt @ w0) + A @ y
    top = np.sort(np.abs(A), axis=1)[:, ::-1][:, :k].sum(1)
    return f, f - eps * top, f + eps * top


@pytest.mark.parametrize("k,eps,steps", [(1, 0.5, 3), (3, 0.2, 5), (5, 1.0, 2)])
def test_agt_contains_the_exact_label_certificate(k, eps, steps):
    with x64_scope(True):
        rng = np.random.default_rng(k)
        X = rng.normal(size=(24, 4)) / 2
        y = X @ rng.normal(size=4) + 0.1 * rng.normal(size=24)
        x = rng.normal(size=(7, 4)) / 2
        params = agt.init_mlp(jax.random.PRNGKey(k), [4, 1])
        lr = 0.2
        conf = agt.AGTConfig(learning_rate=lr, n_steps=steps, loss="mse", label_k_poison=k,
                             label_epsilon=eps)
        box = agt.train(params, X, y[:, None], conf)
        f_l, f_n, f_u = (np.asarray(v)[:, 0] for v in agt.output_bounds(box, x))
        W0, b0 = (np.asarray(v) for v in params[0])
        f, lo, hi = _exact(X, y, W0, b0, lr, steps, x, eps, k)
        np.testing.assert_allclose(f_n, f, rtol=1e-10, atol=1e-12)   # nominal = plain GD
        assert np.all(f_l <= lo + 1e-10) and np.all(f_u >= hi - 1e-10)  # sound
        ratio = (f_u - f_l) / (hi - lo)
        assert np.all(ratio >= 1 - 1e-9)
