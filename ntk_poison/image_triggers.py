"""Image triggers whose effect depends on the input: blending and warping (issue 12).

Both are frozen dataclasses registered in :mod:`ntk_poison.triggers` (``triggers.get(
"blend")``, ``triggers.get("warp")``), with the same interface as the cross and the
patch: ``apply(x, key=None)`` on a batch of images ``(n, H, W, C)``, ``(n, H, W)`` or
flat ``(n, d)`` (the grid read as in :func:`triggers.image_shape_of`), ``direction(shape,
x=None)`` (a unit array of one input's shape) and ``to_dict`` / ``from_dict`` (plain
JSON: the pattern and the flow field are regenerated from ``seed``).

The trigger direction of an input-dependent trigger is the difference it makes,
``x_trig - x``: :func:`displacement` gives it per input, normalised to unit norm; the
overlap of issue 12 is ``spectra.alignment(top_eigenvector, displacement(t, x)[i])``.

**Blend** (Chen et al. 2017): ``x_trig = (1 - alpha) x + alpha t``, a fixed pattern ``t``
(uniform noise on [0, 1) from ``np.random.default_rng(seed)`` of the image shape, or a
user pattern); the difference is ``alpha (t - x)``.

**Warp** (WaNet, Nguyen & Tran 2021). A ``k x k`` field of 2-vectors ``F0 ~ U(-1, 1)``
(``np.random.default_rng(seed)``, shape ``(k, k, 2)``: row, column), normalised
``F = F0 / mean|F0|``, upsampled to ``H x W`` by BILINEAR interpolation with aligned
corners (the field's corners on the image's corners; WaNet uses bicubic). WaNet moves
the sampling grid by ``s F / H`` in coordinates normalised to [-1, 1]; in pixels that is

    g(i, j) = clip((i, j) + s F_up(i, j) (H - 1, W - 1) / (2 (H, W)),  [0, H-1] x [0, W-1])

and ``x_trig(i, j) = bilinear(x, g(i, j))`` (:func:`bilinear_sample`, vmapped over the
batch, pure jnp). ``noise=True`` is WaNet's noise mode: every input's grid is moved
again by ``U(-1, 1) / H`` (normalised units) drawn from the ``key`` of each call, then
clipped. ``s = 0`` is the identity.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, triggers

Array = Any

__all__ = ["BlendTrigger", "WarpTrigger", "bilinear_sample", "flow_field", "warp_grid",
           "displacement"]


# --------------------------------------------------------------------------- helpers

def _as_images(x: Array, image_shape) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """The batch ``x`` as ``(n, H, W, C)`` and the grid ``(H, W[, C])`` it was read as."""
    xb = triggers.as_batch(x)
    grid = triggers.image_shape_of(xb.shape, image_shape)
    H, W = grid[:2]
    C = grid[2] if len(grid) == 3 else 1
    return xb.reshape((xb.shape[0], H, W, C)), grid


def displacement(trigger: Any, x: Array, key: Any = None) -> np.ndarray:
    """The per-input trigger directions ``(apply(x) - x)_i / ||apply(x) - x||_i``, the
    shape of ``x``; inputs the trigger leaves unchanged get a zero row."""
    xb = triggers.as_batch(x)
    diff = np.asarray(trigger.apply(xb, key), np.float64) - xb
    nrm = np.sqrt((diff.reshape(len(diff), -1) ** 2).sum(1))
    nrm = nrm.reshape((-1,) + (1,) * (diff.ndim - 1))
    return np.where(nrm > 0, diff / np.where(nrm > 0, nrm, 1.0), 0.0)


def _mean_direction(trigger: Any, shape, x: Array) -> np.ndarray:
    shp = triggers.one_shape(shape)
    xb = triggers.as_batch(x)
    if tuple(xb.shape[1:]) != shp:
        raise ValueError(f"`x` holds inputs of shape {tuple(xb.shape[1:])} but `shape` is "
                         f"{shp}; they must agree.")
    diff = (np.asarray(trigger.apply(xb), np.float64) - xb).mean(axis=0)
    nrm = np.linalg.norm(diff)
    if nrm == 0:
        raise ValueError(f"The {trigger.kind} trigger leaves the inputs `x` unchanged on "
                         "average, so its direction is undefined.")
    return diff / nrm


def _check_seed(seed: Any) -> int:
    if not _validate.is_int_scalar(seed) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    return int(seed)


# --------------------------------------------------------------------------- blend

class ImageTrigger(triggers.FieldsTrigger):
    """Mixin of the image triggers: JSON round trip by fields and :meth:`displacement`."""

    def displacement(self, x: Array, key: Any = None) -> np.ndarray:
        """Per-input unit differences ``x_trig - x`` (:func:`displacement`)."""
        return displacement(self, x, key)


@dataclasses.dataclass(frozen=True)
class BlendTrigger(ImageTrigger):
    """``x_trig = (1 - alpha) x + alpha t`` with a fixed pattern ``t``.

    Attributes:
      alpha: the blend weight in [0, 1] (0.2 in issue 12).
      seed: the pattern is ``np.random.default_rng(seed).uniform(0, 1, grid)`` ...
      pattern: ... unless given: a nested list/tuple of the image grid's shape (stored
        as nested tuples, so the trigger stays hashable and JSON round-trips).
      image_shape: the grid for flat inputs (see :mod:`ntk_poison.triggers`).
    """

    alpha: float = 0.2
    seed: int = 0
    pattern: Optional[tuple] = None
    image_shape: Optional[Tuple[int, ...]] = None
    kind: ClassVar[str] = "blend"

    def __post_init__(self):
        a = np.asarray(self.alpha)
        if a.ndim or not np.issubdtype(a.dtype, np.number) or not 0 <= float(a) <= 1:
            raise ValueError(f"`alpha` must be a number in [0, 1], got {self.alpha!r}.")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "seed", _check_seed(self.seed))
        if self.pattern is not None:
            try:
                p = np.asarray(self.pattern, dtype=np.float64)
            except (TypeError, ValueError):
                p = np.asarray(np.nan)
            if p.ndim not in (2, 3) or not np.all(np.isfinite(p)):
                raise ValueError("`pattern` must be a finite (H, W) or (H, W, C) array "
                                 "(nested lists), or None for the seeded noise pattern.")
            nested = tuple(tuple(map(tuple, r)) if p.ndim == 3 else tuple(r)
                           for r in p.tolist())
            object.__setattr__(self, "pattern", nested)
        object.__setattr__(self, "image_shape", triggers.check_image_shape(
            self.image_shape))

    def pattern_array(self, image_shape: Tuple[int, ...]) -> np.ndarray:
        """The pattern ``t`` on the ``(H, W)`` / ``(H, W, C)`` grid, float64."""
        grid = tuple(int(s) for s in image_shape)
        if self.pattern is None:
            return np.random.default_rng(self.seed).uniform(0.0, 1.0, grid)
        p = np.asarray(self.pattern, np.float64)
        if p.shape != grid:
            raise ValueError(f"The blend `pattern` has shape {p.shape} but the images are "
                             f"{grid}; pass a pattern of the image shape.")
        return p

    def apply(self, x: Array, key: Any = None) -> np.ndarray:
        """``(1 - alpha) x + alpha t`` on a batch; ``key`` is unused."""
        xb = triggers.as_batch(x)
        t = self.pattern_array(triggers.image_shape_of(xb.shape, self.image_shape))
        out = (1.0 - self.alpha) * xb + self.alpha * t.reshape(xb.shape[1:])
        return out.astype(np.result_type(xb.dtype, np.float32))

    def direction(self, shape: Tuple[int, ...], x: Array = None) -> np.ndarray:
        """A unit array of one input's ``shape``: with inputs ``x``, the normalised mean
        difference ``mean_i alpha (t - x_i)``; without, ``t / ||t||`` (the direction at
        ``x = 0``). Per input: :meth:`displacement`."""
        if x is not None:
            return _mean_direction(self, shape, x)
        shp = triggers.one_shape(shape)
        t = self.pattern_array(triggers.image_shape_of((1,) + shp, self.image_shape))
        return t.reshape(shp) / np.linalg.norm(t)


# --------------------------------------------------------------------------- warp

def bilinear_sample(image: Array, grid: Array) -> jax.Array:
    """Sample ``image (H, W, C)`` at real pixel coordinates ``grid (..., 2)`` (row,
    column), bilinearly: ``sum (1-|r-i|)(1-|c-j|) image[i, j]`` over the four
    neighbours. Coordinates must lie in ``[0, H-1] x [0, W-1]`` (clip them first);
    pure jnp, so it jits, vmaps and differentiates."""
    image = jnp.asarray(image)
    grid = jnp.asarray(grid).astype(image.dtype)
    H, W = image.shape[0], image.shape[1]
    r, c = grid[..., 0], grid[..., 1]
    r0 = jnp.clip(jnp.floor(r), 0, H - 1)
    c0 = jnp.clip(jnp.floor(c), 0, W - 1)
    wr, wc = (r - r0)[..., None], (c - c0)[..., None]
    i0, j0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
    i1, j1 = jnp.minimum(i0 + 1, H - 1), jnp.minimum(j0 + 1, W - 1)
    top = (1 - wc) * image[i0, j0] + wc * image[i0, j1]
    bottom = (1 - wc) * image[i1, j0] + wc * image[i1, j1]
    return (1 - wr) * top + wr * bottom


_sample_batch = jax.jit(jax.vmap(bilinear_sample, in_axes=(0, None)))
_sample_each = jax.jit(jax.vmap(bilinear_sample, in_axes=(0, 0)))


def flow_field(k: int, seed: int) -> np.ndarray:
    """WaNet's ``k x k x 2`` field: ``F0 ~ U(-1, 1)`` from ``default_rng(seed)``, divided
    by its mean absolute value (so ``mean|F| = 1``)."""
    f0 = np.random.default_rng(seed).uniform(-1.0, 1.0, (k, k, 2))
    return f0 / np.abs(f0).mean()


def warp_grid(field: np.ndarray, H: int, W: int, strength: float) -> np.ndarray:
    """The clipped sampling grid ``g (H, W, 2)`` in pixels (module docstring): the field
    upsampled bilinearly with aligned corners (separable hat-function weights
    ``max(0, 1 - |t - a|)``, ``t`` on ``linspace(0, k-1, H)``), scaled to WaNet's ``s F / H``."""
    k = field.shape[0]
    hat = lambda n: np.maximum(0.0, 1.0 - np.abs(                     # noqa: E731
        np.linspace(0.0, k - 1.0, n)[:, None] - np.arange(k)[None, :]))
    up = np.einsum("ia,abc,jb->ijc", hat(H), field, hat(W))       # (H, W, 2)
    scale = np.array([(H - 1) / (2.0 * H), (W - 1) / (2.0 * W)])
    ident = np.stack(np.meshgrid(np.arange(H), np.arange(W), indexing="ij"), -1)
    g = ident + strength * up * scale
    return np.clip(g, 0.0, np.array([H - 1, W - 1], np.float64))


