"""The model protocol: one ``as_function``, and everything else written once over it.

Every fitted model of the project (``krr.KRRModel``, ``penalized.PenalizedModel``,
``penalized.PenalizedPath``, ``nets.NetModel``, a :func:`stack` of separately fitted
models) is a :class:`Model`. A model supplies

* ``as_function()``: its prediction as a pure function of ONE input (no batch axis),
  ``x (*input_shape) -> ()`` for a scalar output or ``(r,)`` for a vector output,
  built from jax ops (so ``jax.grad``, ``jax.hessian``, ``jax.jvp`` and ``jax.vmap``
  apply); ideally a :class:`Function`, a callable pytree whose arrays are leaves, so
  that jit-compiled code is shared across models of the same shapes;

and inherits, written once here over that function (THEORY.md section 1)::

    predict(x)         f(x)                  (m,) | (m, r)
    input_grad(x)      grad_x f(x)           (m, *s)            scalar outputs
    input_jacobian(x)  d f / d x             (m, r, *s) | (m, *s)
    input_hessian(x)   hess_x f(x)           (m, d, d)          scalar outputs, d = prod(s)

A *path* (``leading_axes = 1``: a trajectory over training time, or a sweep over
kappa) has T members; its function returns ``(T,)`` or ``(T, r)``, and every result
above gains a leading member axis: ``predict -> (T, m)``, ``input_grad -> (T, m, *s)``.

**One batch convention.** ``batch_size=None`` (the default everywhere) evaluates as
many inputs at once as fit in half the memory budget
(``_validate.memory_budget_bytes``; about ``n + d`` floats per input and output
entry for a model on n training points); an int bounds the inputs per compiled call.
Rows are independent, so the chunking never changes a result.

**Validation once.** The public methods check the query batch (shape against the
model's inputs, a float dtype cast to the model's); the jit-compiled bodies do not.

Adding a model: subclass :class:`Model` as a frozen dataclass registered as a pytree
(``jax.tree_util.register_dataclass``), give it its fields and ``as_function``. It may
also override ``batch_function`` (a faster batched prediction, e.g. one GEMM) and
``input_shape``/``dtype`` (for input checks). ``tests/test_models.py`` walks every
model class through the same checks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate

Array = Any

__all__ = ["Model", "Function", "Vmapped", "Stacked", "stack", "as_model_function",
           "check_model"]


class Function:
    """Base of callable pytrees ``f(one input)``: a model's function with its arrays as
    leaves and its static configuration (kernel, apply function) in the treedef."""

    def __call__(self, x):  # pragma: no cover - abstract
        raise NotImplementedError


@functools.partial(jax.tree_util.register_dataclass, data_fields=["fn"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Vmapped(Function):
    """``x (m, *s) -> (f(x_1), ..., f(x_m))``: the default batched prediction."""

    fn: Any

    def __call__(self, x):
        return jax.vmap(self.fn)(x)


def as_model_function(model: Any, name: str = "model") -> Callable:
    """The function of a model of the protocol, or a plain callable of one input.

    A model whose ``as_function()`` is not a :class:`Function` pytree is wrapped so
    that its arrays still travel as jit arguments.
    """
    if hasattr(model, "as_function"):
        f = model.as_function()
        return f if isinstance(f, Function) else _ModelCall(model)
    if callable(model):
        return model
    raise ValueError(
        f"`{name}` must be a callable f(x) -> scalar of one input, or a model with "
        f".as_function() (e.g. a fitted krr.KRRModel); got {type(model).__name__}.")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["model"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _ModelCall(Function):
    model: Any

    def __call__(self, x):
        return self.model.as_function()(x)


# --------------------------------------------------------------------------- compiled bodies
# Each takes the model's function pytree (arrays dynamic, the rest static, split by
# equinox) and a validated batch; a path's member axis is moved to the front.

def _lead(out, leading: int):
    return jnp.moveaxis(out, 0, leading) if leading else out


@eqx.filter_jit
def _predict(batch_fn, x, leading):
    del leading                     # batch functions return their own layout
    return batch_fn(x)


@eqx.filter_jit
def _input_grad(fn, x, leading):
    g = jax.grad(fn) if not leading else jax.jacrev(fn)
    return _lead(jax.vmap(g)(x), leading)


@eqx.filter_jit
def _input_jacobian(fn, x, leading):
    return _lead(jax.vmap(jax.jacrev(fn))(x), leading)


@eqx.filter_jit
def _input_hessian(fn, x, leading):
    shape = x.shape[1:]
    flat = jax.vmap(jax.hessian(lambda v: fn(v.reshape(shape))))
    return _lead(flat(x.reshape(x.shape[0], int(np.prod(shape)))), leading)


# --------------------------------------------------------------------------- the protocol

class Model:
    """Mixin of the model protocol (see the module docstring).

    Subclasses define ``as_function``; they may override ``batch_function``,
    ``input_shape``, ``dtype``, ``size_hint`` and ``check_inputs``.
    """

    #: 1 for a path: outputs carry a leading member axis
    leading_axes: int = 0

    # ----------------------------------------------------------------- to override

    def as_function(self) -> Callable:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must define as_function().")

    def batch_function(self) -> Callable:
        """``x (m, *s) -> f(x)`` in the output layout (a path: ``(T, m, ...)``)."""
        return Vmapped(self.as_function())

    @property
    def input_shape(self) -> Optional[Tuple[int, ...]]:
        """One input's shape, or None if the model does not know it."""
        X = getattr(self, "X", None)
        return None if X is None else tuple(X.shape[1:])

    @property
    def dtype(self):
        """The dtype queries are cast to."""
        leaves = [a for a in jax.tree_util.tree_leaves(self) if hasattr(a, "dtype")
                  and jnp.issubdtype(a.dtype, jnp.floating)]
        return jnp.result_type(*leaves) if leaves else jnp.result_type(float)

    @property
    def size_hint(self) -> int:
        """About how many floats one evaluation touches per input (for batch sizes)."""
        X = getattr(self, "X", None)
        return 1 if X is None else int(X.shape[0])

    def check_inputs(self, x: Array) -> jax.Array:
        """Validate a query batch ``(m, *input_shape)``; return it in ``self.dtype``."""
        x = _validate.float_array("x", x)
        shape = self.input_shape
        if x.ndim < 2:
            raise ValueError(f"`x` must be a batch (m, *input_shape), got shape "
                             f"{tuple(x.shape)}; add a leading axis for one input "
                             "(x[None]).")
        if shape is not None and tuple(x.shape[1:]) != shape:
            raise ValueError(f"`x` has inputs of shape {tuple(x.shape[1:])} but the model "
                             f"was trained on inputs of shape {shape}; they must live in "
                             "the same input space.")
        x = x.astype(self.dtype)
        if shape is None:
            check_model(self, x[0])
        return x

    # ----------------------------------------------------------------- written once

    @property
    def scalar_output(self) -> bool:
        """True if each member's output at one input is a scalar."""
        shape = self._out_shape()
        return len(shape) == self.leading_axes

    def _out_shape(self) -> Tuple[int, ...]:
        shape = self.input_shape
        if shape is None:
            raise ValueError(f"{type(self).__name__} does not know its input shape; "
                             "override scalar_output.")
        out = jax.eval_shape(self.as_function(), jax.ShapeDtypeStruct(shape, self.dtype))
        return tuple(out.shape)

    def _chunks(self, body, fn, x: jax.Array, batch_size: Optional[int], per_input: int):
        """``body(fn, x_chunk)`` over chunks of at most ``batch_size`` inputs."""
        if batch_size is None:
            budget = _validate.memory_budget_bytes() // 2
            batch_size = max(1, budget // max(1, per_input * x.dtype.itemsize))
        else:
            _validate.positive_int("batch_size", batch_size)
        m = x.shape[0]
        if m <= batch_size:
            return body(fn, x, self.leading_axes)
        parts = [body(fn, x[i:i + batch_size], self.leading_axes)
                 for i in range(0, m, batch_size)]
        return jnp.concatenate(parts, axis=self.leading_axes)

    def _d(self, x) -> int:
        return int(np.prod(x.shape[1:]))

    def _members(self) -> int:
        return 1 if not self.leading_axes else len(self)

    def predict(self, x: Array, *, batch_size: Optional[int] = None) -> jax.Array:
        """``f(x)``: ``(m,)`` for scalar outputs, ``(m, r)`` otherwise (a path: ``(T, ...)``)."""
        x = self.check_inputs(x)
        per = 4 * self._members() * (self.size_hint + self._d(x))
        return self._chunks(_predict, self.batch_function(), x, batch_size, per)

    def input_grad(self, x: Array, *, batch_size: Optional[int] = None) -> jax.Array:
        """``grad_x f(x)`` for scalar outputs, ``(m, *input_shape)`` (a path: ``(T, m, *s)``).

        For vector outputs use :meth:`input_jacobian`.
        """
        if not self.scalar_output:
            raise ValueError("input_grad is for scalar outputs (`y` of shape (n,)); this "
                             "model has vector outputs: use input_jacobian.")
        x = self.check_inputs(x)
        per = 8 * self._members() * (self.size_hint + self._d(x))
        return self._chunks(_input_grad, self.as_function(), x, batch_size, per)

    def input_jacobian(self, x: Array, *, batch_size: Optional[int] = None) -> jax.Array:
        """``d f / d x``: ``(m, r, *s)`` (``(m, *s)`` for scalar outputs; a path: ``(T, ...)``)."""
        x = self.check_inputs(x)
        out = jax.eval_shape(self.as_function(), jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
        r = int(np.prod(out.shape))
        per = 8 * r * (self.size_hint + self._d(x))
        return self._chunks(_input_jacobian, self.as_function(), x, batch_size, per)

    def input_hessian(self, x: Array, *, batch_size: Optional[int] = None) -> jax.Array:
        """``hess_x f(x)`` for scalar outputs, ``(m, d, d)`` with d the flat input size
        (a path: ``(T, m, d, d)``).

        ``batch_size=None`` bounds the forward-over-reverse intermediates (about
        ``4 d (n + d)`` floats per input) by the memory budget.
        """
        if not self.scalar_output:
            raise ValueError("input_hessian is for scalar outputs (`y` of shape (n,)); "
                             "for vector outputs use input_jacobian.")
        x = self.check_inputs(x)
        d = self._d(x)
        _validate.fits_in_memory(
            "input_hessian's output (m, d, d)", self._members() * x.shape[0] * d * d,
            x.dtype.itemsize, "Ask for fewer points at once, or use ntk_poison.spectra's "
            "matrix-free eigen-solver instead of the dense Hessian.")
        per = 8 * self._members() * d * (self.size_hint + d)
        return self._chunks(_input_hessian, self.as_function(), x, batch_size, per)


def check_model(model: Any, x: Array) -> None:
    """``model.as_function()`` must evaluate at one input ``x`` (abstractly, no FLOPs)."""
    try:
        jax.eval_shape(model.as_function(), jax.ShapeDtypeStruct(x.shape, x.dtype))
    except Exception as e:
        raise ValueError(
            f"The model could not be evaluated at one input of shape {tuple(x.shape)}: "
            f"{type(e).__name__}: {e}. Pass inputs of the shape it was built for.") from e


# --------------------------------------------------------------------------- stacks

@functools.partial(jax.tree_util.register_dataclass, data_fields=["fns"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _StackedFunction(Function):
    fns: Tuple[Any, ...]

    def __call__(self, x):
        return jnp.stack([f(x) for f in self.fns])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["models"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Stacked(Model):
    """Separately fitted models of one input space as a path (leading member axis).

    ``predict(x) -> (T, m)``; each member keeps its own batched prediction.
    """

    models: Tuple[Any, ...]
    leading_axes = 1

    def __len__(self) -> int:
        return len(self.models)

    def as_function(self):
        return _StackedFunction(tuple(as_model_function(m) for m in self.models))

    def batch_function(self):
        return _StackedFunction(tuple(m.batch_function() for m in self.models))

    @property
    def input_shape(self):
        return self.models[0].input_shape

    @property
    def dtype(self):
        return self.models[0].dtype

    @property
    def size_hint(self) -> int:
        return max(m.size_hint for m in self.models)

    def at(self, i: int):
        """Member i."""
        return self.models[i]


def stack(models: Sequence[Any]) -> Stacked:
    """Stack separately fitted models (of one input space) into a path."""
    models = tuple(models)
    if not models:
        raise ValueError("`models` is empty; pass at least one fitted model.")
    for i, m in enumerate(models):
        if not isinstance(m, Model):
            raise ValueError(f"`models[{i}]` is a {type(m).__name__}, not a model of the "
                             "protocol (ntk_poison.models.Model).")
    shapes = {m.input_shape for m in models}
    if len(shapes) > 1:
        raise ValueError(f"The models have different input shapes {sorted(shapes)}.")
    return Stacked(models)
