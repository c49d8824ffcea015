"""Exact certificates of kernel models against label poisoning (issue 14, THEORY.md
section 5, "the kernel regime").

**The weights.** KRR and kernel gradient flow are linear in the labels::

    f(x*) = a(x*) . y,     a(x*) = k(x*, X) (K + n lam I)^-1               (KRR)
    a_t(x*) = k(x*, X) Q diag(-expm1(-e t / n) / e) Q^T                    (flow at t)

``K + n lam I = Q diag(e) Q^T``; ``lam`` is the relative ridge (absolute ``n lam``,
as :func:`ntk_poison.krr.fit`) and ``t`` the flow time of
:func:`ntk_poison.flow.kernel_flow` at kappa = 0 (learning rate 1 on the objective;
``e = 0``: ``t / n``). :func:`kernel_weights` factors ``K + n lam I`` once
(Cholesky; ``eigh`` for the flow) and solves with ``k(X, x_test)`` on the right:
O(n^3) once, O(n^2) per test point (a BLAS-3 solve over a block of points), then
every certificate below is O(n log n) per point (a sort; top-k of n numbers).

**Bounded label changes** (:func:`label_change_bounds`): ``|y'_i - y_i| <= eps`` at
no more than k points moves ``f`` by at most ``eps * (sum of the k largest |a_i|)``,
attained by changing those points by ``eps sign(a_i)`` (up or down). Exact.

**Label flips** (``y in {-1, +1}^n``; :func:`label_flip_bounds`): flipping point i
changes ``f`` by ``-2 a_i y_i`` and flips add, so over every flip set of size <= k::

    min f = f - topk_i max(0,  2 a_i y_i),     max f = f + topk_i max(0, -2 a_i y_i)

(exact: the k best non-negative gains). :func:`certified_radius`: with
``s = sign f(x*)`` and gains ``g_i = max(0, 2 s a_i y_i)`` the radius is the largest
``k <= n`` with ``|f| - topk(g) > 0``. *Ties:* reaching ``f = 0`` counts as changing
the sign, and a point with ``f(x*) = 0`` has radius 0 (it is never counted as
certified-correct by :func:`certified_accuracy`, since sign 0 is no class).

**Multi-class** (targets ``(n, C)``, rows ``s e_c + b``: one-hot, centred one-hot
``e_c - 1/C``, or +-1 one-vs-rest; :func:`class_margin_bounds`). Relabelling point i
from class ``y_i`` to class c changes its row by ``s (e_c - e_{y_i})``, so the margin
``M_q = f_p - f_q`` between the predicted class p and a class q changes by
``s a_i ([c=p] - [c=q] - [y_i=p] + [y_i=q])``. The attacker's best decrease per point
is the max over c (c = y_i: no change)::

    g_iq = s (|a_i| - a_i u_iq),     u_iq = [y_i = q] - [y_i = p]

(``2s max(a_i, 0)`` if y_i = p, ``2s max(-a_i, 0)`` if y_i = q, ``s |a_i|`` otherwise)
and per point the choices add, so ``min over <= k flips of M_q = M_q - topk_i g_iq``
exactly, per class q; the prediction survives k flips iff every ``M_q`` stays > 0
(the min over flip sets of ``min_q M_q`` is ``min_q`` of the per-class minima).

**Clone poisons** (:func:`clone_worst_case`): the exact effect of m clones of
``(zeta, y_t)`` for each zeta of a finite candidate set, by the rank-one clone law
(:class:`ntk_poison.attacks.optimal.CloneSolver`: one factorisation, O(N^2) per
candidate). The
maximum over a finite set is a LOWER bound on the attacker's power over all zeta.

**Joint certificates** (:func:`joint_flip_certificate`): one flip set for a whole
test set is a mixed-integer linear program (``scipy.optimize.milp``, HiGHS), for
small problems only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, krr, linalg
from ntk_poison.kernels import Kernel

Array = Any

__all__ = ["kernel_weights", "label_flip_bounds", "label_change_bounds",
           "certified_radius", "certified_accuracy", "class_margin_bounds",
           "clone_worst_case", "CloneWorstCase", "joint_flip_certificate",
           "joint_flip_solution", "JointCertificate", "MILP_MAX_VARIABLES"]

#: Elements of one block of weights ``(points, n[, C])`` held at once.
_BLOCK_ELEMENTS = 1 << 24
#: The default size limit (binary variables: n flips + one per test point) of the MILP.
MILP_MAX_VARIABLES = 400


# --------------------------------------------------------------------------- weights

def kernel_weights(k: Kernel, X: Array, ridge: float, x_test: Array, *,
                   time: Optional[float] = None) -> jax.Array:
    """The label weights ``a(x*)`` of every test point, ``(m, n)``: ``f(x*) = a(x*) . y``.

    KRR (``time=None``): ``a = k(x*, X) (K + n ridge I)^-1``; kernel flow at time t:
    ``a_t = k(x*, X) Q diag(-expm1(-e t / n) / e) Q^T`` (module docstring; the
    predictions of :func:`ntk_poison.flow.kernel_flow` at kappa = 0).
    """
    k, X, ridge, time = _check_model(k, X, ridge, time)
    x_test = _check_test(k, X, x_test)
    op = _weight_operator(k, X, ridge, time)
    return jnp.concatenate([op(xb) for xb in _blocks(x_test, X.shape[0])], axis=0)


def _weight_operator(k: Kernel, X: jax.Array, ridge: float, time: Optional[float]
                     ) -> Callable[[jax.Array], jax.Array]:
    """``xb -> a(xb)`` ``(b, n)`` after one factorisation of ``K + n ridge I``."""
    n = X.shape[0]
    _validate.fits_in_memory(
        f"The Gram matrix for n={n} training points", 3 * n * n, X.dtype.itemsize,
        "Subsample the training set (ntk_poison.data.subset) or use a smaller n.")
    A = krr.gram_plus_ridge(k, X, jnp.asarray(n * ridge, X.dtype))
    A = 0.5 * (A + A.T)
    if time is None:
        L, ok = linalg.cholesky(A)
        if not bool(ok):
            raise ValueError(
                f"K + n*ridge*I is not positive definite in {A.dtype} (Cholesky failed). "
                "Increase `ridge`, or enable float64 with ntk_poison.enable_x64().")
        return lambda xb: _krr_weights(k, X, L, xb)
    G = _flow_operator(A, jnp.asarray(time, X.dtype))
    return lambda xb: _flow_weights(k, X, G, xb)


@functools.partial(jax.jit, static_argnums=0)
def _krr_weights(k: Kernel, X, L, xb):
    return jax.scipy.linalg.cho_solve((L, True), k.fn(X, xb)).T


@jax.jit
def _flow_operator(A, t):
    """``Q diag(-expm1(-e t / n) / e) Q^T`` (e = 0: t / n), as flow's closed form."""
    n = A.shape[0]
    e, Q = jnp.linalg.eigh(A)
    e = jnp.maximum(e, 0.0)
    pos = e > 0
    e_safe = jnp.where(pos, e, 1.0)
    phi = jnp.where(pos, -jnp.expm1(-e_safe * t / n) / e_safe, t / n)
    return (Q * phi) @ Q.T


