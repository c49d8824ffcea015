"""What every experiment writes: ``results.json``, PNG figures and ``report.md``.

A :class:`Report` collects claims (each a statement, a verdict and the measured
evidence), figures and free text, then :meth:`Report.write` saves everything
atomically. ``results.json`` holds every number behind every figure, the config and
the package versions, so a figure can be redrawn without rerunning.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from ntk_poison import io

__all__ = ["Claim", "Report", "versions", "progress", "new_figure", "x64_run"]


def versions() -> Dict[str, str]:
    """Versions of the packages behind a result, and the JAX backend."""
    import importlib.metadata as md
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("ntk-poison", "jax", "jaxlib", "neural-tangents", "flax", "optax", "numpy",
                "scipy", "scikit-learn", "matplotlib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import jax
        out["jax_backend"] = jax.default_backend()
        out["jax_devices"] = [str(d) for d in jax.devices()]
        out["x64"] = bool(jax.config.read("jax_enable_x64"))
    except Exception:  # pragma: no cover
        pass
    return out


def x64_run(run: Callable[[Any, Any], "Report"]) -> Callable[[Any, Any], "Report"]:
    """Decorator of an experiment's ``run(cfg, out_dir, **options)`` (e.g. ``fresh``): it
    runs with JAX's x64 switch at ``cfg.x64`` and leaves the global config as it found it
    (``x64_scope``)."""
    from ntk_poison import x64_scope

    @functools.wraps(run)
    def wrapped(cfg, out_dir, **options):
        with x64_scope(cfg.x64):
            return run(cfg, out_dir, **options)

    return wrapped


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, **kw):
    """A tqdm progress bar on stderr (silent when NTK_POISON_NO_PROGRESS is set)."""
    import os
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                disable=bool(os.environ.get("NTK_POISON_NO_PROGRESS")), **kw)


def new_figure(ncols: int = 1, nrows: int = 1, size=(5.0, 3.8)):
    """A matplotlib figure on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                             squeeze=False)
    return fig, axes


@dataclasses.dataclass
class Claim:
    """One statement of the theory and what the measurement says about it.

    ``supported`` is True, False, or None (not testable with these data). A
    ``measured`` line (:meth:`Report.measurement`) states a quantity that is not a
    theorem: it is reported as measured and gets no verdict.
    """

    name: str
    statement: str
    supported: Optional[bool]
    evidence: str
    figures: List[str] = dataclasses.field(default_factory=list)
    measured: bool = False

    @property
    def verdict(self) -> str:
        if self.measured:
            return "measured (no verdict: not a theorem)"
        return {True: "supported", False: "NOT supported", None: "inconclusive"}[self.supported]

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self) | {"verdict": self.verdict}
        if not self.measured:
            del d["measured"]
        return d


class Report:
    """Collects the results of one experiment run and writes them out."""

    def __init__(self, title: str, out_dir: str | Path, config: Any = None):
        self.title = title
        self.out_dir = Path(out_dir)
        self.config = config
        self.claims: List[Claim] = []
        self.figures: List[str] = []
        self.sections: List[str] = []
        self.results: Dict[str, Any] = {}
        self.started = datetime.datetime.now(datetime.timezone.utc)

    def claim(self, name: str, statement: str, supported: Optional[bool], evidence: str,
              figures: Iterable[str] = ()) -> Claim:
        c = Claim(name, statement, None if supported is None else bool(supported), evidence,
                  list(figures))
        self.claims.append(c)
        return c

    def measurement(self, name: str, statement: str, evidence: str,
                    figures: Iterable[str] = ()) -> Claim:
        """A measured quantity that is not a theorem (e.g. the training residual against
        kappa): listed with the claims, with no verdict and not counted as one."""
        c = Claim(name, statement, None, evidence, list(figures), measured=True)
        self.claims.append(c)
        return c

    def text(self, markdown: str) -> None:
        self.sections.append(markdown.strip())

    def figure(self, fig, name: str) -> str:
        """Save a matplotlib figure as ``name``.png atomically and close it."""
        import matplotlib.pyplot as plt
        fname = name if name.endswith(".png") else name + ".png"
        fig.tight_layout()
        io.write_atomic(self.out_dir / fname,
                        lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        self.figures.append(fname)
        return fname

    def to_dict(self) -> Dict[str, Any]:
        cfg = self.config.to_dict() if hasattr(self.config, "to_dict") else self.config
        return {
            "title": self.title,
            "started_utc": self.started.isoformat(),
            "config": cfg,
            "versions": versions(),
            "claims": [c.to_dict() for c in self.claims],
            "figures": self.figures,
            "results": self.results,
        }

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        n_ok = sum(c.supported is True for c in self.claims)
        n_claims = sum(not c.measured for c in self.claims)
        n_meas = len(self.claims) - n_claims
        lines += [f"{n_ok} of {n_claims} claims supported by the measured data"
                  + (f" ({n_meas} measured lines beside them, with no verdict)." if n_meas
                     else "."), ""]
        lines += ["| claim | verdict | evidence |", "|---|---|---|"]
        for c in self.claims:
            ev = c.evidence.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| **{c.name}**: {c.statement} | {c.verdict} | {ev} |")
        lines.append("")
        for s in self.sections:
            lines += [s, ""]
        if self.figures:
            lines += ["## Figures", ""]
            lines += [f"![{f}]({f})" for f in self.figures]
            lines.append("")
        v = versions()
        lines += ["---", f"jax {v.get('jax')} ({v.get('jax_backend')}), neural-tangents "
                  f"{v.get('neural-tangents')}, x64={v.get('x64')}. Every number is in "
                  "results.json.", ""]
        return "\n".join(lines)

    def write(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        io.write_json(self.out_dir / "results.json", self.to_dict())
        io.write_text(self.out_dir / "report.md", self.markdown())
        return self.out_dir
