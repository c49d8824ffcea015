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
Python", ICLR): :func:`nt_cnn` and the erf :func:`nt_fc` wrap ``stax`` kernel
functions; the ReLU :func:`nt_fc` computes the same recursion itself (equal to
neural-tangents' to ~1e-16), fused and, for ``k(X, X)``, by symmetry.
"""

from __future__ import annotations

import dataclasses
import functools
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
        same = x1 is x2                  # k(X, X): kernels may use the symmetry
        x1 = _validate.array("x1", x1)
        x2 = _validate.array("x2", x2)
        self.check_inputs("x1", x1)
        self.check_inputs("x2", x2)
        _validate.same_trailing("x1", x1, "x2", x2, self.input_rank)
        dtype = jnp.result_type(x1, x2)   # one dtype: a float32 x1 must not set the
        if jnp.issubdtype(dtype, jnp.floating):   # precision of a float64 result
            x1 = jnp.asarray(x1, dtype)
            x2 = x1 if same else jnp.asarray(x2, dtype)
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

    ReLU implementation (issue 15; ``benchmarks/ntk_gram_floor.py``): the recursion is
    computed here, not by ``stax``, in one jitted function per call shape: one GEMM
    ``x1 x2^T`` and, per layer and entry, neural-tangents' own angle form
    ``t = atan2(sqrt(S11 S22 - S12^2), S12)`` with one ``sqrt`` and a vectorised
    rational atan2 (no libm call), the derivative rules of neural-tangents' ``_sqrt``
    and ``_arctan2`` (so input gradients and Hessians are unchanged). It equals
    neural-tangents' kernel to ~1e-16 relative wherever the angle is well-conditioned
    (``tests/test_ntk_gram.py``: 1e-12). ``k(X, X)`` with the same array (or tracer)
    passed twice computes only the row blocks on and above the diagonal (exactly
    symmetric). Identical and (anti)parallel pairs, the diagonal included, keep the
    O(sqrt eps) ~ 1e-9 relative error of an angle from rounded covariances, in both
    implementations (the same for every copy of a point, which the clone law needs). Like
    neural-tangents, it computes in float64 when x64 is on, whatever the input dtype.

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
    params = (("depth", depth), ("W_std", W_std), ("b_std", b_std),
              ("parameterization", parameterization))
    if activation == "relu":
        if kind not in ("ntk", "nngp"):
            raise ValueError(f"`kind` must be 'ntk' or 'nngp', got {kind!r}.")
        return Kernel(_relu_fc_fn(depth, W_std, b_std, kind, parameterization), "nt_fc",
                      params + (("kind", kind),))
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(512, W_std=W_std, b_std=b_std,
                              parameterization=parameterization), acts[activation]()]
    layers += [stax.Dense(1, W_std=W_std, b_std=b_std, parameterization=parameterization)]
    _, _, kernel_fn = stax.serial(*layers)
    params += (("activation", activation),)      # the ReLU kernel keeps its old identity
    return from_stax(kernel_fn, kind, name="nt_fc", params=params)


# --------------------------------------------------------------------------- ReLU FC NTK

#: Rows per block of the symmetric Gram k(X, X), and the most blocks per side (the
#: blocks are unrolled into one XLA program, so their number bounds compile time).
_GRAM_BLOCK_ROWS = 1024
_GRAM_MAX_BLOCKS = 8

#: Cephes' atan: atan(u) = u + u z P(z) / Q(z), z = u^2, |u| <= 0.66 (relative error
#: ~1e-16 in float64); Q is monic, its leading 1 left out.
_ATAN_P = (-8.750608600031904122785e-1, -1.615753718733365076637e1,
           -7.500855792314704667340e1, -1.228866684490136173410e2,
           -6.485021904942025371773e1)
_ATAN_Q = (2.485846490142306297962e1, 1.650270098316988542046e2,
           4.328810604912902668951e2, 4.853903996359136964868e2,
           1.945506571482613964425e2)
_TAN_PI_8 = 0.41421356237309504880


class _SymmetricGram:
    """``Kernel.fn`` of a kernel with a cheaper Gram matrix: ``fn(X, X)`` with the
    same array (or tracer) passed twice is ``gram(X)``, any other call ``cross(x1, x2)``.
    Both are jitted; ``lower`` is the cross path's (so :class:`Kernel` does not wrap
    this in another ``jax.jit``, whose fresh tracers would hide the identity)."""

    def __init__(self, cross: KernelFn, gram: Callable[[Array], Array]):
        self.cross = jax.jit(cross)
        self.gram = jax.jit(gram)
        self.lower = self.cross.lower

    def __call__(self, x1: Array, x2: Array) -> Array:
        if x1 is x2:
            return self.gram(x1)
        return self.cross(x1, x2)


@functools.lru_cache(maxsize=64)
def _relu_fc_fn(depth: int, W_std: float, b_std: float, kind: str,
                parameterization: str) -> _SymmetricGram:
    """The jitted ``fn`` of the ReLU :func:`nt_fc`, one per parameter set, so that a
    rebuilt kernel reuses the compiled programs."""
    rec = functools.partial(_relu_fc_recursion, depth=depth, W_std=W_std, b_std=b_std,
                            kind=kind, parameterization=parameterization)
    return _SymmetricGram(functools.partial(_relu_fc_cross, recursion=rec),
                          functools.partial(_relu_fc_gram, recursion=rec))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _safe_sqrt(x: Array, tol: float = 0.0) -> Array:
    """``sqrt(max(x, tol))``, with neural-tangents' derivative rule (0 where x <= tol)."""
    return jnp.sqrt(jnp.maximum(x, tol))


