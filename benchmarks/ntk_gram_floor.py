"""The FC ReLU NTK Gram against the GEMM floor of the same shape (issue 15, item 4).

Cases (float64, MNIST, d = 784; ``--quick``: smaller n and m):

1. ``train_gram``: ``k(X, X)``, n = 4000, of ``kernels.nt_fc(depth=2)`` (the symmetric
   block path), the same kernel without symmetry (``k.fn.cross(X, X)``: the fused
   recursion on every entry), neural-tangents' ``stax`` kernel_fn called directly
   (jitted; this was ``nt_fc`` before, 1.03x of it in krr_bench) and the GEMM floor
   ``X @ X.T`` in XLA float64 (jitted), all timed interleaved in one run.
2. ``test_gram``: ``k(x, X)``, m = 1000 test points by n = 4000 (no symmetry to use),
   against neural-tangents and the floor ``x @ X.T``.

Each path's time and its ratio to the floor of its case (median wall; min-wall and
median-CPU cross-checks), and the agreement with neural-tangents: max |ours - nt| /
max |nt| off the diagonal and overall, and both diagonals of ``k(X, X)`` against the
exact ``t = 0`` recursion (an angle from rounded covariances has an O(sqrt eps) error
there, in both). Goal: ours <= 2x the floor, off-diagonal agreement <= 1e-12.

Usage::

    .venv/bin/python benchmarks/ntk_gram_floor.py            # n = 4000 (README numbers)
    .venv/bin/python benchmarks/ntk_gram_floor.py --quick    # n = 500 smoke run
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (switches x64 on)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ntk_poison import kernels  # noqa: E402

NAME = "ntk_gram_floor"
FULL = dict(n=4000, m=1000, repeats=5, depth=2, W_std=1.0, b_std=0.0)
QUICK = dict(n=500, m=200, repeats=3, depth=2, W_std=1.0, b_std=0.0)
GOAL_RATIO = 2.0
GOAL_AGREEMENT = 1e-12
BLAS_THREADS = 1


def _stax_kernel_fn(depth: int, W_std: float, b_std: float):
    from neural_tangents import stax  # ntk_poison already applied its _compat patch
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(512, W_std=W_std, b_std=b_std), stax.Relu()]
    layers += [stax.Dense(1, W_std=W_std, b_std=b_std)]
    kernel_fn = stax.serial(*layers)[2]
    return jax.jit(lambda a, b: kernel_fn(a, b, "ntk"))


def _exact_diagonal(x: np.ndarray, depth: int, W_std: float, b_std: float) -> np.ndarray:
    """k(x, x) by the t = 0 recursion (numpy): q = W^2 |x|^2/d + b^2, theta = q; per
    ReLU layer q <- W^2 q/2 + b^2, theta <- q + W^2 theta/2."""
    w2, b2 = W_std ** 2, b_std ** 2
    q = w2 * np.sum(x * x, axis=1) / x.shape[1] + b2
    theta = q.copy()
    for _ in range(depth):
        q = w2 * q / 2.0 + b2
        theta = q + w2 * theta / 2.0
    return theta


def _case(fns: Dict[str, Any], floor: str, repeats: int) -> Dict[str, Any]:
    tm = C.time_group(fns, repeats, log=C.log)
    pairs = {f"{p}_over_floor": (p, floor) for p in fns if p != floor}
    cross = C.ratios_by_statistic(tm, pairs)
    return {"timings": {p: t.as_dict() for p, t in tm.items()},
            "median_seconds": {p: t.median for p, t in tm.items()},
            "ratios_to_floor": cross["median_wall"], "ratios_cross_check": cross,
            "ratio_ours_least_favourable": C.least_favourable(
                cross, ["ours_over_floor"], higher_is_better=False)}, tm


def _agreement(K: np.ndarray, ref: np.ndarray, off_diagonal: bool) -> float:
    diff = np.abs(K - ref)
    if off_diagonal:
        np.fill_diagonal(diff, 0.0)
    return float(diff.max() / np.abs(ref).max())


def run(quick: bool) -> Dict[str, Any]:
    """Run both cases; returns the JSON record (also what ``__main__`` writes)."""
    t_start = time.perf_counter()
    pools = C.limit_blas_threads(BLAS_THREADS)
    cfg = QUICK if quick else FULL
    n, m, depth, W, b = cfg["n"], cfg["m"], cfg["depth"], cfg["W_std"], cfg["b_std"]
    ds = C.load_flat_dataset(n, m)
    X = jax.block_until_ready(jnp.asarray(ds["x_train"]))
    x = jax.block_until_ready(jnp.asarray(ds["x_test"]))
    k = kernels.nt_fc(depth=depth, W_std=W, b_std=b, kind="ntk")
    nt = _stax_kernel_fn(depth, W, b)
    gemm = jax.jit(lambda a, c: a @ c.T)
    cases: Dict[str, Any] = {}

    C.log(f"case train_gram: k(X, X), n = {n}, d = {X.shape[1]}")
    load0 = C.load_info()["loadavg_1_5_15"]
    res, tm = _case({"floor_gemm": lambda: gemm(X, X), "ours": lambda: k(X, X),
                     "ours_no_symmetry": lambda: k.fn.cross(X, X),
                     "neural_tangents": lambda: nt(X, X)}, "floor_gemm", cfg["repeats"])
    K, K_full, K_nt = (np.asarray(tm[p].output) for p in
                       ("ours", "ours_no_symmetry", "neural_tangents"))
    exact = _exact_diagonal(ds["x_train"], depth, W, b)
    res["agreement"] = {
        "ours_vs_nt_offdiag_rel": _agreement(K, K_nt, True),
        "with_diagonal_ours_vs_nt_rel": _agreement(K, K_nt, False),
        "ours_no_symmetry_vs_nt_rel": _agreement(K_full, K_nt, False),
        "ours_symmetric_exactly": bool(np.array_equal(K, K.T)),
        "diag_ours_vs_exact_t0_rel": float(np.max(np.abs(np.diag(K) - exact) / exact)),
        "diag_nt_vs_exact_t0_rel": float(np.max(np.abs(np.diag(K_nt) - exact) / exact)),
    }
    res["load_before"], res["load_after"] = load0, C.load_info()["loadavg_1_5_15"]
    cases["train_gram"] = res
    del K, K_full, K_nt, tm

    C.log(f"case test_gram: k(x, X), m = {m}, n = {n}")
    load0 = C.load_info()["loadavg_1_5_15"]
    res, tm = _case({"floor_gemm": lambda: gemm(x, X), "ours": lambda: k(x, X),
                     "neural_tangents": lambda: nt(x, X)}, "floor_gemm", cfg["repeats"])
    res["agreement"] = {"ours_vs_nt_rel": _agreement(np.asarray(tm["ours"].output),
                                                     np.asarray(tm["neural_tangents"].output),
                                                     False)}
    res["load_before"], res["load_after"] = load0, C.load_info()["loadavg_1_5_15"]
    cases["test_gram"] = res
    del tm

    for name, c in cases.items():
        agree = max(v for key, v in c["agreement"].items() if key.startswith("ours_vs_nt"))
        worst = c["ratio_ours_least_favourable"]
        c["goal"] = {"text": f"ours <= {GOAL_RATIO:g}x the GEMM floor (judged on the least "
                             "favourable of median-wall, min-wall and median-CPU ratios) and "
                             f"off-diagonal agreement with neural-tangents <= "
                             f"{GOAL_AGREEMENT:g}",
                     "speed_ok": bool(worst is not None and worst <= GOAL_RATIO),
                     "accuracy_ok": bool(agree <= GOAL_AGREEMENT)}
        c["goal_met"] = bool(c["goal"]["speed_ok"] and c["goal"]["accuracy_ok"])
    return {
        "benchmark": NAME, "schema_version": 1, "mode": "quick" if quick else "full",
        "command": [os.path.basename(sys.executable)] + sys.argv,
        "sizes": {**cfg, "d": int(X.shape[1]), "data": ds["source"]},
        "kernel": repr(k), "blas_threads": BLAS_THREADS, "blas_pools": pools,
        "timing_method": C.timing_method(
            warmup="one call per path before timing (cold_seconds)",
            interleaving="paths of a case timed round robin, order rotated each round",
            floor="jax.jit(lambda a, c: a @ c.T), float64, same shapes, same run",
            threads="BLAS pools limited to 1 (threadpoolctl); XLA's own CPU dot and "
                    "elementwise loops use its default intra-op threads (all cores)"),
        "machine": C.machine_info(C.REPO), "cases": cases,
        "goal_met": bool(all(c["goal_met"] for c in cases.values())),
        "contention_warning": C.contention_warning(
            cases, "rerun on a quiet machine for the README figures"),
        "wall_seconds_total": time.perf_counter() - t_start,
    }


def _table(result: Dict[str, Any]) -> str:
    rows = []
    for name, c in result["cases"].items():
        for p, sec in c["median_seconds"].items():
            rows.append({"case": name, "path": p, "median_s": sec,
                         "x_floor": c["ratios_to_floor"].get(f"{p}_over_floor", 1.0)})
    return C.format_table(rows, ["case", "path", "median_s", "x_floor"])


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    result = run(quick)
    path = C.write_json_atomic(C.out_path(NAME) if not quick else
                               os.path.join("benchmarks", "results",
                                            f"{NAME}_quick.json"), result)
    print(_table(result))
    for name, c in result["cases"].items():
        print(f"{name}: agreement {c['agreement']}; goal_met {c['goal_met']}")
    if result["contention_warning"]:
        print("WARNING: " + result["contention_warning"])
    print(f"wall {result['wall_seconds_total']:.0f} s; wrote {path}")
