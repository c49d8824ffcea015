"""Kernels: plain callables ``k(x1, x2) -> (n1, n2)``, and a registry of them by name.

A kernel here is an immutable :class:`Kernel`: a jit-compiled function of two batches
of inputs, a name and its parameters. It is differentiable in both arguments, so
every derivative the project needs (input gradients, input Hessians, the joint
derivative Gram matrices of the input-gradient penalty) comes from ``jax`` autodiff
of the kernel. No derivative is ever written out by hand, so a new kernel gets all of
them for free (THEORY.md section 1).

Inputs are flat vectors ``(n, d)`` for :func:`rbf`, :func:`linear`, :func:`matern52`
and :func:`nt_fc`, and images ``(n, H, W, C)`` for :func:`nt_cnn`. A kernel records
the rank of one input in :attr:`Kernel.input_rank`.

Adding a kernel::

    from ntk_poison import kernels

    @kernels.register("laplace_sq")
    def laplace_sq(length_scale: float = 1.0) -> kernels.Kernel:
        def fn(x1, x2):
            return jnp.exp(-kernels.sq_dists(x1, x2) / length_scale)
        return kernels.Kernel(fn, "laplace_sq", (("length_scale", length_scale),))

``kernels.get("laplace_sq", length_scale=2.0)`` then builds it by name.

The infinite-width kernels of neural networks come from neural-tangents
(Novak et al. 2020, "Neural Tangents: Fast and Easy Infinite Neural Networks in
Python", ICLR): :func:`nt_fc` and :func:`nt_cnn` wrap ``stax`` kernel functions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _compat
from ntk_poison import _validate

_compat.patch()

Array = Any
KernelFn = Callable[[Array, Array], Array]

__all__ = [
    "Kernel", "register", "get", "available", "sq_dists",
    "rbf", "linear", "matern52", "nt_fc", "nt_cnn", "stax_cnn", "from_stax", "normalized",
    "on_sphere",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Kernel:
    """An immutable kernel ``k(x1, x2) -> (n1, n2)``.

    Attributes:
      fn: the function of two batches ``x1 (n1, *s)`` and ``x2 (n2, *s)`` that
        returns the ``(n1, n2)`` Gram matrix. It must be built from ``jax.numpy``
        so that it can be jit-compiled and differentiated in both arguments.
      name: the registry name.
      params: the parameters, as a tuple of ``(name, value)`` pairs (hashable, so a
        kernel can be a static argument of ``jax.jit``).
      input_rank: the rank of one input: 1 for vectors ``(d,)``, 3 for images
        ``(H, W, C)``.
    """

    fn: KernelFn
    name: str = "custom"
    params: Tuple[Tuple[str, Any], ...] = ()
    input_rank: int = 1

    def __post_init__(self):
        # Jit once, at construction: every call site then shares the compiled code.
        if not hasattr(self.fn, "lower"):
            object.__setattr__(self, "fn", jax.jit(self.fn))

    def _key(self):
        # Registered kernels are equal when their name and parameters are: that lets
        # jit's cache (a kernel is a static argument) be reused across rebuilds.
        # A custom kernel is only equal to itself.
        if self.name in _REGISTRY:
            return (self.name, self.params, self.input_rank)
        return (id(self.fn),)

    def __eq__(self, other):
        return isinstance(other, Kernel) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __call__(self, x1: Array, x2: Array) -> Array:
        """The Gram matrix ``k(x1, x2)`` of shape ``(n1, n2)``."""
        x1 = _validate.array("x1", x1)
        x2 = _validate.array("x2", x2)
        self.check_inputs("x1", x1)
        self.check_inputs("x2", x2)
        _validate.same_trailing("x1", x1, "x2", x2, self.input_rank)
        dtype = jnp.result_type(x1, x2)   # one dtype: a float32 x1 must not set the
        if jnp.issubdtype(dtype, jnp.floating):   # precision of a float64 result
            x1, x2 = jnp.asarray(x1, dtype), jnp.asarray(x2, dtype)
        K = self.fn(x1, x2)
        if _validate.is_concrete(K) and not bool(jnp.all(jnp.isfinite(K))):
            raise ValueError(
                f"Kernel {self!r} is not finite at these `x1`, `x2` (finite inputs): check "
                "its parameters and its domain (e.g. on_sphere and normalized need "
                "k(x, x) > 0 and non-zero inputs).")
        return K

    def check_inputs(self, name: str, x: Array) -> None:
        """Raise a ValueError unless ``x`` is a batch of this kernel's inputs."""
        if getattr(x, "ndim", None) != self.input_rank + 1:
            kind = "vectors (n, d)" if self.input_rank == 1 else "images (n, H, W, C)"
            raise ValueError(
                f"`{name}` must be a batch of {kind} for kernel {self.name!r}, got shape "
                f"{tuple(getattr(x, 'shape', ()))}. Add a leading batch axis for a "
                "single point (x[None]).")

    def pair(self, x1: Array, x2: Array) -> Array:
        """``k(x1, x2)`` for two single inputs (no batch axis): a scalar."""
        return self.fn(x1[None], x2[None])[0, 0]

    def diag(self, x: Array) -> Array:
        """``k(x_i, x_i)`` for each point of a batch, shape ``(n,)``."""
        return jax.vmap(self.pair)(x, x)

    @property
    def param_dict(self) -> Dict[str, Any]:
        return dict(self.params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"kernels.{self.name}({args})"


# --------------------------------------------------------------------------- registry

_REGISTRY: Dict[str, Callable[..., Kernel]] = {}


def register(name: str) -> Callable[[Callable[..., Kernel]], Callable[..., Kernel]]:
    """Decorator: register a kernel factory under ``name`` for :func:`get`."""

    def wrap(factory: Callable[..., Kernel]) -> Callable[..., Kernel]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def available() -> Tuple[str, ...]:
    """The names :func:`get` accepts."""
    return tuple(sorted(_REGISTRY))


def get(name: str, **params: Any) -> Kernel:
    """Build a registered kernel by name, e.g. ``get("rbf", length_scale=1.5)``."""
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown kernel name {name!r}. Known kernels: {', '.join(available())}. "
            "Register a new one with @ntk_poison.kernels.register(name).")
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"Bad parameters for kernel {name!r}: {e}") from e


