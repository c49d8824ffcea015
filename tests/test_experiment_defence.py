"""The defence experiment: a measurement against an independent oracle, and a tiny
end-to-end run (sklearn digits). Its library pieces (pca_reduction, contraction,
functional coefficients, crossings) are tested in test_data, test_flow and test_metrics."""

import json
import types

import numpy as np
import pytest

from experiments import defence
from experiments.defence import filter as filter_part
from ntk_poison import continuum, kernels, penalized


def _problem(rng, n=14, d=3, ell=1.3):
    X = rng.standard_normal((n, d))
    y = np.sign(X[:, 0] + 0.3 * rng.standard_normal(n))
    return kernels.rbf(ell), X, y


def _clone_sweeps(X, y, zeta, m, k, lam, kappas):
    Xp, yp = np.vstack([X, np.repeat(zeta[None], m, 0)]), np.r_[y, np.ones(m)]
    sp = penalized.fit_penalized_sweep(k, Xp, yp, lam, kappas)
    sc = penalized.fit_penalized_sweep(k, X, y, lam * len(Xp) / len(X), kappas)
    return sp, sc


def test_high_pass_of_an_isolated_rbf_bump_is_its_length_scale_at_every_kappa(rng):
    """One clone cluster far (12 l) from the clean data: Delta f is an RBF bump of width
    l whose gradient vanishes at its centre, so the penalty cannot touch it (THEORY.md
    section 3): the peak-curvature l_eff^2 / l^2 is 1 in every subspace at kappa = 0
    AND at kappa > 0 (closed form; the clean data's coupling is exp(-72))."""
    d, ell, lam = 4, 1.0, 0.05
    X = rng.standard_normal((12, d))
    y = np.sign(X[:, 0])
    zeta = np.r_[12.0, np.zeros(d - 1)]
    k = kernels.rbf(ell)
    kappas = np.array([0.0, 0.1, 10.0])
    sp, sc = _clone_sweeps(X, y, zeta, 3, k, lam, kappas)
    cfg = defence.Config(dim=d, n_filter_dirs=2)
    prep = types.SimpleNamespace(zeta=zeta, X=X, ell=ell)
    hp = defence.high_pass(sp, sc, prep, cfg, kappas)
    for name in ("isotropic", "along", "orthogonal"):
        np.testing.assert_allclose(hp[f"leff2_{name}"], 1.0, atol=1e-8)


def _second_difference(f, x, e, h):
    pts = np.stack([x - h * e, x, x + h * e])
    v = np.asarray(f(pts))                               # (T, 3)
    return (v[:, 0] - 2 * v[:, 1] + v[:, 2]) / h ** 2


def test_high_pass_widths_match_finite_differences_at_positive_kappa(rng):
    """l_eff^2(E) = -Delta f(zeta) |E| / tr(E^T hess Delta f E) with clean data near
    zeta and kappa > 0: the autodiff Hessian against central second differences of
    Delta f, along the coordinate axes (isotropic) and along the top / bottom two
    eigenvectors of the clean data's gradient covariance (itself from central first
    differences of f_clean). (The previous test's shapes: one compile.)"""
    d, ell, lam, h, q = 4, 1.0, 0.02, 1e-3, 2
    X = rng.standard_normal((12, d))
    y = np.sign(X[:, 0] + 0.3 * rng.standard_normal(12))
    near = np.flatnonzero(y < 0)[0]                       # an opposite-label clean point
    zeta = X[near] + 0.4 * ell * rng.standard_normal(d) / np.sqrt(d)
    k = kernels.rbf(ell)
    kappas = np.array([0.0, 0.05, 0.5]) * ell ** 2
    sp, sc = _clone_sweeps(X, y, zeta, 3, k, lam, kappas)
    cfg = defence.Config(dim=d, n_filter_dirs=q)
    hp = defence.high_pass(sp, sc, types.SimpleNamespace(zeta=zeta, X=X, ell=ell), cfg,
                           kappas)
    delta = lambda pts: np.asarray(sp.predict(pts)) - np.asarray(sc.predict(pts))  # noqa: E731
    df0 = delta(zeta[None])[:, 0]
    f0 = lambda pts: np.asarray(sc.at(0).predict(pts))  # noqa: E731
    G = np.stack([(f0(X + h * e) - f0(X - h * e)) / (2 * h) for e in np.eye(d)], 1)
    _, V = np.linalg.eigh(G.T @ G / len(G))
    for name, E in (("isotropic", np.eye(d)), ("along", V[:, -q:]), ("orthogonal", V[:, :q])):
        tr = sum(_second_difference(delta, zeta, e, h * ell) for e in E.T)
        assert np.all(tr < 0)                                # a peak at every kappa
        np.testing.assert_allclose(hp[f"leff2_{name}"], -df0 * E.shape[1] / tr / ell ** 2,
                                   rtol=1e-5)
    assert np.ptp(hp["leff2_isotropic"]) > 1e-3               # kappa acts


