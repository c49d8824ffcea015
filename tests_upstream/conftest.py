"""pytest glue for neural-tangents 0.6.5's own test suite (``make test-upstream``).

``tests_upstream/run_upstream.py`` copies this file to the root of the extracted
sdist (``build/nt-upstream/conftest.py``), beside the upstream ``tests/`` package, so
that pytest loads it before it imports any upstream test module. The upstream tests
then run against the INSTALLED ``neural_tangents`` (the sdist's own copy of the
library is not extracted).

It does two things, in this order:

1. ``ntk_poison._compat.patch()``: the LIBRARY shim, exactly as ntk-poison users get
   it (``import ntk_poison`` runs it). Nothing library-side is patched in this file.
   With ``NT_UPSTREAM_LIBRARY_FIXES=0`` in the environment the shim's run-time fixes
   of neural-tangents modules (``_compat.NT_MODULE_FIXES``) are switched off, leaving
   only the import-time names: that reproduces the "before the library fixes" counts.
2. Test-side patches: things the 2023 upstream TEST FILES (not the library) rely on
   that current JAX changed. These are bugs of the old test files, so they are fixed
   here and never in ``ntk_poison/_compat.py``.
"""

from __future__ import annotations

import os

import jax
import jax.tree_util

from ntk_poison import _compat

if os.environ.get("NT_UPSTREAM_LIBRARY_FIXES", "1") == "0":
    _compat.NT_MODULE_FIXES.clear()  # before anything imports neural_tangents
_compat.patch()

# --- test-side patches -------------------------------------------------------------

# `jax.tree_map` was removed in JAX 0.6 (deprecated since 0.4.26). tests/test_utils.py
# (assertAllClose, assert_close_matrices) and empirical_test.py (`from jax import
# tree_map`) use it. The library itself only uses jax.tree_util.tree_map.
if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree_util.tree_map

# JAX 0.5 changed the default of `jax_threefry_partitionable` to True, which changes
# every random stream: e.g. `random.normal(key, (8, ...))[:2]` now equals
# `random.normal(key, (2, ...))`. The upstream tests were written (tolerances of their
# Monte-Carlo comparisons, inputs drawn from re-used keys) against the old streams:
# batching_test's conv composition draws x1 and x2 from the SAME key and relies on
# them differing, and monte_carlo_test's 100-sample NTK estimate passes its 2e-2
# tolerance on the old stream (2.2e-2 on the new one). Restore the old streams for
# the test session (this only changes which random numbers the tests draw).
try:
    jax.config.update("jax_threefry_partitionable", False)
except (AttributeError, ValueError):  # a JAX without the flag has the old streams
    pass


def pytest_report_header(config):
    import neural_tangents
    fixes = "on" if _compat.NT_MODULE_FIXES else "OFF (NT_UPSTREAM_LIBRARY_FIXES=0)"
    return [f"neural_tangents under test: {neural_tangents.__file__}",
            f"jax {jax.__version__}; ntk_poison._compat run-time fixes: {fixes}; "
            f"NT_NUM_GENERATED_CASES={os.environ.get('NT_NUM_GENERATED_CASES', '4')}"]


# --- per-file summary --------------------------------------------------------------

_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
_OUTCOMES: dict[str, str] = {}
_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """One outcome per test item: error (setup/teardown) > failed > skipped > passed.

    A failing subtest (``self.subTest``) fails its test; passing subtests are not
    counted separately.
    """
    nodeid = report.nodeid
    path = nodeid.split("::")[0]
    if type(report).__name__ == "TestReport":
        _SECONDS[path] = _SECONDS.get(path, 0.0) + getattr(report, "duration", 0.0)
    if report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped:
        outcome = "skipped"
    elif report.when == "call":
        outcome = "passed"
    else:
        return
    previous = _OUTCOMES.get(nodeid)
    if previous is None or _RANK[outcome] > _RANK[previous]:
        _OUTCOMES[nodeid] = outcome


def _per_file() -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for nodeid, outcome in _OUTCOMES.items():
        path = nodeid.split("::")[0]
        row = table.setdefault(path, {k: 0 for k in _RANK})
        row[outcome] += 1
    for path, row in table.items():
        row["seconds"] = round(_SECONDS.get(path, 0.0), 1)
    return dict(sorted(table.items()))


def pytest_terminal_summary(terminalreporter):
    table = _per_file()
    if not table:
        return
    tr = terminalreporter
    tr.section("per-file counts (neural-tangents upstream tests)")
    tr.write_line(f"{'file':40s} {'passed':>7s} {'failed':>7s} {'errors':>7s} "
                  f"{'skipped':>8s} {'seconds':>8s}")
    for path, row in table.items():
        tr.write_line(f"{path:40s} {row['passed']:7d} {row['failed']:7d} "
                      f"{row['error']:7d} {row['skipped']:8d} {row['seconds']:8.0f}")
    out = os.environ.get("NT_UPSTREAM_SUMMARY")
    if out:
        import json
        with open(out, "w") as f:
            json.dump({"library_fixes": bool(_compat.NT_MODULE_FIXES),
                       "cases": int(os.environ.get("NT_NUM_GENERATED_CASES", "4")),
                       "files": table,
                       "outcomes": dict(sorted(_OUTCOMES.items()))}, f, indent=1)
