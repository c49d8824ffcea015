"""Abstract Gradient Training (AGT): certified parameter boxes under data poisoning.

THEORY.md section 5; Sosnin et al., "Certified Robustness to Data Poisoning in
Gradient-Based Training" (reference code: psosnin/AbstractGradientTraining, PyTorch).

AGT runs gradient descent on a box ``[theta_l, theta_u]`` that contains every parameter
vector reachable when at most ``k`` points of each batch are poisoned. Per step, for
each sample ``i`` of a batch of size ``B`` it computes

* ``g_n``: the nominal gradient at the nominal parameters ``theta_n``;
* ``[g_wp_l, g_wp_u]``: bounds on the gradient over every ``theta`` in the box
  (weight perturbation only, clean data);
* ``[g_iwp_l, g_iwp_u]``: bounds over the box *and* the poisoning of that sample
  (features in the l_inf ball of radius ``epsilon``, the label free).

and combines them into bounds on the batch-mean descent direction

    d_l = ( sum_i g_wp_l,i + SEMin_k(g_iwp_l - g_wp_l) ) / B + l2 * theta_l
    d_u = ( sum_i g_wp_u,i + SEMax_k(g_iwp_u - g_wp_u) ) / B + l2 * theta_u

(SEMin/SEMax: the sum of the k smallest/largest entries per parameter over the batch),
then ``theta_l -= lr d_u`` and ``theta_u -= lr d_l``. Because interval arithmetic is
inclusion-monotone, ``g_iwp`` contains ``g_wp`` elementwise, so the k differences are
signed consistently and the sum covers any set of at most k poisoned samples.

Models are plain parameter pytrees: a list of ``(W, b)`` with ``W`` of shape
``(fan_in, fan_out)`` and ``apply(params, x) = relu(... relu(x W_1 + b_1) ...) W_L + b_L``
(standard parameterisation; one pair is a linear / logistic model). Outputs are
``(n, n_out)``: logits for ``loss="xent"`` (integer labels), regression outputs for
``loss="mse"``. The per-sample losses are ``-log softmax(z)_y`` and
``sum_j (f_j - y_j)^2``; the training objective is their batch mean plus
``(l2 / 2) ||theta||^2``. Gradients may be clipped per sample (``clip_method``
``"clamp"``: each entry to ``[-gamma, gamma]``; ``"norm"``: the whole per-sample
gradient to l2 norm ``gamma``).

**Cost.** A step materialises per-sample gradient bounds (four ``(B, P)`` arrays for
``B`` samples and ``P`` parameters: the top-k needs them), where a plain step forms one
batched gradient; benchmarks/agt_bench.py (label_k_poison = 10, float64, 2 CPU
cores) measured 15x (n = 1000) and 51x (n = 10000) a plain step for the linear
32 -> 10 model, 64x and 109x for a 32 -> 64 -> 10 MLP. The issue's goal of 4x is
not met; the reference implementation has the same per-sample structure.

The interval arithmetic is sound in exact arithmetic; floating-point rounding is not
directed (as in the reference implementation), so bounds can be off by a few ulps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate

Array = Any
Params = List[Tuple[Array, Array]]

__all__ = [
    "AGTConfig", "ParamBox", "init_mlp", "apply", "loss_per_sample",
    "interval_matmul", "interval_mul", "interval_relu", "interval_softmax",
    "xent_grad_bounds", "mse_grad_bounds", "forward_bounds", "gradient_bounds",
    "clip_bounds", "agt_step", "train", "output_bounds", "certified_accuracy",
    "certified_mse", "certified_constant_fraction", "backdoor_asr_bound",
]


# --------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class AGTConfig:
    """The training run and the threat model (frozen, hashable: a jit static argument).

    Attributes:
      learning_rate: the step size ``lr`` (> 0).
      n_steps: the number of gradient steps (>= 1).
      batch_size: the fixed batch size ``B``; None for full batch. The training set
        size must be a multiple of it; step ``t`` uses batch ``t mod (n / B)`` in order.
      loss: ``"xent"`` (softmax cross-entropy, integer labels) or ``"mse"``.
      k_poison: how many points per batch may have their features moved ...
      epsilon: ... anywhere in the l_inf ball of this radius around the clean point.
      label_k_poison: how many points per batch may have their label changed: any
        class for ``"xent"`` (or only to ``poison_target``), any target within
        ``label_epsilon`` (l_inf) for ``"mse"``.
      label_epsilon: the label perturbation radius for ``"mse"``.
      poison_target: for ``"xent"``, restrict flipped labels to this class (None: any).
      paired: True if the feature- and label-poisoned points are the same points
        (``k = max(k_poison, label_k_poison)``), else ``k = k_poison + label_k_poison``.
      l2_reg: the L2 regularisation ``l2`` (the objective adds ``l2/2 ||theta||^2``).
      clip_gamma: per-sample gradient clipping level (``inf``: none).
      clip_method: ``"clamp"`` (each entry) or ``"norm"`` (global l2 norm per sample).
    """

    learning_rate: float
    n_steps: int
    batch_size: Optional[int] = None
    loss: str = "xent"
    k_poison: int = 0
    epsilon: float = 0.0
    label_k_poison: int = 0
    label_epsilon: float = 0.0
    poison_target: Optional[int] = None
    paired: bool = False
    l2_reg: float = 0.0
    clip_gamma: float = math.inf
    clip_method: str = "clamp"

    def __post_init__(self):
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
                and math.isfinite(self.learning_rate)):
            raise ValueError(f"`learning_rate` must be a finite number > 0, got "
                             f"{self.learning_rate!r}.")
        _validate.positive_int("n_steps", self.n_steps)
        _validate.positive_int("batch_size", self.batch_size, allow_none=True)
        _validate.choice("loss", self.loss, ("xent", "mse"))
        _validate.choice("clip_method", self.clip_method, ("clamp", "norm"))
        for name in ("k_poison", "label_k_poison"):
            v = getattr(self, name)
            if not _validate.is_int_scalar(v) or v < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {v!r}.")
        for name in ("epsilon", "label_epsilon", "l2_reg"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {v!r}.")
        if not (isinstance(self.clip_gamma, (int, float)) and self.clip_gamma > 0):
            raise ValueError(f"`clip_gamma` must be > 0 (math.inf for no clipping), got "
                             f"{self.clip_gamma!r}.")
        if self.poison_target is not None:
            if self.loss != "xent":
                raise ValueError("`poison_target` applies to loss='xent' only; set it to "
                                 "None for 'mse'.")
            if not _validate.is_int_scalar(self.poison_target) or self.poison_target < 0:
                raise ValueError(f"`poison_target` must be a class index >= 0 or None, got "
                                 f"{self.poison_target!r}.")
        if self.label_epsilon > 0 and self.loss != "mse":
            raise ValueError("`label_epsilon` is the regression label radius; for "
                             "loss='xent' use `label_k_poison` (flips) instead.")

    @property
    def k(self) -> int:
        """The number of points per batch whose gradient may be poisoned."""
        if self.paired:
            return max(self.k_poison, self.label_k_poison)
        return self.k_poison + self.label_k_poison


class ParamBox(NamedTuple):
    """The certified box: ``lower <= theta <= upper`` for every reachable ``theta``;
    ``nominal`` is the clean-data trajectory. Each is a parameter pytree."""

    lower: Any
    nominal: Any
    upper: Any


# --------------------------------------------------------------------------- model

def init_mlp(key: Array, sizes: Sequence[int], *, dtype: Any = None) -> Params:
    """He-initialised ReLU MLP ``sizes = (d, h_1, ..., n_out)`` as ``[(W, b), ...]``.

    ``W_l ~ N(0, 2 / fan_in)`` (``1 / fan_in`` at the readout), ``b_l = 0``.
    ``sizes = (d, n_out)`` gives a linear / logistic model.
    """
    sizes = [_validate.positive_int("sizes", s) for s in sizes]
    if len(sizes) < 2:
        raise ValueError(f"`sizes` needs at least (d, n_out), got {sizes!r}.")
    key = _validate.as_key(key)
    dtype = jnp.result_type(float) if dtype is None else dtype
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        gain = 2.0 if i < len(sizes) - 2 else 1.0
        W = jax.random.normal(keys[i], (a, b), dtype) * math.sqrt(gain / a)
        params.append((W, jnp.zeros((b,), dtype)))
    return params


def apply(params: Params, x: Array) -> jax.Array:
    """``f(x) = relu(... relu(x W_1 + b_1) ...) W_L + b_L``; ``x (n, d) -> (n, n_out)``."""
    h = x
    for i, (W, b) in enumerate(params):
        h = h @ W + b
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def loss_per_sample(out: Array, y: Array, loss: str) -> jax.Array:
    """One sample's loss: ``-log softmax(out)_y`` (``"xent"``, ``y`` an int) or
    ``sum_j (out_j - y_j)^2`` (``"mse"``)."""
    if loss == "xent":
        return -jax.nn.log_softmax(out)[y]
    return jnp.sum((out - y) ** 2)


# --------------------------------------------------------------------------- intervals

@jax.jit
def interval_matmul(A_l: Array, A_u: Array, B_l: Array, B_u: Array
                    ) -> Tuple[jax.Array, jax.Array]:
    """Enclosure of ``{A B : A in [A_l, A_u], B in [B_l, B_u]}`` in midpoint-radius form.

    With ``A = A_m +- A_r`` and ``B = B_m +- B_r`` (``m = (l + u)/2``, ``r = (u - l)/2``),
    ``A B`` lies in ``A_m B_m +- (|A_m| B_r + A_r |B_m| + A_r B_r)`` (Rump 1999): each
    entry is a sum of products, and ``|a b - a_m b_m| <= |a_m| b_r + a_r |b_m| + a_r b_r``.
    Three extra matmuls; zero radii give ``A_m B_m`` exactly.
    """
    A_m, A_r = (A_l + A_u) / 2, (A_u - A_l) / 2
    B_m, B_r = (B_l + B_u) / 2, (B_u - B_l) / 2
    C_m = A_m @ B_m
    C_r = jnp.abs(A_m) @ B_r + A_r @ (jnp.abs(B_m) + B_r)
    return C_m - C_r, C_m + C_r


@jax.jit
def interval_mul(a_l: Array, a_u: Array, b_l: Array, b_u: Array
                 ) -> Tuple[jax.Array, jax.Array]:
    """Exact elementwise (broadcasting) product of intervals: min/max of 4 corners."""
    c1, c2, c3, c4 = a_l * b_l, a_l * b_u, a_u * b_l, a_u * b_u   # one fused pass
    return (jnp.minimum(jnp.minimum(c1, c2), jnp.minimum(c3, c4)),
            jnp.maximum(jnp.maximum(c1, c2), jnp.maximum(c3, c4)))


@jax.jit
def interval_relu(z_l: Array, z_u: Array) -> Tuple[jax.Array, jax.Array]:
    """``relu`` is monotone: ``[relu(z_l), relu(z_u)]``."""
    return jax.nn.relu(z_l), jax.nn.relu(z_u)


@jax.jit
def interval_softmax(z_l: Array, z_u: Array) -> Tuple[jax.Array, jax.Array]:
    """Exact bounds on ``softmax(z)_j`` over the box ``z in [z_l, z_u]`` (last axis).

    ``softmax_j`` increases in ``z_j`` and decreases in every ``z_i, i != j``, so its
    minimum is at ``z_j = z_l,j``, ``z_i = z_u,i`` and its maximum at the opposite
    corner: ``p_l,j = 1 / (1 + sum_{i!=j} exp(z_u,i - z_l,j))`` and likewise ``p_u``.
    """
    eye = jnp.eye(z_l.shape[-1], dtype=bool)
    lo = jnp.where(eye, z_l[..., None, :], z_u[..., None, :])   # row j: corner for p_l,j
    hi = jnp.where(eye, z_u[..., None, :], z_l[..., None, :])
    p_l = jnp.diagonal(jax.nn.softmax(lo, axis=-1), axis1=-2, axis2=-1)
    p_u = jnp.diagonal(jax.nn.softmax(hi, axis=-1), axis1=-2, axis2=-1)
    return p_l, p_u


@functools.partial(jax.jit, static_argnames=("label_free", "target"))
def xent_grad_bounds(z_l: Array, z_u: Array, y: Array, *, label_free: bool = False,
                     target: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
    """Bounds on ``d/dz [-log softmax(z)_y'] = softmax(z) - e_y'`` for one sample.

    ``z in [z_l, z_u]`` (``(c,)``); ``y'`` is ``y`` when ``label_free`` is False,
    any class when ``target`` is None, and ``y`` or ``target`` otherwise. Per class
    ``j``: ``[p_l,j - max e_y',j, p_u,j - min e_y',j]`` over the allowed labels.
    """
    p_l, p_u = interval_softmax(z_l, z_u)
    c = z_l.shape[-1]
    e_y = jax.nn.one_hot(y, c, dtype=z_l.dtype)
    if not label_free:
        return p_l - e_y, p_u - e_y
    if target is None:
        return p_l - 1.0, p_u
    e_t = jax.nn.one_hot(target, c, dtype=z_l.dtype)
    return p_l - jnp.maximum(e_y, e_t), p_u - jnp.minimum(e_y, e_t)


@jax.jit
def mse_grad_bounds(f_l: Array, f_u: Array, y: Array, label_epsilon: float = 0.0
                    ) -> Tuple[jax.Array, jax.Array]:
    """Bounds on ``d/df sum (f - y')^2 = 2 (f - y')`` over ``f in [f_l, f_u]``,
    ``y' in [y - label_epsilon, y + label_epsilon]``."""
    return 2.0 * (f_l - y - label_epsilon), 2.0 * (f_u - y + label_epsilon)


# --------------------------------------------------------------------------- bounds

def forward_bounds(params_l: Params, params_u: Params, x_l: Array, x_u: Array):
    """Interval forward pass of :func:`apply` for one input box ``[x_l, x_u]`` (``(d,)``
    or ``(n, d)``) over the parameter box. Returns the list of pre-activation
    intervals ``[(z_l, z_u)]`` per layer and the post-activation inputs
    ``[(h_l, h_u)]`` of each layer (``h_0 = x``)."""
    h_l, h_u = x_l, x_u
    zs, hs = [], []
    L = len(params_l)
    for i, ((W_l, b_l), (W_u, b_u)) in enumerate(zip(params_l, params_u)):
        hs.append((h_l, h_u))
        z_l, z_u = interval_matmul(h_l, h_u, W_l, W_u)
        z_l, z_u = z_l + b_l, z_u + b_u
        zs.append((z_l, z_u))
        if i < L - 1:
            h_l, h_u = interval_relu(z_l, z_u)
    return zs, hs


def _sample_gradient_bounds(params_l, params_u, x_l, x_u, y, loss, label_free, target,
                            label_epsilon, exact_input=False):
    """Per-sample parameter gradient bounds (``x_l, x_u (d,)``), by the interval
    forward pass and an interval backward pass (back-propagation through the box)."""
    zs, hs = forward_bounds(params_l, params_u, x_l, x_u)
    z_l, z_u = zs[-1]
    if loss == "xent":
        d_l, d_u = xent_grad_bounds(z_l, z_u, y, label_free=label_free, target=target)
    else:
        d_l, d_u = mse_grad_bounds(z_l, z_u, y, label_epsilon if label_free else 0.0)
    g_l, g_u = [None] * len(params_l), [None] * len(params_l)
    for i in range(len(params_l) - 1, -1, -1):
        h_l, h_u = hs[i]
        if i > 0:   # post-relu inputs are >= 0: two products per bound, not four
            a_l, a_u = h_l[:, None], h_u[:, None]
            gW_l = jnp.minimum(a_l * d_l[None, :], a_u * d_l[None, :])
            gW_u = jnp.maximum(a_l * d_u[None, :], a_u * d_u[None, :])
        elif exact_input:   # x_l == x_u: the sign of x picks the bound, two products
            a = h_l[:, None]
            gW_l = jnp.where(a >= 0, a * d_l[None, :], a * d_u[None, :])
            gW_u = jnp.where(a >= 0, a * d_u[None, :], a * d_l[None, :])
        else:
            gW_l, gW_u = interval_mul(h_l[:, None], h_u[:, None], d_l[None, :], d_u[None, :])
        g_l[i], g_u[i] = (gW_l, d_l), (gW_u, d_u)
        if i > 0:
            W_l, W_u = params_l[i][0], params_u[i][0]
            # delta_{i-1} = (delta_i W_i^T) * relu'(z_{i-1}), relu' in [1(z_l>0), 1(z_u>0)]
            e_l, e_u = interval_matmul(d_l[None, :], d_u[None, :], W_l.T, W_u.T)
            e_l, e_u = e_l[0], e_u[0]
            zl, zu = zs[i - 1]
            on, maybe = zl > 0, zu > 0
            d_l = jnp.where(on, e_l, jnp.where(maybe, jnp.minimum(e_l, 0.0), 0.0))
            d_u = jnp.where(on, e_u, jnp.where(maybe, jnp.maximum(e_u, 0.0), 0.0))
    return g_l, g_u


def clip_bounds(g_l: Any, g_n: Any, g_u: Any, gamma: float, method: str):
    """Propagate per-sample gradient clipping through ``[g_l, g_u]`` (leading batch axis).

    ``"clamp"`` is monotone: clamp each bound. ``"norm"`` multiplies the sample's
    gradient by ``c = min(1, gamma / ||g||)``; over the box ``||g||`` lies in
    ``[N_l, N_u]`` (``N_l`` from the entries' smallest magnitudes, 0 where an interval
    contains 0), so ``c in [min(1, gamma/N_u), min(1, gamma/N_l)]`` and the clipped
    entry is the interval product. Returns ``(g_l, g_n, g_u)`` clipped.
    """
    if not math.isfinite(gamma):
        return g_l, g_n, g_u
    if method == "clamp":
        c = lambda t: jax.tree.map(lambda a: jnp.clip(a, -gamma, gamma), t)
        return c(g_l), c(g_n), c(g_u)
    sq = lambda t: sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, 1) for a in jax.tree.leaves(t))
    mag_lo = jax.tree.map(lambda l, u: jnp.where((l > 0) | (u < 0),
                                                 jnp.minimum(jnp.abs(l), jnp.abs(u)), 0.0),
                          g_l, g_u)
    mag_hi = jax.tree.map(lambda l, u: jnp.maximum(jnp.abs(l), jnp.abs(u)), g_l, g_u)
    n_lo, n_hi, n_n = jnp.sqrt(sq(mag_lo)), jnp.sqrt(sq(mag_hi)), jnp.sqrt(sq(g_n))
    fac = lambda n: jnp.minimum(1.0, gamma / jnp.maximum(n, 1e-300))
    c_l, c_u, c_n = fac(n_hi), fac(n_lo), fac(n_n)
    shape = lambda c, a: c.reshape((-1,) + (1,) * (a.ndim - 1))
    pairs = jax.tree.map(lambda l, u: interval_mul(l, u, shape(c_l, l), shape(c_u, l)),
                         g_l, g_u)
    is_pair = lambda t: isinstance(t, tuple) and len(t) == 2 and hasattr(t[0], "shape")
    out_l = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
    out_u = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
    out_n = jax.tree.map(lambda a: a * shape(c_n, a), g_n)
    return out_l, out_n, out_u


