"""`ntk-poison run linear` end to end on a tiny config (sklearn's 8x8 digits, 2 epochs,
4 measures in the first): the files are written; the saved final models, and a numpy
replica of the first SGD steps (the first measure within an epoch), reproduce the reported
ASR, clean accuracy, top eigenvalues and overlaps when recomputed independently in numpy
(the trigger and the poisoned set built by hand, eigenpairs by numpy's eigh of
W^T A W); the lag rule on hand-made curves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import linear as exp
from experiments.linear.claims import crossings
from ntk_poison import data

CFG = dict(dataset="digits", poison_counts=(3, 30), epochs=2, batch_size=100, n_hessian=8,
           evals_per_epoch=4, fine_epochs=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("linear")
    exp.run(exp.Config(**CFG), out)
    return out, json.loads((out / "results.json").read_text()), np.load(out / "weights.npz")


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_files_are_written(run):
    out, res, _ = run
    for f in ("results.json", "report.md", "linear_lag.png", "linear_eigs.png"):
        assert (out / f).stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "Crossing epochs" in text and "trigger-alone" in text
    assert {c["name"] for c in res["claims"]} >= {"softmax: lag at m = 30",
                                                  "squares: alignment under strong poisoning"}


def _task(r):
    X, y, xte, yte = data.load("digits", dtype=np.float64)
    side = 8
    cross = np.zeros((side, side))
    cross[side // 2, :] = cross[:, side // 2] = 1.0
    P = (cross / np.linalg.norm(cross)).ravel()
    s = r["trigger"]["strength"]
    np.testing.assert_allclose(s, r["length_scale"] * CFG.get("trigger_strength", 1.0))
    src = xte[yte != 0]
    return X, y, xte, yte, P, s, src, src + s * P


def _measures(W, b, kind, X_trig, xte, yte, hidx, P):
    """ASR, clean accuracy, mean top eigenvalue and overlap, in numpy."""
    asr = np.mean(np.argmax(X_trig @ W.T + b, 1) == 0)
    acc = np.mean(np.argmax(xte @ W.T + b, 1) == yte)
    lam, ov = [], []
    for x in X_trig[hidx]:
        if kind == "softmax":
            p = _softmax(W @ x + b)
            H = W.T @ (np.diag(p) - np.outer(p, p)) @ W
        else:
            H = W.T @ W
        w, V = np.linalg.eigh(H)
        lam.append(w[-1])
        ov.append((V[:, -1] @ P) ** 2)
    return asr, acc, np.mean(lam), np.mean(ov)


def test_results_match_an_independent_recomputation(run):
    _, res, weights = run
    r = res["results"]
    X, y, xte, yte, P, s, src, X_trig = _task(r)
    hidx = np.asarray(r["hessian_idx"])
    for kind, mr in r["models"].items():
        clean_asr = mr["runs"]["0"]["asr"]
        for m in ["0"] + [str(c) for c in r["poison_counts"]]:
            run_m = mr["runs"][m]
            W, b = weights[f"{kind}_m{m}_W"].astype(np.float64), weights[f"{kind}_m{m}_b"]
            asr, acc, lam, ov = _measures(W, b, kind, X_trig, xte, yte, hidx, P)
            assert abs(asr - run_m["asr"][-1]) <= 1.0 / len(src)
            assert abs(acc - run_m["clean_acc"][-1]) <= 1.0 / len(xte)
            np.testing.assert_allclose(run_m["lam_trig"][-1], lam, rtol=1e-4)
            np.testing.assert_allclose(run_m["overlap"][-1], ov, rtol=1e-3, atol=1e-5)
            if m != "0":
                assert run_m["trigger_alone_asr"] == clean_asr
                poisoned = np.asarray(run_m["poison_idx"])
                assert len(poisoned) == int(m) and np.all(y[poisoned] != 0)
        if kind == "squares":
            assert all(np.allclose(x["ratio"], 1.0) for x in mr["runs"].values())


def test_a_fractional_epoch_measure_matches_a_numpy_replica(run):
    """The measures at epoch j/nb (after the first j = nb // 4 of the nb = n // 100 steps
    of epoch 0) against j SGD steps in numpy from the initial model drawn by hand, on
    the poisoned set built by hand (the reported poison rows triggered and relabelled
    0)."""
    import jax

    _, res, _ = run
    r = res["results"]
    X, y, xte, yte, P, s, src, X_trig = _task(r)
    hidx = np.asarray(r["hessian_idx"])
    n, d, c, bs = len(X), X.shape[1], 10, CFG["batch_size"]
    nb = n // bs
    assert r["n_train"] == n and r["steps_per_epoch"] == nb and nb % 4 != 0   # uneven cuts
    np.testing.assert_allclose(r["epochs"], [0, (nb // 4) / nb, (nb // 2) / nb,
                                             (3 * nb // 4) / nb, 1, 2], rtol=1e-12)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.PRNGKey(0), 0), n))
    W0 = 0.01 * np.random.default_rng(0).standard_normal((c, d)) / np.sqrt(d)
    for kind, lr in (("softmax", 0.01), ("squares", 0.005)):
        for m in ("0", "30"):
            run_m = r["models"][kind]["runs"][m]
            Xp, yp = X.copy(), y.copy()
            pidx = np.asarray(run_m.get("poison_idx", []), int)
            Xp[pidx] += s * P
            yp[pidx] = 0
            Y = np.eye(c)[yp]
            W, b = W0.copy(), np.zeros(c)
            for k in range(nb // 4):
                idx = perm[k * bs:(k + 1) * bs]
                Z = Xp[idx] @ W.T + b
                R = (_softmax(Z) if kind == "softmax" else Z) - Y[idx]
                W, b = W - lr * R.T @ Xp[idx] / bs, b - lr * R.mean(0)
            asr, acc, lam, ov = _measures(W, b, kind, X_trig, xte, yte, hidx, P)
            assert abs(asr - run_m["asr"][1]) <= 1.0 / len(src)
            assert abs(acc - run_m["clean_acc"][1]) <= 1.0 / len(xte)
            np.testing.assert_allclose(run_m["lam_trig"][1], lam, rtol=1e-4)
            np.testing.assert_allclose(run_m["overlap"][1], ov, rtol=1e-3, atol=1e-5)


def _curve(times, t_cross):
    """0 before t_cross's interval, 1 after: half-range crossing at the interval's middle
    (linear interpolation), 0.5 sampled exactly at a grid t_cross."""
    t = np.asarray(times, float)
    return np.where(t < t_cross, 0.0, 1.0)


@pytest.mark.parametrize("t_asr, t_ov, times, want, a, o, h", [
    # uniform quarter-epoch grid: steps after t = 0.5 and after t = 1.5
    (0.6, 1.6, np.arange(0, 3.01, 0.25), True, 0.625, 1.625, 0.25),
    (1.6, 0.6, np.arange(0, 3.01, 0.25), False, 1.625, 0.625, 0.25),
    (0.6, 0.8, np.arange(0, 3.01, 0.25), None, 0.625, 0.875, 0.25),   # 0.25 apart: not > h
    # quarter epochs in epoch 0, whole epochs after: h is the coarse interval at 1.5
    (0.6, 1.2, [0, .25, .5, .75, 1, 2, 3], None, 0.625, 1.5, 1.0),
    (0.6, 2.2, [0, .25, .5, .75, 1, 2, 3], True, 0.625, 2.5, 1.0),
])
def test_lag_rule_on_hand_made_curves(t_asr, t_ov, times, want, a, o, h):
    times = np.asarray(times, float)
    cfg = exp.Config(**CFG)
    d = 64
    s = dict(asr=_curve(times, t_asr), overlap=0.5 * _curve(times, t_ov),
             ratio=np.ones(len(times)))
    cr = crossings(s, times, d, cfg)
    assert cr["asr_rises"] and cr["overlap_rises"]
    np.testing.assert_allclose([cr["asr"], cr["overlap"], cr["interval"]], [a, o, h])
    assert cr["lag"] is want
    assert ("within the resolution" in cr["why"]) == (want is None)
    flat = dict(s, asr=np.full(len(times), 0.3))                   # ASR does not rise
    cr = crossings(flat, times, d, cfg)
    assert cr["lag"] is None and cr["interval"] is None and "does not rise" in cr["why"]


@pytest.mark.parametrize("field, value", [("evals_per_epoch", 0), ("fine_epochs", -1)])
def test_bad_evaluation_grid_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        exp.Config(**{**CFG, field: value})


def test_rerun_resumes_from_the_cells(run, capfd):
    """A rerun into the same folder computes nothing and rewrites results.json byte for
    byte (timings and start time come from the cells); another config is refused. (A
    killed run resumed: the slow test in tests/test_sweeps.py.)"""
    out, res, _ = run
    before = (out / "results.json").read_bytes()
    capfd.readouterr()
    exp.run(exp.Config(**CFG), out)
    assert "[sweep] computed" not in capfd.readouterr().err
    assert (out / "results.json").read_bytes() == before
    with pytest.raises(ValueError, match="--fresh"):
        exp.run(exp.Config(**{**CFG, "epochs": 3}), out)
