"""The lag and near_clone_invisible experiments end to end (tiny, on sklearn digits).

Each experiment runs once per module into a temporary directory (< 40 s each); the
tests then check the written files and a few properties from an independent angle:
AUROCs recomputed with scikit-learn from the stored scores, the merged refits
against the rank-one law, the Lanczos eigenvalue against a dense ``eigh``, the
closed-form flow against ``flow.kernel_flow``, the ASR against a fresh refit, and
determinism (same seed, identical numbers). Both also run in all-to-one mode
(``target_mode = all_to_one``), checked against independent multi-output refits.
The CNN kernel (``nt_cnn``) runs through
both experiments on 8x8 digits images, as ``(n, 8, 8, 1)`` inputs (the lag one is
marked slow: ``make test-slow``).
"""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from experiments import lag, near_clone_invisible as nci
from ntk_poison import scenario

LAG_SMALL = dict(dataset="digits", n_train=150, n_trigger=60, n_eval=8, n_cal=10,
                 kernels=["rbf"], m_max=60, n_m=3, n_t=3, flow_m=20, trigger_strength=3.0)
NC_SMALL = dict(dataset="digits", n_train=150, n_trigger=60, n_eval=8, n_cal=10,
                kernels=["rbf"], m=20, n_r=3, kpca_components=16)
CNN_DATA = dict(dataset="digits", n_train=60, cnn_n_train=60, cnn_pool=1, n_trigger=40,
                n_eval=6, n_cal=8, kernels=["nt_cnn"])      # n_train = cnn_n_train: m unscaled
LAG_CNN = dict(CNN_DATA, m_max=40, n_m=3, n_t=3, flow_m=10)
NC_CNN = dict(CNN_DATA, m=10, n_r=3, kpca_components=12)
PNG = b"\x89PNG\r\n\x1a\n"


def _leaves(d, prefix=""):
    if isinstance(d, dict):
        for key, val in d.items():
            yield from _leaves(val, prefix + str(key) + "/")
    elif isinstance(d, list) and any(isinstance(v, dict) for v in d):
        for i, val in enumerate(d):
            yield from _leaves(val, prefix + str(i) + "/")
    else:
        yield prefix, d


def _assert_same_numbers(a, b):
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    assert la.keys() == lb.keys()
    for key, val in la.items():
        if "seconds" in key:
            continue
        if isinstance(val, str) or val is None:
            assert val == lb[key], key
        else:
            np.testing.assert_array_equal(np.array(val, dtype=float),
                                          np.array(lb[key], dtype=float), err_msg=key)


# --------------------------------------------------------------------------- lag

@pytest.fixture(scope="module")
def lag_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lag")
    cfg = lag.Config(**LAG_SMALL)
    rep = lag.run(cfg, out)
    return out, rep, cfg


def test_lag_writes_results_figures_and_report(lag_run):
    out, rep, _ = lag_run
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["n_train"] == 150
    for fig in ("lag_m.png", "threshold_m.png", "lag_t.png", "threshold_t.png"):
        data = (out / fig).read_bytes()
        assert data[:8] == PNG and len(data) > 5000
    md = (out / "report.md").read_text()
    for name in ("rbf: lag in m", "rbf: lag in t", "rbf: visibility threshold in m"):
        assert name in md
    assert {c["name"] for c in res["claims"]} >= {"rbf: refits match the law",
                                                   "rbf: lag in m", "rbf: lag in t"}
    assert not list(out.glob(".*.tmp"))


def test_lag_auroc_equals_sklearn_on_stored_scores(lag_run):
    out, _, cfg = lag_run
    res = json.loads((out / "results.json").read_text())["results"]["kernels"]["rbf"]
    for sweep in ("m_sweep", "t_sweep"):
        s = res[sweep]
        st, sc = np.array(s["scores_trig"]), np.array(s["scores_clean"])
        assert st.shape[1] == sc.shape[1] == cfg.n_eval
        for i in range(st.shape[0]):
            truth = np.r_[np.ones(st.shape[1]), np.zeros(sc.shape[1])]
            want = roc_auc_score(truth, np.r_[st[i], sc[i]])
            assert s["auroc"][i] == pytest.approx(want, abs=1e-12), (sweep, i)


