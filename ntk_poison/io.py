"""Atomic file writes, JSON encoding of array results, and resumable sweeps.

Every result file is written to a temporary file in the same directory and moved
into place with ``os.replace``, so a reader never sees a half-written file. A
:class:`Sweep` writes each finished grid point of an experiment that way, so a run
killed at any moment loses at most the point in progress.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np

__all__ = ["to_jsonable", "as_arrays", "write_json", "write_text", "write_atomic", "write_npz",
           "config_hash", "Sweep"]


def to_jsonable(obj: Any, nan_as_none: bool = True) -> Any:
    """Convert numpy/jax arrays and scalars (nested in dicts/lists) to plain JSON types.

    Non-finite floats become None (JSON has no NaN), unless ``nan_as_none`` is False
    (a sweep's cells keep them: Python's json writes and reads NaN and Infinity).
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, nan_as_none) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, nan_as_none) for v in obj]
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
        arr = np.asarray(obj)
        if arr.ndim == 0:
            return to_jsonable(arr.item(), nan_as_none)
        return to_jsonable(arr.tolist(), nan_as_none)
    if isinstance(obj, (np.generic,)):
        return to_jsonable(obj.item(), nan_as_none)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) or not nan_as_none else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def as_arrays(obj: Any) -> Any:
    """The inverse of :func:`to_jsonable` for numbers: JSON lists of numbers (nested,
    rectangular) become numpy arrays (int64 if every entry is an int, bool if every
    entry is a bool, else float64 with None read as NaN); dicts and other lists are
    walked. ``to_jsonable(as_arrays(j))`` reads back as ``j`` (up to ints written as
    floats in a list that mixes the two)."""
    if isinstance(obj, dict):
        return {k: as_arrays(v) for k, v in obj.items()}
    if not isinstance(obj, list):
        return obj
    if obj and all(isinstance(v, (int, float)) or v is None for v in obj):
        if all(isinstance(v, bool) for v in obj):
            return np.asarray(obj, bool)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in obj):
            return np.asarray(obj, np.int64)
        return np.asarray([np.nan if v is None else v for v in obj], np.float64)
    items = [as_arrays(v) for v in obj]
    if items and all(isinstance(v, np.ndarray) for v in items) and \
            len({(v.shape, v.dtype) for v in items}) == 1:
        return np.stack(items)
    return items


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


