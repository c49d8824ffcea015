"""Shared helpers for the ntk-poison benchmarks: timing, machine info, data, JSON.

Conventions every benchmark follows (so their JSON files are comparable):

* float64 unless a row says otherwise (importing this module switches x64 on);
* every timed path is called once before timing. That first call is reported as
  ``cold_seconds`` (it includes tracing and XLA compilation); the timed repeats that
  follow exclude compilation;
* competitors of one case are timed *interleaved* (round robin, the order rotated
  each round), so that load from other processes on the machine hits them alike;
  each case reports the median over repeats, every repeat time and the spread;
* results are written atomically (temporary file in the same folder, then
  ``os.replace``), so a reader never sees a half-written JSON file.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import jax

jax.config.update("jax_enable_x64", True)   # the benchmarks' preamble: float64, before
                                            # any array exists (importing _common does it)

from ntk_poison import io  # noqa: E402

#: the repository root
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def out_path(name: str) -> str:
    """The default JSON output of benchmark ``name``: benchmarks/results/NAME.json."""
    return os.path.join("benchmarks", "results", f"{name}.json")

__all__ = [
    "enable_x64", "block", "Timing", "timed_call", "time_group", "ratios_by_statistic",
    "least_favourable", "machine_info", "load_info",
    "env_blas_vars", "load_flat_dataset", "write_json_atomic",
    "to_jsonable", "format_table", "ratio", "error_record",
    "log", "time_repeats", "run_cases", "contention_warning", "pca_project",
    "relative_error", "timing_method", "limit_blas_threads", "arg_parser", "parse_args",
    "result_record", "finish", "REPO", "out_path", "run_main",
]


# --------------------------------------------------------------------------- set-up

def enable_x64() -> None:
    """Switch JAX to float64. Call before any JAX array is created."""
    import jax
    jax.config.update("jax_enable_x64", True)


def block(out: Any) -> Any:
    """Wait for every JAX array in ``out`` (a pytree) to be computed."""
    import jax
    return jax.block_until_ready(out)


# --------------------------------------------------------------------------- timing

class Timing:
    """The timings of one path: a cold first call, then ``repeats`` warm calls."""

    def __init__(self, name: str):
        self.name = name
        self.cold_seconds: Optional[float] = None
        self.times: List[float] = []
        self.cpu_times: List[float] = []
        self.output: Any = None

    @property
    def median(self) -> float:
        return float(np.median(self.times)) if self.times else float("nan")

    def as_dict(self) -> Dict[str, Any]:
        t = np.asarray(self.times, dtype=float)
        med = self.median
        d: Dict[str, Any] = {
            "median_seconds": med,
            "times_seconds": [float(v) for v in t],
            "min_seconds": float(t.min()) if t.size else None,
            "max_seconds": float(t.max()) if t.size else None,
            # (max - min) / median: how much the repeats disagree.
            "spread_rel": float((t.max() - t.min()) / med) if t.size and med > 0 else None,
            "cold_seconds": self.cold_seconds,
            # Process CPU time (all threads) per repeat: less sensitive to other
            # processes than wall time; about 2x wall when both cores are busy.
            "cpu_times_seconds": [float(v) for v in self.cpu_times],
            "repeats": int(t.size),
        }
        return d


def timed_call(fn: Callable[[], Any]) -> Tuple[float, float, Any]:
    """Call ``fn()`` and block on its output: ``(wall seconds, cpu seconds, output)``."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = block(fn())
    t1 = time.perf_counter()
    c1 = time.process_time()
    return t1 - t0, c1 - c0, out


def time_group(fns: Mapping[str, Callable[[], Any]], repeats: int, *,
               log: Optional[Callable[[str], None]] = None) -> Dict[str, Timing]:
    """Time several competing zero-argument callables, interleaved.

    Each callable is first called once (its cold time: compilation included; this
    is also the warm-up, on exactly the shapes that are then timed). Then ``repeats``
    rounds call every callable once, the order rotated by one each round. Outputs are
    blocked on (``jax.block_until_ready``) inside the timed region; the output of the
    last call is kept in ``Timing.output``.
    """
    names = list(fns)
    res = {n: Timing(n) for n in names}
    for n in names:
        wall, _, out = timed_call(fns[n])
        res[n].cold_seconds = wall
        res[n].output = out
        if log:
            log(f"    {n}: first call (warm-up) {wall:.3f} s")
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            wall, cpu, out = timed_call(fns[n])
            res[n].times.append(wall)
            res[n].cpu_times.append(cpu)
            res[n].output = out
        if log:
            log(f"    round {r + 1}/{repeats}: " +
                ", ".join(f"{n} {res[n].times[-1]:.3f} s" for n in names))
    return res