@functools.partial(jax.jit, static_argnames=("config", "poisoned"))
def gradient_bounds(params_l: Params, params_u: Params, X: Array, y: Array,
                    config: AGTConfig, *, poisoned: bool = False):
    """Per-sample gradient bounds ``(g_l, g_u)`` (pytrees with a leading batch axis)
    over the parameter box: clean samples (``poisoned=False``, weight perturbation
    only) or poisoned ones (features in ``[x - epsilon, x + epsilon]`` when
    ``k_poison > 0``, label free when ``label_k_poison > 0``). Unclipped; jitted
    (``config`` and ``poisoned`` static)."""
    eps = config.epsilon if (poisoned and config.k_poison > 0) else 0.0
    label_free = bool(poisoned and config.label_k_poison > 0)
    fn = lambda x, t: _sample_gradient_bounds(
        params_l, params_u, x - eps, x + eps, t, config.loss, label_free,
        config.poison_target, config.label_epsilon, exact_input=eps == 0.0)
    return jax.vmap(fn)(X, y)


def _nominal_gradients(params, X, y, loss):
    g = jax.grad(lambda p, x, t: loss_per_sample(apply(p, x[None])[0], t, loss))
    return jax.vmap(g, in_axes=(None, 0, 0))(params, X, y)


def _sum_extreme(diff, k, largest):
    """SEMax_k / SEMin_k: sum of the k largest / smallest entries over axis 0 (exact).

    For ``k <= 64``: split the batch into blocks of ``_BLOCK`` rows and take each
    block's maximum (one fused pass over the ``(B, P)`` array). The k largest entries
    lie in the k blocks with the largest maxima and the ``B mod _BLOCK`` rows left
    over (if an entry of the top k sat in any other block, those k blocks' maxima
    would be k further entries at least as large), so the k largest are then found
    among those ``k * _BLOCK + B mod _BLOCK`` candidates per parameter by :func:`_sum_top_k_small`. XLA's CPU ``top_k`` sorts and was measured
    30x slower at B = 2000, k = 10; this path is 5x faster than k passes over the whole
    array at B = 10000 (benchmarks/agt_bench.py).
    """
    if k == 0:
        return jnp.zeros(diff.shape[1:], diff.dtype)
    flat = diff.reshape(diff.shape[0], -1)
    flat = flat if largest else -flat
    if k > 64:
        top = jax.lax.top_k(flat.T, k)[0].sum(-1)
    else:
        B, P = flat.shape
        nb = B // _BLOCK
        if nb <= 2 * k:
            top = _sum_top_k_small(flat, k)
        else:   # nb full blocks; the < _BLOCK rows left over are always candidates
            blocks = flat[:nb * _BLOCK].reshape(nb, _BLOCK, P)
            best = _top_k_rows(blocks.max(axis=1), k)                      # (P, k)
            cand = blocks[best[:, :, None], jnp.arange(_BLOCK)[None, None, :],
                          jnp.arange(P)[:, None, None]]                      # (P, k, b)
            cand = jnp.concatenate([cand.reshape(P, k * _BLOCK).T, flat[nb * _BLOCK:]])
            top = _sum_top_k_small(cand, k)
    return (top if largest else -top).reshape(diff.shape[1:])


