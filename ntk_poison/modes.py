"""The eigenmodes of the penalised kernel flow: what contracts, and how fast
(THEORY.md section 3, "poison-aligned modes contract", corrected).

In orthonormal coordinates theta of the joint span (``Kfull = U s U^T``,
:func:`ntk_poison.flow.joint_coordinates`; features ``Phi = U s^(1/2)`` split into
value rows ``Phi_v`` and gradient rows ``Phi_g``) the output-penalty flow is linear::

    d theta/dt = -H (theta - theta*),   H = D/n + kappa G + lam I,
    D = Phi_v^T Phi_v,  G = Phi_g^T Phi_g / n,  theta* = H^-1 Phi_v^T y / n

**The theorem.** With ``H = sum_j h_j w_j w_j^T`` (h_j > 0, w_j orthonormal) the
displacement ``delta = theta - theta*`` has ``w_j . delta(t) = exp(-h_j t) w_j . delta(0)``,
so the energy along each eigenvector decays exactly as::

    E_j(t) = E_j(0) exp(-2 h_j t)

and the total energy at least as ``exp(-2 h_min t)``. The penalty speeds up each mode
whose H-eigenvalue it raises.

**Not a theorem.** For a direction v that is not H-invariant, ``v^T G v >= a`` does
NOT imply ``E_v(t) <= E_v(0) exp(-2 kappa a t)`` (``E_v = (v^ . delta)^2``): E_v is
``(sum_j (w_j.v^)(w_j.delta0) exp(-h_j t))^2`` and late in time it follows the slowest
modes v^ overlaps, which can be slower than kappa a. :func:`mode_decay` returns that
naive curve only as a comparison, with the weight of v^ on the modes slower than
kappa a (``slow_fraction``).

The flow itself, measured independently of H, is the c-space flow of
:func:`flow_from` (``dc/dt = -(1/n)[(W Kfull + n lam I) c - [y; 0]]``, solved through
the eigendecomposition of ``A = S Kfull S + n lam I``, S = W^(1/2)); theta is
``s^(1/2) U^T c`` (:func:`theta_of`).
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from ntk_poison import _validate

__all__ = ["flow_matrix", "theta_of", "flow_from", "mode_decay", "mode_energy_error"]


def flow_matrix(U: np.ndarray, s: np.ndarray, n: int, ridge: float, kappa: float
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``H = Phi_v^T Phi_v / n + kappa G + lam I`` and ``G = Phi_g^T Phi_g / n`` in the
    theta coordinates of ``(U, s)`` (``(N, r)``, ``(r,)``; the first n rows of U are the
    value functionals), and ``b_theta = Phi_v^T`` (``(r, n)``: ``theta* = H^-1 b_theta y / n``).
    """
    _validate.nonneg("kappa", kappa)
    _validate.nonneg("ridge", ridge)
    Phi = np.asarray(U, np.float64) * np.sqrt(np.asarray(s, np.float64))[None]
    Pv, Pg = Phi[:n], Phi[n:]
    G = Pg.T @ Pg / n
    H = Pv.T @ Pv / n + kappa * G + ridge * np.eye(len(s))
    return 0.5 * (H + H.T), 0.5 * (G + G.T), Pv.T