@functools.partial(jax.jit, static_argnums=0)
def _flow_weights(k: Kernel, X, G, xb):
    return k.fn(xb, X) @ G


def _blocks(x: jax.Array, width: int):
    size = max(1, _BLOCK_ELEMENTS // max(width, 1))
    return [x[i:i + size] for i in range(0, x.shape[0], size)]


def _over_blocks(k, X, ridge, time, x_test, width, stat: Callable, *args):
    """``stat(a(xb), *args)`` for each block of test points, concatenated (tuples of
    outputs concatenate component-wise)."""
    op = _weight_operator(k, X, ridge, time)
    outs = [stat(op(xb), *args) for xb in _blocks(x_test, width)]
    if isinstance(outs[0], tuple):
        return tuple(jnp.concatenate(parts) for parts in zip(*outs))
    return jnp.concatenate(outs)


# --------------------------------------------------------------------------- ±1 flips

def label_flip_bounds(k: Kernel, X: Array, y: Array, ridge: float, x_test: Array,
                      n_flips: int, *, time: Optional[float] = None
                      ) -> Tuple[jax.Array, jax.Array]:
    """Exact ``(min, max)`` of ``f(x_test)`` over every label vector within ``n_flips``
    flips of ``y`` (module docstring), each ``(m,)``::

        lo = f - topk max(0, 2 a_i y_i),    hi = f + topk max(0, -2 a_i y_i)

    Args:
      k, X, ridge: the kernel, training inputs ``(n, *s)`` and relative ridge.
      y: +-1 float labels ``(n,)``.
      x_test: test inputs ``(m, *s)``.
      n_flips: an int >= 0 (values over n act as n).
      time: None for KRR, else the kernel-flow time (:func:`kernel_weights`).
    """
    k, X, y, ridge, time = _check_binary(k, X, y, ridge, time)
    x_test = _check_test(k, X, x_test)
    kk = min(_check_count("n_flips", n_flips), X.shape[0])
    return _over_blocks(k, X, ridge, time, x_test, X.shape[0],
                        _flip_bounds, y, jnp.asarray(kk))


@jax.jit
def _flip_bounds(W, y, kk):
    f = W @ y
    g = 2.0 * W * y
    return f - _top_sum(jnp.maximum(g, 0.0), kk), f + _top_sum(jnp.maximum(-g, 0.0), kk)


def _top_sum(g, kk):
    """Sum of the ``kk`` largest entries along the last axis (0 for kk = 0); ``kk`` is
    traced (one compiled program for every budget): a sort and a cumulative sum."""
    cum = jnp.cumsum(-jnp.sort(-g, axis=-1), axis=-1)
    return jnp.where(kk > 0, jnp.take(cum, jnp.maximum(kk - 1, 0), axis=-1), 0.0)


def label_change_bounds(k: Kernel, X: Array, y: Array, ridge: float, x_test: Array,
                        eps: float, k_points: int, *, time: Optional[float] = None
                        ) -> Tuple[jax.Array, jax.Array]:
    """Exact ``(min, max)`` of ``f(x_test)`` when at most ``k_points`` labels each move by
    at most ``eps``: ``f -+ eps * (sum of the k_points largest |a_i|)``, ``(m,)`` each.

    ``y``: float targets ``(n,)`` (any real values); ``eps >= 0``; ``k_points`` an
    int >= 0; ``time`` as :func:`label_flip_bounds`.
    """
    k, X, y = krr.check_training(k, X, y, ridge)
    ridge = float(ridge)
    if y.ndim != 1:
        raise ValueError(f"`y` must be scalar targets of shape (n,), got {tuple(y.shape)}; "
                         "bound each output column separately.")
    time = _check_time(time)
    x_test = _check_test(k, X, x_test)
    eps = _validate.scalar("eps", eps)
    kk = min(_check_count("k_points", k_points), X.shape[0])
    return _over_blocks(k, X, ridge, time, x_test, X.shape[0],
                        _change_bounds, y, jnp.asarray(eps, X.dtype), jnp.asarray(kk))


@jax.jit
def _change_bounds(W, y, eps, kk):
    f = W @ y
    r = eps * _top_sum(jnp.abs(W), kk)
    return f - r, f + r


def certified_radius(k: Kernel, X: Array, y: Array, ridge: float, x_test: Array, *,
                     time: Optional[float] = None) -> jax.Array:
    """The largest number of label flips that cannot change the prediction, ``(m,)`` ints
    in ``[0, n]`` (module docstring; reaching a tie counts as a change, ``f = 0`` gives 0).

    ``y`` +-1 floats ``(n,)``: the sign of ``f(x_test)``; ``y`` targets ``(n, C)``
    (one-hot, centred one-hot, +-1 one-vs-rest): the argmax class, through the
    per-class margins of :func:`class_margin_bounds`.
    """
    return _prediction_and_radius(k, X, y, ridge, x_test, time)[1]


def _prediction_and_radius(k, X, y, ridge, x_test, time):
    """``(sign f or argmax class, radius)`` per test point, from one pass of weights."""
    if np.ndim(y) == 2:
        k, X, Y, ridge, time, scale, cls = _check_multiclass(k, X, y, ridge, time)
        x_test = _check_test(k, X, x_test)
        C = Y.shape[1]
        return _over_blocks(k, X, ridge, time, x_test, X.shape[0] * C, _multi_radius,
                            Y, cls, scale)
    k, X, y, ridge, time = _check_binary(k, X, y, ridge, time)
    x_test = _check_test(k, X, x_test)
    return _over_blocks(k, X, ridge, time, x_test, X.shape[0], _binary_radius, y)


@jax.jit
def _binary_radius(W, y):
    f = W @ y
    g = jnp.maximum(2.0 * jnp.sign(f)[:, None] * W * y, 0.0)
    return jnp.sign(f), _radius(jnp.abs(f), g)


def _radius(margin, g):
    """The largest k with ``margin - topk(g) > 0`` (0 when margin <= 0); g (..., n)."""
    cum = jnp.cumsum(-jnp.sort(-g, axis=-1), axis=-1)          # top-1, top-2, ... sums
    count = jnp.sum(margin[..., None] - cum > 0, axis=-1)
    return jnp.where(margin > 0, count, 0)


def certified_accuracy(k: Kernel, X: Array, y: Array, ridge: float, x_test: Array,
                       y_test: Array, k_values: Sequence[int], *,
                       time: Optional[float] = None) -> np.ndarray:
    """The fraction of test points predicted correctly AND certified at each k:
    ``mean(correct & (radius >= k))`` for k in ``k_values``, ``(len(k_values),)``.

    ``y_test``: +-1 labels ``(m,)`` for +-1 ``y``; integer classes ``(m,)`` for targets
    ``y (n, C)``. At k = 0 it is the clean accuracy (a point with f = 0 is wrong).
    """
    ks = np.atleast_1d(np.asarray(k_values))
    if ks.ndim != 1 or ks.size == 0:
        raise ValueError("`k_values` must be a non-empty 1-D sequence of flip counts.")
    _validate.nonneg("k_values", ks, integer=True)
    pred, radius = (np.asarray(a) for a in _prediction_and_radius(k, X, y, ridge, x_test,
                                                                  time))
    _validate.array("y_test", y_test, ndim=1)
    yt = np.asarray(y_test)
    if yt.shape[0] != radius.shape[0]:
        raise ValueError(f"`y_test` has {yt.shape[0]} labels for {radius.shape[0]} test "
                         "points; pass one label per row of x_test.")
    if np.ndim(y) == 2:
        if not np.all(np.equal(np.mod(yt, 1), 0)):
            raise ValueError("`y_test` must hold integer class labels for targets y (n, C).")
    elif not np.all(np.isin(yt, (-1.0, 1.0))):
        raise ValueError("`y_test` must be +-1 labels for +-1 training labels y.")
    correct = pred == yt
    return np.array([np.mean(correct & (radius >= kv)) for kv in ks.astype(np.int64)])


# --------------------------------------------------------------------------- multi-class

def class_margin_bounds(k: Kernel, X: Array, Y: Array, ridge: float, x_test: Array,
                        n_flips: int, *, time: Optional[float] = None
                        ) -> Tuple[jax.Array, jax.Array]:
    """The exact worst case of each class margin under at most ``n_flips`` relabellings.

    Returns ``(pred, lo)``: ``pred (m,)`` the clean argmax class p and ``lo (m, C)``
    with ``lo[:, q] = min over <= n_flips relabellings of f_p - f_q``
    ``= (f_p - f_q) - topk_i g_iq`` (module docstring); ``lo[:, p] = +inf``. The
    prediction is certified at ``n_flips`` iff ``lo.min(1) > 0``.

    ``Y (n, C)``: rows ``s e_c + b`` with one scale s > 0 and offset b (one-hot,
    centred one-hot, +-1 one-vs-rest); a relabelling moves a row to another class's row.
    """
    k, X, Y, ridge, time, scale, cls = _check_multiclass(k, X, Y, ridge, time)
    x_test = _check_test(k, X, x_test)
    kk = min(_check_count("n_flips", n_flips), X.shape[0])
    return _over_blocks(k, X, ridge, time, x_test, X.shape[0] * Y.shape[1],
                        _margin_bounds, Y, cls, scale, jnp.asarray(kk))


def _margins_and_gains(W, Y, cls, scale):
    """pred (b,), margins f_p - f_q (b, C), gains g (b, C, n) (module docstring)."""
    F = W @ Y
    C = Y.shape[1]
    p = jnp.argmax(F, axis=1)
    M = jnp.take_along_axis(F, p[:, None], axis=1) - F
    onehot = jax.nn.one_hot(cls, C, dtype=W.dtype)                       # (n, C)
    u = onehot[None] - jnp.take(onehot, p, axis=1).T[:, :, None]         # (b, n, C)
    g = scale * (jnp.abs(W)[:, :, None] - W[:, :, None] * u)
    return p, M, jnp.swapaxes(g, 1, 2)


@jax.jit
def _margin_bounds(W, Y, cls, scale, kk):
    p, M, g = _margins_and_gains(W, Y, cls, scale)
    lo = M - _top_sum(g, kk)
    is_p = jax.nn.one_hot(p, Y.shape[1], dtype=bool)
    return p, jnp.where(is_p, jnp.inf, lo)


@jax.jit
def _multi_radius(W, Y, cls, scale):
    p, M, g = _margins_and_gains(W, Y, cls, scale)
    r = _radius(M, g)                                                    # (b, C)
    is_p = jax.nn.one_hot(p, Y.shape[1], dtype=bool)
    return p, jnp.min(jnp.where(is_p, W.shape[1], r), axis=1)


# --------------------------------------------------------------------------- clones

@dataclasses.dataclass(frozen=True)
class CloneWorstCase:
    """The clone attack's exact effect over a finite candidate set (a lower bound on
    the attacker's power over all poison locations).

    Attributes:
      effects: ``(Q, P)`` the target effect of candidate q at test point p: scalar
        targets ``y_t f_poisoned(x_p)``; vector targets the target-class margin
        ``f_t - max_{c != t} f_c`` of the poisoned model (t = argmax y_target).
      worst_effect: ``(P,)`` the max over candidates (the attacker's best per point).
      worst_candidate: ``(P,)`` its index.
      f_clean: the clean prediction at x_test, ``(P,)`` or ``(P, C)``, at the same
        absolute ridge ``(N + m) lam`` as the poisoned fits.
      f_poisoned: ``(Q, P)`` or ``(Q, P, C)``.
    """

    effects: np.ndarray
    worst_effect: np.ndarray
    worst_candidate: np.ndarray
    f_clean: np.ndarray
    f_poisoned: np.ndarray


def clone_worst_case(k: Kernel, X: Array, y: Array, ridge: float, x_test: Array,
                     candidates: Array, m: Any, y_target: Any) -> Any:
    """The exact worst case of adding ``m`` clones of ``(zeta, y_target)``, over every
    ``zeta`` in ``candidates`` ``(Q, *s)``, at every test point ``x_test (P, *s)``.

    Each candidate's poisoned prediction is the exact KRR refit on X plus the m clones
    at absolute ridge ``(N + m) ridge`` (the project's convention), computed by the
    rank-one clone law (block elimination of the clone block,
    :class:`ntk_poison.attacks.optimal.CloneSolver`: one ``eigh`` O(N^3), then O(N^2)
    per candidate, vmapped; the law of :func:`ntk_poison.theory.clone_law`). The
    maximum over a FINITE candidate set is a LOWER BOUND on the attacker's power: a
    location outside the set may do better.

    ``y`` is ``(N,)`` (``y_target`` a scalar) or ``(N, C)`` (``y_target`` a ``(C,)``
    row); ``m`` an int >= 1, or a sequence of them: then a list of results, one per
    budget, sharing one factorisation of the clean Gram; ``ridge > 0``.
    """
    from ntk_poison.attacks import optimal
    many = isinstance(m, (list, tuple)) or (isinstance(m, np.ndarray) and m.ndim > 0)
    ms = [_check_count("m", v) for v in (m if many else [m])]
    if not ms or min(ms) < 1:
        raise ValueError("`m` must be >= 1 clones (or a non-empty sequence of such "
                         "counts); m = 0 adds no poison.")
    solver = optimal.prepare(k, X, y, ridge)
    out = [_worst_case(solver, x_test, candidates, v, y_target) for v in ms]
    return out if many else out[0]


def _worst_case(solver, x_test, candidates, m, y_target) -> CloneWorstCase:
    k, Xc = solver.kernel, solver.X
    cands = krr.as_inputs(k, "candidates", candidates)
    _validate.same_trailing("candidates", cands, "X (training inputs)", Xc, k.input_rank)
    xt = _check_test(k, Xc, x_test)
    _validate.array("y_target", y_target)
    if np.shape(y_target) != tuple(solver.y.shape[1:]):
        raise ValueError(f"`y_target` has shape {np.shape(y_target)}; for targets `y` of "
                         f"shape {tuple(solver.y.shape)} pass a scalar (y (N,)) or the "
                         "poison's target row (y (N, C)).")
    fp, fc = _clone_outputs(solver, cands.astype(Xc.dtype), jnp.asarray(m, Xc.dtype),
                            jnp.asarray(y_target, Xc.dtype), xt)
    fp, fc = np.asarray(fp), np.asarray(fc)
    if fp.ndim == 3:
        t = int(np.argmax(np.asarray(y_target)))
        effects = fp[..., t] - np.delete(fp, t, axis=2).max(axis=2)
    else:
        effects = float(y_target) * fp
    return CloneWorstCase(effects=effects, worst_effect=effects.max(axis=0),
                          worst_candidate=np.argmax(effects, axis=0), f_clean=fc,
                          f_poisoned=fp)


@jax.jit
def _clone_outputs(solver, cands, m, y_target, xt):
    """The poisoned outputs ``(Q, P[, C])`` (vmap over candidates of the rank-one
    update, O(N^2) each) and the clean ones at the same absolute ridge."""
    fp = jax.vmap(lambda z: solver.outputs(z, m, y_target, xt))(cands)
    fc = solver.kernel.fn(xt, solver.X) @ solver.solve(m, solver.y)
    return fp, fc


# --------------------------------------------------------------------------- joint (MILP)

@dataclasses.dataclass(frozen=True)
class JointCertificate:
    """The MILP's answer: the most test points one flip set can turn.

    Attributes:
      max_flipped: test points whose sign the flip set ``flip_set`` changes, counted
        exactly from the weights (a tie, f = 0, counts as changed).
      milp_objective: the solver's optimum (equal to ``max_flipped`` unless a margin
        sits within the solver's feasibility tolerance, ~1e-7, of zero).
      flip_set: ``(<= n_flips,)`` indices of the training labels flipped.
      flipped: ``(P,)`` bool, which test points change sign under ``flip_set``.
    """

    max_flipped: int
    milp_objective: float
    flip_set: np.ndarray
    flipped: np.ndarray


def joint_flip_certificate(k: Kernel, X: Array, y: Array, ridge: float, x_test: Array,
                           n_flips: int, *, time: Optional[float] = None,
                           max_variables: int = MILP_MAX_VARIABLES) -> int:
    """The largest number of test points whose predicted sign ONE set of at most
    ``n_flips`` label flips changes simultaneously (:func:`joint_flip_solution`'s
    ``max_flipped``). Small problems only: ``n + m <= max_variables``."""
    return joint_flip_solution(k, X, y, ridge, x_test, n_flips, time=time,
                               max_variables=max_variables).max_flipped


def joint_flip_solution(k: Kernel, X: Array, y: Array, ridge: float, x_test: Array,
                        n_flips: int, *, time: Optional[float] = None,
                        max_variables: int = MILP_MAX_VARIABLES) -> JointCertificate:
    """The joint flip certificate as a MILP (``scipy.optimize.milp``, HiGHS)::

        maximise   sum_j w_j       over z in {0,1}^n (flips), w in {0,1}^m (turned)
        subject to sum_i z_i <= n_flips
                   s_j f_j - sum_i 2 s_j a_ji y_i z_i <= M_j (1 - w_j)   for each j

    ``s_j = sign f_j``; ``M_j = s_j f_j + sum_i max(0, -2 s_j a_ji y_i)`` bounds the
    left side, so ``w_j = 1`` forces ``s_j f_j(z) <= 0`` and ``w_j = 0`` is free.
    Exact up to the solver's tolerances; the returned flip set is re-checked exactly.
    Raises ValueError when ``n + m > max_variables`` (binary variables).
    """
    from scipy import optimize
    k, X, y, ridge, time = _check_binary(k, X, y, ridge, time)
    x_test = _check_test(k, X, x_test)
    kk = _check_count("n_flips", n_flips)
    max_variables = _validate.positive_int("max_variables", max_variables)
    n, P = X.shape[0], x_test.shape[0]
    if n + P > max_variables:
        raise ValueError(
            f"The joint MILP has n + m = {n} + {P} = {n + P} binary variables, over "
            f"max_variables={max_variables}: it is exponential in the worst case. Use "
            "fewer training or test points, raise `max_variables` knowingly, or use the "
            "pointwise certified_radius.")
    W = np.asarray(kernel_weights(k, X, ridge, x_test, time=time), np.float64)
    yn = np.asarray(y, np.float64)
    f = W @ yn
    s = np.sign(f)
    D = 2.0 * s[:, None] * W * yn[None]                         # s_j f_j drops by D z
    big = s * f + np.maximum(-D, 0.0).sum(1)
    big = big * (1.0 + 1e-9) + 1e-12
    A = np.zeros((1 + P, n + P))
    A[0, :n] = 1.0
    A[1:, :n] = -D
    A[1:, n:] = np.diag(big)
    ub = np.r_[kk, big - s * f]
    cons = optimize.LinearConstraint(A, -np.inf, ub)
    c = np.r_[np.zeros(n), -np.ones(P)]
    res = optimize.milp(c, constraints=cons, integrality=np.ones(n + P),
                        bounds=optimize.Bounds(0, 1))
    if res.x is None:
        raise ValueError(f"The MILP solver failed: {res.message}")
    z = np.round(res.x[:n]).astype(bool)
    flipped = s * f - D[:, z].sum(1) <= 0
    return JointCertificate(max_flipped=int(flipped.sum()), milp_objective=float(-res.fun),
                            flip_set=np.flatnonzero(z), flipped=flipped)


# --------------------------------------------------------------------------- checks

def _check_model(k, X, ridge, time):
    k = krr.check_kernel(k)
    X = krr.as_inputs(k, "X", X)
    if X.shape[0] == 0:
        raise ValueError("`X` is empty; pass at least one training point.")
    _validate.nonneg("ridge", ridge)
    return k, X, float(ridge), _check_time(time)


def _check_time(time):
    if time is None:
        return None
    return _validate.scalar("time", time, " (the kernel-flow time; None for KRR)")


def _check_test(k, X, x_test):
    x = krr.as_inputs(k, "x_test", x_test)
    _validate.same_trailing("x_test", x, "X (training inputs)", X, k.input_rank)
    if x.shape[0] == 0:
        raise ValueError("`x_test` is empty; pass at least one test point.")
    return x.astype(X.dtype)


def _check_count(name, value) -> int:
    if not (_validate.is_int_scalar(value) or (
            isinstance(value, (np.integer, np.ndarray)) and np.ndim(value) == 0
            and np.issubdtype(np.asarray(value).dtype, np.integer))):
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
    _validate.nonneg(name, value, integer=True)
    return int(value)


def _check_binary(k, X, y, ridge, time):
    k, X, y = krr.check_training(k, X, y, ridge)
    if y.ndim != 1 or not bool(jnp.all(jnp.abs(y) == 1)):
        raise ValueError("`y` must be +-1 float labels of shape (n,) for the flip "
                         "certificates (e.g. np.where(labels == pos, 1.0, -1.0)); for "
                         "(n, C) targets use class_margin_bounds.")
    return k, X, y, float(ridge), _check_time(time)


def _check_multiclass(k, X, Y, ridge, time):
    k, X, Y = krr.check_training(k, X, Y, ridge)
    if Y.ndim != 2 or Y.shape[1] < 2:
        raise ValueError(f"`y` must be class targets of shape (n, C), C >= 2, got "
                         f"{tuple(Y.shape)}.")
    Yn = np.asarray(Y, np.float64)
    hi, lo = Yn.max(1), Yn.min(1)
    cls = np.argmax(Yn, axis=1)
    scale, offset = hi[0] - lo[0], lo[0]
    expect = scale * np.eye(Y.shape[1])[cls] + offset
    if scale <= 0 or not np.allclose(Yn, expect, rtol=0, atol=1e-12 * max(1.0, scale)):
        raise ValueError("`y` rows must all be s * one_hot(class) + b with one s > 0 and "
                         "b (one-hot, centred one-hot e_c - 1/C, or +-1 one-vs-rest).")
    return (k, X, Y, float(ridge), _check_time(time), jnp.asarray(scale, X.dtype),
            jnp.asarray(cls))