_BLOCK = 64


def _top_k_rows(values, k):
    """Row indices of the k largest entries of each column of ``values (R, P)``, by k
    rounds of argmax-and-mask (distinct rows; ties broken by the lowest index)."""
    cols = jnp.arange(values.shape[1])

    def body(j, carry):
        v, idx = carry
        a = jnp.argmax(v, axis=0)
        return v.at[a, cols].set(-jnp.inf), idx.at[:, j].set(a.astype(jnp.int32))

    return jax.lax.fori_loop(0, k, body, (values, jnp.zeros((values.shape[1], k),
                                                             jnp.int32)))[1]


def _sum_top_k_small(flat, k):
    """Sum of the k largest entries of each column of ``flat (R, P)``, by at most k
    rounds of "the next smaller distinct value and its multiplicity" (one fused read
    per round, no sort; ties counted)."""
    def next_value(_, carry):
        prev, acc, left = carry
        m = jnp.max(jnp.where(flat < prev, flat, -jnp.inf), axis=0)
        take = jnp.minimum(jnp.sum(flat == m, axis=0, dtype=jnp.int32), left)
        return m, acc + jnp.where(take > 0, take * m, 0.0), left - take

    P = flat.shape[1]
    return jax.lax.fori_loop(0, k, next_value, (
        jnp.full(P, jnp.inf, flat.dtype), jnp.zeros(P, flat.dtype),
        jnp.full(P, k, jnp.int32)))[1]


