"""`ntk-poison run backdoor_nets`: the claim rules on hand-made histories, the arms'
grammar and config checks, and one tiny end-to-end run on sklearn's 8x8 digits whose
reported numbers are recomputed from the saved final models and the poisoned set rebuilt
by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import backdoor_nets as exp
from experiments.backdoor_nets import claims as cl
from experiments.backdoor_nets.arms import parse_arm

CFG = dict(dataset="digits", n_train=300, n_test=200, channels=4, triggers=("patch",),
           arms=("none", "aug+pen@0.1"), probe_arms=("none",), epochs=(1, 2),
           batch_size=50, n_probe=4, probe_k=2, probe_iters=4, pad=1, poison_rate=0.1,
           evals_per_epoch=2)


# --------------------------------------------------------------------------- rules

@pytest.mark.parametrize("arm, want", [("none", (False, 0.0)), ("aug", (True, 0.0)),
                                       ("pen@0.5", (False, 0.5)), ("aug+pen@1e3", (True, 1e3))])
def test_parse_arm(arm, want):
    assert parse_arm(arm) == want


@pytest.mark.parametrize("arm", ["aug+none", "pen@0", "pen@-1", "pen@x", "aug+aug", "penalty"])
def test_bad_arms_raise(arm):
    with pytest.raises(ValueError, match="arms"):
        parse_arm(arm)


@pytest.mark.parametrize("change, match", [
    (dict(arms=("aug",)), "arms"), (dict(probe_arms=("pen@7",)), "probe_arms"),
    (dict(epochs=(3, 3)), "epochs"), (dict(triggers=("glitter",)), "triggers"),
    (dict(dataset="cifar10"), "data_path"), (dict(poison_rate=1.5), "poison_rate"),
    (dict(probe_k=5, probe_iters=4), "probe_k")])
def test_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        exp.Config(**change)


def _hist(asr, ov):
    return {"epoch": list(range(len(asr))), "asr_t": list(asr), "overlap_mean": list(ov)}


def test_lag_rule_orders_by_more_than_one_epoch():
    d = 64
    # ASR reaches half its range at 0.5 epochs; the overlap at 3.5: ASR first
    r = cl.lag(_hist([0, 1, 1, 1, 1, 1], [0.01, 0.01, 0.01, 0.01, 0.5, 0.5]), "t", d)
    assert r["lag"] is True and r["asr"] == pytest.approx(0.5) and r["overlap"] == pytest.approx(3.5)
    r = cl.lag(_hist([0, 0, 0, 0, 1, 1], [0.01, 0.5, 0.5, 0.5, 0.5, 0.5]), "t", d)
    assert r["lag"] is False
    r = cl.lag(_hist([0, 0, 1, 1], [0.01, 0.01, 0.5, 0.5]), "t", d)
    assert r["lag"] is None and "ASR at epoch" in r["why"]          # within one epoch
    r = cl.lag(_hist([0.5, 0.52, 0.53], [0.01, 0.1, 0.5]), "t", d)
    assert r["lag"] is None and "ASR does not rise" in r["why"]
    r = cl.lag(_hist([0, 1, 1], [0.01, 0.012, 0.011]), "t", d)
    assert r["lag"] is None and "overlap does not rise" in r["why"]


def test_combine():
    assert cl.combine({"a": True, "b": None}) is True
    assert cl.combine({"a": False, "b": False}) is False
    assert cl.combine({"a": True, "b": False}) is None
    assert cl.combine({"a": None}) is None


def test_frontier_marks_suppression_against_the_same_arms_clean_run():
    cfg = exp.Config(arms=("none", "aug", "aug+pen@1"), suppress_margin=0.1)
    h = lambda asr, acc: {"asr_t": [asr], "clean_acc": [acc]}
    res = {"runs": {"t": {"5": {"none": h(1.0, 0.9), "aug": h(0.9, 0.9),
                                "aug+pen@1": h(0.25, 0.8)}}},
           "clean": {"none": h(0.1, 0.9), "aug": h(0.1, 0.9), "aug+pen@1": h(0.2, 0.8)}}
    pts = cl.frontier(res, cfg, "t", 5)
    assert [p["arm"] for p in pts] == ["aug", "aug+pen@1"]
    assert [p["suppressed"] for p in pts] == [False, True]     # 0.25 <= 0.2 + 0.1
    assert pts[1]["trigger_alone"] == 0.2


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("backdoor_nets")
    exp.run(exp.Config(**CFG), out)
    return out, json.loads((out / "results.json").read_text())


def test_files_and_claims(run):
    out, res = run
    for f in ("results.json", "report.md", "curves.png", "frontier.png", "overlap.png",
              "features.png", "weights.npz"):
        assert (out / f).stat().st_size > 0, f
    names = {c["name"] for c in res["claims"]}
    assert names >= {"lag in training", "augmentation alone does not suppress",
                     "penalty + augmentation suppresses",
                     "longer training improves the frontier", "feature collapse",
                     "the top eigenvector aligns with the trigger"}
    assert "trigger-alone ASR" in (out / "report.md").read_text()


def test_poisoned_set_and_reported_numbers_recomputed(run):
    """Rebuild the poisoned set by hand and recompute the final ASR, clean accuracy and
    robust accuracy of the undefended long run from its saved model, with plain numpy
    bookkeeping (argmax over logits)."""
    from flax import nnx
    from ntk_poison import data, nets
    out, res = run
    r = res["results"]
    cfg = exp.Config(**CFG)
    X, y, xte, yte = data.load("digits", flatten=False, dtype=np.float32)
    X, y = data.subset(X, y, 300, seed=0)
    xte, yte = data.subset(xte, yte, 200, seed=1)
    idx = np.asarray(r["poison_idx"]["patch"])
    assert len(idx) == round(0.1 * 300) and np.all(y[idx] != 0)
    from ntk_poison.artefact import Artefact
    art = Artefact.load(out / r["artefacts"]["patch"])          # the attack's one artefact
    np.testing.assert_array_equal(art.poison_idx, idx)
    xp = X[idx].copy()
    xp[:, -3:, -3:, :] = 1.0
    np.testing.assert_allclose(np.asarray(art.x)[idx], xp, rtol=1e-6)
    assert np.all(np.asarray(art.y)[idx].argmax(1) == 0)
    # the BadNets patch by hand: a 3x3 white square in the bottom-right corner
    src = xte[yte != 0].copy()
    src[:, -3:, -3:, :] = 1.0
    model = exp.make_model(cfg, X.shape[1:], 10)
    graphdef, state = nnx.split(model)
    with np.load(out / "weights.npz") as w:
        n = sum(k.startswith("patch_none_") for k in w.files)
        leaves = [w[f"patch_none_{i}"] for i in range(n)]
    state = jax_unflatten(state, leaves)
    model = nnx.merge(graphdef, state)
    f_trig, f_clean = np.asarray(model(src)), np.asarray(model(xte))
    h = r["runs"]["patch"]["2"]["none"]
    assert h["asr_patch"][-1] == pytest.approx(np.mean(f_trig.argmax(1) == 0))
    assert h["ra_patch"][-1] == pytest.approx(np.mean(f_trig.argmax(1) == yte[yte != 0]))
    assert h["clean_acc"][-1] == pytest.approx(np.mean(f_clean.argmax(1) == yte))
    assert h["epoch"] == [0, 0.5, 1.0, 1.5, 2.0]          # probed: 2 measures an epoch
    assert r["runs"]["patch"]["2"]["aug+pen@0.1"]["epoch"] == [0, 1, 2]   # not probed: 1


def jax_unflatten(state, leaves):
    import jax
    ref, treedef = jax.tree_util.tree_flatten(state)
    assert len(ref) == len(leaves)
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(v) for v in leaves])


def test_dominated_area_against_a_grid_count():
    """The frontier's dominated area against counting grid cells (an independent oracle)."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        pts = [dict(asr=float(a), clean_acc=float(c)) for a, c in rng.uniform(size=(4, 2))]
        g = (np.arange(400) + 0.5) / 400
        A, C = np.meshgrid(g, g, indexing="ij")
        dom = np.zeros_like(A, bool)
        for p in pts:
            dom |= (A >= p["asr"]) & (C <= p["clean_acc"])
        assert cl.dominated_area(pts) == pytest.approx(dom.mean(), abs=6e-3)
    assert cl.dominated_area([dict(asr=0.0, clean_acc=1.0)]) == 1.0