# --------------------------------------------------------------------------- helpers

def flat_rows(x: Array) -> Array:
    """``x (n, *s) -> (n, prod(s))``; unlike ``reshape(n, -1)`` also for ``n = 0``."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def sq_dists(x1: Array, x2: Array) -> Array:
    """Squared Euclidean distances ``||x1_i - x2_j||^2``, shape ``(n1, n2)``.

    One augmented GEMM, ``[x1, |x1|^2, 1] @ [-2 x2, 1, |x2|^2]^T``: memory
    O(n1 n2), not O(n1 n2 d), and XLA fuses nothing else into the matrix product.
    The result is not clipped at zero: clipping would zero the second derivative
    at ``x1 = x2``, which the input Hessians need; the round-off it leaves is a few
    ulp of ``|x|^2``.
    """
    x1, x2 = flat_rows(x1), flat_rows(x2)
    n1 = jnp.sum(x1 * x1, axis=-1, keepdims=True)
    n2 = jnp.sum(x2 * x2, axis=-1, keepdims=True)
    a = jnp.concatenate([x1, n1, jnp.ones_like(n1)], axis=1)
    b = jnp.concatenate([-2.0 * x2, jnp.ones_like(n2), n2], axis=1)
    return a @ b.T


def _positive(name: str, value: float) -> float:
    _validate.nonneg(name, value, positive=True)
    return float(value)


def _length_scale(value: float) -> float:
    """A length scale > 0 representable in every float dtype (float32's normal range)."""
    ls = _positive("length_scale", value)
    f32 = np.finfo(np.float32)
    if not float(f32.tiny) <= ls <= float(f32.max):
        raise ValueError(f"`length_scale` must be in [{f32.tiny:.2g}, {f32.max:.2g}] "
                         f"(float32's normal range), got {ls!r}; rescale the inputs.")
    return ls


def _scaled_sq_dists(x1: Array, x2: Array, ls: float) -> Array:
    """``max(|x1 - x2|^2, 0) / ls^2`` without under/overflowing ``ls^2``. The clip at 0
    acts on the value only (the derivatives are those of :func:`sq_dists`), so the
    round-off of a coincident pair never makes ``exp(-r^2/2l^2)`` exceed 1."""
    sq = sq_dists(x1, x2)
    sq = sq + jax.lax.stop_gradient(jnp.maximum(sq, 0.0) - sq)
    return (sq / ls) / ls


# --------------------------------------------------------------------------- kernels

@register("rbf")
def rbf(length_scale: float = 1.0, variance: float = 1.0) -> Kernel:
    """The RBF (squared-exponential) kernel, THEORY.md section 2.

        k(x, x') = variance * exp(-||x - x'||^2 / (2 l^2))

    Its input gradient is ``grad_x k(x, x') = -(x - x') / l^2 k(x, x')``, so the spike
    factor of a clone at distance r is ``R_k = r^2 / l^4``.
    """
    ls = _length_scale(length_scale)
    var = _positive("variance", variance)

    def fn(x1, x2):
        return var * jnp.exp(-0.5 * _scaled_sq_dists(x1, x2, ls))

    return Kernel(fn, "rbf", (("length_scale", ls), ("variance", var)))


@register("linear")
def linear(bias: float = 0.0, scale: float = 1.0) -> Kernel:
    """The linear kernel ``k(x, x') = scale * x . x' + bias`` (a linear model)."""
    b = float(_validate.nonneg("bias", bias))
    s = _positive("scale", scale)

    def fn(x1, x2):
        return s * (flat_rows(x1) @ flat_rows(x2).T) + b

    return Kernel(fn, "linear", (("bias", b), ("scale", s)))


@register("matern52")
def matern52(length_scale: float = 1.0, variance: float = 1.0) -> Kernel:
    """The Matern-5/2 kernel, twice differentiable (so input Hessians exist).

        k(r) = variance * (1 + a + a^2/3) exp(-a),    a = sqrt5 r / l

    ``r = |x - x'|`` has a singular second derivative at ``x = x'`` that k cancels
    analytically but not numerically, so near the diagonal (``a^2 < 1e-6``) k is
    evaluated by its Taylor series in ``a^2`` (``1 - a^2/6 + a^4/24``, next term
    ``-a^5/45``), a polynomial in the squared distance whose autodiff is exact
    (Hessian ``-5/(3 l^2) I`` at ``x = x'``). The two branches are combined with the
    "double where" idiom so that neither branch's derivative produces NaN.
    """
    ls = _length_scale(length_scale)
    var = _positive("variance", variance)

    def fn(x1, x2):
        a2 = 5.0 * _scaled_sq_dists(x1, x2, ls)
        small = a2 < 1e-6
        a = jnp.sqrt(jnp.where(small, 1.0, a2))
        exact = (1.0 + a + a * a / 3.0) * jnp.exp(-a)
        series = 1.0 - a2 / 6.0 + a2 * a2 / 24.0
        return var * jnp.where(small, series, exact)

    return Kernel(fn, "matern52", (("length_scale", ls), ("variance", var)))


def from_stax(kernel_fn: Callable, kind: str = "ntk", *, name: str = "stax",
              params: Tuple[Tuple[str, Any], ...] = (), input_rank: int = 1) -> Kernel:
    """Wrap a neural-tangents ``stax`` ``kernel_fn`` as a :class:`Kernel`.

    Args:
      kernel_fn: the third element of a ``stax.serial(...)`` triple.
      kind: ``"ntk"`` (the neural tangent kernel: the kernel of gradient-flow training
        of the infinitely wide network, Jacot et al. 2018) or ``"nngp"`` (the kernel
        of the network's output at initialisation, i.e. of training the readout only).
    """
    if kind not in ("ntk", "nngp"):
        raise ValueError(f"`kind` must be 'ntk' or 'nngp', got {kind!r}.")

    def fn(x1, x2):
        return kernel_fn(x1, x2, kind)

    return Kernel(fn, name, tuple(params) + (("kind", kind),), input_rank)


@register("nt_fc")
def nt_fc(depth: int = 2, W_std: float = 1.0, b_std: float = 0.0, kind: str = "ntk",
          parameterization: str = "ntk", activation: str = "relu") -> Kernel:
    """The infinite-width kernel of a fully connected network (neural-tangents).

    Architecture: ``depth x (Dense, act)`` then ``Dense(1)``, every Dense with
    weight std ``W_std`` and bias std ``b_std``. In the NTK parameterisation a layer
    computes ``W_std / sqrt(fan_in) * W x + b_std * b`` with standard-normal W and b.
    The NNGP is the arc-cosine recursion (Cho & Saul 2009):

        Sigma_0(x, x') = W_std^2 x.x'/d + b_std^2
        Sigma_{l+1}   = W_std^2 kappa_1(Sigma_l) + b_std^2,   Theta_{l+1} =
                        Sigma_{l+1} + W_std^2 kappa_0(Sigma_l) Theta_l

    with ``kappa_1 = sqrt(s s') (sin t + (pi - t) cos t) / (2 pi)`` and
    ``kappa_0 = (pi - t) / (2 pi)`` for angle t; see ``tests/oracles`` for a numpy
    version. ``kind`` picks ``"ntk"`` (Theta) or ``"nngp"`` (Sigma).

    Note: with ``b_std = 0`` the ReLU NTK is positively homogeneous of degree 1 in each
    argument, ``k(a x, x') = a k(x, x')`` (a > 0), so ``x . grad_x k(x, x') = k(x, x')``
    and its input gradient keeps a radial part ``k / |x|`` at ``x' -> x``: the spike
    factor ``R_k -> 1/|x'|^2`` as ``x -> x'``. It also has a cusp at ``x = x'`` (the
    ``kappa_0`` term is linear in the angle), which keeps an angular part. Neither
    vanishes at a near clone (THEORY.md section 2, corrections); :func:`on_sphere` and
    :func:`normalized` remove the radial part, and only a smooth base kernel
    (``activation="erf"``) then has ``grad_x k(x, x') -> 0``.

    ``activation="erf"`` uses ``stax.Erf()`` (the arcsine kernel of Williams 1997):
    a smooth kernel, so the input-gradient functionals of :mod:`ntk_poison.flow` are
    defined; it is the limit of ``nets.init(..., activation="erf")``.
    """
    from neural_tangents import stax

    if not _validate.is_int_scalar(depth) or depth < 1:
        raise ValueError(f"`depth` must be an integer >= 1, got {depth!r}.")
    W_std = _positive("W_std", W_std)
    b_std = float(_validate.nonneg("b_std", b_std))
    if parameterization not in ("ntk", "standard"):
        raise ValueError("`parameterization` must be 'ntk' or 'standard', got "
                         f"{parameterization!r}.")
    acts = {"relu": stax.Relu, "erf": stax.Erf}
    if activation not in acts:
        raise ValueError(f"`activation` must be one of {sorted(acts)}, got {activation!r}.")
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(512, W_std=W_std, b_std=b_std,
                              parameterization=parameterization), acts[activation]()]
    layers += [stax.Dense(1, W_std=W_std, b_std=b_std, parameterization=parameterization)]
    _, _, kernel_fn = stax.serial(*layers)
    params = (("depth", depth), ("W_std", W_std), ("b_std", b_std),
              ("parameterization", parameterization))
    if activation != "relu":                     # the ReLU kernel keeps its old identity
        params += (("activation", activation),)
    return from_stax(kernel_fn, kind, name="nt_fc", params=params)


