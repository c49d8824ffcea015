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
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, linalg, models
from ntk_poison.kernels import Kernel

Array = Any

__all__ = ["KRRModel", "KernelModel", "KernelFunction", "dual_predict", "fit", "solve", "clone_gram", "clone_model",
           "fit_clones", "fit_clean", "check_kernel", "as_inputs", "model_inputs",
           "gram_plus_ridge", "solve_psd", "check_training"]


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


def solve_psd(A: Array, b: Array, *, what: str = "the kernel matrix K + n*ridge*I"
              ) -> jax.Array:
    """Deprecated alias of :func:`ntk_poison.linalg.cholesky_solve` (kept one release)."""
    return linalg.cholesky_solve(A, b, what=what)


@functools.partial(jax.jit, static_argnums=0)
def gram_plus_ridge(k: Kernel, X, shift):
    """``k(X, X) + shift I`` (one compiled program per kernel and shape)."""
    K = k.fn(X, X)
    return K + shift * jnp.eye(K.shape[0], dtype=K.dtype)


def dual_predict(k: Kernel, X, alpha, beta, x):
    """``k(x, X) alpha + sum_j d/dx' k(x, x_j) . beta_j`` for a batch x.

    The derivative term is one forward-mode derivative of ``Z -> k(x, Z)`` at X with
    tangent beta (column j of the Gram matrix depends only on row j of Z), summed over
    j: O(m n d). ``alpha`` is (n,) or (n, r); ``beta`` (n, *s) or (n, *s, r) or None.
    """
    out = k.fn(x, X) @ alpha
    if beta is None:
        return out
    f = lambda Z: k.fn(x, Z)

    def deriv(B):
        return jax.jvp(f, (X,), (B,))[1].sum(axis=1)

    if alpha.ndim == 1:
        return out + deriv(beta)
    return out + jax.vmap(deriv, in_axes=-1, out_axes=-1)(beta)



@functools.partial(jax.tree_util.register_dataclass, data_fields=["X", "alpha", "beta"],
                   meta_fields=["kernel", "batched"])
@dataclasses.dataclass(frozen=True)
class KernelFunction(models.Function):
    """A kernel model's prediction as a callable pytree (arrays are leaves)::

        f(x) = k(x, X) alpha + sum_j d/dx' k(x, x_j) . beta_j        (beta None: KRR)

    at ONE input (no batch axis), or with ``batched=True`` on a batch ``(m, *s)``
    (one Gram block and a GEMM). The function of ``KRRModel`` and ``PenalizedModel``.
    """

    kernel: Kernel
    X: jax.Array
    alpha: jax.Array
    beta: Optional[jax.Array] = None
    batched: bool = False

    def __call__(self, x):
        if self.batched:
            return dual_predict(self.kernel, self.X, self.alpha, self.beta, x)
        return dual_predict(self.kernel, self.X, self.alpha, self.beta, x[None])[0]


class KernelModel(models.Model):
    """The kernel models' shared half of the protocol: their function is
    :class:`KernelFunction` of ``(kernel, X, alpha, beta)`` (``beta``: a field of the
    penalised models, absent for KRR) and their queries are checked against the
    kernel and the training inputs."""

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def scalar_output(self) -> bool:
        return self.alpha.ndim == 1 + self.leading_axes

    @property
    def dtype(self):
        return self.alpha.dtype

    def as_function(self) -> KernelFunction:
        """The prediction as a pure function of ONE input (no batch axis).

        Returns ``f(x) -> scalar`` (or ``(c,)``), a callable pytree built from jax ops
        only, so ``jax.grad``, ``jax.hessian``, ``jax.jvp`` and ``jax.vmap`` apply to
        it. This is the interface :mod:`ntk_poison.spectra` consumes.
        """
        return KernelFunction(self.kernel, self.X, self.alpha, getattr(self, "beta", None))

    def batch_function(self) -> KernelFunction:
        return KernelFunction(self.kernel, self.X, self.alpha, getattr(self, "beta", None),
                              batched=True)

    def check_inputs(self, x: Array) -> jax.Array:
        return model_inputs(self.kernel, self.X, self.alpha.dtype, x)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["X", "alpha"], meta_fields=["kernel", "ridge"])
