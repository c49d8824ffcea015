"""Top-5 loss-Hessian eigenpairs: matrix-free block Lanczos against the dense Hessian.

Cases (float64; see ``--help``):

* ``d784``: RBF kernel ridge regression on n = 500 MNIST training points (d = 784;
  deterministic uniform [0, 1] random data if MNIST cannot be loaded: the JSON says
  which), +-1 targets (even vs odd digit).
* ``d3072``: the same on n = 500 deterministic uniform [0, 1] random points of
  d = 3072 (CIFAR-sized; random labels).

In both, the RBF length scale is the median heuristic (median pairwise distance /
sqrt 2, as in krr_bench), the relative ridge is 1e-3, and the function is the LOSS at
one held-out test point, ``spectra.loss_fn(model, y0)`` at ``x0``, i.e. the Hessian
``g g^T + (f(x0) - y0) hess f(x0)``. Paths:

* ``dense``: ``spectra.top_eigenpairs(..., method="dense")`` (``jax.hessian`` + eigh);
* ``lanczos``: ``spectra.top_eigenpairs(..., method="lanczos")`` (defaults: block size
  k = 5, tol = 1e-8 relative to the largest |Ritz value|, max_iters = 100, key 0).

Timing: each path is called once first (``cold_seconds``: tracing and compilation
included), then ``--repeats`` interleaved rounds (median reported); see
benchmarks/_common.py. The goal at d = 3072: Lanczos >= 10x faster than dense with a
max relative eigenvalue error <= 1e-6. The JSON (``--out``, written atomically)
records whether it was met.

Usage::

    .venv/bin/python benchmarks/spectra_bench.py              # full run
    .venv/bin/python benchmarks/spectra_bench.py --quick      # smoke run (n = 100)
    .venv/bin/python benchmarks/spectra_bench.py --blas-threads 1 \
        --out benchmarks/results/spectra_bench_blas1.json     # single-threaded LAPACK
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (switches x64 on)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ntk_poison import kernels, krr, metrics, spectra  # noqa: E402

DEFAULT_OUT = C.out_path("spectra_bench")

FULL = dict(n=500, k=5)
QUICK = dict(n=100, k=5)
LAM = 1e-3
GOAL_SPEEDUP = 10.0
GOAL_REL_ERR = 1e-6


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pm1(labels: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(labels) % 2 == 0, 1.0, -1.0)


def load_case_data(case: str, n: int) -> Dict[str, Any]:
    if case == "d784":
        return C.load_flat_dataset(n, 1, name="mnist", d=784, seed=0)
    rng = np.random.default_rng(3072)
    return {
        "source": "deterministic random uniform[0,1] (n, 3072), numpy default_rng(3072)",
        "fallback_reason": None,
        "x_train": rng.random((n, 3072)), "labels_train": rng.integers(0, 10, n),
        "x_test": rng.random((1, 3072)), "labels_test": rng.integers(0, 10, 1),
        "d": 3072,
    }


def run_case(case: str, cfg: Dict[str, Any], repeats: int) -> Dict[str, Any]:
    n, k = cfg["n"], cfg["k"]
    ds = load_case_data(case, n)
    log(f"  data: {ds['source']}" + (f" (fallback: {ds['fallback_reason']})"
                                     if ds.get("fallback_reason") else ""))
    X = np.asarray(ds["x_train"], np.float64)
    y = pm1(ds["labels_train"])
    x0 = np.asarray(ds["x_test"][0], np.float64)
    y0 = float(pm1(ds["labels_test"])[0])
    d = X.shape[1]
    med = metrics.median_distance(X)
    ls = med / np.sqrt(2.0)
    model = krr.fit(kernels.rbf(ls), X, y, ridge=LAM)
    loss = spectra.loss_fn(model, y0)
    x0j = jnp.asarray(x0)
    f0 = float(model.predict(x0j[None])[0])

    fns = {
        "dense": lambda: spectra.top_eigenpairs(loss, x0j, k, "dense"),
        "lanczos": lambda: spectra.top_eigenpairs(loss, x0j, k, "lanczos",
                                                  return_info=True),
    }
    t = C.time_group(fns, repeats, log=log)
    dv, dvec = (np.asarray(a) for a in t["dense"].output)
    lv, lvec, info = t["lanczos"].output
    lv, lvec = np.asarray(lv), np.asarray(lvec)
    rel_err = np.abs(lv - dv) / np.abs(dv)
    overlap = np.abs(np.sum(lvec * dvec, axis=1))
    speedup = C.ratio(t["dense"].median, t["lanczos"].median)
    cpu_ratio = C.ratio(float(np.median(t["dense"].cpu_times)),
                        float(np.median(t["lanczos"].cpu_times)))
    min_ratio = C.ratio(min(t["dense"].times), min(t["lanczos"].times))
    max_rel = float(np.max(rel_err))
    goal = None
    if case == "d3072":
        goal = bool(speedup is not None and speedup >= GOAL_SPEEDUP
                    and max_rel <= GOAL_REL_ERR and info.converged)
    lam_gn, _ = spectra.gauss_newton_top(model, x0j)
    return {
        "data": {"source": ds["source"], "fallback_reason": ds.get("fallback_reason"),
                 "n_train": n, "d": d, "median_pairwise_distance": med,
                 "rbf_length_scale": ls, "relative_ridge": LAM,
                 "x0": "the first test point", "y0": y0, "f_x0": f0,
                 "residual_f_minus_y0": f0 - y0,
                 "gauss_newton_eigenvalue_norm_g_sq": float(lam_gn)},
        "k": k,
        "timings": {name: tm.as_dict() for name, tm in t.items()},
        "speedup_dense_over_lanczos": speedup,
        "speedup_cross_check": {"cpu_time_median_ratio": cpu_ratio,
                                "min_wall_ratio": min_ratio},
        "dense_eigenvalues": dv,
        "lanczos_eigenvalues": lv,
        "relative_eigenvalue_error": rel_err,
        "max_relative_eigenvalue_error": max_rel,
        "eigenvector_overlap_abs_cos": overlap,
        "lanczos_info": {"converged": info.converged, "iterations": info.iterations,
                         "n_hvp": info.n_hvp, "block_size": info.block_size,
                         "max_iters": info.max_iters, "tol": info.tol,
                         "scale": info.scale,
                         "residuals": np.asarray(info.residuals),
                         "relative_residuals": np.asarray(info.residuals) / info.scale},
        "dense_hvp_equivalent": d,
        "goal": (f"speedup >= {GOAL_SPEEDUP} and max relative eigenvalue error <= "
                 f"{GOAL_REL_ERR}" if case == "d3072" else None),
        "goal_met": goal,
    }


CASES = ("d784", "d3072")
TIMING = {
    "warmup": "each path is called once before timing, on the same inputs; that call is "
              "cold_seconds (tracing + XLA compilation); medians exclude it",
    "interleaving": "dense and lanczos alternate round robin, order rotated each round",
    "what_is_timed": "the whole public call top_eigenpairs(loss_fn(model, y0), x0, k=5, "
                     "method=...): validation, the jitted solver, and (lanczos) the "
                     "residual check",
}


def main(argv=None) -> int:
    args, cfg, t_start, cases, failed = C.run_main(__doc__, DEFAULT_OUT, CASES, argv,
                                                   QUICK, FULL, run_case)
    rows = []
    for name, c in cases.items():
        if "timings" not in c:
            continue
        for path in ("dense", "lanczos"):
            tm = c["timings"][path]
            lz = path == "lanczos"
            rows.append({
                "case": name, "path": path, "median_s": tm["median_seconds"],
                "spread": tm["spread_rel"], "cold_s": tm["cold_seconds"],
                "speedup": c["speedup_dense_over_lanczos"] if lz else None,
                "max_rel_err": c["max_relative_eigenvalue_error"] if lz else None,
                "n_hvp": c["lanczos_info"]["n_hvp"] if lz else c["data"]["d"],
                "goal_met": c["goal_met"] if lz else None,
            })
    result = C.result_record(
        "spectra_bench", args, cfg, cases, rows, t_start,
        goal=f"d3072: lanczos >= {GOAL_SPEEDUP}x faster than dense, max relative "
             f"eigenvalue error <= {GOAL_REL_ERR}",
        goal_met=cases.get("d3072", {}).get("goal_met"),
        timing=TIMING, advice="compare speedup_cross_check (CPU-time and min-wall ratios)")
    path = C.write_json_atomic(args.out, result)
    g = result["goal_met"]
    return C.finish(result, path, failed, C.format_table(
        rows, ["case", "path", "median_s", "spread", "cold_s", "speedup", "max_rel_err",
               "n_hvp", "goal_met"]),
        [f"\ngoal (d3072, >= {GOAL_SPEEDUP}x and rel err <= {GOAL_REL_ERR}): "
         f"{'met' if g else ('NOT met' if g is False else 'not run')}"])


if __name__ == "__main__":
    sys.exit(main())
