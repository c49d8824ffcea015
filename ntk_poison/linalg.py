"""Solvers on matrix-vector products: block Lanczos, conjugate gradients, Newton-LM,
shifted solves (THEORY.md sections 1-4 use all of them).

Every solver here takes a *linear operator*, never a model: a function ``matvec``
(and the size and dtype of the space it acts on), or, where a factorisation is
needed, the matrix itself. A model-aware caller builds the operator: the input
Hessian of a model at a point is a Hessian-vector product
(:func:`ntk_poison.spectra.top_eigenpairs`), the penalised kernel system is a joint
Gram product (:func:`ntk_poison.penalized.fit_penalized` with ``solver="cg"``).

Two layers, after matfree (``matfree.eig``, ``matfree.decomp``):

* **cores** (:func:`block_lanczos`, :func:`conjugate_gradients`, :func:`newton_lm`):
  pure, traceable functions with static sizes and no input checks, meant to be
  called inside the caller's ``jax.jit``;
* **front ends** (:func:`eigsh`, :func:`cg`, :func:`shifted_solve`,
  :func:`cholesky_solve`): validate their arguments once, jit-compile the core and
  report convergence through one :class:`ConvergenceWarning` (or
  :class:`ConvergenceError` with ``strict=True``).

Every iterative solver stops at one default relative tolerance per dtype,
:func:`ntk_poison._validate.default_tol` (1e-8 in float64, 1e-4 in float32), unless
the caller passes ``tol``.

Why our own Lanczos (``benchmarks/lanczos_bench.py`` has the comparison with
matfree's): a block method with full reorthogonalisation, deflation of exhausted
Krylov directions, residuals ``||A v - lambda v||`` per pair from one extra product,
and adaptive Ritz checks that stop at convergence.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate

Array = Any
MatVec = Callable[[Array], Array]

__all__ = [
    "ConvergenceWarning", "ConvergenceError", "SpectrumInfo", "eigsh", "block_lanczos",
    "cg", "conjugate_gradients", "newton_lm", "shifted_solve", "cholesky_solve",
    "cholesky", "sign_fix", "select_sorted", "lanczos_plan", "start_block",
    "matrix_of", "LowRankPreconditioner", "low_rank_preconditioner", "column_nystrom",
]

_WHICH = ("LA", "LM")
#: the Lanczos block-iteration cap when ``max_iters`` is None
DEFAULT_MAX_ITERS = 100


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before its tolerance."""


class ConvergenceError(RuntimeError, ValueError):
    """Raised instead of :class:`ConvergenceWarning` when ``strict=True``.

    It is a RuntimeError and, like numpy's ``LinAlgError``, also a ValueError (the
    project's error type), so ``except ValueError`` catches every failure here.
    """


class SpectrumInfo(NamedTuple):
    """The convergence report of an eigen-solve (``return_info=True``).

    Attributes:
      method: ``"dense"`` or ``"lanczos"``.
      which: ``"LA"`` or ``"LM"``.
      residuals: ``||A v_i - lambda_i v_i||`` for each returned pair, ``(k,)``, computed
        with one extra product per pair (not the Lanczos estimate).
      scale: the spectral-norm estimate the tolerance is relative to: the largest
        ``|Ritz value|`` seen (dense: ``||A||_2``).
      converged: every ``residuals[i] <= tol * scale`` (always True for dense).
      iterations: Lanczos block iterations run (0 for dense).
      n_hvp: operator products used (dense: d, the columns of the matrix).
      tol: the relative residual tolerance used (None for dense).
      max_iters: the iteration cap used (after capping at ``ceil(d / block_size)``).
      block_size: the Lanczos block size (None for dense).
      checks: Lanczos convergence checks run (each one ``eigh`` of the projected
        matrix; None for dense).
    """

    method: str
    which: str
    residuals: jax.Array
    scale: float
    converged: bool
    iterations: int
    n_hvp: int
    tol: Optional[float]
    max_iters: Optional[int]
    block_size: Optional[int]
    checks: Optional[int] = None


# --------------------------------------------------------------------------- shared pieces

def sign_fix(vecs: Array) -> jax.Array:
    """Make the largest-magnitude entry of each vector positive (``vecs (..., d)``).

    Eigenvectors have no sign; this one makes them deterministic.
    """
    idx = jnp.argmax(jnp.abs(vecs), axis=-1)
    s = jnp.sign(jnp.take_along_axis(vecs, idx[..., None], axis=-1))
    return vecs * jnp.where(s == 0, 1.0, s).astype(vecs.dtype)


def check_which(which: Any) -> str:
    """``"LA"`` (algebraically largest) or ``"LM"`` (largest magnitude), any case."""
    w = str(which).upper() if isinstance(which, str) else which
    if w not in _WHICH:
        raise ValueError(
            f"`which` must be 'LA' (algebraically largest) or 'LM' (largest magnitude), "
            f"got {which!r}.")
    return w


def matrix_of(op: Any, n: int, dtype: Any) -> jax.Array:
    """The dense ``(n, n)`` matrix of an operator: an array as it is, or a ``matvec``
    applied to the identity (one batched product; exact, as ``A e_j`` is column j)."""
    if callable(op):
        eye = jnp.eye(n, dtype=dtype)
        return jax.vmap(op, out_axes=1)(eye)
    return jnp.asarray(op, dtype)


