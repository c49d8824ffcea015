"""Feature maps for representation-based detectors (e.g. spectral signatures).

A wide network's representation of its training data, in the kernel regime, is its
kernel: two views of it are given here.

* :func:`kernel_pca_features`: centred kernel PCA (Schoelkopf, Smola & Mueller 1998,
  "Nonlinear Component Analysis as a Kernel Eigenvalue Problem"). Exact, O(n^3).
* :func:`empirical_ntk_features`: the per-example parameter gradients of a finite
  network, whose Gram matrix is the empirical NTK (Jacot et al. 2018). O(n P) memory.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ntk_poison import _validate

Array = Any

__all__ = ["kernel_pca_features", "empirical_ntk_features", "centre_gram"]


def centre_gram(K: Array) -> np.ndarray:
    """The double-centred Gram ``Kc = C K C``, ``C = I - 1 1^T / n`` (float64)."""
    K = np.asarray(K, dtype=np.float64)
    return (K - K.mean(axis=0, keepdims=True) - K.mean(axis=1, keepdims=True)
            + K.mean())


def kernel_pca_features(k: Callable, X: Array, n_components: int) -> np.ndarray:
    """Centred kernel-PCA coordinates of the training points.

        Kc = C K C = sum_j w_j u_j u_j^T       (eigendecomposition, w descending)
        Phi[i, j] = sqrt(w_j) u_j[i]           (j = 1..n_components)

    so ``Phi Phi^T`` is the best rank-``n_components`` approximation of ``Kc``, and
    equals ``Kc`` itself once ``n_components >= rank(Kc)`` (at most ``n - 1``:
    centring removes the constant vector). These are the coordinates of the centred
    feature vectors ``phi(x_i) - mean phi`` on the kernel's principal axes.

    Args:
      k: a kernel (``ntk_poison.kernels.Kernel`` or any ``k(X1, X2) -> (n1, n2)``).
      X: inputs ``(n, *input_shape)``.
      n_components: ``1 <= n_components <= n``.

    Returns:
      ``(n, n_components)`` float64. Negative eigenvalues (round-off) are clipped to
      0; each component is signed so its largest-magnitude entry is positive.
      Cost: the ``n x n`` Gram and an ``O(n^3)`` eigendecomposition.
    """
    if not callable(k):
        raise ValueError(f"`k` must be a kernel k(X1, X2) -> Gram, got "
                         f"{type(k).__name__}.")
    _validate.array("X", X, ndim=(2, 3, 4))
    n = int(np.shape(X)[0])
    if (not _validate.is_int_scalar(n_components)) or not 1 <= n_components <= n:
        raise ValueError(f"`n_components` must be an int in [1, n = {n}], got "
                         f"{n_components!r}.")
    _validate.fits_in_memory(f"The Gram matrix for n={n} points", 3 * n * n, 8,
                             "Subsample X first (ntk_poison.data.subset).")
    K = np.asarray(k(X, X), dtype=np.float64)
    if K.shape != (n, n) or not np.all(np.isfinite(K)):
        raise ValueError(f"`k(X, X)` must be a finite ({n}, {n}) matrix, got shape "
                         f"{K.shape}.")
    Kc = centre_gram(0.5 * (K + K.T))
    w, U = np.linalg.eigh(Kc)
    w, U = w[::-1][:n_components], U[:, ::-1][:, :n_components]
    idx = np.argmax(np.abs(U), axis=0)
    sign = np.sign(U[idx, np.arange(U.shape[1])])
    U = U * np.where(sign == 0, 1.0, sign)
    return U * np.sqrt(np.clip(w, 0.0, None))


def empirical_ntk_features(apply_fn: Callable, params: Any, X: Array, *,
                           output: Optional[int] = None,
                           batch_size: Optional[int] = None) -> np.ndarray:
    """Per-example parameter gradients, flattened: the empirical NTK's feature map.

        Phi[i] = vec( d f(params, x_i) / d params )      (P = number of parameters)

    ``Phi Phi^T`` is the empirical NTK Gram matrix of the network at ``params``
    (Jacot, Gabriel & Hongler 2018), so spectral signatures on ``Phi`` see the data
    as the linearised network does. Computed as ``jax.vmap(jax.grad(f_i))`` over
    points (in chunks of ``batch_size`` with ``lax.map``).

    Cost: one backward pass per example (``O(n)`` network passes) and ``n * P``
    floats of output, P the parameter count: a 100k-parameter net on 10k points is
    8 GB in float64. Project to fewer dimensions (e.g. a random projection) for
    large nets.

    Args:
      apply_fn: ``apply_fn(params, x_batch) -> (batch,)``, ``(batch, 1)`` or
        ``(batch, c)``: a stax ``apply_fn`` or a Flax ``model.apply`` (with
        ``params`` the variables dict).
      params: the parameter pytree.
      X: inputs ``(n, *input_shape)``.
      output: for a ``c > 1`` output, which output's gradient to take; None takes
        the gradient of every output and concatenates them (``c * P`` features, c
        times the cost).
      batch_size: points differentiated at once (default: all).

    Returns:
      ``(n, P)`` (or ``(n, c * P)``) features in the parameters' dtype.
    """
    if not callable(apply_fn):
        raise ValueError(f"`apply_fn` must be callable apply_fn(params, x_batch), got "
                         f"{type(apply_fn).__name__}.")
    _validate.array("X", X, ndim=(2, 3, 4))
    X = jnp.asarray(X)
    n = X.shape[0]
    flat, unravel = ravel_pytree(params)
    P = int(flat.size)
    try:
        out = jax.eval_shape(lambda p, x: apply_fn(p, x), params,
                             jax.ShapeDtypeStruct((1,) + X.shape[1:], X.dtype))
    except Exception as e:
        raise ValueError(f"`apply_fn(params, X[:1])` failed: {type(e).__name__}: {e}. "
                         "It must take (params, a batch of inputs).") from e
    c = int(np.prod(out.shape[1:])) if len(out.shape) > 1 else 1
    if output is not None:
        if not _validate.is_int_scalar(output) or not 0 <= output < c:
            raise ValueError(f"`output` must be an int in [0, {c}), got {output!r}.")
    n_out = 1 if (c == 1 or output is not None) else c
    _validate.fits_in_memory(f"empirical_ntk_features' output (n, {n_out} * P) = "
                             f"({n}, {n_out * P})", n * n_out * P, flat.dtype.itemsize,
                             "Use fewer points, pick one `output`, or a smaller network.")
    if batch_size is None:
        batch_size = max(1, n)
    _validate.nonneg("batch_size", batch_size, integer=True, positive=True)

    def f_one(p_flat, x):
        y = jnp.reshape(apply_fn(unravel(p_flat), x[None]), (-1,))
        return y if output is None else y[output]

    if n_out == 1 and output is None:
        def per_example(x):
            return jax.grad(lambda p: f_one(p, x)[0])(flat)
    elif n_out == 1:
        def per_example(x):
            return jax.grad(lambda p: f_one(p, x))(flat)
    else:
        def per_example(x):
            return jax.jacrev(lambda p: f_one(p, x))(flat).reshape(-1)

    feats = jax.jit(lambda xs: jax.lax.map(per_example, xs, batch_size=int(batch_size))
                    )(X)
    return np.asarray(feats)
