"""Finite-width networks: the trainable twin of ``kernels.nt_fc`` + ``krr`` / ``flow``.

A fully connected ReLU network in the NTK parameterisation (Jacot et al. 2018), with
the same architecture and the same ``depth``, ``W_std`` and ``b_std`` as
:func:`ntk_poison.kernels.nt_fc`:

    h_0 = x                                            (x flattened to (d,))
    h_l = relu( W_std / sqrt(fan_in) * h_{l-1} @ W_l + b_std * b_l ),  l = 1..depth
    f(x) = W_std / sqrt(width) * h_depth @ W_out + b_std * b_out       (a scalar)

with every W and b drawn N(0, 1) at initialisation. As ``width -> inf`` the
empirical NTK ``<d f(x)/d w, d f(x')/d w>`` at initialisation converges to the
analytic ``kernels.nt_fc(depth, W_std, b_std)`` (THEORY.md section 1) and stays
constant during training, so gradient-flow training becomes kernel regression.

**Flax nnx, not linen.** The model is an ``nnx.Module``, and in flax >= 0.11 an nnx
module *is* a pytree: its ``nnx.Param`` arrays are the leaves, its hyper-parameters
(``W_std``, ``b_std``) are static structure. So the model object doubles as the
``params`` of the functional view: :func:`apply_fn` ``(params, x) = params(x)``.
``jax.grad``, ``jax.jit``, ``optax`` and neural-tangents' ``empirical_ntk_fn`` take
it as they take any pytree; no ``init/apply`` variable dicts, no ``nnx.split`` /
``merge`` bookkeeping, and no hyper-parameter is ever a differentiable leaf. Every
function below also accepts any other ``apply_fn(params, x_batch) -> (n,)`` with
any parameter pytree (e.g. a stax network).

**Centring.** Training fits the *centred* function

    g(x) = f(x; w) - f(x; w0)          (w0: the parameters at initialisation)

which is exactly 0 at t = 0. This is the standard trick that removes the random
initial function (a draw from the NNGP prior) so that the trained net is compared
with kernel regression started from f = 0 (``krr``, ``flow.kernel_flow``,
``neural_tangents.predict.gradient_descent_mse`` with ``fx_0 = 0``). Every
prediction, input gradient and penalty here is of g. Pass ``centre=False`` to
train the raw f instead.

**The objective** (THEORY.md section 3), minimised by full-batch gradient descent
``w <- w - lr * grad J(w)`` (``optax.sgd(lr)``); it discretises the gradient flow
``dw/dt = -grad J(w)`` with time ``t = step * lr`` (the time unit of
``flow.kernel_flow``):

    J(w) = (1/2n) sum_i (g(x_i) - y_i)^2                      (data term, "loss")
         + kappa * (1/2n) sum_i ||grad_x P_i||^2                 (kappa * "penalty")
         + (ridge/2) ||w - w0||^2

with ``P_i = g`` for ``penalty="output"`` and ``P_i = L_i = 1/2 (g(x_i) - y_i)^2``
for ``penalty="loss"`` (so ``grad_x L_i = (g(x_i) - y_i) grad_x g(x_i)``). In the
linearised regime ``g(x) = phi(x).(w - w0)`` with ``phi = d f / d w`` at w0, and the
flow keeps ``w - w0`` in the span of the features, where ``||w - w0||^2 = ||g||_H^2``
(the RKHS norm of the empirical NTK); so ``ridge`` is the relative ridge of
``krr.fit`` / ``flow`` (absolute ridge ``n * ridge``). At ``kappa = ridge = 0`` the flow of g
is the NTK MSE flow ``dg(X)/dt = -(1/n) Theta (g(X) - y)``, which is what
``nt.predict.gradient_descent_mse(Theta, y, learning_rate=lr)(steps)`` computes
(its normalisation is ``y.size = n``).

The penalty is computed as written: ``jax.vmap(jax.value_and_grad(g wrt x))`` over
the training points, inside a function that ``jax.grad`` differentiates w.r.t. the
parameters (a second-order, mixed derivative). At kappa = 0 the input gradients are
skipped (one forward and one backward pass per step).

**ReLU and the penalty: a caution (measured, tests/test_nets.py).** At kappa = 0 a
wide ReLU net follows the analytic ``nt_fc`` flow with a gap falling like
width^-1/2. At kappa > 0 it does not converge to ``flow.kernel_flow(nt_fc, ...)``:
the penalty acts through ``d/dx phi(x_i)``, in which autodiff sees no ReLU kinks,
and the wide limit of ``<d/dx phi(x_i), d/dx' phi(x_j)>`` is not the mixed
derivative of the analytic ReLU NTK (about 33% apart off the diagonal blocks; on
them the analytic value is an artefact of the kernel's cusp at x = x'). The gap
stays at about half of the penalty's whole effect at every width. The net does
follow ``kernel_flow`` with its own empirical NTK (``empirical_ntk_kernel``), but
with a gap that falls only slowly with width. With ``activation="erf"`` (smooth)
the penalised net converges to the analytic-kernel flow at width^-1/2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ntk_poison import _compat
from ntk_poison import _validate, models
from ntk_poison import penalty as penalty_mod

_compat.patch()

Array = Any
ApplyFn = Callable[[Any, Array], Array]

__all__ = [
    "NTKDense", "MLP", "init", "apply_fn", "as_function", "NetModel", "NetFunction",
    "empirical_ntk", "empirical_ntk_kernel", "objective", "train", "TrainHistory",
    "augment_flip_crop", "PENALTIES", "ACTIVATIONS",
]

#: The input-gradient penalties :func:`train` knows (THEORY.md section 3).
PENALTIES = penalty_mod.PENALTIES

#: Hidden nonlinearities: ReLU (the twin of ``kernels.nt_fc``) and erf (the twin of
#: neural-tangents' ``stax.Erf()``, smooth, so input-derivative functionals of the
#: limit kernel are well defined; see :func:`init`).
ACTIVATIONS = {"relu": jax.nn.relu, "erf": jax.scipy.special.erf}


# --------------------------------------------------------------------------- model

_CHUNK = 1 << 16


@functools.partial(jax.jit, static_argnums=2)
def _normal_chunk(key, i, dtype):
    return jax.random.normal(jax.random.fold_in(key, i), (_CHUNK,), dtype)


def _standard_normals(key: Array, size: int, dtype: Any) -> np.ndarray:
    """``size`` i.i.d. N(0, 1) draws (host array), deterministic in ``key``.

    Drawn in chunks of 2^16 from ``fold_in(key, chunk index)``: one compiled kernel
    serves every network size (a per-shape ``jax.random.normal`` recompiles for
    every new width, about a second each on a CPU).
    """
    n_chunks = -(-size // _CHUNK)
    parts = [np.asarray(_normal_chunk(key, i, dtype)) for i in range(n_chunks)]
    return np.concatenate(parts)[:size]


class NTKDense(nnx.Module):
    """``w_scale * x @ W + b_scale * b``, with W ``(fan_in, fan_out)``, b ``(fan_out,)``.

    In the NTK parameterisation (neural-tangents' ``stax.Dense``) W and b are drawn
    N(0, 1) (by :class:`MLP`), ``w_scale = W_std / sqrt(fan_in)`` and ``b_scale = b_std``
    sit in the forward pass, so every parameter moves O(1/sqrt(width)) in training and
    the NTK has a finite limit. In the standard parameterisation the draws carry the
    scale and ``w_scale = b_scale = 1`` (an ordinary dense layer).
    """

    def __init__(self, W: Array, b: Array, W_std: float, b_std: float,
                 standard: bool = False):
        self.W = nnx.Param(jnp.asarray(W))
        self.b = nnx.Param(jnp.asarray(b))
        fan_in = self.W[...].shape[0]
        # static: part of the pytree structure, not leaves
        self.W_std = float(W_std)
        self.b_std = float(b_std)
        self.w_scale = 1.0 if standard else float(W_std) / math.sqrt(fan_in)
        self.b_scale = 1.0 if standard else float(b_std)

    def __call__(self, x: Array) -> Array:
        return self.w_scale * (x @ self.W[...]) + self.b_scale * self.b[...]


class MLP(nnx.Module):
    """``depth x (NTKDense(width), relu)`` then ``NTKDense(1)``: the twin of ``nt_fc``.

    ``activation="erf"`` swaps relu for erf (the twin of ``stax.Erf()``).
    ``parameterization="standard"`` makes ordinary dense layers with the scale in the
    draws: He's ``N(0, 2 W_std^2 / fan_in)`` before a relu (``N(0, W_std^2 / fan_in)``
    before erf), LeCun's ``N(0, W_std^2 / fan_in)`` at the readout, biases
    ``N(0, b_std^2)``: the same function at initialisation as the NTK-parameterised net
    with weight scale ``sqrt(2) W_std`` (relu) in the hidden layers, but other training
    dynamics (no width-independent NTK).

    Calling it on a batch ``x (n, *input_shape)`` flattens each input to ``(d,)``
    and returns the scalar outputs ``(n,)``. The module is a pytree (flax nnx), so
    it is itself the ``params`` of :func:`apply_fn`.

    The N(0, 1) draws come from :func:`_standard_normals` (fixed-size chunks, so
    the random-number kernel compiles once per dtype, not once per shape), in the
    order W_1, b_1, ..., W_out, b_out.
    """

    def __init__(self, d: int, width: int, depth: int = 2, W_std: float = 1.0,
                 b_std: float = 0.0, *, rngs: nnx.Rngs, dtype: Any = None,
                 activation: str = "relu", parameterization: str = "ntk"):
        dtype = jnp.result_type(float) if dtype is None else dtype
        self.activation = str(activation)   # static
        self.parameterization = str(parameterization)
        standard = self.parameterization == "standard"
        dims = [d] + [width] * depth + [1]
        sizes = [(dims[i], dims[i + 1]) for i in range(depth + 1)]
        total = sum(a * b + b for a, b in sizes)
        flat = _standard_normals(rngs.params(), total, dtype)
        layers, at = [], 0
        for i, (fan_in, fan_out) in enumerate(sizes):
            W = flat[at:at + fan_in * fan_out].reshape(fan_in, fan_out)
            at += fan_in * fan_out
            b = flat[at:at + fan_out]
            at += fan_out
            if standard:
                gain = math.sqrt(2.0) if i < depth and self.activation == "relu" else 1.0
                W, b = W * (gain * W_std / math.sqrt(fan_in)), b * b_std
            layers.append(NTKDense(W, b, W_std, b_std, standard))
        self.hidden = nnx.List(layers[:-1])
        self.readout = layers[-1]

    def __call__(self, x: Array) -> Array:
        h = x.reshape(x.shape[0], -1)
        phi = ACTIVATIONS[self.activation]
        for layer in self.hidden:
            h = phi(layer(h))
        return self.readout(h)[:, 0]


def _check_arch(d, width, depth, W_std, b_std, activation="relu", parameterization="ntk"):
    _validate.choice("parameterization", parameterization, ("ntk", "standard"))
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {tuple(ACTIVATIONS)}, got "
                         f"{activation!r}.")
    for nm, v in (("d", d), ("width", width), ("depth", depth)):
        if not _validate.is_int_scalar(v) or v < 1:
            raise ValueError(f"`{nm}` must be an integer >= 1, got {v!r}.")
    _validate.nonneg("W_std", W_std, positive=True)
    _validate.nonneg("b_std", b_std)


def init(key: Array, d: int, width: int, depth: int = 2, W_std: float = 1.0,
         b_std: float = 0.0, *, dtype: Any = None, activation: str = "relu",
         parameterization: str = "ntk") -> MLP:
    """Initialise the NTK-parameterised MLP; returns its parameters (an nnx pytree).

    Args:
      key: a ``jax.random`` key.
      d: the input dimension (the flattened size of one input).
      width: the hidden width (the NTK limit is ``width -> inf``).
      depth: the number of hidden ``(Dense, relu)`` layers (as ``nt_fc``'s depth).
      W_std, b_std: the weight and bias scales (as ``nt_fc``).
      dtype: the parameter dtype (default: float64 under x64, else float32).
      activation: ``"relu"`` (default; the limit kernel is ``kernels.nt_fc``) or
        ``"erf"`` (limit: ``stax.serial(depth x (Dense, stax.Erf()), Dense)``).
        Use erf to compare penalised training with kernel theory: the ReLU NTK has
        a cusp at x = x', and the input-gradient penalty of a wide ReLU net does not
        converge to the one built from the analytic kernel's derivatives (the
        kinks that autodiff does not see add up to a finite term in the limit).
      parameterization: ``"ntk"`` (default; the twin of the analytic kernels) or
        ``"standard"`` (ordinary layers, He/LeCun draws; see :class:`MLP`).

    Returns:
      An :class:`MLP`, which is the ``params`` pytree of :func:`apply_fn`.
    """
    _check_arch(d, width, depth, W_std, b_std, activation, parameterization)
    key = jnp.asarray(key)
    if not (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or
            (key.dtype == jnp.uint32 and key.shape == (2,))):
        raise ValueError(f"`key` must be a jax.random key (jax.random.key(seed) or "
                         f"PRNGKey(seed)), got dtype {key.dtype} shape {key.shape}.")
    return MLP(d, width, depth, W_std, b_std, rngs=nnx.Rngs(params=key), dtype=dtype,
               activation=activation, parameterization=parameterization)


def apply_fn(params: Any, x: Array) -> jax.Array:
    """The functional view: ``f(params, x)`` for a batch ``x (n, d)``, shape ``(n,)``.

    ``params`` is the :class:`MLP` returned by :func:`init` (any callable module
    pytree works). A plain module-level function, so it is hashable and jit caches
    compiled code across calls.
    """
    return params(x)


def _centred(apply: ApplyFn, params: Any, params0: Optional[Any]) -> ApplyFn:
    """``g(x) = apply(params, x) - apply(params0, x)`` (or f itself if params0 is None)."""
    if params0 is None:
        return lambda x: apply(params, x)
    return lambda x: apply(params, x) - apply(params0, x)


def as_function(params: Any, params0: Optional[Any] = None, *,
                apply_fn: ApplyFn = apply_fn) -> Callable[[Array], jax.Array]:
    """The network as a pure function of ONE input (no batch axis) -> scalar.

    With ``params0`` it is the centred function ``g(x) = f(x; params) - f(x; params0)``
    (what :func:`train` fits). Built from jax ops only, so ``jax.grad``,
    ``jax.hessian``, ``jax.jvp`` and ``jax.vmap`` apply; the same role as
    ``KRRModel.as_function`` (the interface of :mod:`ntk_poison.spectra`).
    """
    return NetFunction(params, params0, apply_fn)


# --------------------------------------------------------------------------- model object

@functools.partial(jax.tree_util.register_dataclass, data_fields=["params", "params0"],
                   meta_fields=["apply_fn"])
@dataclasses.dataclass(frozen=True)
class NetFunction(models.Function):
    """``g(x) = apply(params, x[None])[0] - apply(params0, x[None])[0]`` at ONE input (or
    ``f`` alone if ``params0`` is None): a callable pytree (the parameters are leaves)."""

    params: Any
    params0: Any
    apply_fn: ApplyFn

    def __call__(self, x):
        return _centred(self.apply_fn, self.params, self.params0)(x[None])[0]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params", "params0"],
                   meta_fields=["apply_fn"])
@dataclasses.dataclass(frozen=True)
class NetBatchFunction(models.Function):
    """The centred network on a batch ``x (m, *s) -> (m,)`` (one forward pass each)."""

    params: Any
    params0: Any
    apply_fn: ApplyFn

    def __call__(self, x):
        return _centred(self.apply_fn, self.params, self.params0)(x)


def _check_apply(apply: Any, params: Any, x: Array, name: str = "x") -> None:
    """Check ``apply(params, x)`` runs and returns one scalar per point, ``(n,)``."""
    if not callable(apply):
        raise ValueError(f"`apply_fn` must be callable as apply_fn(params, x_batch), got "
                         f"{type(apply).__name__}.")
    try:
        out = jax.eval_shape(apply, params, jax.ShapeDtypeStruct(x.shape, x.dtype))
    except Exception as e:
        raise ValueError(
            f"`apply_fn(params, {name})` failed on {name} of shape {tuple(x.shape)}: "
            f"{type(e).__name__}: {e}. Pass inputs of the shape the network was built "
            "for (init's `d`).") from e
    if tuple(out.shape) != (x.shape[0],):
        raise ValueError(
            f"`apply_fn(params, {name})` must return one scalar per point, shape "
            f"({x.shape[0]},), got {tuple(out.shape)}. Squeeze a (n, 1) output, e.g. "
            "lambda p, x: f(p, x)[:, 0].")


def _as_batch(name: str, x: Array, dtype: Any = None) -> jax.Array:
    x = _validate.float_array(name, x, ndim=(2, 3, 4))
    return x if dtype is None else x.astype(dtype)


def _param_dtype(params: Any):
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["params", "params0"], meta_fields=["apply_fn"])
@dataclasses.dataclass(frozen=True)
class NetModel(models.Model):
    """A trained network as a model of the protocol (immutable pytree).

    It represents ``g(x) = apply(params, x) - apply(params0, x)`` (the centred
    function :func:`train` fits), or ``f(x) = apply(params, x)`` if ``params0`` is
    None. ``predict``, ``input_grad``, ``input_jacobian`` and ``input_hessian`` come
    from :class:`ntk_poison.models.Model`, so spectra and defences run on it as on a
    kernel model. For a ReLU network the input Hessian is 0 almost everywhere (g is
    piecewise linear), so the loss Hessian is its Gauss-Newton term alone; an erf
    network has a non-zero one.

    Attributes:
      params: the trained parameters.
      params0: the parameters at initialisation (the centring), or None.
      apply_fn: ``apply_fn(params, x_batch) -> (n,)`` (static; default :func:`apply_fn`).
    """

    params: Any
    params0: Any = None
    apply_fn: ApplyFn = apply_fn

    scalar_output = True

    def as_function(self) -> NetFunction:
        """The prediction at ONE input (no batch axis) -> scalar; see :func:`as_function`."""
        return NetFunction(self.params, self.params0, self.apply_fn)

    def batch_function(self) -> NetBatchFunction:
        return NetBatchFunction(self.params, self.params0, self.apply_fn)

    @property
    def dtype(self):
        return _param_dtype(self.params)

    @property
    def input_shape(self):
        return None

    def check_inputs(self, x: Array) -> jax.Array:
        x = _as_batch("x", x, self.dtype)
        _check_apply(self.apply_fn, self.params, x)
        return x


# --------------------------------------------------------------------------- empirical NTK

@functools.lru_cache(maxsize=64)
def _ntk_fn(apply: ApplyFn):
    import neural_tangents as nt
    # trace_axes=(): the outputs are (n,) scalars, so there is no channel axis to
    # trace; the kernel is exactly (n1, n2). vmap_axes=0: examples are independent.
    return jax.jit(nt.empirical_ntk_fn(apply, trace_axes=(), vmap_axes=0))


def empirical_ntk(apply_fn: ApplyFn, params: Any, x1: Array, x2: Optional[Array] = None
                  ) -> jax.Array:
    """The empirical NTK ``Theta(x1, x2) = J(x1) J(x2)^T``, ``J = d f / d params``.

    Computed by ``neural_tangents.empirical_ntk_fn`` (its default implementation,
    Jacobian contraction) with ``trace_axes=()``. At initialisation it converges
    to ``kernels.nt_fc(depth, W_std, b_std)(x1, x2)`` as ``width -> inf``, with
    fluctuations O(width^-1/2).

    Args:
      apply_fn: ``apply_fn(params, x_batch) -> (n,)``, e.g. :func:`apply_fn`.
      params: the parameter pytree.
      x1: inputs ``(n1, d)``; x2: inputs ``(n2, d)``, or None for ``x2 = x1``.

    Returns:
      ``(n1, n2)`` in the parameters' dtype.
    """
    apply = apply_fn
    dtype = _param_dtype(params)
    x1 = _as_batch("x1", x1, dtype)
    _check_apply(apply, params, x1, "x1")
    if x2 is not None:
        x2 = _as_batch("x2", x2, dtype)
        _validate.same_trailing("x1", x1, "x2", x2, x1.ndim - 1)
    return _ntk_fn(apply)(x1, x2, params)


def empirical_ntk_kernel(apply_fn: ApplyFn, params: Any):
    """The empirical NTK at ``params`` as a :class:`ntk_poison.kernels.Kernel`.

    Lets ``krr.fit`` / ``flow.kernel_flow`` run with the finite-width kernel (the
    exact model of a linearised finite network). Vector inputs ``(n, d)`` only.
    """
    from ntk_poison import kernels

    ntk = _ntk_fn(apply_fn)

    def fn(x1, x2):
        return ntk(x1, x2, params)

    return kernels.Kernel(fn, "empirical_ntk", ())


# --------------------------------------------------------------------------- training

def _terms(params, params0, apply, X, y, f0_X, gx0_X, penalty, kappa):
    """(J without the ridge term, data term, kappa-free penalty term, ||w - w0||^2).

    The objective is :func:`ntk_poison.penalty.data_objective` of the residuals
    ``e_i = g(x_i) - y_i`` and input gradients ``grad_x g(x_i)``, the one the kernel
    fits minimise too. ``penalty=None`` skips the input gradients (penalty term 0):
    the train step at kappa = 0 then costs one forward and one backward pass, not a
    second-order one.

    ``f0_X (n,)`` and ``gx0_X (n, *s)`` are the initial outputs and input gradients
    at the training points (constants; zeros when not centring), so the centred
    g and grad_x g cost one network pass per point, not two.
    """
    n = X.shape[0]

    def f_one(x):
        return apply(params, x[None])[0]

    if penalty is None:                                   # kappa = 0: skip grad_x
        e = ((apply(params, X) - f0_X) - y)[:, None]
        g = None
        pen = jnp.zeros((), e.dtype)
    else:
        f_X, gx_X = jax.vmap(jax.value_and_grad(f_one))(X)   # grad_x through the net
        e = ((f_X - f0_X) - y)[:, None]
        g = (gx_X - gx0_X).reshape(n, -1, 1)
        pen = (0.5 / n) * penalty_mod.penalty_sum(e, g, penalty)
    J = penalty_mod.data_objective(e, g, kappa, penalty)
    data = penalty_mod.data_objective(e, None, 0.0, None)
    sq = sum(jnp.sum((a - b) ** 2) for a, b in
             zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params0)))
    return J, data, pen, sq


def _init_offsets(apply, params0, X, centre, X_eval=None):
    """The centring constants: f0(X), grad_x f0(X) and f0(X_eval) (zeros if not centre)."""
    eval0 = None
    if not centre:
        if X_eval is not None:
            eval0 = jnp.zeros(X_eval.shape[:1], X_eval.dtype)
        return jnp.zeros(X.shape[:1], X.dtype), jnp.zeros_like(X), eval0

    def f_one(x):
        return apply(params0, x[None])[0]

    if X_eval is not None:
        eval0 = apply(params0, X_eval)
    return (*jax.vmap(jax.value_and_grad(f_one))(X), eval0)


_init_offsets_jit = jax.jit(_init_offsets, static_argnums=(0, 3))


def objective(params: Any, X: Array, y: Array, *, kappa: float = 0.0,
              penalty: str = "output", ridge: float = 0.0, params0: Any = None,
              centre: bool = True, apply_fn: ApplyFn = apply_fn) -> jax.Array:
    """The training objective J(params) of :func:`train` (see the module doc).

        J = (1/2n) sum (g(x_i) - y_i)^2 + kappa (1/2n) sum ||grad_x P_i||^2
            + (ridge/2) ||params - params0||^2

    ``params0`` is the centring / ridge reference (default: ``params``, which makes
    g = 0). Differentiable in ``params``: ``jax.grad(objective)`` is the gradient
    the train step follows.
    """
    apply = apply_fn
    X, y, kappa, ridge, params0 = _check_train_args(
        apply, params, X, y, kappa, penalty, ridge, params0)
    f0_X, gx0_X, _ = _init_offsets(apply, params0, X, centre)
    J, _, _, sq = _terms(params, params0, apply, X, y, f0_X, gx0_X, penalty, kappa)
    return J + 0.5 * ridge * sq


@functools.partial(jax.jit, static_argnames=("apply", "penalty", "n_steps"))
def _run_chunk(params, params0, X, y, f0_X, gx0_X, lr, kappa, ridge, *, apply,
               penalty, n_steps):
    opt = optax.sgd(lr)

    def J(p):
        Jd, _, _, sq = _terms(p, params0, apply, X, y, f0_X, gx0_X, penalty, kappa)
        return Jd + 0.5 * ridge * sq

    def step(carry, _):
        p, state = carry
        grads = jax.grad(J)(p)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=n_steps)
    return params


@functools.partial(jax.jit, static_argnames=("apply", "penalty"))
def _record(params, params0, X, y, f0_X, gx0_X, X_eval, eval0, kappa, ridge, *,
            apply, penalty):
    Jd, data, pen, sq = _terms(params, params0, apply, X, y, f0_X, gx0_X, penalty, kappa)
    preds = None if X_eval is None else apply(params, X_eval) - eval0
    return data, pen, Jd + 0.5 * ridge * sq, preds


@dataclasses.dataclass(frozen=True)
class TrainHistory:
    """What :func:`train` recorded, at ``steps`` (R,) = 0, record_every, ..., steps.

    Attributes:
      steps: the step counts ``(R,)``.
      times: the gradient-flow times ``steps * lr`` ``(R,)`` (the unit of
        ``flow.kernel_flow``'s ``times``).
      loss: the data term ``(1/2n) sum (g(x_i) - y_i)^2`` ``(R,)``.
      penalty: the kappa-free penalty ``(1/2n) sum ||grad_x P_i||^2`` ``(R,)`` (of the
        variant ``penalty_kind``; recorded even at kappa = 0).
      objective: the full J ``(R,)``.
      predictions: ``g(X_eval)`` at each recorded step ``(R, m)``, or None.
      lr, kappa, ridge, penalty_kind, centre: the run's settings.
    """

    steps: np.ndarray
    times: np.ndarray
    loss: np.ndarray
    penalty: np.ndarray
    objective: np.ndarray
    predictions: Optional[np.ndarray]
    lr: float
    kappa: float
    ridge: float
    penalty_kind: str
    centre: bool


def _check_train_args(apply, params, X, y, kappa, penalty, ridge, params0):
    penalty_mod.check_penalty(penalty)
    _validate.nonneg("kappa", kappa)
    _validate.nonneg("ridge", ridge)
    dtype = _param_dtype(params)
    X = _as_batch("X", X, dtype)
    _validate.array("y", y, ndim=1, floating=True)
    _validate.same_rows("X", X, "y", y)
    if X.shape[0] == 0:
        raise ValueError("`X` is empty; pass at least one training point.")
    _check_apply(apply, params, X, "X")
    if params0 is None:
        params0 = params
    elif (jax.tree_util.tree_structure(params0) != jax.tree_util.tree_structure(params)
          or any(a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(params0),
                                                    jax.tree_util.tree_leaves(params)))):
        raise ValueError("`params0` must have the same structure and shapes as `params` "
                         "(it is the same network at initialisation).")
    return X, jnp.asarray(y, dtype), float(kappa), float(ridge), params0


def train(params: Any, apply_fn: ApplyFn, X: Array, y: Array, lr: float, steps: int, *,
          kappa: float = 0.0, penalty: str = "output", ridge: float = 0.0,
          record_every: Optional[int] = None, X_eval: Optional[Array] = None,
          params0: Any = None, centre: bool = True, progress: bool = False
          ) -> Tuple[Any, TrainHistory]:
    """Full-batch gradient descent on the penalised objective (THEORY.md section 3).

        w_{k+1} = w_k - lr * grad J(w_k),     t = k * lr

    with J as in the module doc (centred g, ``kappa`` penalty of kind ``penalty``,
    ``ridge`` towards ``params0``). ``optax.sgd(lr)``; the steps run in jit-compiled
    ``lax.scan`` chunks of ``record_every`` steps, with a record between chunks.

    Args:
      params: the starting parameters (e.g. :func:`init`'s output).
      apply_fn: ``apply_fn(params, x_batch) -> (n,)``, e.g. :func:`apply_fn`. It is
        a static jit argument: pass the same function object across calls (a fresh
        lambda per call recompiles every time).
      X: training inputs ``(n, d)``; y: float targets ``(n,)``.
      lr: the learning rate > 0 (the time step of the discretised flow; the flow is
        approached for ``lr * lambda_max(J'') << 1``).
      steps: the number of steps >= 0; the final time is ``steps * lr``.
      kappa: the penalty weight >= 0. penalty: ``"output"`` or ``"loss"``.
      ridge: the relative ridge >= 0, ``(ridge/2) ||w - w0||^2``.
      record_every: record every this many steps (default: only at 0 and ``steps``).
      X_eval: inputs at which to record the predictions of g, or None.
      params0: the initialisation the centring and the ridge refer to (default:
        ``params``, so g starts at 0). Pass the original init to continue a run.
      centre: fit ``g = f - f(.; params0)`` (True) or the raw f (False).
      progress: show a tqdm bar over the chunks.

    Returns:
      ``(final params, TrainHistory)``. ``NetModel(params, params0 if centre else
      None, apply_fn)`` is the trained predictor.
    """
    apply = apply_fn
    X, y, kappa, ridge, params0 = _check_train_args(apply, params, X, y, kappa, penalty,
                                                    ridge, params0)
    _validate.nonneg("lr", lr, positive=True)
    _validate.nonneg("steps", steps, integer=True)
    steps = int(steps)
    if record_every is None:
        record_every = max(steps, 1)
    _validate.nonneg("record_every", record_every, integer=True, positive=True)
    record_every = int(record_every)
    dtype = X.dtype
    if X_eval is not None:
        X_eval = _as_batch("X_eval", X_eval, dtype)
        _validate.same_trailing("X_eval", X_eval, "X", X, X.ndim - 1)
    f0_X, gx0_X, eval0 = _init_offsets_jit(apply, params0, X, bool(centre), X_eval)
    lr_a, kappa_a, ridge_a = (jnp.asarray(v, dtype) for v in (lr, kappa, ridge))

    rec = dict(steps=[], loss=[], penalty=[], objective=[], predictions=[])

    def record(p, k):
        data, pen, obj, preds = _record(p, params0, X, y, f0_X, gx0_X, X_eval, eval0,
                                        kappa_a, ridge_a, apply=apply, penalty=penalty)
        rec["steps"].append(k)
        rec["loss"].append(float(data))
        rec["penalty"].append(float(pen))
        rec["objective"].append(float(obj))
        if preds is not None:
            rec["predictions"].append(np.asarray(preds))

    record(params, 0)
    chunks = [record_every] * (steps // record_every)
    if steps % record_every:
        chunks.append(steps % record_every)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="train", unit="step")
    done = 0
    for n_steps in chunks:
        params = _run_chunk(params, params0, X, y, f0_X, gx0_X, lr_a, kappa_a, ridge_a,
                            apply=apply, penalty=penalty if kappa > 0 else None,
                            n_steps=n_steps)
        done += n_steps
        record(params, done)
        if bar is not None:
            bar.update(n_steps)
            bar.set_postfix(loss=rec["loss"][-1], penalty=rec["penalty"][-1])
    if bar is not None:
        bar.close()
    stp = np.asarray(rec["steps"])
    history = TrainHistory(
        steps=stp, times=stp * float(lr), loss=np.asarray(rec["loss"]),
        penalty=np.asarray(rec["penalty"]), objective=np.asarray(rec["objective"]),
        predictions=np.stack(rec["predictions"]) if rec["predictions"] else None,
        lr=float(lr), kappa=kappa, ridge=ridge, penalty_kind=penalty, centre=bool(centre))
    return params, history


# --------------------------------------------------------------------------- augmentation

@functools.partial(jax.jit, static_argnames=("pad",))
def _flip_crop(key, images, pad):
    from ntk_poison import train             # the engine's crop + flip at given draws
    n = images.shape[0]
    k_y, k_x, k_f = jax.random.split(key, 3)
    oy = jax.random.randint(k_y, (n,), 0, 2 * pad + 1)
    ox = jax.random.randint(k_x, (n,), 0, 2 * pad + 1)
    flip = jax.random.bernoulli(k_f, 0.5, (n,))
    return train.apply_augment(images, oy, ox, flip, pad)


def augment_flip_crop(key: Array, images: Array, pad: int = 2) -> jax.Array:
    """Random crop (zero-pad by ``pad``, crop back to H x W) + random horizontal flip.

    Each image independently gets a uniform offset in ``[0, 2 pad]^2`` and a flip
    with probability 1/2 (the standard CIFAR augmentation, THEORY.md section 4).
    Works under ``jax.jit`` with ``pad`` static.

    Args:
      key: a ``jax.random`` key. images: ``(n, H, W, C)``. pad: the padding >= 0.

    Returns:
      ``(n, H, W, C)``, same dtype.
    """
    if not _validate.is_int_scalar(pad) or pad < 0:
        raise ValueError(f"`pad` must be an integer >= 0 (pixels), got {pad!r}.")
    _validate.array("images", images, ndim=4)
    return _flip_crop(key, jnp.asarray(images), int(pad))


# --------------------------------------------------------------------------- CNN, ResNet

#: Public name of the chunked N(0, 1) sampler, for the other network modules.
standard_normals = _standard_normals

from ntk_poison.convnets import CNN, cnn  # noqa: E402  (convnets uses standard_normals)
from ntk_poison.resnet import PreActResNet, resnet  # noqa: E402,F401  (re-exported)

__all__ += ["CNN", "cnn", "standard_normals", "PreActResNet", "resnet"]
