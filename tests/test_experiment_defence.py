"""The defence experiment: a measurement against an independent oracle, and a tiny
end-to-end run (sklearn digits). Its library pieces (pca_reduction, contraction,
functional coefficients, crossings) are tested in test_data, test_flow and test_metrics."""

import json
import types

import numpy as np
import pytest

from experiments import defence
from ntk_poison import kernels, penalized


def _problem(rng, n=14, d=3, ell=1.3):
    X = rng.standard_normal((n, d))
    y = np.sign(X[:, 0] + 0.3 * rng.standard_normal(n))
    return kernels.rbf(ell), X, y


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
    sp = penalized.fit_penalized_sweep(k, Xp, yp, lam, kappas)
    sc = penalized.fit_penalized_sweep(k, X, y, lam * len(Xp) / len(X), kappas)
    cfg = defence.Config(dim=d, n_filter_dirs=2)
    prep = types.SimpleNamespace(zeta=zeta, X=X, ell=ell)
    hp = defence.high_pass(sp, sc, prep, cfg, kappas)
    for name in ("isotropic", "along", "orthogonal"):
        assert hp[f"leff2_{name}"][0] == pytest.approx(1.0, abs=1e-8)


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