def _check_cnn(depth, channels, filter_size, pool, hidden, W_std, b_std):
    for nm, v in (("depth", depth), ("channels", channels), ("filter_size", filter_size),
                  ("pool", pool)):
        if not _validate.is_int_scalar(v) or v < 1:
            raise ValueError(f"`{nm}` must be an integer >= 1, got {v!r}.")
    if not _validate.is_int_scalar(hidden) or hidden < 0:
        raise ValueError(f"`hidden` must be an integer >= 0 (0: no hidden dense layer), "
                         f"got {hidden!r}.")
    return _positive("W_std", W_std), float(_validate.nonneg("b_std", b_std))


def stax_cnn(depth: int = 2, channels: int = 64, filter_size: int = 3, W_std: float = 1.0,
             b_std: float = 0.0, *, pool: int = 1, hidden: int = 0, num_outputs: int = 1,
             parameterization: str = "ntk", W_std_readout: Any = None):
    """The neural-tangents ``stax`` triple ``(init_fn, apply_fn, kernel_fn)`` of the conv net

        depth x [Conv(channels, filter_size x filter_size, SAME), Relu,
                 AvgPool(pool x pool, stride pool, VALID) when pool > 1],
        Flatten, [Dense(hidden), Relu when hidden > 0], Dense(num_outputs)

    on channels-last images ``(n, H, W, C)``. Every layer has weight scale ``W_std`` and
    bias scale ``b_std`` except the readout, which has ``W_std_readout`` (default
    ``W_std``). It is the architecture of :func:`nt_cnn` (``num_outputs = 1``) and of
    ``nets.CNN`` (``nets.CNN``'s ``stax_twin``). A ``VALID`` pool drops the last
    ``H mod pool`` rows and columns.
    """
    from neural_tangents import stax

    W_std, b_std = _check_cnn(depth, channels, filter_size, pool, hidden, W_std, b_std)
    W_out = W_std if W_std_readout is None else _positive("W_std_readout", W_std_readout)
    if parameterization not in ("ntk", "standard"):
        raise ValueError("`parameterization` must be 'ntk' or 'standard', got "
                         f"{parameterization!r}.")
    if not _validate.is_int_scalar(num_outputs) or num_outputs < 1:
        raise ValueError(f"`num_outputs` must be an integer >= 1, got {num_outputs!r}.")
    kw = dict(b_std=b_std, parameterization=parameterization)
    layers = []
    for _ in range(depth):
        layers += [stax.Conv(channels, (filter_size, filter_size), padding="SAME",
                             W_std=W_std, **kw), stax.Relu()]
        if pool > 1:
            layers += [stax.AvgPool((pool, pool), strides=(pool, pool), padding="VALID")]
    layers += [stax.Flatten()]
    if hidden > 0:
        layers += [stax.Dense(hidden, W_std=W_std, **kw), stax.Relu()]
    layers += [stax.Dense(num_outputs, W_std=W_out, **kw)]
    return stax.serial(*layers)


