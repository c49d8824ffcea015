"""Input-space curvature: top eigenpairs, the loss Hessian, the input Fisher, alignment.

Everything here acts on a scalar function of ONE input, ``f: R^d -> R`` (an image
``(H, W, C)`` is flattened to ``d = H*W*C``), or on a model offering
``.as_function()`` (a fitted :class:`ntk_poison.krr.KRRModel`). THEORY.md section 1
gives the objects, for the loss ``L(x, y) = 1/2 (f(x) - y)^2`` at a test pair::

    hess_x L(x, y) = g g^T + (f(x) - y) hess_x f(x),     g = grad_x f(x)      (d, d)
    F             = 1/m sum_i grad_x L_i grad_x L_i^T,    grad_x L = (f - y) g (d, d)

For a vector output ``f: R^d -> R^C`` (one-hot targets) the loss is summed over the
outputs, ``L = 1/2 |f(x) - y|^2``, and ``hess_x L = sum_c [g_c g_c^T + (f_c - y_c)
hess_x f_c]`` (:func:`loss_fn`, :func:`loss_hessian`, :func:`input_fisher` accept a
``(C,)`` label per point; :func:`gauss_newton_top` and :func:`top_eigenpairs` of the
prediction itself stay scalar).

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

Design (Lanczos): the solver itself is :func:`ntk_poison.linalg.block_lanczos`, our
block Lanczos on any matrix-vector product (full reorthogonalisation, deflation of
exhausted Krylov directions, residuals per pair; ``benchmarks/lanczos_bench.py``
compares it with matfree's). This module builds the operator, the Hessian-vector
product of a model at a point, and keeps the model-facing checks. A model's
function is split into arrays (jit arguments) and the rest (static) by equinox
(``eqx.filter_jit``), so compiled code is shared across models of the same shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, linalg, models
from ntk_poison.linalg import ConvergenceError, ConvergenceWarning, SpectrumInfo

Array = Any

__all__ = [
    "top_eigenpairs", "hvp", "loss_fn", "loss_hessian", "input_fisher",
    "gauss_newton_top", "alignment", "SpectrumInfo", "ConvergenceWarning",
    "ConvergenceError", "PredictionFunction", "LossFunction", "lanczos_hessian",
    "flat_function", "poison_spike",
]

_METHODS = ("dense", "lanczos")


# --------------------------------------------------------------------------- callables

@functools.partial(jax.tree_util.register_dataclass, data_fields=["model"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PredictionFunction(models.Function):
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
class LossFunction(models.Function):
    """The one-input loss ``x -> 1/2 (f(x) - y)^2`` at a fixed label ``y`` (a pytree);
    for a vector output and a ``(C,)`` label, ``1/2 |f(x) - y|^2`` summed over outputs."""

    predict: Any
    y: Any

    def __call__(self, x):
        r = self.predict(x) - self.y
        return 0.5 * r * r if r.ndim == 0 else 0.5 * jnp.sum(r * r)


def _as_scalar_fn(model: Any, name: str = "model") -> Callable:
    """A model's function (a callable pytree) or a plain callable of one input."""
    return models.as_model_function(model, name)


def flat_function(fn: Callable, shape: Tuple[int, ...]) -> Callable:
    """``v (d,) -> fn(v.reshape(shape))``: a function of one input, on flat vectors."""
    return lambda v: fn(v.reshape(shape))


# --------------------------------------------------------------------------- validation

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
    x = _validate.float_array("x", x)
    v = _validate.array("v", v)
    v = jnp.asarray(v, x.dtype)
    if v.shape != x.shape:
        raise ValueError(f"`v` has shape {tuple(v.shape)} but `x` has {tuple(x.shape)}; "
                         "the direction must live in the input space.")
    return jax.jvp(jax.grad(f), (x,), (v,))[1]


# --------------------------------------------------------------------------- dense

@eqx.filter_jit
def _dense_eigs(fn, x_flat, shape, k, which):
    f = flat_function(fn, shape)
    H = jax.hessian(f)(x_flat)
    H = 0.5 * (H + H.T)
    w, V = jnp.linalg.eigh(H)
    idx = linalg.select_sorted(w, w.shape[0], k, which)
    vals = w[idx]
    vecs = linalg.sign_fix(V[:, idx].T)
    res = jnp.linalg.norm(vecs @ H - vals[:, None] * vecs, axis=1)
    scale = jnp.max(jnp.abs(w))
    return vals, vecs, res, scale


