"""experiments/defence.py: its measurement pieces against independent oracles, and a
tiny end-to-end run (sklearn digits)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from experiments import defence
from ntk_poison import flow, kernels, penalized


def _problem(rng, n=14, d=3, ell=1.3):
    X = rng.standard_normal((n, d))
    y = np.sign(X[:, 0] + 0.3 * rng.standard_normal(n))
    return kernels.rbf(ell), X, y


def test_reduction_keeps_the_additive_trigger_exactly(rng):
    X = rng.standard_normal((40, 30))
    p = rng.standard_normal(30)
    red = defence.reduction(X, p, 5)
    Z = red(X)
    assert Z.shape == (40, 5)
    np.testing.assert_allclose(np.mean((Z ** 2).sum(1)), 5.0, rtol=1e-12)
    # the trigger moves every input by the same vector, of norm |p| x scale
    shift = red(X + 0.7 * p) - Z
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-12)
    s = np.sqrt(5.0 / np.mean(((X - X.mean(0)) @ _basis(X, p, 5).T) ** 2 @ np.ones(5)))
    np.testing.assert_allclose(np.linalg.norm(shift[0]), 0.7 * np.linalg.norm(p) * s, rtol=1e-10)
    with pytest.raises(ValueError, match="span"):
        defence.reduction(X, np.linalg.svd(X - X.mean(0))[2][0], 5)


def _basis(X, p, dim):
    """numpy oracle of the reduction's orthonormal basis (PCs, then the trigger)."""
    _, _, Vt = np.linalg.svd(X - X.mean(0), full_matrices=False)
    Q, _ = np.linalg.qr(np.vstack([Vt[:dim - 1], p]).T)
    return Q.T


def test_functional_coefficients_give_the_directional_derivative(rng):
    k, X, y = _problem(rng)
    model = penalized.fit_penalized(k, X, y, 0.05, 0.2)
    x0, u = rng.standard_normal(3), rng.standard_normal(3)
    u /= np.linalg.norm(u)
    b, c = defence.functional_coefficients(model, x0, u)
    h = 1e-5
    fd = (float(model.predict((x0 + h * u)[None])[0])
          - float(model.predict((x0 - h * u)[None])[0])) / (2 * h)
    np.testing.assert_allclose(b @ c, fd, rtol=1e-7)


@pytest.mark.parametrize("kappa", [0.05, 0.6])
def test_contraction_matches_the_c_space_flow_by_expm(kappa, rng):
    """The theta-space flow against an independent c-space solution with scipy expm:
    dc/dt = -(1/n) [(W Kfull + n lam I) c - [y; 0]] (flow's module docstring), from the
    kappa = 0 minimiser; and its limit is fit_penalized's."""
    k, X, y = _problem(rng)
    n, d, lam = len(X), X.shape[1], 0.05
    m0 = penalized.fit_penalized(k, X, y, lam, 0.0)
    x0, u = rng.standard_normal(d), rng.standard_normal(d)
    u /= np.linalg.norm(u)
    b, c0 = defence.functional_coefficients(m0, x0, u)
    Kf, U, s = defence.joint_coordinates(k, X)
    times = np.array([0.0, 0.3, 2.0, 10.0, 1e5])
    r = defence.contraction(U, s, n, y, lam, kappa, b, c0, times)
    W = np.r_[np.ones(n), np.full(n * d, kappa)]
    M = W[:, None] * Kf + n * lam * np.eye(len(W))
    ybar = np.r_[y, np.zeros(n * d)]
    cs = np.linalg.solve(M, ybar)
    g_ref = [b @ (cs + scipy.linalg.expm(-M * t / n) @ (c0 - cs)) for t in times]
    np.testing.assert_allclose(r["g"], g_ref, rtol=1e-7, atol=1e-9)
    g_fit = u @ np.asarray(penalized.fit_penalized(k, X, y, lam, kappa).input_grad(x0[None]))[0]
    np.testing.assert_allclose(r["g_inf"], g_fit, rtol=1e-7)
    np.testing.assert_allclose(r["g"][-1], g_fit, rtol=1e-7)
    # the curvature a is the Rayleigh quotient of the penalty block along v (definition)
    Phi = U * np.sqrt(s)
    v = (U.T @ b) / np.sqrt(s)
    vh = v / np.linalg.norm(v)
    assert r["a"] == pytest.approx(np.sum((Phi[n:] @ vh) ** 2) / n, rel=1e-10)


def test_high_pass_of_an_isolated_rbf_bump_is_its_length_scale(rng):
    """One clone cluster far (12 l) from the clean data: Delta f is an RBF bump of
    width l, so the peak-curvature l_eff^2 / l^2 is 1 in every subspace at kappa = 0."""
    d, ell, lam = 4, 1.0, 0.05
    X = rng.standard_normal((12, d))
    y = np.sign(X[:, 0])
    zeta = np.r_[12.0, np.zeros(d - 1)]
    m = 3
    Xp, yp = np.vstack([X, np.repeat(zeta[None], m, 0)]), np.r_[y, np.ones(m)]
    k = kernels.rbf(ell)
    kappas = np.array([0.0, 0.1])
    sp, sc = defence._sweeps(k, Xp, yp, X, y, lam, kappas)
    cfg = defence.Config(dim=d, n_filter_dirs=2)
    prep = dict(zeta=zeta, X=X, ell=ell)
    hp = defence.high_pass(sp, sc, prep, cfg, kappas)
    for name in ("isotropic", "along", "orthogonal"):
        assert hp[f"leff2_{name}"][0] == pytest.approx(1.0, abs=1e-8)