@register("nt_cnn")
def nt_cnn(depth: int = 2, channels: int = 64, filter_size: int = 3, W_std: float = 1.0,
           b_std: float = 0.0, kind: str = "ntk", pool: int = 1, hidden: int = 0) -> Kernel:
    """The infinite-width kernel of a small ReLU conv net on images ``(n, H, W, C)``.

    Architecture (:func:`stax_cnn`): ``depth x (Conv(filter_size x filter_size, SAME),
    Relu[, AvgPool(pool)])``, then ``Flatten``, ``[Dense(hidden), Relu]`` and
    ``Dense(1)``, NTK parameterisation; the pool (window and stride ``pool``) is left
    out at ``pool = 1`` and the hidden dense layer at ``hidden = 0`` (the defaults).
    Without pooling, with a Flatten readout only the spatial diagonal of the
    covariance is needed (Novak et al. 2019, "Bayesian Deep Convolutional Networks
    with Many Channels are Gaussian Processes"), so the cost is
    O(n1 n2 H W filter_size^2 depth); a pool mixes pixels, so with ``pool > 1`` the
    full ``(H W)^2`` covariance is propagated (O(n1 n2 (H W)^2 filter_size^2) for the
    first layer). ``channels`` and ``hidden`` only set the widths of the finite twin
    (``nets.CNN``); the infinite-width kernel depends on ``hidden`` only through
    whether the layer is there. The same kernel serves each logit of a network
    with several outputs: its NTK is ``k(x, x') I_C``.
    """
    W_std, b_std = _check_cnn(depth, channels, filter_size, pool, hidden, W_std, b_std)
    _, _, kernel_fn = stax_cnn(depth, channels, filter_size, W_std, b_std, pool=pool,
                               hidden=hidden)
    params = (("depth", depth), ("channels", channels), ("filter_size", filter_size),
              ("W_std", W_std), ("b_std", b_std))
    if pool != 1:                                # the default kernel keeps its old identity
        params += (("pool", pool),)
    if hidden != 0:
        params += (("hidden", hidden),)
    return from_stax(kernel_fn, kind, name="nt_cnn", params=params, input_rank=3)


