"""`ntk-poison run full_mnist` on a tiny config, against independent numpy
recomputation (a dense solve and an explicit refit with the clones)."""

import json

import numpy as np
import pytest

from experiments import full_mnist as exp


@pytest.mark.parametrize("bad,match", [
    (dict(kernels=("rbf", "matern52")), "`kernels`"),
    (dict(ms=(10, 1)), "`ms`"),
    (dict(refit_ms=(7,)), "`refit_ms`"),
    (dict(gram_dtype="float16"), "gram_dtype"),
    (dict(target_class=10), "`target_class`"),
])
def test_bad_config_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        exp.Config(**bad)


@pytest.mark.slow
def test_tiny_run_matches_numpy(tmp_path):
    cfg = exp.Config(n_train=300, n_test=100, kernels=("rbf",), ms=(1, 10),
                     refit_ms=(10,), n_trigger=40, precond_rank=60, gram_dtype="float64")
    exp.run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    res = results["kernels"]["rbf"]
    X, y, Xte, yte = exp.load(cfg)
    ell = res["kernel_params"]["length_scale"]
    K = lambda A, B: np.exp(-((A * A).sum(1)[:, None] + (B * B).sum(1)[None]
                              - 2 * A @ B.T) / (2 * ell * ell))
    N, mu, t = len(X), len(X) * cfg.ridge, cfg.target_class
    Y = np.eye(10)[y] - 0.1
    alpha = np.linalg.solve(K(X, X) + mu * np.eye(N), Y)
    assert res["test_accuracy"] == pytest.approx(np.mean((K(Xte, X) @ alpha).argmax(1) == yte))
    # the clone rows: an explicit refit on X plus m copies of zeta, absolute ridge mu
    mask, pattern = exp.triggers.patch_mask((28, 28), cfg.patch_size)
    patch = lambda a: a * (1 - mask.ravel()) + pattern.ravel() * mask.ravel()
    zeta = patch(X[y != t].mean(0))
    Xt = patch(Xte[yte != t][:cfg.n_trigger])
    for row in res["rows"]:
        m = row["m"]
        Xp = np.concatenate([X, np.repeat(zeta[None], m, 0)])
        Yp = np.concatenate([Y, np.repeat((np.eye(10)[t] - 0.1)[None], m, 0)])
        a = np.linalg.solve(K(Xp, Xp) + mu * np.eye(N + m), Yp)
        f_t, f_z = K(Xt, Xp) @ a, (K(zeta[None], Xp) @ a)[0]
        assert row["asr"] == pytest.approx(np.mean(f_t.argmax(1) == t))
        assert row["efficacy"] == pytest.approx(f_z[t] - np.delete(f_z, t).max(), abs=1e-7)
    (check,) = results["refits"]
    assert check["m"] == 10 and check["max_abs_diff_triggered"] < 1e-7