def test_fit_growth_and_kappa_half_on_known_curves():
    x = np.array([0.0, 0.1, 0.3, 1.0, 3.0, 10.0])
    f = defence._fit_growth(x, 0.8 + 0.25 * x, growth_max=10.0)
    assert f["c"] == pytest.approx(0.25, rel=1e-12) and f["rel_rms"] < 1e-12
    f = defence._fit_growth(x, 0.8 + 0.25 * x, growth_max=0.5)     # 0.8 -> <= 1.2: x <= 1.6
    assert f["n_points"] == 4 and f["kappa_max"] == 1.0
    rel = np.array([1.0, 0.9, 0.7, 0.5, 0.2, 0.1])
    assert defence.kappa_half(x, rel) == pytest.approx(1.0)
    rel = np.array([1.0, 0.9, 0.8, 0.6, 0.4, 0.1])                  # between 1 and 3, in log
    assert defence.kappa_half(x, rel) == pytest.approx(np.exp(0.5 * np.log(3.0)), rel=1e-12)
    assert defence.kappa_half(x, np.ones(6)) is None


def test_config_rejects_bad_values():
    for bad in (dict(dim=1), dict(kappas=(1.0, 0.1)), dict(ridge=-1.0), dict(widths=(0,)),
                dict(n_filter_dirs=7), dict(poison="other"), dict(net_kappas=(0.0,))):
        with pytest.raises(ValueError):
            defence.Config(**bad)


TINY = dict(dataset="digits", n_train=30, n_test=60, n_trigger=40, dim=4, m=4,
            n_filter_dirs=1, kappas=(0.01, 0.1, 1.0, 10.0), contraction_kappas=(0.3,),
            n_times=8, widths=(32, 128), net_kappas=(0.1,), net_time=10.0, net_seeds=1,
            loss_kappas=(0.1, 1.0),
            augment_copies=1, r_over_l=(0.01, 1.0), n_directions=3, max_steps=2000)


def test_tiny_kernel_part_end_to_end(tmp_path):
    """Items 1-5 (widths=() skips the nets)."""
    cfg = defence.Config(**dict(TINY, widths=()))
    rep = defence.run(cfg, tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    for f in ("capacity.png", "contraction.png", "high_pass.png", "near_clones.png",
              "frontier.png", "report.md"):
        assert (tmp_path / f).stat().st_size > 0
    names = [c.name for c in rep.claims]
    assert "capacity: degrees of freedom" in names
    assert any(n.startswith("frontier (output penalty + jitter") for n in names)
    assert any(n.startswith("frontier (loss penalty") for n in names)
    assert "skipped" in (tmp_path / "report.md").read_text()
    # the exact-model capacity claim is a theorem (module docstring of flow): it must hold
    dof = np.asarray(res["results"]["capacity"]["dof"])
    assert np.all(np.diff(dof) < 0)
    fr = res["results"]["frontier"]
    assert all(0 <= a <= 1 for a in fr["asr"] + fr["clean_acc"])
    # the contraction curves start at E(0) and are positive
    for r in res["results"]["contraction"]["runs"]:
        assert r["energy"][0] == pytest.approx(r["bound"][0]) and min(r["energy"]) >= 0


@pytest.mark.slow
def test_tiny_end_to_end_with_nets(tmp_path):
    cfg = defence.Config(**TINY)
    rep = defence.run(cfg, tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "nets.png").stat().st_size > 0
    names = [c.name for c in rep.claims]
    assert "finite width: capacity falls" in names
    nets = res["results"]["nets"]
    # the erf kernel at T is the library's kernel_flow: its u.grad f(x0) by finite
    # differences matches autodiff (independent paths through the same model)
    np.testing.assert_allclose(nets["kernel"]["g_x0"], nets["kernel"]["g_x0_exact"], rtol=1e-5)
    gaps = [r["gap"] for rows in nets["runs"].values() for r in rows]
    assert np.all(np.isfinite(np.concatenate(gaps)))
    # same config and seed, same numbers
    rep2 = defence.run(cfg, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "results.json").read_text())["results"]
    for part, key in (("capacity", "residual"), ("frontier", "efficacy"),
                      ("frontier_loss", "asr")):
        np.testing.assert_array_equal(again[part][key], res["results"][part][key])
    np.testing.assert_array_equal(again["nets"]["runs"]["32"][0]["gap"],
                                  nets["runs"]["32"][0]["gap"])
    assert [c.supported for c in rep2.claims] == [c.supported for c in rep.claims]