def test_lag_refits_law_dense_and_spike_regime(lag_run):
    out, _, cfg = lag_run
    res = json.loads((out / "results.json").read_text())["results"]
    s = res["kernels"]["rbf"]["m_sweep"]
    # merged dense refits == the rank-one law (two independent computations)
    np.testing.assert_allclose(s["refit_delta_f_x0"], s["delta_f_x0"], rtol=1e-8, atol=1e-10)
    # Lanczos top eigenvalue at x0 == dense eigh of the full d x d loss Hessian
    for c in s["dense_check"]:
        assert c["lanczos"] == pytest.approx(c["dense"], rel=1e-6)
    # R_k of the RBF kernel is exactly r^2 / l^4 (autodiff vs closed form)
    sc, _ = scenario.build_for_detection(cfg)
    r2 = float(np.sum((sc.x0 - sc.zeta) ** 2))
    assert s["R_k"] == pytest.approx(r2 / res["length_scale"] ** 4, rel=1e-10)
    # m = 0 is the clean model: ratio exactly 1 and no poison spike
    assert s["ratio"][0] == pytest.approx(1.0, rel=1e-9) and s["spike_x0"][0] == 0
    # spike regime (largest m, x0 far from the data): the top eigenvector of the loss
    # Hessian at x0 points along x0 - zeta, the RBF poison gradient's direction
    assert s["align_x0_zeta"][-1] > 0.9
    # the GN spike follows R_k Delta f^2 (THEORY.md) to within the kt/k0 correction
    df2 = np.array(s["delta_f_x0"][1:]) ** 2
    np.testing.assert_allclose(np.array(s["spike_x0"][1:]) / (s["R_k"] * df2), 1.0, atol=0.2)
    # the RBF kernel is smooth: the clean curvature at x0 is stable under tiny shifts
    sm = res["kernels"]["rbf"]["smoothness"]
    assert sm["smooth"] and np.allclose(sm["ratios"], 1.0, atol=1e-2)


def test_lag_config_validation():
    with pytest.raises(ValueError, match="n_eval"):
        lag.Config(n_eval=1)
    with pytest.raises(ValueError, match="t_min"):
        lag.Config(t_min=10.0, t_max=1.0)


def test_lag_is_deterministic(lag_run, tmp_path):
    out, _, cfg = lag_run
    lag.run(cfg, tmp_path)
    a = json.loads((out / "results.json").read_text())["results"]["kernels"]
    b = json.loads((tmp_path / "results.json").read_text())["results"]["kernels"]
    _assert_same_numbers(a, b)


# --------------------------------------------------------------------------- near clones

@pytest.fixture(scope="module")
def nc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("near_clone")
    cfg = nci.Config(**NC_SMALL)
    rep = nci.run(cfg, out)
    return out, rep, cfg


def test_near_clone_writes_results_figures_and_report(nc_run):
    out, rep, _ = nc_run
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["m"] == 20
    for fig in ("near_clone.png", "spike.png"):
        data = (out / fig).read_bytes()
        assert data[:8] == PNG and len(data) > 5000
    md = (out / "report.md").read_text()
    assert "rbf: ASR stays high for near clones" in md
    assert "rbf: spectral signatures see the clones" in md
    assert not list(out.glob(".*.tmp"))