def theta_of(U: np.ndarray, s: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``theta = s^(1/2) U^T c`` for joint coefficients c (``(N,)`` or ``(T, N)``)."""
    return (np.asarray(c, np.float64) @ np.asarray(U, np.float64)) * np.sqrt(s)


def flow_from(Kfull: np.ndarray, n: int, y: np.ndarray, ridge: float, kappa: float,
              c0: np.ndarray, times: Any) -> np.ndarray:
    """The output-penalty kernel flow from joint coefficients ``c0`` (kappa > 0).

    ``dc/dt = -(1/n)[(W Kfull + n lam I) c - [y; 0]]``, W = diag(1 (n), kappa (N - n)).
    With ``c = S z`` (S = W^(1/2)): ``dz/dt = -(1/n)(A z - [y; 0])``,
    ``A = S Kfull S + n lam I = Q diag(e) Q^T``, so::

        z(t) = z* + Q diag(exp(-e t / n)) Q^T (z0 - z*),   z* = A^-1 [y; 0]

    Returns c(t), ``(T, N)`` float64 (numpy; one ``eigh`` of the N x N A).
    """
    kappa = _validate.scalar("kappa", kappa)
    if kappa <= 0:
        raise ValueError(f"`kappa` must be > 0 (S^-1 is used), got {kappa}; at kappa = 0 "
                         "use ntk_poison.flow.kernel_flow.")
    Kf = np.asarray(Kfull, np.float64)
    N = len(Kf)
    sw = np.r_[np.ones(n), np.full(N - n, np.sqrt(kappa))]
    A = sw[:, None] * Kf * sw[None] + n * ridge * np.eye(N)
    e, Q = np.linalg.eigh(0.5 * (A + A.T))
    ybar = np.r_[np.asarray(y, np.float64), np.zeros(N - n)]
    zs = Q @ ((Q.T @ ybar) / e)
    d0 = Q.T @ (np.asarray(c0, np.float64) / sw - zs)
    t = np.asarray(times, np.float64)
    z = zs[None] + (np.exp(-np.outer(t, e) / n) * d0[None]) @ Q.T
    return z * sw[None]


def mode_decay(H: np.ndarray, delta0: np.ndarray, v: np.ndarray, rate: float,
               times: Any) -> dict:
    """The eigen-statement and the naive comparison for the linear flow
    ``d delta/dt = -H delta`` from ``delta0``.

    Args:
      H: the symmetric positive-definite flow matrix ``(r, r)``.
      delta0: the initial displacement ``theta(0) - theta*`` ``(r,)``.
      v: the poison-aligned direction (normalised here).
      rate: the naive rate ``kappa a`` (``a = v^ G v^``).
      times: ``(T,)``.

    Returns a dict: ``h`` (ascending eigenvalues), ``W`` (eigenvectors, columns),
    ``E0`` (``(w_j . delta0)^2``), ``energies`` ``(T, r) = E0 exp(-2 h t)`` (the
    theorem), ``E_v`` (``(v^ . delta(t))^2``), ``naive`` (``E_v(0) exp(-2 rate t)``),
    ``max_ratio`` (max over t > 0 of E_v / naive), ``first_exceeds`` (first t where
    E_v > naive, or None), ``slow_fraction`` (``sum_{h_j < rate} (w_j . v^)^2``: the
    fraction of the energy of the poison direction's component ``(v^.delta0) v^``
    on modes slower than kappa a) and ``slow_displacement_fraction``
    (``sum_{h_j < rate} c_j^2 / sum c_j^2``, ``c_j = (w_j.v^)(w_j.delta0)``: the
    same for the mode-wise terms of ``v^ . delta0``).
    """
    H = np.asarray(H, np.float64)
    h, W = np.linalg.eigh(0.5 * (H + H.T))
    if h[0] <= 0:
        raise ValueError(f"`H` must be positive definite (smallest eigenvalue {h[0]:.3g}); "
                         "add a ridge lam > 0.")
    t = np.asarray(times, np.float64)
    vh = np.asarray(v, np.float64) / np.linalg.norm(v)
    d0 = W.T @ np.asarray(delta0, np.float64)
    dv = W.T @ vh
    decay = np.exp(-np.outer(t, h))
    E_v = ((decay * (dv * d0)[None]).sum(1)) ** 2
    naive = E_v[0] * np.exp(-2.0 * rate * t)
    ratio = E_v[1:] / np.maximum(naive[1:], 1e-300)
    over = np.flatnonzero(E_v[1:] > naive[1:] * (1 + 1e-9))
    cj2 = (dv * d0) ** 2
    slow = h < rate
    return dict(h=h, W=W, E0=d0 ** 2, energies=d0[None] ** 2 * decay ** 2, E_v=E_v,
                naive=naive, max_ratio=float(ratio.max()) if ratio.size else float("nan"),
                first_exceeds=None if over.size == 0 else float(t[1 + over[0]]),
                slow_fraction=float(np.sum(dv[slow] ** 2)),
                slow_displacement_fraction=float(cj2[slow].sum() / max(cj2.sum(), 1e-300)))


def mode_energy_error(W: np.ndarray, predicted: np.ndarray, deltas: np.ndarray,
                      floor: float = 1e-10) -> Tuple[float, int]:
    """Largest relative error of measured mode energies ``(w_j . delta(t))^2`` against
    ``predicted`` ``(T, r)``, over entries with ``predicted >= floor * sum_j E_j(0)``
    (below it the energy is at rounding level). Returns (error, entries compared)."""
    meas = (np.asarray(deltas, np.float64) @ W) ** 2
    sel = predicted >= floor * predicted[0].sum()
    err = np.abs(meas[sel] - predicted[sel]) / predicted[sel]
    return (float(err.max()) if err.size else float("nan")), int(sel.sum())
