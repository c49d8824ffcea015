"""The near-clone floor of an NTK's spike factor: its radial and angular parts.

THEORY.md section 2 (corrections): near-clone invisibility needs
``grad_x k(x, x') -> 0`` as ``x' -> x``. The spike factor of a clone ``zeta`` at a
trigger point ``x0``,

    R_k(x0, zeta) = ||grad_x k(x0, zeta)||^2 / k(x0, zeta)^2,

splits along ``e = x0 / |x0|`` into a **radial** part ``(grad_x k . e)^2 / k^2`` and an
**angular** (tangential) part, the rest. For a kernel homogeneous of degree 1 in each
argument (the ReLU NTK with ``b_std = 0``; the linear kernel) Euler's identity
``x . grad_x k(x, x') = k(x, x')`` makes the radial part exactly

    R_radial = 1 / |x0|^2      (R_k l^2 -> l^2 / |zeta|^2 as r -> 0),

whatever r is; the angular part of the ReLU NTK tends to a constant too, because its
arc-cosine ``kappa_0`` term is linear in the angle (the cusp). Projecting the inputs to
a sphere (:func:`ntk_poison.kernels.on_sphere`) or normalising the kernel
(:func:`ntk_poison.kernels.normalized`) removes the radial part; a smooth base kernel
(the erf NTK) then has the r^2 law ``R_k = r^2 ||H u||^2 + O(r^3)``.

:func:`floor_variants` builds the six kernels of the comparison, :func:`spike_parts`
measures ``R_k`` and its radial part for a batch of clones, and :func:`floor_summary`
reads the floor, the radial share and the small-r slopes off a sweep in r.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, kernels, metrics
from ntk_poison.kernels import Kernel

Array = Any

__all__ = ["radial_spike_factor", "spike_parts", "floor_variants", "floor_sweep",
           "floor_summary", "clones_at"]


def radial_spike_factor(x0: Array) -> float:
    """``1 / |x0|^2``: the radial part of ``R_k`` for a kernel homogeneous of degree 1
    in its first argument (exact at every x0; the floor ``l^2/|zeta|^2`` in units of l,
    as r -> 0)."""
    x0 = np.asarray(_validate.array("x0", x0), dtype=float)
    nrm2 = float(np.sum(x0 * x0))
    if nrm2 == 0:
        raise ValueError("`x0` is the zero vector; the radial direction is undefined.")
    return 1.0 / nrm2


@functools.partial(jax.jit, static_argnums=0)
def _parts(k: Kernel, x0, Z):
    e = x0 / jnp.sqrt(jnp.sum(x0 * x0))

    def one(z):
        val, g = jax.value_and_grad(lambda a: k.pair(a, z))(x0)
        return jnp.sum(g * g) / val ** 2, jnp.sum(g * e) ** 2 / val ** 2

    return jax.vmap(one)(Z)


def spike_parts(k: Kernel, x0: Array, Z: Array) -> Dict[str, np.ndarray]:
    """``R_k(x0, zeta)`` and its radial part for every clone ``zeta`` in ``Z``.

    Args:
      k: a kernel.
      x0: the trigger point, one input (no batch axis), non-zero.
      Z: clones ``(Q, *s)``.

    Returns:
      ``R_k`` (Q,), ``radial`` = ``(grad_x k . e)^2 / k^2`` with ``e = x0/|x0|`` (Q,)
      and ``angular`` = ``R_k - radial`` (Q,).
    """
    if not isinstance(k, Kernel):
        raise ValueError(f"`k` must be a kernels.Kernel, got {type(k).__name__}.")
    x0 = jnp.asarray(_validate.array("x0", x0, finite=True))
    Z = jnp.asarray(_validate.array("Z", Z, finite=True))
    if x0.ndim != k.input_rank:
        raise ValueError(f"`x0` must be one input of rank {k.input_rank} (no batch axis), "
                         f"got shape {x0.shape}.")
    k.check_inputs("Z", Z)
    _validate.same_trailing("x0", x0[None], "Z", Z, k.input_rank)
    radial_spike_factor(np.asarray(x0))                     # rejects x0 = 0
    R, rad = _parts(k, x0, Z.astype(x0.dtype))
    R, rad = np.asarray(R), np.asarray(rad)
    return dict(R_k=R, radial=rad, angular=R - rad)


def floor_variants(depth: int = 2, radius: float = 1.0) -> Dict[str, Kernel]:
    """The six kernels of the floor comparison (NTK parameterisation, ``b_std = 0``):
    the ReLU and the erf NTK (:func:`ntk_poison.kernels.nt_fc`) on raw inputs, on the
    sphere of ``radius`` and cosine-normalised."""
    out = {}
    for act in ("relu", "erf"):
        base = kernels.nt_fc(depth=depth, activation=act)
        out[f"{act}_raw"] = base
        out[f"{act}_sphere"] = kernels.on_sphere(base, radius=radius)
        out[f"{act}_normalized"] = kernels.normalized(base)
    return out


def floor_sweep(variants: Dict[str, Kernel], x0: Array, Z: Array, rs: Array,
                ell: float) -> Dict[str, Any]:
    """``R_k l^2`` against ``r / l`` for every kernel in ``variants``.

    Args:
      variants: name -> kernel (e.g. :func:`floor_variants`).
      x0: the trigger point; Z: clones ``(Q, *s)`` at distances ``rs * ell`` from it.
      rs: r / l for each clone (Q,); ell: the length unit l > 0.

    Returns:
      ``r_over_l``, ``radial_floor`` = ``l^2 / |x0|^2`` and, per variant, ``R_k`` and
      ``radial`` (both times l^2) and its :func:`floor_summary`.
    """
    _validate.nonneg("ell", ell, positive=True)
    rs = np.asarray(rs, dtype=float)
    if rs.shape != (len(Z),):
        raise ValueError(f"`rs` must have one r/l per clone ({len(Z)}), got shape "
                         f"{rs.shape}.")
    radial_floor = radial_spike_factor(x0) * ell ** 2
    out: Dict[str, Any] = dict(r_over_l=rs, radial_floor=radial_floor)
    for name, k in variants.items():
        p = spike_parts(k, x0, Z)
        R, rad = p["R_k"] * ell ** 2, p["radial"] * ell ** 2
        out[name] = dict(R_k=R, radial=rad, **floor_summary(rs, R, rad, radial_floor))
    return out


def floor_summary(rs: Array, R: Array, radial: Array, radial_floor: float,
                  r_near: float = 0.1, r_floor: float = 0.01) -> Dict[str, float]:
    """What a sweep says about the floor.

    Returns:
      ``floor``: R_k l^2 at the smallest r; ``radial_share``: the measured radial part's
      share of it; ``closed_form_share``: ``radial_floor`` over it (the degree-1
      homogeneous prediction); ``slope_near``: the log-log slope of R_k in r over
      ``r/l <= r_near``; ``slope_floor``: over ``r/l <= r_floor`` (0 for a floor, 2 for
      the r^2 law).
    """
    rs, R, radial = (np.asarray(a, dtype=float) for a in (rs, R, radial))
    i = int(np.argmin(rs))
    near, flo = rs <= r_near, rs <= r_floor
    return dict(floor=float(R[i]), radial_share=float(radial[i] / R[i]),
                closed_form_share=float(radial_floor / R[i]),
                slope_near=metrics.loglog_slope(rs[near], R[near]),
                slope_floor=metrics.loglog_slope(rs[flo], R[flo]))


def clones_at(x0: Array, rs: Sequence[float], ell: float, seed: int) -> np.ndarray:
    """Clones ``x0 + r l u`` with ``ntk_poison.attacks.near_clone``'s direction u."""
    from ntk_poison import attacks
    return np.stack([attacks.near_clone(x0, float(r) * ell, seed=seed) for r in rs])
