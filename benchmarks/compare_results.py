"""Diff two experiment ``results.json`` files: every number and every verdict.

    python benchmarks/compare_results.py OLD/results.json NEW/results.json [--rtol 1e-9]
        [--map old.path=new.path ...] [--json OUT]

Walks both JSON trees together and reports

* **numbers** that differ by more than ``rtol`` relative (``|a - b| <= rtol max(|a|,
  |b|)``, or both NaN/None where JSON wrote NaN as null), including the numbers
  written inside strings (claim evidence), which are compared number by number;
* **verdicts**: each claim (matched by name, so claims added or reordered do not
  shift the others) whose ``supported`` changed; its evidence is compared as above;
* **structure**: keys missing from the new file, lists whose lengths differ, strings
  whose words (numbers aside) differ. Keys only in the new file are listed as
  additions (new measurements beside the old ones), not as changes.

Timings are left out: any subtree under a key ``seconds``, and the run's metadata
(``started_utc``, ``versions``). A renamed key path is mapped one-to-one with
``--map old.dotted.path=new.dotted.path`` (``*`` matches one key).

Exit status: 0 if nothing changed, 1 otherwise. This is the check behind the
architecture issue's promise that a refactor changes no result.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Any, Dict, List, Sequence, Tuple

#: keys whose subtrees are timings or run metadata, never compared
IGNORED_KEYS = ("seconds", "started_utc", "versions")

_VERDICT = {True: "supported", False: "NOT supported", None: "inconclusive"}
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _close(a: float, b: float, rtol: float) -> bool:
    if a is None or b is None:
        return a is b
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(abs(a), abs(b)) or a == b


def _split_text(s: str) -> Tuple[List[str], List[float]]:
    """A string's words with its numbers taken out, and the numbers."""
    nums = [float(m) for m in _NUMBER.findall(s)]
    return _NUMBER.sub("#", s).split(), nums


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _verdict(claim: dict) -> str:
    """The claim's verdict as the report wrote it (a measured line has its own)."""
    if claim.get("measured"):
        return claim.get("verdict", "measured")
    return _VERDICT[claim.get("supported")]


