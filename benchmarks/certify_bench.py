"""Exact kernel certificates (ntk_poison.certify.kernel): batched against a per-point loop.

Case ``kernel`` (float64): RBF KRR on n = 4000 deterministic random points
(numpy ``default_rng(0)``, standard normal, d = 20), +-1 labels ``sign(x . w)`` with
10% flipped at random, relative ridge 1e-3, length scale the median heuristic
(median pairwise distance of 500 points / sqrt 2, as krr_bench); 10,000 test points
from the same distribution. The certificate is the certified radius of every test
point (the largest number of label flips that cannot change sign f).

Paths:

* ``batched``: ``certify.certified_radius`` on all 10,000 points: one Cholesky of
  ``K + n lam I`` (O(n^3)), a blocked triangular solve with ``k(X, x_test)`` on the
  right (O(n^2) per point, BLAS-3), then a sort per point (O(n log n)).
* ``loop_refactor``: the naive per-point loop: per test point ``numpy.linalg.solve(A,
  k(X, x))`` (a fresh LU of the n x n system each time, O(n^3) per point), then the
  same radius formula in numpy. Timed on ``loop_points`` points and extrapolated
  linearly to all test points (the JSON says so).
* ``loop_shared_factor``: a per-point loop reusing one Cholesky factor
  (``scipy.linalg.cho_solve`` per point: O(n^2) per point but matrix-vector, not
  BLAS-3). Timed on ``loop_points`` points, extrapolated likewise.

Both loops' radii are checked equal to the batched ones on their subset.

Timing: every path is called once first (``cold_seconds``: compilation included), then
``--repeats`` interleaved rounds (medians); see benchmarks/_common.py. Results go to
``--out`` (JSON, written atomically).

Usage::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/certify_bench.py [--quick]
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (switches x64 on)

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

from ntk_poison import certify, kernels  # noqa: E402

DEFAULT_OUT = C.out_path("certify_bench")

FULL = dict(n=4000, d=20, n_test=10_000, loop_points=16, shared_points=400)
QUICK = dict(n=500, d=20, n_test=1000, loop_points=8, shared_points=100)
LAM = 1e-3


def make_data(n: int, d: int, n_test: int) -> Dict[str, Any]:
    rng = np.random.default_rng(0)
    w = rng.normal(size=d)
    X, xt = rng.normal(size=(n, d)), rng.normal(size=(n_test, d))
    y = np.sign(X @ w)
    y[y == 0] = 1.0
    flip = rng.random(n) < 0.1
    y[flip] *= -1
    sub = X[:500]
    dist = np.sqrt(np.maximum(((sub[:, None] - sub[None]) ** 2).sum(-1), 0.0))
    ls = float(np.median(dist[np.triu_indices(len(sub), 1)]) / np.sqrt(2.0))
    return dict(X=X, y=y, xt=xt, y_test=np.where(xt @ w >= 0, 1.0, -1.0), length_scale=ls)


def radius_np(a: np.ndarray, y: np.ndarray) -> int:
    """The certified radius of one point from its weights (numpy, the module's rule)."""
    f = a @ y
    if f == 0:
        return 0
    g = np.sort(np.maximum(2.0 * np.sign(f) * a * y, 0.0))[::-1]
    return int(np.sum(abs(f) - np.cumsum(g) > 0))


def case_kernel(cfg: Dict[str, Any], repeats: int) -> Dict[str, Any]:
    ds = make_data(cfg["n"], cfg["d"], cfg["n_test"])
    X, y, xt = ds["X"], ds["y"], ds["xt"]
    n, P = len(X), cfg["loop_points"]
    k = kernels.rbf(ds["length_scale"])
    sub_loop, sub_shared = xt[:P], xt[:cfg["shared_points"]]

    def batched():
        return certify.certified_radius(k, X, y, LAM, xt)

    def gram():
        return np.asarray(k(X, X)) + n * LAM * np.eye(n)

    def loop_refactor():
        A = gram()
        return np.array([radius_np(np.linalg.solve(A, np.asarray(k(X, x[None]))[:, 0]), y)
                         for x in sub_loop])

    def loop_shared():
        fac = scipy.linalg.cho_factor(gram(), lower=True)
        return np.array([radius_np(scipy.linalg.cho_solve(fac, np.asarray(
            k(X, x[None]))[:, 0]), y) for x in sub_shared])

    C.log(f"  n={n}, d={cfg['d']}, test={len(xt)}, loop subsets {P} / "
          f"{cfg['shared_points']}")
    t = C.time_group({"batched": batched, "loop_refactor": loop_refactor,
                      "loop_shared_factor": loop_shared}, repeats, log=C.log)
    r = np.asarray(t["batched"].output)
    agree = bool(np.array_equal(r[:P], t["loop_refactor"].output)
                 and np.array_equal(r[:len(sub_shared)], t["loop_shared_factor"].output))
    med = {name: tm.median for name, tm in t.items()}
    scale_loop, scale_shared = len(xt) / P, len(xt) / len(sub_shared)
    extrap = {"loop_refactor": med["loop_refactor"] * scale_loop,
              "loop_shared_factor": med["loop_shared_factor"] * scale_shared}
    acc = certify.certified_accuracy(k, X, y, LAM, xt, ds["y_test"], [0, 1, 2, 5, 10, 20])
    return {
        "data": {"source": "numpy default_rng(0) standard normal", "n": n, "d": cfg["d"],
                 "n_test": len(xt), "length_scale": ds["length_scale"], "ridge": LAM,
                 "labels": "sign(x . w), 10% of training labels flipped"},
        "timings": {name: tm.as_dict() for name, tm in t.items()},
        "batched_seconds": med["batched"],
        "loop_points_timed": {"loop_refactor": P, "loop_shared_factor": len(sub_shared)},
        "loop_seconds_extrapolated_to_all_test_points": extrap,
        "extrapolation": "median loop time on the subset x (n_test / subset size); the "
                         "loops' cost is linear in the number of points (the Gram and "
                         "factor are formed once per call and included)",
        "speedup_vs_loop_refactor": C.ratio(extrap["loop_refactor"], med["batched"]),
        "speedup_vs_loop_shared_factor": C.ratio(extrap["loop_shared_factor"],
                                                 med["batched"]),
        "radii_agree_on_subsets": agree,
        "radius_quantiles_0_25_50_75_100": np.percentile(r, [0, 25, 50, 75, 100]),
        "certified_accuracy_at_k_0_1_2_5_10_20": acc,
        "goal_met": agree,
    }


CASES = ("kernel",)
TIMING = {
    "warmup": "each path is called once before timing, on the same inputs; that call is "
              "cold_seconds (tracing + XLA compilation); medians exclude it",
    "interleaving": "batched and the two loops alternate round robin, order rotated",
    "what_is_timed": "the whole public call certify.certified_radius(k, X, y, ridge, "
                     "x_test) for all test points; each loop on its subset, including "
                     "forming the Gram (and the factor) once",
}


def run_case(name: str, cfg: Dict[str, Any], repeats: int) -> Dict[str, Any]:
    return {"kernel": case_kernel}[name](cfg, repeats)


def main(argv=None) -> int:
    args, cfg, t_start, cases, failed = C.run_main(__doc__, DEFAULT_OUT, CASES, argv,
                                                   QUICK, FULL, run_case)
    rows = []
    c = cases.get("kernel", {})
    if "timings" in c:
        ex = c["loop_seconds_extrapolated_to_all_test_points"]
        rows = [{"path": "batched", "median_s": c["batched_seconds"],
                 "all_points_s": c["batched_seconds"], "speedup": None},
                {"path": "loop_refactor",
                 "median_s": c["timings"]["loop_refactor"]["median_seconds"],
                 "all_points_s": ex["loop_refactor"],
                 "speedup": c["speedup_vs_loop_refactor"]},
                {"path": "loop_shared_factor",
                 "median_s": c["timings"]["loop_shared_factor"]["median_seconds"],
                 "all_points_s": ex["loop_shared_factor"],
                 "speedup": c["speedup_vs_loop_shared_factor"]}]
    result = C.result_record(
        "certify_bench", args, cfg, cases, rows, t_start,
        goal="batched radii equal the per-point loops' radii; report both times",
        goal_met=c.get("goal_met"), timing=TIMING,
        advice="compare the cpu_times_seconds of the paths")
    path = C.write_json_atomic(args.out, result)
    return C.finish(result, path, failed, C.format_table(
        rows, ["path", "median_s", "all_points_s", "speedup"]),
        [f"\nradii agree on the loop subsets: {c.get('radii_agree_on_subsets')}"])


if __name__ == "__main__":
    sys.exit(main())
