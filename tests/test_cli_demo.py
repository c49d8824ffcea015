"""The CLI, config files and the demo experiment end to end (small, on sklearn digits)."""

import json
import pathlib

import numpy as np
import pytest

from experiments import demo
from ntk_poison import cli

SMALL = dict(dataset="digits", n_train=150, n_test=100, n_trigger=60, kernels=["rbf", "nt_fc"],
             m_max=200, n_m=12, refit_ms=[0, 3, 30], n_r=6, near_clone_m=20)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = demo.Config(**SMALL)
    rep = demo.run(cfg, out)
    return out, rep


def test_demo_writes_results_figures_and_report(small_run):
    out, rep = small_run
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["n_train"] == 150
    assert res["versions"]["jax"] and res["versions"]["neural-tangents"] == "0.6.5"
    for fig in ("efficacy.png", "spike.png", "near_clone.png", "asr.png", "ntk_floor.png"):
        data = (out / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (out / "report.md").read_text()
    assert "exact law" in md and "supported" in md
    names = [c["name"] for c in res["claims"]]
    assert "rbf: exact law" in names and "nt_fc: exact law" in names
    # The exact law matches refits (an independent computation) in every run.
    for name in ("rbf", "nt_fc"):
        e = res["results"]["kernels"][name]["efficacy"]
        np.testing.assert_allclose(e["refit"], e["exact_at_refit"], rtol=1e-8, atol=1e-10)
    # No temp files left behind by the atomic writes.
    assert not list(out.glob(".*.tmp"))


def test_demo_rbf_theory_claims_hold_in_tight_cluster_regime(small_run):
    out, _ = small_run
    res = json.loads((out / "results.json").read_text())
    e = res["results"]["kernels"]["rbf"]["efficacy"]
    df = np.array(e["delta_f"])
    ms = np.array(e["ms"])
    # The poison's spike is exactly R_k(kt) Delta f^2 (THEORY.md section 2, corrections):
    # its ratio to Delta f^2 against R_k(kt) from a separate Cholesky solve.
    pos = ms > 0
    ratio = np.array(e["spike_poison"])[pos] / df[pos] ** 2
    np.testing.assert_allclose(ratio, e["R_kt"], rtol=1e-12)
    d = e["R_kt_direct"]
    at = np.searchsorted(ms[pos], d["ms"])
    np.testing.assert_allclose(ratio[at], d["R_kt"], rtol=1e-8)
    # ... and the paper-law ratio is the product of its three factors (an identity)
    fac = e["law_factors"]
    np.testing.assert_allclose(np.array(fac["product"])[pos],
                               np.array(e["approx"])[pos] / df[pos], rtol=1e-10)
    nc = res["results"]["kernels"]["rbf"]["near_clone"]["3"]
    r = np.array(nc["r_over_l"])
    # The paper's term (m alpha)^2 |grad k0|^2 of the RBF kernel is (m alpha)^2 k0^2 r^2/l^4:
    # so for r << l (k0 ~ 1, m alpha ~ constant) it must scale exactly as r^2.
    near = r <= 0.1
    paper = np.array(nc["spike_paper"])[near]
    np.testing.assert_allclose(paper / r[near] ** 2, paper[0] / r[0] ** 2, rtol=0.05)
    # The exact spike is the paper's term plus a floor; it never falls below the floor.
    sp, fl = np.array(nc["spike_poison"]), np.array(nc["spike_floor"])
    assert np.all(sp >= 0.5 * fl)


def test_demo_ntk_floor_identities(small_run):
    """The ReLU NTK (b_std = 0) is homogeneous of degree 1: on the sphere its R_k is the
    raw R_k minus the radial term l^2/|x0|^2 at every r (floor.py), and the normalised
    kernel's equals the sphere's."""
    out, _ = small_run
    fl = json.loads((out / "results.json").read_text())["results"]["ntk_floor"]
    for sw in fl["points"].values():
        raw, sph = np.array(sw["relu_raw"]["R_k"]), np.array(sw["relu_sphere"]["R_k"])
        np.testing.assert_allclose(sph, raw - sw["radial_floor"], rtol=1e-6)
        np.testing.assert_allclose(np.array(sw["relu_normalized"]["R_k"]), sph, rtol=1e-5)
        np.testing.assert_allclose(sw["relu_raw"]["radial"], sw["radial_floor"], rtol=1e-8)


def test_demo_is_deterministic(tmp_path, small_run):
    out, _ = small_run
    cfg = demo.Config(**(SMALL | {"kernels": ["rbf"], "ntk_floor": False}))
    demo.run(cfg, tmp_path)
    a = json.loads((out / "results.json").read_text())["results"]["kernels"]["rbf"]
    b = json.loads((tmp_path / "results.json").read_text())["results"]["kernels"]["rbf"]
    def leaves(d, prefix=""):
        for key, val in d.items():
            if isinstance(val, dict):
                yield from leaves(val, prefix + key + "/")
            else:
                yield prefix + key, val

    for part in ("efficacy", "near_clone", "asr"):
        got = dict(leaves(b[part]))
        for key, val in leaves(a[part]):
            np.testing.assert_array_equal(np.array(val, dtype=float),
                                          np.array(got[key], dtype=float), err_msg=key)


def test_config_round_trip_and_validation(tmp_path):
    cfg = demo.Config(n_train=123, kernels=("rbf",))
    path = cfg.save(tmp_path / "c.json")
    assert demo.Config.load(path) == cfg
    with pytest.raises(ValueError, match="n_train"):
        demo.Config(n_train=0)
    with pytest.raises(ValueError, match="n_train"):
        demo.Config(n_train="many")
    with pytest.raises(ValueError, match="Unknown kernel"):
        demo.Config(kernels=("nope",))
    with pytest.raises(ValueError, match="Unknown config key"):
        demo.Config.from_dict({"n_trian": 5})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        demo.Config.load(tmp_path / "bad.json")
    assert cfg.with_overrides(["n_train=77", 'kernels=["nt_fc"]']).n_train == 77


def test_cli_list_config_and_errors(tmp_path, capsys):
    assert cli.main(["list"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["config", "demo", "--save", str(tmp_path / "d.json")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["n_train"] == 2000
    assert cli.main(["run", "nope", "--out", str(tmp_path)]) == 2
    assert "Unknown experiment" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path), "--set", "ridge=-1"]) == 2
    assert "ridge" in capsys.readouterr().err