def test_near_clone_aurocs_equal_sklearn(nc_run):
    out, _, cfg = nc_run
    s = json.loads((out / "results.json").read_text())["results"]["kernels"]["rbf"]["sweep"]
    truth = np.array(s["is_poison"])
    assert truth.sum() == cfg.m and truth.size == cfg.n_train + cfg.m
    for i in range(cfg.n_r):
        assert s["ss_auroc"][i] == pytest.approx(
            roc_auc_score(truth, np.array(s["ss_scores"][i])), abs=1e-12)
        st, sc = np.array(s["scores_trig"][i]), np.array(s["scores_clean"][i])
        want = roc_auc_score(np.r_[np.ones(st.size), np.zeros(sc.size)], np.r_[st, sc])
        assert s["auroc"][i] == pytest.approx(want, abs=1e-12)


def test_near_clone_asr_from_a_fresh_refit(nc_run):
    import jax
    from ntk_poison import attacks, krr, triggers
    jax.config.update("jax_enable_x64", True)
    out, _, cfg = nc_run
    res = json.loads((out / "results.json").read_text())["results"]
    s = res["kernels"]["rbf"]["sweep"]
    sc, _ = scenario.build_for_detection(cfg)
    ell = sc.length_scale
    # a fresh trigger object reproduces the triggered test inputs
    trig = triggers.get("cross", strength=cfg.trigger_strength * ell)
    np.testing.assert_allclose(trig.apply(sc.x0_clean[None])[0], sc.x0, atol=1e-12)
    k = scenario.kernel_for("rbf", cfg, ell)
    r = s["r_over_l"][0]
    zeta = attacks.near_clone(sc.zeta, r * ell, seed=cfg.seed)
    assert np.linalg.norm(zeta - sc.zeta) == pytest.approx(r * ell, rel=1e-9)
    Xp, yp = attacks.clone_cluster(sc.X, sc.y, zeta, cfg.y_target, cfg.m)
    f = np.asarray(krr.fit(k, Xp, yp, res["kernels"]["rbf"]["lam"]).predict(
        sc.X_trig[:cfg.n_trigger]))
    assert s["asr"][0] == pytest.approx(np.mean(f > 0), abs=1e-12)
    # RBF near clone: the poison's GN spike at x0p collapses as r -> 0 (THEORY: ~ r^2)
    assert s["spike_x0p"][0] < 1e-2 * s["spike_x0p"][-1]


def test_near_clone_is_deterministic(nc_run, tmp_path):
    out, _, cfg = nc_run
    nci.run(cfg, tmp_path)
    a = json.loads((out / "results.json").read_text())["results"]["kernels"]
    b = json.loads((tmp_path / "results.json").read_text())["results"]["kernels"]
    _assert_same_numbers(a, b)


def test_near_clone_config_validation():
    with pytest.raises(ValueError, match="r_min"):
        nci.Config(r_min=2.0, r_max=1.0)
    with pytest.raises(ValueError, match="kpca_components"):
        nci.Config(n_train=10, m=5, kpca_components=100)
    with pytest.raises(ValueError, match="cnn_pool"):
        nci.Config(cnn_pool=0)
    with pytest.raises(ValueError, match="cnn_n_train"):
        lag.Config(cnn_n_train=0)
    assert "nt_cnn" in nci.Config().kernels and "nt_cnn" in lag.Config().kernels


# --------------------------------------------------------------------------- the CNN kernel

def _finite(tree):
    for key, val in _leaves(tree):
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            assert np.isfinite(val), key
        elif isinstance(val, list) and val and all(isinstance(v, (int, float)) for v in
                                                   np.ravel(np.array(val, dtype=object))):
            assert np.all(np.isfinite(np.array(val, dtype=float))), key


@pytest.fixture(scope="module")
def lag_cnn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lag_cnn")
    cfg = lag.Config(**LAG_CNN)
    lag.run(cfg, out)
    return out, cfg


