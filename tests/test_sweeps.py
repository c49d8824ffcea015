"""io.Sweep: resumable sweeps. The API (a finished cell is read back, not recomputed;
another config is refused; ``fresh`` starts over; a cell is written atomically), and an
experiment killed with SIGKILL in the middle of its sweep, then rerun, against an
uninterrupted run of the same config: the same results.json, every cell computed
exactly once (counted from the per-cell log lines of both processes)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ntk_poison import cli, io

ROOT = Path(__file__).resolve().parents[1]


class Counter:
    """A compute function that counts its calls."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


CFG = {"a": 1, "grid": [1, 2, 3]}


def _same(a, b):
    """Equal structure, types, dtypes and values (NaN equal to NaN)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b or (a != a and b != b)


def test_finished_cells_are_read_back_not_recomputed(tmp_path):
    s = io.Sweep(tmp_path, CFG, log=False)
    value = {"x": np.float32(0.1), "arr": np.arange(6).reshape(2, 3),
             "f32": np.linspace(0, 1, 7, dtype=np.float32), "t": (1.5, float("nan")),
             "by_width": {8: [1, 2], 16: {"inf": np.array([np.inf, -1.0])}},
             "flags": np.array([True, False]), "none": None, "s": "text"}
    f = Counter(value)
    first = s.cell("m1", f)
    # what comes back is what a JSON read gives, the same whether computed or read from
    # disk: arrays keep dtype and shape, int keys stay ints, tuples become lists
    _same(first, dict(value, t=[1.5, float("nan")]))
    assert s.computed == ["m1"] and f.calls == 1
    again = io.Sweep(tmp_path, dict(CFG), log=False)        # a rerun, same config
    _same(again.cell("m1", f), first)
    assert f.calls == 1 and again.reused == ["m1"] and again.computed == []
    on_disk = json.loads((tmp_path / "cells" / "m1.json").read_text())
    assert on_disk["config_hash"] == io.config_hash(CFG) and on_disk["key"] == "m1"
    # the stored time is what a rerun reports
    assert again.seconds() == on_disk["seconds"] == s.seconds(["m1"]) >= 0
    assert again.keys() == ["m1"] and again.started_utc == s.started_utc
    assert again.started.isoformat() == s.started_utc


def test_another_config_is_refused_and_fresh_starts_over(tmp_path):
    s = io.Sweep(tmp_path, CFG, log=False)
    s.cell("m1", lambda: 1)
    other = dict(CFG, a=2)
    with pytest.raises(ValueError) as e:
        io.Sweep(tmp_path, other, log=False)
    msg = str(e.value)
    for part in (str(tmp_path), io.config_hash(CFG), io.config_hash(other), "--fresh",
                 "--out"):
        assert part in msg
    assert s.keys() == ["m1"]                        # nothing was deleted by the refusal
    # ignored fields only choose cells: the same hash
    assert io.config_hash(dict(CFG, grid=[9])) != io.config_hash(CFG)
    assert io.config_hash(dict(CFG, grid=[9]), ignore=["grid"]) == io.config_hash(
        CFG, ignore=["grid"])
    f = Counter(5)
    fresh = io.Sweep(tmp_path, other, fresh=True, log=False)
    assert fresh.keys() == [] and fresh.cell("m1", f) == 5 and f.calls == 1
    assert json.loads((tmp_path / "cells" / "sweep.json").read_text())["config_hash"] == \
        io.config_hash(other)


def test_cli_fresh_flag_and_mismatch_message(tmp_path, capsys, monkeypatch):
    import experiments

    calls = []

    class Fake:
        class Config(dict):
            def to_dict(self):
                return dict(self)

            def with_overrides(self, ov):
                return Fake.Config(seed=int(ov[-1].split("=")[1]))

        @staticmethod
        def run(cfg, out, fresh=False):
            calls.append(fresh)
            io.Sweep(out, cfg, fresh=fresh, log=False).cell("p", lambda: 1)

            class R:
                figures, claims = [], []
            return R()

    monkeypatch.setattr(experiments, "get", lambda name: Fake)
    out = str(tmp_path / "o")
    assert cli.main(["run", "x", "--out", out, "--seed", "1"]) == 0
    assert cli.main(["run", "x", "--out", out, "--seed", "2"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and out in err and "--fresh" in err
    assert cli.main(["run", "x", "--out", out, "--seed", "2", "--fresh"]) == 0
    assert calls == [False, False, True]


def test_cells_are_written_atomically(tmp_path, monkeypatch):
    s = io.Sweep(tmp_path, CFG, log=False)

    def boom():
        raise RuntimeError("crash inside the cell")

    with pytest.raises(RuntimeError):
        s.cell("m1", boom)
    real_replace = os.replace

    def crash(src, dst):                          # the process dies while moving it in
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        s.cell("m1", lambda: {"x": 1})
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(os.listdir(tmp_path / "cells")) == ["sweep.json"]   # no partial file
    f = Counter({"x": 2})
    assert io.Sweep(tmp_path, CFG, log=False).cell("m1", f) == {"x": 2} and f.calls == 1


@pytest.mark.parametrize("key", ["../x", "a/b", ".hidden", "", "a b", 3, "sweep"])
def test_unsafe_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="`key`"):
        io.Sweep(tmp_path, CFG, log=False).cell(key, lambda: 1)


# ------------------------------------------------------------ the SIGKILL test (linear)

KILL_CFG = dict(dataset="digits", poison_counts=[3, 30], epochs=2, batch_size=100,
                n_hessian=4, evals_per_epoch=2, fine_epochs=1, models=["softmax", "squares"])
N_CELLS = 2 * 3                                   # 2 models x (clean + 2 counts)
COMPUTED = re.compile(r"\[sweep\] computed cell (\S+) in")


def _cli(out, cfg_path):
    return [sys.executable, "-m", "ntk_poison.cli", "run", "linear", "--out", str(out),
            "--config", str(cfg_path)]


def _env():
    return dict(os.environ, NTK_POISON_NO_PROGRESS="1", OPENBLAS_NUM_THREADS="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cells(out):
    d = out / "cells"
    return sorted(p.stem for p in d.glob("*.json") if p.name != "sweep.json") \
        if d.exists() else []


def _results(out):
    r = json.loads((out / "results.json").read_text())
    r.pop("started_utc")           # when each folder's sweep began: differs by design
    return r


def _untimed(r):
    """``r`` without its measured wall times (keys named ``seconds``)."""
    if isinstance(r, dict):
        return {k: _untimed(v) for k, v in r.items() if k != "seconds"}
    if isinstance(r, list):
        return [_untimed(v) for v in r]
    return r


@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_equals_uninterrupted_run(tmp_path):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(KILL_CFG))
    killed = tmp_path / "killed"
    log1 = open(tmp_path / "log1", "w")
    p = subprocess.Popen(_cli(killed, cfg_path), cwd=ROOT, env=_env(), stdout=log1,
                         stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not _cells(killed) and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    log1.close()
    after_kill = _cells(killed)
    assert p.returncode == -signal.SIGKILL
    assert 1 <= len(after_kill) < N_CELLS, after_kill      # killed mid-sweep
    assert not (killed / "results.json").exists()
    # rerun into the same folder: resumes
    r = subprocess.run(_cli(killed, cfg_path), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    first = COMPUTED.findall((tmp_path / "log1").read_text())
    second = COMPUTED.findall(r.stderr)
    assert sorted(first) == after_kill                       # logged = on disk
    assert not set(first) & set(second)                      # nothing repeated
    assert len(first) + len(second) == N_CELLS == len(set(first + second))   # nothing lost
    # an uninterrupted run of the same config, in one go
    whole = tmp_path / "whole"
    r2 = subprocess.run(_cli(whole, cfg_path), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert len(COMPUTED.findall(r2.stderr)) == N_CELLS
    # the same numbers; timings are measured, so they differ between the two folders
    assert _untimed(_results(killed)) == _untimed(_results(whole))
    # and rerunning the uninterrupted folder recomputes nothing and rewrites its
    # results.json byte for byte (timings and start time included: they are stored)
    before = (whole / "results.json").read_bytes()
    r3 = subprocess.run(_cli(whole, cfg_path), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=300)
    assert r3.returncode == 0 and COMPUTED.findall(r3.stderr) == []
    assert (whole / "results.json").read_bytes() == before
    wa, wb = np.load(killed / "weights.npz"), np.load(whole / "weights.npz")
    assert sorted(wa.files) == sorted(wb.files)
    for k in wa.files:
        np.testing.assert_array_equal(wa[k], wb[k])