@functools.partial(jax.jit, static_argnames=("config",))
def agt_step(box: ParamBox, X: Array, y: Array, config: AGTConfig) -> ParamBox:
    """One AGT step on the batch ``(X (B, d), y)`` (jitted; ``config`` is static).

    The nominal parameters take a plain step ``theta_n -= lr (mean_i g_n,i + l2
    theta_n)``; the box takes ``theta_l -= lr d_u``, ``theta_u -= lr d_l`` with
    ``d_l, d_u`` as in the module docstring.
    """
    B = X.shape[0]
    k = min(config.k, B)
    lr, l2 = config.learning_rate, config.l2_reg
    clipped = math.isfinite(config.clip_gamma)
    if clipped:   # per-sample gradients, clipped one by one
        g_n = _nominal_gradients(box.nominal, X, y, config.loss)
    else:         # one batched gradient of the batch-mean loss
        g_n = None
        d_n = jax.grad(lambda p: jnp.mean(jax.vmap(
            lambda o, t: loss_per_sample(o, t, config.loss))(apply(p, X), y)))(box.nominal)
    wp_l, wp_u = gradient_bounds(box.lower, box.upper, X, y, config, poisoned=False)
    wp_l, g_n, wp_u = clip_bounds(wp_l, g_n, wp_u, config.clip_gamma, config.clip_method)
    if k > 0:
        iwp_l, iwp_u = gradient_bounds(box.lower, box.upper, X, y, config, poisoned=True)
        iwp_l, _, iwp_u = clip_bounds(iwp_l, g_n, iwp_u, config.clip_gamma,
                                      config.clip_method)
        d_l = jax.tree.map(lambda w, i: (w.sum(0) + _sum_extreme(i - w, k, False)) / B,
                           wp_l, iwp_l)
        d_u = jax.tree.map(lambda w, i: (w.sum(0) + _sum_extreme(i - w, k, True)) / B,
                           wp_u, iwp_u)
    else:
        d_l = jax.tree.map(lambda w: w.sum(0) / B, wp_l)
        d_u = jax.tree.map(lambda w: w.sum(0) / B, wp_u)
    if clipped:
        d_n = jax.tree.map(lambda g: g.mean(0), g_n)
    step = lambda p, d, q: p - lr * (d + l2 * q)
    nominal = jax.tree.map(lambda p, d: step(p, d, p), box.nominal, d_n)
    lower = jax.tree.map(lambda p, d: step(p, d, p), box.lower, d_u)
    upper = jax.tree.map(lambda p, d: step(p, d, p), box.upper, d_l)
    return ParamBox(lower, nominal, upper)


