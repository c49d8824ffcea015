"""Tests for ntk_poison.scenario: the shared config parts and the scenario they build,
recomputed with numpy from the raw data set (sklearn digits)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ntk_poison import data, metrics, scenario
from ntk_poison.config import Config


@dataclasses.dataclass(frozen=True)
class Cfg(scenario.DataPart, scenario.AttackPart, scenario.TargetPart, scenario.KernelPart,
          scenario.ImagePart, scenario.DetectorPart):
    n_test: int = 30
    dataset: str = "digits"
    n_train: int = 60
    n_trigger: int = 20
    cnn_n_train: int = 30
    cnn_pool: int = 2


def test_build_recomputed_with_numpy():
    cfg = Cfg()
    sc = scenario.build(cfg)
    xtr, ytr, xte, yte = data.load("digits")
    X, yl = data.subset(xtr, ytr, 60, seed=0)
    np.testing.assert_array_equal(sc.X, X)
    np.testing.assert_array_equal(sc.y, np.where(np.isin(yl, [5, 6, 7, 8, 9]), 1.0, -1.0))
    perm = np.random.default_rng(1).permutation(len(xte))
    np.testing.assert_array_equal(sc.X_test, xte[perm[:30]])
    neg = perm[~np.isin(yte[perm], [5, 6, 7, 8, 9])][:20]
    ell = np.median(np.linalg.norm(X[:, None] - X[None], axis=-1)[np.triu_indices(60, 1)])
    assert sc.length_scale == pytest.approx(ell, rel=1e-12)
    cross = np.zeros((8, 8))
    cross[4, :] = cross[:, 4] = 1.0
    cross = cross.ravel() / np.linalg.norm(cross)
    np.testing.assert_allclose(sc.X_trig, xte[neg] + 3.0 * ell * cross, atol=1e-12)
    np.testing.assert_array_equal(sc.x0_clean, xte[neg[0]])
    np.testing.assert_allclose(sc.zeta, X[sc.y < 0].mean(0) + 3.0 * ell * cross, atol=1e-12)
    np.testing.assert_allclose(sc.trigger_direction, cross, atol=1e-15)
    assert np.array_equal(sc.x0, sc.X_trig[0])
    art = sc.clone_attack(5, 1.0, seed=3)
    np.testing.assert_array_equal(art.x[-5:], np.repeat(sc.zeta[None], 5, 0))
    assert art.n_poison == 5 and art.seed == 3 and art.trigger == sc.trigger
    assert sc.describe() == f"60 training points, flat inputs of d = 64, l = {ell:.4g}"


def test_images_reduction_and_detection_splits():
    cfg = Cfg()
    sc, splits = scenario.build_for_detection(cfg, images=True)
    flat = scenario.build(cfg, n_train=30, n_test=48, n_trigger=24, pool=2)
    assert sc.X.shape == (30, 4, 4, 1) and sc.zeta.shape == (4, 4, 1) and sc.images
    np.testing.assert_array_equal(sc.X.reshape(30, -1), flat.X)
    np.testing.assert_array_equal(
        sc.X[0, :, :, 0], data.load("digits")[0][data.subset(
            *data.load("digits")[:2], 30, seed=0, return_indices=True)[2][0]]
        .reshape(4, 2, 4, 2).mean(axis=(1, 3)))                          # 2x2 mean pool
    np.testing.assert_allclose(sc.trigger_direction.ravel(), flat.trigger_direction)
    np.testing.assert_array_equal(splits.x_trig, sc.X_trig[:24])
    np.testing.assert_array_equal(splits.x_clean, sc.X_test[:24])
    np.testing.assert_array_equal(splits.x_cal, sc.X_test[24:48])
    info = sc.info()
    assert info["pool"] == 2 and info["input_shape"] == [4, 4, 1]
    assert "images mean-pooled 2x2 to 4x4x1" in scenario.describe(info)
    # a linear reduction keeps the trigger as a unit direction and re-measures l
    B = np.random.default_rng(0).standard_normal((64, 5))
    red = scenario.build(cfg).reduced(lambda A: np.asarray(A).reshape(len(A), -1) @ B)
    full = scenario.build(cfg)
    d = full.trigger_direction @ B
    np.testing.assert_allclose(red.trigger_direction, d / np.linalg.norm(d), rtol=1e-12)
    assert red.length_scale == pytest.approx(metrics.median_distance(full.X @ B))
    np.testing.assert_allclose(red.zeta, full.zeta @ B)


def test_clone_count_kernels_and_detector():
    cfg = Cfg(n_train=400, cnn_n_train=100)
    assert [scenario.clone_count(cfg, m, True) for m in (0, 1, 50, 200)] == [0, 1, 12, 50]
    assert scenario.clone_count(cfg, 50, False) == 50
    assert scenario.kernel_for("rbf", cfg, 2.5).param_dict["length_scale"] == 2.5
    assert scenario.kernel_for("nt_fc", cfg, 2.5).param_dict["depth"] == cfg.nt_depth
    assert scenario.is_image_kernel("nt_cnn") and not scenario.is_image_kernel("rbf")
    det = scenario.detector_for(cfg, np.ones(4))
    assert (det.method, det.fpr, det.tol, det.max_iters) == ("lanczos", cfg.fpr, cfg.eig_tol,
                                                            cfg.eig_max_iters)


@pytest.mark.parametrize("field,value", [
    ("dataset", "nope"), ("positive_classes", ()), ("n_train", 0), ("trigger_strength", -1.0),
    ("poison", "mixture"), ("ridge", 0.0), ("length_scale", -1.0), ("kernels", ("nope",)),
    ("nt_depth", 0), ("cnn_pool", 0), ("n_eval", 1), ("fpr", 1.5), ("eig_tol", 0.0),
    ("smooth_deltas", (0.0,)), ("eig_batch", 0), ("target_mode", "one_to_one"),
    ("target_class", 10), ("target_class", -1)])
def test_each_part_checks_its_fields(field, value):
    with pytest.raises(ValueError, match=field if field not in ("kernels",) else "nope"):
        Cfg(**{field: value})
    assert issubclass(Cfg, Config)


# --------------------------------------------------------------------------- all-to-one

def test_all_to_one_build_recomputed_with_numpy():
    """target_mode = all_to_one: centred one-hot targets over the 10 digits, triggered
    test inputs of every class but the target, zeta from the non-target training mean,
    the poison label the target's centred row; the binary build is unchanged by it."""
    cfg = Cfg(target_mode="all_to_one", target_class=3, y_target=2.0)
    sc = scenario.build(cfg)
    xtr, ytr, xte, yte = data.load("digits")
    X, yl = data.subset(xtr, ytr, 60, seed=0)
    want = np.full((60, 10), -0.1)
    want[np.arange(60), yl] = 0.9
    np.testing.assert_allclose(sc.y, want, atol=1e-15)
    np.testing.assert_allclose(sc.y.sum(1), 0.0, atol=1e-14)
    perm = np.random.default_rng(1).permutation(len(xte))
    np.testing.assert_array_equal(sc.y_test, yte[perm[:30]])
    neg = perm[yte[perm] != 3][:20]
    ell = sc.length_scale
    cross = np.zeros((8, 8))
    cross[4, :] = cross[:, 4] = 1.0
    cross = cross.ravel() / np.linalg.norm(cross)
    np.testing.assert_allclose(sc.X_trig, xte[neg] + 3.0 * ell * cross, atol=1e-12)
    np.testing.assert_allclose(sc.zeta, X[yl != 3].mean(0) + 3.0 * ell * cross, atol=1e-12)
    np.testing.assert_allclose(sc.y_target, 2.0 * (np.eye(10)[3] - 0.1), atol=1e-15)
    assert sc.multiclass and sc.info()["target_class"] == 3
    art = sc.clone_attack(4, sc.y_target)
    np.testing.assert_array_equal(art.y[-4:], np.repeat(sc.y_target[None], 4, 0))
    binary = scenario.build(Cfg(target_class=3))          # target_class unused in binary
    np.testing.assert_array_equal(binary.y, scenario.build(Cfg()).y)
    assert not binary.multiclass and "target_mode" not in binary.info()
    assert "All-to-one" in scenario.describe_targets(cfg)
    assert "+1 for classes" in scenario.describe_targets(Cfg())