FILTER_TINY = dict(filter_densities=(4.0,), filter_gaps=(0.0, 1.5), filter_kappas=(0.3,),
                   filter_window=7.0)


def test_gap_study_at_zero_gap_is_the_continuum_at_positive_kappa():
    """The 1-D study's exact minimiser on a uniform grid (g = 0) against the continuum
    oracle (ntk_poison.continuum, quadrature of the transfer function): l_eff^2 at
    kappa > 0 and c = d l_eff^2 / d kappa at 0, to 1e-3; the gap's clean grid has no
    point closer than g to zeta."""
    cfg = defence.Config(m=4, **FILTER_TINY)                 # TINY's shapes: one compile
    st = filter_part.gap_study(cfg)
    k, p, nl = kernels.rbf(1.0), 4.0, cfg.filter_ridge
    kx = st["kappa_over_l2"]
    assert list(kx[3:]) == [0.3]
    assert st["leff2"][0, 0, 3] == pytest.approx(continuum.peak_width2(k, p, nl, 0.3), rel=1e-3)
    assert st["leff2"][0, 0, 0] == pytest.approx(continuum.peak_width2(k, p, nl, 0.0), rel=1e-3)
    assert st["c"][0, 0] == pytest.approx(continuum.width_slope(k, p, nl), rel=1e-3)
    assert max(max(v) for v in st["continuum_rel_err"].values()) <= 1e-3
    x = filter_part.clean_grid(4.0, 1.5, 7.0)
    assert np.abs(x).min() == pytest.approx(1.5) and np.allclose(np.diff(x[x > 0]), 0.25)


def test_config_rejects_bad_values():
    for bad in (dict(dim=1), dict(kappas=(1.0, 0.1)), dict(ridge=-1.0), dict(widths=(0,)),
                dict(n_filter_dirs=7), dict(poison="other"), dict(net_kappas=(0.0,))):
        with pytest.raises(ValueError):
            defence.Config(**bad)


def test_filter_config_rejects_bad_values():
    for bad in (dict(filter_gaps=()), dict(filter_gaps=(1.0, -0.5)),
                dict(filter_densities=(0.0,)), dict(filter_ridge=0.0),
                dict(filter_kappas=())):
        with pytest.raises(ValueError, match="filter_"):
            defence.Config(**bad)


TINY = dict(dataset="digits", n_train=30, n_test=60, n_trigger=40, dim=4, m=4,
            n_filter_dirs=1, kappas=(0.01, 0.1, 1.0, 10.0), contraction_kappas=(0.3,),
            n_times=8, widths=(32, 128), net_kappas=(0.1,), net_time=10.0, net_seeds=1,
            loss_kappas=(0.1, 1.0),
            augment_copies=1, r_over_l=(0.01, 1.0), n_directions=3, max_steps=2000,
            **FILTER_TINY)


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