def start_block(key: Any, shape: Tuple[int, ...], dtype: Any) -> jax.Array:
    """Gaussian start vectors, deterministic given ``key``.

    Drawn by numpy's PCG64 seeded with the key's bits (no compilation per shape); a
    traced key (under an outer jit) uses ``jax.random.normal`` instead.
    """
    if not _validate.is_concrete(key):
        return jax.random.normal(key, shape, dtype)
    data = key if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else \
        jax.random.key_data(key)
    seed = np.asarray(data, dtype=np.uint32).ravel().tolist()
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


class LanczosPlan(NamedTuple):
    """The static sizes of one block-Lanczos run (see :func:`lanczos_plan`)."""

    b: int                     # block size
    M: int                     # block-iteration cap
    first: int                 # blocks before the first Ritz check
    buckets: Tuple[int, ...]   # static sizes of the Ritz eigen-solves


def lanczos_plan(d: int, k: int, block_size: Optional[int] = None,
                 max_iters: Optional[int] = None, itemsize: int = 8) -> LanczosPlan:
    """Validate the Lanczos sizes for k pairs in R^d and return the static plan.

    ``block_size`` defaults to k and ``max_iters`` to :data:`DEFAULT_MAX_ITERS`,
    capped at ``ceil(d / block_size)`` (where the Krylov space is all of R^d). The
    first Ritz check comes once the space holds k vectors, and not before 3 blocks (a
    check costs one eigh; earlier ones almost never stop the loop).
    """
    if not _validate.is_int_scalar(k) or not 1 <= k <= d:
        raise ValueError(
            f"`k` must be an integer with 1 <= k <= d = {d} (the flat input size), got "
            f"{k!r}.")
    if max_iters is None:
        max_iters = DEFAULT_MAX_ITERS
    _validate.nonneg("max_iters", max_iters, integer=True, positive=True)
    b = k if block_size is None else block_size
    _validate.nonneg("block_size", b, integer=True, positive=True)
    b = int(b)
    if b > d:
        raise ValueError(f"`block_size` = {b} exceeds d = {d}; use at most d.")
    M = min(int(max_iters), -(-d // b))
    if M * b < k:
        raise ValueError(
            f"`max_iters` * `block_size` = {M * b} < k = {k}: the Krylov space cannot "
            "hold k vectors; increase max_iters or block_size.")
    _validate.fits_in_memory(
        f"The Lanczos basis (max_iters*block_size, d) = ({M * b}, {d})",
        (M * b + 64 + 2 * b) * d + 2 * (M * b) ** 2, itemsize,
        "Reduce max_iters or block_size.")
    first = min(M, max(-(-k // b), 3))
    return LanczosPlan(b, M, first, eigh_buckets(first, M))



# --------------------------------------------------------------------------- block Lanczos

def select_sorted(theta, n_true, k, which):
    """Indices of the top-k of ascending ``theta`` whose first ``n_true`` are real.

    LA: the last k of them, descending. LM: a two-pointer merge from both ends, in
    descending ``|theta|`` (ties go to the positive end). No sort is needed (eigh
    already sorts), which keeps compilation short.
    """
    if which == "LA":
        return jnp.maximum(n_true - 1 - jnp.arange(k), 0)

    def pick(i, carry):
        lo, hi, idx = carry
        take_hi = jnp.abs(theta[hi]) >= jnp.abs(theta[lo])
        idx = idx.at[i].set(jnp.where(take_hi, hi, lo))
        return (jnp.where(take_hi, lo, lo + 1), jnp.where(take_hi, hi - 1, hi), idx)

    init = (jnp.asarray(0, jnp.int32), jnp.asarray(n_true - 1, jnp.int32),
            jnp.zeros((k,), jnp.int32))
    return jax.lax.fori_loop(0, k, pick, init)[2]


def orthonormalise_block(W, ref_norms, thresh, fresh):
    """Gram-Schmidt (twice) of the rows of ``W`` against each other, deflating.

    ``W`` (b, d) is the Krylov remainder, already orthogonal to the basis. Returns
    ``(Qn, R, valid)`` with ``W = R^T Qn`` up to dropped remainders below
    ``thresh * ref_norms``. A row whose remainder is that small (an exhausted Krylov
    direction) is replaced by its row of ``fresh()`` (random directions orthogonal to
    the basis; computed only if some row needs it) orthogonalised against ``Qn``,
    with a zero coupling in ``R``. If even that is lost to round-off (the basis
    spans R^d), the row stays zero and is marked invalid.
    """
    b, d = W.shape
    dtype = W.dtype
    tiny = jnp.asarray(np.finfo(dtype).tiny, dtype) * 1e4
    eps_fresh = jnp.asarray(np.sqrt(np.finfo(dtype).eps), dtype)

    def proj(M, v):
        c = M @ v
        return v - c @ M, c

    def column(c, carry):
        Qn, R, ok = carry
        w, c1 = proj(Qn, W[c])
        w, c2 = proj(Qn, w)
        nrm = jnp.linalg.norm(w)
        good = nrm > jnp.maximum(thresh * ref_norms[c], tiny)
        q = jnp.where(good, w / jnp.where(good, nrm, 1.0), 0.0)
        coef = (c1 + c2).at[c].set(jnp.where(good, nrm, 0.0))
        return Qn.at[c].set(q), R.at[:, c].set(coef), ok.at[c].set(good)

    init = (jnp.zeros((b, d), dtype), jnp.zeros((b, b), dtype), jnp.zeros((b,), bool))
    Qn, R, ok = jax.lax.fori_loop(0, b, column, init)

    def refill(args):
        Qn, ok = args
        F = fresh()
        f_norms = jnp.linalg.norm(F, axis=1)

        def fill(c, carry):
            Qn, valid = carry
            r, _ = proj(Qn, F[c])
            r, _ = proj(Qn, r)
            nr = jnp.linalg.norm(r)
            good = nr > eps_fresh * f_norms[c]
            q = jnp.where(ok[c], Qn[c], jnp.where(good, r / jnp.where(good, nr, 1.0), 0.0))
            return Qn.at[c].set(q), valid.at[c].set(ok[c] | good)

        return jax.lax.fori_loop(0, b, fill, (Qn, ok))

    Qn, valid = jax.lax.cond(jnp.all(ok), lambda args: args, refill, (Qn, ok))
    return Qn, R, valid


def eigh_buckets(first: int, M: int, factor: int = 2) -> Tuple[int, ...]:
    """Static sizes (in blocks) of the Ritz eigen-solves: ``first * factor^i``, and M.

    A check after s blocks solves the smallest bucket >= s, the rows beyond s masked.
    Few buckets keep compilation short; the factor bounds the wasted eigh work.
    """
    out = []
    s = max(1, first)
    while s < M:
        out.append(s)
        s *= factor
    out.append(M)
    return tuple(out)


def block_lanczos(matvec, start, tol, *, k, which, b, M, first, buckets):
    """Block Lanczos with full reorthogonalisation, in one ``lax.while_loop``.

    With orthonormal blocks ``Q_0 .. Q_j`` (rows of ``Qbuf``), in column convention::

        H Q_j = Q_{j-1} B_{j-1}^T + Q_j A_j + W_{j+1},    W_{j+1} = Q_{j+1} B_j

    ``A_j = Q_j^T H Q_j``; the remainder ``W_{j+1}`` is ``H Q_j`` with its projection on
    ALL previous blocks removed (twice: full reorthogonalisation), and its QR gives
    the next block. ``T = Q^T H Q`` is block tridiagonal; an eigenpair ``(theta, y)``
    of its leading part gives the Ritz pair ``(theta, Q y)`` with residual
    ``||H Q y - theta Q y|| = ||W_{j+1} y_last||``, y_last the last block of y.

    Checks (one small ``eigh`` each) are scheduled adaptively: after a check the worst
    residual ratio ``rho = max_i res_i / (tol * scale)`` and its decay rate per block
    since the previous check predict the block count where ``rho <= 1``; the next
    check is there, but at least 1 and at most ``ceil(s / 2)`` blocks later (s the
    blocks so far), so a check never overshoots convergence by more than ~50%.
    """
    d = start.shape[1]
    dtype = start.dtype
    nb = M * b
    # The basis is stored in chunks of C blocks (about 64 rows); reorthogonalisation
    # only visits the chunks filled so far, so its cost grows with the basis actually
    # built, not with max_iters.
    C = max(1, 64 // b)
    n_chunks = -(-M // C)
    hvp_block = matvec
    thresh = jnp.asarray(np.finfo(dtype).eps ** 0.75, dtype)

    # ``start`` (2b, d) is random: the start block W_0, then the reserve of fresh
    # directions for deflation (at iteration j rolled by j entries: the cyclic shifts
    # of a random vector are linearly independent, almost surely), used only when a
    # Krylov direction is exhausted.
    W0, reserve = start[:b], start[b:]

    def ritz(S):
        nS = S * b

        def branch(T, valid, W, ns):
            live = valid[:nS] & (jnp.arange(nS) < ns)
            Ts = jnp.where(live[:, None] & live[None, :], T[:nS, :nS], 0.0)
            Ts = 0.5 * (Ts + Ts.T)
            g = jnp.max(jnp.sum(jnp.abs(Ts), axis=1))
            # Rows not (yet) in the Krylov basis get a sentinel above every true Ritz
            # value, so eigh sorts them last: the first n_live values are true.
            Ts = Ts + jnp.diag(jnp.where(live, 0.0, 2.0 * g + 1.0))
            theta, Y = jnp.linalg.eigh(Ts, symmetrize_input=False)
            n_live = jnp.sum(live)
            is_true = jnp.arange(nS) < n_live
            idx = select_sorted(theta, n_live, k, which)
            th, Yk = theta[idx], Y[:, idx]
            y_last = jax.lax.dynamic_slice(Yk, (ns - b, 0), (b, k))
            est = jnp.linalg.norm(y_last.T @ W, axis=1)
            scale = jnp.max(jnp.where(is_true, jnp.abs(theta), 0.0))
            rho = jnp.max(est) / jnp.maximum(tol * scale, jnp.finfo(dtype).tiny)
            rho = jnp.where(n_live >= k, rho, jnp.inf)
            Ypad = jnp.zeros((nb, k), dtype).at[:nS].set(Yk)
            return rho, th, Ypad, scale

        return branch

    branches = [ritz(S) for S in buckets]
    bucket_sizes = jnp.asarray(buckets)

    def schedule(blocks, rho, last, n_checks):
        """The block count of the next check, from the residual decay (see above)."""
        last_blocks, last_log = last
        log_rho = jnp.log(jnp.maximum(rho, jnp.finfo(dtype).tiny))
        rate = (log_rho - last_log) / jnp.maximum(blocks - last_blocks, 1)
        usable = (last_blocks > 0) & (rate < 0) & jnp.isfinite(log_rho)
        predicted = jnp.ceil(log_rho / jnp.where(usable, -rate, 1.0))
        cap = (blocks + 1) // 2
        step = jnp.where(usable, jnp.clip(predicted, 1, cap), cap).astype(blocks.dtype)
        return (jnp.maximum(blocks + jnp.maximum(step, 1), first), (blocks, log_rho),
                n_checks + 1)

    def project(Qbuf, V, n_blocks):
        """Remove from the rows of V their components on blocks 0..n_blocks-1, twice
        (full reorthogonalisation; twice is enough), visiting filled chunks only."""
        def one_chunk(i, V):
            Qc = jax.lax.dynamic_slice(Qbuf, (i * C * b, 0), (C * b, d))
            return V - (V @ Qc.T) @ Qc

        filled = (n_blocks + C - 1) // C
        for _ in range(2):
            V = jax.lax.fori_loop(0, filled, one_chunk, V)
        return V

    def cond(state):
        return (state[0] < M) & jnp.logical_not(state[5])

    def body(state):
        j, Qbuf, T, valid, (W, ref), conv, ritz_state, sched = state
        fresh = lambda: project(Qbuf, jnp.roll(reserve, j, axis=1), j)  # noqa: E731
        Qj, R, vj = orthonormalise_block(W, ref, thresh, fresh)
        Qbuf = jax.lax.dynamic_update_slice(Qbuf, Qj, (j * b, 0))
        valid = jax.lax.dynamic_update_slice(valid, vj, (j * b,))
        HQ = hvp_block(Qj)
        A = Qj @ HQ.T
        R = jnp.where(j > 0, R, 0.0)
        # (At j = 0 the R writes are clamped onto block (0, 0), then overwritten by A.)
        T = jax.lax.dynamic_update_slice(T, R, (j * b, (j - 1) * b))
        T = jax.lax.dynamic_update_slice(T, R.T, ((j - 1) * b, j * b))
        T = jax.lax.dynamic_update_slice(T, 0.5 * (A + A.T), (j * b, j * b))
        W = project(Qbuf, HQ, j + 1)

        blocks = j + 1
        next_check, last, n_checks = sched
        do_check = (blocks >= next_check) | (blocks == M)

        def run_check(_):
            which_bucket = jnp.searchsorted(bucket_sizes, blocks)
            rho, th, Ypad, scale = jax.lax.switch(which_bucket, branches, T, valid, W,
                                                  blocks * b)
            return rho <= 1.0, (th, Ypad, scale), schedule(blocks, rho, last, n_checks)

        def no_check(_):
            return conv, ritz_state, sched

        conv, ritz_state, sched = jax.lax.cond(do_check, run_check, no_check, None)
        return (blocks, Qbuf, T, valid, (W, jnp.linalg.norm(HQ, axis=1)), conv,
                ritz_state, sched)

    ritz0 = (jnp.zeros((k,), dtype), jnp.zeros((nb, k), dtype), jnp.zeros((), dtype))
    sched0 = (jnp.asarray(first), (jnp.asarray(0), jnp.zeros((), dtype)), jnp.asarray(0))
    state = (jnp.asarray(0), jnp.zeros((n_chunks * C * b, d), dtype),
             jnp.zeros((nb, nb), dtype), jnp.zeros((nb,), bool),
             (W0, jnp.linalg.norm(W0, axis=1)), jnp.asarray(False), ritz0, sched0)
    j, Qbuf, *_, (vals, Y, scale), (*_, n_checks) = jax.lax.while_loop(cond, body, state)

    vecs = Y.T @ Qbuf[:nb]
    nrm = jnp.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = vecs / jnp.where(nrm > 0, nrm, 1.0)
    vecs = sign_fix(vecs)
    res = jnp.linalg.norm(hvp_block(vecs) - vals[:, None] * vecs, axis=1)
    return vals, vecs, res, scale, j, n_checks




# --------------------------------------------------------------------------- eigsh

def eigsh(matvec: MatVec, d: int, k: int = 5, *, dtype: Any = None, which: str = "LA",
          key: Any = None, tol: Optional[float] = None, max_iters: Optional[int] = None,
          block_size: Optional[int] = None, return_info: bool = False,
          strict: bool = False):
    """The top-k eigenpairs of a symmetric operator ``v -> A v`` on R^d, matrix-free.

    Block Lanczos with full reorthogonalisation (:func:`block_lanczos`). A pair is
    converged when ``||A v - lambda v|| <= tol * scale``, ``scale`` the largest
    |Ritz value| (an estimate of ``||A||_2``); the eigenvalue error is then at most
    ``tol * scale`` (and about ``(tol * scale)^2 / gap``).

    Args:
      matvec: ``v (d,) -> A v (d,)``, built from jax ops (it is vmap'd over a block
        and jit-compiled; a new function object compiles anew).
      d: the dimension; dtype: of the vectors (default: float64 under x64).
      k: how many pairs, ``1 <= k <= d``.
      which: ``"LA"`` (algebraically largest) or ``"LM"`` (largest magnitude).
      key: the start block: a jax PRNG key or an int seed (default key 0).
      tol: relative residual tolerance (default :func:`_validate.default_tol`).
      max_iters, block_size: see :func:`lanczos_plan`.
      return_info: also return a :class:`SpectrumInfo`.
      strict: raise :class:`ConvergenceError` instead of warning.

    Returns:
      ``(vals (k,), vecs (k, d))`` (and ``info``), ordered by the criterion, each
      vector signed so its largest-magnitude entry is positive.
    """
    if not callable(matvec):
        raise ValueError(f"`matvec` must be a function v -> A v, got "
                         f"{type(matvec).__name__}.")
    d = _validate.positive_int("d", d)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    which = check_which(which)
    plan = lanczos_plan(d, k, block_size, max_iters, jnp.dtype(dtype).itemsize)
    tol = _validate.default_tol(dtype) if tol is None else tol
    _validate.nonneg("tol", tol, positive=True)
    start = start_block(_validate.as_key(key), (2 * plan.b, d), dtype)
    out = _eigsh_jit(matvec, start, jnp.asarray(tol, dtype), k=int(k), which=which,
                     plan=plan)
    return finish_lanczos(out, plan, k, which, float(tol), return_info, strict,
                          "eigsh")


@functools.partial(jax.jit, static_argnames=("matvec", "k", "which", "plan"))
def _eigsh_jit(matvec, start, tol, *, k, which, plan):
    return block_lanczos(jax.vmap(matvec), start, tol, k=k, which=which, b=plan.b,
                         M=plan.M, first=plan.first, buckets=plan.buckets)


def finish_lanczos(out, plan: LanczosPlan, k: int, which: str, tol: float,
                   return_info: bool, strict: bool, caller: str):
    """Turn :func:`block_lanczos`'s output into ``(vals, vecs[, info])``, warning (or
    raising, ``strict``) if some pair missed ``tol``. Skipped for traced outputs."""
    vals, vecs, res, scale, iters, n_checks = out
    converged = None
    if _validate.is_concrete(res):
        if not bool(jnp.all(jnp.isfinite(vals))):
            raise ValueError(
                "The operator is not finite (Lanczos found NaN/inf eigenvalues): check "
                "that the function is twice differentiable and finite near x.")
        scale = float(scale)
        iters = int(iters)
        converged = bool(np.all(np.asarray(res) <= tol * scale))
        if not converged:
            worst = float(np.max(np.asarray(res))) / max(scale, np.finfo(float).tiny)
            msg = (f"{caller}(method='lanczos') did not converge: after {iters} "
                   f"block iterations (max_iters={plan.M}, block_size={plan.b}, "
                   f"{iters * plan.b + k} Hessian-vector products) the worst relative "
                   f"residual ||Hv - lambda v|| / ||H|| is {worst:.2e} > tol={tol:.1e}. "
                   "Increase max_iters (or block_size, for clustered eigenvalues), or "
                   "loosen tol.")
            if strict:
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        n_checks = int(n_checks)
    info = SpectrumInfo("lanczos", which, res, scale, converged, iters,
                        iters * plan.b + k if isinstance(iters, int) else None, tol,
                        plan.M, plan.b, n_checks)
    return (vals, vecs, info) if return_info else (vals, vecs)


# --------------------------------------------------------------------------- CG

def conjugate_gradients(matvec: MatVec, b: Array, precond: Array, tol: Array,
                        maxiter: Any):
    """Preconditioned CG on ``A x = b`` for every column of ``b (N, r)`` at once.

    Traceable core (no checks). ``matvec`` maps ``(N, r) -> (N, r)`` (A symmetric
    positive definite); ``precond`` is either the diagonal of a Jacobi preconditioner
    ``(N,)`` (entries > 0) or a function ``R (N, r) -> M^-1 R`` applying the inverse of
    a symmetric positive-definite preconditioner M (e.g.
    :func:`low_rank_preconditioner`). Stops when every column's residual is below
    ``tol * |b_col|`` or after ``maxiter`` iterations.

    Returns ``(x, iterations, true relative residual max_col |b - A x| / |b|)``.
    """
    if callable(precond):
        minv = precond
    else:
        dinv = 1.0 / precond[:, None]
        minv = lambda R: dinv * R  # noqa: E731
    bnorm = jnp.linalg.norm(b, axis=0)

    def safe_div(a, c):
        return jnp.where(c > 0, a / jnp.where(c > 0, c, 1.0), 0.0)

    def cond(st):
        x, r, p, rz, it = st
        return (it < maxiter) & jnp.any(jnp.linalg.norm(r, axis=0) > tol * bnorm)

    def body(st):
        x, r, p, rz, it = st
        Ap = matvec(p)
        a = safe_div(rz, jnp.sum(p * Ap, axis=0))
        x = x + a * p
        r = r - a * Ap
        z = minv(r)
        rz_new = jnp.sum(r * z, axis=0)
        p = z + safe_div(rz_new, rz) * p
        return x, r, p, rz_new, it + 1

    z0 = minv(b)
    st0 = (jnp.zeros_like(b), b, z0, jnp.sum(b * z0, axis=0), 0)
    x, r, p, rz, it = jax.lax.while_loop(cond, body, st0)
    true_res = jnp.max(safe_div(jnp.linalg.norm(b - matvec(x), axis=0), bnorm))
    return x, it, true_res


def cg(matvec: MatVec, b: Array, *, precond: Optional[Array] = None,
       tol: Optional[float] = None, maxiter: Optional[int] = None,
       strict: bool = False) -> Tuple[jax.Array, dict]:
    """Solve ``A x = b`` (A symmetric positive definite, given as ``matvec``) by CG.

    Args:
      matvec: ``v (N,) -> A v (N,)`` built from jax ops (vmap'd over the columns).
      b: the right-hand side ``(N,)`` or ``(N, r)``.
      precond: the diagonal of a Jacobi preconditioner ``(N,)``, or a
        :class:`LowRankPreconditioner` (default: none).
      tol: relative residual tolerance (default :func:`_validate.default_tol`).
      maxiter: iteration cap (default ``min(10 N, 10000)``).
      strict: raise :class:`ConvergenceError` instead of warning.

    Returns:
      ``(x, info)`` with ``info = {"iterations", "residual", "converged"}``; the
      residual is the true ``max_col |b - A x| / |b|``.
    """
    if not callable(matvec):
        raise ValueError(f"`matvec` must be a function v -> A v, got "
                         f"{type(matvec).__name__}.")
    b = _validate.float_array("b", b, ndim=(1, 2))
    vector = b.ndim == 1
    B = b[:, None] if vector else b
    N = B.shape[0]
    tol = _validate.default_tol(B.dtype) if tol is None else tol
    _validate.nonneg("tol", tol, positive=True)
    maxiter = min(10 * N, 10000) if maxiter is None else maxiter
    _validate.positive_int("maxiter", maxiter)
    if precond is None:
        precond = jnp.ones((N,), B.dtype)
    elif isinstance(precond, LowRankPreconditioner):
        if precond.B.shape[0] != N:
            raise ValueError(f"`precond` acts on R^{precond.B.shape[0]}, but b has {N} "
                             "rows; build it from the same points.")
        x, it, res = _cg_lowrank_jit(matvec, B, precond, jnp.asarray(tol, B.dtype),
                                     int(maxiter))
        return _cg_report(x, it, res, tol, vector, strict)
    else:
        precond = _validate.float_array("precond", precond, ndim=1)
        if precond.shape != (N,) or not bool(jnp.all(precond > 0)):
            raise ValueError(f"`precond` must be a positive diagonal of shape ({N},).")
    x, it, res = _cg_jit(matvec, B, precond.astype(B.dtype), jnp.asarray(tol, B.dtype),
                         int(maxiter))
    return _cg_report(x, it, res, tol, vector, strict)


def _cg_report(x, it, res, tol, vector, strict):
    it, res = int(it), float(res)
    conv = res <= 10 * tol
    if not conv:
        msg = (f"CG stopped after {it} iterations at relative residual {res:.3g} "
               f"(tol {tol:g}); raise `maxiter`, or precondition the system.")
        if strict:
            raise ConvergenceError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    return (x[:, 0] if vector else x), {"iterations": it, "residual": res,
                                         "converged": conv}


class LowRankPreconditioner(NamedTuple):
    """``M = B B^T + shift I`` and its inverse by the Woodbury identity::

        M^-1 R = (R - B (shift I + B^T B)^-1 B^T R) / shift

    with ``L`` the Cholesky factor of the ``(r, r)`` matrix ``shift I + B^T B``
    (O(n r) per application). A pytree: pass it through ``jit``; call it on
    ``R (n,) or (n, c)``. With ``B B^T`` a Nystrom or partial-Cholesky approximation of
    K, ``M^-1 (K + shift I)`` has its top r eigenvalues brought near 1 (Falkon).
    """

    B: jax.Array
    L: jax.Array
    shift: jax.Array

    def __call__(self, R):
        t = jax.scipy.linalg.cho_solve((self.L, True), self.B.T @ R)
        return (R - self.B @ t) / self.shift


@jax.jit
def _low_rank_factor(B, shift):
    r = B.shape[1]
    return jnp.linalg.cholesky(B.T @ B + shift * jnp.eye(r, dtype=B.dtype))


def low_rank_preconditioner(B: Array, shift: float) -> LowRankPreconditioner:
    """The preconditioner ``(B B^T + shift I)^-1`` for CG on ``K + shift I`` with
    ``K ~ B B^T`` (``B (n, r)``, ``shift > 0``). See :class:`LowRankPreconditioner`."""
    B = jnp.asarray(B)
    _validate.nonneg("shift", shift, positive=True)
    shift = jnp.asarray(shift, B.dtype)
    return LowRankPreconditioner(B, _low_rank_factor(B, shift), shift)


def column_nystrom(matvec: MatVec, idx: Array, N: int, dtype: Any, shift: Array,
                   chunk: int = 8) -> LowRankPreconditioner:
    """The Nystrom preconditioner of an operator ``A + shift I`` from its columns.

    Traceable core. ``matvec`` maps ``(N, c) -> (A + shift I) V``; ``idx`` are r
    distinct column indices. Products of ``chunk`` columns at a time give ``C = A[:, idx]`` and
    ``W = A[idx, idx] = U s U^T``; with eigenvalues below ``100 r eps max s`` dropped,
    ``B = C U s^-1/2`` gives ``B B^T = C W^+ C^T ~ A`` (exact on the span of the
    chosen columns), and :class:`LowRankPreconditioner` ``(B B^T + shift I)^-1``.
    For A symmetric positive semi-definite.
    """
    r = idx.shape[0]
    g = -(-r // chunk)
    idx_p = jnp.concatenate([idx, jnp.broadcast_to(idx[:1], (g * chunk - r,))])

    def columns(ids):       # ``chunk`` columns per product: the memory of a CG step
        E = jnp.zeros((N, chunk), dtype).at[ids, jnp.arange(chunk)].set(1.0)
        return matvec(E) - shift * E

    C = jax.lax.map(columns, idx_p.reshape(g, chunk))          # (g, N, chunk)
    C = jnp.moveaxis(C, 0, 1).reshape(N, g * chunk)[:, :r]
    W = C[idx]
    s, U = jnp.linalg.eigh(0.5 * (W + W.T))
    keep = s > jnp.max(s) * jnp.finfo(dtype).eps * 100 * r
    scale = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, s, 1.0)), 0.0)
    B = C @ (U * scale[None, :])
    return LowRankPreconditioner(B, _low_rank_factor(B, shift), shift)


@functools.partial(jax.jit, static_argnums=0)
def _cg_jit(matvec, B, precond, tol, maxiter):
    return conjugate_gradients(jax.vmap(matvec, in_axes=1, out_axes=1), B, precond, tol,
                               maxiter)


@functools.partial(jax.jit, static_argnums=0)
def _cg_lowrank_jit(matvec, B, precond, tol, maxiter):
    return conjugate_gradients(jax.vmap(matvec, in_axes=1, out_axes=1), B, precond, tol,
                               maxiter)


# --------------------------------------------------------------------------- Newton-LM

def newton_lm(objective: Callable[[Array], Array], gram: Array, ridge: Array, c0: Array,
              tol: Array, maxiter: Any):
    """Minimise ``J(c) = phi(G c) + (lam/2) c^T G c`` by damped Newton in function space.

    Traceable core (no checks). ``G`` is a PSD Gram matrix ``(N, N)`` (the metric of
    the function space: ``f = sum_j c_j k_j``, ``u = G c`` its functionals,
    ``||f||^2 = c^T G c``), ``phi = objective`` a twice-differentiable function of
    ``u (N, r)``, ``c0 (N, r)`` the start. The Newton step needs a factorisation, so
    G comes as a matrix (:func:`matrix_of` builds it from a matvec).

    ``v = grad_u phi + lam c`` is the coefficient vector of the RKHS gradient of J
    (``||grad J||_H^2 = v^T G v``) and the Hessian acts on coefficients as
    ``H_u G + lam I`` (``H_u`` the Hessian of phi in u). The step solves
    ``((H_u + mu I) G + lam I) dc = -v`` (LU): ``mu = 0`` is Newton's step, and
    ``mu >= -min eig(H_u)`` (Gershgorin bound) makes it a descent direction
    (``G ((H_u + mu) G + lam)^-1 = (H_u + mu + lam G^-1)^-1`` is then positive
    definite). Levenberg-Marquardt control: a step is kept if J does not increase
    (mu /= 4), else mu grows (x 8). The loop also stops when a kept step no longer
    lowers J by more than a few ulps of J (the rounding floor: further steps only
    move c by noise). Nothing is factorised from G, so no null directions are
    truncated; at the fixed point ``c = -grad_u phi / lam`` (the representer form).

    Returns ``(c, iterations, ||grad J||_H, its value at c = 0, converged, stalled)``.
    """
    N, r = c0.shape
    Kb = jnp.kron(gram, jnp.eye(r, dtype=gram.dtype))         # acts on c.ravel()
    I = jnp.eye(N * r, dtype=gram.dtype)

    def Jdata(u):
        return objective(u.reshape(N, r))

    def J(cv):
        u = Kb @ cv
        return Jdata(u) + 0.5 * ridge * cv @ u

    def v_of(cv):
        return jax.grad(Jdata)(Kb @ cv) + ridge * cv

    def hnorm(v):
        return jnp.sqrt(jnp.maximum(v @ (Kb @ v), 0.0))

    hess = jax.hessian(Jdata)
    cv0 = c0.ravel()
    g0 = hnorm(v_of(jnp.zeros_like(cv0)))

    eps = jnp.finfo(gram.dtype).eps

    def cond(st):
        cv, Jv, v, mu, it, fails, stalled = st
        return (hnorm(v) > tol * g0) & (it < maxiter) & (fails < 60) & ~stalled

    def body(st):
        cv, Jv, v, mu, it, fails, _ = st
        H = hess(Kb @ cv)
        dc = jnp.linalg.solve((H + mu * I) @ Kb + ridge * I, -v)
        ok = jnp.all(jnp.isfinite(dc)) & (v @ (Kb @ dc) < 0)
        dc = jnp.where(ok, dc, 0.0)
        J_new = J(cv + dc)
        accept = ok & jnp.isfinite(J_new) & (J_new <= Jv)
        off = jnp.sum(jnp.abs(H), axis=1) - jnp.abs(jnp.diag(H))
        floor = jnp.maximum(-jnp.min(jnp.diag(H) - off), 0.0)
        scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(H))), 1e-30)
        mu_up = jnp.maximum(8.0 * mu, floor + 1e-8 * scale)
        mu_down = jnp.where(mu / 4.0 < 1e-12 * scale, 0.0, mu / 4.0)
        stalled = accept & (Jv - J_new <= 4.0 * eps * jnp.abs(Jv))
        cv_new = jnp.where(accept, cv + dc, cv)
        return (cv_new, jnp.where(accept, J_new, Jv),
                jnp.where(accept, v_of(cv_new), v), jnp.where(accept, mu_down, mu_up),
                it + 1, jnp.where(accept, 0, fails + 1), stalled)

    st0 = (cv0, J(cv0), v_of(cv0), jnp.zeros((), cv0.dtype), 0, 0, jnp.zeros((), bool))
    cv, Jv, v, mu, it, fails, stalled = jax.lax.while_loop(cond, body, st0)
    gn = hnorm(v)
    return cv.reshape(N, r), it, gn, g0, gn <= tol * g0, stalled


# --------------------------------------------------------------------------- direct solves

@jax.jit
def cholesky(A: Array) -> Tuple[jax.Array, jax.Array]:
    """The Cholesky factor of ``A`` and whether it is finite (one compiled program)."""
    L = jnp.linalg.cholesky(A)
    return L, jnp.all(jnp.isfinite(L))


@jax.jit
def _cho_solve(L, b):
    return jax.scipy.linalg.cho_solve((L, True), b)


def cholesky_solve(A: Array, b: Array, *, what: str = "the kernel matrix K + n*ridge*I"
                   ) -> jax.Array:
    """Solve ``A x = b`` for symmetric positive-definite ``A`` by Cholesky.

    Raises a ValueError (not NaNs) if ``A`` is not numerically positive definite;
    ``what`` names the matrix in the message.
    """
    L, ok = cholesky(A)
    if not bool(ok):
        raise ValueError(
            f"{what} is not positive definite in {A.dtype} (Cholesky failed). Increase "
            "`ridge`, check the kernel is positive definite, or enable float64 with "
            "ntk_poison.enable_x64().")
    return _cho_solve(L, b)


def _shift_groups(shifts: np.ndarray, rho_max: float = 0.5) -> List[Tuple[float, np.ndarray]]:
    """Group sorted shifts so that each group has a centre mu0 with rho <= rho_max."""
    order = np.argsort(shifts)
    groups = []
    i = 0
    ratio = (1 + rho_max) / (1 - rho_max)   # hi / lo allowed in one group
    while i < len(order):
        lo = shifts[order[i]]
        j = i
        while j + 1 < len(order) and (lo == 0 and shifts[order[j + 1]] == 0
                                      or lo > 0 and shifts[order[j + 1]] <= ratio * lo):
            j += 1
        hi = shifts[order[j]]
        groups.append((0.5 * (lo + hi), order[i:j + 1]))
        i = j + 1
    return groups


@functools.partial(jax.jit, static_argnums=4)
def _neumann_terms(K, rhs, mu0, c, p):
    """V_j = c^j (K + mu0 I)^-(j+1) rhs for j < p, shape (p, N, r); NaN if not PD.

    The factor ``c`` (``mu0`` when it is > 0) keeps the terms bounded: the norm of
    ``c (K + mu0 I)^-1`` is at most 1 for PSD ``K``, whereas ``(K + mu0 I)^-(j+1)``
    alone grows like ``mu0^-(j+1)`` and overflows for small shifts.
    """
    L = jnp.linalg.cholesky(K + mu0 * jnp.eye(K.shape[0], dtype=K.dtype))
    v0 = jax.scipy.linalg.cho_solve((L, True), rhs)

    def step(v, _):
        return c * jax.scipy.linalg.cho_solve((L, True), v), v

    _, V = jax.lax.scan(step, v0, None, length=p)
    return V


def shifted_solve(K: Any, rhs: Array, shifts: Sequence[float]) -> jax.Array:
    """``(K + mu I)^-1 rhs`` for every shift mu, from one Cholesky per group of shifts.

    The shifts are grouped so that each group has a centre mu0 with
    ``rho = max|mu - mu0| / mu0 <= 1/2``, and each solve is the Neumann series
    ``(K + mu I)^-1 = sum_j (mu0 - mu)^j (K + mu0 I)^-(j+1)``, truncated where the
    remainder bound ``rho^(p+1) / (1 - rho)`` is below the dtype's epsilon: the effect
    of M shifts costs one O(N^3) factorisation per group plus O(p N^2), not M.

    Args:
      K: a symmetric positive semi-definite ``(N, N)`` matrix, or a ``matvec``
        (the factorisation needs the matrix: :func:`matrix_of` builds it).
      rhs: ``(N, r)`` right-hand sides.
      shifts: the shifts mu >= 0 (``K + mu I`` must be positive definite).

    Returns:
      ``(len(shifts), N, r)``, exact to the dtype's precision.
    """
    shifts = np.asarray(shifts, dtype=float)
    _validate.nonneg("shifts", shifts)
    rhs = jnp.asarray(rhs)
    K = matrix_of(K, rhs.shape[0], rhs.dtype) if callable(K) else jnp.asarray(K)
    rhs = rhs.astype(K.dtype)
    eps = float(jnp.finfo(K.dtype).eps)
    out = [None] * len(shifts)
    for mu0, idx in _shift_groups(shifts):
        rho = float(np.max(np.abs(shifts[idx] - mu0)) / mu0) if mu0 > 0 else 0.0
        if rho == 0.0:
            p = 1
        else:
            p = int(math.ceil(math.log(eps * (1 - rho) / 4) / math.log(rho)))
            p = 8 * int(math.ceil(p / 8))          # few distinct shapes -> few compiles
        c = mu0 if mu0 > 0 else 1.0
        V = _neumann_terms(K, rhs, jnp.asarray(mu0, K.dtype), jnp.asarray(c, K.dtype), p)
        if not bool(jnp.all(jnp.isfinite(V[0]))):
            raise ValueError(
                f"K + {mu0:g} I is not positive definite in {K.dtype}: increase `ridge` "
                "or enable float64 (ntk_poison.enable_x64()).")
        delta = jnp.asarray((mu0 - shifts[idx]) / c, K.dtype)            # (g,), |.| <= rho
        powers = delta[:, None] ** jnp.arange(p, dtype=K.dtype)[None, :]  # (g, p)
        sol = jnp.einsum("gp,pnr->gnr", powers, V)
        for a, i in enumerate(idx):
            out[i] = sol[a]
    return jnp.stack(out)