# ~30 s, mostly XLA compiles (the training set grows with m, so each m compiles anew);
# the near-clone test below keeps the experiments' image path in the fast suite
@pytest.mark.slow
def test_lag_runs_the_cnn_kernel_on_images(lag_cnn_run):
    import jax
    from ntk_poison import attacks, krr
    from oracles.closed_forms import mse_flow_alpha
    jax.config.update("jax_enable_x64", True)
    out, cfg = lag_cnn_run
    res = json.loads((out / "results.json").read_text())
    r = res["results"]["kernels"]["nt_cnn"]
    assert r["data"] == dict(n_train=60, input_shape=[8, 8, 1], images=True, pool=1,
                             length_scale=pytest.approx(r["data"]["length_scale"]))
    s, st = r["m_sweep"], r["t_sweep"]
    _finite({"m": {k: v for k, v in s.items() if k != "dense_check"}, "t": st})
    # the exact rank-one law == dense refits on image-shaped inputs; flow -> KRR
    np.testing.assert_allclose(s["refit_delta_f_x0"], s["delta_f_x0"], rtol=1e-8, atol=1e-10)
    assert st["krr_limit_error"] < 1e-8
    for c in s["dense_check"]:
        assert c["lanczos"] == pytest.approx(c["dense"], rel=1e-6)
    for sweep in (s, st):                               # AUROCs from the stored scores
        for i in range(len(sweep["auroc"])):
            sc_t, sc_c = np.array(sweep["scores_trig"][i]), np.array(sweep["scores_clean"][i])
            want = roc_auc_score(np.r_[np.ones(sc_t.size), np.zeros(sc_c.size)],
                                 np.r_[sc_t, sc_c])
            assert sweep["auroc"][i] == pytest.approx(want, abs=1e-12)
    # independent recomputation on (n, 8, 8, 1) images: the prep, the ASR of a fresh
    # KRR fit at m_max, and the flow at x0 from the numpy closed form
    sc, _ = scenario.build_for_detection(cfg, images=True)
    assert sc.X.shape == (60, 8, 8, 1) and sc.x0.shape == (8, 8, 1)
    k = scenario.kernel_for("nt_cnn", cfg, sc.length_scale)
    assert k.input_rank == 3
    Xp, yp = attacks.clone_cluster(sc.X, sc.y, sc.zeta, cfg.y_target, int(s["ms"][-1]))
    f = np.asarray(krr.fit(k, Xp, yp, r["lam"]).predict(sc.X_trig[:cfg.n_trigger]))
    assert s["asr"][-1] == pytest.approx(np.mean(f > 0), abs=1e-12)
    Xp, yp = attacks.clone_cluster(sc.X, sc.y, sc.zeta, cfg.y_target, cfg.flow_m)
    n = len(Xp)
    a = mse_flow_alpha(np.asarray(k(Xp, Xp)), yp, n * r["lam"], n, np.array(st["times"]))
    np.testing.assert_allclose(st["f_x0"], a @ np.asarray(k(sc.x0[None], Xp))[0],
                               rtol=1e-8, atol=1e-10)
    # the ReLU CNN NTK has kinks at blank patches: the curvature at x0 is not defined,
    # and the report says so
    sm = r["smoothness"]
    assert not sm["smooth"] and min(sm["ratios"]) < 0.5
    md = (out / "report.md").read_text()
    for text in ("nt_cnn: input Hessian defined at x0", "nt_cnn: lag in m",
                 "nt_cnn: refits match the law", "8x8x1 images", "NOT stable"):
        assert text in md
    claims = {c["name"]: c["verdict"] for c in res["claims"]}
    assert claims["nt_cnn: refits match the law"] == "supported"
    assert claims["nt_cnn: input Hessian defined at x0"] == "NOT supported"


@pytest.fixture(scope="module")
def nc_cnn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nc_cnn")
    cfg = nci.Config(**NC_CNN)
    nci.run(cfg, out)
    return out, cfg


