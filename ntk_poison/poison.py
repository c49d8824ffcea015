"""Poisons and triggers (THEORY.md section 2).

The cloned dirty-label poison of the paper: ``m`` copies of one point ``zeta``, each
labelled with the attacker's target ``y_target``. A test input ``x0`` carries the
trigger; ``r = ||x0 - zeta||`` sets the regime (near clone: ``r << l``).

Everything here is plain numpy on the host: poisons are data, not computation.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from ntk_poison import _validate

Array = Any

__all__ = ["clone_cluster", "near_clone", "patch_trigger", "apply_patch", "cross_pattern",
           "apply_additive"]


def clone_cluster(X: Array, y: Array, zeta: Array, y_target: Any, m: int
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Append ``m`` copies of ``(zeta, y_target)`` to the training set.

    Args:
      X: clean inputs ``(n, *input_shape)``.
      y: clean float targets ``(n,)`` or ``(n, c)``.
      zeta: the poison input, of shape ``input_shape``.
      y_target: the target label: a scalar for ``y`` of shape ``(n,)``, or a ``(c,)``
        vector for ``(n, c)``.
      m: the number of clones, an integer >= 0.

    Returns:
      ``(Xp, yp)`` with the ``m`` poisons appended as the last ``m`` rows.
    """
    _validate.array("X", X, ndim=(2, 3, 4))
    _validate.array("y", y, ndim=(1, 2), floating=True)
    _validate.same_rows("X", X, "y", y)
    _validate.nonneg("m", m, integer=True)
    X = np.asarray(X)
    y = np.asarray(y)
    zeta = np.asarray(_validate.array("zeta", zeta))
    if zeta.shape != X.shape[1:]:
        raise ValueError(f"`zeta` has shape {zeta.shape} but the inputs in `X` have shape "
                         f"{X.shape[1:]}; pass one input point.")
    yt = np.asarray(_validate.array("y_target", y_target))
    if yt.shape != y.shape[1:]:
        raise ValueError(f"`y_target` has shape {yt.shape} but one target in `y` has "
                         f"shape {y.shape[1:]}.")
    m = int(m)
    Xp = np.concatenate([X, np.broadcast_to(zeta.astype(X.dtype), (m,) + zeta.shape)])
    yp = np.concatenate([y, np.broadcast_to(yt.astype(y.dtype), (m,) + yt.shape)])
    return Xp, yp


def near_clone(x0: Array, r: float, seed: int = 0, direction: Array | None = None
               ) -> np.ndarray:
    """A poison point at distance exactly ``r`` from ``x0``: ``zeta = x0 + r u``.

    ``u`` is ``direction`` normalised, or a uniformly random unit vector drawn from
    ``seed``. The near-clone regime of THEORY.md section 2 is ``r << l``.
    """
    x0 = np.asarray(_validate.array("x0", x0), dtype=np.float64)
    _validate.nonneg("r", r)
    if direction is None:
        u = np.random.default_rng(seed).standard_normal(x0.shape)
    else:
        u = np.asarray(_validate.array("direction", direction), dtype=np.float64)
        if u.shape != x0.shape:
            raise ValueError(f"`direction` has shape {u.shape}; it must match `x0` "
                             f"{x0.shape}.")
    norm = np.linalg.norm(u)
    if norm == 0:
        raise ValueError("`direction` is the zero vector; pass a non-zero direction.")
    return x0 + float(r) * u / norm


def patch_trigger(image_shape: Tuple[int, ...], size: int = 4, value: float = 1.0,
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
