"""The NNGP / NTK recursion of a small ReLU conv net with average pooling, in numpy.

Architecture (as :func:`ntk_poison.kernels.stax_cnn`, NTK parameterisation):
``depth x [Conv(k x k, SAME, zero padding), Relu, AvgPool(p, stride p) if p > 1]``,
``Flatten``, ``[Dense(hidden), Relu]``, ``Dense``. Every layer has weight scale
``W_std`` (``W_out`` at the readout) and bias scale ``b_std``.

All pixels of all n images are one index set ``(image, pixel)``; a covariance is an
``(n HW, n HW)`` matrix (Novak et al. 2019, Arora et al. 2019). With ``A(M)(p, q) =
(1/k^2) sum_o M(p + o, q + o)`` (o over the filter's offsets, zero outside the image):

* input: ``K_0(p, q) = x_p . x'_q / C``, ``T_0 = 0`` (T: the NTK of the activations);
* conv: ``S = W_std^2 A(K) + b_std^2``, ``Theta = S + W_std^2 A(T)``;
* relu (arc-cosine, Cho & Saul 2009): ``K = kappa_1(S)``, ``T = kappa_0(S) * Theta``;
* pool (linear): ``K = P K P^T``, ``T = P T P^T`` (P averages each p x p window);
* flatten + dense: ``S(x, x') = W^2 mean_p K(x_p, x'_p) + b_std^2`` (same pixel p),
  ``Theta = S + W^2 mean_p T(x_p, x'_p)``; a hidden dense layer applies the relu
  step to these ``(n, n)`` matrices and another dense step (without the mean).

A variance of 0 (an all-zero window, no bias) gives ``kappa_1 = 0`` and ``T = 0``.
"""

from __future__ import annotations

import numpy as np


def _relu(S, Theta):
    d = np.sqrt(np.clip(np.diag(S), 0.0, None))
    norm = np.outer(d, d)
    safe = np.where(norm > 0, norm, 1.0)
    cos = np.clip(np.where(norm > 0, S / safe, 1.0), -1.0, 1.0)
    t = np.arccos(cos)
    np.fill_diagonal(t, 0.0)                      # exact at identical points
    K = norm * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi)
    Kdot = np.where(norm > 0, (np.pi - t) / (2 * np.pi), 0.0)
    return K, Kdot * Theta


def _conv_mean(M, n, H, W, r):
    """``A(M)``: the mean of ``M(p + o, q + o)`` over the (2r+1)^2 offsets o, zero outside."""
    k = 2 * r + 1
    P = np.pad(M.reshape(n, H, W, n, H, W),
               ((0, 0), (r, r), (r, r), (0, 0), (r, r), (r, r)))
    out = np.zeros((n, H, W, n, H, W))
    for dy in range(k):
        for dx in range(k):
            out += P[:, dy:dy + H, dx:dx + W, :, dy:dy + H, dx:dx + W]
    return out.reshape(n * H * W, n * H * W) / (k * k)


def _avg_pool(M, n, H, W, p):
    """``P M P^T`` with P the mean over each p x p window (of both pixel indices)."""
    M = M.reshape(n, H // p, p, W // p, p, n, H // p, p, W // p, p)
    m = n * (H // p) * (W // p)
    return M.mean(axis=(2, 4, 7, 9)).reshape(m, m)


def cnn_kernels(x, depth=2, filter_size=3, pool=1, hidden=False, W_std=1.0, b_std=0.0,
                W_out=None):
    """``(nngp, ntk)``, each ``(n, n)``, of the images ``x (n, H, W, C)``.

    ``filter_size`` must be odd (SAME padding is then symmetric)."""
    x = np.asarray(x, dtype=np.float64)
    n, H, W, C = x.shape
    W_out = W_std if W_out is None else W_out
    assert filter_size % 2 == 1
    r = filter_size // 2
    flat = x.reshape(n * H * W, C)
    K = flat @ flat.T / C
    T = np.zeros_like(K)
    for _ in range(depth):
        S = W_std ** 2 * _conv_mean(K, n, H, W, r) + b_std ** 2
        Theta = S + W_std ** 2 * _conv_mean(T, n, H, W, r)
        K, T = _relu(S, Theta)
        if pool > 1:
            K, T = _avg_pool(K, n, H, W, pool), _avg_pool(T, n, H, W, pool)
            H, W = H // pool, W // pool

    def same_pixel_mean(M):
        return np.einsum("ipjp->ij", M.reshape(n, H * W, n, H * W)) / (H * W)

    K, T = same_pixel_mean(K), same_pixel_mean(T)
    if hidden:
        S = W_std ** 2 * K + b_std ** 2
        K, T = _relu(S, S + W_std ** 2 * T)
    S = W_out ** 2 * K + b_std ** 2
    return S, S + W_out ** 2 * T
