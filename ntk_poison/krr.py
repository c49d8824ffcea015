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
import warnings
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, linalg, models
from ntk_poison.kernels import Kernel

Array = Any

__all__ = ["KRRModel", "SolveInfo", "CHOLESKY_MAX_N", "solve_cg", "default_precond_rank",
           "check_cg_options", "cg_preconditioner", "shifted_cg_solve", "KernelModel", "KernelFunction", "dual_predict", "fit", "solve", "clone_gram", "clone_model",
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


class SolveInfo(NamedTuple):
    """How an iterative KRR fit ended (a pytree of scalars: a data field of the model).

    Attributes:
      iterations: CG iterations run.
      residual: the true relative residual ``max_col |y - (K + n lam I) alpha| / |y|``
        (K the operator used: the float32-rounded Gram matrix when it was stored so).
    """

    iterations: jax.Array
    residual: jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["X", "alpha", "info"], meta_fields=["kernel", "ridge"])
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
      info: a :class:`SolveInfo` for a CG fit (iterations, final relative residual);
        None for a direct (Cholesky) fit.
    """

    kernel: Kernel
    X: jax.Array
    alpha: jax.Array
    ridge: float
    info: Optional[SolveInfo] = None


#: ``solver="auto"`` uses dense Cholesky up to this n (when its 3 n^2 numbers fit the
#: memory budget), CG above it. Measured on the 2-core CPU (benchmarks/scale_bench.py,
#: MNIST RBF, float64): at n = 4000 Cholesky fit+predict and CG on a stored Gram take
#: about the same time (the Gram dominates), while Cholesky's O(n^3) grows past CG's
#: O(n^2 d + iters n^2) from there on.
CHOLESKY_MAX_N = 4096

_SOLVERS = ("auto", "cholesky", "cg")
_PRECONDITIONERS = ("nystrom", "pivoted_cholesky", "jacobi", "none")


def fit(k: Kernel, X: Array, y: Array, ridge: float = 1e-3, *, solver: str = "auto",
        tol: Optional[float] = None, maxiter: Optional[int] = None,
        preconditioner: Optional[str] = "nystrom", precond_rank: Optional[int] = None,
        gram_dtype: Any = None, block_size: Optional[int] = None, strict: bool = False,
        mesh: Any = None, key: Any = None) -> KRRModel:
    """Fit kernel ridge regression: ``alpha = (K + n*ridge*I)^-1 y``, ``n = len(X)``.

    Two solvers of the same system:

    * ``"cholesky"``: the dense Gram matrix and its Cholesky factor; O(n^3) time,
      3 n^2 numbers of memory;
    * ``"cg"``: preconditioned conjugate gradients on products ``(K + n lam I) V``,
      all columns of a multi-output ``y`` in one solve (Falkon-style, Rudi et al.
      2017). The products come from Gram row blocks (:mod:`ntk_poison.gram`), either
      recomputed at each iteration (never holding the n x n matrix; O(n^2 d) per
      iteration) or computed once and stored (n^2 numbers). The preconditioner is
      ``(B B^T + n lam I)^-1`` applied by Woodbury, with ``B B^T ~ K`` of rank r:
      Nystrom on r uniform random centres (``key``) or a partial pivoted Cholesky.
      Iterations stop at relative residual ``tol``; the model records them in
      ``model.info`` (:class:`SolveInfo`).
    * ``"auto"`` (default): ``"cholesky"`` when ``n <= CHOLESKY_MAX_N`` and its 3 n^2
      numbers fit :func:`ntk_poison._validate.memory_budget_bytes`, else ``"cg"``.
      At small n it is the Cholesky fit, bit for bit.

    Args:
      k: a :class:`~ntk_poison.kernels.Kernel`.
      X: training inputs ``(n, d)`` (or ``(n, H, W, C)`` for image kernels).
      y: float targets ``(n,)`` or ``(n, c)``.
      ridge: the relative ridge lambda >= 0 (absolute ridge ``n * ridge``).
      solver: ``"auto"``, ``"cholesky"`` or ``"cg"``.
      tol: CG relative residual target, default 1e-10 in float64 and 1e-5 in float32.
      maxiter: CG iteration cap (default ``min(n, 1000)``).
      preconditioner: ``"nystrom"`` (default), ``"pivoted_cholesky"``, ``"jacobi"``
        (the diagonal ``K_ii + n lam``) or ``"none"``/None.
      precond_rank: the rank r of the Nystrom / pivoted-Cholesky preconditioner
        (default ``min(n, max(100, 2 sqrt(n)), 1000)``); memory n r.
      gram_dtype: None (default, "auto"): store the Gram matrix in the solve's dtype
        when it fits the memory budget beside the CG working set, else compute
        blocks per product; ``"blockwise"``: never store it; a dtype
        (``jnp.float32``, ``jnp.float64``): store it in that dtype (float32 halves
        the memory; the products still accumulate in the solve's dtype, and the
        system solved is then the one with the float32-rounded Gram matrix).
      block_size: Gram rows per block (default: about 128 MiB per block).
      strict: raise :class:`~ntk_poison.linalg.ConvergenceError` instead of a
        :class:`~ntk_poison.linalg.ConvergenceWarning` when CG misses ``tol``.
      mesh: a ``jax.sharding.Mesh``: the Gram products come from
        ``ntk_poison.distributed.sharded_gram_matvec`` (CG only).
      key: PRNG key or int seed of the Nystrom centres (default 0).

    Returns:
      A :class:`KRRModel`. Raises ValueError on bad shapes, non-finite values,
      integer targets, a negative ridge, a non-positive-definite system, a Cholesky
      fit whose ``n x n`` Gram matrix would not fit in memory, or a CG fit whose
      working set would not (the message names the fix).
    """
    k, X, y = check_training(k, X, y, ridge)
    solver = _validate.choice("solver", solver, _SOLVERS)
    n = X.shape[0]
    if solver == "auto":
        dense_fits = 3 * n * n * X.dtype.itemsize <= _validate.memory_budget_bytes()
        solver = "cholesky" if (dense_fits and n <= CHOLESKY_MAX_N and mesh is None) \
            else "cg"
    if solver == "cholesky":
        if mesh is not None:
            raise ValueError("`mesh` needs solver=\"cg\" (a dense Cholesky is not "
                             "distributed); pass solver=\"cg\" or mesh=None.")
        return solve(k, X, y, float(ridge))
    return solve_cg(k, X, y, float(ridge), tol=tol, maxiter=maxiter,
                    preconditioner=preconditioner, precond_rank=precond_rank,
                    gram_dtype=gram_dtype, block_size=block_size, strict=strict,
                    mesh=mesh, key=key)


def default_precond_rank(n: int) -> int:
    """``min(n, max(100, 2 sqrt(n)), 1000)``: Falkon's O(sqrt n) centres, at least
    100, capped where the O(n r^2) set-up starts to cost more than it saves."""
    return int(min(n, max(100, int(2 * np.sqrt(n))), 1000))


def check_cg_options(n: int, dtype: Any, c: int, *, tol, maxiter, preconditioner,
                     precond_rank, gram_dtype, block_size, key):
    """Validate the CG options of :func:`fit` and plan the memory.

    Returns ``(tol, maxiter, preconditioner, rank, store_dtype or None, block, key)``.
    Raises ValueError if the working set (Gram blocks, preconditioner, vectors, and
    the stored Gram matrix if asked for) would not fit the memory budget.
    """
    itemsize = np.dtype(dtype).itemsize
    tol = (1e-10 if np.dtype(dtype) == np.float64 else 1e-5) if tol is None else tol
    _validate.nonneg("tol", tol, positive=True)
    maxiter = min(n, 1000) if maxiter is None else maxiter
    _validate.positive_int("maxiter", maxiter)
    preconditioner = "none" if preconditioner is None else preconditioner
    preconditioner = _validate.choice("preconditioner", preconditioner, _PRECONDITIONERS)
    if precond_rank is None:
        rank = default_precond_rank(n) if preconditioner in ("nystrom", "pivoted_cholesky") \
            else 0
    else:
        _validate.positive_int("precond_rank", precond_rank)
        rank = int(precond_rank)
        if rank > n:
            raise ValueError(f"`precond_rank` = {rank} exceeds n = {n}; use at most n.")
    if block_size is None:
        from ntk_poison import gram
        block = gram.default_block_size(n, itemsize)
    else:
        _validate.positive_int("block_size", block_size)
        block = min(int(block_size), n)
    # the working set: ~3 Gram blocks (kernel temporaries), the preconditioner's B and
    # its K_nr (2 n r), its r x r matrices, 8 vectors of (n, c)
    work = 3 * block * n + 2 * n * rank + 3 * rank * rank + 8 * n * c
    budget = _validate.memory_budget_bytes()
    if work * itemsize > budget:
        raise ValueError(
            f"The CG working set for n={n} (Gram blocks of {block} rows, a rank-{rank} "
            f"preconditioner) needs {work * itemsize / 2**30:.1f} GiB, over the memory "
            f"budget of {budget / 2**30:.1f} GiB (NTK_POISON_MEMORY_BUDGET). Pass a "
            "smaller `block_size` or `precond_rank`, or subsample the training set "
            "(ntk_poison.data.subset).")
    if gram_dtype is None:
        nb = -(-n // block)
        store = np.dtype(dtype) if (work + nb * block * n) * itemsize <= budget else None
    elif isinstance(gram_dtype, str) and gram_dtype == "blockwise":
        store = None
    else:
        try:
            store = np.dtype(gram_dtype)
        except TypeError:
            store = None
        if store is None or store not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"`gram_dtype` must be None, 'blockwise', jnp.float32 or "
                             f"jnp.float64, got {gram_dtype!r}.")
        if store.itemsize > itemsize:
            store = np.dtype(dtype)
        nb = -(-n // block)
        need = work * itemsize + nb * block * n * store.itemsize
        if need > budget:
            raise ValueError(
                f"The stored {store.name} Gram matrix for n={n} and the CG working set "
                f"need {need / 2**30:.1f} GiB, over the memory budget of "
                f"{budget / 2**30:.1f} GiB (NTK_POISON_MEMORY_BUDGET; raise it if the "
                f"machine has the memory). Pass gram_dtype='blockwise' (Gram blocks "
                "recomputed per product)"
                + ("" if store.itemsize == 4 else ", gram_dtype=jnp.float32")
                + ", or subsample.")
    return tol, int(maxiter), preconditioner, rank, store, block, _validate.as_key(key)


def cg_preconditioner(k: Kernel, X: jax.Array, shift: float, preconditioner: str,
                      rank: int, block: int, key: Any):
    """The CG preconditioner of ``K + shift I`` (see :func:`fit`): a
    :class:`~ntk_poison.linalg.LowRankPreconditioner` or a Jacobi diagonal ``(n,)``.
    A zero ``shift`` (ridge 0) is replaced by ``sqrt(eps) mean K_ii`` in the
    preconditioner only (the system keeps its own)."""
    from ntk_poison import gram
    n, dt = X.shape[0], X.dtype
    if preconditioner == "none":
        return jnp.ones((n,), dt)
    diag = gram.gram_diag(k, X).astype(dt)
    p_shift = shift if shift > 0 else float(np.sqrt(np.finfo(dt).eps)
                                            * max(float(jnp.mean(diag)), 1e-300))
    if preconditioner == "jacobi":
        return diag + p_shift
    if preconditioner == "nystrom":
        B = gram.nystrom_factor(k, X, rank, key, block_size=block)
    else:
        B = gram.pivoted_cholesky_factor(k, X, rank)
    return linalg.low_rank_preconditioner(B, p_shift)


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _cg_fit(k: Kernel, X, Y, shift, G, P, tol, maxiter, *, block: int):
    from ntk_poison import gram
    if G is None:
        Kv = lambda V: gram.blockwise_product(k, X, V, block)  # noqa: E731
    else:
        Kv = lambda V: gram.stored_product(G, V)  # noqa: E731
    return linalg.conjugate_gradients(lambda V: Kv(V) + shift * V, Y, P, tol, maxiter)


@functools.partial(jax.jit, static_argnames=("Kv",))
def _cg_fit_op(Kv, Y, shift, P, tol, maxiter):
    return linalg.conjugate_gradients(lambda V: Kv(V) + shift * V, Y, P, tol, maxiter)


def solve_cg(k: Kernel, X: jax.Array, y: jax.Array, ridge: float, *, tol=None,
             maxiter=None, preconditioner="nystrom", precond_rank=None, gram_dtype=None,
             block_size=None, strict=False, mesh=None, key=None) -> KRRModel:
    """:func:`fit` with ``solver="cg"`` without its training-set checks (``X``, ``y``
    validated arrays of one float dtype, ``ridge`` a float >= 0)."""
    n, dt = X.shape[0], X.dtype
    Y = y[:, None] if y.ndim == 1 else y
    tol, maxiter, pre, rank, store, block, key = check_cg_options(
        n, dt, Y.shape[1], tol=tol, maxiter=maxiter, preconditioner=preconditioner,
        precond_rank=precond_rank, gram_dtype=gram_dtype, block_size=block_size, key=key)
    shift = n * ridge
    P = cg_preconditioner(k, X, shift, pre, rank, block, key)
    tol_a = jnp.asarray(tol, dt)
    if mesh is not None:
        from ntk_poison import distributed
        Kv = distributed.sharded_gram_matvec(k, X, mesh, block_size=block_size,
                                             dtype=None if store is None else store)
        x, it, res = _cg_fit_op(Kv, Y, jnp.asarray(shift, dt), P, tol_a,
                                jnp.asarray(maxiter))
    else:
        from ntk_poison import gram
        G = None if store is None else gram.stored_gram(k, X, block, store)
        x, it, res = _cg_fit(k, X, Y, jnp.asarray(shift, dt), G, P, tol_a,
                             jnp.asarray(maxiter), block=block)
        del G
    it, res = int(it), float(res)
    if not np.all(np.isfinite(np.asarray(x))) or not np.isfinite(res):
        raise ValueError("Conjugate gradients produced NaN/inf: K + n*ridge*I is not "
                         "positive definite in {dt}. Increase `ridge`, check the kernel "
                         "is positive definite, or enable float64.".format(dt=dt))
    _check_convergence("KRR CG", it, res, tol, strict, ", or `ridge`")
    alpha = x[:, 0] if y.ndim == 1 else x
    return KRRModel(kernel=k, X=X, alpha=alpha, ridge=ridge,
                    info=SolveInfo(jnp.asarray(it), jnp.asarray(res, dt)))


def _check_convergence(what: str, it: int, res: float, tol: float, strict: bool,
                       hint: str = "") -> None:
    """A CG solve that stopped above 10 tol: a ConvergenceWarning, or with ``strict``
    a ConvergenceError (the message names the options that help)."""
    if res > 10 * tol:
        msg = (f"{what} stopped after {it} iterations at relative residual {res:.3g} "
               f"(tol {tol:g}); raise `maxiter` or `precond_rank`{hint}.")
        if strict:
            raise linalg.ConvergenceError(msg)
        warnings.warn(msg, linalg.ConvergenceWarning, stacklevel=4)


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
        "Pass solver=\"cg\" (never holds the n x n matrix), subsample the training set "
        "(ntk_poison.data.subset) or use a smaller n.")
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


def shifted_cg_solve(k: Kernel, X: jax.Array, rhs: jax.Array, shifts: Any, *,
                     tol: Optional[float] = None, maxiter: Optional[int] = None,
                     preconditioner: Optional[str] = "nystrom",
                     precond_rank: Optional[int] = None, gram_dtype: Any = None,
                     block_size: Optional[int] = None, strict: bool = False,
                     key: Any = None) -> Tuple[jax.Array, SolveInfo]:
    """``(K + mu I)^-1 rhs`` for every shift mu, ``K = k(X, X)``, by preconditioned CG
    (the large-n replacement of :func:`ntk_poison.linalg.shifted_solve`, which needs
    the dense matrix and its Cholesky factor).

    The Gram products (stored or blockwise) and the low-rank factor ``B B^T ~ K`` are
    built once; each shift gets its own Woodbury factor ``(mu I + B^T B)`` (O(r^3))
    and one CG solve of all columns of ``rhs (n, c)``. Options as :func:`fit`.

    Returns ``(sol (len(shifts), n, c), SolveInfo)`` with the largest iteration count
    and residual over the shifts. Warns (or raises with ``strict``) as :func:`fit`.
    """
    shifts = np.atleast_1d(np.asarray(shifts, dtype=float))
    _validate.nonneg("shifts", shifts)
    n, dt = X.shape[0], X.dtype
    rhs = jnp.asarray(rhs, dt)
    tol, maxiter, pre, rank, store, block, key = check_cg_options(
        n, dt, rhs.shape[1], tol=tol, maxiter=maxiter, preconditioner=preconditioner,
        precond_rank=precond_rank, gram_dtype=gram_dtype, block_size=block_size, key=key)
    from ntk_poison import gram
    G = None if store is None else gram.stored_gram(k, X, block, store)
    if pre in ("nystrom", "pivoted_cholesky"):
        B = (gram.nystrom_factor(k, X, rank, key, block_size=block) if pre == "nystrom"
             else gram.pivoted_cholesky_factor(k, X, rank))
    diag = gram.gram_diag(k, X).astype(dt)
    floor = float(np.sqrt(np.finfo(dt).eps) * max(float(jnp.mean(diag)), 1e-300))
    out, its, ress = [], [], []
    for mu in shifts:
        p_shift = mu if mu > 0 else floor
        if pre == "none":
            P = jnp.ones((n,), dt)
        elif pre == "jacobi":
            P = diag + p_shift
        else:
            P = linalg.low_rank_preconditioner(B, p_shift)
        x, it, res = _cg_fit(k, X, rhs, jnp.asarray(mu, dt), G, P, jnp.asarray(tol, dt),
                             jnp.asarray(maxiter), block=block)
        out.append(x)
        its.append(int(it))
        ress.append(float(res))
    it, res = max(its), max(ress)
    if not np.isfinite(res):
        raise ValueError(f"Conjugate gradients produced NaN/inf: K + mu I is not positive "
                         f"definite in {dt}. Increase the ridge or enable float64.")
    _check_convergence("Shifted CG", it, res, tol, strict)
    return jnp.stack(out), SolveInfo(jnp.asarray(it), jnp.asarray(res, dt))