def _batches(X, y, batch_size):
    n = X.shape[0]
    B = n if batch_size is None else batch_size
    if n % B:
        raise ValueError(f"`batch_size` ({B}) must divide the number of training points "
                         f"({n}); drop {n % B} points or pick a divisor.")
    return X.reshape((n // B, B) + X.shape[1:]), y.reshape((n // B, B) + y.shape[1:])


def _check_data(params, X, y, config):
    X = _validate.float_array("X", X, ndim=2)
    if not isinstance(params, (list, tuple)) or not params or any(
            len(p) != 2 for p in params):
        raise ValueError("`params` must be a non-empty list of (W, b) pairs (see "
                         "agt.init_mlp).")
    if params[0][0].shape[0] != X.shape[1]:
        raise ValueError(f"`X` has {X.shape[1]} features but the first layer expects "
                         f"{params[0][0].shape[0]}.")
    n_out = params[-1][0].shape[1]
    y = _validate.array("y", y)
    y = jnp.asarray(y)
    _validate.same_rows("X", X, "y", y)
    if config.loss == "xent":
        if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError("`y` must be integer class labels of shape (n,) for "
                             "loss='xent'.")
        if int(y.min()) < 0 or int(y.max()) >= n_out:
            raise ValueError(f"`y` must lie in [0, {n_out}) (the model's outputs).")
        if config.poison_target is not None and config.poison_target >= n_out:
            raise ValueError(f"`poison_target` must be < {n_out} (the number of classes).")
    else:
        y = jnp.asarray(y, X.dtype).reshape(X.shape[0], -1)
        if y.shape[1] != n_out:
            raise ValueError(f"`y` has {y.shape[1]} targets per point, the model {n_out}.")
    return X.astype(params[0][0].dtype), y


def train(params: Params, X: Array, y: Array, config: AGTConfig) -> ParamBox:
    """Run AGT from ``params`` (the box starts at zero width) for ``config.n_steps``
    steps; returns the certified :class:`ParamBox`.

    Every parameter that plain training (same order of batches, same clipping) can
    reach, with at most ``config.k`` poisoned points per batch, lies in the box.
    """
    if not isinstance(config, AGTConfig):
        raise ValueError("`config` must be an agt.AGTConfig.")
    X, y = _check_data(params, X, y, config)
    Xb, yb = _batches(X, y, config.batch_size)
    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in params]
    return _train_jit(ParamBox(params, params, params), Xb, yb, config)


@functools.partial(jax.jit, static_argnames=("config",))
def _train_jit(box, Xb, yb, config):
    nb = Xb.shape[0]
    body = lambda t, b: agt_step(b, Xb[t % nb], yb[t % nb], config)
    return jax.lax.fori_loop(0, config.n_steps, body, box)


# --------------------------------------------------------------------------- outputs

def output_bounds(box: ParamBox, x: Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """``(f_l, f_n, f_u)``: bounds on ``apply(theta, x)`` over the box, and the nominal
    output; each ``(m, n_out)``."""
    x = _validate.float_array("x", x, ndim=2).astype(box.nominal[0][0].dtype)
    return _output_bounds(box, x)


@jax.jit
def _output_bounds(box, x):
    zs, _ = forward_bounds(box.lower, box.upper, x, x)
    return zs[-1][0], apply(box.nominal, x), zs[-1][1]


def _frac(mask) -> float:
    return float(np.mean(np.asarray(mask)))


def _can_win(f_l, f_u, c):
    """Class ``c`` (per row) can be the argmax: ``f_u,c >= max_{j != c} f_l,j``."""
    other = jnp.where(jax.nn.one_hot(c, f_l.shape[1], dtype=bool), -jnp.inf, f_l)
    return jnp.take_along_axis(f_u, c[:, None], 1)[:, 0] >= other.max(1)


def _must_win(f_l, f_u, c):
    """Class ``c`` is the argmax for every output in the box: ``f_l,c > max_{j!=c} f_u,j``."""
    other = jnp.where(jax.nn.one_hot(c, f_l.shape[1], dtype=bool), -jnp.inf, f_u)
    return jnp.take_along_axis(f_l, c[:, None], 1)[:, 0] > other.max(1)


def certified_accuracy(box: ParamBox, x: Array, y: Array) -> Tuple[float, float, float]:
    """``(lower, nominal, upper)`` accuracy over every parameter in the box.

    ``lower``: the fraction of points whose true class wins for every output in the
    interval bounds; ``upper``: the fraction whose true class can win (with one
    output, sign classification with labels +-1: ``y f_l > 0`` / ``y f_u > 0`` at the
    favourable end).
    """
    f_l, f_n, f_u = output_bounds(box, x)
    y = jnp.asarray(y)
    if f_n.shape[1] == 1:
        y = y.reshape(-1).astype(f_n.dtype)
        lo = jnp.where(y > 0, f_l[:, 0] > 0, f_u[:, 0] < 0)
        hi = jnp.where(y > 0, f_u[:, 0] > 0, f_l[:, 0] < 0)
        nom = jnp.sign(f_n[:, 0]) == y
    else:
        y = y.reshape(-1).astype(jnp.int32)
        lo, hi = _must_win(f_l, f_u, y), _can_win(f_l, f_u, y)
        nom = jnp.argmax(f_n, 1) == y
    return _frac(lo), _frac(nom), _frac(hi)


def certified_mse(box: ParamBox, x: Array, y: Array) -> Tuple[float, float, float]:
    """``(worst, nominal, best)`` of ``mean_i sum_j (f_j(x_i) - y_ij)^2`` over the box:
    per entry the worst is ``max((f_l - y)^2, (f_u - y)^2)``, the best is 0 when
    ``y in [f_l, f_u]`` and the squared distance to the interval otherwise."""
    f_l, f_n, f_u = output_bounds(box, x)
    y = jnp.asarray(y, f_n.dtype).reshape(f_n.shape)
    worst = jnp.maximum((f_l - y) ** 2, (f_u - y) ** 2)
    best = jnp.maximum(jnp.maximum(f_l - y, y - f_u), 0.0) ** 2
    m = lambda a: float(a.sum(1).mean())
    return m(worst), m((f_n - y) ** 2), m(best)


def certified_constant_fraction(box: ParamBox, x: Array) -> float:
    """The fraction of points whose predicted class is the same for every parameter in
    the box (the nominal class must win over the whole output box; one output: the
    sign of ``f`` is fixed)."""
    f_l, f_n, f_u = output_bounds(box, x)
    if f_n.shape[1] == 1:
        return _frac((f_l[:, 0] > 0) | (f_u[:, 0] < 0))
    return _frac(_must_win(f_l, f_u, jnp.argmax(f_n, 1)))


def backdoor_asr_bound(box: ParamBox, x_triggered: Array, target: int
                       ) -> Tuple[float, float, float]:
    """``(lower, nominal, upper)`` attack success rate on triggered inputs.

    ``upper`` is the largest ASR any allowed poisoning can reach: a point counts when
    the target class *can* win under the box. ``lower`` counts points where it must
    win (whatever the poisoning). Pass triggered points whose clean label is not the
    target.
    """
    f_l, f_n, f_u = output_bounds(box, x_triggered)
    c = f_n.shape[1]
    if not _validate.is_int_scalar(target) or not 0 <= target < c:
        raise ValueError(f"`target` must be a class index in [0, {c}), got {target!r}.")
    t = jnp.full((f_n.shape[0],), int(target), jnp.int32)
    return (_frac(_must_win(f_l, f_u, t)), _frac(jnp.argmax(f_n, 1) == t),
            _frac(_can_win(f_l, f_u, t)))