# --------------------------------------------------------------------------- wrappers

def _base_kernel(base: Any, base_params: Dict[str, Any]) -> Kernel:
    """A wrapper's base kernel: a :class:`Kernel`, or a registered name built with
    ``base_params``."""
    if isinstance(base, Kernel):
        if base_params:
            raise ValueError(f"Parameters {sorted(base_params)} were given with a Kernel "
                             "`base`; pass them to the base kernel's factory instead.")
        return base
    if isinstance(base, str):
        return get(base, **base_params)
    raise ValueError(f"`base` must be a Kernel or a registered kernel name, got {base!r}.")


def _flat_norms(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(flat_rows(x) ** 2, axis=1))


@register("normalized")
def normalized(base: Any = "nt_fc", **base_params: Any) -> Kernel:
    """The cosine-normalised kernel of ``base`` (THEORY.md section 2, corrections):

        k_n(x, x') = k(x, x') / sqrt(k(x, x) k(x', x'))

    It is PSD when k is (``D^-1/2 K D^-1/2`` with D the positive diagonal), and
    ``k_n(x, x) = 1``, so by Cauchy-Schwarz ``k_n(., x') <= 1`` has its maximum at
    ``x = x'``. For a smooth base kernel ``grad_x k_n(x, x') = 0`` at ``x = x'`` and the
    spike factor of a near clone at ``x = x' + r u`` is

        R_k = ||grad_x k_n||^2 / k_n^2 = r^2 ||H u||^2 + O(r^3),
        H = hess_x k_n(x, x')|_{x = x'},

    the r^2 law of a stationary kernel. The input gradient is
    ``grad_x log k_n = grad_x log k(x, x') - grad_x log k(x, x) / 2``: for a base that is
    homogeneous of degree 1 in each argument (the ReLU NTK with ``b_std = 0``) the second
    term is ``x / |x|^2``, exactly the radial part of the first, so only the angular
    part (the ReLU kernel's cusp) remains.

    Args:
      base: a :class:`Kernel` or a registered name (then built with ``base_params``).
        It must have ``k(x, x) > 0`` at every input it is called on.

    ``normalized(k)`` is equal to (and hashes as) ``get("normalized", base=name, ...)``
    when k is the registered kernel of those parameters.
    """
    k = _base_kernel(base, base_params)

    def fn(x1, x2):
        d1 = jax.vmap(k.pair)(x1, x1)
        d2 = jax.vmap(k.pair)(x2, x2)
        return k.fn(x1, x2) / jnp.sqrt(d1[:, None] * d2[None, :])

    return Kernel(fn, "normalized", (("base", k),), k.input_rank)