@dataclasses.dataclass(frozen=True)
class KRRModel(KernelModel):
    """A fitted kernel ridge regression model (immutable pytree; the model protocol).

    ``predict``, ``input_grad``, ``input_jacobian`` and ``input_hessian`` come from
    :class:`ntk_poison.models.Model` (one ``batch_size`` convention).

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
    k, X, y = check_training(k, X, y, ridge)
    return solve(k, X, y, float(ridge))


def check_training(k: Kernel, X: Array, y: Array, ridge: float
                   ) -> Tuple[Kernel, jax.Array, jax.Array]:
    """The one input check of a kernel fit (KRR, EPIC's refits, deferred poisoning):
    a kernel, non-empty finite inputs of its rank, float targets ``(n,)`` or ``(n, c)``
    with one row per input, a ridge >= 0. Returns ``(k, X, y)`` as jax arrays of their
    common float dtype."""
    k = check_kernel(k)
    X = as_inputs(k, "X", X)
    _validate.array("y", y, ndim=(1, 2), floating=True)
    _validate.same_rows("X", X, "y", y)
    _validate.scalar("ridge", ridge)
    if X.shape[0] == 0:
        raise ValueError("`X` is empty; pass at least one training point.")
    dtype = jnp.result_type(X.dtype, jnp.asarray(y).dtype)
    return k, X.astype(dtype), jnp.asarray(y, dtype)


def solve(k: Kernel, X: jax.Array, y: jax.Array, ridge: float) -> KRRModel:
    """:func:`fit` without its input checks, for callers that have validated already:
    ``X`` and ``y`` arrays of one float dtype, ``ridge`` a float >= 0."""
    n = X.shape[0]
    _validate.fits_in_memory(
        f"The Gram matrix for n={n} training points", 3 * n * n, X.dtype.itemsize,
        "Subsample the training set (ntk_poison.data.subset) or use a smaller n.")
    A = gram_plus_ridge(k, X, jnp.asarray(n * ridge, X.dtype))
    alpha = linalg.cholesky_solve(A, y)
    return KRRModel(kernel=k, X=X, alpha=alpha, ridge=ridge)


# --------------------------------------------------------------------------- clone clusters

def clone_gram(k: Kernel, X: Array, zeta: Array) -> np.ndarray:
    """The Gram matrix of ``[X; zeta]`` (float64 numpy, symmetrised): every Gram of a
    clone-poisoned set (N clean rows, then m copies of zeta) is a re-indexing of it,
    so no new shapes are compiled per m (:func:`fit_clones`)."""
    Xb = jnp.asarray(np.concatenate([np.asarray(X), np.asarray(zeta)[None]]))
    K = np.asarray(k(Xb, Xb), np.float64)
    return 0.5 * (K + K.T)


def clone_model(k: Kernel, X: Array, alpha_clean: Array, w_poison: Any, zeta: Array,
                ridge: float) -> KRRModel:
    """The KRR function ``k(x, X) a_c + w k(x, zeta)`` as a model on ``[X; zeta]``: m
    identical clone rows merged into one row carrying the sum of their dual weights
    (the same function, one shape for every m). ``ridge`` is only recorded; keeping
    it fixed keeps the model's static structure, hence compiled code, the same.
    Multi-output: ``alpha_clean (N, c)`` and ``w_poison`` a ``(c,)`` row (a scalar is
    broadcast to one)."""
    Xm = np.concatenate([np.asarray(X), np.asarray(zeta)[None]])
    a_c = np.asarray(alpha_clean, np.float64)
    if a_c.ndim == 2:
        w = np.broadcast_to(np.asarray(w_poison, np.float64), a_c.shape[1:])
        a = np.concatenate([a_c, w[None]])
    else:
        a = np.concatenate([a_c, [float(w_poison)]])
    return KRRModel(kernel=k, X=jnp.asarray(Xm), alpha=jnp.asarray(a), ridge=float(ridge))


def fit_clones(k: Kernel, Kb: np.ndarray, X: Array, y: Array, zeta: Array,
               y_target: Any, m: int, ridge: float) -> KRRModel:
    """KRR refitted on ``X`` plus ``m`` clones of ``(zeta, y_target)`` at relative ridge
    ``ridge`` (absolute ``(N + m) ridge``), by a dense solve of the (N+m)-point system
    (scipy; independent of the rank-one law of :mod:`ntk_poison.theory`), as a
    :func:`clone_model`. ``Kb`` is :func:`clone_gram`. Multi-output: ``y (N, c)`` and
    ``y_target`` a ``(c,)`` row (one solve with c right-hand sides)."""
    import scipy.linalg
    N = len(X)
    idx = np.r_[np.arange(N), np.full(int(m), N)]
    y = np.asarray(y, np.float64)
    if y.ndim == 2:
        yt = np.broadcast_to(np.asarray(y_target, np.float64), (int(m),) + y.shape[1:])
        yp = np.concatenate([y, yt])
    else:
        yp = np.r_[y, np.full(int(m), float(y_target))]
    A = Kb[np.ix_(idx, idx)] + (N + m) * ridge * np.eye(N + int(m))
    a = scipy.linalg.solve(A, yp, assume_a="pos")
    return clone_model(k, X, a[:N], a[N:].sum(0) if a.ndim == 2 else a[N:].sum(), zeta,
                       ridge)


def fit_clean(k: Kernel, Kb: np.ndarray, X: Array, y: Array, zeta: Array,
              ridge_abs: float, ridge: float) -> KRRModel:
    """The clean KRR model at ABSOLUTE ridge ``ridge_abs``, as a :func:`clone_model`
    with weight 0 on zeta (the same shapes as the poisoned ones); ``ridge`` is
    recorded (see :func:`clone_model`)."""
    import scipy.linalg
    N = len(X)
    a = scipy.linalg.solve(Kb[:N, :N] + ridge_abs * np.eye(N), np.asarray(y, np.float64),
                           assume_a="pos")
    return clone_model(k, X, a, 0.0, zeta, ridge)