def time_repeats(name: str, fn: Callable[[], Any], repeats: int, *,
                 warmup: Optional[Callable[[], Any]] = None,
                 log: Optional[Callable[[str], None]] = None) -> Timing:
    """Time one path alone: a warm-up call, then ``repeats`` timed calls of ``fn``.

    For a path too slow to repeat as often as :func:`time_group` would, or with no
    competitor to interleave with. ``warmup`` (default ``fn`` itself) must compile every
    jitted function that ``fn`` reaches at the same shapes, e.g. the same training
    loop for fewer steps; its wall time is ``cold_seconds``.
    """
    res = Timing(name)
    res.cold_seconds, _, res.output = timed_call(warmup or fn)
    if log:
        log(f"    {name}: warm-up {res.cold_seconds:.3f} s")
    for r in range(repeats):
        wall, cpu, res.output = timed_call(fn)
        res.times.append(wall)
        res.cpu_times.append(cpu)
        if log:
            log(f"    {name}: repeat {r + 1}/{repeats} {wall:.3f} s")
    return res


def timing_method(**entries: str) -> Dict[str, str]:
    """The JSON ``timing_method`` block: the shared clock and statistic, plus ``entries``
    (warm-up, interleaving, dtype, ... as each benchmark does them)."""
    entries.setdefault("dtype", "float64 (jax_enable_x64)")
    return {
        "clock": "time.perf_counter wall time around the call and "
                 "jax.block_until_ready of its output; cpu_times_seconds is "
                 "time.process_time (all threads of this process)",
        "statistic": "median over repeats; spread_rel = (max - min) / median",
        **entries,
    }


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """``num / den``, or None if either is missing or den is not positive."""
    if num is None or den is None or not den > 0 or math.isnan(num):
        return None
    return float(num) / float(den)


def ratios_by_statistic(timings: Mapping[str, "Timing"],
                        pairs: Mapping[str, Tuple[str, str]]) -> Dict[str, Dict[str, Any]]:
    """The ratios ``pairs[name] = (numerator path, denominator path)`` three ways.

    ``median_wall`` is the headline statistic. ``min_wall`` (the least disturbed
    repeat) and ``median_cpu`` (process CPU time) are cross-checks that are less
    sensitive to other processes on a shared machine.
    """
    stats = {
        "median_wall": lambda t: t.median,
        "min_wall": lambda t: float(np.min(t.times)) if t.times else None,
        "median_cpu": lambda t: float(np.median(t.cpu_times)) if t.cpu_times else None,
    }
    return {s: {name: ratio(f(timings[a]), f(timings[b])) for name, (a, b) in pairs.items()}
            for s, f in stats.items()}


def least_favourable(cross: Mapping[str, Mapping[str, Any]], names: Sequence[str], *,
                     higher_is_better: bool) -> Optional[float]:
    """The worst value of the ratios ``names`` over every statistic of
    :func:`ratios_by_statistic` (the minimum if higher is better, else the maximum).

    Goals are judged on it, so that a burst of load from other processes during
    one path's repeats cannot make a goal pass by luck.
    """
    vals = [v for stat in cross.values() for n in names
            for v in [stat.get(n)] if v is not None]
    if not vals:
        return None
    return float(min(vals) if higher_is_better else max(vals))


# --------------------------------------------------------------------------- machine

_ENV_PREFIXES = ("OPENBLAS", "OMP_", "MKL_", "BLIS_", "GOTO", "NVPL", "XLA_", "JAX_",
                 "TF_CPP", "NTK_POISON")


def env_blas_vars() -> Dict[str, str]:
    """Environment variables that change BLAS / XLA behaviour, with their values."""
    return {k: v for k, v in sorted(os.environ.items())
            if any(k.upper().startswith(p) for p in _ENV_PREFIXES)}


