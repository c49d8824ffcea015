"""`ntk-poison run certify` on a tiny config, against independent recomputation.

* the label-flip radius at each triggered input equals a numpy closed form: KRR weights
  a = k(x, X)(K + n lam I)^-1 by ``np.linalg.solve``, flipping i moves f by -2 a_i y_i,
  the radius is the largest k whose k largest gains toward the other sign stay below
  |f| (so "m flips can reach the target" is ``f > 0 or radius < m``);
* each row's ASR equals a numpy refit of KRR on the attack's training set;
* at m = 0 the AGT box has zero width: lower = nominal = upper ASR and accuracy;
* the first-budget summary follows the rows.

The end-to-end run takes about 23 s (compilation), so it is in ``make test-slow``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import certify as exp
from ntk_poison import attacks, kernels, scenario, x64_scope

CFG = exp.Config(n_train=60, n_trigger=12, n_eval=6, n_cal=6, ms=(0, 2, 8),
                 n_candidates=4, agt_dim=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("certify")
    exp.run(CFG, out)
    return out, json.loads((out / "results.json").read_text())["results"]


def _krr(K, y, ridge):
    return np.linalg.solve(K + len(y) * ridge * np.eye(len(y)), y)


@pytest.mark.slow
def test_certificates_and_asr_against_numpy(tiny):
    out, res = tiny
    with x64_scope(True):
        sc, _ = scenario.build_for_detection(CFG)
        k = kernels.rbf(length_scale=sc.length_scale)
        X, y, xt = sc.X, sc.y, sc.X_trig
        K = np.asarray(k(X, X))
        A = np.linalg.solve(K + len(y) * CFG.ridge * np.eye(len(y)), np.asarray(k(X, xt))).T
        f = A @ y
        radius = []
        for a, fx in zip(A, f):
            gains = np.sort(np.maximum(0.0, 2 * a * y * np.sign(fx)))[::-1]
            radius.append(int(np.sum(np.cumsum(gains) < abs(fx))))
        assert res["radius"] == radius
        for row in res["rows"]:
            m = row["m"]
            assert row["flips_possible"] == pytest.approx(np.mean((f > 0) | (np.array(radius) < m)))
            art = attacks.clone_attack(X, y, sc.zeta, sc.y_target, m)
            Ka = np.asarray(k(art.x, art.x))
            fa = np.asarray(k(xt, art.x)) @ _krr(Ka, art.y, CFG.ridge)
            assert row["clone_asr"] == pytest.approx(np.mean(fa > 0))
    r0 = res["rows"][0]
    assert r0["agt_asr_lower"] == r0["agt_asr_nominal"] == r0["agt_asr_upper"]
    assert r0["agt_acc_lower"] == r0["agt_acc_nominal"] == r0["agt_acc_upper"]
    for row in res["rows"]:
        assert row["agt_asr_lower"] <= row["agt_asr_nominal"] <= row["agt_asr_upper"]
    first = res["first_m"]["clone"]["flips"]
    hits = [r["m"] for r in res["rows"] if r["flips_possible"] >= CFG.possible_rate]
    assert first == (hits[0] if hits else None)
    assert (out / "certified_vs_visible.png").exists()


@pytest.mark.parametrize("bad", [dict(ms=(4, 2)), dict(ms=()), dict(visible_auroc=0.4),
                                 dict(agt_dim=1), dict(agt_hidden=(0,))])
def test_bad_config(bad):
    with pytest.raises(ValueError, match="`"):
        exp.Config(**bad)
