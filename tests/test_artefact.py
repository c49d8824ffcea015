"""Tests for ntk_poison.artefact: the one-file attack artefact and its builders."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import numpy as np
import pytest

from ntk_poison import artefact, poison, triggers
from ntk_poison.artefact import Artefact


def _clean(rng, n=20, d=16):
    X = rng.standard_normal((n, d))
    y = np.where(rng.standard_normal(n) > 0, 1.0, -1.0)
    return X, y


def _example(rng):
    X, y = _clean(rng)
    trig = triggers.CrossTrigger(strength=0.5, stochastic=True, jitter=0.2)
    return artefact.backdoor_attack(X, y, trig, 1.0, n_poison=4, seed=3,
                                    meta={"dataset": "synthetic", "zeta": None, "r": 0.1,
                                          "shape": (4, 4), "arr": np.arange(3)})


# ----------------------------------------------------------------- save / load

def test_save_load_round_trip(tmp_path, rng):
    a = _example(rng)
    path = a.save(tmp_path / "attack.npz")
    assert path == tmp_path / "attack.npz" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["attack.npz"]  # one file, no tmp
    b = Artefact.load(path)
    assert b == a
    for name in ("x", "y", "poison_idx"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name))
        assert getattr(b, name).dtype == getattr(a, name).dtype
    assert b.trigger == a.trigger and isinstance(b.trigger, triggers.CrossTrigger)
    assert b.meta == a.meta and b.meta["shape"] == [4, 4] and b.meta["arr"] == [0, 1, 2]
    assert b.target == 1.0 and b.seed == 3 and b.version == artefact.FORMAT_VERSION


def test_round_trip_vector_target_images_and_no_trigger(tmp_path, rng):
    X = rng.standard_normal((6, 4, 4, 1)).astype(np.float32)
    Y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 6)]
    a = artefact.clone_attack(X, Y, np.zeros((4, 4, 1)), np.array([0.0, 1.0, 0.0]), 2)
    b = Artefact.load(a.save(tmp_path / "a.npz"))
    assert b == a and b.trigger is None and b.target == (0.0, 1.0, 0.0)
    assert b.x.dtype == np.float32


def test_loading_never_unpickles(tmp_path, rng, monkeypatch):
    a = _example(rng)
    path = a.save(tmp_path / "a.npz")
    calls = []
    real = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle"))
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    Artefact.load(path)
    assert calls == [False]


def test_truncated_file_is_corrupt(tmp_path, rng):
    path = _example(rng).save(tmp_path / "a.npz")
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 10):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="corrupt"):
            Artefact.load(path)


def test_flipped_bytes_are_corrupt(tmp_path, rng):
    path = _example(rng).save(tmp_path / "a.npz")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:  # flip a byte inside the stored x array
        info = z.getinfo("x.npy")
    pos = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        Artefact.load(path)


def _rewrite(path, out, change_arrays=None, change_header=None):
    """Re-save a valid artefact's members with changes, keeping the OLD digest."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays.pop("header")[()]))
    if change_arrays:
        change_arrays(arrays)
    if change_header:
        change_header(header)
    with open(out, "wb") as f:
        np.savez(f, header=np.array(json.dumps(header)), **arrays)


def test_changed_data_or_header_is_a_hash_mismatch(tmp_path, rng):
    path = _example(rng).save(tmp_path / "a.npz")

    def bump_x(arrays):
        arrays["x"] = arrays["x"].copy()
        arrays["x"][0, 0] += 1e-9

    def move_poison(arrays):
        arrays["poison_idx"] = arrays["poison_idx"].copy()
        arrays["poison_idx"][0] = 0

    def relabel(header):
        header["target"] = -1.0

    for i, kw in enumerate([dict(change_arrays=bump_x), dict(change_arrays=move_poison),
                            dict(change_header=relabel)]):
        out = tmp_path / f"bad{i}.npz"
        _rewrite(path, out, **kw)
        with pytest.raises(ValueError, match="corrupt.*sha256"):
            Artefact.load(out)


