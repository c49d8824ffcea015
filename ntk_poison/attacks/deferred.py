"""Deferred poisoning by Hessian singularization (issue 13; arXiv 2411.03752).

The attacker adds an imperceptible perturbation ``delta_i`` (``|delta_i|_inf <= eps``,
inside the data box) to training inputs and keeps their CORRECT labels. Training and
validation loss look normal, but the trained model has a large input curvature, so
natural noise or a small evasion perturbation causes large errors. For a surrogate
model f fitted on the perturbed set the attack solves

    min_delta  L(delta) - beta * F(delta),
    L = (1/n) sum_i l_i(x_i + delta_i),     F = (1/n) sum_i ||H_i||_F^2,
    H_i = hess_x l_i(x) at x = x_i + delta_i  (the INPUT Hessian of the per-point loss)

by signed-gradient projected descent (PGD): ``delta <- P(delta - a sign grad)``, P the
projection onto ``|delta|_inf <= eps`` and then onto the box (which keeps the first
bound when the clean inputs lie in the box). ``F`` is never formed: Hutchinson's
estimator (:func:`hutchinson_frobenius`) gives it from Hessian-vector products,

    ||H||_F^2 = tr(H^T H) = E_v ||H v||^2,   v Rademacher (E v v^T = I),

unbiased, exact for a diagonal H (``||H v||^2 = sum_j H_jj^2 v_j^2``) and of variance
``2 (||H^T H||_F^2 - sum_j (H^T H)_jj^2)`` per probe otherwise. A fresh key per step
makes the descent stochastic in the probes only.

* :func:`deferred_kernel`: f is the KRR fit on the perturbed inputs (exact, no
  surrogate): ``f(x) = k(x, X + delta) (K(X + delta) + n ridge I)^-1 y``, l_i =
  ``1/2 |f(x) - y_i|^2``. Autodiff flows through the Cholesky solve, so the gradient
  includes how the fit itself moves with delta.
* :func:`deferred_net`: alternate ``train.train`` of a network surrogate on
  ``(X + delta, labels)`` and ``delta_steps`` PGD steps on delta with the network
  fixed (per-point, so the rows are done in vmapped minibatches); l_i is the training
  loss of ``config.loss`` (softmax cross-entropy, or ``1/2 |f - y|^2``).

Measures: :func:`pgd_evasion` (l_inf PGD ascent on a per-example loss; ready losses
:func:`kernel_pgd_loss` and :func:`net_pgd_loss`) and :func:`robustness` (clean,
Gaussian-noise and PGD accuracy, by :func:`ntk_poison.metrics.clean_accuracy`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import optax

from ntk_poison import _validate, krr, metrics, train
from ntk_poison.kernels import Kernel

Array = Any

__all__ = ["DeferredResult", "hutchinson_frobenius", "loss_hessian_frobenius",
           "kernel_objective", "net_objective", "deferred_kernel", "deferred_net",
           "project", "pgd_evasion", "kernel_pgd_loss", "net_pgd_loss", "robustness"]


@dataclasses.dataclass(frozen=True)
class DeferredResult:
    """The outcome of a deferred-poisoning attack (immutable).

    Attributes:
      delta: the perturbation ``(n, *input_shape)``; zero outside ``rows``.
      X_poisoned: ``X + delta`` (the labels are unchanged).
      rows: the indices of the perturbed training rows, sorted.
      history: per-step lists ``objective``, ``loss``, ``frobenius`` (``L - beta F``,
        ``L`` and ``F`` at the step's delta BEFORE its update, with the step's
        probes); :func:`deferred_net` adds per-round ``surrogate_loss`` and
        ``surrogate_accuracy`` (the last epoch's training-batch means).
    """

    delta: np.ndarray
    X_poisoned: np.ndarray
    rows: np.ndarray
    history: Dict[str, List[float]]


# --------------------------------------------------------------------------- Hutchinson

@eqx.filter_jit
def _hutchinson(hvp: Callable, shape, key, num_probes: int, dtype) -> jax.Array:
    v = jax.random.rademacher(key, (num_probes,) + tuple(shape), dtype)
    Hv = jax.vmap(hvp)(v)
    return jnp.mean(jnp.sum(Hv.reshape(num_probes, -1) ** 2, axis=1))


def _hvp(fn: Callable, x: Array) -> Callable:
    """``v -> hess fn(x) v`` (forward over reverse)."""
    return lambda v: jax.jvp(jax.grad(fn), (x,), (v,))[1]


def _check_probes(num_probes):
    return _validate.positive_int("num_probes", num_probes)


def hutchinson_frobenius(hvp: Callable, shape: Sequence[int], key: Any, num_probes: int = 1,
                         *, dtype: Any = None) -> jax.Array:
    """Hutchinson's unbiased estimate of ``||H||_F^2`` from Hessian-vector products.

        ||H||_F^2 = tr(H^T H) = E_v ||H v||^2 ~= (1/P) sum_p ||H v_p||^2,

    ``v_p`` i.i.d. Rademacher of ``shape`` (one input's shape), P = ``num_probes``.
    Exact for a diagonal H; otherwise the per-probe variance is
    ``2 (||H^T H||_F^2 - sum_j (H^T H)_jj^2)``.

    Args:
      hvp: ``v -> H v``, v and the result of ``shape`` (jax-traceable, vmapped).
      shape: one input's shape, e.g. ``(d,)`` or ``(H, W, C)``.
      key: a jax PRNG key or an int seed.
      num_probes: P >= 1.
      dtype: the probes' dtype (default: the default float dtype).

    Returns a scalar.
    """
    if not callable(hvp):
        raise ValueError(f"`hvp` must be a callable v -> H v, got {type(hvp).__name__}.")
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`shape` must be one input's shape (a tuple of ints), got "
                         f"{shape!r}.") from e
    if any(s < 1 for s in shape):
        raise ValueError(f"`shape` must have positive sides, got {shape}.")
    dtype = jnp.result_type(float) if dtype is None else dtype
    return _hutchinson(hvp, shape, _validate.as_key(key), _check_probes(num_probes), dtype)


def loss_hessian_frobenius(loss_x: Callable, x: Array, key: Any, num_probes: int = 1
                           ) -> jax.Array:
    """Hutchinson's estimate of ``||hess_x loss_x(x)||_F^2`` for a scalar function of
    ONE input ``x`` (any shape); the Hessian-vector products are forward over reverse,
    ``H v = jvp(grad loss_x, (x,), (v,))``. See :func:`hutchinson_frobenius`.
    Compiled once per ``loss_x`` (a static argument: pass the same function object)."""
    if not callable(loss_x):
        raise ValueError(f"`loss_x` must be a scalar function of one input, got "
                         f"{type(loss_x).__name__}.")
    x = _validate.float_array("x", x)
    return _loss_frobenius(loss_x, x, _validate.as_key(key), _check_probes(num_probes))


@eqx.filter_jit
def _loss_frobenius(loss_x, x, key, num_probes):
    v = jax.random.rademacher(key, (num_probes,) + x.shape, x.dtype)
    return _point_frobenius(loss_x, x, v)


def _point_frobenius(loss_x, x, v):
    """Hutchinson on one point with given probes ``v (P, *s)``."""
    Hv = jax.vmap(_hvp(loss_x, x))(v)
    return jnp.mean(jnp.sum(Hv.reshape(v.shape[0], -1) ** 2, axis=1))


# --------------------------------------------------------------------------- projection

def _box_bounds(box, dtype):
    if box is None:
        return jnp.asarray(-jnp.inf, dtype), jnp.asarray(jnp.inf, dtype)
    return jnp.asarray(box[0], dtype), jnp.asarray(box[1], dtype)


def _project(delta, X, eps, lo, hi):
    delta = jnp.clip(delta, -eps, eps)
    return jnp.clip(X + delta, lo, hi) - X


def _check_box(box, X, name="X"):
    if box is None:
        return None
    try:
        lo, hi = (float(b) for b in box)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`box` must be None or a pair (lo, hi) of the data range, got "
                         f"{box!r}.") from e
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"`box` must be finite with lo < hi, got {box!r}.")
    if _validate.is_concrete(X):
        Xn = np.asarray(X)
        if Xn.size and (Xn.min() < lo or Xn.max() > hi):
            raise ValueError(f"`{name}` has values in [{Xn.min():.4g}, {Xn.max():.4g}], "
                             f"outside `box` = {(lo, hi)}; clip the data or widen the box "
                             "(box=None: no box).")
    return lo, hi


def project(delta: Array, X: Array, eps: float, box: Optional[Tuple[float, float]] = (0.0, 1.0)
            ) -> jax.Array:
    """The perturbation's projection: ``|delta|_inf <= eps``, then ``X + delta`` into
    the box: ``clip(X + clip(delta, -eps, eps), lo, hi) - X``. With X inside the box the
    second clip only shrinks ``|delta|``, so both constraints hold."""
    X = _validate.float_array("X", X)
    delta = jnp.asarray(_validate.array("delta", delta), X.dtype)
    if delta.shape != X.shape:
        raise ValueError(f"`delta` has shape {tuple(delta.shape)} but `X` has "
                         f"{tuple(X.shape)}; pass one perturbation per input.")
    eps = _check_eps(eps)
    lo, hi = _box_bounds(_check_box(box, X), X.dtype)
    return _project(delta, X, eps, lo, hi)


def _check_eps(eps, name="eps"):
    _validate.scalar(name, eps)
    _validate.nonneg(name, eps, positive=True)
    return float(eps)


def _step_size(step_size, eps, steps):
    """Default ``2.5 eps / steps`` (Madry et al. 2018)."""
    if step_size is None:
        return 2.5 * eps / steps
    _validate.scalar("step_size", step_size)
    _validate.nonneg("step_size", step_size, positive=True)
    return float(step_size)


def _pick_rows(n, fraction, seed):
    _validate.scalar("fraction", fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1] (the share of training rows "
                         f"perturbed), got {fraction!r}.")
    m = max(1, int(round(fraction * n)))
    if m == n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, m, replace=False))


def _row_mask(rows, X):
    mask = np.zeros(X.shape[0], bool)
    mask[rows] = True
    return jnp.asarray(mask.reshape((-1,) + (1,) * (X.ndim - 1)), X.dtype)


# --------------------------------------------------------------------------- kernel version

def _kernel_terms(k, X, Y, ridge, delta, probes):
    """(L, F) of the KRR fit on ``X + delta`` with probes ``(n, P, *s)``."""
    Xp = X + delta
    n = X.shape[0]
    A = k.fn(Xp, Xp) + (n * ridge) * jnp.eye(n, dtype=X.dtype)
    alpha = jsl.cho_solve(jsl.cho_factor(0.5 * (A + A.T), lower=True), Y)

    def point_loss(x, y):
        return 0.5 * jnp.sum((k.fn(x[None], Xp)[0] @ alpha - y) ** 2)

    losses = jax.vmap(point_loss)(Xp, Y)
    frob = jax.vmap(lambda x, y, v: _point_frobenius(lambda z: point_loss(z, y), x, v))(
        Xp, Y, probes)
    return jnp.mean(losses), jnp.mean(frob)


def _kernel_value(k, X, Y, ridge, beta, delta, probes):
    L, F = _kernel_terms(k, X, Y, ridge, delta, probes)
    return L - beta * F, (L, F)


@functools.partial(jax.jit, static_argnames=("k", "num_probes"))
def _kernel_value_grad(k, X, Y, ridge, beta, delta, key, num_probes):
    """``(L - beta F, L, F, grad_delta)`` with probes ``(n, P, *s)`` drawn from key: the
    one compiled program of the kernel attack (and of :func:`kernel_objective`)."""
    probes = jax.random.rademacher(key, (X.shape[0], num_probes) + X.shape[1:], X.dtype)
    (obj, (L, F)), g = jax.value_and_grad(_kernel_value, argnums=5, has_aux=True)(
        k, X, Y, ridge, beta, delta, probes)
    return obj, L, F, g


@jax.jit
def _signed_step(delta, g, mask, X, eps, lo, hi, step_size):
    """``P(delta - a sign g)`` on the masked rows (0 elsewhere)."""
    return _project(delta - step_size * jnp.sign(g) * mask, X, eps, lo, hi) * mask


def _kernel_args(k, X, y, ridge):
    return krr.check_training(k, X, y, ridge)


def _check_delta(delta, X):
    delta = jnp.asarray(_validate.array("delta", delta), X.dtype)
    if delta.shape != X.shape:
        raise ValueError(f"`delta` has shape {tuple(delta.shape)} but `X` has "
                         f"{tuple(X.shape)}; pass one perturbation per input.")
    return delta


def kernel_objective(k: Kernel, X: Array, y: Array, ridge: float, delta: Array, *,
                     beta: float, key: Any = 0, num_probes: int = 1
                     ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The kernel attack's objective at ``delta`` and its gradient:
    ``(L - beta F, L, F, grad_delta (L - beta F))``.

    ``f = k(., X + delta) (K(X + delta) + n ridge I)^-1 y`` (relative ridge, as
    :func:`ntk_poison.krr.fit`; a Cholesky solve, differentiated through);
    ``L = (1/n) sum_i 1/2 |f(x_i + delta_i) - y_i|^2``; ``F = (1/n) sum_i`` Hutchinson's
    estimate of ``||hess_x 1/2 |f(x) - y_i|^2||_F^2`` at ``x = x_i + delta_i`` with
    probes ``v = jax.random.rademacher(key, (n, P, *s))`` (row i's are ``v[i]``), so
    the value is a deterministic, differentiable function of delta for a fixed key.
    One compiled program per
    kernel, shapes and P, shared with :func:`deferred_kernel`.
    """
    k, X, Y = _kernel_args(k, X, y, ridge)
    delta = _check_delta(delta, X)
    _validate.scalar("beta", beta)
    return _kernel_value_grad(k, X, Y, jnp.asarray(ridge, X.dtype), jnp.asarray(beta, X.dtype),
                              delta, _validate.as_key(key), _check_probes(num_probes))


def _pgd_args(eps, beta, steps, step_size, num_probes):
    eps = _check_eps(eps)
    _validate.scalar("beta", beta)
    steps = _validate.positive_int("steps", steps)
    return eps, float(beta), steps, _step_size(step_size, eps, steps), _check_probes(num_probes)


def deferred_kernel(k: Kernel, X: Array, y: Array, ridge: float, *, eps: float, beta: float,
                    steps: int = 50, step_size: Optional[float] = None, num_probes: int = 4,
                    box: Optional[Tuple[float, float]] = (0.0, 1.0), seed: int = 0,
                    fraction: float = 1.0) -> DeferredResult:
    """Deferred poisoning of kernel ridge regression (exact: the model IS the KRR fit).

    Minimises :func:`kernel_objective` over delta by ``steps`` signed-gradient steps
    ``delta <- P(delta - step_size sign grad)`` (P: :func:`project`, and 0 outside the
    perturbed rows), each with fresh Hutchinson probes (key ``fold_in(seed, step)``).

    Args:
      k: a kernel; twice differentiable at ``x = x'`` for a meaningful F (rbf,
        matern52; not the ReLU ``nt_fc``, whose input Hessian is singular there).
      X: training inputs ``(n, *s)``, inside ``box``.
      y: float targets ``(n,)`` (+-1) or ``(n, C)`` (centred one-hot, as
        :func:`ntk_poison.scenario.centred_one_hot`).
      ridge: the relative ridge (absolute ``n * ridge``).
      eps: the l_inf budget (pixel units), > 0.
      beta: the weight of the curvature term, >= 0.
      steps: PGD steps. step_size: default ``2.5 eps / steps``.
      num_probes: Rademacher probes per point and step.
      box: the data range ``(lo, hi)`` or None (no box).
      seed: the probes' and the rows' seed.
      fraction: the share of rows perturbed, in (0, 1]; the rows (``result.rows``) are
        drawn without replacement from ``seed`` (all rows for 1).

    Returns a :class:`DeferredResult`.
    """
    k, X, Y = _kernel_args(k, X, y, ridge)
    _validate.nonneg("beta", beta)
    eps, beta, steps, a, P = _pgd_args(eps, beta, steps, step_size, num_probes)
    lo, hi = _box_bounds(_check_box(box, X), X.dtype)
    _validate.nonneg("seed", seed, integer=True)
    rows = _pick_rows(X.shape[0], fraction, int(seed))
    mask = _row_mask(rows, X)
    delta = jnp.zeros_like(X)
    base = jax.random.PRNGKey(int(seed))
    hist: Dict[str, List[float]] = {"objective": [], "loss": [], "frobenius": []}
    r, b = jnp.asarray(ridge, X.dtype), jnp.asarray(beta, X.dtype)
    e, a = jnp.asarray(eps, X.dtype), jnp.asarray(a, X.dtype)
    for s in range(steps):
        obj, L, F, g = _kernel_value_grad(k, X, Y, r, b, delta, jax.random.fold_in(base, s), P)
        delta = _signed_step(delta, g, mask, X, e, lo, hi, a)
        for name, v in (("objective", obj), ("loss", L), ("frobenius", F)):
            hist[name].append(float(v))
    delta = np.asarray(delta)
    return DeferredResult(delta=delta, X_poisoned=np.asarray(X) + delta, rows=rows,
                          history=hist)


# --------------------------------------------------------------------------- net version

def _net_point_loss(apply, params, x, y, loss):
    """The per-example training loss of :mod:`ntk_poison.train` at ONE input."""
    out = apply(params, x[None])[0]
    if loss == "xent":
        return optax.softmax_cross_entropy_with_integer_labels(out, y)
    return 0.5 * jnp.sum((out - y) ** 2)


def _net_sums(delta, params, X, Y, weight, probes, beta, apply, loss):
    """``sum_i w_i (l_i - beta F_i)`` and the weighted sums of l_i and F_i."""
    def one(x, y, v):
        lx = lambda z: _net_point_loss(apply, params, z, y, loss)
        return lx(x), _point_frobenius(lx, x, v)

    ls, fs = jax.vmap(one)(X + delta, Y, probes)
    Ls, Fs = jnp.sum(weight * ls), jnp.sum(weight * fs)
    return Ls - beta * Fs, (Ls, Fs)


@eqx.filter_jit
def _net_value_grad(params, Xc, Yc, Dc, Wc, key, beta, apply, loss, num_probes):
    """Over chunked rows ``(nb, bs, ...)`` (a scan; each chunk vmapped): the summed
    objective, loss and Frobenius terms and the gradient chunks. Chunk i's probes come
    from ``fold_in(key, i)``. The one compiled program of the net attack's delta step
    (and of :func:`net_objective`)."""
    grad = jax.value_and_grad(_net_sums, has_aux=True)

    def chunk(carry, inp):
        X, Y, D, W, i = inp
        probes = jax.random.rademacher(jax.random.fold_in(key, i),
                                       (X.shape[0], num_probes) + X.shape[1:], X.dtype)
        (o, (L, F)), g = grad(D, params, X, Y, W, probes, beta, apply, loss)
        return carry, (g, o, L, F)

    idx = jnp.arange(Xc.shape[0])
    _, (G, o, L, F) = jax.lax.scan(chunk, 0, (Xc, Yc, Dc, Wc, idx))
    return jnp.sum(o), jnp.sum(L), jnp.sum(F), G


def _chunked(a, nb, bs):
    pad = nb * bs - a.shape[0]
    if pad:
        a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
    return a.reshape((nb, bs) + a.shape[1:])


def _net_labels(apply, params, X, labels, loss):
    _validate.array("labels", labels)
    labels = jnp.asarray(labels)
    _validate.same_rows("X", X, "labels", labels)
    out = jax.eval_shape(apply, params, X[:1])
    if loss == "xent":
        if out.ndim != 2 or labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError("`loss` = 'xent' needs logits (n, C) and integer `labels` (n,); "
                             "for a scalar-output net (nets.MLP) use a config with "
                             "loss='mse' and +-1 float labels.")
        return labels
    if labels.shape[1:] != out.shape[1:]:
        raise ValueError(f"`labels` rows have shape {labels.shape[1:]} but the net outputs "
                         f"{out.shape[1:]}; for loss='mse' pass +-1 or one-hot floats.")
    return labels.astype(X.dtype)


def _net_batch(batch_size, n):
    return min(n, _validate.positive_int("batch_size", batch_size))


def net_objective(params: Any, apply: Callable, X: Array, labels: Array, delta: Array, *,
                  loss: str = "xent", beta: float, key: Any = 0, num_probes: int = 1,
                  batch_size: Optional[int] = None
                  ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The net attack's delta objective at fixed parameters and its gradient:
    ``(L - beta F, L, F, grad_delta (L - beta F))``.

    ``L = (1/n) sum_i l_i(x_i + delta_i)`` with l_i the per-example training loss of
    ``loss`` (:mod:`ntk_poison.train`: ``-log softmax(f)[y_i]`` or ``1/2 |f - y_i|^2``)
    of ``apply(params, x[None])[0]``, and ``F = (1/n) sum_i`` Hutchinson's estimate of
    ``||hess_x l_i||_F^2`` at ``x_i + delta_i``. Each row's terms depend on its own
    delta only, so the rows are done in vmapped chunks of ``batch_size`` (default all;
    the last chunk zero-padded and weighted 0); chunk i's probes are
    ``jax.random.rademacher(fold_in(key, i), (bs, P, *s))``. Deterministic and
    differentiable in delta for a fixed key and chunking; :func:`deferred_net` runs the same compiled program.
    """
    _validate.choice("loss", loss, train.LOSSES)
    X = _validate.float_array("X", X)
    Y = _net_labels(apply, params, X, labels, loss)
    delta = _check_delta(delta, X)
    _validate.scalar("beta", beta)
    n = X.shape[0]
    bs = _net_batch(n if batch_size is None else batch_size, n)
    nb = -(-n // bs)
    o, L, F, G = _net_value_grad(
        params, _chunked(X, nb, bs), _chunked(Y, nb, bs), _chunked(delta, nb, bs),
        _chunked(jnp.ones(n, X.dtype), nb, bs), _validate.as_key(key),
        jnp.asarray(beta, X.dtype), apply, loss, _check_probes(num_probes))
    return o / n, L / n, F / n, G.reshape((nb * bs,) + X.shape[1:])[:n] / n


def deferred_net(params: Any, apply: Callable, X: Array, labels: Array,
                 config: train.TrainConfig, *, eps: float, beta: float, rounds: int = 5,
                 surrogate_epochs: int = 2, delta_steps: int = 5, num_probes: int = 1,
                 step_size: Optional[float] = None, batch_size: Optional[int] = None,
                 box: Optional[Tuple[float, float]] = (0.0, 1.0), seed: int = 0,
                 fraction: float = 1.0) -> DeferredResult:
    """Deferred poisoning with a network surrogate (alternating).

    Each of ``rounds`` rounds: ``train.train`` the surrogate (continuing from its
    current parameters) on ``(X + delta, labels)`` for ``surrogate_epochs`` epochs of
    ``config`` (seed ``config.seed + round``), then ``delta_steps`` signed PGD steps
    on delta minimising :func:`net_objective` at the surrogate's parameters, with
    fresh probes each step (key ``fold_in(fold_in(seed, round), step)``). The rows
    go in vmapped chunks of ``batch_size`` (default ``config.batch_size``) inside one
    compiled scan; every row's gradient is exact whatever the chunking.

    Args:
      params, apply: the surrogate, as for ``train.train`` (``nets.cnn`` with integer
        labels and ``loss="xent"``; ``nets.MLP`` has one output, so ``loss="mse"`` and
        +-1 float labels).
      X: training inputs ``(n, *s)`` inside ``box``. labels: as ``train.train``'s Y.
      config: the surrogate's :class:`ntk_poison.train.TrainConfig` (its ``epochs`` is
        replaced by ``surrogate_epochs``).
      eps, beta, step_size, num_probes, box, seed, fraction: as :func:`deferred_kernel`
        (``step_size`` default ``2.5 eps / (rounds * delta_steps)``).

    Returns a :class:`DeferredResult` (evaluate it by training a fresh net on
    ``X_poisoned``: the victim does not see the surrogate).
    """
    if not isinstance(config, train.TrainConfig):
        raise ValueError(f"`config` must be a train.TrainConfig, got {type(config).__name__}.")
    X = _validate.float_array("X", X)
    if X.ndim < 2:
        raise ValueError(f"`X` must be a batch (n, *input_shape), got shape {X.shape}.")
    Y = _net_labels(apply, params, X, labels, config.loss)
    rounds = _validate.positive_int("rounds", rounds)
    surrogate_epochs = _validate.positive_int("surrogate_epochs", surrogate_epochs)
    delta_steps = _validate.positive_int("delta_steps", delta_steps)
    _validate.nonneg("beta", beta)
    eps, beta, _, a, P = _pgd_args(eps, beta, rounds * delta_steps, step_size, num_probes)
    lo, hi = _box_bounds(_check_box(box, X), X.dtype)
    _validate.nonneg("seed", seed, integer=True)
    n = X.shape[0]
    bs = _net_batch(config.batch_size if batch_size is None else batch_size, n)
    nb = -(-n // bs)
    rows = _pick_rows(n, fraction, int(seed))
    Xc, Yc = _chunked(X, nb, bs), _chunked(Y, nb, bs)
    Mc = _chunked(_row_mask(rows, X), nb, bs)
    Wc = _chunked(jnp.ones(n, X.dtype), nb, bs)
    Dc = jnp.zeros_like(Xc)
    base = jax.random.PRNGKey(int(seed))
    hist: Dict[str, List[float]] = {"objective": [], "loss": [], "frobenius": [],
                                    "surrogate_loss": [], "surrogate_accuracy": []}
    b, e, a = (jnp.asarray(v, X.dtype) for v in (beta, eps, a))
    cfg = dataclasses.replace(config, epochs=surrogate_epochs)
    for r in range(rounds):
        Xp = (Xc + Dc).reshape((nb * bs,) + X.shape[1:])[:n]
        params, th = train.train(params, apply, Xp, labels,
                                 dataclasses.replace(cfg, seed=config.seed + r),
                                 progress=False)
        hist["surrogate_loss"].append(th["loss"][-1])
        hist["surrogate_accuracy"].append(th["accuracy"][-1])
        for s in range(delta_steps):
            key = jax.random.fold_in(jax.random.fold_in(base, r), s)
            o, L, F, G = _net_value_grad(params, Xc, Yc, Dc, Wc, key, b, apply, config.loss, P)
            Dc = _signed_step(Dc, G, Mc, Xc, e, lo, hi, a)
            for name, v in (("objective", o), ("loss", L), ("frobenius", F)):
                hist[name].append(float(v) / n)
    delta = np.asarray(Dc.reshape((nb * bs,) + X.shape[1:])[:n])
    return DeferredResult(delta=delta, X_poisoned=np.asarray(X) + delta, rows=rows,
                          history=hist)


# --------------------------------------------------------------------------- evasion

@eqx.filter_jit
def _pgd_run(loss_fn, X, y, eps, step_size, lo, hi, steps):
    grad = jax.grad(lambda x: jnp.sum(loss_fn(x, y)))

    def step(x, _):
        x = x + step_size * jnp.sign(grad(x))
        return X + _project(x - X, X, eps, lo, hi), None

    x, _ = jax.lax.scan(step, X, None, length=steps)
    return x


def pgd_evasion(loss_fn: Callable, X: Array, y: Array, *, eps: float, steps: int = 10,
                step_size: Optional[float] = None,
                box: Optional[Tuple[float, float]] = (0.0, 1.0)) -> jax.Array:
    """l_inf PGD ascent (Madry et al. 2018) of a per-example loss, from ``X`` (no random
    start): ``x <- X + P(x + a sign grad_x sum_i loss_fn(x, y)_i - X)``, P the projection
    onto ``|x - X|_inf <= eps`` and the box (:func:`project`).

    Args:
      loss_fn: ``loss_fn(x_batch, y_batch) -> (m,)`` per-example losses, jax-traceable
        (:func:`kernel_pgd_loss`, :func:`net_pgd_loss`).
      X: clean inputs ``(m, *s)`` inside the box; y: what ``loss_fn`` takes as labels.
      eps: the budget (pixel units) > 0. steps: >= 1. step_size: default
        ``2.5 eps / steps``. box: ``(lo, hi)`` or None.

    Returns the adversarial inputs ``(m, *s)``.
    """
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable loss_fn(x_batch, y_batch) -> (m,), "
                         f"got {type(loss_fn).__name__}.")
    X = _validate.float_array("X", X)
    if X.ndim < 2:
        raise ValueError(f"`X` must be a batch (m, *input_shape), got shape {X.shape}.")
    y = jnp.asarray(_validate.array("y", y))
    _validate.same_rows("X", X, "y", y)
    eps = _check_eps(eps)
    steps = _validate.positive_int("steps", steps)
    a = _step_size(step_size, eps, steps)
    lo, hi = _box_bounds(_check_box(box, X), X.dtype)
    out = jax.eval_shape(loss_fn, X, y)
    if tuple(out.shape) != (X.shape[0],):
        raise ValueError(f"`loss_fn` must return one loss per example, shape "
                         f"({X.shape[0]},), got {tuple(out.shape)}.")
    return _pgd_run(loss_fn, X, y, jnp.asarray(eps, X.dtype), jnp.asarray(a, X.dtype), lo, hi,
                    steps)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["fn"],
                   meta_fields=["kind"])
@dataclasses.dataclass(frozen=True)
class _KernelLoss:
    fn: Any
    kind: str

    def __call__(self, x, y):
        f = self.fn(x)
        if f.ndim == 1:                                   # +-1 targets
            return 0.5 * (f - y) ** 2 if self.kind == "mse" else -y * f
        C = f.shape[1]
        if self.kind == "mse":
            t = jax.nn.one_hot(y, C, dtype=f.dtype) - 1.0 / C
            return 0.5 * jnp.sum((f - t) ** 2, axis=1)
        fy = jnp.take_along_axis(f, y[:, None], axis=1)[:, 0]
        other = jnp.where(jax.nn.one_hot(y, C, dtype=bool), -jnp.inf, f)
        return jnp.max(other, axis=1) - fy


def kernel_pgd_loss(model: Any, kind: str = "mse") -> Callable:
    """A per-example loss for :func:`pgd_evasion` of a kernel model (KRR, penalised).

    ``loss(x (m, *s), y) -> (m,)`` through ``model.batch_function()`` (jax). ``y``:
    class indices for C outputs, +-1 for one output. ``kind="mse"``: the training loss
    ``1/2 |f(x) - t|^2`` with t the centred one-hot row (or ``y``); ``"margin"``:
    ``max_{c != y} f_c - f_y`` (``-y f`` for one output)."""
    _validate.choice("kind", kind, ("mse", "margin"))
    if not hasattr(model, "batch_function"):
        raise ValueError(f"`model` must be a fitted model of the protocol (e.g. "
                         f"krr.KRRModel), got {type(model).__name__}.")
    return _KernelLoss(model.batch_function(), kind)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["apply"])
@dataclasses.dataclass(frozen=True)
class _NetLoss:
    params: Any
    apply: Callable

    def __call__(self, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(self.apply(self.params, x), y)


def net_pgd_loss(params: Any, apply: Callable) -> Callable:
    """A per-example loss for :func:`pgd_evasion` of a classifier net: the softmax
    cross-entropy ``-log softmax(apply(params, x))[y]`` with integer labels y."""
    if not callable(apply):
        raise ValueError(f"`apply` must be callable apply(params, x_batch), got "
                         f"{type(apply).__name__}.")
    return _NetLoss(params, apply)


# --------------------------------------------------------------------------- robustness

def robustness(predict: Callable, X: Array, y: Array, *,
               sigmas: Sequence[float] = (0.05, 0.1, 0.2),
               pgd_eps: Sequence[float] = (0.05, 0.1), loss_fn: Optional[Callable] = None,
               pgd_steps: int = 10, seed: int = 0, multiclass: bool = True,
               box: Optional[Tuple[float, float]] = (0.0, 1.0)) -> Dict[str, float]:
    """Accuracy on clean, noisy and adversarial inputs (:func:`metrics.clean_accuracy`).

    Args:
      predict: ``predict(x_batch) -> (m,)`` or ``(m, C)`` (e.g. ``model.predict``).
      X: test inputs ``(m, *s)`` inside the box. y: labels (class indices, or +-1
        with ``multiclass=False``).
      sigmas: Gaussian noise levels (pixel units): ``x + sigma N(0, I)``, clipped to
        the box, one draw from ``seed``.
      pgd_eps: l_inf budgets of :func:`pgd_evasion` (run only with ``loss_fn``).
      loss_fn: the per-example loss for PGD, with the same ``y``.

    Returns ``{"clean": a, "noise_<sigma>": a, ..., "pgd_<eps>": a, ...}`` (``%g`` keys).
    """
    if not callable(predict):
        raise ValueError(f"`predict` must be callable predict(x_batch), got "
                         f"{type(predict).__name__}.")
    X = _validate.float_array("X", X)
    _validate.array("y", y, ndim=1)
    _validate.same_rows("X", X, "y", y)
    bounds = _check_box(box, X)
    rng = np.random.default_rng(_validate.nonneg("seed", seed, integer=True))

    def acc(x):
        return float(metrics.clean_accuracy(np.asarray(predict(x)), np.asarray(y),
                                            multiclass=multiclass))

    out = {"clean": acc(X)}
    for s in sigmas:
        _validate.nonneg("sigmas", s)
        noisy = np.asarray(X) + float(s) * rng.standard_normal(X.shape)
        if bounds is not None:
            noisy = np.clip(noisy, *bounds)
        out[f"noise_{float(s):g}"] = acc(jnp.asarray(noisy, X.dtype))
    if loss_fn is not None:
        for e in pgd_eps:
            out[f"pgd_{float(e):g}"] = acc(pgd_evasion(loss_fn, X, jnp.asarray(y), eps=e,
                                                       steps=pgd_steps, box=box))
    return out
