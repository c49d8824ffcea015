"""Input-space curvature: top eigenpairs, the loss Hessian, the input Fisher, alignment.

Everything here acts on a scalar function of ONE input, ``f: R^d -> R`` (an image
``(H, W, C)`` is flattened to ``d = H*W*C``), or on a model offering
``.as_function()`` (a fitted :class:`ntk_poison.krr.KRRModel`). THEORY.md section 1
gives the objects, for the loss ``L(x, y) = 1/2 (f(x) - y)^2`` at a test pair::

    hess_x L(x, y) = g g^T + (f(x) - y) hess_x f(x),     g = grad_x f(x)      (d, d)
    F             = 1/m sum_i grad_x L_i grad_x L_i^T,    grad_x L = (f - y) g (d, d)

The first Hessian term is the Gauss-Newton (GN) term: rank one, eigenvalue
``||g||^2``, eigenvector ``g / ||g||`` (:func:`gauss_newton_top`). THEORY.md section
2: a clone cluster at ``zeta`` adds ``y_t S grad_x k(x0, zeta)`` to ``g``, so the top
eigenvector of the LOSS Hessian at a trigger point turns towards ``x0 - zeta`` (the
spike); :func:`alignment` measures that as a squared cosine.

:func:`top_eigenpairs` has two methods. ``"dense"`` forms ``jax.hessian`` (forward
over reverse) and calls ``eigh``: O(d) HVPs, O(d^2) memory, O(d^3) time.
``"lanczos"`` is matrix-free: block Lanczos on Hessian-vector products
``H v = d/de grad f(x + e v)`` (forward over reverse: ``jax.linearize`` of
``jax.grad``, i.e. ``jvp(grad f)`` with the primal pass done once), vmap'd over a
block of vectors, with full reorthogonalisation; no ``d x d`` matrix is ever formed.

Design (Lanczos): our own jitted block Lanczos (one ``lax.while_loop``, static block
size and cap), not ``jax.experimental.sparse.linalg.lobpcg_standard``. That exists in
jax 0.10.2 and was accurate in float64 when tried here, but it finds only the
algebraically largest pairs (no ``"LM"``), needs ``5k < d``, returns no residuals or
convergence flag, and its stop rule ``|r| < tol*10*d*(theta + |Av|)`` never fires when
the top eigenvalues are negative (it then runs all ``m`` iterations). matfree is not
installed. Ours reports ``||H v - lambda v||`` per pair and handles exhausted Krylov
spaces (deflation).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate

Array = Any

__all__ = [
    "top_eigenpairs", "hvp", "loss_fn", "loss_hessian", "input_fisher",
    "gauss_newton_top", "alignment", "SpectrumInfo", "ConvergenceWarning",
    "ConvergenceError", "PredictionFunction", "LossFunction",
]

_WHICH = ("LA", "LM")
_METHODS = ("dense", "lanczos")
_DEFAULT_MAX_ITERS = 100


class ConvergenceWarning(UserWarning):
    """Block Lanczos stopped at ``max_iters`` before every residual met ``tol``."""


class ConvergenceError(RuntimeError, ValueError):
    """Raised instead of :class:`ConvergenceWarning` when ``strict=True``.

    It is a RuntimeError and, like numpy's ``LinAlgError``, also a ValueError (the
    project's error type), so ``except ValueError`` catches every failure here.
    """


class SpectrumInfo(NamedTuple):
    """The convergence report of :func:`top_eigenpairs` (``return_info=True``).

    Attributes:
      method: ``"dense"`` or ``"lanczos"``.
      which: ``"LA"`` or ``"LM"``.
      residuals: ``||H v_i - lambda_i v_i||`` for each returned pair, ``(k,)``, computed
        with one extra Hessian-vector product per pair (not the Lanczos estimate).
      scale: the spectral-norm estimate the tolerance is relative to: the largest
        ``|Ritz value|`` seen (dense: ``||H||_2``).
      converged: every ``residuals[i] <= tol * scale`` (always True for dense).
      iterations: Lanczos block iterations run (0 for dense).
      n_hvp: Hessian-vector products used (dense: d, the columns of the Hessian).
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


