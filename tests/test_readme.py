"""README examples run as written, and the README's custom kernel gets derivatives."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_readme_usage_block_runs():
    blocks = _python_blocks()
    usage = next(b for b in blocks if "clone_effect" in b)
    ns = {}
    exec(compile(usage, "README-usage", "exec"), ns)
    assert ns["f"].shape == (5,)
    assert ns["g"].shape == (5, 784)
    assert ns["H"].shape == (2, 784, 784)
    assert ns["delta_f"].shape == (11,)
    # The exact law at m = 0 is no effect at all.
    assert abs(float(ns["delta_f"][0])) < 1e-12
    # Theory: S(m) = m / (n lam + m k_zz), checked independently here.
    ms = ns["ms"]
    np.testing.assert_allclose(ns["S"], ms / ((500 + ms) * 1e-3 + ms * 1.0), rtol=1e-12)


def test_readme_custom_kernel_is_registered_and_differentiable():
    block = next(b for b in _python_blocks() if "kernels.register" in b)
    ns = {}
    exec(compile(block, "README-kernel", "exec"), ns)
    from ntk_poison import kernels, krr
    k = kernels.get("laplace_smooth", length_scale=2.0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 3))
    y = np.sin(X[:, 0])
    # Independent closed form of the kernel.
    d2 = ((X[:, None] - X[None]) ** 2).sum(-1)
    np.testing.assert_allclose(np.asarray(k(X, X)), np.exp(1 - np.sqrt(1 + d2 / 4.0)),
                               rtol=1e-10, atol=1e-12)
    model = krr.fit(k, X, y, 1e-2)
    x = rng.standard_normal((1, 3))
    g = np.asarray(model.input_grad(x))[0]
    h = 1e-6
    fd = [(float(model.predict(x + h * e)[0]) - float(model.predict(x - h * e)[0])) / (2 * h)
          for e in np.eye(3)[:, None, :]]
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_readme_defence_block_runs():
    """The spectra / artefact / detector / flow / nets block, with its shapes and the
    claims it states in comments checked independently."""
    block = next(b for b in _python_blocks() if "fit_penalized_sweep" in b)
    ns = {}
    exec(compile(block, "README-defence", "exec"), ns)
    art = ns["art"]
    assert len(art.poison_idx) == 15 and art.x.shape == (315, 64)
    vals = np.asarray(ns["vals"])
    assert vals.shape == (3,) and np.all(np.diff(vals) <= 0)
    # the Lanczos pairs and the overlap against a dense oracle: the loss's input Hessian
    # by jax.hessian of (f(x) - 1)^2 / 2, numpy's eigh, and the trigger direction as the
    # normalised difference trig.apply(x) - x (not trig.direction)
    import jax
    import jax.numpy as jnp
    model, x0, trig = ns["model"], np.asarray(ns["x0"]), ns["trig"]
    loss = lambda x: 0.5 * (model.predict(x[None])[0] - 1.0) ** 2   # noqa: E731
    H = np.asarray(jax.hessian(loss)(jnp.asarray(x0)))
    w, V = np.linalg.eigh(H)
    top = np.argsort(-w)[:3]                                  # the largest (algebraic)
    tol = 1e-6 if vals.dtype == np.float64 else 1e-4          # by the data's dtype
    np.testing.assert_allclose(vals, w[top], rtol=tol, atol=tol * np.abs(w).max())
    z = np.zeros((1,) + x0.shape)
    t = (np.asarray(trig.apply(z)) - z)[0].ravel()
    t /= np.linalg.norm(t)
    assert float(ns["overlap"]) == pytest.approx(float((V[:, top[0]] @ t) ** 2), abs=tol)
    from sklearn.metrics import roc_auc_score              # the evaluator, independently
    assert ns["report"]["auroc"] == pytest.approx(
        roc_auc_score(np.isin(np.arange(len(art.x)), art.poison_idx), ns["scores"]))
    assert ns["report"]["tp"] + ns["report"]["fp"] == int(np.sum(ns["flagged"]))
    assert np.all(np.diff(np.asarray(ns["dof"])) < 0)      # capacity falls with kappa
    assert np.asarray(ns["f_t"]).shape == (3, 5)
    assert ns["hist"].times[-1] == 0.2 * 50


@pytest.mark.slow
def test_readme_networks_block_runs(tmp_path, monkeypatch):
    """The networks block as written: a penalised CNN run with curvature probes four
    times an epoch and a checkpoint, and the ResNet constructor."""
    block = next(b for b in _python_blocks() if "curvature_hook" in b)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(block, "README-nets", "exec"), ns)
    h = ns["history"]
    assert h["epoch"] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert len(h["overlap_mean"]) == 8 and all(0 <= v <= 1 for v in h["overlap_mean"])
    assert (tmp_path / "ckpt" / "checkpoint.npz").exists()
    assert ns["k"].name == "nt_cnn"


@pytest.mark.slow
def test_readme_seed_systems_block_runs():
    """The EPIC / deferred / optimal block as written, its outputs checked independently:
    EPIC's flags are the singleton clusters of a numpy nearest-medoid assignment, the
    deferred perturbation keeps labels and its l_inf budget and box, the optimised
    poison respects its box and, when feasible, the threshold (a dense refit check)."""
    from ntk_poison import krr as krr_mod, x64_scope
    from ntk_poison.defences import CurvatureDetector, epic_select
    block = next(b for b in _python_blocks() if "deferred_kernel" in b)
    ns = {}
    with x64_scope(True):
        exec(compile(block, "README-seed-systems", "exec"), ns)
        X, Y, dp, opt = ns["X"], ns["Y"], ns["dp"], ns["opt"]
        sel = epic_select(ns["D"], ns["art"].y, 0.2)
        sizes = np.bincount(sel.assignment, minlength=len(X))[sel.assignment]
        np.testing.assert_array_equal(ns["flagged"], sizes <= 1)
        medoid_d = ns["D"][:, sel.medoids]
        for i in range(len(X)):            # nearest medoid of the same class, by numpy
            same = np.argmax(ns["art"].y[sel.medoids], 1) == np.argmax(ns["art"].y[i])
            j = sel.medoids[same][np.argmin(medoid_d[i, same])]
            assert ns["D"][i, sel.assignment[i]] == pytest.approx(ns["D"][i, j])
        assert ns["res"].keep.shape == (len(X),)
        delta = np.asarray(dp.X_poisoned) - X
        assert np.abs(delta).max() <= 0.1 + 1e-12
        assert np.asarray(dp.X_poisoned).min() >= 0 and np.asarray(dp.X_poisoned).max() <= 1
        assert set(ns["rob"]) == {"clean", "noise_0.1", "pgd_0.1"}
        z = np.asarray(opt.zeta)
        anchor = X[ns["labels"] != 0][0]
        assert np.abs(z - anchor).max() <= 0.3 + 1e-9 and z.min() >= 0 and z.max() <= 1
        if opt.feasible:
            Xp = np.concatenate([X, np.repeat(z[None], opt.m, 0)])
            Yp = np.concatenate([Y, np.repeat(ns["t"][None], opt.m, 0)])
            model = krr_mod.fit(ns["k"], Xp, Yp, 1e-3)
            s = CurvatureDetector(k=1, method="dense").spectrum(model, ns["x_trig"])
            assert s["eigenvalues"][:, 0].max() <= ns["thr"] * (1 + 1e-6)
