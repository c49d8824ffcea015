"""Kernel ridge regression, the exact model of a wide network (THEORY.md section 1).

    f(x) = k(x, X) alpha,    alpha = (K + n*ridge*I)^-1 y,    K = k(X, X),  n = len(X)

The ridge is relative: the absolute ridge added to the diagonal is ``n * ridge``,
so it matches the objective ``(1/2n) sum (f(x_i) - y_i)^2 + (ridge/2) ||f||_H^2``.

A fitted :class:`KRRModel` is an immutable pytree (the kernel is static metadata),
so it can be passed through ``jax.jit`` and ``jax.vmap``. Input derivatives are
autodiff of the kernel, vmap'd over points:

* ``input_grad``: ``jax.grad`` of the scalar prediction (reverse mode: one pass per
  point whatever d is), shape ``(m, *input_shape)``;
* ``input_hessian``: ``jax.hessian`` (forward over reverse) of the prediction as a
  function of the flattened input, shape ``(m, d, d)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate
from ntk_poison.kernels import Kernel

Array = Any

__all__ = ["KRRModel", "fit", "solve_psd", "check_kernel", "as_inputs"]


def check_kernel(k: Any) -> Kernel:
    if not isinstance(k, Kernel):
        raise ValueError(
            f"`k` must be an ntk_poison.kernels.Kernel, got {type(k).__name__}; build one "
            "with kernels.get(name, ...) or wrap a function with kernels.Kernel(fn).")
    return k


def as_inputs(k: Kernel, name: str, x: Array, *, single_ok: bool = False) -> jax.Array:
    """Validate a batch of inputs for kernel ``k`` and return it as a jax array.

    With ``single_ok`` a single input (no batch axis) is accepted and given one.
    """
    _validate.array(name, x)
    x = jnp.asarray(x)
    if single_ok and x.ndim == k.input_rank:
        x = x[None]
    k.check_inputs(name, x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def model_inputs(k: Kernel, X: jax.Array, dtype, x: Array) -> jax.Array:
    """Validate query inputs ``x`` against a fitted model's training inputs ``X``."""
    x = as_inputs(k, "x", x)
    _validate.same_trailing("x", x, "X (training inputs)", X, k.input_rank)
    return x.astype(dtype)


def map_batches(fn, args, x: jax.Array, batch_size: Optional[int], axis: int = 0):
    """``fn(*args, x)`` over row blocks of ``x`` of at most ``batch_size`` points,
    concatenated along ``axis`` (bounds memory; each block size compiles once)."""
    if batch_size is not None:
        _validate.nonneg("batch_size", batch_size, integer=True, positive=True)
    if batch_size is None or x.shape[0] <= batch_size:
        return fn(*args, x)
    return jnp.concatenate([fn(*args, x[i:i + batch_size])
                            for i in range(0, x.shape[0], batch_size)], axis=axis)


def solve_psd(A: Array, b: Array, *, what: str = "the kernel matrix K + n*ridge*I"
              ) -> jax.Array:
    """Solve ``A x = b`` for symmetric positive-definite ``A`` by Cholesky.

    Raises a ValueError (not NaNs) if ``A`` is not numerically positive definite.
    """
    L, ok = _cholesky(A)
    if not bool(ok):
        raise ValueError(
            f"{what} is not positive definite in {A.dtype} (Cholesky failed). Increase "
            "`ridge`, check the kernel is positive definite, or enable float64 with "
            "ntk_poison.enable_x64().")
    return _cho_solve(L, b)


@jax.jit
def _cholesky(A):
    """The Cholesky factor and whether it is finite (one compiled program)."""
    L = jnp.linalg.cholesky(A)
    return L, jnp.all(jnp.isfinite(L))


@jax.jit
def _cho_solve(L, b):
    return jax.scipy.linalg.cho_solve((L, True), b)