class Diff:
    """What changed between two trees (see the module docstring)."""

    def __init__(self, rtol: float):
        self.rtol = rtol
        self.numbers: List[str] = []
        self.structure: List[str] = []
        self.added: List[str] = []
        self.verdicts: List[str] = []
        self.max_path = ""
        self.n_numbers = 0
        self.n_claims = 0
        self.max_rel = 0.0

    def number(self, path: str, a: Any, b: Any) -> None:
        self.n_numbers += 1
        if not _close(a, b, self.rtol):
            self.numbers.append(f"{path}: {a!r} -> {b!r}")
        elif a is not None and b is not None and not (math.isnan(float(a))
                                                      or math.isinf(float(a))):
            den = max(abs(float(a)), abs(float(b)))
            if den > 0 and abs(float(a) - float(b)) / den > self.max_rel:
                self.max_rel = abs(float(a) - float(b)) / den
                self.max_path = path

    def walk(self, path: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key in IGNORED_KEYS:
                    continue
                p = f"{path}.{key}" if path else key
                if key not in b:
                    self.structure.append(f"{p}: only in old")
                    continue
                if key not in a:                 # a new measurement, added beside the old
                    self.added.append(p)
                    continue
                self.walk(p, a[key], b[key])
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                self.structure.append(f"{path}: length {len(a)} -> {len(b)}")
                return
            for i, (x, y) in enumerate(zip(a, b)):
                self.walk(f"{path}[{i}]", x, y)
        elif (_is_number(a) or a is None) and (_is_number(b) or b is None):
            self.number(path, a, b)
        elif isinstance(a, str) and isinstance(b, str):
            wa, na = _split_text(a)
            wb, nb = _split_text(b)
            if wa != wb or len(na) != len(nb):
                self.structure.append(f"{path}: text changed")
                return
            for i, (x, y) in enumerate(zip(na, nb)):
                self.number(f"{path}#{i}", x, y)
        elif a != b:
            self.structure.append(f"{path}: {a!r} -> {b!r}")

    def claims(self, old: Sequence[dict], new: Sequence[dict]) -> None:
        by_name = {c["name"]: c for c in new}
        for c in old:
            self.n_claims += 1
            d = by_name.get(c["name"])
            if d is None:
                self.verdicts.append(f"claim {c['name']!r}: missing in new")
            elif d.get("supported") != c.get("supported"):
                self.verdicts.append(f"claim {c['name']!r}: {_verdict(c)} -> {_verdict(d)}")
                self.walk(f"claims[{c['name']}]", c, d)
            else:                           # matched by name, so a claim added before
                self.walk(f"claims[{c['name']}]", c, d)   # it does not shift the others
        for name in sorted(set(by_name) - {c["name"] for c in old}):
            self.added.append(f"claims[{name}]")      # a new claim, beside the old ones

    @property
    def changed(self) -> bool:
        return bool(self.numbers or self.structure or self.verdicts)

    def summary(self) -> Dict[str, Any]:
        return {"numbers_compared": self.n_numbers, "numbers_changed": len(self.numbers),
                "claims_compared": self.n_claims, "verdicts_changed": len(self.verdicts),
                "structure_changes": len(self.structure),
                "max_relative_difference": self.max_rel, "max_at": self.max_path,
                "rtol": self.rtol, "added": self.added,
                "changed_numbers": self.numbers[:50], "changed_verdicts": self.verdicts,
                "structure": self.structure[:50]}


def _apply_maps(tree: Any, maps: Sequence[Tuple[str, str]]) -> Any:
    """Move the subtrees at each ``old`` dotted path to ``new`` (``*`` = any key)."""
    for old, new in maps:
        src, dst = old.split("."), new.split(".")

        def move(node: Any, i: int, bound: List[str]) -> None:
            if not isinstance(node, dict):
                return
            key = src[i]
            keys = list(node) if key == "*" else [key]
            for k in keys:
                if k not in node:
                    continue
                if i + 1 < len(src):
                    move(node[k], i + 1, bound + [k])
                    continue
                value = node.pop(k)
                stars = iter(bound + [k])
                target = [next(stars) if part == "*" else part for part in dst]
                at = tree
                for part in target[:-1]:
                    at = at.setdefault(part, {})
                at[target[-1]] = value

        move(tree, 0, [])
    return tree


def compare(old: Dict[str, Any], new: Dict[str, Any], rtol: float = 1e-9,
            maps: Sequence[Tuple[str, str]] = ()) -> Diff:
    """Compare two parsed results.json trees; returns a :class:`Diff`."""
    old = _apply_maps(json.loads(json.dumps(old)), maps)
    diff = Diff(rtol)
    diff.walk("", {k: v for k, v in old.items() if k != "claims"},
              {k: v for k, v in new.items() if k != "claims"})
    diff.claims(old.get("claims", []), new.get("claims", []))
    return diff


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rtol", type=float, default=1e-9)
    p.add_argument("--map", action="append", default=[], metavar="OLD=NEW")
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    maps = [tuple(m.split("=", 1)) for m in args.map]
    with open(args.old) as f:
        old = json.load(f)
    with open(args.new) as f:
        new = json.load(f)
    diff = compare(old, new, args.rtol, maps)
    s = diff.summary()
    print(f"{args.old} -> {args.new}: {s['numbers_compared']} numbers, "
          f"{s['numbers_changed']} changed (rtol {args.rtol:g}; largest relative "
          f"difference {s['max_relative_difference']:.2e}); {s['claims_compared']} claims, "
          f"{s['verdicts_changed']} verdicts changed; {s['structure_changes']} structure "
          f"changes; {len(diff.added)} new entries.")
    if diff.max_path:
        print(f"  largest relative difference at {diff.max_path}")
    for line in diff.verdicts + diff.numbers[:20] + diff.structure[:20]:
        print("  " + line)
    for line in diff.added[:20]:
        print("  added: " + line)
    if args.json:
        sys.path.insert(0, __file__.rsplit("/", 2)[0])
        from ntk_poison import io
        io.write_json(args.json, s)
    return 1 if diff.changed else 0


if __name__ == "__main__":
    sys.exit(main())