# --------------------------------------------------------------------------- callables

@functools.partial(jax.tree_util.register_dataclass, data_fields=["model"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PredictionFunction:
    """``x -> model.as_function()(x)``, a pytree: the model's arrays stay jit arguments.

    Passing this (rather than the closure ``model.as_function()``) to a jitted solver
    lets the compiled code be reused across models of the same shapes.
    """

    model: Any

    def __call__(self, x):
        return self.model.as_function()(x)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["predict", "y"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LossFunction:
    """The one-input loss ``x -> 1/2 (f(x) - y)^2`` at a fixed label ``y`` (a pytree)."""

    predict: Any
    y: Any

    def __call__(self, x):
        r = self.predict(x) - self.y
        return 0.5 * r * r


def _as_scalar_fn(model: Any, name: str = "model") -> Callable:
    """A model with ``.as_function()`` (wrapped as a pytree) or a plain callable."""
    if hasattr(model, "as_function"):
        return PredictionFunction(model)
    if callable(model):
        return model
    raise ValueError(
        f"`{name}` must be a callable f(x) -> scalar of one input, or a model with "
        f".as_function() (e.g. a fitted krr.KRRModel); got {type(model).__name__}.")


class _Static:
    """A hashable holder for a non-array pytree leaf (value equality if hashable)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def _key(self):
        try:
            hash(self.value)
            return (0, self.value)
        except TypeError:
            return (1, id(self.value))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        if not isinstance(other, _Static):
            return False
        a, b = self._key(), other._key()
        if a[0] != b[0]:
            return False
        if a[0] == 1 or self.value is other.value:
            return a[1] == b[1]
        try:
            return bool(a[1] == b[1])
        except Exception:  # an __eq__ that does not return a bool
            return False


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _partition(fn) -> Tuple[Any, list]:
    """Split a callable pytree into (hashable static part, list of array leaves).

    Array leaves (a model's training inputs and dual weights, a label) become
    dynamic jit arguments; everything else (functions, kernels, Python scalars) is
    static and keys the compilation cache.
    """
    leaves, treedef = jax.tree_util.tree_flatten(fn)
    mask = [_is_array(leaf) for leaf in leaves]
    dynamic = [leaf for leaf, m in zip(leaves, mask) if m]
    static = tuple(None if m else _Static(leaf) for leaf, m in zip(leaves, mask))
    return (treedef, static), dynamic


def _rebuild(spec, dynamic):
    treedef, static = spec
    it = iter(dynamic)
    leaves = [next(it) if s is None else s.value for s in static]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _flat_fn(fn, shape):
    return lambda v: fn(v.reshape(shape))


# --------------------------------------------------------------------------- validation

def _float_input(name: str, x: Any) -> jax.Array:
    _validate.array(name, x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _check_scalar_output(fn, x, name: str = "fn") -> None:
    """``fn(x)`` must be a real scalar (checked by abstract evaluation, no FLOPs)."""
    try:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
    except Exception as e:
        raise ValueError(
            f"`{name}` could not be evaluated at one input of shape {tuple(x.shape)}: "
            f"{type(e).__name__}: {e}. It must take ONE input (no batch axis) and return "
            "a scalar.") from e
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"`{name}` must return a scalar for one input, got output shape {shape}. For "
            "a vector output pick a component, e.g. `lambda x: f(x)[c]`; if it expects a "
            "batch, wrap it: `lambda x: f(x[None])[0]`.")


def _check_point_shape(model, x, what: str, batched: bool) -> None:
    """If ``model`` knows its inputs (``model.X``), the point shape must match."""
    X = getattr(model, "X", None)
    if X is None or not hasattr(X, "shape"):
        return
    want = tuple(X.shape[1:])
    got = tuple(x.shape[1:]) if batched else tuple(x.shape)
    if got != want:
        hint = ("a batch (m, *input_shape)" if batched else "one input (no batch axis)")
        raise ValueError(
            f"`{what}` has inputs of shape {got} but the model was trained on inputs of "
            f"shape {want}; pass {hint}.")


def _check_k(k, d) -> int:
    if not _validate.is_int_scalar(k) or not 1 <= k <= d:
        raise ValueError(
            f"`k` must be an integer with 1 <= k <= d = {d} (the flat input size), got "
            f"{k!r}.")
    return int(k)


def _check_which(which) -> str:
    w = str(which).upper() if isinstance(which, str) else which
    if w not in _WHICH:
        raise ValueError(
            f"`which` must be 'LA' (algebraically largest) or 'LM' (largest magnitude), "
            f"got {which!r}.")
    return w


def _as_key(key):
    if key is None:
        return jax.random.PRNGKey(0)
    if _validate.is_int_scalar(key):
        return jax.random.PRNGKey(int(key))
    if not isinstance(key, jax.Array):
        raise ValueError("`key` must be a jax PRNG key (jax.random.PRNGKey(seed) or "
                         f"jax.random.key(seed)) or an int seed, got {type(key).__name__}.")
    return key


def _start_block(key, shape, dtype):
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


def _sign_fix(vecs):
    """Make the largest-magnitude entry of each row positive (a deterministic sign)."""
    idx = jnp.argmax(jnp.abs(vecs), axis=1)
    s = jnp.sign(jnp.take_along_axis(vecs, idx[:, None], axis=1))
    return vecs * jnp.where(s == 0, 1.0, s).astype(vecs.dtype)


def _select_sorted(theta, n_true, k, which):
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


# --------------------------------------------------------------------------- HVP

def hvp(fn: Any, x: Array, v: Array) -> jax.Array:
    """The Hessian-vector product ``hess_x fn(x) v`` (forward over reverse).

        H v = d/de grad fn(x + e v) |_{e=0} = jvp(grad fn, (x,), (v,))

    One forward-mode pass through the reverse-mode gradient: about 3-4 times the cost
    of ``fn``, memory O(cost of ``fn``), never the ``d x d`` Hessian.

    Args:
      fn: a scalar function of one input (or a model with ``.as_function()``).
      x: the point, any shape (e.g. ``(d,)`` or an image ``(H, W, C)``).
      v: the direction, the same shape as ``x``.

    Returns:
      ``H v`` with the shape of ``x``.
    """
    f = _as_scalar_fn(fn, "fn")
    x = _float_input("x", x)
    v = _validate.array("v", v)
    v = jnp.asarray(v, x.dtype)
    if v.shape != x.shape:
        raise ValueError(f"`v` has shape {tuple(v.shape)} but `x` has {tuple(x.shape)}; "
                         "the direction must live in the input space.")
    return jax.jvp(jax.grad(f), (x,), (v,))[1]


# --------------------------------------------------------------------------- dense

@functools.partial(jax.jit, static_argnames=("spec", "shape", "k", "which"))
def _dense_eigs(spec, dynamic, x_flat, *, shape, k, which):
    f = _flat_fn(_rebuild(spec, dynamic), shape)
    H = jax.hessian(f)(x_flat)
    H = 0.5 * (H + H.T)
    w, V = jnp.linalg.eigh(H)
    idx = _select_sorted(w, w.shape[0], k, which)
    vals = w[idx]
    vecs = _sign_fix(V[:, idx].T)
    res = jnp.linalg.norm(vecs @ H - vals[:, None] * vecs, axis=1)
    scale = jnp.max(jnp.abs(w))
    return vals, vecs, res, scale


# --------------------------------------------------------------------------- Lanczos

def _orthonormalise_block(W, ref_norms, thresh, fresh):
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


def _eigh_buckets(first: int, M: int, factor: int = 2) -> Tuple[int, ...]:
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


@functools.partial(jax.jit, static_argnames=("spec", "shape", "k", "which", "b", "M",
                                             "first", "buckets"))
def _lanczos_eigs(spec, dynamic, x_flat, start, tol, *, shape, k, which, b, M, first,
                  buckets):
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
    f = _flat_fn(_rebuild(spec, dynamic), shape)
    d = x_flat.shape[0]
    dtype = x_flat.dtype
    nb = M * b
    # The basis is stored in chunks of C blocks (about 64 rows); reorthogonalisation
    # only visits the chunks filled so far, so its cost grows with the basis actually
    # built, not with max_iters.
    C = max(1, 64 // b)
    n_chunks = -(-M // C)
    _, lin = jax.linearize(jax.grad(f), x_flat)
    hvp_block = jax.vmap(lin)
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
            idx = _select_sorted(theta, n_live, k, which)
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
        Qj, R, vj = _orthonormalise_block(W, ref, thresh, fresh)
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
    vecs = _sign_fix(vecs)
    res = jnp.linalg.norm(hvp_block(vecs) - vals[:, None] * vecs, axis=1)
    return vals, vecs, res, scale, j, n_checks


# --------------------------------------------------------------------------- public

def top_eigenpairs(fn: Any, x: Array, k: int = 5, method: str = "dense", *,
                   which: str = "LA", key: Any = None, tol: Optional[float] = None,
                   max_iters: Optional[int] = None, block_size: Optional[int] = None,
                   return_info: bool = False, strict: bool = False):
    """The top-k eigenpairs of the input Hessian ``hess_x fn(x)`` at one point.

    ``"top"`` means algebraically largest (``which="LA"``, the default: the curvature
    spike of THEORY.md section 2 is a large positive eigenvalue) or largest in
    magnitude (``which="LM"``). For the LOSS Hessian at a labelled point use
    ``top_eigenpairs(loss_fn(model, y0), x0)``.

    Methods:
      * ``"dense"``: ``H = jax.hessian`` (jacfwd over jacrev) of the flattened
        function, then ``eigh``. d HVPs, O(d^2) memory, O(d^3) time. Exact.
      * ``"lanczos"``: block Lanczos with full reorthogonalisation on batched
        Hessian-vector products (forward over reverse); O(max_iters * b * d) memory,
        no ``d x d`` matrix. A pair is converged when
        ``||H v - lambda v|| <= tol * scale``, ``scale`` the largest |Ritz value| (an
        estimate of ``||H||_2``); the eigenvalue error is then ``<= tol * scale``
        (and about ``(tol * scale)^2 / gap``). Ritz values are computed at checks
        scheduled from the observed residual decay (at most ~50% past convergence),
        and the loop stops at the first check where all k pairs converge.
        Deterministic given ``key``.

    Both methods call LAPACK ``eigh`` (through scipy's OpenBLAS): once on the d x d
    Hessian (dense), or on the small projected matrix at each check (Lanczos). On a
    machine whose cores are busy with other processes, multi-threaded OpenBLAS can
    spin and inflate wall time; ``OPENBLAS_NUM_THREADS=1`` avoids that.

    Works under an outer ``jax.jit`` / ``jax.vmap`` over ``x`` (the warning and
    ``strict`` then need concrete values and are skipped; return
    ``info.residuals`` from the traced function and check it outside).

    Args:
      fn: a scalar function of ONE input (no batch axis), or a model with
        ``.as_function()`` (its prediction). A pytree callable (such as
        :func:`loss_fn`'s result) keeps its arrays as jit arguments, so repeated
        calls reuse the compiled code; a plain closure is compiled once per closure
        object.
      x: the point, ``(d,)`` or image-shaped ``(H, W, C)``.
      k: how many pairs, ``1 <= k <= d``.
      method: ``"dense"`` or ``"lanczos"``.
      which: ``"LA"`` or ``"LM"``.
      key: Lanczos start block: a jax PRNG key or an int seed (default key 0).
      tol: Lanczos relative residual tolerance (default 1e-8 in float64, 1e-4 in
        float32).
      max_iters: Lanczos block iterations (default 100, capped at
        ``ceil(d / block_size)``, where the Krylov space is all of R^d).
      block_size: Lanczos block size b (default k).
      return_info: also return a :class:`SpectrumInfo`.
      strict: raise :class:`ConvergenceError` instead of warning when Lanczos has not
        converged.

    Returns:
      ``(vals, vecs)`` (and ``info``): ``vals (k,)`` ordered by the criterion
      (descending value for LA, descending |value| for LM); ``vecs (k, d)`` unit rows
      over the flattened input, each signed so its largest-magnitude entry is
      positive. Without convergence Lanczos warns with :class:`ConvergenceWarning`
      naming ``tol`` and ``max_iters``.
    """
    f = _as_scalar_fn(fn, "fn")
    x = _float_input("x", x)
    if x.ndim == 0:
        raise ValueError("`x` is a scalar; pass one input of shape (d,) or (H, W, C).")
    shape = tuple(x.shape)
    d = int(np.prod(shape))
    k = _check_k(k, d)
    which = _check_which(which)
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
    _check_point_shape(fn if hasattr(fn, "as_function") else None, x, "x", batched=False)
    _check_scalar_output(f, x)
    spec, dynamic = _partition(f)
    x_flat = x.reshape(-1)
    item = x.dtype.itemsize

    if method == "dense":
        _validate.fits_in_memory(
            f"The dense Hessian at d={d}", 4 * d * d, item,
            "Use method='lanczos' (matrix-free).")
        vals, vecs, res, scale = _dense_eigs(spec, dynamic, x_flat, shape=shape, k=k,
                                             which=which)
        _check_finite(vals, "dense")
        info = SpectrumInfo("dense", which, res, _maybe_float(scale), True, 0, d, None,
                            None, None)
        return (vals, vecs, info) if return_info else (vals, vecs)

    if tol is None:
        tol = 1e-8 if x.dtype == jnp.float64 else 1e-4
    _validate.nonneg("tol", tol, positive=True)
    if max_iters is None:
        max_iters = _DEFAULT_MAX_ITERS
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
        (M * b + 64 + 2 * b) * d + 2 * (M * b) ** 2, item,
        "Reduce max_iters or block_size.")
    start = _start_block(_as_key(key), (2 * b, d), x.dtype)
    # The first check once the Krylov space holds k vectors, and not before 3 blocks
    # (a check costs one eigh; earlier ones almost never stop the loop).
    first = min(M, max(-(-k // b), 3))
    vals, vecs, res, scale, iters, n_checks = _lanczos_eigs(
        spec, dynamic, x_flat, start, jnp.asarray(tol, x.dtype), shape=shape, k=k,
        which=which, b=b, M=M, first=first, buckets=_eigh_buckets(first, M))
    converged = None
    if _validate.is_concrete(res):
        _check_finite(vals, "lanczos")
        scale_f = float(scale)
        iters = int(iters)
        converged = bool(np.all(np.asarray(res) <= float(tol) * scale_f))
        if not converged:
            worst = float(np.max(np.asarray(res))) / max(scale_f, np.finfo(float).tiny)
            msg = (f"top_eigenpairs(method='lanczos') did not converge: after {iters} "
                   f"block iterations (max_iters={M}, block_size={b}, {iters * b + k} "
                   f"Hessian-vector products) the worst relative residual "
                   f"||Hv - lambda v|| / ||H|| is {worst:.2e} > tol={float(tol):.1e}. "
                   "Increase max_iters (or block_size, for clustered eigenvalues), or "
                   "loosen tol.")
            if strict:
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=2)
        scale = scale_f
        n_checks = int(n_checks)
    info = SpectrumInfo("lanczos", which, res, scale, converged, iters,
                        iters * b + k if isinstance(iters, int) else None, float(tol), M,
                        b, n_checks)
    return (vals, vecs, info) if return_info else (vals, vecs)


def _maybe_float(v):
    return float(v) if _validate.is_concrete(v) else v


def _check_finite(vals, method):
    if _validate.is_concrete(vals) and not bool(jnp.all(jnp.isfinite(vals))):
        raise ValueError(
            f"The Hessian of `fn` at `x` is not finite (method={method!r} found NaN/inf "
            "eigenvalues): check that fn is twice differentiable and finite near x.")


def loss_fn(model: Any, y: Any) -> LossFunction:
    """The loss at a fixed label as a function of one input (THEORY.md section 1).

        L(x) = 1/2 (f(x) - y)^2,   f = model.as_function() or model itself

    Returns a :class:`LossFunction` (a callable pytree), so that
    ``top_eigenpairs(loss_fn(model, y0), x0)`` gives the LOSS-Hessian spectrum
    ``g g^T + (f(x0) - y0) hess f(x0)`` and recompiles nothing across models of the
    same shapes.
    """
    f = _as_scalar_fn(model, "model")
    _validate.array("y", y)
    y = jnp.asarray(y)
    if y.ndim != 0:
        raise ValueError(f"`y` must be a scalar label, got shape {tuple(y.shape)}; for "
                         "several points use loss_hessian(model, x, y).")
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    return LossFunction(f, y)


def _batch_args(model, x, y):
    """Validate ``(x, y)`` as a batch; a single point with a scalar y gets a batch axis."""
    f = _as_scalar_fn(model, "model")
    x = _float_input("x", x)
    _validate.array("y", y, ndim=(0, 1))
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(x.dtype)
    if y.ndim == 0:
        x, y = x[None], y[None]
    if x.ndim < 2:
        raise ValueError(f"`x` must be a batch (m, *input_shape) matching `y` {y.shape}, "
                         f"got shape {tuple(x.shape)}.")
    _validate.same_rows("x", x, "y", y)
    if x.shape[0] == 0:
        raise ValueError("`x` is empty; pass at least one point.")
    _check_point_shape(model, x, "x", batched=True)
    _check_scalar_output(f, x[0], "model")
    return f, x, y.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("spec", "shape", "batch_size"))
def _loss_hessians(spec, dynamic, x_flat, y, *, shape, batch_size):
    f = _flat_fn(_rebuild(spec, dynamic), shape)

    def one(args):
        xf, yi = args
        H = jax.hessian(lambda v: 0.5 * (f(v) - yi) ** 2)(xf)
        return 0.5 * (H + H.T)

    return jax.lax.map(one, (x_flat, y), batch_size=batch_size)


def loss_hessian(model: Any, x: Array, y: Array) -> jax.Array:
    """Dense input Hessians of the loss at each point (THEORY.md section 1).

        H_i = hess_x 1/2 (f(x_i) - y_i)^2 = g_i g_i^T + (f(x_i) - y_i) hess_x f(x_i)

    Args:
      model: a model with ``.as_function()`` or a plain callable ``f(one input)``.
      x: points ``(m, *input_shape)`` (or one point with a scalar ``y``).
      y: labels ``(m,)`` (or a scalar).

    Returns:
      ``(m, d, d)``, d the flat input size; ``jax.hessian`` vmap'd over points (in
      batches that fit the memory budget).
    """
    f, x, y = _batch_args(model, x, y)
    m = x.shape[0]
    shape = tuple(x.shape[1:])
    d = int(np.prod(shape))
    item = x.dtype.itemsize
    _validate.fits_in_memory(
        f"loss_hessian's output (m, d, d) = ({m}, {d}, {d})", m * d * d, item,
        "Pass fewer points at once, or use top_eigenpairs(loss_fn(model, y), x, "
        "method='lanczos').")
    n_hint = int(getattr(model, "X", np.zeros((d,))).shape[0])
    per_point = 8 * d * (d + n_hint) * item
    batch = max(1, min(m, _validate.memory_budget_bytes() // 4 // max(per_point, 1)))
    spec, dynamic = _partition(f)
    return _loss_hessians(spec, dynamic, x.reshape(m, d), y, shape=shape,
                          batch_size=int(batch))


@functools.partial(jax.jit, static_argnames=("spec", "shape"))
def _loss_grads(spec, dynamic, x_flat, y, *, shape):
    f = _flat_fn(_rebuild(spec, dynamic), shape)
    return jax.vmap(jax.grad(lambda v, yi: 0.5 * (f(v) - yi) ** 2))(x_flat, y)


def input_fisher(model: Any, x: Array, y: Array) -> jax.Array:
    """The empirical input Fisher (THEORY.md section 1, MSE with unit noise).

        F = 1/m sum_i grad_x L_i grad_x L_i^T,   grad_x L_i = (f(x_i) - y_i) grad_x f(x_i)

    At a single point it is the GN term times the squared residual.

    Args:
      model: a model with ``.as_function()`` or a plain callable ``f(one input)``.
      x: points ``(m, *input_shape)`` (or one point with a scalar ``y``).
      y: labels ``(m,)`` (or a scalar).

    Returns:
      ``(d, d)``, symmetric positive semi-definite, rank <= m.
    """
    f, x, y = _batch_args(model, x, y)
    m = x.shape[0]
    shape = tuple(x.shape[1:])
    d = int(np.prod(shape))
    _validate.fits_in_memory(f"input_fisher's output (d, d) = ({d}, {d})", 2 * d * d,
                             x.dtype.itemsize, "Use a smaller input, or the per-point "
                             "gradients (jax.grad of loss_fn) and a matrix-free method.")
    spec, dynamic = _partition(f)
    G = _loss_grads(spec, dynamic, x.reshape(m, d), y, shape=shape)
    return G.T @ G / m


@functools.partial(jax.jit, static_argnames=("spec", "shape"))
def _gn_top(spec, dynamic, x_flat, *, shape):
    g = jax.grad(_flat_fn(_rebuild(spec, dynamic), shape))(x_flat)
    lam = g @ g
    nrm = jnp.sqrt(lam)
    u = jnp.where(nrm > 0, g / jnp.where(nrm > 0, nrm, 1.0), 0.0)
    return lam, u


def gauss_newton_top(model: Any, x: Array) -> Tuple[jax.Array, jax.Array]:
    """The rank-one Gauss-Newton term's eigenpair at one point (THEORY.md section 1).

        GN(x) = g g^T,   g = grad_x f(x):   Lambda_GN = ||g||^2,   u = g / ||g||

    Args:
      model: a model with ``.as_function()`` or a plain callable ``f(one input)``.
      x: one input (no batch axis), ``(d,)`` or image-shaped.

    Returns:
      ``(Lambda_GN, u)``: a scalar and a unit vector ``(d,)`` over the flattened input
      (the zero vector if ``g = 0``, where every direction is an eigenvector).
    """
    f = _as_scalar_fn(model, "model")
    x = _float_input("x", x)
    _check_point_shape(model, x, "x", batched=False)
    _check_scalar_output(f, x, "model")
    spec, dynamic = _partition(f)
    return _gn_top(spec, dynamic, x.reshape(-1), shape=tuple(x.shape))


def alignment(v: Array, direction: Array) -> jax.Array:
    """The squared cosine overlap ``<v, u>^2 / (|v|^2 |u|^2)`` in [0, 1].

    The overlap metric of THEORY.md section 4 (trigger direction vs the top Hessian
    eigenvector). Both arguments are flattened, so ``direction`` may be image-shaped;
    it is sign-blind (eigenvectors have no sign).

    Raises ValueError on size mismatch, NaN/inf, or a zero vector.
    """
    _validate.array("v", v)
    _validate.array("direction", direction)
    a = jnp.ravel(jnp.asarray(v))
    u = jnp.ravel(jnp.asarray(direction))
    if a.size != u.size:
        raise ValueError(
            f"`v` has {a.size} entries but `direction` has {u.size} (shapes "
            f"{tuple(jnp.shape(v))} and {tuple(jnp.shape(direction))}); they must be the "
            "same input space (both are flattened).")
    dtype = jnp.result_type(a.dtype, u.dtype, float)
    a, u = a.astype(dtype), u.astype(dtype)
    na, nu = a @ a, u @ u
    for name, nrm in (("v", na), ("direction", nu)):
        if _validate.is_concrete(nrm) and not float(nrm) > 0:
            raise ValueError(f"`{name}` is the zero vector; the overlap is undefined. "
                             "Pass a non-zero direction.")
    return jnp.clip((a @ u) ** 2 / (na * nu), 0.0, 1.0)