@_safe_sqrt.defjvp
def _safe_sqrt_jvp(tol, primals, tangents):
    x, = primals
    x_dot, = tangents
    safe_tol = max(tol, 1e-30)
    return (_safe_sqrt(x, tol),
            jnp.where(x > safe_tol, x_dot / (2 * _safe_sqrt(x, safe_tol)), 0.0))


@jax.custom_jvp
def _relu_angle(r: Array, c: Array) -> Array:
    """The angle ``t = atan2(r, c)`` in ``[0, pi]`` for ``r >= 0`` (``pi / 2`` at
    ``r = c = 0``, as neural-tangents), by elementary operations that XLA vectorises
    and fuses: one division reduces to ``|u| <= tan(pi/8)``,

        u = min(r, |c|) / max(r, |c|)                   if that is <= tan(pi/8),
        u = (min - max) / (min + max)   (atan(a) = pi/4 + atan((a - 1)/(a + 1))) else,

    then Cephes' rational ``atan(u) = u + u z P(z)/Q(z)`` (``z = u^2``), and the
    octant is restored by ``pi/2 - .`` (``r > |c|``) and ``pi - .`` (``c < 0``).
    Absolute error ~1e-16 in float64, against ~40 cycles for a scalar libm atan2.
    The derivative is neural-tangents' ``_arctan2`` rule."""
    a = jnp.abs(c)
    lo = jnp.minimum(r, a)
    hi = jnp.maximum(r, a)
    big = lo > _TAN_PI_8 * hi
    num = jnp.where(big, lo - hi, lo)
    den = jnp.where(big, lo + hi, jnp.where(hi > 0, hi, 1.0))
    u = num / den
    z = u * u
    p = (((_ATAN_P[0] * z + _ATAN_P[1]) * z + _ATAN_P[2]) * z + _ATAN_P[3]) * z + _ATAN_P[4]
    q = ((((z + _ATAN_Q[0]) * z + _ATAN_Q[1]) * z + _ATAN_Q[2]) * z + _ATAN_Q[3]) * z \
        + _ATAN_Q[4]
    t = u + u * z * (p / q) + jnp.where(big, math.pi / 4, 0.0)
    t = jnp.where(r > a, math.pi / 2 - t, t)
    t = jnp.where(c < 0, math.pi - t, t)
    return jnp.where(hi > 0, t, math.pi / 2)


@_relu_angle.defjvp
def _relu_angle_jvp(primals, tangents):
    r, c = primals
    r_dot, c_dot = tangents
    den = jnp.maximum(r * r + c * c, 1e-30)
    return _relu_angle(r, c), r_dot * (c / den) - c_dot * (r / den)


