"""Backdoor triggers as small immutable objects (THEORY.md sections 2 and 4).

A trigger is a frozen dataclass with two methods:

* ``apply(x, key=None) -> x_triggered``: stamp the trigger on a batch of inputs,
  flat ``(n, d)`` or images ``(n, H, W, C)``. Flat inputs are matched to the image
  by size, as :func:`apply_additive` does.
* ``direction(shape, x=None) -> u``: a unit array of ``shape`` (one input's shape):
  the direction of the difference the trigger makes to an input. The overlap metric
  of THEORY.md section 4 is ``spectra.alignment(top_eigenvector, u)``.

Triggers serialise to plain JSON (``to_dict`` / :func:`from_dict`, with a ``"kind"``
field) so that an attack artefact (:mod:`ntk_poison.artefact`) can store the trigger
it used, and they are built by name from a registry: ``triggers.get("cross",
strength=0.5)``. Input-dependent image triggers (``"blend"``, ``"warp"``) live in
:mod:`ntk_poison.image_triggers`; :func:`badnets` is the BadNets patch preset.

The image shape of flat inputs. A cross or a patch lives on an ``H x W`` grid. For
image inputs it is read from ``x``; for flat inputs ``(n, d)`` it is ``image_shape``
if given, otherwise a square single-channel ``(s, s)`` when ``d = s^2``, or a square
three-channel ``(s, s, 3)`` when ``d = 3 s^2`` (the two never collide). Anything
else is a ValueError asking for ``image_shape``.

Adding a trigger::

    @triggers.register("my_blend")
    @dataclasses.dataclass(frozen=True)
    class MyBlend:
        alpha: float
        kind: ClassVar[str] = "blend"
        def apply(self, x, key=None): ...
        def direction(self, shape, x=None): ...
        def to_dict(self): return {"kind": self.kind, "alpha": self.alpha}
        @classmethod
        def from_dict(cls, d): return cls(alpha=d["alpha"])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import numpy as np

from ntk_poison import _validate

Array = Any

__all__ = ["CrossTrigger", "PatchTrigger", "register", "get", "available", "from_dict",
           "to_dict", "image_shape_of", "cross_pattern", "apply_additive", "patch_mask",
           "apply_patch", "badnets", "check_image_shape", "as_batch", "one_shape",
           "fields_dict", "from_fields", "with_strength"]

_REGISTRY: Dict[str, type] = {}


def register(kind: str) -> Callable[[type], type]:
    """Class decorator: make a trigger class buildable by ``get(kind, ...)``."""

    def wrap(cls: type) -> type:
        _REGISTRY[kind] = cls
        return cls

    return wrap


def available() -> Tuple[str, ...]:
    """The registered trigger kinds."""
    return tuple(sorted(_REGISTRY))


def get(kind: str, **params: Any):
    """Build a trigger by kind, e.g. ``get("cross", strength=0.5)``."""
    if kind not in _REGISTRY:
        raise ValueError(f"`kind` must be one of {available()}, got {kind!r}.")
    try:
        return _REGISTRY[kind](**params)
    except TypeError as e:
        fields = [f.name for f in dataclasses.fields(_REGISTRY[kind])]
        raise ValueError(f"Bad parameters for trigger {kind!r}: {e}. Its parameters are "
                         f"{fields}.") from e


def to_dict(trigger: Any) -> Dict[str, Any]:
    """``trigger.to_dict()``: a JSON-serialisable dict with a ``"kind"`` field."""
    if not hasattr(trigger, "to_dict"):
        raise ValueError(f"`trigger` must be a trigger object (e.g. CrossTrigger), got "
                         f"{type(trigger).__name__}.")
    return trigger.to_dict()


def with_strength(trigger: Any, strength: float):
    """The trigger at another strength (an additive trigger such as the cross); a
    trigger without one (a patch) is returned as it is."""
    if hasattr(trigger, "strength"):
        return dataclasses.replace(trigger, strength=strength)
    return trigger


def from_dict(d: Dict[str, Any]):
    """Rebuild a trigger from :func:`to_dict`'s output (dispatches on ``"kind"``)."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"`d` must be a dict with a 'kind' field (from to_dict), got "
                         f"{d!r}.")
    kind = d["kind"]
    if kind not in _REGISTRY:
        raise ValueError(f"Unknown trigger kind {kind!r}; registered kinds are "
                         f"{available()}.")
    return _REGISTRY[kind].from_dict(d)