def limit_blas_threads(n: int) -> List[Dict[str, Any]]:
    """Limit every loaded BLAS/LAPACK thread pool to ``n`` threads, at run time.

    Uses threadpoolctl after importing scipy.linalg (whose OpenBLAS also serves
    jax's CPU LAPACK calls: eigh, Cholesky, triangular solves), so unlike the
    ``OPENBLAS_NUM_THREADS`` variable it works after numpy has loaded. On a shared
    machine one thread avoids OpenBLAS threads busy-waiting for a core that another
    process holds. Returns the pools as threadpoolctl reports them afterwards.
    """
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS)
    from threadpoolctl import threadpool_info, threadpool_limits
    threadpool_limits(limits=int(n), user_api="blas")
    return threadpool_info()


def load_info() -> Dict[str, Any]:
    """The 1/5/15-minute load averages: a cheap proxy for other processes' load,
    recorded before and after each case."""
    try:
        la = os.getloadavg()
        return {"loadavg_1_5_15": [round(v, 2) for v in la]}
    except OSError:  # pragma: no cover
        return {"loadavg_1_5_15": None}


def _version(mod: str) -> Optional[str]:
    try:
        from importlib import metadata
        return metadata.version(mod)
    except Exception:
        return None


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_state(repo: str) -> Dict[str, Any]:
    """HEAD commit and whether the work tree has changes (read-only git calls)."""
    out: Dict[str, Any] = {}
    try:
        out["commit"] = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=10).stdout.strip() or None
        status = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain"], capture_output=True, text=True,
            timeout=10).stdout
        out["dirty"] = bool(status.strip())
    except Exception as e:  # git missing, not a repo
        out["error"] = repr(e)
    return out


def machine_info(repo: Optional[str] = None) -> Dict[str, Any]:
    """Everything needed to interpret the numbers: hardware, versions, env, BLAS."""
    import jax
    import jax.numpy as jnp

    info: Dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": (len(os.sched_getaffinity(0))
                         if hasattr(os, "sched_getaffinity") else None),
        "versions": {m: _version(m) for m in (
            "jax", "jaxlib", "numpy", "scipy", "scikit-learn", "neural-tangents",
            "threadpoolctl", "ntk-poison")},
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "default_float_dtype": str(jnp.result_type(float)),
        "jax_compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "env": env_blas_vars(),
        "openblas_env": {k: os.environ.get(k) for k in (
            "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
            "OMP_NUM_THREADS")},
        "load_at_start": load_info(),
    }
    try:
        from threadpoolctl import threadpool_info
        # Import the libraries whose BLAS we use, so that every pool is listed.
        import scipy.linalg  # noqa: F401
        import sklearn  # noqa: F401
        info["threadpoolctl"] = threadpool_info()
    except Exception as e:
        info["threadpoolctl"] = {"error": repr(e)}
    if repo:
        info["git"] = _git_state(repo)
    return info


# --------------------------------------------------------------------------- data

def load_flat_dataset(n_train: int, n_test: int, *, name: str = "mnist", d: int = 784,
                      seed: int = 0) -> Dict[str, Any]:
    """The first ``n_train`` / ``n_test`` points of a flat dataset, as float64.

    Tries ``ntk_poison.data.load(name)`` (x flat ``(n, d)`` in [0, 1]); if that is not
    available or fails, falls back to a deterministic uniform [0, 1] random array of
    the same shape with random labels 0..9. The returned dict says which was used
    (``source``) and why (``fallback_reason``).
    """
    out: Dict[str, Any] = {"requested": name, "n_train": n_train, "n_test": n_test}
    try:
        from ntk_poison import data
        arrays = data.load(name)
        x_train, y_train, x_test, y_test = arrays[:4]
        x_train = np.asarray(x_train).reshape(len(x_train), -1)
        x_test = np.asarray(x_test).reshape(len(x_test), -1)
        if x_train.shape[0] < n_train or x_test.shape[0] < n_test:
            raise ValueError(f"{name} has only {x_train.shape[0]}/{x_test.shape[0]} points")
        out.update(
            source=f"ntk_poison.data.load({name!r})",
            x_train=np.ascontiguousarray(x_train[:n_train], dtype=np.float64),
            labels_train=np.asarray(y_train[:n_train]).astype(np.int64),
            x_test=np.ascontiguousarray(x_test[:n_test], dtype=np.float64),
            labels_test=np.asarray(y_test[:n_test]).astype(np.int64),
            fallback_reason=None)
    except Exception as e:
        rng = np.random.default_rng(seed)
        out.update(
            source=f"deterministic random uniform[0,1] (n, {d}), numpy default_rng({seed})",
            x_train=rng.random((n_train, d)),
            labels_train=rng.integers(0, 10, n_train),
            x_test=rng.random((n_test, d)),
            labels_test=rng.integers(0, 10, n_test),
            fallback_reason=f"{type(e).__name__}: {e}")
    out["d"] = int(out["x_train"].shape[1])
    return out