# --------------------------------------------------------------------------- Lanczos

@eqx.filter_jit
def lanczos_hessian(fn: Callable, x_flat: Array, start: Array, tol: Array, shape, k: int,
                    which: str, plan: linalg.LanczosPlan):
    """Block Lanczos on the Hessian-vector products of ``fn`` at ``x_flat``.

    The operator is ``H v = d/de grad f(x + e v)`` (forward over reverse:
    ``jax.linearize`` of ``jax.grad``, the primal pass done once), vmap'd over a block;
    the solver is :func:`ntk_poison.linalg.block_lanczos`. No input checks: the
    front end is :func:`top_eigenpairs`. Jit-compiled (equinox splits ``fn`` into
    arrays and static structure); callable inside another jit.

    Returns ``(vals, vecs, residuals, scale, iterations, checks)``.
    """
    f = flat_function(fn, shape)
    _, lin = jax.linearize(jax.grad(f), x_flat)
    return linalg.block_lanczos(jax.vmap(lin), start, tol, k=k, which=which, b=plan.b,
                                M=plan.M, first=plan.first, buckets=plan.buckets)


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
    x = _validate.float_array("x", x)
    if x.ndim == 0:
        raise ValueError("`x` is a scalar; pass one input of shape (d,) or (H, W, C).")
    shape = tuple(x.shape)
    d = int(np.prod(shape))
    which = linalg.check_which(which)
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
    _check_point_shape(fn if hasattr(fn, "as_function") else None, x, "x", batched=False)
    _check_scalar_output(f, x)
    x_flat = x.reshape(-1)

    if method == "dense":
        k = _check_k(k, d)
        _validate.fits_in_memory(
            f"The dense Hessian at d={d}", 4 * d * d, x.dtype.itemsize,
            "Use method='lanczos' (matrix-free).")
        vals, vecs, res, scale = _dense_eigs(f, x_flat, shape, k, which)
        _check_finite(vals, "dense")
        info = SpectrumInfo("dense", which, res, _maybe_float(scale), True, 0, d, None,
                            None, None)
        return (vals, vecs, info) if return_info else (vals, vecs)

    plan = linalg.lanczos_plan(d, k, block_size, max_iters, x.dtype.itemsize)
    tol = _validate.default_tol(x.dtype) if tol is None else tol
    _validate.nonneg("tol", tol, positive=True)
    start = linalg.start_block(_validate.as_key(key), (2 * plan.b, d), x.dtype)
    out = lanczos_hessian(f, x_flat, start, jnp.asarray(tol, x.dtype), shape, int(k),
                          which, plan)
    return linalg.finish_lanczos(out, plan, int(k), which, float(tol), return_info,
                                 strict, "top_eigenpairs")


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
    same shapes. For a model with C outputs ``y`` is a ``(C,)`` label and the loss is
    ``1/2 |f(x) - y|^2`` (Hessian ``sum_c g_c g_c^T + (f_c - y_c) hess f_c``).
    """
    f = _as_scalar_fn(model, "model")
    _validate.array("y", y)
    y = jnp.asarray(y)
    out = _output_shape(model)
    if y.ndim != 0 and (out is None or tuple(y.shape) != out):
        raise ValueError(f"`y` must be a scalar label (or one label of the model's output "
                         f"shape {out}), got shape {tuple(y.shape)}; for several points "
                         "use loss_hessian(model, x, y).")
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    return LossFunction(f, y)


def _output_shape(model) -> Optional[Tuple[int, ...]]:
    """The output shape of a protocol model at one input (None if it does not say)."""
    X = getattr(model, "X", None)
    if not hasattr(model, "as_function") or X is None or not hasattr(X, "shape"):
        return None
    out = jax.eval_shape(model.as_function(), jax.ShapeDtypeStruct(X.shape[1:], X.dtype))
    return tuple(out.shape)


def _batch_args(model, x, y):
    """Validate ``(x, y)`` as a batch; a single point with a scalar y gets a batch axis.
    A model with vector outputs ``(C,)`` takes labels ``(m, C)`` (or one ``(C,)``)."""
    f = _as_scalar_fn(model, "model")
    x = _validate.float_array("x", x)
    out = _output_shape(model)
    rank = len(out) if out else 0                    # label rank: 0 scalar, 1 vector
    _validate.array("y", y, ndim=(rank, rank + 1))
    y = jnp.asarray(y)
    if out and tuple(y.shape[-1:]) != out:
        raise ValueError(f"`y` has shape {tuple(y.shape)}; the model has outputs of "
                         f"shape {out}, so pass labels (m, {out[0]}) or one ({out[0]},).")
    if out or not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(x.dtype)
    if y.ndim == rank:                               # one point: add the batch axis
        x, y = x[None], y[None]
    if x.ndim < 2:
        raise ValueError(f"`x` must be a batch (m, *input_shape) matching `y` {y.shape}, "
                         f"got shape {tuple(x.shape)}.")
    _validate.same_rows("x", x, "y", y)
    if x.shape[0] == 0:
        raise ValueError("`x` is empty; pass at least one point.")
    _check_point_shape(model, x, "x", batched=True)
    if not out:
        _check_scalar_output(f, x[0], "model")
    return f, x, y.astype(x.dtype)


@eqx.filter_jit
def _loss_hessians(fn, x_flat, y, shape, batch_size):
    f = flat_function(fn, shape)

    def one(args):
        xf, yi = args
        H = jax.hessian(LossFunction(f, yi))(xf)
        return 0.5 * (H + H.T)

    return jax.lax.map(one, (x_flat, y), batch_size=batch_size)


def loss_hessian(model: Any, x: Array, y: Array) -> jax.Array:
    """Dense input Hessians of the loss at each point (THEORY.md section 1).

        H_i = hess_x 1/2 (f(x_i) - y_i)^2 = g_i g_i^T + (f(x_i) - y_i) hess_x f(x_i)

    Args:
      model: a model with ``.as_function()`` or a plain callable ``f(one input)``.
      x: points ``(m, *input_shape)`` (or one point with a scalar ``y``).
      y: labels ``(m,)`` (or a scalar); ``(m, C)`` for a model with C outputs (the
        loss summed over outputs).

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
    return _loss_hessians(f, x.reshape(m, d), y, shape, int(batch))


