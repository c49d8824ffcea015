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

__all__ = ["to_jsonable", "encode_cell", "decode_cell", "write_json", "write_text", "write_atomic", "write_npz",
           "config_hash", "Sweep"]


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


def encode_cell(obj: Any) -> Any:
    """A result as JSON that :func:`decode_cell` turns back into the same structure: numpy
    and jax arrays and numpy scalars keep their dtype and shape (``{"__ndarray__": list,
    "dtype", "shape"}``), dicts with non-string keys keep their keys (``{"__items__":
    [[key, value], ...]}``); tuples become lists; NaN and infinities are kept (Python's
    json writes and reads them)."""
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode_cell(v) for k, v in obj.items()}
        return {"__items__": [[encode_cell(k), encode_cell(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [encode_cell(v) for v in obj]
    if isinstance(obj, np.generic) or (hasattr(obj, "__array__")
                                       and not isinstance(obj, (str, bytes))):
        arr = np.asarray(obj)
        return {"__ndarray__": arr.tolist(), "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def decode_cell(obj: Any) -> Any:
    """The inverse of :func:`encode_cell` (0-d arrays come back as numpy scalars)."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            arr = np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
            return arr.reshape(obj["shape"])[()] if not obj["shape"] else \
                arr.reshape(obj["shape"])
        if "__items__" in obj:
            return {_hashable(decode_cell(k)): decode_cell(v) for k, v in obj["__items__"]}
        return {k: decode_cell(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_cell(v) for v in obj]
    return obj


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


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
    the cell's JSON (:func:`encode_cell`, :func:`decode_cell`: arrays keep dtype and
    shape, dict keys their type, tuples become lists), whether computed now or read from
    disk, so a run resumed after a crash builds exactly the same results as an
    uninterrupted one.
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

    def cell(self, key: str, compute: Callable[[], Any]) -> Any:
        """The cell ``key``: read from disk if finished, else ``compute()``, timed and
        written atomically (through :func:`encode_cell`) and returned as it reads back."""
        p = self.path(key)
        if p.exists():
            d = json.loads(p.read_text())
            if d.get("config_hash") != self.config_hash:
                raise ValueError(self._mismatch(d.get("config_hash")) + f" (cell {key!r})")
            self.reused.append(key)
            self._seconds[key] = d["seconds"]
            return decode_cell(d["result"])
        t = time.perf_counter()
        result = encode_cell(compute())
        secs = time.perf_counter() - t
        text = json.dumps({"key": key, "config_hash": self.config_hash, "seconds": secs,
                           "result": result}) + "\n"
        write_text(p, text)
        self.computed.append(key)
        self._seconds[key] = secs
        if self.log:
            print(f"[sweep] computed cell {key} in {secs:.2f} s", file=sys.stderr, flush=True)
        return decode_cell(json.loads(text)["result"])

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