def test_wrong_version_names_found_and_supported(tmp_path, rng):
    a = _example(rng)
    header = a._header()
    header["version"] = 99
    arrays = {k: np.asarray(getattr(a, k)) for k in ("x", "y", "poison_idx")}
    path = artefact._write(tmp_path / "v99.npz", arrays, header)  # a valid digest
    with pytest.raises(ValueError, match=r"version 99.*supports version 1"):
        Artefact.load(path)
    with pytest.raises(ValueError, match="version"):
        dataclasses.replace(a, version=2)


def test_missing_file_and_non_artefact_npz(tmp_path):
    with pytest.raises(ValueError, match="No artefact"):
        Artefact.load(tmp_path / "nope.npz")
    other = tmp_path / "other.npz"
    with open(other, "wb") as f:
        np.savez(f, x=np.zeros(3))
    with pytest.raises(ValueError, match="not an ntk-poison artefact"):
        Artefact.load(other)


# ----------------------------------------------------------------- the dataclass

def test_views_and_immutability(rng):
    a = _example(rng)
    assert a.is_poison.dtype == bool and a.is_poison.sum() == 4 == a.n_poison
    np.testing.assert_array_equal(np.flatnonzero(a.is_poison), a.poison_idx)
    xc, yc = a.clean()
    assert xc.shape[0] == a.n - 4 and yc.shape == (a.n - 4,)
    xp, yp = a.poisons()
    np.testing.assert_array_equal(yp, 1.0)
    with pytest.raises(ValueError):
        a.x[0, 0] = 5.0  # read-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.seed = 4


@pytest.mark.parametrize("case", ["idx_range", "idx_repeat", "idx_float", "seed",
                                  "meta_type", "meta_json", "trigger", "y_int", "rows"])
def test_bad_artefacts_are_value_errors(case, rng):
    X, y = _clean(rng, n=5, d=3)
    kw = dict(x=X, y=y, poison_idx=np.array([4]))
    if case == "idx_range":
        kw["poison_idx"] = np.array([5])
    elif case == "idx_repeat":
        kw["poison_idx"] = np.array([1, 1])
    elif case == "idx_float":
        kw["poison_idx"] = np.array([1.0])
    elif case == "seed":
        kw["seed"] = -1
    elif case == "meta_type":
        kw["meta"] = [1]
    elif case == "meta_json":
        kw["meta"] = {"f": object()}
    elif case == "trigger":
        kw["trigger"] = "cross"
    elif case == "y_int":
        kw["y"] = np.ones(5, dtype=int)
    elif case == "rows":
        kw["y"] = y[:4]
    with pytest.raises(ValueError):
        Artefact(**kw)


# ----------------------------------------------------------------- builders

@pytest.mark.parametrize("m", [0, 1, 7])
def test_clone_attack_places_m_poisons(m, rng):
    X, y = _clean(rng, n=10, d=3)
    zeta = rng.standard_normal(3)
    trig = triggers.CrossTrigger(strength=0.1, image_shape=(1, 3))
    a = artefact.clone_attack(X, y, zeta, -1.0, m, trigger=trig, seed=5,
                              meta={"r": 0.1})
    Xp, yp = poison.clone_cluster(X, y, zeta, -1.0, m)
    np.testing.assert_array_equal(a.x, Xp)
    np.testing.assert_array_equal(a.y, yp)
    np.testing.assert_array_equal(a.poison_idx, np.arange(10, 10 + m))
    np.testing.assert_array_equal(a.x[a.is_poison], np.broadcast_to(zeta, (m, 3)))
    np.testing.assert_array_equal(a.clean()[0], X)
    assert a.meta == {"attack": "clone", "m": m, "n_clean": 10, "r": 0.1}
    assert a.target == -1.0 and a.seed == 5 and a.trigger == trig