# --------------------------------------------------------------------------- patterns

def cross_pattern(image_shape: Tuple[int, ...], row: int | None = None,
                  col: int | None = None) -> np.ndarray:
    """A unit-norm "cross" (plus-sign) pattern: one full row and one full column.

    The paper's rank-one additive trigger is ``x + strength * pattern``; with a unit
    pattern the trigger moves every input by exactly ``strength`` (in input norm),
    so the strength can be set in units of a kernel length scale. ``row``/``col``
    default to the centre.
    """
    if len(image_shape) not in (2, 3):
        raise ValueError(f"`image_shape` must be (H, W) or (H, W, C), got {image_shape}.")
    H, W = image_shape[:2]
    row = H // 2 if row is None else row
    col = W // 2 if col is None else col
    if not (0 <= row < H and 0 <= col < W):
        raise ValueError(f"`row`/`col` = {row}/{col} lie outside the {H}x{W} image.")
    pat = np.zeros(image_shape, np.float64)
    pat[row, ...] = 1.0
    pat[:, col, ...] = 1.0
    return pat / np.linalg.norm(pat)


def apply_additive(x: Array, pattern: np.ndarray, strength: float) -> np.ndarray:
    """The additive trigger ``x + strength * pattern`` (flat inputs matched by size)."""
    x = np.asarray(_validate.array("x", x))
    _validate.nonneg("strength", strength)
    p = pattern.reshape(-1) if x.shape[-1] == pattern.size and x.ndim <= 2 else pattern
    if x.shape[-p.ndim:] != p.shape:
        raise ValueError(f"`x` of shape {x.shape} does not match the pattern of shape "
                         f"{pattern.shape}.")
    return (x + float(strength) * p).astype(np.result_type(x.dtype, np.float32))


def patch_mask(image_shape: Tuple[int, ...], size: int = 4, value: float = 1.0,
                  corner: str = "bottom_right") -> Tuple[np.ndarray, np.ndarray]:
    """A BadNets-style patch (Gu et al. 2017): a ``size x size`` square of ``value``.

    Returns ``(mask, pattern)`` of ``image_shape`` (``(H, W)`` or ``(H, W, C)``);
    :func:`apply_patch` computes ``x * (1 - mask) + pattern * mask``.
    """
    if len(image_shape) not in (2, 3):
        raise ValueError(f"`image_shape` must be (H, W) or (H, W, C), got {image_shape}.")
    H, W = image_shape[:2]
    _validate.nonneg("size", size, integer=True, positive=True)
    if size > min(H, W):
        raise ValueError(f"`size`={size} is larger than the image ({H}x{W}).")
    rows = {"bottom_right": slice(H - size, H), "bottom_left": slice(H - size, H),
            "top_right": slice(0, size), "top_left": slice(0, size)}
    cols = {"bottom_right": slice(W - size, W), "top_right": slice(W - size, W),
            "bottom_left": slice(0, size), "top_left": slice(0, size)}
    if corner not in rows:
        raise ValueError(f"`corner` must be one of {sorted(rows)}, got {corner!r}.")
    mask = np.zeros(image_shape, np.float64)
    mask[rows[corner], cols[corner]] = 1.0
    return mask, mask * float(value)