def test_scenario_rates_by_hand_in_both_modes():
    """ASR, trigger-alone ASR and clean accuracy of a scenario, by enumeration: binary
    (sign f = sign y_target) and all-to-one (argmax f = target_class)."""
    bin_sc = scenario.Scenario(X=None, y=None, X_test=None, y_test=np.array([1.0, -1.0, -1.0]),
                               X_trig=None, x0_clean=None, zeta=None, trigger=None,
                               length_scale=1.0)
    assert bin_sc.attack_success_rate(np.array([0.2, -0.1, 3.0, 0.0])) == 0.5
    assert bin_sc.clean_accuracy(np.array([0.5, 0.5, -2.0])) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(bin_sc.effect(np.array([-0.5, 2.0])), [-0.5, 2.0])
    sc = dataclasses.replace(bin_sc, y_test=np.array([2, 0, 1]), target_class=2)
    f_pois = np.array([[0.1, 0.0, 0.3], [0.5, 0.1, 0.2], [0.0, 0.0, 0.9], [0.2, 0.3, 0.1]])
    f_clean = np.array([[0.4, 0.0, 0.3], [0.5, 0.1, 0.2], [0.0, 0.0, 0.9], [0.2, 0.3, 0.1]])
    assert sc.attack_success_rate(f_pois) == 0.5                 # rows 0 and 2 -> class 2
    assert sc.attack_success_rate(f_clean) == 0.25               # trigger alone: row 2
    assert sc.clean_accuracy(f_pois[:3]) == pytest.approx(2 / 3)  # row 2 is class 1: no
    np.testing.assert_allclose(sc.effect(np.array([[3.0, 4.0, 0.0]])), [5.0])
