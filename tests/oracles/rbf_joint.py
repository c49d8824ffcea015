"""The RBF kernel's joint Gram of values and input gradients, in float64 numpy from
its closed-form derivatives (no autodiff, no ntk_poison).

For ``k(x, x') = exp(-|x - x'|^2 / (2 l^2))`` and ``r = x_i - x_j``::

    cov(f(x_i), f(x_j))          = k_ij
    cov(f(x_i), d_b f(x_j))      = r_b / l^2 k_ij
    cov(d_a f(x_i), d_b f(x_j))  = (delta_ab / l^2 - r_a r_b / l^4) k_ij

Rows ``[f(x_1..x_n); d_a f(x_i)]`` with the gradient block point-major (``n + i d + a``),
the layout of ``ntk_poison.joint.joint_gram``.
"""

from __future__ import annotations

import numpy as np


def rbf_joint_gram(X, length_scale):
    X = np.asarray(X, np.float64)
    n, d = X.shape
    l2 = length_scale ** 2
    R = X[:, None, :] - X[None, :, :]                       # r_ij = x_i - x_j
    K = np.exp(-(R ** 2).sum(-1) / (2 * l2))
    vg = (R / l2 * K[..., None]).reshape(n, n * d)          # (i, j b)
    gg = ((np.eye(d)[None, None] / l2 - R[..., :, None] * R[..., None, :] / l2 ** 2)
          * K[..., None, None])                             # (i, j, a, b)
    gg = gg.transpose(0, 2, 1, 3).reshape(n * d, n * d)
    return np.block([[K, vg], [vg.T, gg]])


def exact_hat_trace(Kfull, n, lam, kappa):
    """``tr[Kfull[:n] (W Kfull + n lam I)^-1 [:, :n]]``: the trace of the exact
    penalised model's hat matrix ``y -> f(X)`` (c = (W Kfull + n lam I)^-1 [y; 0])."""
    N = len(Kfull)
    W = np.r_[np.ones(n), np.full(N - n, kappa)]
    M = W[:, None] * Kfull + n * lam * np.eye(N)
    return float(np.trace(Kfull[:n] @ np.linalg.solve(M, np.eye(N)[:, :n])))
