"""The training engine: one minibatch loop for every model ``apply(params, x)``.

A model is a pure function ``apply(params, x_batch) -> logits (n, C)`` or scalar
outputs ``(n,)`` with any ``params`` pytree: the nnx modules of :mod:`ntk_poison.nets`
(an nnx module is itself a pytree, ``apply = nets.apply_fn``), the ``State`` half of
``nnx.split`` with ``apply = lambda s, x: nnx.merge(graphdef, s)(x)``, stax or plain
functions. ``apply`` must be hashable (a module-level function or a fixed closure):
it is a static argument of the compiled epoch.

**The objective** of one minibatch B (after augmentation):

    J(w) = (1/|B|) sum_i L_i(w) + kappa * (1/|B|) sum_i ||grad_x P_i(x_i)||^2

with ``L_i = -log softmax(f(x_i))[y_i]`` (``loss="xent"``, integer labels, vector
outputs) or ``L_i = 1/2 ||f(x_i) - y_i||^2`` (``loss="mse"``, one-hot rows or scalar
targets), and ``P_i = L_i`` (``penalty="loss"``, the paper's loss penalty) or
``P_i = f`` (``penalty="output"``; for vector outputs the squared *Frobenius* norm
of the input Jacobian, ``sum_c ||grad_x f_c(x_i)||^2``). The penalty is computed by
double backprop: a ``jax.grad`` w.r.t. the parameters of a ``vmap``-ed input
gradient. With ``penalty="none"`` or ``kappa == 0`` the input gradient is not
computed at all (a separate code path, chosen when the step is traced).

**An epoch** is one jit-compiled ``lax.scan`` over the ``n // batch_size`` batches
of a random permutation of the n examples; the last ``n % batch_size`` examples of
the permutation are dropped (a fresh permutation each epoch, so every example is
used over the epochs); ``train(..., unroll=True)`` unrolls it (for ``lax.conv``
models on a CPU, which XLA:CPU runs far slower inside loops). Randomness is a pure function of ``(seed, epoch, step, example)`` (:func:`epoch_permutation`,
:func:`step_key`): same config and seed, bit-identical parameters, and a resumed run
replays exactly the same draws.

**Augmentation** (images ``(n, H, W, C)``): ``"crop"`` zero-pads by ``pad`` and crops
back to ``H x W`` at a uniform offset in ``[0, 2 pad]^2``; ``"crop_flip"`` also flips
left-right with probability 1/2 (not for digits). Offsets and flags come from the
pure :func:`augment_draws` so they can be reproduced outside the engine.

**Optimiser** (:func:`make_optimizer`): optax SGD, SGD with (heavy-ball or Nesterov)
momentum, or Adam. Weight decay adds ``wd * w`` to the gradient before the
optimiser (``optax.add_decayed_weights``; for SGD this is PyTorch's
``weight_decay``, i.e. L2), and for Adam after its moment scaling (AdamW,
decoupled). Schedules: constant, step (multiply by ``decay`` at each epoch in
``boundaries``) and cosine (to 0 over all the steps).

**Model state (BatchNorm).** An nnx module with variables other than ``nnx.Param``
(BatchNorm's ``nnx.BatchStat`` running averages) is split once, ``nnx.split(model,
nnx.Param, nnx.Not(nnx.Param))``: only the ``Param`` half is optimised (and weight
decayed); the rest is carried through the scan beside it. Each step merges the
two halves (``nnx.merge(..., copy=True)``) into a training-mode view
(``nnx.view(model, use_running_average=False)``: normalise with the batch's
statistics, update the running averages from the pre-update parameters), calls
``apply`` on it, and reads the new state back. :func:`train` returns the model
merged and viewed in evaluation mode (running averages), the mode the hooks see
too; the caller's model is never mutated. Split/merge with ``nnx.view`` rather
than the in-place ``model.train()`` / ``model.eval()`` keeps every function pure:
the state is an explicit input and output of the compiled epoch, not a side effect
on a Python object that jit cannot see. With batch statistics the examples of a
minibatch interact, so the penalty is defined on the batch:

    penalty = (1/|B|) sum_i || d/dx_i sum_j P_j(X_B) ||^2

(one row of the input gradient of the batch's summed ``P``; for ``penalty="output"``
with vector outputs, one such gradient per class, squared norms summed over the
classes). Where the examples do not interact this is the per-example
``||grad_x P_i(x_i)||^2`` above; it is computed from one forward pass and its VJP.
A model without such variables (a dict, stax, an nnx module of ``Param`` only)
takes exactly the stateless path.

**Data filters** (EPIC, :func:`ntk_poison.defences.epic.epic_filter`). With
``data_filter(params, epoch, keep) -> keep`` (a host callable; ``keep`` a bool (n,)
mask, all True at the start) called after each epoch's hooks, the next epochs train on
the kept rows only: the epoch's permutation is reordered with the kept rows first, in
permutation order (a stable sort), and its first ``(n_kept // batch_size) *
batch_size`` rows are used, ``n_kept // batch_size`` steps (a static count of the
compiled epoch: a new count compiles a new program). An all-True mask takes the
unfiltered path, so no filter and a filter that keeps everything give bit-identical
runs. The optimiser's schedule stays in steps of the full epoch. The history gains
``n_kept`` (the rows kept at each entry, after that epoch's filter call at its last
entry) and the checkpoint stores the mask, so a resumed run is exact.

**Checkpoints.** With ``checkpoint_dir`` a file ``checkpoint.npz`` (the leaves of
``(params, opt_state, state)`` and a JSON header: epoch, history, config hash; no
pickle; a stateless model has no state leaves; with a data filter, the keep mask) is
written atomically after every epoch, and :func:`train` resumes from it, state included.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ntk_poison import _validate, io, report

__all__ = ["TrainConfig", "make_optimizer", "objective", "augment_draws", "apply_augment",
           "epoch_permutation", "step_key", "load_checkpoint", "train", "CHECKPOINT"]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
SCHEDULES = ("constant", "step", "cosine")
LOSSES = ("xent", "mse")
AUGMENTS = ("none", "crop", "crop_flip")
PENALTIES = ("none", "loss", "output")
CHECKPOINT = "checkpoint.npz"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (frozen, hashable; :meth:`digest`).

    Fields: ``optimizer`` in OPTIMIZERS, ``lr > 0``, ``momentum`` in [0, 1),
    ``weight_decay >= 0``, ``schedule`` in SCHEDULES with ``boundaries`` (epochs)
    and ``decay`` (step), ``batch_size >= 1``, ``epochs >= 1``, ``loss`` in LOSSES,
    ``augment`` in AUGMENTS with ``pad`` (pixels; 2 for 28x28, 4 for 32x32),
    ``penalty`` in PENALTIES with ``kappa >= 0``, and ``seed``.
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    boundaries: Tuple[int, ...] = ()
    decay: float = 0.1
    batch_size: int = 128
    epochs: int = 1
    loss: str = "xent"
    augment: str = "none"
    pad: int = 2
    penalty: str = "none"
    kappa: float = 0.0
    seed: int = 0

    def __post_init__(self):
        _validate.choice("optimizer", self.optimizer, OPTIMIZERS)
        _validate.choice("schedule", self.schedule, SCHEDULES)
        _validate.choice("loss", self.loss, LOSSES)
        _validate.choice("augment", self.augment, AUGMENTS)
        _validate.choice("penalty", self.penalty, PENALTIES)
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"`lr` must be a finite learning rate > 0, got {self.lr!r}.")
        _validate.nonneg("weight_decay", self.weight_decay)
        _validate.nonneg("kappa", self.kappa)
        _validate.nonneg("decay", self.decay, positive=True)
        _validate.nonneg("momentum", self.momentum)
        if self.momentum >= 1:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum!r}.")
        _validate.positive_int("batch_size", self.batch_size)
        _validate.positive_int("epochs", self.epochs)
        if not _validate.is_int_scalar(self.pad) or self.pad < 0:
            raise ValueError(f"`pad` must be an integer >= 0 (pixels), got {self.pad!r}.")
        _validate.nonneg("seed", self.seed, integer=True)
        b = tuple(self.boundaries)
        if any(not _validate.is_int_scalar(e) or e < 1 for e in b) or list(b) != sorted(set(b)):
            raise ValueError("`boundaries` must be increasing epochs >= 1 (the step "
                             f"schedule's decay points), got {self.boundaries!r}.")
        object.__setattr__(self, "boundaries", b)

    @property
    def penalised(self) -> bool:
        """True when the input-gradient penalty is computed (decided at trace time)."""
        return self.penalty != "none" and self.kappa > 0

    def digest(self) -> str:
        """A stable hash of the config (the checkpoint's guard against a changed run)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax optimiser of ``config`` with its schedule (in steps).

    Cached: the same ``(config, steps_per_epoch)`` gives the same object, so the
    compiled epoch (the optimiser is one of its static arguments) is reused.
    """
    lr = float(config.lr)
    if config.schedule == "constant":
        sched = optax.constant_schedule(lr)
    elif config.schedule == "step":
        sched = optax.piecewise_constant_schedule(
            lr, {int(e) * steps_per_epoch: float(config.decay) for e in config.boundaries})
    else:
        sched = optax.cosine_decay_schedule(lr, decay_steps=config.epochs * steps_per_epoch)
    wd = float(config.weight_decay)
    if config.optimizer == "adam":
        return optax.adamw(sched, weight_decay=wd) if wd else optax.adam(sched)
    if config.optimizer == "sgd":
        base = optax.sgd(sched)
    else:
        base = optax.sgd(sched, momentum=float(config.momentum),
                         nesterov=config.optimizer == "nesterov")
    return optax.chain(optax.add_decayed_weights(wd), base) if wd else base


# --------------------------------------------------------------------------- the objective

def _per_example_loss(out, y, loss):
    """L_i for one example: its output ``out`` ((C,) or ()) and target ``y``."""
    if loss == "xent":
        return optax.softmax_cross_entropy_with_integer_labels(out, y)
    return 0.5 * jnp.sum((out - y) ** 2)


def _correct(out, y, loss):
    """1.0 where the batch is classified right: argmax (xent, one-hot), sign (scalar)."""
    if loss == "xent":
        return (jnp.argmax(out, -1) == y).astype(out.dtype)
    if out.ndim == 1:
        return (jnp.sign(out) == jnp.sign(y)).astype(out.dtype)
    return (jnp.argmax(out, -1) == jnp.argmax(y, -1)).astype(out.dtype)


def _terms(params, apply, x, y, loss, penalty, kappa):
    """(mean loss, mean squared input-gradient norm or 0, outputs) of a batch."""
    out = apply(params, x)
    data = jnp.mean(jax.vmap(lambda o, t: _per_example_loss(o, t, loss))(out, y))
    if penalty == "none" or kappa == 0:          # static: no input gradient traced
        return data, jnp.zeros((), out.dtype), out

    def f_one(xi):
        return apply(params, xi[None])[0]

    if penalty == "loss":
        g = jax.vmap(jax.grad(lambda xi, t: _per_example_loss(f_one(xi), t, loss)))(x, y)
    elif out.ndim == 1:
        g = jax.vmap(jax.grad(f_one))(x)
    else:                                         # (n, C, *input): the input Jacobian
        g = jax.vmap(jax.jacrev(f_one))(x)
    sq = jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
    return data, jnp.mean(sq), out


def _batch_terms(forward, x, y, loss, penalty, kappa):
    """(mean loss, mean squared input-gradient row norm or 0, outputs, new state) of a
    batch through ``forward(x_batch) -> (outputs, state)``, whose outputs may couple
    the examples (BatchNorm's batch statistics).

    The penalty rows are those of the input gradient of the batch's *summed* loss,
    ``g_i = d/dx_i sum_j P_j(X)`` (for ``penalty="output"`` with vector outputs, one
    gradient per class c of ``sum_j f_c(X)_j``, squared norms summed over c). For
    outputs that do not couple the examples ``g_i = grad_x P_i(x_i)``, the penalty of
    :func:`_terms`. One forward pass gives the outputs, the loss, the state and (its
    VJP) the input gradient.
    """
    if penalty == "none" or kappa == 0:
        out, state = forward(x)
        data = jnp.mean(jax.vmap(lambda o, t: _per_example_loss(o, t, loss))(out, y))
        return data, jnp.zeros((), out.dtype), out, state
    if penalty == "loss":
        def summed(xb):
            out, state = forward(xb)
            per = jax.vmap(lambda o, t: _per_example_loss(o, t, loss))(out, y)
            return jnp.sum(per), (jnp.mean(per), out, state)
        g, (data, out, state) = jax.grad(summed, has_aux=True)(x)
    else:
        out, vjp, state = jax.vjp(forward, x, has_aux=True)
        data = jnp.mean(jax.vmap(lambda o, t: _per_example_loss(o, t, loss))(out, y))
        if out.ndim == 1:
            g = vjp(jnp.ones_like(out))[0]
        else:                                     # (C, n, *input) -> (n, C, *input)
            cts = jnp.broadcast_to(jnp.eye(out.shape[1], dtype=out.dtype)[:, None, :],
                                   (out.shape[1],) + out.shape)
            g = jnp.moveaxis(jax.vmap(lambda ct: vjp(ct)[0])(cts), 0, 1)
    sq = jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
    return data, jnp.mean(sq), out, state


def objective(params: Any, apply: Callable, x: Any, y: Any, config: TrainConfig) -> jax.Array:
    """The penalised minibatch objective J(w) of the module docstring (no augmentation).

    For a model with state (BatchNorm) it is the training-mode objective: batch
    statistics of ``x``, and the penalty of :func:`_batch_terms`.
    """
    x, y, kappa = jnp.asarray(x), jnp.asarray(y), float(config.kappa)
    trainable, state, gdef = _split(params)
    if gdef is None:
        data, pen, _ = _terms(params, apply, x, y, config.loss, config.penalty, kappa)
    else:
        data, pen, _, _ = _batch_terms(_training_forward(apply, gdef, trainable, state),
                                       x, y, config.loss, config.penalty, kappa)
    return data + kappa * pen


# --------------------------------------------------------------------------- model state

def _mode(model, training: bool):
    """A view of an nnx model in training (batch statistics) or evaluation mode."""
    try:
        return nnx.view(model, use_running_average=not training)
    except ValueError:          # no BatchNorm in it: the state is carried, no mode to switch
        return model


def _split(params):
    """``(trainable, state, graphdef)`` of a model; ``(params, None, None)`` if stateless.

    A model has state when it is an nnx module with variables other than
    ``nnx.Param`` (BatchNorm's ``nnx.BatchStat``). Then ``trainable`` holds the
    ``nnx.Param`` leaves (the only ones optimised and weight-decayed), ``state`` the
    rest, and ``graphdef`` is the model's structure in training mode.
    """
    if not isinstance(params, nnx.Module) or not jax.tree_util.tree_leaves(
            nnx.state(params, nnx.Not(nnx.Param))):
        return params, None, None
    gdef, trainable, state = nnx.split(_mode(params, True), nnx.Param, nnx.Not(nnx.Param))
    return trainable, state, gdef


def _merge(gdef, trainable, state):
    """The model of :func:`_split`'s parts, in evaluation mode (or ``trainable`` itself)."""
    if gdef is None:
        return trainable
    return _mode(nnx.merge(gdef, trainable, state), False)


def _training_forward(apply, gdef, trainable, state):
    """``x -> (apply(model, x), the model's new state)`` with the model in training mode."""
    def forward(x):
        # copy: fresh variables in the current trace, so BatchNorm may update them here
        model = nnx.merge(gdef, trainable, state, copy=True)
        out = apply(model, x)
        return out, nnx.state(model, nnx.Not(nnx.Param))
    return forward


# --------------------------------------------------------------------------- randomness

@functools.partial(jax.jit, static_argnames=("n",))
def epoch_permutation(seed: int, epoch: int, n: int) -> jax.Array:
    """The permutation of the n examples in ``epoch`` (a pure function of its args)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 0), epoch)
    return jax.random.permutation(key, n)


@jax.jit
def step_key(seed: int, epoch: int, step: int) -> jax.Array:
    """The augmentation key of one step; example i of the batch uses ``fold_in(key, i)``."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 1), epoch)
    return jax.random.fold_in(key, step)


@functools.partial(jax.jit, static_argnames=("batch", "pad", "flip"))
def augment_draws(key: Any, batch: int, pad: int, flip: bool):
    """Per-example crop offsets ``(oy, ox)`` in ``[0, 2 pad]`` and flip flags.

    Example i draws from ``fold_in(key, i)``; ``flip=False`` gives all-False flags.
    """
    def one(i):
        k_y, k_x, k_f = jax.random.split(jax.random.fold_in(key, i), 3)
        oy = jax.random.randint(k_y, (), 0, 2 * pad + 1)
        ox = jax.random.randint(k_x, (), 0, 2 * pad + 1)
        fl = jax.random.bernoulli(k_f, 0.5) & flip
        return oy, ox, fl

    return jax.vmap(one)(jnp.arange(batch))


@functools.partial(jax.jit, static_argnames=("pad",))
def apply_augment(images: Any, oy: Any, ox: Any, flips: Any, pad: int) -> jax.Array:
    """Zero-pad ``(n, H, W, C)`` images by ``pad``, crop at ``(oy, ox)``, flip where set."""
    n, H, W, C = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, dy, dx, fl):
        crop = jax.lax.dynamic_slice(img, (dy, dx, 0), (H, W, C))
        return jnp.where(fl, crop[:, ::-1, :], crop)

    return jax.vmap(one)(padded, oy, ox, flips)


# --------------------------------------------------------------------------- the epoch

@functools.partial(jax.jit, static_argnames=("apply", "config", "optimizer", "steps", "gdef",
                                             "unroll", "count"))
def _epoch(params, opt_state, model_state, X, Y, epoch, first=0, keep=None, *, apply, config,
           optimizer, steps, gdef, unroll=1, count=None):
    """Steps ``first .. first + count - 1`` (default: all ``steps``) of ``epoch``; with a
    ``keep`` mask the kept rows come first in the permutation (stable)."""
    bs = config.batch_size
    count = steps if count is None else count
    perm = epoch_permutation(config.seed, epoch, X.shape[0])
    if keep is not None:
        perm = perm[jnp.argsort(~keep[perm], stable=True)]
    batches = perm[:steps * bs].reshape(steps, bs)
    batches = jax.lax.dynamic_slice_in_dim(batches, first, count)
    kappa = float(config.kappa)

    def J(p, ms, xb, yb):
        if gdef is None:                          # stateless (static): today's path
            data, pen, out = _terms(p, apply, xb, yb, config.loss, config.penalty, kappa)
            return data + kappa * pen, (data, out, ms)
        data, pen, out, ms = _batch_terms(_training_forward(apply, gdef, p, ms), xb, yb,
                                          config.loss, config.penalty, kappa)
        return data + kappa * pen, (data, out, ms)

    def step(carry, inp):
        params, state, ms = carry
        s, idx = inp
        xb, yb = X[idx], Y[idx]
        if config.augment != "none":
            oy, ox, fl = augment_draws(step_key(config.seed, epoch, s), bs, config.pad,
                                       config.augment == "crop_flip")
            xb = apply_augment(xb, oy, ox, fl, config.pad)
        (val, (data, out, ms)), g = jax.value_and_grad(J, has_aux=True)(params, ms, xb, yb)
        upd, state = optimizer.update(g, state, params)
        acc = jnp.mean(_correct(out, yb, config.loss))
        return (optax.apply_updates(params, upd), state, ms), (val, acc)

    (params, opt_state, model_state), (vals, accs) = jax.lax.scan(
        step, (params, opt_state, model_state), (first + jnp.arange(count), batches),
        unroll=min(unroll, count))
    return params, opt_state, model_state, vals, accs


# --------------------------------------------------------------------------- checkpoints

def _save(path: Path, params, opt_state, model_state, epoch: int, history, digest: str,
          keep: Optional[np.ndarray] = None) -> None:
    leaves = jax.tree_util.tree_leaves((params, opt_state, model_state))
    header = json.dumps({"epoch": epoch, "history": io.to_jsonable(history),
                         "config": digest, "n_leaves": len(leaves)})
    arrays = {f"leaf_{i}": np.asarray(v) for i, v in enumerate(leaves)}
    if keep is not None:
        arrays["keep"] = np.asarray(keep, bool)
    io.write_npz(path, {"header": np.array(header), **arrays})


def _load(path: Path, ref_tree):
    """The stored leaves in the structure of ``ref_tree``, and the header."""
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        leaves = [z[f"leaf_{i}"] for i in range(header["n_leaves"])]
    ref, treedef = jax.tree_util.tree_flatten(ref_tree)
    if len(ref) != len(leaves) or any(np.shape(a) != np.shape(b) for a, b in zip(ref, leaves)):
        raise ValueError(f"`checkpoint_dir` {path} holds parameters of another model "
                         "(leaf shapes differ); use a fresh directory.")
    leaves = [jnp.asarray(v, dtype=jnp.asarray(r).dtype) for v, r in zip(leaves, ref)]
    return jax.tree_util.tree_unflatten(treedef, leaves), header


def load_checkpoint(checkpoint_dir: Any, params: Any, opt_state: Any):
    """``(params, opt_state, epoch, history, config_digest)`` from a checkpoint.

    ``params`` and ``opt_state`` give the pytree structure (e.g. a fresh model and
    ``optimizer.init(params)``); the stored leaves must match their shapes. For a
    model with state (BatchNorm) ``params`` is the model, ``opt_state`` is
    ``optimizer.init(nnx.state(model, nnx.Param))`` (only parameters are optimised),
    and the returned ``params`` is the model with the stored parameters and state,
    in evaluation mode.
    """
    trainable, state, gdef = _split(params)
    (p, s, ms), header = _load(Path(checkpoint_dir) / CHECKPOINT,
                               (trainable, opt_state, state))
    return _merge(gdef, p, ms), s, int(header["epoch"]), header["history"], header["config"]


# --------------------------------------------------------------------------- train

def _check_data(apply, params, X, Y, config):
    _validate.array("X", X)
    _validate.array("Y", Y)
    if X.ndim < 2:
        raise ValueError(f"`X` must be a batch (n, *input_shape), got shape {X.shape}.")
    _validate.same_rows("X", X, "Y", Y)
    n = X.shape[0]
    if config.batch_size > n:
        raise ValueError(f"`batch_size` = {config.batch_size} is larger than the data "
                         f"(n = {n}); use batch_size <= {n}.")
    if config.augment != "none" and X.ndim != 4:
        raise ValueError(f"`augment` = {config.augment!r} needs images (n, H, W, C), got "
                         f"`X` of shape {X.shape}; use augment='none'.")
    try:
        out = jax.eval_shape(apply, params, X[:1])
    except Exception as e:
        raise ValueError(f"`X` has examples of shape {X.shape[1:]} that the model does not "
                         f"accept (one forward pass failed: {type(e).__name__}: {e}); "
                         "resize the data or build the model for this shape.") from e
    if out.shape not in ((1,), (1, out.shape[-1])):
        raise ValueError(f"the model must return logits (n, C) or outputs (n,), got "
                         f"{out.shape} for one example of `X`.")
    if config.loss == "xent":
        if out.ndim != 2:
            raise ValueError("`loss` = 'xent' needs logits (n, C); this model returns "
                             "scalars (n,): use loss='mse' with +-1 targets.")
        if Y.ndim != 1 or not np.issubdtype(np.dtype(Y.dtype), np.integer):
            raise ValueError(f"`Y` must be integer labels (n,) for loss='xent', got "
                             f"{Y.dtype} of shape {Y.shape}.")
        if n and (int(np.min(Y)) < 0 or int(np.max(Y)) >= out.shape[-1]):
            raise ValueError(f"`Y` labels must lie in [0, {out.shape[-1]}), the model's "
                             "classes.")
    elif Y.shape[1:] != out.shape[1:]:
        raise ValueError(f"`Y` rows have shape {Y.shape[1:]} but the model outputs "
                         f"{out.shape[1:]}; for loss='mse' pass one-hot rows or scalars.")


def _unroll(unroll: Any, steps: int) -> int:
    """The ``unroll`` of the epoch's ``lax.scan``: an int >= 1 (``True`` = all steps)."""
    if unroll is True:
        return steps
    if _validate.is_int_scalar(unroll) and not isinstance(unroll, bool) and unroll >= 1:
        return int(min(unroll, steps))
    raise ValueError(f"`unroll` must be True or an int >= 1 (steps unrolled in the "
                     f"epoch's scan), got {unroll!r}.")


def train(params: Any, apply: Callable, X: Any, Y: Any, config: TrainConfig, *,
          hooks: Sequence[Callable[[Any, int], Dict[str, Any]]] = (),
          checkpoint_dir: Optional[Any] = None, progress: bool = True,
          desc: str = "train", unroll: Any = 1, evals_per_epoch: int = 1,
          data_filter: Optional[Callable[[Any, int, np.ndarray], Any]] = None
          ) -> Tuple[Any, Dict[str, List[Any]]]:
    """Train ``params`` of ``apply`` on ``(X, Y)`` as ``config`` says.

    Args:
      params: the parameter pytree (e.g. an nnx module, or the state of nnx.split).
        An nnx module with BatchNorm (non-``Param`` variables) trains its
        parameters and updates its running averages (module docstring).
      apply: ``apply(params, x_batch) -> (n, C)`` logits or ``(n,)`` outputs; hashable.
        For a model with state it must call the module it is given (e.g.
        ``nets.apply_fn``), so that the BatchNorm updates land on it.
      X: inputs ``(n, *input_shape)``; images ``(n, H, W, C)`` for augmentation.
      Y: integer labels ``(n,)`` (xent) or float targets ``(n, C)`` / ``(n,)`` (mse).
      config: a :class:`TrainConfig`.
      hooks: ``hook(params, epoch) -> dict`` run on the host after each epoch
        (``epoch`` counts from 1; fractional with ``evals_per_epoch > 1``); its values
        are appended to the history.
      checkpoint_dir: where ``checkpoint.npz`` is written after every epoch; a run
        resumes from it (ValueError if its config hash differs from ``config``'s, or
        its leaf shapes from ``params``'). The hash covers the config only: pass the
        same data, model and hooks. Hook values are stored as JSON
        (``io.to_jsonable``: arrays become lists, NaN becomes None).
      progress: show a progress bar with the loss and accuracy.
      evals_per_epoch: run the hooks (and record the loss and accuracy) this many times
        an epoch, after each of that many near-equal contiguous chunks of its steps
        (the same steps and numbers as one scan); the history's ``epoch`` is then
        fractional, ``e + j / evals_per_epoch``. Checkpoints stay once an epoch.
      unroll: how many steps of the epoch's ``lax.scan`` XLA unrolls (``True``: all;
        the maths does not depend on it). XLA:CPU runs ``lax.conv`` and its gradient
        inside a loop many times slower than outside one (jax-ml/jax#12868; about 20x
        measured here for a 64-channel conv step), so on a CPU pass ``unroll=True``
        for models built on ``lax.conv`` (e.g. :mod:`ntk_poison.resnet`); compile time
        grows with the unrolled steps. :class:`ntk_poison.convnets.CNN` avoids the
        problem on a CPU (im2col matmuls), so it keeps the default 1.
      data_filter: ``data_filter(params, epoch, keep) -> keep`` (bool (n,)), called after
        each epoch's hooks (``epoch`` from 1); later epochs train on the kept rows
        (module docstring). ValueError if it keeps fewer than ``batch_size`` rows, or
        fewer batches than ``evals_per_epoch``.

    Returns:
      ``(params, history)``: the final parameters (a model with state: the module
      with its trained parameters and running averages, in evaluation mode) and a
      dict of per-epoch lists:
      ``epoch``, ``loss`` (the mean penalised objective over the epoch's steps),
      ``accuracy`` (the mean training-batch accuracy), each hook's keys, and with a
      ``data_filter`` ``n_kept``.

    Raises:
      ValueError: bad config or data (the input shape is checked by abstract
        evaluation of ``apply`` on one example, ``jax.eval_shape``), or a non-finite
        loss: the message names the epoch (from 1) and the step within it (from 0)
        whose minibatch loss, evaluated before that step's update, was first NaN or
        inf; that epoch's parameters are discarded and the checkpoint of the last
        good epoch is kept.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"`config` must be a TrainConfig, got {type(config).__name__}.")
    X, Y = jnp.asarray(X), jnp.asarray(Y)
    _check_data(apply, params, X, Y, config)
    steps = X.shape[0] // config.batch_size
    unroll = _unroll(unroll, steps)
    if not _validate.is_int_scalar(evals_per_epoch) or not 1 <= evals_per_epoch <= steps:
        raise ValueError(f"`evals_per_epoch` must be an int in [1, {steps}] (the steps of an "
                         f"epoch), got {evals_per_epoch!r}.")
    cuts = np.linspace(0, steps, int(evals_per_epoch) + 1).round().astype(int)
    optimizer = make_optimizer(config, steps)
    params, model_state, gdef = _split(params)
    opt_state = optimizer.init(params)
    history: Dict[str, List[Any]] = {"epoch": [], "loss": [], "accuracy": []}
    start, path, n = 0, None, X.shape[0]
    keep = np.ones(n, bool)
    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / CHECKPOINT
        if path.exists():
            (params, opt_state, model_state), header = _load(
                path, (params, opt_state, model_state))
            start, history, digest = int(header["epoch"]), header["history"], header["config"]
            keep = _load_keep(path, n) if data_filter is not None else keep
            if digest != config.digest():
                raise ValueError(f"`checkpoint_dir` {checkpoint_dir} holds a run of another "
                                 f"config (hash {digest}, this one {config.digest()}); use "
                                 "a fresh directory or the same config.")
    bar = range(start, config.epochs)
    if progress:
        bar = report.progress(bar, desc, total=config.epochs - start)
    for e in bar:
        mask, steps_e, cuts_e = None, steps, cuts
        if not keep.all():                        # all kept: the unfiltered path, bit for bit
            mask, steps_e = jnp.asarray(keep), int(keep.sum()) // config.batch_size
            cuts_e = np.linspace(0, steps_e, int(evals_per_epoch) + 1).round().astype(int)
        for first, last in zip(cuts_e[:-1], cuts_e[1:]):
            new_p, new_s, new_ms, vals, accs = _epoch(
                params, opt_state, model_state, X, Y, e, int(first), mask, apply=apply,
                config=config, optimizer=optimizer, steps=steps_e, gdef=gdef, unroll=unroll,
                count=int(last - first))
            vals = np.asarray(vals)
            bad = np.flatnonzero(~np.isfinite(vals))
            if bad.size:
                kept = f"; the last good checkpoint (epoch {e}) is in {checkpoint_dir}" \
                    if path is not None and e > 0 else ""
                at = int(first + bad[0])
                raise ValueError(f"the loss is {vals[bad[0]]} at epoch {e + 1}, step {at} "
                                 f"(global step {e * steps_e + at}): training diverged; "
                                 f"lower `lr` (now {config.lr}){kept}.")
            params, opt_state, model_state = new_p, new_s, new_ms
            when = e + 1 if len(cuts_e) == 2 else e + float(last) / steps_e
            history["epoch"].append(when)
            history["loss"].append(float(np.mean(vals)))
            history["accuracy"].append(float(np.mean(np.asarray(accs))))
            for hook in hooks:
                for k, v in dict(hook(_merge(gdef, params, model_state), when)).items():
                    history.setdefault(k, []).append(io.to_jsonable(v))
            if data_filter is not None:
                if last == cuts_e[-1]:
                    keep = _filtered(data_filter, _merge(gdef, params, model_state), e + 1,
                                     keep, config.batch_size, int(evals_per_epoch))
                history.setdefault("n_kept", []).append(int(keep.sum()))
            if progress and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{history['loss'][-1]:.4g}",
                                acc=f"{history['accuracy'][-1]:.3f}")
        if path is not None:
            _save(path, params, opt_state, model_state, e + 1, history, config.digest(),
                  keep if data_filter is not None else None)
    return _merge(gdef, params, model_state), history


def _filtered(data_filter, params, epoch: int, keep: np.ndarray, batch_size: int,
              evals: int) -> np.ndarray:
    """The data filter's new mask, checked."""
    new = np.asarray(data_filter(params, epoch, keep.copy()))
    if new.shape != keep.shape or new.dtype != bool:
        raise ValueError(f"`data_filter` must return a bool mask of shape {keep.shape}, got "
                         f"{new.dtype} of shape {new.shape} (epoch {epoch}).")
    if int(new.sum()) // batch_size < evals:
        raise ValueError(f"`data_filter` kept {int(new.sum())} rows after epoch {epoch}: "
                         f"fewer than {evals} batch(es) of batch_size = {batch_size}; keep "
                         "more rows or lower batch_size.")
    return new


def _load_keep(path: Path, n: int) -> np.ndarray:
    """The checkpoint's keep mask (all True if it has none)."""
    with np.load(path, allow_pickle=False) as z:
        keep = np.asarray(z["keep"], bool) if "keep" in z.files else np.ones(n, bool)
    if keep.shape != (n,):
        raise ValueError(f"`checkpoint_dir` {path} holds a keep mask of {keep.shape[0]} rows, "
                         f"the data has {n}; use a fresh directory or the same data.")
    return keep
