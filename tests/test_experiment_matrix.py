"""`ntk-poison run matrix`: cells against independent recomputation, and resumability.

A tiny kernel-regime run (clone and patch attacks; none, spectral, EPIC and curvature
defences) in float64. Checks:
* the undefended cell's ASR and clean accuracy equal a numpy KRR solve on the saved
  artefact (the kernel matrix from the kernel, ``np.linalg.solve``, argmax in numpy);
* the spectral cell's detection counts and AUROC equal ``SpectralSignatures`` and an
  AUROC by enumeration of pairs on the same artefact and kernel-PCA features;
* the trigger-alone ASR is the clean cell's ASR for the attack's trigger;
* a rerun computes no cell and gives the same table; deleting one cell file recomputes
  exactly that cell, to the same numbers (same config and seed, same numbers);
* a rerun rewrites results.json byte for byte; a changed config is refused (the
  config hash), while the lists of cells to run may change; bad configs are ValueErrors.

The two end-to-end checks take about 35 s (mostly compilation), so they run in
``make test-slow``; the sweep itself is tested fast in ``tests/test_sweeps.py``.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from experiments import matrix as exp
from ntk_poison import data, io, kernels, scenario, x64_scope
from ntk_poison.artefact import Artefact
from ntk_poison.defences import SpectralSignatures, kernel_pca_features

CFG = exp.Config.quick(regimes=("kernel",), attacks=("clone", "patch"),
                       defences=("none", "spectral", "epic", "curvature"), robustness=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    exp.run(CFG, out)
    return out, json.loads((out / "results.json").read_text())


def _task():
    X, y, xte, yte = data.load("mnist", flatten=False, dtype=np.float64)
    X, y = data.subset(X, y, CFG.kernel_n_train, seed=CFG.seed)
    xte, yte = data.subset(xte, yte, CFG.n_test, seed=CFG.seed + 1)
    return X, y, xte, yte


def _auroc_pairs(s, t):
    pos, neg = s[t], s[~t]
    return float(np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])))


@pytest.mark.slow
def test_cells_against_numpy(tiny):
    out, res = tiny
    table = res["results"]["table"]["kernel"]
    X, y, xte, yte = _task()
    trig = dict(CFG.trigger_objects())
    with x64_scope(True):
        k = kernels.get("nt_fc", depth=CFG.nt_depth, W_std=1.5, b_std=0.1, activation="erf")
        for attack in ("clone", "patch"):
            art = Artefact.load(out / "artefacts" / f"kernel_{attack}.npz")
            Xa = np.asarray(art.x).reshape(art.n, -1)
            K = np.asarray(k(Xa, Xa))
            alpha = np.linalg.solve(K + len(Xa) * CFG.ridge * np.eye(len(Xa)), art.y)
            f = lambda x: np.asarray(k(x.reshape(len(x), -1), Xa)) @ alpha
            src = xte[yte != CFG.target_class]
            asr = np.mean(np.argmax(f(np.asarray(trig["patch"].apply(src))), 1)
                          == CFG.target_class)
            cell = table[attack]["none"]
            assert cell["asr"]["patch"] == pytest.approx(asr, abs=1e-12)
            assert cell["clean_acc"] == pytest.approx(np.mean(np.argmax(f(xte), 1) == yte))
            assert cell["alone"] == table["clean"]["none"]["asr"]["patch"]
            F = kernel_pca_features(k, Xa, CFG.n_components)
            s, flagged = SpectralSignatures(eps=CFG.poison_rate).detect(F, art.y)
            sp = table[attack]["spectral"]
            assert sp["n_flagged"] == int(flagged.sum())
            assert sp["poisons_dropped"] == int((flagged & art.is_poison).sum())
            assert sp["auroc"] == pytest.approx(_auroc_pairs(s, art.is_poison), abs=1e-12)
            ep = table[attack]["epic"]
            assert ep["n_poison"] == art.n_poison
            assert 0 <= ep["poisons_dropped"] <= art.n_poison
    assert (out / "matrix_heatmap.png").exists() and (out / "report.md").exists()
    assert "| clone |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_rerun_resumes_and_recomputes_one_cell(tiny, tmp_path, capfd):
    out, res = tiny
    before = (out / "results.json").read_bytes()
    capfd.readouterr()
    rep = exp.run(CFG, out)
    assert "[sweep] computed" not in capfd.readouterr().err
    assert (out / "results.json").read_bytes() == before     # every number from the cells
    victim = out / "cells" / "kernel__patch__spectral.json"
    old = res["results"]["table"]["kernel"]["patch"]["spectral"]
    victim.unlink()
    rep = exp.run(CFG, out)
    assert re.findall(r"computed cell (\S+) in", capfd.readouterr().err) == [
        "kernel__patch__spectral"]
    new = rep.results["table"]["kernel"]["patch"]["spectral"]
    assert {k: v for k, v in new.items() if k != "seconds"} == \
        {k: v for k, v in old.items() if k != "seconds"}
    changed = CFG.replace(ridge=2e-3, defences=("none",), attacks=("patch",))
    with pytest.raises(ValueError, match="--fresh"):
        exp.run(changed, out)
    assert io.config_hash(CFG.replace(defences=("none",)), exp.SWEEP_IGNORE) == \
        io.config_hash(CFG, exp.SWEEP_IGNORE)


@pytest.mark.parametrize("bad", [dict(attacks=("clone", "bogus")), dict(defences=()),
                                 dict(regimes=("net",), attacks=("optimal",)),
                                 dict(triggers=("blend",)), dict(poison_rate=1.5),
                                 dict(epic_subset=0.0)])
def test_bad_config(bad):
    with pytest.raises(ValueError, match="`"):
        exp.Config(**bad)
