"""Atomic file writes and JSON encoding of array results.

Every result file is written to a temporary file in the same directory and moved
into place with ``os.replace``, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
import re
from typing import Any, Callable, Dict, Optional

import numpy as np

__all__ = ["to_jsonable", "write_json", "write_text", "write_atomic", "write_npz", "CellStore"]


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/jax arrays and scalars (nested in dicts/lists) to plain JSON types.

    Non-finite floats become None (JSON has no NaN).
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
        arr = np.asarray(obj)
        if arr.ndim == 0:
            return to_jsonable(arr.item())
        return to_jsonable(arr.tolist())
    if isinstance(obj, (np.generic,)):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_atomic(path: str | Path, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` then atomically move the file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        # mkstemp creates 0600; give the result the usual permissions (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return write_atomic(path, w)


def write_npz(path: str | Path, arrays: Dict[str, Any]) -> Path:
    """``np.savez`` of ``arrays`` (name -> array) to ``path``, atomically (written through
    a file object, so no ``.npz`` is appended to the name)."""
    def w(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return write_atomic(path, w)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


class CellStore:
    """A resumable sweep's results: one JSON file per finished cell, written atomically.

    ``store.get(key)`` is the cell's saved result or None; ``store.put(key, result)``
    writes it (``<root>/<key>.json``, through :func:`write_json`), so a crash loses at
    most the cell in progress and a rerun skips every cell already on disk. Each file
    records the ``tag`` it was computed under (e.g. a config hash); a cell saved under
    another tag is treated as missing and recomputed. Keys are file names: letters,
    digits and ``._+-@=`` only.
    """

    _KEY = re.compile(r"^[A-Za-z0-9._+\-@=]+$")

    def __init__(self, root: str | Path, tag: str = ""):
        self.root = Path(root)
        self.tag = str(tag)

    def path(self, key: str) -> Path:
        if not isinstance(key, str) or not self._KEY.match(key) or key.startswith("."):
            raise ValueError(f"`key` must be a file-name-safe string (letters, digits, "
                             f"'._+-@='; not starting with '.'), got {key!r}.")
        return self.root / f"{key}.json"

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        p = self.path(key)
        if not p.exists():
            return None
        with open(p) as f:
            d = json.load(f)
        return d.get("result") if d.get("tag") == self.tag else None

    def put(self, key: str, result: Dict[str, Any]) -> Dict[str, Any]:
        write_json(self.path(key), {"tag": self.tag, "result": result})
        return result

    def keys(self) -> list:
        """Keys of the cells saved under this tag, sorted."""
        if not self.root.exists():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if self.get(p.stem) is not None)
