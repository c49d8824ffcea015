"""The attack artefact: one file per attack, consumed by every detector and defence.

Following BackdoorBench (Wu et al. 2022, "BackdoorBench: A Comprehensive Benchmark of
Backdoor Learning"), an attack is run once and writes ONE artefact: the poisoned
training set, which rows are poisons, the trigger, the target, the seed and free-form
metadata. Detectors (:mod:`ntk_poison.defences`) and defences read the artefact; the
ground truth for their evaluation is :attr:`Artefact.is_poison`.

File format (``FORMAT_VERSION = 1``): an uncompressed ``.npz`` holding the arrays
``x``, ``y``, ``poison_idx`` and ``header``, a 0-d unicode array with a JSON object::

    {"format": "ntk-poison-artefact", "version": 1, "trigger": {... | null},
     "target": ..., "seed": ..., "meta": {...}, "sha256": "..."}

``sha256`` is the digest of every array (name, dtype, shape and bytes, in a fixed
order) followed by the canonical JSON of the header without the digest, so any change
to the data or the metadata is caught on load. Files are written atomically
(:func:`ntk_poison.io.write_atomic`) and read with ``np.load(allow_pickle=False)``:
loading never unpickles.

The attacks that write artefacts live in :mod:`ntk_poison.attacks`
(``clone_attack``, ``near_clone_attack``, ``backdoor_attack``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import numpy as np

from ntk_poison import _validate
from ntk_poison import io as _io
from ntk_poison import triggers as _triggers

Array = Any

__all__ = ["Artefact", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_FORMAT_NAME = "ntk-poison-artefact"
_ARRAYS = ("x", "y", "poison_idx")


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def _json_clean(name: str, obj: Any) -> Any:
    """``obj`` as plain JSON types (arrays -> lists, NaN -> None); ValueError if it is not."""
    try:
        return json.loads(json.dumps(_io.to_jsonable(obj), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"`{name}` must be JSON-serialisable (numbers, strings, lists, "
                         f"dicts, arrays): {e}.") from e


def _target_value(target: Any) -> Union[float, Tuple[float, ...]]:
    t = np.asarray(_validate.array("target", target), dtype=np.float64)
    if t.ndim == 0:
        return float(t)
    if t.ndim == 1:
        return tuple(float(v) for v in t)
    raise ValueError(f"`target` must be a scalar or a vector (one target), got shape "
                     f"{t.shape}.")


def _digest(arrays: Dict[str, np.ndarray], header: Dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in _ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    body = {k: v for k, v in header.items() if k != "sha256"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class Artefact:
    """A poisoned training set and everything needed to evaluate a defence on it.

    Attributes:
      x: the poisoned training inputs (clean and poisons), ``(n, *input_shape)``.
      y: the float targets, ``(n,)`` or ``(n, c)``.
      poison_idx: sorted, distinct int row indices of the poisons, ``(n_poison,)``.
      trigger: the trigger object (:mod:`ntk_poison.triggers`), or None.
      target: the attacker's target: a float, or a tuple of floats for vector targets.
      seed: the integer seed the attack used.
      meta: JSON-serialisable extras (dataset name, zeta's regime r, m, ...). Stored
        in its JSON form (tuples become lists, NaN becomes None) so a loaded artefact
        equals the saved one.
      version: the file format version, :data:`FORMAT_VERSION`.

    Arrays are read-only copies; make a changed artefact with ``dataclasses.replace``.
    """

    x: np.ndarray
    y: np.ndarray
    poison_idx: np.ndarray
    trigger: Any = None
    target: Any = 0.0
    seed: int = 0
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __post_init__(self):
        _validate.array("x", self.x, ndim=(2, 3, 4))
        _validate.array("y", self.y, ndim=(1, 2), floating=True)
        x, y = np.asarray(self.x), np.asarray(self.y)
        _validate.same_rows("x", x, "y", y)
        idx = np.asarray(_validate.array("poison_idx", self.poison_idx, ndim=1))
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"`poison_idx` must hold integer row indices, got dtype "
                             f"{idx.dtype}.")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= x.shape[0]):
            raise ValueError(f"`poison_idx` must index rows of `x` (0..{x.shape[0] - 1}), "
                             f"got values in [{idx.min()}, {idx.max()}].")
        if np.unique(idx).size != idx.size:
            raise ValueError("`poison_idx` has repeated rows; each poison row is listed "
                             "once.")
        if self.trigger is not None and not (hasattr(self.trigger, "to_dict")
                                             and hasattr(self.trigger, "apply")):
            raise ValueError(f"`trigger` must be a trigger object from "
                             f"ntk_poison.triggers or None, got "
                             f"{type(self.trigger).__name__}.")
        if not _validate.is_int_scalar(self.seed) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {self.seed!r}.")
        if not isinstance(self.meta, dict):
            raise ValueError(f"`meta` must be a dict, got {type(self.meta).__name__}.")
        if self.version != FORMAT_VERSION:
            raise ValueError(f"`version` is {self.version!r}, but this ntk-poison "
                             f"supports artefact format version {FORMAT_VERSION} only.")
        object.__setattr__(self, "x", _frozen(x))
        object.__setattr__(self, "y", _frozen(y))
        object.__setattr__(self, "poison_idx", _frozen(np.sort(idx)))
        object.__setattr__(self, "target", _target_value(self.target))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "meta", _json_clean("meta", self.meta))

    # ----------------------------------------------------------------- views

    @property
    def n(self) -> int:
        """Rows in the poisoned training set."""
        return int(self.x.shape[0])

    @property
    def n_poison(self) -> int:
        return int(self.poison_idx.size)

    @property
    def is_poison(self) -> np.ndarray:
        """Boolean mask ``(n,)``: True on poison rows (the detectors' ground truth)."""
        mask = np.zeros(self.n, dtype=bool)
        mask[self.poison_idx] = True
        return mask

    def clean(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` without the poison rows."""
        keep = ~self.is_poison
        return self.x[keep], self.y[keep]

    def poisons(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of the poison rows only."""
        return self.x[self.poison_idx], self.y[self.poison_idx]

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, Artefact):
            return NotImplemented
        return (all(np.array_equal(getattr(self, a), getattr(other, a))
                    and getattr(self, a).dtype == getattr(other, a).dtype
                    for a in _ARRAYS)
                and self.trigger == other.trigger and self.target == other.target
                and self.seed == other.seed and self.meta == other.meta
                and self.version == other.version)

    __hash__ = None

    # ----------------------------------------------------------------- file I/O

    def _header(self) -> Dict[str, Any]:
        return {"format": _FORMAT_NAME, "version": self.version,
                "trigger": None if self.trigger is None else
                _json_clean("trigger", _triggers.to_dict(self.trigger)),
                "target": list(self.target) if isinstance(self.target, tuple)
                else self.target,
                "seed": self.seed, "meta": self.meta}

    def save(self, path: Union[str, Path]) -> Path:
        """Write the artefact to ONE file, atomically (see the module docstring).

        ``path`` is used as given (``.npz`` is the natural suffix). Returns the path.
        """
        arrays = {a: np.ascontiguousarray(getattr(self, a)) for a in _ARRAYS}
        return _write(path, arrays, self._header())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Artefact":
        """Read an artefact written by :meth:`save`.

        Raises ValueError if the file is missing, is not a valid artefact, is corrupt
        (truncated, not a zip, bad CRC, or a sha256 mismatch), or has another format
        version (naming the found and the supported version). Never unpickles.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"No artefact file at `path` = {str(path)!r}; check the path "
                             "(Artefact.save writes one file).")
        try:
            with np.load(path, allow_pickle=False) as z:
                names = set(z.files)
                missing = sorted(set(_ARRAYS + ("header",)) - names)
                if missing:
                    raise ValueError(f"The file {str(path)!r} is not an ntk-poison "
                                     f"artefact (missing {missing}).")
                header_text = str(z["header"][()])
                arrays = {a: z[a] for a in _ARRAYS}
        except ValueError as e:
            if "not an ntk-poison artefact" in str(e):
                raise
            raise ValueError(f"The artefact file {str(path)!r} is corrupt (could not read "
                             f"it: {e}); re-run the attack to write it again.") from e
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError) as e:
            raise ValueError(f"The artefact file {str(path)!r} is corrupt (could not read "
                             f"it: {type(e).__name__}: {e}); re-run the attack to write it "
                             "again.") from e
        try:
            header = json.loads(header_text)
        except json.JSONDecodeError as e:
            raise ValueError(f"The artefact file {str(path)!r} is corrupt (its header is "
                             f"not valid JSON: {e}).") from e
        if not isinstance(header, dict) or header.get("format") != _FORMAT_NAME:
            raise ValueError(f"The file {str(path)!r} is not an ntk-poison artefact (its "
                             "header lacks format='ntk-poison-artefact').")
        version = header.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(f"The artefact file {str(path)!r} has format version "
                             f"{version!r}; this ntk-poison supports version "
                             f"{FORMAT_VERSION} only. Re-run the attack with this version.")
        if header.get("sha256") != _digest(arrays, header):
            raise ValueError(f"The artefact file {str(path)!r} is corrupt: its sha256 does "
                             "not match its contents (the data or header were changed "
                             "after it was written).")
        trig = header.get("trigger")
        return cls(x=arrays["x"], y=arrays["y"], poison_idx=arrays["poison_idx"],
                   trigger=None if trig is None else _triggers.from_dict(trig),
                   target=header["target"], seed=header["seed"], meta=header["meta"],
                   version=version)


def _write(path: Union[str, Path], arrays: Dict[str, np.ndarray],
           header: Dict[str, Any]) -> Path:
    """Write arrays + header (with its digest) as one .npz, atomically."""
    header = dict(header)
    header["sha256"] = _digest(arrays, header)
    text = np.array(json.dumps(header, sort_keys=True))
    return _io.write_npz(path, {"header": text, **arrays})


# --------------------------------------------------------------------------- old names

def __getattr__(name: str):
    # The attack builders moved to ntk_poison.attacks (deprecated aliases, one release).
    if name in ("clone_attack", "backdoor_attack"):
        import warnings
        from ntk_poison import attacks
        warnings.warn(f"ntk_poison.artefact.{name} moved to ntk_poison.attacks.{name}; the "
                      "old name is a deprecated alias and goes in the next release.",
                      DeprecationWarning, stacklevel=2)
        return getattr(attacks, name)
    raise AttributeError(f"module 'ntk_poison.artefact' has no attribute {name!r}")