@eqx.filter_jit
def _loss_grads(fn, x_flat, y, shape):
    f = flat_function(fn, shape)
    return jax.vmap(jax.grad(lambda v, yi: LossFunction(f, yi)(v)))(x_flat, y)


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
    G = _loss_grads(f, x.reshape(m, d), y, shape)
    return G.T @ G / m


@eqx.filter_jit
def _gn_top(fn, x_flat, shape):
    g = jax.grad(flat_function(fn, shape))(x_flat)
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
    x = _validate.float_array("x", x)
    _check_point_shape(model, x, "x", batched=False)
    _check_scalar_output(f, x, "model")
    return _gn_top(f, x.reshape(-1), tuple(x.shape))


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


def poison_spike(poisoned: Any, clean: Any, x: Array) -> dict:
    """The Gauss-Newton eigenvalues ``||grad_x f(x)||^2`` of a poisoned and a clean
    model at one input, and the poison's own spike ``||grad f_p - grad f_c||^2``
    (THEORY.md section 2: ``Lambda_GN = R_k Delta f^2``). Models of the protocol;
    returns floats ``gn_x0``, ``gn_clean_x0``, ``spike_x0``.

    Vector outputs: the GN term is ``J^T J`` (J the ``(C, d)`` input Jacobian), and each
    value is the top eigenvalue ``sigma_max(J)^2`` (of ``J_p``, ``J_c``, ``J_p - J_c``).
    A clone cluster changes every output's gradient along one direction, so
    ``J_p - J_c`` is rank one and its spike is ``R_k ||Delta f||^2``."""
    if getattr(poisoned, "scalar_output", True):
        gp = np.asarray(poisoned.input_grad(np.asarray(x)[None]))[0].ravel()
        gc = np.asarray(clean.input_grad(np.asarray(x)[None]))[0].ravel()
        return dict(gn_x0=float(gp @ gp), gn_clean_x0=float(gc @ gc),
                    spike_x0=float((gp - gc) @ (gp - gc)))
    Jp, Jc = (np.asarray(mod.input_jacobian(np.asarray(x)[None]))[0] for mod in
              (poisoned, clean))
    Jp, Jc = Jp.reshape(Jp.shape[0], -1), Jc.reshape(Jc.shape[0], -1)
    top = lambda J: float(np.linalg.norm(J, 2) ** 2)
    return dict(gn_x0=top(Jp), gn_clean_x0=top(Jc), spike_x0=top(Jp - Jc))