def _write_cifar10(root, n=4):
    """A tiny cifar-10-batches-py folder in the python-pickle format; its test images."""
    import pickle
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        img = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        rows = img.transpose(0, 3, 1, 2).reshape(n, -1)          # channel-major rows
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": list(range(n))}, f)
    return folder, img


def test_cifar_from_a_path(tmp_path):
    """CIFAR-10 from a folder the test writes: images (n, 32, 32, 3) in [0, 1], the
    classes, and both models built for them (the ResNet with 3 input channels)."""
    folder, test_img = _write_cifar10(tmp_path)
    cfg = exp.Config(dataset="cifar10", data_path=str(folder), n_train=0, n_test=0, pad=4,
                     flip=True)
    X, y, xte, yte, c = exp.load_task(cfg)
    assert X.shape == (20, 32, 32, 3) and xte.shape == (4, 32, 32, 3) and c == 10
    np.testing.assert_allclose(xte, test_img / 255.0, rtol=1e-6)
    assert exp.make_model(cfg, X.shape[1:], 10)(xte).shape == (4, 10)
    r = exp.make_model(cfg.replace(model="preact_resnet", depth=20, width=0.25),
                       X.shape[1:], 10)
    assert type(r).__name__ == "PreActResNet"
    with pytest.raises(ValueError, match="target_class"):
        exp.load_task(cfg.replace(target_class=10))


@pytest.mark.parametrize("name, classes", [("paper_cifar10", "cifar10"),
                                           ("paper_cifar100", "cifar100")])
def test_paper_configs_load_and_validate(name, classes):
    """The shipped GPU configs are valid configs with the paper's settings."""
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.json"
    cfg = exp.Config.load(path)
    assert cfg.dataset == classes and cfg.model == "preact_resnet" and cfg.depth == 110
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == (0.1, 0.9, 5e-4, 128)
    assert cfg.flip and cfg.pad == 4
    kappas = sorted(parse_arm(a)[1] for a in cfg.arms if a.startswith("aug+pen@"))
    assert kappas == [1e2, 1e3, 1e4, 1e5, 1e6]
