"""Tests for ntk_poison.triggers: the cross and patch triggers, serialisation, registry."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from ntk_poison import triggers


@pytest.mark.parametrize("shape", [(64,), (8, 8, 1), (6, 6, 3), (108,)])
def test_cross_direction_is_unit_and_is_the_shift_per_strength(shape, rng):
    t = triggers.CrossTrigger(strength=0.7)
    x = rng.standard_normal((5,) + shape)
    u = t.direction(shape)
    assert u.shape == shape
    np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-12)
    xt = t.apply(x)
    assert xt.shape == x.shape
    for i in range(5):
        np.testing.assert_allclose((xt[i] - x[i]) / 0.7, u, atol=1e-12)
    # Every input moves by exactly `strength` in input norm.
    np.testing.assert_allclose(np.linalg.norm((xt - x).reshape(5, -1), axis=1), 0.7)


def test_cross_matches_cross_pattern_row_and_col(rng):
    t = triggers.CrossTrigger(strength=2.0, row=1, col=5)
    x = rng.standard_normal((3, 8, 8, 1))
    want = triggers.apply_additive(x, triggers.cross_pattern((8, 8, 1), 1, 5), 2.0)
    np.testing.assert_allclose(t.apply(x), want, atol=1e-12)
    u = t.direction((8, 8, 1))
    assert set(np.flatnonzero(u[..., 0].any(axis=1))) == set(range(8))  # full column
    assert np.count_nonzero(u[1]) == 8 and np.count_nonzero(u[:, 5]) == 8


def test_flat_inputs_match_the_image_by_size(rng):
    t = triggers.CrossTrigger(strength=1.0)
    x_img = rng.standard_normal((2, 8, 8, 1))
    np.testing.assert_allclose(t.apply(x_img.reshape(2, -1)),
                               t.apply(x_img).reshape(2, -1), atol=1e-12)
    with pytest.raises(ValueError, match="image_shape"):
        t.apply(rng.standard_normal((2, 10)))  # 10 is neither s^2 nor 3 s^2
    t2 = triggers.CrossTrigger(strength=1.0, image_shape=(2, 5))
    assert t2.apply(rng.standard_normal((2, 10))).shape == (2, 10)


def test_stochastic_cross_needs_a_key_and_is_reproducible(rng):
    t = triggers.CrossTrigger(strength=1.0, stochastic=True, jitter=0.3)
    x = rng.standard_normal((50, 16))
    with pytest.raises(ValueError, match="key"):
        t.apply(x)
    a = t.apply(x, key=3)
    np.testing.assert_array_equal(a, t.apply(x, key=jax.random.PRNGKey(3)))
    assert not np.allclose(a, t.apply(x, key=4))
    u = t.direction((16,))
    shifts = (a - x) @ u  # every shift is along the pattern ...
    np.testing.assert_allclose(a - x, shifts[:, None] * u[None], atol=1e-12)
    assert np.std(shifts) > 0.1 and abs(np.mean(shifts) - 1.0) < 0.15  # ... with jitter


def test_deterministic_cross_ignores_the_key(rng):
    t = triggers.CrossTrigger(strength=0.5)
    x = rng.standard_normal((3, 9))
    np.testing.assert_array_equal(t.apply(x), t.apply(x, key=7))


def test_patch_values_and_direction(rng):
    t = triggers.PatchTrigger(size=2, value=0.9, corner="top_left")
    x = rng.uniform(size=(4, 5, 5, 1))
    xt = t.apply(x)
    np.testing.assert_array_equal(xt[:, :2, :2], 0.9)
    np.testing.assert_array_equal(xt[:, 2:], x[:, 2:])
    np.testing.assert_array_equal(xt[:, :, 2:], x[:, :, 2:])
    # Without inputs: the unit mask; with inputs: the normalised mean difference.
    m = t.direction((5, 5, 1))
    np.testing.assert_allclose(np.linalg.norm(m), 1.0)
    np.testing.assert_allclose(m[:2, :2], 0.5)
    assert np.count_nonzero(m) == 4
    diff = (xt - x).mean(axis=0)
    np.testing.assert_allclose(t.direction((5, 5, 1), x), diff / np.linalg.norm(diff))
    # Flat inputs are matched by size.
    np.testing.assert_array_equal(t.apply(x.reshape(4, -1)), xt.reshape(4, -1))
    with pytest.raises(ValueError, match="unchanged"):
        t.direction((5, 5, 1), xt)  # already patched: the patch changes nothing


@pytest.mark.parametrize("trig", [
    triggers.CrossTrigger(strength=0.25),
    triggers.CrossTrigger(strength=1.5, row=2, col=3, stochastic=True, jitter=0.1,
                          image_shape=(4, 4)),
    triggers.PatchTrigger(),
    triggers.PatchTrigger(size=3, value=0.5, corner="bottom_left", image_shape=(6, 6, 3)),
])
def test_to_dict_from_dict_round_trip_through_json(trig):
    d = trig.to_dict()
    assert d["kind"] == trig.kind
    back = triggers.from_dict(json.loads(json.dumps(d)))
    assert back == trig and type(back) is type(trig)
    assert type(trig).from_dict(d) == trig


def test_registry_builds_by_kind():
    assert set(triggers.available()) >= {"cross", "patch"}
    assert triggers.get("cross", strength=0.3) == triggers.CrossTrigger(0.3)
    assert triggers.get("patch", size=2) == triggers.PatchTrigger(size=2)
    with pytest.raises(ValueError, match="kind"):
        triggers.get("wobble")  # not registered
    with pytest.raises(ValueError, match="parameters"):
        triggers.get("cross", strenght=1.0)


@pytest.mark.parametrize("make", [
    lambda: triggers.CrossTrigger(strength=-1.0),
    lambda: triggers.CrossTrigger(strength=float("nan")),
    lambda: triggers.CrossTrigger(strength=1.0, jitter=-0.1),
    lambda: triggers.CrossTrigger(strength=1.0, row=1.5),
    lambda: triggers.CrossTrigger(strength=1.0, stochastic="yes"),
    lambda: triggers.PatchTrigger(size=0),
    lambda: triggers.PatchTrigger(corner="middle"),
    lambda: triggers.PatchTrigger(value=float("inf")),
    lambda: triggers.PatchTrigger(image_shape=(4,)),
    lambda: triggers.from_dict({"strength": 1.0}),
    lambda: triggers.from_dict({"kind": "cross", "strength": 1.0, "bogus": 2}),
    lambda: triggers.PatchTrigger.from_dict({"kind": "cross", "strength": 1.0}),
])
def test_bad_triggers_are_value_errors(make):
    with pytest.raises(ValueError):
        make()


def test_bad_inputs_are_value_errors(rng):
    t = triggers.CrossTrigger(strength=1.0, row=9)
    with pytest.raises(ValueError, match="outside"):
        t.apply(rng.standard_normal((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="dimensions"):
        triggers.CrossTrigger(1.0).apply(rng.standard_normal(16))  # not a batch
    with pytest.raises(ValueError, match="image shape"):
        triggers.CrossTrigger(1.0, image_shape=(3, 3)).apply(rng.standard_normal((1, 4, 4)))


# ----------------------------------------------------------------- patterns

@pytest.mark.parametrize("corner,rows,cols", [
    ("bottom_right", slice(5, 8), slice(3, 6)),
    ("bottom_left", slice(5, 8), slice(0, 3)),
    ("top_right", slice(0, 3), slice(3, 6)),
    ("top_left", slice(0, 3), slice(0, 3)),
])
@pytest.mark.parametrize("image_shape", [(8, 6), (8, 6, 2)])
def test_patch_mask_mask_and_pattern(corner, rows, cols, image_shape):
    mask, pattern = triggers.patch_mask(image_shape, size=3, value=0.8, corner=corner)
    assert mask.shape == image_shape and pattern.shape == image_shape
    expected = np.zeros(image_shape)
    expected[rows, cols] = 1.0
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(pattern, 0.8 * expected, rtol=1e-7)
    assert mask.sum() == 9 * (image_shape[2] if len(image_shape) == 3 else 1)


def test_apply_patch_values_on_images_and_flat_inputs(rng):
    mask, pattern = triggers.patch_mask((6, 6, 1), size=2, value=1.0)
    x = rng.uniform(0, 0.5, size=(3, 6, 6, 1)).astype(np.float32)
    xp = triggers.apply_patch(x, mask, pattern)
    assert xp.shape == x.shape and xp.dtype == np.float32
    np.testing.assert_array_equal(xp[:, 4:, 4:, :], 1.0)
    keep = np.ones((6, 6, 1), bool)
    keep[4:, 4:, :] = False
    np.testing.assert_array_equal(xp[:, keep], x[:, keep])
    # flat inputs (n, 36) get the same stamp
    xf = triggers.apply_patch(x.reshape(3, 36), mask, pattern)
    np.testing.assert_array_equal(xf, xp.reshape(3, 36))
    # idempotent
    np.testing.assert_array_equal(triggers.apply_patch(xp, mask, pattern), xp)


@pytest.mark.parametrize("kwargs", [{"image_shape": (8,)}, {"image_shape": (4, 4), "size": 5},
                                    {"image_shape": (4, 4), "size": 0},
                                    {"image_shape": (4, 4), "corner": "middle"}])
def test_patch_mask_bad_inputs(kwargs):
    with pytest.raises(ValueError):
        triggers.patch_mask(**kwargs)


def test_apply_patch_shape_mismatch():
    mask, pattern = triggers.patch_mask((4, 4, 1), size=2)
    with pytest.raises(ValueError):
        triggers.apply_patch(np.zeros((2, 5, 5, 1)), mask, pattern)


@pytest.mark.parametrize("image_shape,row,col", [((7, 5), None, None), ((6, 6, 3), 1, 4),
                                                 ((4, 8, 1), 0, 7)])
def test_cross_pattern_is_a_unit_norm_plus_sign(image_shape, row, col):
    pat = triggers.cross_pattern(image_shape, row=row, col=col)
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
        triggers.cross_pattern(**kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_additive_moves_every_input_by_strength(dtype, rng):
    pat = triggers.cross_pattern((6, 6, 1))
    x = rng.uniform(size=(4, 6, 6, 1)).astype(dtype)
    xt = triggers.apply_additive(x, pat, 0.3)
    assert xt.shape == x.shape and xt.dtype == dtype
    np.testing.assert_allclose(xt - x, np.broadcast_to(0.3 * pat, x.shape),
                               atol=4 * np.finfo(dtype).eps)
    np.testing.assert_allclose(np.linalg.norm((xt - x).reshape(4, -1), axis=1), 0.3,
                               rtol=10 * np.finfo(dtype).eps)
    # flat inputs are matched by size
    xf = triggers.apply_additive(x.reshape(4, 36), pat, 0.3)
    np.testing.assert_array_equal(xf, xt.reshape(4, 36))
    with pytest.raises(ValueError):
        triggers.apply_additive(x, pat, -0.1)
    with pytest.raises(ValueError):
        triggers.apply_additive(np.zeros((2, 5, 5, 1)), pat, 0.1)