@pytest.mark.slow
def test_near_clone_runs_the_cnn_kernel_on_images(nc_cnn_run):
    import jax
    from ntk_poison import attacks, krr
    jax.config.update("jax_enable_x64", True)
    out, cfg = nc_cnn_run
    res = json.loads((out / "results.json").read_text())
    r = res["results"]["kernels"]["nt_cnn"]
    assert r["data"]["input_shape"] == [8, 8, 1] and r["data"]["n_train"] == 60
    s = r["sweep"]
    _finite(s)
    truth = np.array(s["is_poison"])
    assert truth.sum() == cfg.m and truth.size == 60 + cfg.m
    for i in range(cfg.n_r):
        assert s["ss_auroc"][i] == pytest.approx(
            roc_auc_score(truth, np.array(s["ss_scores"][i])), abs=1e-12)
        st, sc = np.array(s["scores_trig"][i]), np.array(s["scores_clean"][i])
        want = roc_auc_score(np.r_[np.ones(st.size), np.zeros(sc.size)], np.r_[st, sc])
        assert s["auroc"][i] == pytest.approx(want, abs=1e-12)
    # a fresh refit on image-shaped inputs reproduces the ASR at the smallest r
    sc, splits = scenario.build_for_detection(cfg, images=True)
    k = scenario.kernel_for("nt_cnn", cfg, sc.length_scale)
    zeta = attacks.near_clone(sc.zeta, s["r_over_l"][0] * sc.length_scale, seed=cfg.seed)
    assert zeta.shape == (8, 8, 1)
    Xp, yp = attacks.clone_cluster(sc.X, sc.y, zeta, cfg.y_target, cfg.m)
    f = np.asarray(krr.fit(k, Xp, yp, r["lam"]).predict(sc.X_trig[:cfg.n_trigger]))
    assert s["asr"][0] == pytest.approx(np.mean(f > 0), abs=1e-12)
    # distances to the clones are over the flattened image
    d = np.linalg.norm((splits.x_trig - zeta[None]).reshape(cfg.n_eval, -1), axis=1)
    assert s["dist_trig_to_zeta_median"][0] == pytest.approx(np.median(d) / sc.length_scale)
    md = (out / "report.md").read_text()
    for text in ("nt_cnn: ASR stays high for near clones", "nt_cnn: input Hessian defined at x0p",
                 "nt_cnn: input Hessian defined at x0**",
                 "nt_cnn: spectral signatures see the clones", "8x8x1 images"):
        assert text in md
    assert s["m"] == cfg.m
    # the detector scores triggered test inputs, where the CNN NTK has kinks
    assert not s["smoothness_x0"]["smooth"]


# --------------------------------------------------------------------------- all-to-one

A2O = dict(target_mode="all_to_one", target_class=0)


def _a2o_refits(cfg, lam, zeta, m, sc):
    """Independent all-to-one refits on the stacked set: centred one-hot targets from
    the raw labels, the poisoned fit (m clones labelled with the target's row) and the
    clean one at the same absolute ridge; their argmax decisions at the triggered and
    clean test inputs."""
    from ntk_poison import data, krr
    xtr, ytr, _, _ = data.load(cfg.dataset)
    X, labels = data.subset(xtr, ytr, cfg.n_train, seed=cfg.seed)
    Y = np.eye(10)[labels] - 0.1
    yt = np.eye(10)[cfg.target_class] - 0.1
    k = scenario.kernel_for("rbf", cfg, sc.length_scale)
    Xp = np.vstack([X, np.repeat(zeta[None], m, 0)])
    Yp = np.vstack([Y, np.repeat(yt[None], m, 0)])
    pois = krr.fit(k, Xp, Yp, lam)
    clean = krr.fit(k, X, Y, lam * (len(X) + m) / len(X))
    x_trig = sc.X_trig[:cfg.n_trigger]
    return (np.argmax(np.asarray(pois.predict(x_trig)), 1),
            np.argmax(np.asarray(clean.predict(x_trig)), 1),
            np.argmax(np.asarray(pois.predict(sc.X_test)), 1))


@pytest.fixture(scope="module")
def a2o_nc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nc_a2o")
    cfg = nci.Config(**dict(NC_SMALL, n_r=2, **A2O))
    nci.run(cfg, out)
    return out, cfg


