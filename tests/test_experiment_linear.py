"""`ntk-poison run linear` end to end on a tiny config (sklearn's 8x8 digits, 2 epochs):
the files are written, and the saved final models reproduce the reported ASR, clean
accuracy, top eigenvalues and overlaps when recomputed independently in numpy (the
trigger built by hand, eigenpairs by numpy's eigh of W^T A W)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import linear as exp
from ntk_poison import data

CFG = dict(dataset="digits", poison_counts=(3, 30), epochs=2, batch_size=100, n_hessian=8)


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


def test_results_match_an_independent_recomputation(run):
    _, res, weights = run
    r = res["results"]
    X, y, xte, yte = data.load("digits", dtype=np.float64)
    side = 8
    cross = np.zeros((side, side))
    cross[side // 2, :] = cross[:, side // 2] = 1.0
    P = (cross / np.linalg.norm(cross)).ravel()
    s = r["trigger"]["strength"]
    np.testing.assert_allclose(s, r["length_scale"] * CFG.get("trigger_strength", 1.0))
    src = xte[yte != 0]
    X_trig = src + s * P
    hidx = np.asarray(r["hessian_idx"])
    for kind, mr in r["models"].items():
        clean_asr = mr["runs"]["0"]["asr"]
        for m in ["0"] + [str(c) for c in r["poison_counts"]]:
            run_m = mr["runs"][m]
            W, b = weights[f"{kind}_m{m}_W"].astype(np.float64), weights[f"{kind}_m{m}_b"]
            asr = np.mean(np.argmax(X_trig @ W.T + b, 1) == 0)
            acc = np.mean(np.argmax(xte @ W.T + b, 1) == yte)
            assert abs(asr - run_m["asr"][-1]) <= 1.0 / len(src)
            assert abs(acc - run_m["clean_acc"][-1]) <= 1.0 / len(xte)
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
            np.testing.assert_allclose(run_m["lam_trig"][-1], np.mean(lam), rtol=1e-4)
            np.testing.assert_allclose(run_m["overlap"][-1], np.mean(ov), rtol=1e-3, atol=1e-5)
            if m != "0":
                assert run_m["trigger_alone_asr"] == clean_asr
                poisoned = np.asarray(run_m["poison_idx"])
                assert len(poisoned) == int(m) and np.all(y[poisoned] != 0)
        if kind == "squares":
            assert all(np.allclose(x["ratio"], 1.0) for x in mr["runs"].values())
