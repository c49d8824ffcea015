"""Tests for ntk_poison.poison: clone clusters, near clones and patch triggers."""

from __future__ import annotations

import numpy as np
import pytest

from ntk_poison import poison


@pytest.mark.parametrize("m", [0, 1, 7])
@pytest.mark.parametrize("input_shape", [(3,), (4, 4, 1)])
def test_clone_cluster_appends_exactly_m_copies_at_the_end(m, input_shape, rng):
    n = 5
    X = rng.standard_normal((n,) + input_shape)
    y = rng.standard_normal(n)
    zeta = rng.standard_normal(input_shape)
    Xp, yp = poison.clone_cluster(X, y, zeta, 0.75, m)
    assert Xp.shape == (n + m,) + input_shape and yp.shape == (n + m,)
    assert Xp.dtype == X.dtype and yp.dtype == y.dtype
    np.testing.assert_array_equal(Xp[:n], X)
    np.testing.assert_array_equal(yp[:n], y)
    for i in range(n, n + m):
        np.testing.assert_array_equal(Xp[i], zeta)
        assert yp[i] == 0.75


def test_clone_cluster_m0_is_identity(rng):
    X = rng.standard_normal((4, 2))
    y = rng.standard_normal(4)
    Xp, yp = poison.clone_cluster(X, y, np.ones(2), 1.0, 0)
    np.testing.assert_array_equal(Xp, X)
    np.testing.assert_array_equal(yp, y)


def test_clone_cluster_vector_targets(rng):
    X = rng.standard_normal((4, 2))
    Y = rng.standard_normal((4, 3))
    yt = np.array([0.0, 1.0, 0.0])
    Xp, Yp = poison.clone_cluster(X, Y, np.zeros(2), yt, 2)
    assert Yp.shape == (6, 3)
    np.testing.assert_array_equal(Yp[4:], np.stack([yt, yt]))
    np.testing.assert_array_equal(Yp[:4], Y)


def test_clone_cluster_accepts_whole_float_m(rng):
    X, y = rng.standard_normal((3, 2)), rng.standard_normal(3)
    Xp, _ = poison.clone_cluster(X, y, np.zeros(2), 1.0, 2.0)
    assert Xp.shape == (5, 2)


@pytest.mark.parametrize("case", ["m_negative", "m_fraction", "m_nan", "zeta_shape",
                                  "zeta_batch", "y_target_shape", "y_target_scalar_for_2d",
                                  "rows_mismatch", "integer_y", "nan_zeta"])
def test_clone_cluster_bad_inputs_are_value_errors(case, rng):
    X = rng.standard_normal((4, 3))
    y = rng.standard_normal(4)
    zeta = rng.standard_normal(3)
    args = dict(X=X, y=y, zeta=zeta, y_target=1.0, m=2)
    if case == "m_negative":
        args["m"] = -1
    elif case == "m_fraction":
        args["m"] = 1.5
    elif case == "m_nan":
        args["m"] = float("nan")
    elif case == "zeta_shape":
        args["zeta"] = np.zeros(4)
    elif case == "zeta_batch":
        args["zeta"] = np.zeros((1, 3))
    elif case == "y_target_shape":
        args["y_target"] = np.array([1.0, 0.0])
    elif case == "y_target_scalar_for_2d":
        args["y"] = rng.standard_normal((4, 2))
        args["y_target"] = 1.0
    elif case == "rows_mismatch":
        args["y"] = y[:3]
    elif case == "integer_y":
        args["y"] = np.arange(4)
    elif case == "nan_zeta":
        args["zeta"] = np.array([0.0, np.nan, 1.0])
    with pytest.raises(ValueError):
        poison.clone_cluster(**args)


@pytest.mark.parametrize("r", [0.0, 1e-3, 0.25, 3.0])
@pytest.mark.parametrize("shape", [(5,), (4, 4, 1)])
def test_near_clone_is_at_distance_exactly_r(r, shape, rng):
    x0 = rng.standard_normal(shape)
    zeta = poison.near_clone(x0, r, seed=3)
    assert zeta.shape == shape
    np.testing.assert_allclose(np.linalg.norm(zeta - x0), r, rtol=1e-14, atol=1e-15)
    # deterministic in the seed, different across seeds
    np.testing.assert_array_equal(zeta, poison.near_clone(x0, r, seed=3))
    if r > 0:
        assert not np.allclose(zeta, poison.near_clone(x0, r, seed=4))


def test_near_clone_along_a_direction(rng):
    x0 = rng.standard_normal(3)
    d = np.array([3.0, 0.0, 4.0])
    zeta = poison.near_clone(x0, 0.5, direction=d)
    np.testing.assert_allclose(zeta, x0 + 0.5 * np.array([0.6, 0.0, 0.8]), rtol=1e-15)


@pytest.mark.parametrize("kwargs", [{"r": -0.1}, {"r": 1.0, "direction": np.zeros(3)},
                                    {"r": 1.0, "direction": np.ones(2)}])
