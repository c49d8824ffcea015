"""Tests for ntk_poison.artefact: the one-file attack artefact (save, load, checks)."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import numpy as np
import pytest

from ntk_poison import artefact, attacks, triggers
from ntk_poison.artefact import Artefact


def _clean(rng, n=20, d=16):
    X = rng.standard_normal((n, d))
    y = np.where(rng.standard_normal(n) > 0, 1.0, -1.0)
    return X, y


def _example(rng):
    X, y = _clean(rng)
    trig = triggers.CrossTrigger(strength=0.5, stochastic=True, jitter=0.2)
    return attacks.backdoor_attack(X, y, trig, 1.0, n_poison=4, seed=3,
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
    a = attacks.clone_attack(X, Y, np.zeros((4, 4, 1)), np.array([0.0, 1.0, 0.0]), 2)
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
