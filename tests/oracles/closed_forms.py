"""Closed-form kernels and RBF kernel ridge regression, in float64 numpy.

Conventions match THEORY.md section 1: the ridge is relative, the absolute ridge on
the diagonal is ``n * lam`` with ``n`` the number of training points.
"""

from __future__ import annotations

import numpy as np


def _flat(x):
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def pairwise_sq_dists(x1, x2):
    """``||x1_i - x2_j||^2`` by explicit differences (not the GEMM identity)."""
    a, b = _flat(x1), _flat(x2)
    diff = a[:, None, :] - b[None, :, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def rbf_gram(x1, x2, length_scale=1.0, variance=1.0):
    """RBF kernel ``variance * exp(-||x - x'||^2 / (2 l^2))``."""
    return variance * np.exp(-pairwise_sq_dists(x1, x2) / (2.0 * length_scale ** 2))


def linear_gram(x1, x2, bias=0.0, scale=1.0):
    """Linear kernel ``scale * x . x' + bias``."""
    return scale * _flat(x1) @ _flat(x2).T + bias


def matern52_gram(x1, x2, length_scale=1.0, variance=1.0):
    """Matern-5/2 kernel ``variance (1 + sqrt5 r/l + 5 r^2/(3 l^2)) exp(-sqrt5 r/l)``.

    Rasmussen & Williams (2006), eq. (4.17) with nu = 5/2.
    """
    r = np.sqrt(pairwise_sq_dists(x1, x2)) / length_scale
    s5 = np.sqrt(5.0)
    return variance * (1.0 + s5 * r + 5.0 / 3.0 * r * r) * np.exp(-s5 * r)


def krr_alpha(K, y, lam):
    """Dual weights ``(K + n lam I)^-1 y`` by a direct dense solve (np.linalg.solve)."""
    K = np.asarray(K, dtype=np.float64)
    n = K.shape[0]
    return np.linalg.solve(K + n * lam * np.eye(n), np.asarray(y, dtype=np.float64))


def krr_predict(gram, X, y, lam, x, **kernel_params):
    """KRR prediction ``k(x, X) (K + n lam I)^-1 y`` for a closed-form ``gram``."""
    alpha = krr_alpha(gram(X, X, **kernel_params), y, lam)
    return gram(x, X, **kernel_params) @ alpha


def rbf_krr_grad(X, alpha, x, length_scale=1.0, variance=1.0):
    """Input gradient of the RBF KRR predictor (closed form), shape ``(m, d)``.

        grad_x f(x) = sum_i alpha_i * (-(x - x_i) / l^2) * k(x, x_i)
    """
    X = _flat(X)
    x = _flat(x)
    k = rbf_gram(x, X, length_scale, variance)                    # (m, n)
    diff = x[:, None, :] - X[None, :, :]                          # (m, n, d)
    return -np.einsum("mn,mnd->md", k * alpha[None, :], diff) / length_scale ** 2


def rbf_krr_hessian(X, alpha, x, length_scale=1.0, variance=1.0):
    """Input Hessian of the RBF KRR predictor (closed form), shape ``(m, d, d)``.

        hess_x f(x) = sum_i alpha_i k(x, x_i) [ (x - x_i)(x - x_i)^T / l^4 - I / l^2 ]
    """
    X = _flat(X)
    x = _flat(x)
    l2 = length_scale ** 2
    k = rbf_gram(x, X, length_scale, variance) * alpha[None, :]   # (m, n)
    diff = x[:, None, :] - X[None, :, :]
    outer = np.einsum("mn,mnd,mne->mde", k, diff, diff) / l2 ** 2
    eye = np.eye(X.shape[1])[None] * (k.sum(axis=1)[:, None, None] / l2)
    return outer - eye


def mse_flow_alpha(K, y, lam_abs, n_norm, times):
    """Dual weights ``(T, n)`` of MSE gradient flow from f = 0 (THEORY.md section 2).

    ``dc/dt = -(1/n_norm) [(K + lam_abs I) c - y]``, so that
    ``c(t) = Q diag((1 - exp(-e t / n_norm)) / e) Q^T y`` with ``K + lam_abs I = Q e Q^T``.
    """
    A = np.asarray(K, np.float64) + lam_abs * np.eye(len(y))
    e, Q = np.linalg.eigh(0.5 * (A + A.T))
    qy = Q.T @ np.asarray(y, np.float64)
    g = -np.expm1(-np.outer(np.asarray(times, float), e) / n_norm) / e[None]   # (T, n)
    return (g * qy[None]) @ Q.T