def pca_project(x_fit: np.ndarray, arrays: Sequence[np.ndarray], d: int
                ) -> Tuple[List[np.ndarray], float]:
    """Project ``arrays`` on the top-``d`` principal components of ``x_fit`` (numpy).

    Centred at the mean of ``x_fit``; components from ``eigh`` of its covariance.
    Returns the projected float64 arrays ``(m, d)`` and the fraction of the variance
    of ``x_fit`` that the ``d`` components keep.
    """
    x_fit = np.asarray(x_fit, dtype=np.float64)
    mean = x_fit.mean(axis=0)
    xc = x_fit - mean
    evals, evecs = np.linalg.eigh(xc.T @ xc)
    order = np.argsort(evals)[::-1]
    comps = evecs[:, order[:d]]
    kept = float(evals[order[:d]].sum() / max(evals.sum(), 1e-300))
    return [(np.asarray(a, dtype=np.float64) - mean) @ comps for a in arrays], kept


# --------------------------------------------------------------------------- output

def to_jsonable(obj: Any) -> Any:
    """Plain-JSON form of numpy / jax values (the library's encoder; NaN -> null)."""
    return io.to_jsonable(obj)


def write_json_atomic(path: str, obj: Any) -> str:
    """Write ``obj`` as JSON to ``path`` atomically; returns the absolute path."""
    return str(os.path.abspath(io.write_json(path, obj)))


def log(msg: str) -> None:
    """Progress messages go to stderr (stdout carries the final table)."""
    print(msg, file=sys.stderr, flush=True)


