"""io: atomic writes (the resumable sweep is tested in test_sweeps.py)."""

from __future__ import annotations

import os

import pytest

from ntk_poison import io


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    def bad(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")
    with pytest.raises(RuntimeError):
        io.write_atomic(tmp_path / "r.json", bad)
    assert os.listdir(tmp_path) == []