@dataclasses.dataclass(frozen=True)
class WarpTrigger(ImageTrigger):
    """WaNet's warping trigger (module docstring for the maths).

    Attributes:
      k: the side of the random flow field (>= 2; 4 in WaNet and issue 12).
      strength: ``s >= 0`` (0.5); 0 is the identity.
      seed: the flow field's seed (same seed, same field).
      noise: WaNet's noise mode: a fresh random move of the grid per input and call,
        drawn from the ``key`` that :meth:`apply` then requires.
      image_shape: the grid for flat inputs (see :mod:`ntk_poison.triggers`).
    """

    k: int = 4
    strength: float = 0.5
    seed: int = 0
    noise: bool = False
    image_shape: Optional[Tuple[int, ...]] = None
    kind: ClassVar[str] = "warp"

    def __post_init__(self):
        if not _validate.is_int_scalar(self.k) or self.k < 2:
            raise ValueError(f"`k` must be an int >= 2 (the flow field's side), got "
                             f"{self.k!r}.")
        _validate.nonneg("strength", self.strength)
        if not isinstance(self.noise, (bool, np.bool_)):
            raise ValueError(f"`noise` must be True or False, got {self.noise!r}.")
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "strength", float(self.strength))
        object.__setattr__(self, "seed", _check_seed(self.seed))
        object.__setattr__(self, "noise", bool(self.noise))
        object.__setattr__(self, "image_shape", triggers.check_image_shape(
            self.image_shape))

    def flow(self) -> np.ndarray:
        """The normalised ``k x k x 2`` field :func:`flow_field` of this seed."""
        return flow_field(self.k, self.seed)

    def grid(self, image_shape: Tuple[int, ...]) -> np.ndarray:
        """The clipped sampling grid ``(H, W, 2)`` in pixels, without noise."""
        H, W = int(image_shape[0]), int(image_shape[1])
        return warp_grid(self.flow(), H, W, self.strength)

    def apply(self, x: Array, key: Any = None) -> np.ndarray:
        """Warp a batch; ``key`` (a jax PRNG key or an int seed) is required in noise
        mode and ignored otherwise."""
        xi, grid = _as_images(x, self.image_shape)
        H, W = grid[:2]
        dtype = np.result_type(xi.dtype, np.float32)
        g = self.grid(grid)
        if self.noise:
            if key is None:
                raise ValueError("This WarpTrigger is in noise mode: pass `key` (a jax "
                                 "PRNG key or an int seed) for the per-input grid noise.")
            u = jax.random.uniform(_validate.as_key(key), (len(xi), H, W, 2),
                                   minval=-1.0, maxval=1.0)
            g = g + np.asarray(u, np.float64) * np.array([(H - 1) / (2.0 * H),
                                                          (W - 1) / (2.0 * W)])
            g = np.clip(g, 0.0, np.array([H - 1, W - 1], np.float64))
            out = _sample_each(jnp.asarray(xi.astype(dtype)), jnp.asarray(g))
        else:
            out = _sample_batch(jnp.asarray(xi.astype(dtype)), jnp.asarray(g))
        return np.asarray(out, dtype).reshape(np.shape(x))

    def direction(self, shape: Tuple[int, ...], x: Array = None) -> np.ndarray:
        """The normalised mean difference ``mean_i (x_trig - x)_i`` over inputs ``x``
        (required: a warp moves nothing in a constant image). Per input:
        :meth:`displacement`."""
        if x is None:
            raise ValueError("A warp's direction depends on the input: pass `x` (a batch "
                             "of inputs of `shape`), or use displacement(x) per input.")
        return _mean_direction(self, shape, x)


triggers.register("blend")(BlendTrigger)
triggers.register("warp")(WarpTrigger)
