"""A small ReLU conv net, its neural-tangents twin and its infinite-width kernel.

The architecture (the same as :func:`ntk_poison.kernels.stax_cnn`), on channels-last
images ``x (n, H, W, C)``:

    h_0 = x
    h_l = pool( relu( w_l * conv(h_{l-1}, W_l) + beta_l * b_l ) ),   l = 1..depth
          conv: filter_size x filter_size, SAME padding, stride 1, ``channels`` out;
          pool: the mean over non-overlapping pool x pool windows (none at pool = 1)
    z   = flatten(h_depth)                                     (H W channels / pool^(2 depth))
    z   = relu( w_h * z @ W_h + beta_h * b_h )                  when hidden > 0
    f(x) = w_o * z @ W_o + beta_o * b_o                         (num_outputs logits)

**Two parameterisations.**

* ``"ntk"`` (neural-tangents' stax convention, Jacot et al. 2018): every W and b is
  drawn N(0, 1) and the scales sit in the forward pass, ``w = W_std / sqrt(fan_in)``
  (``fan_in = filter_size^2 C_in`` for a conv, the input width for a dense layer) and
  ``beta = b_std``. As ``channels -> inf`` (and ``hidden -> inf`` when used) the
  empirical NTK at initialisation converges to :func:`ntk_poison.kernels.nt_cnn`
  with the same options (:meth:`CNN.kernel`), per logit: the NTK of the C logits is
  ``k(x, x') I_C``. The network equals ``stax_cnn(...)``'s ``apply_fn`` with the same
  N(0, 1) draws (:func:`stax_twin`, :func:`stax_params`).
* ``"standard"`` (ordinary layers, trains well with SGD at lr ~ 0.05-0.1): ``w = beta =
  1`` and the draws carry the scale. Layers followed by a ReLU get He's
  ``W ~ N(0, 2 W_std^2 / fan_in)`` (Kaiming He et al. 2015: it keeps the second
  moment of the activations through a ReLU), the readout gets LeCun's
  ``N(0, W_std^2 / fan_in)``; biases ``b ~ N(0, b_std^2)`` (zero at the default
  ``b_std = 0``). This is stax's ``parameterization="standard"`` with weight scale
  ``sqrt(2) W_std`` in the hidden layers and ``W_std`` in the readout, so the output
  at initialisation is a draw whose infinite-width variance is the NNGP ``k(x, x)``
  of that stax net. Its NTK has no width-independent limit, so :meth:`CNN.kernel`
  refuses it.

**A pytree.** As :class:`ntk_poison.nets.MLP`, the model is an ``nnx.Module``, hence a
pytree whose leaves are the ``nnx.Param`` arrays and whose hyper-parameters are
static; ``nets.apply_fn(model, x) = model(x)``, so ``(params=model,
apply=nets.apply_fn)`` feeds ``train.train`` and ``nets.empirical_ntk``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ntk_poison import _validate, kernels

Array = Any

__all__ = ["CNN", "cnn", "stax_twin", "stax_params", "PARAMETERIZATIONS"]

#: The parameterisations of :class:`CNN` (see the module doc).
PARAMETERIZATIONS = ("ntk", "standard")

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")      # stax.Conv's default layout


def _conv_lax(x: Array, W: Array) -> Array:
    """SAME, stride-1 convolution by ``lax.conv_general_dilated`` (NHWC, HWIO)."""
    return jax.lax.conv_general_dilated(x, W, (1, 1), "SAME",
                                        dimension_numbers=_DIMENSION_NUMBERS)


def _conv_patches(x: Array, W: Array) -> Array:
    """The same convolution as one matrix product of image patches (im2col):

        y[n, i, j, :] = sum_{a, b, c} xpad[n, i + a, j + b, c] W[a, b, c, :]

    with ``xpad`` zero-padded by ``(k-1)//2`` before and ``k-1-(k-1)//2`` after (lax's
    SAME). On the CPU, XLA runs a convolution inside a ``lax.scan`` (the training
    engine's epoch) about 20x slower than outside one; this form runs at matmul
    speed there (measured: 15 SGD steps of the default CNN, batch 128, 15.5 s -> 0.5 s).
    """
    k = W.shape[0]
    lo, hi = (k - 1) // 2, k - 1 - (k - 1) // 2
    n, H, Wd, C = x.shape
    p = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    patches = jnp.concatenate([p[:, a:a + H, b:b + Wd, :] for a in range(k)
                               for b in range(k)], axis=-1)          # (n, H, W, k^2 C)
    return patches @ W.reshape(k * k * C, W.shape[-1])


class Conv(nnx.Module):
    """``w_scale * conv(x, W) + b_scale * b``: SAME padding, stride 1, channels last.

    ``W (k, k, C_in, C_out)`` (HWIO, stax's layout), ``b (C_out,)``; the scales are
    static (``W_std / sqrt(k^2 C_in)`` and ``b_std`` in the NTK parameterisation,
    1 and 1 in the standard one). On the CPU the convolution is an im2col matrix
    product (:func:`_conv_patches`, fast inside the engine's ``lax.scan``); on an
    accelerator it is ``lax.conv_general_dilated``. Both compute the same sum.
    """

    def __init__(self, W: Array, b: Array, w_scale: float, b_scale: float):
        self.W = nnx.Param(jnp.asarray(W))
        self.b = nnx.Param(jnp.asarray(b))
        self.w_scale = float(w_scale)   # static: part of the pytree structure, not a leaf
        self.b_scale = float(b_scale)

    def __call__(self, x: Array) -> Array:
        conv = _conv_patches if jax.default_backend() == "cpu" else _conv_lax
        return self.w_scale * conv(x, self.W[...]) + self.b_scale * self.b[...]


class Dense(nnx.Module):
    """``w_scale * x @ W + b_scale * b``, W ``(fan_in, fan_out)``, b ``(fan_out,)``."""

    def __init__(self, W: Array, b: Array, w_scale: float, b_scale: float):
        self.W = nnx.Param(jnp.asarray(W))
        self.b = nnx.Param(jnp.asarray(b))
        self.w_scale = float(w_scale)
        self.b_scale = float(b_scale)

    def __call__(self, x: Array) -> Array:
        return self.w_scale * (x @ self.W[...]) + self.b_scale * self.b[...]


def _mean_pool(x: Array, p: int) -> Array:
    """The mean over non-overlapping ``p x p`` windows of ``(n, H, W, C)`` (p divides H, W)."""
    if p == 1:
        return x
    n, H, W, C = x.shape
    return x.reshape(n, H // p, p, W // p, p, C).mean(axis=(2, 4))


def _check_arch(input_shape, channels, depth, filter_size, pool, hidden, num_outputs,
                parameterization, W_std, b_std) -> Tuple[int, int, int]:
    """Validate the architecture; return ``input_shape`` as a tuple of ints."""
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(
            _validate.is_int_scalar(s) and s >= 1 for s in shape):
        raise ValueError("`input_shape` must be one image's shape (H, W, C), three "
                         f"integers >= 1, e.g. (28, 28, 1); got {input_shape!r}.")
    for nm, v in (("channels", channels), ("depth", depth), ("filter_size", filter_size),
                  ("pool", pool), ("num_outputs", num_outputs)):
        _validate.positive_int(nm, v)
    if not _validate.is_int_scalar(hidden) or hidden < 0:
        raise ValueError(f"`hidden` must be an integer >= 0 (the width of the dense layer "
                         f"before the readout; 0: none), got {hidden!r}.")
    _validate.choice("parameterization", parameterization, PARAMETERIZATIONS)
    _validate.nonneg("W_std", W_std, positive=True)
    _validate.nonneg("b_std", b_std)
    H, W = shape[0], shape[1]
    for layer in range(1, depth + 1):
        if H % pool or W % pool:
            raise ValueError(
                f"`pool` = {pool} does not divide the {H}x{W} feature map entering the "
                f"pool of conv layer {layer} (input_shape {shape}, depth {depth}); use a "
                f"pool that divides H and W {depth} times (pool^depth | H, W), a smaller "
                "`depth`, or pool=1.")
        H, W = H // pool, W // pool
    return shape


class CNN(nnx.Module):
    """``depth x [Conv, relu, AvgPool]``, Flatten, ``[Dense(hidden), relu]``, Dense.

    See the module doc for the maths and the two parameterisations.

    Args:
      input_shape: one image's shape ``(H, W, C)``; ``pool^depth`` must divide H and W.
      channels: the conv layers' width (the NTK limit is ``channels -> inf``).
      depth: the number of conv blocks. filter_size: the square filter's side.
      pool: the average-pool window and stride after each conv (1: no pooling).
      hidden: the width of a dense ReLU layer before the readout (0: none).
      num_outputs: the number of logits; 1 gives scalar outputs ``(n,)``.
      parameterization: ``"ntk"`` or ``"standard"``.
      W_std, b_std: the weight and bias scales.
      rngs: ``nnx.Rngs(params=key)``. The N(0, 1) draws come from
        ``nets.standard_normals`` (one compiled kernel for every width) in the order
        W_1, b_1, ..., W_depth, b_depth, [W_h, b_h], W_o, b_o.
      dtype: the parameter dtype (default: float64 under x64, else float32); inputs
        are cast to it.

    Raises:
      ValueError: a bad argument (named in the message).
    """

    def __init__(self, input_shape: Tuple[int, int, int] = (28, 28, 1), channels: int = 32,
                 depth: int = 2, filter_size: int = 3, pool: int = 2, hidden: int = 0,
                 num_outputs: int = 10, parameterization: str = "ntk", W_std: float = 1.0,
                 b_std: float = 0.0, *, rngs: nnx.Rngs, dtype: Any = None):
        shape = _check_arch(input_shape, channels, depth, filter_size, pool, hidden,
                            num_outputs, parameterization, W_std, b_std)
        dtype = jnp.result_type(float) if dtype is None else dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"`dtype` must be a floating dtype, got {dtype!r}.")
        # static hyper-parameters (pytree structure, not leaves)
        self.input_shape = shape
        self.channels, self.depth, self.filter_size = int(channels), int(depth), int(filter_size)
        self.pool, self.hidden, self.num_outputs = int(pool), int(hidden), int(num_outputs)
        self.parameterization = str(parameterization)
        self.W_std, self.b_std = float(W_std), float(b_std)

        H, W, C = shape
        k2 = self.filter_size ** 2
        convs = [((self.filter_size, self.filter_size, C, self.channels), k2 * C)]
        convs += [((self.filter_size, self.filter_size, self.channels, self.channels),
                   k2 * self.channels)] * (self.depth - 1)
        flat = (H // self.pool ** self.depth) * (W // self.pool ** self.depth) * self.channels
        denses = [((flat, self.hidden), flat)] if self.hidden else []
        denses += [((self.hidden or flat, self.num_outputs), self.hidden or flat)]
        sizes = [(int(np.prod(s)), s[-1]) for s, _ in convs + denses]
        from ntk_poison.nets import standard_normals   # nets re-exports CNN: import here
        draws = standard_normals(rngs.params(), sum(a + b for a, b in sizes), dtype)

        made, at = [], 0
        n_layers = len(convs) + len(denses)
        for i, ((wshape, fan_in), (wsize, bsize)) in enumerate(zip(convs + denses, sizes)):
            Wd = draws[at:at + wsize].reshape(wshape)
            bd = draws[at + wsize:at + wsize + bsize]
            at += wsize + bsize
            if self.parameterization == "ntk":
                w_scale, b_scale = self.W_std / math.sqrt(fan_in), self.b_std
            else:                                   # He before a relu, LeCun at the readout
                gain = 1.0 if i == n_layers - 1 else math.sqrt(2.0)
                Wd = Wd * (gain * self.W_std / math.sqrt(fan_in))
                bd = bd * self.b_std
                w_scale, b_scale = 1.0, 1.0
            made.append((Conv if i < len(convs) else Dense)(
                Wd.astype(dtype), bd.astype(dtype), w_scale, b_scale))
        self.convs = nnx.List(made[:len(convs)])
        self.dense = made[len(convs)] if self.hidden else None
        self.readout = made[-1]

    @property
    def dtype(self):
        return self.readout.W[...].dtype

    @property
    def arch(self) -> Dict[str, Any]:
        """The architecture as keyword arguments (of :func:`stax_twin`; add
        ``input_shape`` for :class:`CNN`)."""
        return dict(channels=self.channels, depth=self.depth, filter_size=self.filter_size,
                    pool=self.pool, hidden=self.hidden, num_outputs=self.num_outputs,
                    parameterization=self.parameterization, W_std=self.W_std,
                    b_std=self.b_std)

    def _check_x(self, x: Array) -> Array:
        if getattr(x, "ndim", None) != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"`x` must be a batch of images (n, {', '.join(map(str, self.input_shape))}) "
                f"for this CNN (input_shape {self.input_shape}), got shape "
                f"{tuple(getattr(x, 'shape', ()))}; resize the images or build the CNN "
                "for their shape.")
        return jnp.asarray(x).astype(self.dtype)

    def features(self, x: Array) -> jax.Array:
        """The penultimate activations ``(n, F)``, the readout's input: the flattened
        last conv block (``F = H W channels / pool^(2 depth)``) or the hidden dense
        layer's ReLU (``F = hidden``)."""
        h = self._check_x(x)
        for conv in self.convs:
            h = _mean_pool(jax.nn.relu(conv(h)), self.pool)
        h = h.reshape(h.shape[0], -1)
        if self.dense is not None:
            h = jax.nn.relu(self.dense(h))
        return h

    def __call__(self, x: Array) -> jax.Array:
        """The logits ``(n, num_outputs)`` of images ``x (n, H, W, C)``; ``(n,)`` when
        ``num_outputs == 1``."""
        out = self.readout(self.features(x))
        return out[:, 0] if self.num_outputs == 1 else out

    def kernel(self, kind: str = "ntk") -> kernels.Kernel:
        """The analytic infinite-width kernel of this architecture (one logit):
        ``kernels.nt_cnn(depth, channels, filter_size, W_std, b_std, kind, pool,
        hidden)``. ``kind``: ``"ntk"`` or ``"nngp"``. NTK parameterisation only."""
        if self.parameterization != "ntk":
            raise ValueError(
                "`kernel` needs parameterization='ntk': the standard parameterisation's "
                "NTK grows with the width and has no infinite-width limit; build the CNN "
                "with parameterization='ntk'.")
        _validate.choice("kind", kind, ("ntk", "nngp"))
        return kernels.nt_cnn(self.depth, self.channels, self.filter_size, self.W_std,
                              self.b_std, kind, pool=self.pool, hidden=self.hidden)


def _check_key(key: Any) -> Any:
    key = jnp.asarray(key)
    if not (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or
            (key.dtype == jnp.uint32 and key.shape == (2,))):
        raise ValueError(f"`key` must be a jax.random key (jax.random.key(seed) or "
                         f"PRNGKey(seed)), got dtype {key.dtype} shape {key.shape}.")
    return key


def cnn(key: Array, input_shape: Tuple[int, int, int] = (28, 28, 1), channels: int = 32,
        depth: int = 2, filter_size: int = 3, pool: int = 2, hidden: int = 0,
        num_outputs: int = 10, parameterization: str = "ntk", W_std: float = 1.0,
        b_std: float = 0.0, *, dtype: Any = None) -> CNN:
    """Build a :class:`CNN` from a ``jax.random`` key (the validated entry point, as
    ``nets.init`` is for the MLP). Same arguments as :class:`CNN`; ValueError names a
    bad one."""
    key = _check_key(key)
    return CNN(input_shape, channels, depth, filter_size, pool, hidden, num_outputs,
               parameterization, W_std, b_std, rngs=nnx.Rngs(params=key), dtype=dtype)


def stax_twin(channels: int = 32, depth: int = 2, filter_size: int = 3, pool: int = 2,
              hidden: int = 0, num_outputs: int = 10, parameterization: str = "ntk",
              W_std: float = 1.0, b_std: float = 0.0):
    """The neural-tangents ``(init_fn, apply_fn, kernel_fn)`` of :class:`CNN`'s architecture.

    ``stax_twin(**model.arch)``. Its ``apply_fn(stax_params(model), x)`` equals
    ``model(x)`` (up to the squeeze of a single output: stax returns ``(n, 1)``). In
    the NTK parameterisation its ``kernel_fn`` is :meth:`CNN.kernel`'s (with
    ``num_outputs`` logits); in the standard one it is stax's standard-parameterisation
    kernel, with weight scale ``sqrt(2) W_std`` in the ReLU layers (He) and ``W_std``
    in the readout (LeCun), whose NNGP is the variance of the initial output.
    """
    _validate.choice("parameterization", parameterization, PARAMETERIZATIONS)
    _validate.nonneg("W_std", W_std, positive=True)
    W_hidden = W_std * (math.sqrt(2.0) if parameterization == "standard" else 1.0)
    return kernels.stax_cnn(depth, channels, filter_size, W_hidden, b_std, pool=pool,
                            hidden=hidden, num_outputs=num_outputs,
                            parameterization=parameterization, W_std_readout=W_std)


def stax_params(model: CNN) -> list:
    """The parameters of ``model`` in the layout of :func:`stax_twin`'s ``apply_fn``.

    One entry per stax layer: ``(W, b)`` for a Conv (W HWIO, b ``(1, 1, 1, C)``) or a
    Dense (W ``(fan_in, fan_out)``, b ``(1, fan_out)``), ``()`` for Relu, AvgPool and
    Flatten. The arrays are the model's own (N(0, 1) draws in the NTK
    parameterisation, the scaled draws in the standard one, which is what stax stores).
    """
    if not isinstance(model, CNN):
        raise ValueError(f"`model` must be a CNN, got {type(model).__name__}.")
    out = []
    for conv in model.convs:
        out += [(conv.W[...], conv.b[...].reshape(1, 1, 1, -1)), ()]
        if model.pool > 1:
            out.append(())
    out.append(())                                  # Flatten
    if model.dense is not None:
        out += [(model.dense.W[...], model.dense.b[...].reshape(1, -1)), ()]
    out.append((model.readout.W[...], model.readout.b[...].reshape(1, -1)))
    return out
