"""Validated, file-backed experiment configs.

An experiment's config is a frozen dataclass that subclasses :class:`Config`. Field
types are checked when it is built (from code, a JSON file or ``--set key=value``
overrides), and each subclass adds range checks in ``validate``. Unknown keys in a
file are an error, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Type, TypeVar

from ntk_poison import io

C = TypeVar("C", bound="Config")

__all__ = ["Config"]


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check (and gently coerce) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, a, value)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"`{name}`: bad value {value!r}.")
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"`{name}` must be a list, got {value!r}.")
        inner = args[0] if args else Any
        return tuple(_coerce(f"{name}[{i}]", inner, v) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ValueError(f"`{name}` must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"`{name}` must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"`{name}` must be a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"`{name}` must be a number, got {value!r}.") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"`{name}` must be a string, got {value!r}.")
        return value
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class of experiment configs: typed fields, ``validate``, save and load."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, hints[f.name],
                                                     getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Range checks; subclasses raise ValueError naming the field and the fix."""

    # ----------------------------------------------------------------- checks for validate
    # Small composable checks for subclasses' ``validate``; each raises a ValueError that
    # names the field, the rule and the value it got.

    def check_min(self, low: float, *names: str) -> None:
        """Every named (scalar) field is ``>= low``."""
        for name in names:
            v = getattr(self, name)
            if not v >= low:
                raise ValueError(f"`{name}` must be >= {low}, got {v!r}.")

    def check_positive(self, *names: str, allow_empty: bool = False) -> None:
        """Every named field is ``> 0``: a scalar, or every value of a (non-empty) list."""
        for name in names:
            v = getattr(self, name)
            if isinstance(v, tuple):
                if not v and not allow_empty:
                    raise ValueError(f"`{name}` must not be empty.")
                if not all(x > 0 for x in v):
                    raise ValueError(f"every value of `{name}` must be > 0, got {list(v)}.")
            elif not v > 0:
                raise ValueError(f"`{name}` must be > 0, got {v!r}.")

    def check_choice(self, name: str, choices: Sequence[Any]) -> None:
        """The named field is one of ``choices``."""
        v = getattr(self, name)
        if v not in choices:
            raise ValueError(f"`{name}` must be one of {list(choices)}, got {v!r}.")

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls: Type[C], d: Mapping[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown config key(s) {unknown} for {cls.__name__}; known "
                             f"keys: {sorted(known)}.")
        return cls(**dict(d))

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON (atomically)."""
        return io.write_json(path, self.to_dict())

    @classmethod
    def load(cls: Type[C], path: str | Path) -> C:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Config file {str(path)!r} does not exist.")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"Config file {str(path)!r} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"Config file {str(path)!r} must hold a JSON object.")
        return cls.from_dict(d)

    def with_overrides(self: C, overrides: Sequence[str]) -> C:
        """Apply ``key=value`` strings (values parsed as JSON when they parse)."""
        d = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"Override {item!r} must look like key=value.")
            key, raw = item.split("=", 1)
            key = key.strip()
            try:
                val = json.loads(raw)
            except json.JSONDecodeError:
                val = raw
            d[key] = val
        return type(self).from_dict(d)
