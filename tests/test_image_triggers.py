"""Tests for the blend and warp triggers, the BadNets preset and robust accuracy.

Oracles: the blend's closed form; scipy.ndimage.map_coordinates (order 1) for the
bilinear sampling and, with a numpy recomputation of WaNet's field and grid, for the
whole warp; hand-written pixel values and decisions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from ntk_poison import image_triggers, metrics, triggers


def _warp_oracle(x, k, strength, seed):
    """WaNet's warp recomputed with numpy + scipy: x (n, H, W, C)."""
    n, H, W, C = x.shape
    f0 = np.random.default_rng(seed).uniform(-1.0, 1.0, (k, k, 2))
    field = f0 / np.mean(np.abs(f0))
    rr, cc = np.meshgrid(np.linspace(0, k - 1, H), np.linspace(0, k - 1, W), indexing="ij")
    up = np.stack([ndimage.map_coordinates(field[..., a], [rr, cc], order=1)
                   for a in range(2)], -1)
    ii, jj = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    gr = np.clip(ii + strength * up[..., 0] * (H - 1) / (2 * H), 0, H - 1)
    gc = np.clip(jj + strength * up[..., 1] * (W - 1) / (2 * W), 0, W - 1)
    return np.stack([np.stack([ndimage.map_coordinates(x[i, ..., c], [gr, gc], order=1,
                                                       mode="nearest")
                               for c in range(C)], -1) for i in range(n)])


# ----------------------------------------------------------------- blend

@pytest.mark.parametrize("shape", [(6, 6, 1), (5, 4, 3), (5, 4)])
def test_blend_is_the_closed_form(shape, rng):
    x = rng.uniform(size=(4,) + shape)
    t = np.random.default_rng(7).uniform(0.0, 1.0, shape)
    trig = triggers.BlendTrigger(alpha=0.3, seed=7)
    np.testing.assert_allclose(trig.apply(x), 0.7 * x + 0.3 * t, rtol=1e-13)
    flat = x.reshape(4, -1)
    np.testing.assert_allclose(triggers.BlendTrigger(0.3, 7, image_shape=shape).apply(flat),
                               (0.7 * x + 0.3 * t).reshape(4, -1), rtol=1e-13)
    np.testing.assert_allclose(trig.direction(shape), t / np.linalg.norm(t), rtol=1e-13)
    d = 0.3 * (t - x)
    want = d / np.linalg.norm(d.reshape(4, -1), axis=1).reshape((4,) + (1,) * len(shape))
    np.testing.assert_allclose(trig.displacement(x), want, rtol=1e-12)
    m = d.mean(0)
    np.testing.assert_allclose(trig.direction(shape, x), m / np.linalg.norm(m), rtol=1e-12)
    # a user pattern
    p = rng.uniform(size=shape)
    np.testing.assert_allclose(triggers.BlendTrigger(alpha=0.2, pattern=p).apply(x),
                               0.8 * x + 0.2 * p, rtol=1e-13)
    assert triggers.BlendTrigger().alpha == 0.2


# ----------------------------------------------------------------- bilinear + warp

@pytest.mark.parametrize("H,W,C", [(7, 5, 1), (6, 6, 3)])
def test_bilinear_sample_equals_scipy_map_coordinates(H, W, C, rng):
    img = rng.standard_normal((H, W, C))
    grid = rng.uniform(0, 1, (9, 4, 2)) * np.array([H - 1, W - 1])
    grid[0, 0] = [H - 1, W - 1]                       # the far corner and the edges
    grid[0, 1] = [H - 1, 1.5]
    grid[0, 2] = [2.0, W - 1]
    grid[0, 3] = [0.0, 0.0]
    got = np.asarray(image_triggers.bilinear_sample(img, grid))
    want = np.stack([ndimage.map_coordinates(img[..., c], [grid[..., 0], grid[..., 1]],
                                             order=1, mode="nearest") for c in range(C)], -1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(8, 8, 1), (9, 7, 3), (8, 8)])
def test_warp_at_zero_strength_is_the_identity(shape, rng):
    x = rng.uniform(size=(3,) + shape)
    np.testing.assert_array_equal(triggers.WarpTrigger(strength=0.0).apply(x), x)
    flat = x.reshape(3, -1)
    img = shape if len(shape) == 3 else None
    np.testing.assert_array_equal(
        triggers.WarpTrigger(strength=0.0, image_shape=img).apply(flat), flat)


@pytest.mark.parametrize("k,strength,seed", [(4, 0.5, 0), (3, 2.0, 5), (4, 40.0, 1)])
def test_warp_equals_a_numpy_scipy_recomputation(k, strength, seed, rng):
    x = rng.uniform(size=(3, 10, 9, 2))
    trig = triggers.WarpTrigger(k=k, strength=strength, seed=seed)
    want = _warp_oracle(x, k, strength, seed)
    np.testing.assert_allclose(trig.apply(x), want, rtol=1e-10, atol=1e-12)
    g = trig.grid((10, 9))                                   # clipped to the image
    assert g.min() >= 0 and g[..., 0].max() <= 9 and g[..., 1].max() <= 8
    if strength == 40.0:
        assert g[..., 0].max() == 9 and g.min() == 0         # the clip is active
    flat = triggers.WarpTrigger(k=k, strength=strength, seed=seed, image_shape=(10, 9, 2))
    np.testing.assert_allclose(flat.apply(x.reshape(3, -1)), want.reshape(3, -1),
                               rtol=1e-10, atol=1e-12)
    u = trig.displacement(x)
    d = want - x
    np.testing.assert_allclose(u[0], d[0] / np.linalg.norm(d[0]), rtol=1e-8, atol=1e-10)


