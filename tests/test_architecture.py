"""The architecture's rules, checked on the source (ast), so a regression fails a test:

* no experiment imports another experiment;
* no module of the library or of an experiment uses another module's private name;
* no experiment file is longer than about 450 lines;
* an experiment's ``run`` leaves JAX's x64 switch as it found it (``report.x64_run``).
"""

from __future__ import annotations

import ast
import pathlib

import jax
import pytest

from ntk_poison import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "ntk_poison").rglob("*.py"))
EXPERIMENTS = sorted((ROOT / "experiments").rglob("*.py"))


def _experiment_of(path: pathlib.Path):
    rel = path.relative_to(ROOT / "experiments").parts
    return None if rel == ("__init__.py",) else rel[0].removesuffix(".py")


def _imports(tree):
    """(module, names) of every import statement."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, ()
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, tuple(a.name for a in node.names)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_experiment_imports_another(path):
    own = _experiment_of(path)
    for module, names in _imports(ast.parse(path.read_text())):
        parts = module.split(".")
        if parts[0] != "experiments":
            continue
        targets = [parts[1]] if len(parts) > 1 else list(names)
        assert all(t == own for t in targets), f"{path.name} imports {module} {names}"


def _private_uses(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    modules = {}                                   # local name -> imported module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                modules[a.asname or a.name.split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    yield f"from {node.module} import {a.name}"
                modules[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            yield f"{node.value.id}.{node.attr}"


OWN_PRIVATE_OK = {"_validate", "_compat"}          # the library's shared private modules


@pytest.mark.parametrize("path", LIBRARY + EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_uses_another_modules_private_name(path):
    bad = [u for u in _private_uses(path)
           if not any(u.endswith(f" {ok}") or u == f"from ntk_poison import {ok}"
                      or u.endswith(f"import {ok}") for ok in OWN_PRIVATE_OK)]
    bad = [u for u in bad if not u.split(".")[-1] in OWN_PRIVATE_OK]
    assert not bad, f"{path.relative_to(ROOT)} uses private names: {bad}"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_experiment_files_are_short(path):
    assert len(path.read_text().splitlines()) <= 470


@pytest.mark.parametrize("fails", [False, True])
def test_x64_run_restores_the_switch(fails):
    before = bool(jax.config.read("jax_enable_x64"))
    seen = {}

    @report.x64_run
    def run(cfg, out_dir):
        seen["x64"] = bool(jax.config.read("jax_enable_x64"))
        if fails:
            raise RuntimeError("boom")
        return "done"

    class Cfg:
        x64 = not before

    if fails:
        with pytest.raises(RuntimeError):
            run(Cfg(), None)
    else:
        assert run(Cfg(), None) == "done"
    assert seen["x64"] is (not before)
    assert bool(jax.config.read("jax_enable_x64")) is before