def test_near_clone_all_to_one_against_independent_refits(a2o_nc_run):
    import jax
    from ntk_poison import attacks, data
    jax.config.update("jax_enable_x64", True)
    out, cfg = a2o_nc_run
    res = json.loads((out / "results.json").read_text())
    r = res["results"]["kernels"]["rbf"]
    s = r["sweep"]
    assert r["data"]["target_class"] == 0 and r["data"]["num_classes"] == 10
    sc, _ = scenario.build_for_detection(cfg)
    # the triggered inputs are the test points of every class but the target
    _, _, xte, yte = data.load(cfg.dataset)
    perm = np.random.default_rng(cfg.seed + 1).permutation(len(xte))
    assert np.all(yte[perm][yte[perm] != 0][:cfg.n_trigger] != 0)
    zeta = attacks.near_clone(sc.zeta, s["r_over_l"][0] * sc.length_scale, seed=cfg.seed)
    d_pois, d_clean, d_test = _a2o_refits(cfg, r["lam"], zeta, cfg.m, sc)
    assert s["asr"][0] == pytest.approx(np.mean(d_pois == 0), abs=1e-12)
    assert s["trigger_alone_asr"][0] == pytest.approx(np.mean(d_clean == 0), abs=1e-12)
    assert s["clean_acc"][0] == pytest.approx(np.mean(d_test == sc.y_test), abs=1e-12)
    md = (out / "report.md").read_text()
    assert "All-to-one" in md and "trigger-alone ASR" in md
    assert "rbf: ASR stays high for near clones" in md


@pytest.fixture(scope="module")
def a2o_lag_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lag_a2o")
    cfg = lag.Config(**dict(LAG_SMALL, n_m=2, n_t=2, **A2O))
    lag.run(cfg, out)
    return out, cfg


# the near-clone run above keeps the all-to-one experiment path in the fast suite
@pytest.mark.slow
def test_lag_all_to_one_against_independent_refits(a2o_lag_run):
    import jax
    jax.config.update("jax_enable_x64", True)
    out, cfg = a2o_lag_run
    res = json.loads((out / "results.json").read_text())
    r = res["results"]["kernels"]["rbf"]
    s = r["m_sweep"]
    sc, _ = scenario.build_for_detection(cfg)
    m = int(s["ms"][-1])
    d_pois, d_clean, d_test = _a2o_refits(cfg, r["lam"], sc.zeta, m, sc)
    assert s["asr"][-1] == pytest.approx(np.mean(d_pois == 0), abs=1e-12)
    assert s["trigger_alone_asr"][-1] == pytest.approx(np.mean(d_clean == 0), abs=1e-12)
    assert s["clean_acc"][-1] == pytest.approx(np.mean(d_test == sc.y_test), abs=1e-12)
    # merged dense refits == the rank-one law, output by output; Delta f is the norm
    dv = np.array(s["delta_f_x0_vec"])
    assert dv.shape == (len(s["ms"]), 10)
    np.testing.assert_allclose(s["refit_delta_f_x0_vec"], dv, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(s["delta_f_x0"], np.linalg.norm(dv, axis=1), rtol=1e-12)
    np.testing.assert_allclose(dv.sum(1), 0.0, atol=1e-10)   # centred targets: sum_c f_c = 0
    for c in s["dense_check"]:
        assert c["lanczos"] == pytest.approx(c["dense"], rel=1e-6)
    claims = {c["name"]: c["verdict"] for c in res["claims"]}
    assert claims["rbf: refits match the law"] == "supported"
    assert "All-to-one" in (out / "report.md").read_text()


def test_target_mode_config_validation():
    with pytest.raises(ValueError, match="target_mode"):
        lag.Config(target_mode="one_to_one")
    with pytest.raises(ValueError, match="target_class"):
        nci.Config(target_mode="all_to_one", target_class=10)
    assert lag.Config().target_mode == nci.Config().target_mode == "binary"