def test_flow_field_normalisation_against_numpy():
    for k, seed in [(4, 0), (2, 3), (6, 11)]:
        f = triggers.WarpTrigger(k=k, seed=seed).flow()
        f0 = np.random.default_rng(seed).uniform(-1.0, 1.0, (k, k, 2))
        np.testing.assert_allclose(f, f0 * (f0.size / np.abs(f0).sum()), rtol=1e-13)
        np.testing.assert_allclose(np.abs(f).mean(), 1.0, rtol=1e-13)


def test_warp_determinism_noise_mode_and_round_trip(rng):
    x = rng.uniform(size=(4, 8, 8, 1))
    a, b = triggers.WarpTrigger(seed=3), triggers.WarpTrigger(seed=3)
    np.testing.assert_array_equal(a.apply(x), b.apply(x))
    assert not np.allclose(a.apply(x), triggers.WarpTrigger(seed=4).apply(x))
    nz = triggers.WarpTrigger(seed=3, noise=True)
    np.testing.assert_array_equal(nz.apply(x, 9), nz.apply(x, 9))
    assert not np.allclose(nz.apply(x, 9), nz.apply(x, 10))
    assert not np.allclose(nz.apply(x, 9), a.apply(x))
    with pytest.raises(ValueError, match="key"):
        nz.apply(x)
    for trig in [triggers.WarpTrigger(k=3, strength=0.7, seed=2, noise=True,
                                      image_shape=(8, 8, 1)),
                 triggers.BlendTrigger(alpha=0.4, seed=5),
                 triggers.BlendTrigger(pattern=rng.uniform(size=(8, 8, 1)))]:
        back = triggers.from_dict(json.loads(json.dumps(trig.to_dict())))
        assert back == trig and type(back) is type(trig) and hash(back) == hash(trig)
        np.testing.assert_array_equal(back.apply(x, 1), trig.apply(x, 1))


def test_registry_has_blend_and_warp():
    assert set(triggers.available()) >= {"cross", "patch", "blend", "warp"}
    assert triggers.get("blend") == triggers.BlendTrigger(alpha=0.2)
    assert triggers.get("warp", k=4) == triggers.WarpTrigger()
    assert triggers.WarpTrigger is image_triggers.WarpTrigger
    assert (triggers.WarpTrigger().k, triggers.WarpTrigger().strength) == (4, 0.5)


# ----------------------------------------------------------------- BadNets preset

def test_badnets_preset_pixels_by_hand():
    t = triggers.badnets()
    assert (t.size, t.value, t.corner) == (3, 1.0, "bottom_right")
    assert triggers.PatchTrigger().size == 4                  # the old default is kept
    x = np.full((2, 5, 5, 1), 0.25)
    xt = t.apply(x)
    want = np.full((5, 5), 0.25)
    want[2:5, 2:5] = 1.0
    np.testing.assert_array_equal(xt[0, ..., 0], want)
    np.testing.assert_array_equal(xt[1, ..., 0], want)
    np.testing.assert_array_equal(triggers.badnets((5, 5, 1)).apply(x.reshape(2, 25)),
                                  np.tile(want.reshape(1, 25), (2, 1)))


# ----------------------------------------------------------------- robust accuracy

def test_robust_accuracy_by_hand():
    f = np.array([0.5, -0.2, 0.3, -1.0])               # decisions +1, -1, +1, -1
    assert metrics.robust_accuracy(f, [1, 1, -1, -1]) == 0.5
    assert metrics.robust_accuracy(np.stack([f, -f]), [1, 1, -1, -1]).tolist() == [.5, .5]
    fm = np.array([[0.1, 0.9, 0.0],                     # -> 1 (true 1)
                   [0.8, 0.1, 0.1],                     # -> 0 = the target (true 2)
                   [0.0, 0.2, 0.7],                     # -> 2 (true 1)
                   [0.3, 0.1, 0.6]])                    # -> 2 (true 2)
    labels = [1, 2, 1, 2]
    assert metrics.robust_accuracy(fm, labels, multiclass=True) == 0.5
    assert metrics.attack_success_rate(fm, 0, multiclass=True) == 0.25   # ASR + RA <= 1
    with pytest.raises(ValueError, match="labels"):
        metrics.robust_accuracy(fm, [1, 2], multiclass=True)


# ----------------------------------------------------------------- bad input

@pytest.mark.parametrize("make,name", [
    (lambda: triggers.BlendTrigger(alpha=-0.1), "alpha"),
    (lambda: triggers.BlendTrigger(alpha=1.5), "alpha"),
    (lambda: triggers.BlendTrigger(seed=-1), "seed"),
    (lambda: triggers.BlendTrigger(pattern=[1.0, 2.0]), "pattern"),
    (lambda: triggers.WarpTrigger(k=1), "`k`"),
    (lambda: triggers.WarpTrigger(k=2.5), "`k`"),
    (lambda: triggers.WarpTrigger(strength=-0.5), "strength"),
    (lambda: triggers.WarpTrigger(noise="yes"), "noise"),
    (lambda: triggers.WarpTrigger(image_shape=(4,)), "image_shape"),
    (lambda: triggers.WarpTrigger(image_shape=(3, 3)).apply(np.zeros((2, 4, 4))),
     "image_shape"),
    (lambda: triggers.BlendTrigger(image_shape=(3, 3)).apply(np.zeros((2, 10))),
     "image_shape"),
    (lambda: triggers.BlendTrigger(pattern=np.zeros((3, 3))).apply(np.zeros((1, 4, 4))),
     "pattern"),
    (lambda: triggers.WarpTrigger().direction((4, 4)), "`x`"),
    (lambda: triggers.WarpTrigger().apply(np.zeros((2, 7))), "image_shape"),
])
def test_bad_input_is_a_value_error_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()
