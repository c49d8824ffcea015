"""The defence's contraction check (THEORY.md section 3, corrected): the eigen-statement
measured on the experiment's own flow, and the naive bound as a comparison only.

For one kappa, from the undefended coefficients c0 the flow is followed twice:

* **theorem side** (:func:`ntk_poison.modes.mode_decay`): the eigenvectors w_j of
  ``H = D/n + kappa G + lam I`` in theta coordinates and ``E_j(t) = E_j(0) exp(-2 h_j t)``;
* **measured side** (:func:`ntk_poison.modes.flow_from`): the c-space flow
  ``dc/dt = -(1/n)[(W Kfull + n lam I) c - [y; 0]]`` solved through a different
  eigendecomposition (of ``S Kfull S + n lam I``), mapped to ``theta = s^(1/2) U^T c``,
  and projected on the w_j.

The largest relative error between the two (over entries above 1e-10 of the total
initial energy) tests the statement. Beside it: the weight of the poison-aligned unit
direction v^ on modes slower than kappa a, the slowest rate among the modes that carry
the poison's displacement (E_v's late decay rate is twice it), and the naive curve
``E_v(0) exp(-2 kappa a t)`` as a measured comparison (largest ratio, first time above).
"""

from __future__ import annotations

import numpy as np

from ntk_poison import flow, modes, spectra

#: the eigen-statement's tolerance on the relative error of the mode energies (float64;
#: the two routes differ by rounding in two N x N eigendecompositions)
MODE_RTOL = 1e-6


def eigen_contraction(Kf, U, s, n, y, ridge, kappa, b, c0, times) -> dict:
    """The eigen-statement and the naive comparison for one kappa (module docstring)."""
    H, G, Pvt = modes.flow_matrix(U, s, n, ridge, kappa)
    theta_star = np.linalg.solve(H, Pvt @ np.asarray(y, np.float64) / n)
    v = (U.T @ b) / np.sqrt(s)                       # v . theta = u . grad f(x0)
    vh = v / np.linalg.norm(v)
    a = float(vh @ G @ vh)
    theta0 = modes.theta_of(U, s, c0)
    md = modes.mode_decay(H, theta0 - theta_star, vh, kappa * a, times)
    deltas = modes.theta_of(U, s, modes.flow_from(Kf, n, y, ridge, kappa, c0, times)) \
        - theta_star[None]
    err, count = modes.mode_energy_error(md["W"], md["energies"], deltas)
    E_v_meas = (deltas @ vh) ** 2
    cj2 = (md["W"].T @ vh) ** 2 * md["E0"]
    carry = cj2 > 1e-6 * cj2.sum()
    h = md["h"]
    return dict(kappa=float(kappa), a=a, rate_naive=kappa * a, h_min=float(h[0]),
                h_max=float(h[-1]), n_modes=int(len(h)),
                mode_rel_error=err, mode_entries=count, mode_rtol=MODE_RTOL,
                E_v_rel_error=float(np.max(np.abs(E_v_meas - md["E_v"])
                                           / np.maximum(md["E_v"], 1e-10 * md["E_v"][0]))),
                slow_fraction=md["slow_fraction"],
                slow_displacement_fraction=md["slow_displacement_fraction"],
                slowest_carrying_rate=float(h[carry].min()),
                naive_max_ratio=md["max_ratio"],
                naive_first_exceeds_kappa_a_t=(None if md["first_exceeds"] is None
                                               else md["first_exceeds"] * kappa * a),
                n_slow_modes=int(np.sum(h < kappa * a)))


def holds(e: dict) -> bool:
    """The eigen-statement held to MODE_RTOL on this run."""
    return bool(e["mode_rel_error"] <= MODE_RTOL)


def evidence(e: dict) -> str:
    """One run's numbers for a claim's evidence."""
    first = e["naive_first_exceeds_kappa_a_t"]
    return (f"max relative error of the mode energies (c-space flow vs E_j(0) exp(-2 h_j t), "
            f"{e['mode_entries']} mode-time entries) {e['mode_rel_error']:.2g}; H-eigenvalues "
            f"{e['h_min']:.3g} .. {e['h_max']:.3g}, {e['n_slow_modes']} of {e['n_modes']} "
            f"slower than kappa a = {e['rate_naive']:.3g}; fraction of the poison direction's "
            f"energy on those slow modes {e['slow_fraction']:.3g} (of its mode-wise "
            f"displacement {e['slow_displacement_fraction']:.3g}); slowest rate carrying the "
            f"displacement {e['slowest_carrying_rate']:.3g}; naive comparison E_v(0) "
            f"exp(-2 kappa a t), measured: max E_v/naive {e['naive_max_ratio']:.3g}"
            + ("" if first is None else f", first above it at kappa a t = {first:.3g}"))


def top_direction(model, x0, label):
    """u: the top eigenvector of the loss input-Hessian at x0 (dense; d is small)."""
    import jax.numpy as jnp
    vals, vecs = spectra.top_eigenpairs(spectra.loss_fn(model, label), jnp.asarray(x0), k=1,
                                        method="dense")
    return float(vals[0]), np.asarray(vecs[0])


def rbf_contraction(k, m0, prep, cfg) -> dict:
    """Item 2 for the RBF kernel: the flow from the undefended minimiser, per kappa."""
    Xp, yp, ell2 = prep.Xp, prep.yp, prep.ell ** 2
    Kf, U, s = flow.joint_coordinates(k, Xp)
    lam_top, u = top_direction(m0, prep.x0, cfg.y_target)
    b, c0 = flow.functional_coefficients(m0, prep.x0, u)
    g = np.asarray(m0.input_grad(prep.x0[None]))[0]
    out = dict(top_eigenvalue=lam_top, u_trigger_cos2=float((u @ prep.trigger_direction) ** 2),
               u_grad_cos2=float((u @ g) ** 2 / (g @ g)), runs=[])
    for kr in cfg.contraction_kappas:
        kappa = kr * ell2
        a = flow.penalty_curvature(U, s, len(Xp), b)
        times = np.linspace(0.0, 3.0, cfg.n_times) / max(kappa * a, 1e-300)
        r = flow.contraction(U, s, len(Xp), yp, cfg.ridge, kappa, b, c0, times)
        r["kappa_over_l2"] = kr
        r["eigen"] = eigen_contraction(Kf, U, s, len(Xp), yp, cfg.ridge, kappa, b, c0, times)
        out["runs"].append(r)
    return out