def _nt_dtype(x1: Array, x2: Array):
    # neural-tangents computes in the canonical float64 (float32 without x64),
    # whatever the input dtype; the fast path keeps that.
    del x1, x2
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _relu_fc_recursion(q12: Array, q1: Array, q2: Array, d: int, *,
                       depth: int, W_std: float, b_std: float, kind: str,
                       parameterization: str) -> Array:
    """The ReLU FC NNGP / NTK from the input covariances (one fused elementwise pass
    per layer; the maths is in :func:`nt_fc`).

    ``q12 = x1 x2^T / d`` ``(n1, n2)``, ``q1 = |x1|^2 / d`` ``(n1,)``, ``q2`` likewise.
    """
    w2, b2 = W_std ** 2, b_std ** 2
    theta = None
    for layer in range(depth + 1):                     # Dense, then ReLU unless last
        if parameterization == "ntk":
            q12, q1, q2 = w2 * q12 + b2, w2 * q1 + b2, w2 * q2 + b2
            if kind == "ntk":
                theta = q12 if theta is None else q12 + w2 * theta
        else:                                          # "standard": fan-in d, then 512
            if kind == "ntk":
                width = d if layer == 0 else 512
                theta = width * q12 + 1.0 + (0.0 if theta is None else w2 * theta)
            q12, q1, q2 = w2 * q12 + b2, w2 * q1 + b2, w2 * q2 + b2
        if layer == depth:
            break
        r = _safe_sqrt(q1[:, None] * q2[None, :] - q12 * q12)
        t = _relu_angle(r, q12)
        step = 0.5 - t * (1.0 / (2.0 * math.pi))       # E[relu'(u) relu'(v)]
        q12 = r * (1.0 / (2.0 * math.pi)) + step * q12  # E[relu(u) relu(v)]
        if kind == "ntk":
            theta = step * theta
        q1, q2 = 0.5 * q1, 0.5 * q2                    # E[relu(u)^2] = S / 2
    return theta if kind == "ntk" else q12


def _flat_as(x: Array, dtype) -> Array:
    return flat_rows(x).astype(dtype)


def _relu_fc_cross(x1: Array, x2: Array, *, recursion: Callable) -> Array:
    """``k(x1, x2)``, ``(n1, n2)``: one GEMM and the fused recursion on every entry."""
    dtype = _nt_dtype(x1, x2)
    x1, x2 = _flat_as(x1, dtype), _flat_as(x2, dtype)
    d = x1.shape[1]
    q1 = jnp.sum(x1 * x1, axis=1) / d
    q2 = jnp.sum(x2 * x2, axis=1) / d
    return recursion((x1 @ x2.T) / d, q1, q2, d)


def _relu_fc_gram(x: Array, *, recursion: Callable) -> Array:
    """``k(X, X)``, ``(n, n)``, by symmetry: X is cut into B <= 8 row blocks of about
    1024 rows, only the B (B + 1) / 2 blocks on and above the diagonal are computed
    (their GEMM and recursion), and the others are their transposes: about
    ``(B + 1) / (2 B)`` of the work of the full matrix. The result is exactly
    symmetric. Its diagonal keeps neural-tangents' angle of rounded covariances
    (O(sqrt eps) off the exact t = 0), as every other pair of identical inputs does:
    an exact diagonal beside noisy duplicates (clones) would make the clone block of
    a Gram matrix inconsistent (tests/test_theory.py's clone law against refits)."""
    dtype = _nt_dtype(x, x)
    x = _flat_as(x, dtype)
    n, d = x.shape
    if n == 0:
        return jnp.zeros((0, 0), dtype)
    q = jnp.sum(x * x, axis=1) / d
    nb = max(1, min(_GRAM_MAX_BLOCKS, -(-n // _GRAM_BLOCK_ROWS)))
    rows = -(-n // nb)
    edges = [(s, min(n, s + rows)) for s in range(0, n, rows)]
    blocks = {}
    for i, (a0, a1) in enumerate(edges):
        for j in range(i, len(edges)):
            b0, b1 = edges[j]
            if i != j:
                blocks[i, j] = recursion((x[a0:a1] @ x[b0:b1].T) / d, q[a0:a1],
                                         q[b0:b1], d)
                continue
            idx = jnp.arange(a1 - a0)
            block = recursion((x[a0:a1] @ x[a0:a1].T) / d, q[a0:a1], q[a0:a1], d)
            # the GEMM's rounding need not be symmetric: keep the upper triangle
            blocks[i, j] = jnp.where(idx[:, None] <= idx[None, :], block, block.T)
    if len(edges) == 1:
        return blocks[0, 0]
    return jnp.concatenate([
        jnp.concatenate([blocks[i, j] if j >= i else blocks[j, i].T
                         for j in range(len(edges))], axis=1)
        for i in range(len(edges))], axis=0)


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