def relative_error(a: Any, ref: Any) -> float:
    """``||a - ref||_2 / ||ref||_2`` over all entries (inf if ref is 0)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    den = float(np.linalg.norm(ref))
    return float(np.linalg.norm(a - ref) / den) if den > 0 else float("inf")


def run_cases(wanted: Sequence[str], runners: Mapping[str, Callable[[], Dict[str, Any]]]
              ) -> Tuple[Dict[str, Any], bool]:
    """Run the cases ``wanted`` in order; returns ``(results by name, any failed)``.

    Each result gets ``wall_seconds_total`` and the load averages before and after
    (``load_before``, ``load_after``). A case that raises is recorded
    (``exception``, ``goal_met: False``) and the others still run.
    """
    cases: Dict[str, Any] = {}
    failed = False
    for name in wanted:
        log(f"case {name}")
        before = load_info()
        t0 = time.perf_counter()
        try:
            res = runners[name]()
        except Exception as e:  # record and go on with the other cases
            failed = True
            res = {"exception": error_record(e), "goal_met": False}
            log(f"  FAILED: {type(e).__name__}: {e}")
        res["wall_seconds_total"] = time.perf_counter() - t0
        res["load_before"] = before["loadavg_1_5_15"]
        res["load_after"] = load_info()["loadavg_1_5_15"]
        cases[name] = res
    return cases, failed


def arg_parser(doc: str, default_out: str, cases: Sequence[str], *,
               repeats_help: str = "timed repeats per path, after one warm-up call"
               ) -> Any:
    """The options every benchmark takes: ``--out``, ``--repeats``, ``--quick``,
    ``--blas-threads`` and ``--cases`` (a benchmark may add its own)."""
    import argparse
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=default_out, help=f"JSON output (default {default_out})")
    p.add_argument("--repeats", type=int, default=3, help=f"{repeats_help} (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a smoke run (the README figures come from the "
                        "full run)")
    p.add_argument("--blas-threads", type=int, default=None,
                   help="limit the BLAS/LAPACK thread pools (scipy's OpenBLAS, which "
                        "jax's CPU eigh and Cholesky call) to N threads at start-up, "
                        "via threadpoolctl (default: leave them alone). On a loaded "
                        "shared machine 1 avoids busy-waiting threads")
    p.add_argument("--cases", default=",".join(cases),
                   help=f"comma-separated subset of {', '.join(cases)} (default: all)")
    return p


def parse_args(p: Any, argv: Optional[Sequence[str]],
               cases: Sequence[str]) -> Tuple[Any, List[str]]:
    """Parse and check the shared options; applies ``--blas-threads``. Returns the
    arguments and the cases wanted, in order."""
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.blas_threads is not None and args.blas_threads < 1:
        p.error("--blas-threads must be >= 1")
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in wanted if c not in cases]
    if bad:
        p.error(f"unknown case(s) {bad}; known: {', '.join(cases)}")
    if args.blas_threads is not None:
        limit_blas_threads(args.blas_threads)
    return args, wanted


def run_main(doc: str, default_out: str, case_names: Sequence[str], argv, quick: Mapping,
             full: Mapping, run_case: Callable[[str, Mapping, int], Dict[str, Any]]):
    """The usual main: parse the shared options, then run ``run_case(name, sizes,
    repeats)`` for each case wanted. Returns ``(args, sizes, t_start, cases, failed)``."""
    args, wanted = parse_args(arg_parser(doc, default_out, case_names), argv, case_names)
    sizes = quick if args.quick else full
    t_start = time.perf_counter()
    cases, failed = run_cases(wanted, {name: (lambda name=name: run_case(
        name, sizes, args.repeats)) for name in wanted})
    return args, sizes, t_start, cases, failed


def result_record(name: str, args: Any, sizes: Mapping[str, Any], cases: Mapping[str, Any],
                  summary: Any, t_start: float, *, timing: Mapping[str, str],
                  advice: str, **extra: Any) -> Dict[str, Any]:
    """The JSON record of a benchmark run: what ran (name, mode, command, sizes,
    repeats, BLAS threads), how it was timed, the machine, the cases and their
    summary, a contention warning, the total wall time; ``extra`` adds entries."""
    out = {"benchmark": name, "schema_version": 1,
           "mode": "quick" if args.quick else "full",
           "command": [os.path.basename(sys.executable)] + sys.argv,
           "sizes": dict(sizes), "repeats": args.repeats,
           "blas_threads_requested": args.blas_threads,
           "timing_method": timing_method(**timing),
           "machine": machine_info(REPO)}
    out.update(extra)
    out.update({"cases": cases, "summary": summary,
                "contention_warning": contention_warning(cases, advice),
                "wall_seconds_total": time.perf_counter() - t_start,
                "load_at_end": load_info()["loadavg_1_5_15"]})
    return out


def finish(result: Mapping[str, Any], path: str, failed: bool, table: str,
           lines: Sequence[str]) -> int:
    """Print the summary table, the goal lines and any contention warning; the exit
    status (1 if a case failed)."""
    print(table)
    for line in lines:
        print(line)
    if result.get("contention_warning"):
        print("WARNING: " + result["contention_warning"])
    print(f"wall {result['wall_seconds_total']:.0f} s; wrote {path}")
    return 1 if failed else 0


def contention_warning(cases: Mapping[str, Mapping[str, Any]], advice: str
                       ) -> Optional[str]:
    """A warning naming the cases during which the 1-minute load average exceeded
    the CPU count (other processes competed for the cores), or None."""
    ncpu = os.cpu_count() or 1
    busy = [n for n, c in cases.items() if c.get("load_before") and c.get("load_after")
            and max(c["load_before"][0], c["load_after"][0]) > ncpu]
    if not busy:
        return None
    return (f"the 1-minute load average exceeded the {ncpu} CPUs during "
            f"{', '.join(busy)}: other processes competed for the cores, so wall times "
            f"are inflated; {advice}")


def error_record(e: BaseException) -> Dict[str, Any]:
    return {"type": type(e).__name__, "message": str(e),
            "traceback": traceback.format_exc()}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) restricted to ``columns``."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w)
                                  for i, (v, w) in enumerate(zip(vals, widths)))
    out = [line(list(columns)), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)
