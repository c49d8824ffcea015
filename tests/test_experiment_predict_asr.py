"""`ntk-poison run predict_asr`: the net's clock against the kernel flow, and a tiny run
end to end.

(a) The time normalisation: ``train.train`` (MSE ``(1/n) sum 1/2 ||f - y||^2``, full
batch, plain SGD) for s steps at lr, centred, against ``flow.kernel_flow`` of the
analytic NTK (``(1/2n) sum (f - y)^2`` per output) at t = s lr, at the training images
of the tiny config: a wide NTK-param CNN matches the flow at t far better than at t/2
or 2t (a clock off by a factor 2 would match one of those) and far better than a
narrow one (float64).

(b) A tiny config (8x8 digits) writes results.json, both figures and report.md; its
predicted ASR is recomputed independently: the flow's closed form by numpy's eigh on
the same poisoned set, the ASR by argmax in numpy.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import predict_asr as exp
from ntk_poison import attacks, nets, scenario, x64_scope


def test_wide_net_follows_the_kernel_flow_clock():
    cfg = exp.Config.quick()                   # 40 8x8 digits, depth 1, 10 steps at lr 1
    assert cfg.widths == (8, 1024)
    with x64_scope(True):
        X, labels, *_ = exp.load_task(cfg)
        Y = scenario.centred_one_hot(labels, 10)
        arch = dict(input_shape=X.shape[1:], depth=cfg.depth, pool=1, num_outputs=10)
        k = nets.cnn(jax.random.key(0), channels=1, **arch).kernel()
        t = cfg.lr * cfg.steps
        fk = {s: exp.kernel_prediction(k, X, Y, X, s * t) for s in (0.5, 1.0, 2.0)}
        err = {}
        for w in cfg.widths:
            model = nets.cnn(jax.random.key(1), channels=w, dtype=jnp.float64, **arch)
            f = exp.train_centred(model, X, Y, X, cfg)
            assert f.shape == (len(X), 10)
            err[w] = {s: exp.rel_error(f, v) for s, v in fk.items()}
    # measured at the 40 training images: width 1024 0.11 at t, 0.47 at 2t, 0.89 at t/2;
    # width 8 0.97 at t
    assert err[1024][1.0] < 0.2, err
    assert err[1024][1.0] < 0.5 * min(err[1024][0.5], err[1024][2.0]), err
    assert err[1024][1.0] < 0.5 * err[8][1.0], err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict_asr")
    cfg = exp.Config.quick()
    exp.run(cfg, out)
    return cfg, out, json.loads((out / "results.json").read_text())


def test_files_and_claims(tiny):
    cfg, out, res = tiny
    for f in ("results.json", "report.md", "asr_m.png", "error_width.png"):
        assert (out / f).stat().st_size > 0
    names = {c["name"] for c in res["claims"]}
    assert names >= {"nets approach the kernel flow with width",
                     "the kernel flow predicts the widest net's ASR",
                     "where the prediction fails"}
    text = (out / "report.md").read_text()
    assert "trigger-alone" in text and "| m | kernel ASR |" in text
    r = res["results"]
    assert r["poison_counts"] == [0] + list(cfg.poison_counts)
    for m in r["poison_counts"]:
        assert len(r["kernel_runs"][str(m)]["poison_idx"]) == m
    for w, n_seeds in zip(cfg.widths, cfg.net_seeds):
        runs = r["net_runs"][str(w)]
        assert len(runs) == n_seeds
        for rows in runs.values():          # trigger-alone = the same model at m = 0
            assert all(rows[str(m)]["trigger_alone_asr"] == rows["0"]["asr"]
                       for m in r["poison_counts"])


def test_predicted_asr_matches_a_numpy_recomputation(tiny):
    cfg, _, res = tiny
    r = res["results"]
    with x64_scope(True):
        X, labels, X_test, y_test, X_trig, trig = exp.load_task(cfg)
        k = nets.cnn(jax.random.key(0), channels=1, input_shape=X.shape[1:],
                     depth=cfg.depth, pool=1).kernel()
        Y = scenario.centred_one_hot(labels, 10)
        target = scenario.centred_one_hot([cfg.target_class], 10)[0]
        n, t = len(X), cfg.lr * cfg.steps
        for m in r["poison_counts"]:
            art = attacks.backdoor_attack(X, Y, trig, target, n_poison=m, seed=cfg.seed,
                                          mode="replace")
            K = np.asarray(k(art.x, art.x))
            e, Q = np.linalg.eigh(0.5 * (K + K.T))
            e = np.maximum(e, 1e-300)
            alpha = Q @ (((1 - np.exp(-e * t / n)) / e)[:, None] * (Q.T @ art.y))
            f_trig = np.asarray(k(X_trig, art.x)) @ alpha
            f_test = np.asarray(k(X_test, art.x)) @ alpha
            asr = np.mean(np.argmax(f_trig, 1) == cfg.target_class)
            acc = np.mean(np.argmax(f_test, 1) == y_test)
            assert r["kernel_runs"][str(m)]["asr"] == pytest.approx(asr, abs=1e-12)
            assert r["kernel_runs"][str(m)]["clean_acc"] == pytest.approx(acc, abs=1e-12)


def test_kernel_gd_gap_against_explicit_gradient_descent():
    """The discretisation floor: kernel GD in closed form against s explicit numpy GD
    steps on the function values (train and evaluation points), linear kernel."""
    from ntk_poison import kernels
    rng = np.random.default_rng(0)
    X, Xe, Y = rng.normal(size=(12, 5)), rng.normal(size=(7, 5)), rng.normal(size=(12, 3))
    k = kernels.linear()
    with x64_scope(True):
        K, Ke = np.asarray(k(X, X)), np.asarray(k(Xe, X))
        lr, steps, n = 0.5 * len(X) / np.linalg.eigvalsh(K)[-1], 15, len(X)
        f_flow = exp.kernel_prediction(k, X, Y, Xe, lr * steps)
        f, fe = np.zeros_like(Y), np.zeros((len(Xe), 3))
        for _ in range(steps):
            f, fe = f - lr / n * K @ (f - Y), fe - lr / n * Ke @ (f - Y)
        gap = exp.kernel_gd_gap(k, X, Y, Xe, lr, steps, f_flow)
    assert gap == pytest.approx(exp.rel_error(fe, f_flow), rel=1e-9)
    assert gap > 1e-3                           # lr e_max / n = 0.5: a real gap
