"""io: atomic writes and the resumable sweep's CellStore."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ntk_poison import io


def test_cell_store_put_get_tag_and_keys(tmp_path):
    s = io.CellStore(tmp_path / "cells", tag="abc")
    assert s.get("kernel__clone__none") is None and s.keys() == []
    r = {"asr": {"patch": 0.5}, "x": np.float64(0.25), "arr": np.arange(3)}
    s.put("kernel__clone__none", r)
    s.put("net__patch__penalty+aug", {"y": 1})
    assert s.get("kernel__clone__none") == {"asr": {"patch": 0.5}, "x": 0.25, "arr": [0, 1, 2]}
    assert s.keys() == ["kernel__clone__none", "net__patch__penalty+aug"]
    other = io.CellStore(tmp_path / "cells", tag="def")      # another config: recompute
    assert other.get("kernel__clone__none") is None and other.keys() == []
    on_disk = json.loads((tmp_path / "cells" / "kernel__clone__none.json").read_text())
    assert on_disk["tag"] == "abc"
    # atomic: no temporary file left behind, and an overwrite replaces the cell
    s.put("kernel__clone__none", {"x": 2})
    assert s.get("kernel__clone__none") == {"x": 2}
    assert sorted(os.listdir(tmp_path / "cells")) == ["kernel__clone__none.json",
                                                      "net__patch__penalty+aug.json"]


@pytest.mark.parametrize("key", ["../x", "a/b", ".hidden", "", "a b", 3])
def test_cell_store_rejects_unsafe_keys(tmp_path, key):
    with pytest.raises(ValueError, match="`key`"):
        io.CellStore(tmp_path).put(key, {})


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    def bad(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")
    with pytest.raises(RuntimeError):
        io.write_atomic(tmp_path / "r.json", bad)
    assert os.listdir(tmp_path) == []
