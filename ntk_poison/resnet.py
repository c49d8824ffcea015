"""Pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual Networks").

Images ``(n, H, W, C)`` (NHWC), 3x3 convolutions with padding 1 (PyTorch's, so a
stride-2 layer maps H to ceil(H/2)), no convolution biases. One pre-activation
basic block with input ``x``:

    a   = relu(BN(x))
    h   = conv3x3_s(a)                         (stride s = 2 at the first block of a stage)
    h   = conv3x3(relu(BN(h)))
    out = r * (h + shortcut)                    shortcut = x, or conv1x1_s(a) where the
                                                shape changes (a projection)

The network is ``stem conv3x3 -> blocks -> relu(BN) -> global average pool ->
dense``; :meth:`PreActResNet.features` is the pooled penultimate layer.

**Depths.** ``depth=18`` / ``34``: the ImageNet-style stages [2,2,2,2] / [3,4,6,3]
with widths ``(64, 128, 256, 512) * width`` and strides (1, 2, 2, 2) (the usual CIFAR
PreActResNet-18 / 34, stem at stride 1). ``depth = 6n + 2``: the CIFAR family, three
stages of n blocks, widths ``(16, 32, 64) * width``, strides (1, 2, 2); depth 110
(n = 18) is the paper's Pre-ResNet-110 (1.73M parameters), depth 20 is n = 3.

**Parameterisations.** With ``z`` i.i.d. N(0, 1) draws and ``fan_in = k*k*C_in``:

* ``"standard"``: kernels ``W = W_std/sqrt(fan_in) * z`` (He normal for
  ``W_std = sqrt(2)``), readout ``W = z/sqrt(fan_in)``, bias 0; ``norm="batch"``
  puts BatchNorm (momentum 0.9 of the running average, i.e. PyTorch's 0.1, and
  eps 1e-5) at every pre-activation and before the pool; ``norm="none"`` drops it.
* ``"ntk"``: no BatchNorm; kernels ``W = z`` with ``W_std/sqrt(fan_in)`` in the
  forward pass, readout ``(1/sqrt(fan_in)) h @ z + b_std * b`` (``b ~ N(0, 1)``), so
  every weight moves O(width^-1/2) in training (the NTK parameterisation of
  neural-tangents' ``stax.Conv``, as :class:`ntk_poison.nets.NTKDense`).

Without BatchNorm the residual sum is scaled by ``r = 1/sqrt(2)``: at
initialisation the branch and the shortcut carry the same second moment q (a
ReLU halves it, ``W_std^2 = 2`` doubles it back; a projection also acts on a ReLU
output), so their independent sum has 2q and ``r`` brings it back to q at every
block, so the output variance stays O(1) at any depth. With BatchNorm ``r = 1``
(the paper). At initialisation the standard ``norm="none"`` net and the ntk net
compute the same function (same draws, scale on the weights or in the forward pass).

**Modes.** A model with BatchNorm is built in evaluation mode
(``use_running_average=True``): ``model(x)`` normalises with the running averages
and is a per-example function. :func:`ntk_poison.train.train` switches a view of it
to training mode (batch statistics, running averages updated) and returns it in
evaluation mode.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ntk_poison import _validate
from ntk_poison.convnets import Dense  # w_scale * h @ W + b_scale * b: the CNN's readout

__all__ = ["PreActResNet", "resnet", "stage_plan", "PARAMETERIZATIONS", "NORMS"]

Array = Any

PARAMETERIZATIONS = ("standard", "ntk")
NORMS = ("batch", "none")
#: BatchNorm running-average momentum (flax's convention: new = m * old + (1-m) * batch;
#: PyTorch's momentum 0.1) and epsilon (PyTorch's).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

_IMAGENET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def stage_plan(depth: int, width: float = 1) -> Tuple[Tuple[int, int, int], ...]:
    """The stages ``((blocks, channels, stride), ...)`` of a depth, after the stem.

    ``depth`` 18 / 34: ``((2|3, 64w, 1), (2|4, 128w, 2), (2|6, 256w, 2), (2|3, 512w, 2))``;
    ``depth = 6n + 2``: ``((n, 16w, 1), (n, 32w, 2), (n, 64w, 2))``. The stem has the
    first stage's channels. ValueError for another depth or a width that does not give
    whole channel counts.
    """
    if not _validate.is_int_scalar(depth) or depth < 1 or (
            depth not in _IMAGENET_STAGES and (depth - 2) % 6 != 0) or depth < 8:
        raise ValueError(f"`depth` must be 18 or 34 (PreActResNet-18/34) or 6n + 2 with "
                         f"n >= 1 (the CIFAR family: 8, 20, 32, 56, 110, ...), got {depth!r}.")
    depth = int(depth)
    if depth in _IMAGENET_STAGES:
        blocks, bases, strides = _IMAGENET_STAGES[depth], (64, 128, 256, 512), (1, 2, 2, 2)
    else:
        n = (depth - 2) // 6
        blocks, bases, strides = (n, n, n), (16, 32, 64), (1, 2, 2)
    if (isinstance(width, bool) or not isinstance(width, (int, float, np.integer, np.floating))
            or not math.isfinite(width) or width <= 0):
        raise ValueError(f"`width` must be a multiplier > 0 of the channel counts {bases}, "
                         f"got {width!r}.")
    chans = []
    for b in bases:
        c = b * float(width)
        if abs(c - round(c)) > 1e-9 or round(c) < 1:
            raise ValueError(f"`width` = {width!r} gives {c:g} channels for the base {b}; "
                             f"use a width w with every {bases} * w a whole number >= 1 "
                             f"(e.g. {1 / bases[0]:g}, 0.25, 1, 2).")
        chans.append(int(round(c)))
    return tuple(zip(blocks, chans, strides))


class Conv(nnx.Module):
    """``scale * conv(x, W)``: a k x k convolution, stride s, padding (k-1)/2, no bias.

    ``W`` is ``(k, k, C_in, C_out)`` (HWIO), x is NHWC. ``scale`` is 1 for the
    standard parameterisation and ``W_std/sqrt(k*k*C_in)`` for the NTK one.
    """

    def __init__(self, W: Array, stride: int, scale: float):
        self.W = nnx.Param(jnp.asarray(W))
        self.stride = int(stride)    # static
        self.scale = float(scale)

    def __call__(self, x: Array) -> Array:
        W = self.W[...]
        p = (W.shape[0] - 1) // 2
        y = jax.lax.conv_general_dilated(x, W, (self.stride, self.stride), ((p, p), (p, p)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if self.scale == 1.0 else self.scale * y


def _batch_norm(channels: int, dtype: Any) -> nnx.BatchNorm:
    bn = nnx.BatchNorm(channels, use_running_average=True, momentum=BN_MOMENTUM,
                       epsilon=BN_EPSILON, param_dtype=dtype, rngs=nnx.Rngs(0))
    bn.mean = nnx.BatchStat(jnp.zeros((channels,), dtype))   # nnx makes them float32
    bn.var = nnx.BatchStat(jnp.ones((channels,), dtype))
    return bn


def _norm_relu(norm: Optional[nnx.BatchNorm], x: Array) -> Array:
    return jax.nn.relu(x if norm is None else norm(x))


class PreActBlock(nnx.Module):
    """One pre-activation basic block (the module docstring's formula)."""

    def __init__(self, conv1: Conv, conv2: Conv, shortcut: Optional[Conv],
                 norm1: Optional[nnx.BatchNorm], norm2: Optional[nnx.BatchNorm],
                 residual_scale: float):
        self.conv1, self.conv2, self.shortcut = conv1, conv2, shortcut
        self.norm1, self.norm2 = norm1, norm2
        self.residual_scale = float(residual_scale)

    def __call__(self, x: Array) -> Array:
        a = _norm_relu(self.norm1, x)
        sc = x if self.shortcut is None else self.shortcut(a)
        h = self.conv2(_norm_relu(self.norm2, self.conv1(a)))
        out = h + sc
        return out if self.residual_scale == 1.0 else self.residual_scale * out


class _Draws:
    """Consecutive slices of one flat array of N(0, 1) draws."""

    def __init__(self, flat: np.ndarray):
        self.flat, self.at = flat, 0

    def take(self, shape: Sequence[int]) -> np.ndarray:
        size = int(np.prod(shape))
        out = self.flat[self.at:self.at + size].reshape(shape)
        self.at += size
        return out


def _weight_count(plan, in_channels: int, num_outputs: int) -> int:
    """The number of N(0, 1) draws: every conv kernel, the readout W and b."""
    total, c_in = 9 * in_channels * plan[0][1], plan[0][1]
    for blocks, c, stride in plan:
        for i in range(blocks):
            s = stride if i == 0 else 1
            total += 9 * c_in * c + 9 * c * c + (c_in * c if (s != 1 or c_in != c) else 0)
            c_in = c
    return total + c_in * num_outputs + num_outputs


def _check_arch(depth, width, num_outputs, in_channels, parameterization, norm, W_std,
                b_std) -> Tuple[tuple, str]:
    plan = stage_plan(depth, width)
    _validate.positive_int("num_outputs", num_outputs)
    _validate.positive_int("in_channels", in_channels)
    _validate.choice("parameterization", parameterization, PARAMETERIZATIONS)
    if norm is None:
        norm = "batch" if parameterization == "standard" else "none"
    _validate.choice("norm", norm, NORMS)
    if parameterization == "ntk" and norm != "none":
        raise ValueError("`norm` = 'batch' does not go with parameterization='ntk' (the "
                         "NTK parameterisation has no BatchNorm); use norm='none' or "
                         "parameterization='standard'.")
    _validate.nonneg("W_std", W_std, positive=True)
    _validate.nonneg("b_std", b_std)
    return plan, norm


class PreActResNet(nnx.Module):
    """A pre-activation ResNet (see the module docstring); an nnx pytree.

    ``model(x)`` maps images ``(n, H, W, in_channels)`` to logits ``(n, num_outputs)``,
    or to ``(n,)`` when ``num_outputs == 1``; :meth:`features` gives the penultimate
    ``(n, C_last)``. Build it with :func:`resnet`.
    """

    def __init__(self, depth: int = 18, width: float = 1, num_outputs: int = 10,
                 in_channels: int = 3, parameterization: str = "standard",
                 norm: Optional[str] = None, W_std: float = math.sqrt(2),
                 b_std: float = 0.0, *, key: Array, dtype: Any = None):
        plan, norm = _check_arch(depth, width, num_outputs, in_channels, parameterization,
                                 norm, W_std, b_std)
        dtype = jnp.result_type(float) if dtype is None else dtype
        self.depth, self.num_outputs = int(depth), int(num_outputs)
        self.parameterization, self.norm_kind = parameterization, norm
        ntk, bn = parameterization == "ntk", norm == "batch"
        draws = _Draws(np.asarray(jax.random.normal(
            key, (_weight_count(plan, in_channels, num_outputs),), dtype)))

        def conv(k, c_in, c_out, stride):
            z = draws.take((k, k, c_in, c_out))
            s = float(W_std) / math.sqrt(k * k * c_in)
            return Conv(z, stride, s) if ntk else Conv(s * z, stride, 1.0)

        def maybe_bn(c):
            return _batch_norm(c, dtype) if bn else None

        r = 1.0 if bn else 1 / math.sqrt(2)
        c_in = plan[0][1]
        self.stem = conv(3, in_channels, c_in, 1)
        blocks = []
        for n_blocks, c, stride in plan:
            for i in range(n_blocks):
                s = stride if i == 0 else 1
                c1, c2 = conv(3, c_in, c, s), conv(3, c, c, 1)
                proj = conv(1, c_in, c, s) if (s != 1 or c_in != c) else None
                blocks.append(PreActBlock(c1, c2, proj, maybe_bn(c_in), maybe_bn(c), r))
                c_in = c
        self.blocks = nnx.List(blocks)
        self.final_norm = maybe_bn(c_in)
        W, b = draws.take((c_in, num_outputs)), draws.take((num_outputs,))
        if ntk:
            self.readout = Dense(W, b, 1 / math.sqrt(c_in), float(b_std))
        else:
            self.readout = Dense(W / math.sqrt(c_in), np.zeros_like(b), 1.0, 1.0)

    def features(self, x: Array) -> Array:
        """The penultimate layer ``(n, C_last)``: relu(BN(last block)), averaged over H, W."""
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return jnp.mean(_norm_relu(self.final_norm, h), axis=(1, 2))

    def __call__(self, x: Array) -> Array:
        out = self.readout(self.features(x))
        return out[:, 0] if self.num_outputs == 1 else out


def resnet(key: Array, depth: int = 18, width: float = 1, num_outputs: int = 10, *,
           in_channels: int = 3, parameterization: str = "standard",
           norm: Optional[str] = None, W_std: float = math.sqrt(2), b_std: float = 0.0,
           dtype: Any = None) -> PreActResNet:
    """Build a :class:`PreActResNet` (its parameters, an nnx pytree).

    Args:
      key: a ``jax.random`` key; every weight is a slice of one stream of N(0, 1)
        draws from it (stem, blocks in order, readout), so the same key gives the
        same weights in both parameterisations.
      depth: 18 or 34, or 6n + 2 (8, 20, 56, 110, ...): see :func:`stage_plan`.
      width: the channel multiplier (18/34: 64-128-256-512 times it; 6n+2:
        16-32-64 times it); every channel count must come out whole.
      num_outputs: classes (logits ``(n, C)``), or 1 for scalar outputs ``(n,)``.
      in_channels: the channels C of the images ``(n, H, W, C)``.
      parameterization: ``"standard"`` or ``"ntk"`` (module docstring).
      norm: ``"batch"`` or ``"none"`` (default: batch for standard; ntk has none).
      W_std: the convolution weight scale (He: sqrt(2)); b_std: the NTK readout
        bias scale (ntk only; the standard readout bias starts at 0).
      dtype: the parameter dtype (default float64 under x64, else float32).

    Returns:
      The model, in evaluation mode (BatchNorm uses its running averages).
    """
    key = jnp.asarray(key)
    if not (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or
            (key.dtype == jnp.uint32 and key.shape == (2,))):
        raise ValueError(f"`key` must be a jax.random key (jax.random.key(seed) or "
                         f"PRNGKey(seed)), got dtype {key.dtype} shape {key.shape}.")
    return PreActResNet(depth, width, num_outputs, in_channels, parameterization, norm,
                        W_std, b_std, key=key, dtype=dtype)