def config_hash(config: Any, ignore: Iterable[str] = ()) -> str:
    """The hash that tags a sweep's cells: sha256 (first 16 hex digits) of the config's
    JSON (``config.to_dict()`` or a mapping, keys sorted) without the fields in
    ``ignore`` (those that only choose which cells run, not what a cell computes)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in set(ignore)}
    return hashlib.sha256(json.dumps(to_jsonable(d), sort_keys=True).encode()).hexdigest()[:16]


class Sweep:
    """A resumable sweep: each grid point ("cell") is computed once, written atomically
    to ``<out_dir>/cells/<key>.json`` with the config's hash and its wall time, and read
    back on a rerun instead of being recomputed.

    ``sweep.cell(key, compute)`` returns ``compute()``'s result as it reads back from
    JSON (through :func:`to_jsonable`: arrays become lists, tuples lists, dict keys
    strings; NaN and infinities are kept), whether computed now or read from disk, so a run
    resumed after a crash builds exactly the same results as an uninterrupted one.
    ``sweep.seconds(keys)`` is the summed compute time of those cells, as stored, so
    timings in results.json also come from the cells.

    The folder belongs to one config: ``<out_dir>/cells/sweep.json`` records its hash
    (:func:`config_hash`) and the UTC time the sweep started. Opening the folder with
    another config raises a ValueError naming both hashes; ``fresh=True`` deletes the
    cells and starts over. Keys are file names: letters, digits and ``._+-@=`` only.
    """

    _KEY = re.compile(r"^[A-Za-z0-9._+\-@=]+$")
    MANIFEST = "sweep.json"

    def __init__(self, out_dir: str | Path, config: Any, *, fresh: bool = False,
                 ignore: Iterable[str] = (), log: bool = True):
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / "cells"
        self.config_hash = config_hash(config, ignore)
        self.log = bool(log)
        self.computed: List[str] = []
        self.reused: List[str] = []
        self._seconds: Dict[str, float] = {}
        if fresh and self.root.exists():
            shutil.rmtree(self.root)
        manifest = self.root / self.MANIFEST
        if manifest.exists():
            m = json.loads(manifest.read_text())
            if m.get("config_hash") != self.config_hash:
                raise ValueError(self._mismatch(m.get("config_hash")))
            self.started_utc = m["started_utc"]
        else:
            old = sorted(self.root.glob("*.json")) if self.root.exists() else []
            if old:
                raise ValueError(self._mismatch("unknown (cells without a sweep.json)"))
            self.started_utc = datetime.datetime.now(datetime.timezone.utc).isoformat()
            write_json(manifest, {"config_hash": self.config_hash,
                                  "started_utc": self.started_utc,
                                  "config": config.to_dict() if hasattr(config, "to_dict")
                                  else dict(config)})

    @property
    def started(self) -> datetime.datetime:
        """When the sweep in this folder started (UTC): a resumed run reports this time,
        so its results.json equals an uninterrupted run's (``Report.started``)."""
        return datetime.datetime.fromisoformat(self.started_utc)

    def _mismatch(self, other: Any) -> str:
        return (f"The output folder {str(self.out_dir)!r} holds the cells of a sweep run "
                f"with another config (hash {other}); this config's hash is "
                f"{self.config_hash}. Results of two configs are not mixed: rerun with "
                f"--fresh (fresh=True) to delete {str(self.root)!r} and start over, or "
                f"choose another --out.")

    def path(self, key: str) -> Path:
        if (not isinstance(key, str) or not self._KEY.match(key) or key.startswith(".")
                or key == Path(self.MANIFEST).stem):
            raise ValueError(f"`key` must be a file-name-safe string (letters, digits, "
                             f"'._+-@='; not starting with '.', not 'sweep'), got {key!r}.")
        return self.root / f"{key}.json"

    def done(self, key: str) -> bool:
        """Whether the cell ``key`` is on disk (finished under this config)."""
        return self.path(key).exists()

    def cell(self, key: str, compute: Callable[[], Any]) -> Any:
        """The cell ``key``: read from disk if finished, else ``compute()``, timed and
        written atomically (the result as :func:`to_jsonable` makes it)."""
        p = self.path(key)
        if p.exists():
            d = json.loads(p.read_text())
            if d.get("config_hash") != self.config_hash:
                raise ValueError(self._mismatch(d.get("config_hash")) + f" (cell {key!r})")
            self.reused.append(key)
            self._seconds[key] = d["seconds"]
            return d["result"]
        t = time.perf_counter()
        result = to_jsonable(compute(), nan_as_none=False)
        secs = time.perf_counter() - t
        text = json.dumps({"key": key, "config_hash": self.config_hash, "seconds": secs,
                           "result": result}, indent=2) + "\n"
        write_text(p, text)
        self.computed.append(key)
        self._seconds[key] = secs
        if self.log:
            print(f"[sweep] computed cell {key} in {secs:.2f} s", file=sys.stderr, flush=True)
        return json.loads(text)["result"]

    def seconds(self, keys: Optional[Iterable[str]] = None) -> float:
        """Summed stored compute time of the cells ``keys`` (default: every cell this
        object has returned), order-independent (``math.fsum``)."""
        keys = list(self._seconds) if keys is None else list(keys)
        return math.fsum(self._seconds[k] for k in keys)

    def keys(self) -> List[str]:
        """Keys of the finished cells on disk, sorted."""
        if not self.root.exists():
            return []
        return sorted(p.stem for p in self.root.glob("*.json")
                      if p.name != self.MANIFEST)