def apply_patch(x: Array, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Stamp a patch on inputs ``x``; flat inputs ``(n, d)`` are matched to the mask's size."""
    x = np.asarray(_validate.array("x", x))
    m = mask.reshape(-1) if x.shape[-1] == mask.size and x.ndim <= 2 else mask
    p = pattern.reshape(m.shape)
    if x.shape[-m.ndim:] != m.shape:
        raise ValueError(f"`x` of shape {x.shape} does not match the trigger of shape "
                         f"{mask.shape}.")
    return (x * (1 - m) + p * m).astype(x.dtype)


# --------------------------------------------------------------------------- helpers

def _square_side(v: int) -> Optional[int]:
    s = math.isqrt(v)
    return s if s * s == v else None


def image_shape_of(x_shape: Tuple[int, ...], image_shape: Optional[Tuple[int, ...]]
                   ) -> Tuple[int, ...]:
    """The ``(H, W)`` or ``(H, W, C)`` grid a trigger is drawn on, for a batch shape.

    Images ``(n, H, W, C)`` (or ``(n, H, W)``) give their own shape. Flat ``(n, d)``
    batches use ``image_shape`` (its size must be d), else a square ``(s, s)`` for
    ``d = s^2`` or ``(s, s, 3)`` for ``d = 3 s^2``.
    """
    one = tuple(int(s) for s in x_shape[1:])
    if len(one) in (2, 3):
        if image_shape is not None and tuple(image_shape) != one:
            raise ValueError(f"The inputs have image shape {one} but the trigger's "
                             f"`image_shape` is {tuple(image_shape)}; drop it or fix it.")
        return one
    if len(one) != 1:
        raise ValueError(f"`x` must be a batch of flat inputs (n, d) or images "
                         f"(n, H, W, C), got shape {tuple(x_shape)}.")
    d = one[0]
    if image_shape is not None:
        if int(np.prod(image_shape)) != d:
            raise ValueError(f"The trigger's `image_shape` {tuple(image_shape)} has "
                             f"{int(np.prod(image_shape))} pixels but the inputs have "
                             f"d = {d}; pass the inputs' image shape.")
        return tuple(image_shape)
    s = _square_side(d)
    if s is not None:
        return (s, s)
    if d % 3 == 0 and _square_side(d // 3) is not None:
        s = _square_side(d // 3)
        return (s, s, 3)
    raise ValueError(f"Cannot tell the image shape of flat inputs with d = {d} (not s^2 "
                     "or 3 s^2); pass `image_shape=(H, W)` or `(H, W, C)` to the trigger.")


def check_image_shape(image_shape) -> Optional[Tuple[int, ...]]:
    """A trigger's ``image_shape`` field as a tuple (None stays None), checked."""
    if image_shape is None:
        return None
    try:
        shp = tuple(int(s) for s in image_shape)
    except TypeError as e:
        raise ValueError(f"`image_shape` must be (H, W) or (H, W, C), got "
                         f"{image_shape!r}.") from e
    if len(shp) not in (2, 3) or min(shp) < 1:
        raise ValueError(f"`image_shape` must be (H, W) or (H, W, C) of positive sizes, "
                         f"got {image_shape!r}.")
    return shp


def as_batch(x: Array) -> np.ndarray:
    """``x`` as a numpy batch ``(n, d)``, ``(n, H, W)`` or ``(n, H, W, C)`` (checked)."""
    _validate.array("x", x, ndim=(2, 3, 4))
    return np.asarray(x)


def one_shape(shape) -> Tuple[int, ...]:
    """One input's shape ``(d,)``, ``(H, W)`` or ``(H, W, C)`` as a tuple (checked)."""
    try:
        shp = tuple(int(s) for s in shape)
    except TypeError as e:
        raise ValueError(f"`shape` must be one input's shape, e.g. (d,) or (H, W, C), "
                         f"got {shape!r}.") from e
    if len(shp) not in (1, 2, 3):
        raise ValueError(f"`shape` must be one input's shape (d,), (H, W) or (H, W, C) "
                         f"(no batch axis), got {shp}.")
    return shp


def fields_dict(trigger) -> Dict[str, Any]:
    """A dataclass trigger as ``{"kind": ..., field: value}`` (tuples as lists, for JSON)."""
    d = {"kind": trigger.kind}
    for f in dataclasses.fields(trigger):
        v = getattr(trigger, f.name)
        d[f.name] = list(v) if isinstance(v, tuple) else v
    return d


def from_fields(cls, d: Dict[str, Any]):
    """Build a dataclass trigger from its ``to_dict`` (ValueError on unknown fields)."""
    if not isinstance(d, dict):
        raise ValueError(f"`d` must be a dict (from to_dict), got {type(d).__name__}.")
    if d.get("kind", cls.kind) != cls.kind:
        raise ValueError(f"`d` describes a {d['kind']!r} trigger, not {cls.kind!r}; use "
                         "triggers.from_dict(d).")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - {"kind"})
    if unknown:
        raise ValueError(f"`d` has unknown fields {unknown} for a {cls.kind!r} trigger; "
                         f"its fields are {sorted(names)}.")
    return cls(**{k: v for k, v in d.items() if k != "kind"})


class FieldsTrigger:
    """Mixin of the dataclass triggers: ``to_dict``/``from_dict`` by their fields
    (:func:`fields_dict`, :func:`from_fields`)."""

    def to_dict(self) -> Dict[str, Any]:
        return fields_dict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        return from_fields(cls, d)


# --------------------------------------------------------------------------- cross

@register("cross")
@dataclasses.dataclass(frozen=True)
class CrossTrigger(FieldsTrigger):
    """The paper's rank-one additive "cross" trigger (THEORY.md section 4).

        x_triggered = x + s_i * P,     ||P|| = 1  (cross_pattern: one full row
                                                  and one full column, normalised)

    Deterministic: ``s_i = strength`` for every input, so the trigger moves each input
    by exactly ``strength`` in input norm (set it in units of the kernel length
    scale). Stochastic: ``s_i = strength * (1 + jitter * N(0, 1))``, drawn per input
    from the PRNG ``key`` that :meth:`apply` then requires.

    Attributes:
      strength: ``s >= 0``, the input-space norm of the deterministic shift.
      row, col: the cross's row and column (default: the centre).
      stochastic: draw a strength per input.
      jitter: the relative standard deviation of the stochastic strength.
      image_shape: the grid for flat inputs (see the module docstring).
    """

    strength: float
    row: Optional[int] = None
    col: Optional[int] = None
    stochastic: bool = False
    jitter: float = 0.0
    image_shape: Optional[Tuple[int, ...]] = None
    kind: ClassVar[str] = "cross"

    def __post_init__(self):
        _validate.nonneg("strength", self.strength)
        _validate.nonneg("jitter", self.jitter)
        for name in ("row", "col"):
            v = getattr(self, name)
            if v is not None and (not _validate.is_int_scalar(v) or v < 0):
                raise ValueError(f"`{name}` must be a non-negative int or None (the "
                                 f"centre), got {v!r}.")
        if not isinstance(self.stochastic, (bool, np.bool_)):
            raise ValueError(f"`stochastic` must be True or False, got "
                             f"{self.stochastic!r}.")
        object.__setattr__(self, "strength", float(self.strength))
        object.__setattr__(self, "jitter", float(self.jitter))
        object.__setattr__(self, "stochastic", bool(self.stochastic))
        object.__setattr__(self, "image_shape", check_image_shape(self.image_shape))

    def pattern(self, image_shape: Tuple[int, ...]) -> np.ndarray:
        """The unit-norm cross ``P`` on an ``(H, W)`` / ``(H, W, C)`` grid."""
        return cross_pattern(tuple(image_shape), self.row, self.col)

    def strengths(self, n: int, key: Any = None) -> np.ndarray:
        """The per-input strengths ``s_i`` of :meth:`apply`, shape ``(n,)``."""
        if not self.stochastic:
            return np.full((n,), self.strength)
        if key is None:
            raise ValueError("This CrossTrigger is stochastic: pass `key` (a jax PRNG key "
                             "or an int seed) so the per-input strengths are "
                             "reproducible.")
        import jax
        z = np.asarray(jax.random.normal(_validate.as_key(key), (n,)), dtype=np.float64)
        return self.strength * (1.0 + self.jitter * z)

    def apply(self, x: Array, key: Any = None) -> np.ndarray:
        """``x + s_i P`` for a batch ``x`` of shape ``(n, d)`` or ``(n, H, W, C)``.

        ``key`` (a jax PRNG key or an int seed) is required when ``stochastic``; it is
        ignored otherwise.
        """
        x = as_batch(x)
        P = self.pattern(image_shape_of(x.shape, self.image_shape)).reshape(x.shape[1:])
        s = self.strengths(x.shape[0], key).reshape((-1,) + (1,) * (x.ndim - 1))
        return (x + s * P).astype(np.result_type(x.dtype, np.float32))

    def direction(self, shape: Tuple[int, ...], x: Array = None) -> np.ndarray:
        """The unit pattern ``P`` of one input's ``shape``: ``(apply(x) - x) / s``.

        The same for the stochastic trigger (only the length along ``P`` varies).
        ``x`` is accepted for a uniform interface and unused.
        """
        shp = one_shape(shape)
        grid = image_shape_of((1,) + shp, self.image_shape)
        return self.pattern(grid).reshape(shp)


# --------------------------------------------------------------------------- patch

@register("patch")
@dataclasses.dataclass(frozen=True)
class PatchTrigger(FieldsTrigger):
    """A BadNets patch (Gu et al. 2017, "BadNets: Identifying Vulnerabilities in the
    Machine Learning Model Supply Chain"): a ``size x size`` square of ``value``.

        x_triggered = x * (1 - M) + value * M      (M the patch mask, all channels)

    It overwrites pixels rather than adding a fixed shift, so the difference it makes
    depends on the input: see :meth:`direction`.

    Attributes:
      size: the side of the square patch, in pixels.
      value: the pixel value written into the patch.
      corner: ``"bottom_right"``, ``"bottom_left"``, ``"top_right"`` or ``"top_left"``.
      image_shape: the grid for flat inputs (see the module docstring).
    """

    size: int = 4
    value: float = 1.0
    corner: str = "bottom_right"
    image_shape: Optional[Tuple[int, ...]] = None
    kind: ClassVar[str] = "patch"

    def __post_init__(self):
        _validate.nonneg("size", self.size, integer=True, positive=True)
        if not _validate.is_int_scalar(self.size):
            raise ValueError(f"`size` must be an int, got {self.size!r}.")
        v = np.asarray(self.value)
        if v.ndim != 0 or not np.issubdtype(v.dtype, np.number) or not np.isfinite(v):
            raise ValueError(f"`value` must be a finite number, got {self.value!r}.")
        corners = ("bottom_right", "bottom_left", "top_right", "top_left")
        if self.corner not in corners:
            raise ValueError(f"`corner` must be one of {corners}, got {self.corner!r}.")
        object.__setattr__(self, "value", float(self.value))
        object.__setattr__(self, "image_shape", check_image_shape(self.image_shape))

    def mask_and_pattern(self, image_shape: Tuple[int, ...]
                         ) -> Tuple[np.ndarray, np.ndarray]:
        """``(M, value * M)`` on an ``(H, W)`` / ``(H, W, C)`` grid (:func:`patch_mask`),
        both in float64."""
        mask, _ = patch_mask(tuple(image_shape), self.size, self.value, self.corner)
        mask = mask.astype(np.float64)
        return mask, mask * self.value

    def apply(self, x: Array, key: Any = None) -> np.ndarray:
        """Stamp the patch on a batch ``(n, d)`` or ``(n, H, W, C)``; ``key`` is unused."""
        x = as_batch(x)
        mask, pat = self.mask_and_pattern(image_shape_of(x.shape, self.image_shape))
        return apply_patch(x, mask.reshape(x.shape[1:]), pat.reshape(x.shape[1:]))

    def direction(self, shape: Tuple[int, ...], x: Array = None) -> np.ndarray:
        """A unit array of one input's ``shape``.

        With inputs ``x`` (a batch of that shape): the normalised mean difference
        ``mean_i (apply(x)_i - x_i)``, the direction the patch moves these inputs on
        average. Without: the unit patch mask ``M / ||M||`` (the direction for inputs
        that are zero under the patch, e.g. MNIST's black corners with value > 0).
        A ValueError if the patch leaves every given input unchanged.
        """
        shp = one_shape(shape)
        if x is None:
            mask, _ = self.mask_and_pattern(image_shape_of((1,) + shp, self.image_shape))
            m = mask.reshape(shp).astype(np.float64)
            return m / np.linalg.norm(m)
        xb = as_batch(x)
        if tuple(xb.shape[1:]) != shp:
            raise ValueError(f"`x` holds inputs of shape {tuple(xb.shape[1:])} but `shape` "
                             f"is {shp}; they must agree.")
        diff = (self.apply(xb).astype(np.float64) - xb).mean(axis=0)
        nrm = np.linalg.norm(diff)
        if nrm == 0:
            raise ValueError("The patch leaves every input in `x` unchanged, so its "
                             "direction is undefined; call direction(shape) for the unit "
                             "patch mask.")
        return diff / nrm


def badnets(image_shape: Optional[Tuple[int, ...]] = None) -> PatchTrigger:
    """The BadNets preset (Gu et al. 2017): a 3x3 white (1.0) square in the bottom-right
    corner. PatchTrigger's own defaults (a 4x4 square) are kept for earlier results."""
    return PatchTrigger(size=3, value=1.0, corner="bottom_right", image_shape=image_shape)


def __getattr__(name: str):
    """``triggers.BlendTrigger`` / ``triggers.WarpTrigger`` (defined in image_triggers)."""
    if name in ("BlendTrigger", "WarpTrigger"):
        return getattr(image_triggers, name)
    raise AttributeError(f"module 'ntk_poison.triggers' has no attribute {name!r}")


from ntk_poison import image_triggers  # noqa: E402  (registers "blend" and "warp")
