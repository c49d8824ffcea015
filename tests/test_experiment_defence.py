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


def _half(x, rel):
    """The first kappa where rel <= 1/2, linear in log kappa (kappa = 0 drawn a decade
    below the smallest positive kappa); None if never."""
    i = int(np.argmax(rel <= 0.5))
    if rel[i] > 0.5:
        return None
    if i == 0:
        return float(x[0])
    lx = np.log(np.maximum(x, x[1] / 10.0))
    return float(np.exp(lx[i - 1] + (0.5 - rel[i - 1]) / (rel[i] - rel[i - 1])
                        * (lx[i] - lx[i - 1])))


@pytest.mark.slow
def test_tiny_kernel_part_against_independent_refits(tmp_path):
    """Items 1-5 and the new measures end to end (widths=() skips the nets), each
    number checked against separate fits by penalized.fit_penalized at every kappa
    (not the sweep the experiment uses) and numpy: the frontier (ASR, trigger-alone
    ASR, clean accuracy, margin ratio, collapse), near_clones' efficacy and kappa_half,
    the distance sweep (zeta's distance to the clean data, efficacy, kappa_half) and
    the near-clean-image frontier."""
    cfg = defence.Config(**dict(TINY, widths=(), loss_kappas=(0.1,),
                                distance_over_l=(0.03, 1.5), distance_bases=1))
    rep = defence.run(cfg, tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    names = [c.name for c in rep.claims]
    for name in ("capacity: degrees of freedom", "contraction (RBF)",
                 "which poisons the penalty reaches"):
        assert name in names
    assert any(n.startswith("frontier (output penalty + jitter") for n in names)
    assert any(n.startswith("frontier (output penalty, near-clean-image") for n in names)
    assert any(n.startswith("frontier (output penalty + crop + flip") for n in names)
    prep = defence.prepare(cfg)
    ell, lam, m = prep.ell, cfg.ridge, cfg.m
    kappas = np.r_[0.0, cfg.kappas] * ell ** 2
    k = kernels.rbf(ell)
    N, n = len(prep.X), len(prep.Xp)
    lam_c = lam * n / N
    clean = [penalized.fit_penalized(k, prep.X, prep.y, lam_c, kap) for kap in kappas]
    pois = [penalized.fit_penalized(k, prep.Xp, prep.yp, lam, kap) for kap in kappas]
    # the frontier
    fr = res["frontier"]
    chance = max(np.mean(prep.yte > 0), np.mean(prep.yte < 0))
    for i in range(len(kappas)):
        fp = np.asarray(pois[i].predict(prep.Xtrig))
        fc = np.asarray(clean[i].predict(prep.Xtrig))
        acc = np.mean(np.sign(np.asarray(pois[i].predict(prep.Xte))) == prep.yte)
        assert fr["asr"][i] == pytest.approx(np.mean(fp > 0), abs=1e-12)
        assert fr["asr_clean_model"][i] == pytest.approx(np.mean(fc > 0), abs=1e-12)
        assert fr["clean_acc"][i] == pytest.approx(acc, abs=1e-12)
        assert fr["margin_ratio"][i] == pytest.approx(np.median((fp - fc) / np.abs(fc)),
                                                      rel=1e-6)
        assert fr["efficacy"][i] == pytest.approx(np.mean(fp - fc), rel=1e-6, abs=1e-10)
        assert fr["collapsed"][i] == bool(acc <= chance + 0.05)
    # near clones: Delta f(zeta + r e) over the experiment's random unit e
    nc = res["near_clones"]
    E = np.random.default_rng(cfg.seed + 3).standard_normal((cfg.n_directions, cfg.dim))
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    x = kappas / ell ** 2
    for j, r in enumerate(cfg.r_over_l):
        pts = prep.zeta[None] + r * ell * E
        eff = np.array([np.mean(np.asarray(p.predict(pts)) - np.asarray(c.predict(pts)))
                        for p, c in zip(pois, clean)])
        np.testing.assert_allclose(np.asarray(nc["efficacy"])[:, j], eff, rtol=1e-6)
        h = _half(x, eff / eff[0])
        assert (nc["kappa_half"][j] is None) == (h is None)
        if h is not None:
            assert nc["kappa_half"][j] == pytest.approx(h, rel=1e-6)
    # the distance sweep: zeta at distance D from the clean data, then refits
    ds = res["distance_sweep"]
    base = ds["base_index"][0]
    for j, D in enumerate(cfg.distance_over_l):
        zeta = prep.X[base] + ds["trigger_norm_over_l"][0][j] * ell * prep.trigger_direction
        assert np.min(np.linalg.norm(prep.X - zeta, axis=1)) == pytest.approx(D * ell,
                                                                              rel=1e-9)
        Xp = np.vstack([prep.X, np.repeat(zeta[None], m, 0)])
        yp = np.r_[prep.y, np.full(m, cfg.y_target)]
        eff = np.array([float(penalized.fit_penalized(k, Xp, yp, lam, kap).predict(
            zeta[None])[0]) - float(c.predict(zeta[None])[0]) for kap, c in zip(kappas, clean)])
        np.testing.assert_allclose(np.asarray(ds["efficacy"])[0, j], eff, rtol=1e-6)
        h = _half(x, eff / eff[0])
        assert (ds["kappa_half"][0][j] is None) == (h is None)
        if h is not None:
            assert ds["kappa_half"][0][j] == pytest.approx(h, rel=1e-6)
    # the near-clean-image frontier: m triggered clean non-target images, label +1
    nf = res["frontier_near_clean"]
    trig = prep.x0 - prep.sc.x0_clean
    P = prep.X[nf["base_index"]] + trig[None]
    assert np.all(prep.y[nf["base_index"]] != cfg.y_target)
    Xn, yn = np.vstack([prep.X, P]), np.r_[prep.y, np.full(m, cfg.y_target)]
    for i in (0, len(kappas) - 1):
        fp = np.asarray(penalized.fit_penalized(k, Xn, yn, lam, kappas[i]).predict(prep.Xtrig))
        fc = np.asarray(clean[i].predict(prep.Xtrig))
        assert nf["asr"][i] == pytest.approx(np.mean(fp > 0), abs=1e-12)
        assert nf["margin_ratio"][i] == pytest.approx(np.median((fp - fc) / np.abs(fc)),
                                                      rel=1e-6)
    # the crop + flip arm: its first rows are the un-augmented poisoned and clean sets
    Xa, ya, Xca, yca = prep.crop_flip
    np.testing.assert_allclose(Xa[:n], prep.Xp, atol=1e-10)
    np.testing.assert_allclose(Xca[:N], prep.X, atol=1e-10)
    assert len(Xa) == 2 * n and np.all(ya[n:] == prep.yp) and np.all(yca[N:] == prep.y)
    assert not np.allclose(Xa[n:], prep.Xp)
    fp = np.asarray(penalized.fit_penalized(k, Xa, ya, lam, kappas[0]).predict(prep.Xtrig))
    fc = np.asarray(penalized.fit_penalized(k, Xca, yca, lam * len(Xa) / len(Xca),
                                            kappas[0]).predict(prep.Xtrig))
    cf = res["frontier_crop_flip"]
    assert cf["asr"][0] == pytest.approx(np.mean(fp > 0), abs=1e-12)
    assert cf["asr_clean_model"][0] == pytest.approx(np.mean(fc > 0), abs=1e-12)
    # the exact-model capacity claim is a theorem: dof strictly decreases
    assert np.all(np.diff(res["capacity"]["dof"]) < 0)


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