def test_near_clone_bad_inputs(kwargs):
    with pytest.raises(ValueError):
        poison.near_clone(np.zeros(3), **kwargs)


@pytest.mark.parametrize("corner,rows,cols", [
    ("bottom_right", slice(5, 8), slice(3, 6)),
    ("bottom_left", slice(5, 8), slice(0, 3)),
    ("top_right", slice(0, 3), slice(3, 6)),
    ("top_left", slice(0, 3), slice(0, 3)),
])
@pytest.mark.parametrize("image_shape", [(8, 6), (8, 6, 2)])
def test_patch_trigger_mask_and_pattern(corner, rows, cols, image_shape):
    mask, pattern = poison.patch_trigger(image_shape, size=3, value=0.8, corner=corner)
    assert mask.shape == image_shape and pattern.shape == image_shape
    expected = np.zeros(image_shape)
    expected[rows, cols] = 1.0
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(pattern, 0.8 * expected, rtol=1e-7)
    assert mask.sum() == 9 * (image_shape[2] if len(image_shape) == 3 else 1)


def test_apply_patch_values_on_images_and_flat_inputs(rng):
    mask, pattern = poison.patch_trigger((6, 6, 1), size=2, value=1.0)
    x = rng.uniform(0, 0.5, size=(3, 6, 6, 1)).astype(np.float32)
    xp = poison.apply_patch(x, mask, pattern)
    assert xp.shape == x.shape and xp.dtype == np.float32
    np.testing.assert_array_equal(xp[:, 4:, 4:, :], 1.0)
    keep = np.ones((6, 6, 1), bool)
    keep[4:, 4:, :] = False
    np.testing.assert_array_equal(xp[:, keep], x[:, keep])
    # flat inputs (n, 36) get the same stamp
    xf = poison.apply_patch(x.reshape(3, 36), mask, pattern)
    np.testing.assert_array_equal(xf, xp.reshape(3, 36))
    # idempotent
    np.testing.assert_array_equal(poison.apply_patch(xp, mask, pattern), xp)


@pytest.mark.parametrize("kwargs", [{"image_shape": (8,)}, {"image_shape": (4, 4), "size": 5},
                                    {"image_shape": (4, 4), "size": 0},
                                    {"image_shape": (4, 4), "corner": "middle"}])
def test_patch_trigger_bad_inputs(kwargs):
    with pytest.raises(ValueError):
        poison.patch_trigger(**kwargs)


def test_apply_patch_shape_mismatch():
    mask, pattern = poison.patch_trigger((4, 4, 1), size=2)
    with pytest.raises(ValueError):
        poison.apply_patch(np.zeros((2, 5, 5, 1)), mask, pattern)


@pytest.mark.parametrize("image_shape,row,col", [((7, 5), None, None), ((6, 6, 3), 1, 4),
                                                 ((4, 8, 1), 0, 7)])
def test_cross_pattern_is_a_unit_norm_plus_sign(image_shape, row, col):
    pat = poison.cross_pattern(image_shape, row=row, col=col)
    H, W = image_shape[:2]
    r = H // 2 if row is None else row
    c = W // 2 if col is None else col
    assert pat.shape == image_shape
    np.testing.assert_allclose(np.linalg.norm(pat), 1.0, rtol=1e-15)
    support = np.zeros(image_shape, bool)
    support[r, ...] = True
    support[:, c, ...] = True
    assert np.all(pat[~support] == 0)
    # constant on its support: H + W - 1 pixels per channel
    C = image_shape[2] if len(image_shape) == 3 else 1
    np.testing.assert_allclose(pat[support], 1.0 / np.sqrt((H + W - 1) * C), rtol=1e-15)


@pytest.mark.parametrize("kwargs", [{"image_shape": (5,)}, {"image_shape": (4, 4), "row": 4},
                                    {"image_shape": (4, 4), "col": -1}])
def test_cross_pattern_bad_inputs(kwargs):
    with pytest.raises(ValueError):
        poison.cross_pattern(**kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_additive_moves_every_input_by_strength(dtype, rng):
    pat = poison.cross_pattern((6, 6, 1))
    x = rng.uniform(size=(4, 6, 6, 1)).astype(dtype)
    xt = poison.apply_additive(x, pat, 0.3)
    assert xt.shape == x.shape and xt.dtype == dtype
    np.testing.assert_allclose(xt - x, np.broadcast_to(0.3 * pat, x.shape),
                               atol=4 * np.finfo(dtype).eps)
    np.testing.assert_allclose(np.linalg.norm((xt - x).reshape(4, -1), axis=1), 0.3,
                               rtol=10 * np.finfo(dtype).eps)
    # flat inputs are matched by size
    xf = poison.apply_additive(x.reshape(4, 36), pat, 0.3)
    np.testing.assert_array_equal(xf, xt.reshape(4, 36))
    with pytest.raises(ValueError):
        poison.apply_additive(x, pat, -0.1)
    with pytest.raises(ValueError):
        poison.apply_additive(np.zeros((2, 5, 5, 1)), pat, 0.1)
