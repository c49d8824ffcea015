"""Linear classifiers and their input curvature: the paper's linear-model experiments
(THEORY.md section 4).

**The model.** Logits ``z = W x + b`` with ``W`` of shape ``(c, d)`` and ``b`` of
shape ``(c,)`` (a :class:`Linear` pytree); the decision is ``argmax_c z_c``. Two
per-example losses of a one-hot target ``e_y`` (the training loss is their mean):

* ``"softmax"`` (multinomial logistic regression, cross-entropy):
  ``l(x, y) = logsumexp(z) - z_y``;
* ``"squares"`` (least squares on one-hot targets): ``l(x, y) = 1/2 ||z - e_y||^2``.

**The input gradient and Hessian.** With ``p = softmax(z)``::

    grad_x l = W^T r,           r = p - e_y (softmax),   r = z - e_y (squares)
    hess_x l = W^T A(x) W,      A = diag(p) - p p^T (softmax),   A = I_c (squares)

``A`` is the Hessian of the loss in the logits; ``z`` is affine in ``x``, so the
chain rule has no second-derivative term. Two consequences the experiments use:

* the input Hessian does not depend on the label ``y`` (``y`` enters the loss
  linearly in ``z`` for softmax, and only through the residual for squares): the
  true-label and the target-label conventions give the SAME curvature;
* for least squares it does not depend on ``x`` either: ``W^T W`` is one matrix, so
  its top eigenvalue is the same at triggered and clean inputs (their ratio is
  exactly 1) and the overlap is one number per model. For softmax ``A(x)`` varies
  with ``x`` and is NOT zero: a linear model has input curvature through its
  softmax. ``A`` is positive semi-definite with ``A 1 = 0``, so ``hess_x l`` is PSD
  of rank <= c - 1.

**The top eigenpair, in closed form.** Take the thin QR factorisation
``W^T = Q R`` (``Q`` of shape ``(d, c)`` with orthonormal columns, ``R`` of shape
``(c, c)``). Then ``hess_x l = Q M Q^T`` with ``M = R A(x) R^T`` (``c x c``), so the
eigenpairs of the ``d x d`` Hessian with a non-zero eigenvalue are ``(mu, Q u)`` for
the eigenpairs ``(mu, u)`` of ``M``. The QR is done once per model (``O(d c^2)``),
then each input costs a ``c x c`` ``eigh``, vmapped over the batch.
:func:`input_hessian` builds the dense ``d x d`` matrix for checks (tests compare it
with ``jax.hessian`` of :func:`example_loss` in float64).

**Training.** Gradient descent with an optax optimizer on the mean loss over a
training set, epoch by epoch: one epoch is a jit-compiled ``lax.scan`` over the
minibatches of a fresh permutation (``batch_size=None``: one full-batch step per
epoch). Minibatches have ``batch_size`` rows; the ``n mod batch_size`` rows left
over by an epoch's permutation are skipped in that epoch (different rows each
epoch). The permutation of epoch ``e`` comes from ``jax.random.fold_in(key, e)``:
same key, same numbers. To watch the model within an epoch, the scan is cut into
``evals_per_epoch`` chunks of consecutive steps (:func:`chunk_bounds`) and the model
after each chunk is kept: the trajectory's times are fractional epochs
``e + steps / steps_per_epoch`` (:func:`eval_times`); cutting the scan changes no
step, so the models at whole epochs are the same for any ``evals_per_epoch``. The
dtype is that of the parameters and the data (the experiments train in float32 at full
MNIST scale).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_poison import _validate

Array = Any

__all__ = ["Linear", "LOSSES", "init", "logits", "example_loss", "loss", "logit_hessian",
           "input_hessian", "top_eigenpair", "steps_per_epoch", "chunk_bounds", "eval_times",
           "make_epoch", "train"]

#: the per-example losses, by name
LOSSES: Tuple[str, ...] = ("softmax", "squares")


class Linear(NamedTuple):
    """A linear classifier ``z = W x + b``: ``W`` ``(c, d)``, ``b`` ``(c,)`` (a pytree;
    a trajectory of models stacks a leading epoch axis on both)."""

    W: Array
    b: Array


def _check_kind(kind: str) -> str:
    return _validate.choice("kind", kind, LOSSES)


def _check_params(params: Any) -> Linear:
    if not isinstance(params, Linear):
        raise ValueError(f"`params` must be a linear.Linear(W, b) (see linear.init), got "
                         f"{type(params).__name__}.")
    W = _validate.array("params.W", params.W, ndim=2, floating=True)
    b = _validate.array("params.b", params.b, ndim=1, floating=True)
    if b.shape[0] != W.shape[0]:
        raise ValueError(f"`params.b` has {b.shape[0]} entries but `params.W` has "
                         f"{W.shape[0]} rows (classes); they must match.")
    return params


def _check_inputs(params: Linear, x: Array, name: str = "x", ndim=(1, 2)) -> jax.Array:
    x = _validate.float_array(name, x, ndim=ndim)
    if x.shape[-1] != params.W.shape[1]:
        raise ValueError(f"`{name}` has {x.shape[-1]} features but the model takes d = "
                         f"{params.W.shape[1]}; flatten the inputs to (n, d).")
    return x


def init(d: int, c: int, seed: int = 0, scale: float = 0.0, dtype: Any = np.float32
         ) -> Linear:
    """``W = scale * N(0, 1) / sqrt(d)`` drawn by ``np.random.default_rng(seed)``,
    ``b = 0``, as ``dtype`` numpy arrays. ``scale = 0`` is the zero model (its input
    Hessian is 0)."""
    d = _validate.positive_int("d", d)
    c = _validate.positive_int("c", c)
    scale = _validate.scalar("scale", scale)
    _validate.nonneg("seed", seed, integer=True)
    W = scale * np.random.default_rng(int(seed)).standard_normal((c, d)) / np.sqrt(d)
    return Linear(W.astype(dtype), np.zeros((c,), dtype))


def logits(params: Linear, x: Array) -> jax.Array:
    """``z = x W^T + b`` for inputs ``(d,)`` or ``(n, d)``."""
    return x @ params.W.T + params.b


def _example_loss(z: jax.Array, y: jax.Array, kind: str) -> jax.Array:
    if kind == "softmax":
        return jax.nn.logsumexp(z, -1) - jnp.sum(z * y, -1)
    return 0.5 * jnp.sum((z - y) ** 2, -1)


def example_loss(params: Linear, x: Array, y: Array, kind: str) -> jax.Array:
    """The per-example loss ``l(x, y)`` (module docstring) for ``x`` ``(d,)`` or
    ``(n, d)`` and one-hot ``y`` ``(c,)`` or ``(n, c)`` (no array checks: it is
    traced by ``jax.hessian`` in the tests)."""
    _check_kind(kind)
    return _example_loss(logits(params, x), y, kind)


def _mean_loss(params: Linear, X: jax.Array, Y: jax.Array, kind: str) -> jax.Array:
    return jnp.mean(_example_loss(logits(params, X), Y, kind))


def loss(params: Linear, X: Array, Y: Array, kind: str) -> jax.Array:
    """The training loss: the mean of :func:`example_loss` over the rows of ``X``
    ``(n, d)`` with one-hot targets ``Y`` ``(n, c)``."""
    _check_kind(kind)
    params = _check_params(params)
    X = _check_inputs(params, X, "X", ndim=2)
    Y = _check_targets(params, X, Y)
    return _mean_loss(params, X, Y, kind)


def _check_targets(params: Linear, X: jax.Array, Y: Array) -> jax.Array:
    Y = _validate.float_array("Y", Y, ndim=2)
    _validate.same_rows("X", X, "Y", Y)
    if Y.shape[1] != params.W.shape[0]:
        raise ValueError(f"`Y` has {Y.shape[1]} columns but the model has c = "
                         f"{params.W.shape[0]} classes; pass one-hot targets "
                         "(ntk_poison.data.one_hot).")
    return Y


# --------------------------------------------------------------------------- curvature

def _logit_hessian(z: jax.Array, kind: str) -> jax.Array:
    if kind == "softmax":
        p = jax.nn.softmax(z)
        return jnp.diag(p) - jnp.outer(p, p)
    return jnp.eye(z.shape[-1], dtype=z.dtype)


def logit_hessian(params: Linear, x: Array, kind: str) -> jax.Array:
    """``A(x)``, the loss's Hessian in the logits: ``diag p - p p^T`` (softmax) or
    ``I_c`` (squares); ``(c, c)`` for one input, ``(n, c, c)`` for a batch."""
    _check_kind(kind)
    params = _check_params(params)
    x = _check_inputs(params, x)
    z = logits(params, x)
    f = lambda zi: _logit_hessian(zi, kind)  # noqa: E731
    return f(z) if z.ndim == 1 else jax.vmap(f)(z)


def input_hessian(params: Linear, x: Array, kind: str) -> jax.Array:
    """The dense input Hessian of the loss ``W^T A(x) W``: ``(d, d)`` for one input,
    ``(n, d, d)`` for a batch (label-free; module docstring)."""
    A = logit_hessian(params, x, kind)
    return jnp.einsum("ci,...cd,dj->...ij", params.W, A, params.W)


@jax.jit
def _factor(W: jax.Array) -> Tuple[jax.Array, jax.Array]:
    return jnp.linalg.qr(W.T)                       # Q (d, c), R (c, c)


def _top_pairs(W, b, X, kind):
    Q, R = _factor(W)

    def one(x):
        A = _logit_hessian(x @ W.T + b, kind)
        M = R @ A @ R.T
        mu, U = jnp.linalg.eigh(0.5 * (M + M.T))
        return mu[-1], Q @ U[:, -1]

    return jax.vmap(one)(X)


_top_pairs_jit = jax.jit(_top_pairs, static_argnums=3)


def top_eigenpair(params: Linear, X: Array, kind: str) -> Tuple[jax.Array, jax.Array]:
    """The top eigenvalue and a unit top eigenvector of the input Hessian of the loss
    at each row of ``X`` ``(n, d)``: ``(vals (n,), vecs (n, d))``, by the QR reduction
    of the module docstring (vmapped over the rows, jit-compiled). The eigenvector's
    sign is arbitrary; for least squares every row gets the same pair (``W^T W``)."""
    _check_kind(kind)
    params = _check_params(params)
    X = _check_inputs(params, X, "X", ndim=2)
    return _top_pairs_jit(params.W, params.b, X, kind)


# --------------------------------------------------------------------------- training

@functools.partial(jax.jit, static_argnames=("n", "batch_size"))
def _batches(key, *, n, batch_size):
    nb = n // batch_size
    return jax.random.permutation(key, n)[:nb * batch_size].reshape(nb, batch_size)


@functools.partial(jax.jit, static_argnames=("kind", "optimizer", "full"))
def _steps(params, state, batches, X, Y, *, kind, optimizer, full):
    grad = jax.value_and_grad(_mean_loss)

    def step(carry, idx):
        params, state = carry
        xb, yb = (X, Y) if full else (X[idx], Y[idx])
        val, g = grad(params, xb, yb, kind)
        upd, state = optimizer.update(g, state, params)
        return (optax.apply_updates(params, upd), state), val

    (params, state), vals = jax.lax.scan(step, (params, state), batches)
    return params, state, jnp.mean(vals)


def _check_optimizer(optimizer) -> None:
    if not (hasattr(optimizer, "update") and hasattr(optimizer, "init")):
        raise ValueError("`optimizer` must be an optax GradientTransformation, e.g. "
                         "optax.sgd(0.01).")


def steps_per_epoch(n: int, batch_size: Optional[int] = None) -> int:
    """``n // batch_size`` minibatch steps an epoch (1 for ``batch_size=None`` or
    ``>= n``: the full batch)."""
    n = _validate.positive_int("n", n)
    if batch_size is None:
        return 1
    return max(n // _validate.positive_int("batch_size", batch_size), 1)


def chunk_bounds(n_steps: int, evals_per_epoch: int = 1) -> np.ndarray:
    """Where an epoch of ``n_steps`` steps is cut to measure ``k = evals_per_epoch``
    times: the step counts ``floor(j n_steps / k)``, ``j = 0..k`` (``(k + 1,)``,
    from 0 to ``n_steps``). ``k`` that does not divide ``n_steps`` gives chunks of
    ``floor`` and ``ceil`` sizes (the times of :func:`eval_times` are then the exact
    fractions ``steps / n_steps``, not ``j / k``); ``k > n_steps`` is cut to
    ``n_steps`` (one measure a step: a full-batch epoch has one)."""
    n_steps = _validate.positive_int("n_steps", n_steps)
    k = min(_validate.positive_int("evals_per_epoch", evals_per_epoch), n_steps)
    return np.arange(k + 1) * n_steps // k


def _epoch_bounds(e: int, n_steps: int, evals_per_epoch: int, fine_epochs: Optional[int]
                  ) -> np.ndarray:
    fine = fine_epochs is None or e < fine_epochs
    return chunk_bounds(n_steps, evals_per_epoch if fine else 1)


def eval_times(epochs: int, n: int, batch_size: Optional[int] = None,
               evals_per_epoch: int = 1, fine_epochs: Optional[int] = None) -> np.ndarray:
    """The times, in (fractional) epochs, of the models :func:`train` returns: 0, then
    after each chunk of :func:`chunk_bounds` (``evals_per_epoch`` chunks an epoch in
    the first ``fine_epochs`` epochs, ``None``: all of them; one chunk an epoch after
    them), ``e + steps / steps_per_epoch``. E.g. ``epochs=2, evals_per_epoch=4,
    fine_epochs=1`` (and a step count divisible by 4): ``0, .25, .5, .75, 1, 2``."""
    epochs = _validate.positive_int("epochs", epochs)
    nb = steps_per_epoch(n, batch_size)
    _validate.positive_int("fine_epochs", fine_epochs, allow_none=True)
    t = [0.0]
    for e in range(epochs):
        t += [e + b / nb for b in _epoch_bounds(e, nb, evals_per_epoch, fine_epochs)[1:]]
    return np.asarray(t)


def make_epoch(X: Array, Y: Array, kind: str, optimizer: optax.GradientTransformation,
               batch_size: Optional[int] = None) -> Callable:
    """A jit-compiled epoch of gradient descent on the mean loss over ``(X, Y)``.

    Returns ``epoch(params, opt_state, key, bounds=None) -> (models, opt_state,
    mean_step_losses)``: a ``lax.scan`` over the ``n // batch_size`` minibatches of
    the permutation ``jax.random.permutation(key, n)`` (``batch_size=None`` or
    ``>= n``: one full-batch step), cut at the step counts ``bounds`` (ascending, from
    0 to the number of steps; ``None``: one chunk) into chunks whose end models are
    returned (a list, one per chunk, with the mean minibatch loss of each chunk).
    ``X`` ``(n, d)`` and one-hot ``Y`` ``(n, c)`` go to the device once, in their own
    dtype, and are arguments of the compiled scan (not constants): data sets of one
    shape with the same ``optimizer`` object share one compilation per chunk length.
    """
    _check_kind(kind)
    X = _validate.float_array("X", X, ndim=2)
    Y = _validate.float_array("Y", Y, ndim=2)
    _validate.same_rows("X", X, "Y", Y)
    _check_optimizer(optimizer)
    n = int(X.shape[0])
    bs = n if batch_size is None else min(_validate.positive_int("batch_size", batch_size), n)
    full = bs >= n
    steps = functools.partial(_steps, X=X, Y=Y, kind=kind, optimizer=optimizer, full=full)

    def epoch(params, state, key, bounds=None):
        batches = (jnp.zeros((1, 1), jnp.int32) if full      # unused: the full batch
                   else _batches(key, n=n, batch_size=bs))
        cuts = [0, batches.shape[0]] if bounds is None else [int(b) for b in bounds]
        models, vals = [], []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            params, state, val = steps(params, state, batches[lo:hi])
            models.append(params)
            vals.append(val)
        return models, state, vals

    return epoch


def train(params: Linear, X: Array, Y: Array, kind: str,
          optimizer: optax.GradientTransformation, epochs: int, *,
          batch_size: Optional[int] = None, key: Any = None, evals_per_epoch: int = 1,
          fine_epochs: Optional[int] = None, progress: Optional[Callable] = None
          ) -> Tuple[Linear, np.ndarray]:
    """Train for ``epochs`` epochs (:func:`make_epoch`); return the trajectory.

    Returns ``(trajectory, losses)``: a :class:`Linear` of numpy arrays whose ``W`` and
    ``b`` carry a leading axis of models at the times :func:`eval_times` gives (the
    initial model, then the model after each chunk of steps: ``evals_per_epoch``
    chunks an epoch in the first ``fine_epochs`` epochs (``None``: in all), one after;
    the defaults: one model an epoch), and the mean minibatch loss of each chunk
    (one fewer than the models). The chunks cut one scan of the epoch's steps, so the
    models at whole epochs do not depend on ``evals_per_epoch``. Epoch ``e`` (from 0)
    permutes with ``jax.random.fold_in(key, e)``. ``progress``: an optional wrapper of
    the epoch iterator (e.g. ``report.progress``-like ``f(iterable)``).
    """
    params = _check_params(params)
    X = _check_inputs(params, X, "X", ndim=2)
    Y = _check_targets(params, X, Y)
    epochs = _validate.positive_int("epochs", epochs)
    key = _validate.as_key(key)
    _check_optimizer(optimizer)
    _validate.positive_int("evals_per_epoch", evals_per_epoch)
    _validate.positive_int("fine_epochs", fine_epochs, allow_none=True)
    epoch = make_epoch(X, Y, kind, optimizer, batch_size)
    nb = steps_per_epoch(int(X.shape[0]), batch_size)
    params = Linear(jnp.asarray(params.W), jnp.asarray(params.b))
    state = optimizer.init(params)
    Ws, bs, losses = [np.asarray(params.W)], [np.asarray(params.b)], []
    it = range(epochs) if progress is None else progress(range(epochs))
    for e in it:
        models, state, vals = epoch(params, state, jax.random.fold_in(key, e),
                                    _epoch_bounds(e, nb, evals_per_epoch, fine_epochs))
        params = models[-1]
        Ws += [np.asarray(p.W) for p in models]
        bs += [np.asarray(p.b) for p in models]
        losses += [float(v) for v in vals]
    return Linear(np.stack(Ws), np.stack(bs)), np.asarray(losses)