@functools.partial(jax.jit, static_argnums=0)
def _gram_plus_ridge(k: Kernel, X, shift):
    K = k.fn(X, X)
    return K + shift * jnp.eye(K.shape[0], dtype=K.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _predict(k: Kernel, X, alpha, x):
    return k.fn(x, X) @ alpha


def _scalar_fn(k: Kernel, X, alpha):
    """The prediction at one input (no batch axis)."""

    def f(x):
        return (k.fn(x[None], X) @ alpha)[0]

    return f


@functools.partial(jax.jit, static_argnums=0)
def _input_grad(k: Kernel, X, alpha, x):
    return jax.vmap(jax.grad(_scalar_fn(k, X, alpha)))(x)


@functools.partial(jax.jit, static_argnums=0)
def _input_jacobian(k: Kernel, X, alpha, x):
    return jax.vmap(jax.jacrev(_scalar_fn(k, X, alpha)))(x)


@functools.partial(jax.jit, static_argnums=0)
def _input_hessian(k: Kernel, X, alpha, x):
    f = _scalar_fn(k, X, alpha)
    shape = x.shape[1:]

    def f_flat(v):
        return f(v.reshape(shape))

    return jax.vmap(jax.hessian(f_flat))(x.reshape(x.shape[0], -1))


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["X", "alpha"], meta_fields=["kernel", "ridge"])
@dataclasses.dataclass(frozen=True)
class KRRModel:
    """A fitted kernel ridge regression model (immutable pytree).

    Attributes:
      kernel: the kernel (static).
      X: training inputs ``(n, *input_shape)``.
      alpha: dual weights ``(n,)`` or ``(n, c)``.
      ridge: the relative ridge; the absolute one is ``n * ridge``.
    """

    kernel: Kernel
    X: jax.Array
    alpha: jax.Array
    ridge: float

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def scalar_output(self) -> bool:
        return self.alpha.ndim == 1

    def as_function(self):
        """The prediction as a pure function of ONE input (no batch axis).

        Returns ``f(x) -> scalar`` (or ``(c,)``), built from jax ops only, so
        ``jax.grad``, ``jax.hessian``, ``jax.jvp`` and ``jax.vmap`` apply to it. This is
        the interface :mod:`ntk_poison.spectra` consumes (a Flax model offers the same).
        """
        return _scalar_fn(self.kernel, self.X, self.alpha)

    def _inputs(self, x, batch_size: Optional[int]) -> jax.Array:
        return model_inputs(self.kernel, self.X, self.alpha.dtype, x)

    def _batched(self, fn, x, batch_size):
        return map_batches(fn, (self.kernel, self.X, self.alpha), x, batch_size)

    def predict(self, x: Array, *, batch_size: Optional[int] = 4096) -> jax.Array:
        """``f(x) = k(x, X) alpha``: ``(m,)`` for scalar targets, ``(m, c)`` otherwise."""
        x = self._inputs(x, batch_size)
        return self._batched(_predict, x, batch_size)

    def input_grad(self, x: Array, *, batch_size: Optional[int] = 1024) -> jax.Array:
        """``grad_x f(x)`` for scalar outputs, shape ``(m, *input_shape)``.

        For vector outputs use :meth:`input_jacobian`.
        """
        if not self.scalar_output:
            raise ValueError("input_grad is for scalar outputs (y of shape (n,)); this "
                             "model has vector outputs: use input_jacobian.")
        x = self._inputs(x, batch_size)
        return self._batched(_input_grad, x, batch_size)

    def input_jacobian(self, x: Array, *, batch_size: Optional[int] = 256) -> jax.Array:
        """``d f / d x`` of shape ``(m, c, *input_shape)`` (``(m, *input_shape)`` if scalar)."""
        x = self._inputs(x, batch_size)
        return self._batched(_input_jacobian, x, batch_size)

    def input_hessian(self, x: Array, *, batch_size: Optional[int] = None) -> jax.Array:
        """``hess_x f(x)`` for scalar outputs, shape ``(m, d, d)`` with d the flat size.

        ``batch_size`` bounds the points differentiated at once; by default it is
        chosen so that the forward-over-reverse intermediates (about n*d per point)
        stay within the memory budget.
        """
        if not self.scalar_output:
            raise ValueError("input_hessian is for scalar outputs (y of shape (n,)).")
        x = self._inputs(x, batch_size)
        d = int(np.prod(x.shape[1:]))
        item = x.dtype.itemsize
        _validate.fits_in_memory(
            "input_hessian's output (m, d, d)", x.shape[0] * d * d, item,
            "Ask for fewer points at once, or use ntk_poison.spectra's matrix-free "
            "eigen-solver instead of the dense Hessian.")
        if batch_size is None:
            per_point = 4 * d * (self.n + d) * item
            batch_size = max(1, min(x.shape[0], _validate.memory_budget_bytes() // 4
                                    // max(per_point, 1)))
        return self._batched(_input_hessian, x, batch_size)


def fit(k: Kernel, X: Array, y: Array, ridge: float = 1e-3) -> KRRModel:
    """Fit kernel ridge regression: ``alpha = (K + n*ridge*I)^-1 y``, ``n = len(X)``.

    Args:
      k: a :class:`~ntk_poison.kernels.Kernel`.
      X: training inputs ``(n, d)`` (or ``(n, H, W, C)`` for image kernels).
      y: float targets ``(n,)`` or ``(n, c)``.
      ridge: the relative ridge lambda >= 0 (absolute ridge ``n * ridge``).

    Returns:
      A :class:`KRRModel`. Raises ValueError on bad shapes, non-finite values,
      integer targets, a negative ridge, a non-positive-definite system, or an
      ``n x n`` Gram matrix that would not fit in memory.
    """
    k = check_kernel(k)
    X = as_inputs(k, "X", X)
    _validate.array("y", y, ndim=(1, 2), floating=True)
    _validate.same_rows("X", X, "y", y)
    _validate.nonneg("ridge", ridge)
    n = X.shape[0]
    if n == 0:
        raise ValueError("`X` is empty; pass at least one training point.")
    dtype = jnp.result_type(X.dtype, jnp.asarray(y).dtype)
    X = X.astype(dtype)
    y = jnp.asarray(y, dtype)
    _validate.fits_in_memory(
        f"The Gram matrix for n={n} training points", 3 * n * n, dtype.itemsize,
        "Subsample the training set (ntk_poison.data.subset) or use a smaller n.")
    A = _gram_plus_ridge(k, X, jnp.asarray(n * float(ridge), dtype))
    alpha = solve_psd(A, y)
    return KRRModel(kernel=k, X=X, alpha=alpha, ridge=float(ridge))