@register("on_sphere")
def on_sphere(base: Any = "nt_fc", radius: float = 1.0, **base_params: Any) -> Kernel:
    """``base`` on inputs projected to the sphere of radius rho (THEORY.md section 2):

        k_s(x, x') = k(rho x / |x|, rho x' / |x'|)     (|x| over all of an input's axes)

    The projection is part of the kernel, so ``grad_x k_s = rho / |x| (I - x x^T / |x|^2)
    grad_1 k``: it has no radial part. For a base homogeneous of degree 1 in each argument
    (the ReLU NTK with ``b_std = 0``) ``k_s = rho^2 k(x, x') / (|x| |x'|)``, so the spike
    factors obey ``R_k(k) = 1/|x|^2 + R_k(k_s)`` exactly (the radial term and the rest),
    and ``k_s`` equals ``normalized(k)`` up to the constant ``k(rho e, rho e)``. For a
    dot-product base ``k_s = h(x.x' / (|x| |x'|))`` and a smooth h with non-negative
    Taylor coefficients (the erf NTK) peaks at ``x' = x``: the r^2 law.

    Args:
      base: a :class:`Kernel` or a registered name (built with ``base_params``).
      radius: rho > 0. Inputs must be non-zero.
    """
    k = _base_kernel(base, base_params)
    rho = _positive("radius", radius)

    def proj(x):
        scale = rho / _flat_norms(x)
        return x * scale.reshape((-1,) + (1,) * (x.ndim - 1))

    def fn(x1, x2):
        return k.fn(proj(x1), proj(x2))

    return Kernel(fn, "on_sphere", (("base", k), ("radius", rho)), k.input_rank)