def test_backdoor_attack_append(rng):
    X, y = _clean(rng, n=30)
    trig = triggers.CrossTrigger(strength=0.5)
    a = artefact.backdoor_attack(X, y, trig, 1.0, n_poison=5, seed=0)
    np.testing.assert_array_equal(a.x[:30], X)  # the clean set is intact
    np.testing.assert_array_equal(a.poison_idx, np.arange(30, 35))
    src = np.asarray(a.meta["source_idx"])
    assert np.all(y[src] == -1.0)  # sources are non-target points
    np.testing.assert_allclose(a.x[30:], trig.apply(X[src]))
    np.testing.assert_array_equal(a.y[30:], 1.0)


def test_backdoor_attack_replace_and_rate(rng):
    X, y = _clean(rng, n=40)
    trig = triggers.PatchTrigger(size=2)
    a = artefact.backdoor_attack(X, y, trig, 1.0, rate=0.1, seed=1, mode="replace")
    assert a.n == 40 and a.n_poison == 4
    np.testing.assert_array_equal(a.poison_idx, a.meta["source_idx"])
    keep = ~a.is_poison
    np.testing.assert_array_equal(a.x[keep], X[keep])
    np.testing.assert_array_equal(a.x[a.poison_idx], trig.apply(X[a.poison_idx]))
    np.testing.assert_array_equal(a.y[a.poison_idx], 1.0)


def test_backdoor_attack_is_deterministic_given_seed(rng):
    X, y = _clean(rng, n=50)
    trig = triggers.CrossTrigger(strength=0.5, stochastic=True, jitter=0.5)
    a = artefact.backdoor_attack(X, y, trig, 1.0, n_poison=6, seed=11)
    b = artefact.backdoor_attack(X, y, trig, 1.0, n_poison=6, seed=11)
    c = artefact.backdoor_attack(X, y, trig, 1.0, n_poison=6, seed=12)
    assert a == b
    assert a != c


def test_backdoor_attack_one_hot_and_source_filter(rng):
    labels = rng.integers(0, 3, 30)
    Y = np.eye(3)[labels]
    X = rng.standard_normal((30, 9))
    trig = triggers.CrossTrigger(strength=1.0)
    a = artefact.backdoor_attack(X, Y, trig, np.eye(3)[0], n_poison=3, seed=0,
                                 source_filter=lambda X, Y: Y[:, 2] == 1)
    assert np.all(labels[a.meta["source_idx"]] == 2)
    np.testing.assert_array_equal(a.y[a.poison_idx], np.tile([1.0, 0, 0], (3, 1)))
    mask = labels == 1
    b = artefact.backdoor_attack(X, Y, trig, np.eye(3)[0], n_poison=2, seed=0,
                                 source_filter=mask)
    assert np.all(labels[b.meta["source_idx"]] == 1)


@pytest.mark.parametrize("case", ["both", "neither", "too_many", "rate", "mode",
                                  "target_shape", "no_trigger", "filter"])
def test_backdoor_attack_bad_inputs(case, rng):
    X, y = _clean(rng, n=10)
    kw = dict(X=X, y=y, trigger=triggers.CrossTrigger(0.5), target=1.0, n_poison=2)
    if case == "both":
        kw["rate"] = 0.1
    elif case == "neither":
        kw["n_poison"] = None
    elif case == "too_many":
        kw["n_poison"] = int((y != 1.0).sum()) + 1
    elif case == "rate":
        kw.update(n_poison=None, rate=1.5)
    elif case == "mode":
        kw["mode"] = "insert"
    elif case == "target_shape":
        kw["target"] = np.array([1.0, 0.0])
    elif case == "no_trigger":
        kw["trigger"] = None
    elif case == "filter":
        kw["source_filter"] = np.ones(3, dtype=bool)
    with pytest.raises(ValueError):
        artefact.backdoor_attack(**kw)
