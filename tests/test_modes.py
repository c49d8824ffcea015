"""Tests for ntk_poison.modes: the eigen-statement of the penalised flow (THEORY.md
section 3, corrected) against scipy's matrix exponential, and a counterexample to the
naive bound.

Oracles: ``scipy.linalg.expm`` of the c-space flow matrix applied to ``c(0) - c*``
(independent of the theta coordinates and of H), the closed-form RBF joint Gram
(tests/oracles/rbf_joint.py) and ``scipy.linalg.eigh``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from ntk_poison import flow, joint, kernels, modes
from oracles.rbf_joint import rbf_joint_gram


def _c_space_expm(Kf, n, y, lam, kappa, c0, times):
    """c(t) = c* + expm(-M t / n)(c0 - c*), M = W Kfull + n lam I (the kernel flow)."""
    N = len(Kf)
    W = np.r_[np.ones(n), np.full(N - n, kappa)]
    M = W[:, None] * Kf + n * lam * np.eye(N)
    cs = np.linalg.solve(M, np.r_[y, np.zeros(N - n)])
    return np.stack([cs + scipy.linalg.expm(-M * t / n) @ (c0 - cs) for t in times]), cs


@pytest.mark.parametrize("kappa", [0.05, 0.8])
def test_mode_energies_decay_as_exp_minus_2ht_against_expm(kappa, rng):
    """Along each eigenvector w_j of H the flow's energy is E_j(0) exp(-2 h_j t): the
    c-space flow by expm, mapped to theta and projected on scipy's eigenvectors of an
    independently assembled H."""
    n, d, ell, lam = 6, 2, 1.1, 0.05
    X = rng.standard_normal((n, d))
    y = np.sign(X[:, 0]) + 0.1 * rng.standard_normal(n)
    Kf = rbf_joint_gram(X, ell)
    np.testing.assert_allclose(np.asarray(joint.joint_gram(kernels.rbf(ell), X)), Kf,
                               atol=1e-12)
    _, U, s = flow.joint_coordinates(kernels.rbf(ell), X)
    c0 = rng.standard_normal(len(Kf))
    times = np.array([0.0, 0.2, 1.5, 6.0, 20.0])
    cs_t, cs = _c_space_expm(Kf, n, y, lam, kappa, c0, times)
    theta = (cs_t @ U) * np.sqrt(s)
    theta_star = (cs @ U) * np.sqrt(s)
    # H assembled independently: Phi^T W Phi / n + lam I, Phi = U s^(1/2)
    Phi = U * np.sqrt(s)
    Wt = np.r_[np.ones(n), np.full(len(Kf) - n, kappa)]
    H_ref = Phi.T @ (Wt[:, None] * Phi) / n + lam * np.eye(len(s))
    H, G, _ = modes.flow_matrix(U, s, n, lam, kappa)
    np.testing.assert_allclose(H, H_ref, atol=1e-12)
    h_ref, W_ref = scipy.linalg.eigh(H_ref)
    assert np.min(np.diff(h_ref)) > 1e-6            # simple spectrum: modes comparable
    v = rng.standard_normal(len(s))
    md = modes.mode_decay(H, theta[0] - theta_star, v, kappa * 0.3, times)
    E_ref = ((theta - theta_star) @ W_ref) ** 2    # measured energies per mode
    np.testing.assert_allclose(md["h"], h_ref, rtol=1e-10)
    np.testing.assert_allclose(md["energies"], E_ref, rtol=1e-7, atol=1e-14 * E_ref[0].sum())
    # ... and they are E_j(0) exp(-2 h_j t) (the theorem, checked on the expm flow)
    np.testing.assert_allclose(E_ref, E_ref[0] * np.exp(-2 * np.outer(times, h_ref)),
                               rtol=1e-7, atol=1e-14 * E_ref[0].sum())
    vh = v / np.linalg.norm(v)
    np.testing.assert_allclose(md["E_v"], ((theta - theta_star) @ vh) ** 2, rtol=1e-8)
    err, count = modes.mode_energy_error(md["W"], md["energies"], theta - theta_star)
    assert err < 1e-7 and count > len(s)
    # the c-space flow of modes.flow_from (eigh of S Kfull S + n lam I) is the expm flow
    np.testing.assert_allclose(modes.flow_from(Kf, n, y, lam, kappa, c0, times), cs_t,
                               rtol=1e-8, atol=1e-10 * np.abs(cs_t).max())
    np.testing.assert_allclose(modes.theta_of(U, s, cs_t), theta, atol=1e-10)


def _two_mode_problem(g, lam=0.01):
    """kappa = 1, G = w w^T with w = (1, g), so v = e1 has a = v^T G v = 1; D = 0."""
    G = np.array([[1.0, g], [g, g * g]])
    return G + lam * np.eye(2), G


def test_naive_bound_is_broken_by_a_two_mode_counterexample():
    """THEORY.md: a 2x2 problem with v^T G v = 1 where E_v/(E_v(0) exp(-2 kappa a t)) = 3
    at kappa a t = 4. v = e1 overlaps a slow eigenvector of H (eigenvalue lam), so E_v
    decays at the slow rate while the naive curve decays at kappa a = 1; the
    eigenvector energies still follow exp(-2 h t) exactly (oracle: expm)."""
    e1 = np.array([1.0, 0.0])

    def ratio(g, t=4.0):
        H, _ = _two_mode_problem(g)
        return (e1 @ scipy.linalg.expm(-H * t) @ e1) ** 2 / np.exp(-2 * t)

    g = scipy.optimize.brentq(lambda g: ratio(g) - 3.0, 1e-3, 1.0, xtol=1e-15)
    H, G = _two_mode_problem(g)
    a = e1 @ G @ e1
    assert a == pytest.approx(1.0, abs=1e-15)
    times = np.array([0.0, 1.0, 4.0, 10.0])
    md = modes.mode_decay(H, e1, e1, 1.0 * a, times)
    E_ref = np.array([(e1 @ scipy.linalg.expm(-H * t) @ e1) ** 2 for t in times])
    np.testing.assert_allclose(md["E_v"], E_ref, rtol=1e-10)
    assert md["E_v"][2] / md["naive"][2] == pytest.approx(3.0, rel=1e-8)
    assert md["max_ratio"] >= 3.0 and md["first_exceeds"] is not None
    assert md["first_exceeds"] <= 4.0
    # the true statement holds along H's eigenvectors
    h_ref, W_ref = scipy.linalg.eigh(H)
    E_modes = np.array([(W_ref.T @ scipy.linalg.expm(-H * t) @ e1) ** 2 for t in times])
    np.testing.assert_allclose(md["energies"], E_modes, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(E_modes, E_modes[0] * np.exp(-2 * np.outer(times, h_ref)),
                               rtol=1e-9)
    # the poison direction sits partly on the slow mode (h = lam < kappa a)
    assert md["slow_fraction"] == pytest.approx(W_ref[0, 0] ** 2, rel=1e-10)
    assert 0 < md["slow_fraction"] < 1


def test_bad_inputs_raise_value_errors(rng):
    with pytest.raises(ValueError, match="positive definite"):
        modes.mode_decay(np.diag([1.0, 0.0]), np.ones(2), np.ones(2), 1.0, [0.0, 1.0])
    Kf = rbf_joint_gram(rng.standard_normal((3, 2)), 1.0)
    with pytest.raises(ValueError, match="kappa"):
        modes.flow_from(Kf, 3, np.ones(3), 0.1, 0.0, np.zeros(len(Kf)), [0.0])
    with pytest.raises(ValueError, match="kappa"):
        modes.flow_matrix(np.eye(3), np.ones(3), 1, 0.1, -1.0)
