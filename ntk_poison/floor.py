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

__all__ = ["radial_spike_factor", "relu_cusp_constant", "spike_parts", "floor_variants", "floor_sweep",
           "floor_summary", "clones_at", "floor_at_points", "floor_claims",
           "floor_figure"]


def radial_spike_factor(x0: Array) -> float:
    """``1 / |x0|^2``: the radial part of ``R_k`` for a kernel homogeneous of degree 1
    in its first argument (exact at every x0; the floor ``l^2/|zeta|^2`` in units of l,
    as r -> 0)."""
    x0 = np.asarray(_validate.array("x0", x0), dtype=float)
    nrm2 = float(np.sum(x0 * x0))
    if nrm2 == 0:
        raise ValueError("`x0` is the zero vector; the radial direction is undefined.")
    return 1.0 / nrm2


def relu_cusp_constant(depth: int) -> float:
    """``c_L = L / (2 pi)``: the ReLU NTK's cusp, ``Theta(theta) = Theta(0)(1 - c_L theta +
    O(theta^2))`` in the angle theta between the inputs (depth L, ``b_std = 0``, any
    ``W_std``).

    From the arc-cosine recursion with ``a = |x||x'|/d``: ``Sigma_l = a w^(2l+2) / 2^l
    (1 + O(theta^2))`` has no linear term, ``kappa_0 = (1 - theta/pi) / 2``, and the
    angle of every layer is theta to first order; ``Theta_l = a w^(2l+2) (p_l - q_l
    theta)`` with ``p_l = (l + 1) / 2^l`` and ``2^l q_l = 2^(l-1) q_(l-1) + l / pi``, so
    ``q_L / p_L = L / (2 pi)``. Since ``|grad_x theta| = 1/|x|`` for any x0 not parallel
    to zeta, the floor is

        R_k |zeta|^2 -> 1 + c_L^2   (radial 1, cusp c_L^2),
        radial share of the floor = 1 / (1 + c_L^2)   (90.8% at depth 2).
    """
    if not _validate.is_int_scalar(depth) or depth < 1:
        raise ValueError(f"`depth` must be an integer >= 1, got {depth!r}.")
    return float(depth) / (2.0 * np.pi)


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
      ``r_over_l``, ``ell``, ``radial_floor`` = ``l^2 / |x0|^2`` and, per variant, ``R_k`` and
      ``radial`` (both times l^2) and its :func:`floor_summary`.
    """
    _validate.nonneg("ell", ell, positive=True)
    rs = np.asarray(rs, dtype=float)
    if rs.shape != (len(Z),):
        raise ValueError(f"`rs` must have one r/l per clone ({len(Z)}), got shape "
                         f"{rs.shape}.")
    radial_floor = radial_spike_factor(x0) * ell ** 2
    out: Dict[str, Any] = dict(r_over_l=rs, ell=float(ell), radial_floor=radial_floor)
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


def floor_at_points(x0s: Dict[str, Array], X: Array, rs: Array, ell: float, seed: int,
                    depth: int = 2) -> Dict[str, Any]:
    """:func:`floor_sweep` of the six :func:`floor_variants` at each trigger point of
    ``x0s`` (label -> x0), with clones :func:`clones_at` ``rs`` (r/l) and the sphere's
    radius the median norm of the clean training inputs ``X`` (a fixed radius, at the
    data's scale). Returns ``depth``, ``sphere_radius`` and ``points`` (label -> sweep)."""
    import time
    t = time.time()
    X = np.asarray(X)
    radius = float(np.median(np.linalg.norm(X.reshape(len(X), -1), axis=1)))
    variants = floor_variants(depth, radius)
    rs = np.asarray(rs, dtype=float)
    points = {label: floor_sweep(variants, x0, clones_at(x0, rs, ell, seed), rs, ell)
              | dict(depth=int(depth)) for label, x0 in x0s.items()}
    return dict(depth=int(depth), sphere_radius=radius, points=points,
                seconds=time.time() - t)


# --------------------------------------------------------------------------- report

def floor_claims(rep: Any, sweep: Dict[str, Any], where: str, figure: str,
                 slope_tol: float = 0.1, r2_tol: float = 0.05) -> None:
    """The floor's claims (THEORY.md section 2, corrections) for one
    :func:`floor_sweep` over :func:`floor_variants`, each with a verdict read off the
    data. ``where`` names the trigger point in the claim names (e.g. "x0 at 3 l"); the
    sweep carries the NTKs' ``depth`` (as :func:`floor_at_points` writes it)."""
    rs = sweep["r_over_l"]
    rf = sweep["radial_floor"]
    rel, rsph, rnrm = sweep["relu_raw"], sweep["relu_sphere"], sweep["relu_normalized"]
    erw, esph, enrm = sweep["erf_raw"], sweep["erf_sphere"], sweep["erf_normalized"]
    r0 = f"r/l = {rs.min():.0e}"
    share = rel["closed_form_share"]
    depth = int(sweep["depth"])
    c2 = relu_cusp_constant(depth) ** 2
    rep.claim(
        f"ntk floor ({where}): ReLU raw = radial + cusp",
        "On raw inputs the ReLU NTK's R_k keeps a floor as r -> 0 (log-log slope in r "
        f"within {slope_tol:g} of 0 over r/l <= 0.01). It is homogeneous of degree 1, so its "
        "radial part is exactly l^2/|x0|^2; with the cusp c_L = L/(2 pi) the floor is "
        "(1 + c_L^2) l^2/|zeta|^2, so the radial share is 1/(1 + c_L^2) (THEORY.md: about "
        "90%); the measured share is within 1 point of it.",
        abs(rel["slope_floor"]) <= slope_tol and abs(share - 1 / (1 + c2)) <= 0.01,
        f"R_k l^2 = {rel['floor']:.4g} at {r0} (slope {rel['slope_floor']:.3f}); radial floor "
        f"l^2/|x0|^2 = {rf:.4g} = {share:.2%} of it (measured radial part by projecting "
        f"grad_x k on x0: {rel['radial_share']:.2%}; closed form at depth {depth}: "
        f"{1 / (1 + c2):.2%}); the cusp {1 - share:.2%}.", [figure])
    ident = float(np.max(np.abs(rsph["R_k"] - (rel["R_k"] - rf)) / rel["R_k"]))
    rep.claim(
        f"ntk floor ({where}): ReLU cusp survives the sphere",
        "On the sphere (k(rho x/|x|, rho x'/|x'|)) and cosine-normalised, the ReLU NTK "
        "loses its radial part but the cusp keeps a floor: slope within "
        f"{slope_tol:g} of 0 over r/l <= 0.01.",
        abs(rsph["slope_floor"]) <= slope_tol and abs(rnrm["slope_floor"]) <= slope_tol,
        f"R_k l^2 at {r0}: sphere {rsph['floor']:.4g} (slope {rsph['slope_floor']:.3f}), "
        f"normalised {rnrm['floor']:.4g} (slope {rnrm['slope_floor']:.3f}); the identity "
        f"R_k(sphere) = R_k(raw) - l^2/|x0|^2 holds to {ident:.1e} (relative) at every r.",
        [figure])
    rep.claim(
        f"ntk floor ({where}): erf raw keeps the radial term",
        "The smooth erf NTK on raw inputs keeps a floor as r -> 0 (slope within "
        f"{slope_tol:g} of 0 over r/l <= 0.01), and it is radial (>= 99% of R_k).",
        abs(erw["slope_floor"]) <= slope_tol and erw["radial_share"] >= 0.99,
        f"R_k l^2 = {erw['floor']:.4g} at {r0} (slope {erw['slope_floor']:.3f}); radial "
        f"part {erw['radial_share']:.2%} of it (the erf NTK is not homogeneous: "
        f"l^2/|x0|^2 = {rf:.4g} is {erw['closed_form_share']:.2f}x the floor).", [figure])
    rep.claim(
        f"ntk floor ({where}): erf r^2 law on the sphere",
        "On inputs normalised to the sphere, and cosine-normalised, the erf NTK's R_k "
        f"falls like r^2: log-log slope within {r2_tol:g} of 2 over r/l <= 0.1 "
        "(THEORY.md: 2.001).",
        abs(esph["slope_near"] - 2) <= r2_tol and abs(enrm["slope_near"] - 2) <= r2_tol,
        f"slope {esph['slope_near']:.4f} on the sphere, {enrm['slope_near']:.4f} normalised "
        f"({esph['slope_floor']:.4f} / {enrm['slope_floor']:.4f} over r/l <= 0.01); R_k l^2 "
        f"at {r0}: {esph['floor']:.3g} / {enrm['floor']:.3g}, against {erw['floor']:.3g} "
        "raw.", [figure])


def floor_figure(rep: Any, sweeps: Dict[str, Dict[str, Any]], name: str) -> str:
    """R_k l^2 against r/l for the six variants, one panel per trigger point, with the
    radial floor l^2/|x0|^2 beside."""
    from ntk_poison.report import new_figure
    fig, axes = new_figure(len(sweeps), 1, size=(5.6, 4.2))
    styles = {"raw": "-", "sphere": "--", "normalized": ":"}
    for ax, (label, sw) in zip(axes[0], sweeps.items()):
        rs = sw["r_over_l"]
        for var in ("relu_raw", "relu_sphere", "relu_normalized", "erf_raw", "erf_sphere",
                    "erf_normalized"):
            act, kind = var.split("_")
            ax.loglog(rs, sw[var]["R_k"], styles[kind], color="C0" if act == "relu" else "C1",
                      marker="o" if kind == "raw" else None, ms=3, label=var)
        ax.axhline(sw["radial_floor"], color="k", lw=0.8, label="l^2/|x0|^2 (radial)")
        ax.set_xlabel("r / l")
        ax.set_ylabel("R_k l^2 = l^2 |grad k0|^2 / k0^2")
        ax.set_title(f"NTK near-clone floor: {label}")
        ax.legend(fontsize=7)
    return rep.figure(fig, name)
