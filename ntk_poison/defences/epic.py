"""EPIC's building blocks (Yang et al. 2022, "Not All Poisons are Created Equal"; THEORY.md
section 5): greedy facility location, and the exact per-example gradient distances of
the kernel regime. (Issue 13, first part: the per-class selection, the drop rule, the
detector and the training-engine arm come next.)

**Facility location.** For a similarity matrix ``S >= 0`` (n x n) and a set A of
medoids, ``F(A) = sum_i max_{j in A} S_ij`` (``F({}) = 0``) is monotone submodular, so
the greedy choice, adding the j with the largest gain ``sum_i max(0, S_ij - m_i)``
(``m`` the running max), reaches ``F >= (1 - 1/e) F(OPT)`` (Nemhauser, Wolsey & Fisher
1978). EPIC's similarity is ``exp(-||g_i - g_j|| / C)`` between last-layer gradients.

**Kernel-regime gradients.** For the linearised model ``f = phi(x)^T w`` and the squared
loss ``1/2 (f(x_i) - y_i)^2`` the per-example gradient is ``g_i = r_i phi(x_i)`` with
residual ``r_i = f(x_i) - y_i``, so distances need only the Gram matrix:

    ||g_i - g_j||^2 = r_i^2 k_ii + r_j^2 k_jj - 2 r_i r_j k_ij

For C outputs (one-hot targets, ``w`` a d x C matrix) the gradient is ``phi(x_i) r_i^T``
and ``||g_i - g_j||_F^2 = |r_i|^2 k_ii + |r_j|^2 k_jj - 2 (r_i . r_j) k_ij``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate

Array = Any

__all__ = ["facility_location", "facility_value", "gradient_distances"]


def facility_location(S: Array, k: int) -> np.ndarray:
    """Greedy facility location: ``k`` medoid indices, in the order picked.

    Args:
      S: a similarity matrix ``(n, n)``, finite and >= 0 (row i: how well medoid j
        serves point i).
      k: the number of medoids, ``1 <= k <= n``.

    Returns:
      ``(k,)`` int indices; each maximises the gain ``sum_i max(0, S_ij - m_i)`` given
      the earlier ones (ties: the smallest index). One jit-compiled ``lax.fori_loop``.
    """
    S = np.asarray(_validate.array("S", S, ndim=2), dtype=np.float64)
    n = S.shape[0]
    if S.shape != (n, n):
        raise ValueError(f"`S` must be square (n, n), got shape {S.shape}.")
    if not np.all(np.isfinite(S)) or np.min(S) < 0:
        raise ValueError("`S` must be finite and >= 0 (a similarity, e.g. exp(-distance)).")
    if not _validate.is_int_scalar(k) or not 1 <= k <= n:
        raise ValueError(f"`k` must be an int in [1, {n}] (medoids among n points), got {k!r}.")
    return np.asarray(_greedy(jnp.asarray(S), int(k)))


def facility_value(S: Array, medoids: Array) -> float:
    """``F(A) = sum_i max_{j in A} S_ij`` (0 for an empty A)."""
    S = np.asarray(S, dtype=np.float64)
    idx = np.asarray(medoids, dtype=int)
    return float(S[:, idx].max(axis=1).sum()) if idx.size else 0.0


def gradient_distances(K: Array, residuals: Array) -> np.ndarray:
    """Exact per-example gradient distances ``||g_i - g_j||`` of the kernel regime.

    Args:
      K: the Gram matrix ``(n, n)`` of the (empirical or analytic) NTK at the training
        points.
      residuals: ``r = f(X) - y``, ``(n,)`` or ``(n, C)``.

    Returns:
      ``(n, n)`` distances (module docstring), with rounding negatives clamped to 0.
    """
    K = np.asarray(_validate.array("K", K, ndim=2), dtype=np.float64)
    r = np.asarray(_validate.array("residuals", residuals, ndim=(1, 2)), dtype=np.float64)
    n = K.shape[0]
    if K.shape != (n, n):
        raise ValueError(f"`K` must be square (n, n), got shape {K.shape}.")
    if r.shape[0] != n:
        raise ValueError(f"`residuals` must have one row per point of `K` ({n}), got "
                         f"shape {r.shape}.")
    r = r.reshape(n, -1)
    R = r @ r.T                                          # r_i . r_j
    d = np.diag(K) * np.diag(R)                          # |r_i|^2 k_ii
    sq = d[:, None] + d[None, :] - 2.0 * R * K
    return np.sqrt(np.maximum(sq, 0.0))


@functools.partial(jax.jit, static_argnums=1)
def _greedy(S, k):
    n = S.shape[0]

    def pick(t, carry):
        best, chosen = carry
        gain = jnp.sum(jnp.maximum(S - best[:, None], 0.0), axis=0)
        gain = jnp.where(jnp.isin(jnp.arange(n), chosen), -1.0, gain)   # unfilled: -1
        j = jnp.argmax(gain)                             # first maximum: smallest index
        return jnp.maximum(best, S[:, j]), chosen.at[t].set(j.astype(jnp.int32))

    best0 = jnp.zeros((n,), S.dtype)
    _, chosen = jax.lax.fori_loop(0, k, pick, (best0, jnp.full((k,), -1, jnp.int32)))
    return chosen
