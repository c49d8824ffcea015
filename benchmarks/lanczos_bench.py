"""Top-5 eigenpairs by Lanczos: our block Lanczos against matfree's, same problems.

Solvers (float64, the k = 5 algebraically largest pairs, each whole solve in ONE
``jax.jit`` whose arguments are the operator's arrays and the start vector(s); the
operator ``v -> A v`` is built inside that jit the same way for both):

* ``block_lanczos``: the core :func:`ntk_poison.linalg.block_lanczos` (what
  ``linalg.eigsh`` and ``spectra.top_eigenpairs(method="lanczos")`` jit): block size
  k, full reorthogonalisation, adaptive Ritz checks, stops when every residual is
  ``<= tol * scale`` (default tol, 1e-8), start block ``linalg.start_block`` key 0.
  Its matvec count ``iterations * k + k`` includes the k residual products it makes.
* ``matfree``: ``matfree.eig.eigh_partial(matfree.decomp.tridiag_sym(m,
  reortho="full"))(matvec, v0)``: single-vector Lanczos of fixed depth m (m matvecs,
  full reorthogonalisation, no breakdown handling), v0 the first row of the same
  start block. Depths m = 20, 40, 80, ..., then bisection (to 5%), choose three
  configurations: ``matfree_target``, the smallest m with max relative eigenvalue
  error <= 1e-6; ``matfree_same_tol``, the smallest m that also meets block_lanczos's
  own stopping rule (max relative residual <= tol); ``matfree_same_matvecs``, m =
  block_lanczos's matvec count. (If no m passes: the best m tried.) matfree does not
  handle breakdown: past the Krylov space's dimension (``--quick`` hessian_d3072, a
  scaled identity plus rank <= 101: ~103) its Ritz pairs are garbage.

Problems (``--cases``):

* ``planted``: ``A = Q diag(10, 9, 8, 7, 6, bulk) Q^T``, bulk uniform in [-5, 5], Q a
  random orthogonal matrix (numpy default_rng(0)), d = 3072 (``--quick``: 500).
* ``hessian_d784`` / ``hessian_d3072``: the input Hessian of the loss of RBF kernel
  ridge regression at one held-out point, built exactly as in spectra_bench.py
  (n = 500 MNIST / random points; ``--quick``: n = 100), as Hessian-vector products
  ``jax.linearize(jax.grad(loss), x0)`` (forward over reverse).

Accuracy, the same for both and outside the timed solve: against numpy ``eigh`` of
the dense matrix (the explicit A; ``jax.hessian``), the relative eigenvalue errors
``|lambda - lambda_ref| / |lambda_ref|`` and the residuals ``||A v - lambda v|| /
||A||_2`` (one product of the dense matrix per returned vector). Timing
(benchmarks/_common.py): fresh jitted functions, one warm-up call each
(``cold_seconds``), then ``--repeats`` interleaved rounds, median reported; the first
call of each program in the run (``first_call_seconds_incl_compile``) shows compiling. Each problem's ``verdict`` names the faster solver at
equal-or-better accuracy (block_lanczos vs ``matfree_same_tol``: residuals <= tol,
errors <= 1e-6) and gives the other two comparisons.

Usage::

    .venv/bin/python benchmarks/lanczos_bench.py --blas-threads 1    # full run
    .venv/bin/python benchmarks/lanczos_bench.py --quick             # smoke run
"""

from __future__ import annotations

import os
import sys
import time
from importlib import metadata
from typing import Any, Callable, Dict, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (switches x64 on)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from matfree import decomp, eig  # noqa: E402

from ntk_poison import _validate, kernels, krr, linalg, metrics, spectra  # noqa: E402
from spectra_bench import LAM, load_case_data, pm1  # noqa: E402  (same Hessian problem)

DEFAULT_OUT = C.out_path("lanczos_bench")

FULL = dict(d_planted=3072, n=500, k=5)
QUICK = dict(d_planted=500, n=100, k=5)
TARGET_REL_ERR = 1e-6
MF_REORTHO = "full"
MF_FIRST_DEPTH = 20
PLANTED_TOP = (10.0, 9.0, 8.0, 7.0, 6.0)
log = C.log


# --------------------------------------------------------------------------- problems

def planted_problem(d: int) -> Dict[str, Any]:
    rng = np.random.default_rng(0)
    lam = np.concatenate([PLANTED_TOP, rng.uniform(-5.0, 5.0, d - len(PLANTED_TOP))])
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    Q = Q * np.sign(np.diag(R))
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    matvec = jax.jit(lambda M, v: M @ v)
    return {"params": jnp.asarray(A), "build": lambda M: (lambda v: matvec(M, v)),
            "dense": lambda: A, "reference": "numpy.linalg.eigh of the explicit matrix",
            "meta": {"d": d, "planted_top": PLANTED_TOP, "bulk": "uniform [-5, 5]",
                     "eigenvectors": "Q of QR(standard normal), default_rng(0)"}}


def hessian_problem(case: str, n: int) -> Dict[str, Any]:
    ds = load_case_data(case.split("_")[1], n)
    X = np.asarray(ds["x_train"], np.float64)
    x0 = jnp.asarray(np.asarray(ds["x_test"][0], np.float64))
    y0 = float(pm1(ds["labels_test"])[0])
    med = metrics.median_distance(X)
    model = krr.fit(kernels.rbf(med / np.sqrt(2.0)), X, pm1(ds["labels_train"]),
                    ridge=LAM)
    params = (spectra.loss_fn(model, y0), x0)
    hess = jax.jit(lambda p: jax.hessian(p[0])(p[1]))
    return {"params": params, "build": lambda p: jax.linearize(jax.grad(p[0]), p[1])[1],
            "dense": lambda: np.asarray(hess(params)),
            "reference": "jax.hessian (jit) + numpy.linalg.eigh",
            "meta": {"d": int(X.shape[1]), "n_train": n, "source": ds["source"],
                     "fallback_reason": ds.get("fallback_reason"), "y0": y0,
                     "rbf_length_scale": med / np.sqrt(2.0), "relative_ridge": LAM,
                     "x0": "the first test point (as spectra_bench.py)"}}


# --------------------------------------------------------------------------- solvers

def ours(build: Callable, plan: linalg.LanczosPlan, k: int, tol: float) -> Callable:
    @jax.jit
    def solve(params, start):
        return linalg.block_lanczos(jax.vmap(build(params)), start, tol, k=k,
                                    which="LA", b=plan.b, M=plan.M, first=plan.first,
                                    buckets=plan.buckets)
    return solve


def matfree_lanczos(build: Callable, depth: int, k: int) -> Callable:
    eigh = eig.eigh_partial(decomp.tridiag_sym(depth, reortho=MF_REORTHO))

    @jax.jit
    def solve(params, v0):
        vals, vecs = eigh(build(params), v0)        # ascending, all `depth` pairs
        return vals[::-1][:k], vecs[::-1][:k]
    return solve


def accuracy(vals, vecs, ref_vals, A, norm_a) -> Dict[str, Any]:
    vals, vecs = np.asarray(vals), np.asarray(vecs)
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    rel_err = np.abs(vals - ref_vals) / np.abs(ref_vals)
    res = np.linalg.norm(vecs @ A - vals[:, None] * vecs, axis=1) / norm_a
    worst = lambda x: float(np.max(np.where(np.isfinite(x), x, np.inf)))  # noqa: E731
    return {"eigenvalues": vals, "relative_eigenvalue_error": rel_err,
            "max_relative_eigenvalue_error": worst(rel_err),
            "relative_residuals": res, "max_relative_residual": worst(res)}


def depth_search(run, ok, k, d) -> Optional[int]:
    """Doubling from MF_FIRST_DEPTH, then bisection: the smallest depth m with
    ``ok(run(m))`` (within 5%); None if no depth up to d passes."""
    lo, m = k - 1, max(k, min(MF_FIRST_DEPTH, d))
    while not ok(run(m)):
        if m == d:
            return None
        lo, m = m, min(2 * m, d)
    while m - lo > max(1, m // 20):
        mid = (lo + m) // 2
        lo, m = (lo, mid) if ok(run(mid)) else (mid, m)
    return m


# --------------------------------------------------------------------------- one case

def run_case(case: str, cfg: Dict[str, Any], repeats: int) -> Dict[str, Any]:
    k = cfg["k"]
    prob = (planted_problem(cfg["d_planted"]) if case == "planted"
            else hessian_problem(case, cfg["n"]))
    build, params, d = prob["build"], prob["params"], prob["meta"]["d"]
    t0 = time.perf_counter()
    A = prob["dense"]()
    w = np.linalg.eigh(A)[0]
    ref_seconds = time.perf_counter() - t0                    # dense matrix + eigh
    ref_vals, norm_a = w[::-1][:k].copy(), float(np.max(np.abs(w)))
    check = lambda vals, vecs: accuracy(vals, vecs, ref_vals, A, norm_a)  # noqa: E731
    log(f"  d = {d}; reference {ref_seconds:.2f} s; top eigenvalues {ref_vals}")

    tol = _validate.default_tol(np.float64)
    plan = linalg.lanczos_plan(d, k)
    start = linalg.start_block(_validate.as_key(None), (2 * plan.b, d), jnp.float64)
    v0 = start[0]
    first_ours, _, probe = C.timed_call(lambda: ours(build, plan, k, tol)(params, start))
    n_ours = int(probe[4]) * plan.b + k                       # its matvec count
    sweep: Dict[int, Dict[str, Any]] = {}
    ERR, RES = "max_relative_eigenvalue_error", "max_relative_residual"

    def run(m):
        if m not in sweep:
            t1 = time.perf_counter()
            acc = check(*C.block(matfree_lanczos(build, m, k)(params, v0)))
            sweep[m] = {"depth": m, "seconds_incl_compile": time.perf_counter() - t1,
                        **{key: acc[key] for key in (ERR, RES)}}
            log(f"    matfree depth {m}: max rel err {acc[ERR]:.2e}, max rel residual "
                f"{acc[RES]:.2e}")
        return sweep[m]

    found = {"matfree_target": depth_search(
                 run, lambda r: r[ERR] <= TARGET_REL_ERR, k, d),
             "matfree_same_tol": depth_search(
                 run, lambda r: r[RES] <= tol and r[ERR] <= TARGET_REL_ERR, k, d)}
    best = lambda key: min(sweep, key=lambda j: (sweep[j][key], j))  # noqa: E731
    depths = {"matfree_target": found["matfree_target"] or best(ERR),
              "matfree_same_tol": found["matfree_same_tol"] or best(RES),
              "matfree_same_matvecs": min(n_ours, d)}
    run(depths["matfree_same_matvecs"])

    plan1 = linalg.lanczos_plan(d, k, 1, min(d, 1000))      # single-vector variant
    start1 = linalg.start_block(_validate.as_key(None), (2, d), jnp.float64)
    solvers = {"block_lanczos": ours(build, plan, k, tol),
               "block_lanczos_b1": ours(build, plan1, k, tol)}
    solvers.update({name: matfree_lanczos(build, m, k) for name, m in depths.items()})
    starts = {"block_lanczos": start, "block_lanczos_b1": start1}
    t = C.time_group({name: (lambda name=name: solvers[name](
        params, starts.get(name, v0))) for name in solvers}, repeats, log=log)

    vals, vecs, res, scale, iters, checks = t["block_lanczos"].output
    out = {"block_lanczos": dict(
        call="linalg.block_lanczos(jax.vmap(matvec), start, tol, k=5, which='LA', "
             "b, M, first, buckets from linalg.lanczos_plan(d, 5)) in one jax.jit",
        block_size=plan.b, max_iters=plan.M, tol=tol, iterations=int(iters),
        ritz_checks=int(checks), n_matvec=int(iters) * plan.b + k,  # + k: residuals
        converged=bool(np.all(np.asarray(res) <= tol * float(scale))),
        own_relative_residuals=np.asarray(res) / float(scale),
        first_call_seconds_incl_compile=first_ours,
        **check(vals, vecs), timing=t["block_lanczos"].as_dict())}
    vals, vecs, res, scale, iters, checks = t["block_lanczos_b1"].output
    out["block_lanczos_b1"] = dict(
        call="the same with block_size=1 (linalg.lanczos_plan(d, 5, 1, min(d, 1000)))",
        block_size=1, max_iters=plan1.M, tol=tol, iterations=int(iters),
        ritz_checks=int(checks), n_matvec=int(iters) + k,
        converged=bool(np.all(np.asarray(res) <= tol * float(scale))),
        first_call_seconds_incl_compile=None, **check(vals, vecs),
        timing=t["block_lanczos_b1"].as_dict())
    for name, m in depths.items():
        out[name] = dict(
            call=f"matfree.eig.eigh_partial(matfree.decomp.tridiag_sym({m}, "
                 f"reortho='{MF_REORTHO}'))(matvec, v0), top 5 of its {m} Ritz pairs, "
                 "in one jax.jit", depth=m, n_matvec=m, reortho=MF_REORTHO,
            depth_rule=DEPTH_RULES[name], criterion_met=(
                found.get(name) is not None if name in found else None),
            first_call_seconds_incl_compile=sweep[m]["seconds_incl_compile"],
            **check(*t[name].output), timing=t[name].as_dict())
    return {"problem": dict(prob["meta"], k=k, reference=prob["reference"],
                            reference_seconds=ref_seconds, norm_A_2=norm_a),
            "reference_eigenvalues": ref_vals, "solvers": out,
            "matfree_depth_search": [sweep[j] for j in sorted(sweep)],
            "verdict": verdict(out, tol)}


DEPTH_RULES = {  # the depth searches: doubling from MF_FIRST_DEPTH, bisection to 5%
    "matfree_target": f"smallest depth with max rel eigenvalue error <= "
                      f"{TARGET_REL_ERR:g} (else the depth with the smallest error)",
    "matfree_same_tol": "smallest depth that also has max rel residual <= tol, "
                        "block_lanczos's stopping rule (else the smallest residual)",
    "matfree_same_matvecs": "block_lanczos's matvec count (capped at d)",
}


def verdict(out: Dict[str, Dict[str, Any]], tol: float) -> Dict[str, Any]:
    med = {n: s["timing"]["median_seconds"] for n, s in out.items()}
    cpu = {n: float(np.median(s["timing"]["cpu_times_seconds"]))
           for n, s in out.items()}
    err = {n: s["max_relative_eigenvalue_error"] for n, s in out.items()}
    res = {n: s["max_relative_residual"] for n, s in out.items()}
    ours_ = "block_lanczos"

    def vs(name, label):
        r = C.ratio(med[name], med[ours_])
        e, o = err[name], err[ours_]
        return {"comparison": label, "matfree_depth": out[name]["depth"],
                "block_lanczos_matvecs": out[ours_]["n_matvec"],
                "matfree_over_block_lanczos_time": r,
                "matfree_over_block_lanczos_cpu_time": C.ratio(cpu[name], cpu[ours_]),
                "faster": None if r is None else ("matfree" if r < 1 else ours_),
                "more_accurate_eigenvalues": (
                    "tie (both <= 1e-12)" if max(e, o) <= 1e-12
                    else ours_ if o <= e else "matfree"),
                "max_rel_err": {ours_: o, "matfree": e},
                "max_rel_residual": {ours_: res[ours_], "matfree": res[name]}}

    cmp = {"equal_accuracy": vs("matfree_same_tol", f"equal accuracy: max rel residual "
                                f"<= tol = {tol:g} and max rel eigenvalue error <= "
                                f"{TARGET_REL_ERR:g} for both"),
           "eigenvalue_target_only": vs("matfree_target", "matfree's smallest depth "
                                        f"with max rel eigenvalue error <= "
                                        f"{TARGET_REL_ERR:g}"),
           "equal_matvecs": vs("matfree_same_matvecs", "the same number of matvecs")}
    b1 = C.ratio(med["matfree_same_tol"], med["block_lanczos_b1"])
    cmp["single_vector"] = {
        "comparison": "our solver with block_size=1 against matfree at equal accuracy",
        "matfree_over_block_lanczos_b1_time": b1,
        "block_lanczos_b1_matvecs": out["block_lanczos_b1"]["n_matvec"],
        "max_rel_err_b1": err["block_lanczos_b1"],
        "max_rel_residual_b1": res["block_lanczos_b1"]}
    ok = [n for n in (ours_, "matfree_same_tol")
          if res[n] <= tol and err[n] <= TARGET_REL_ERR]
    win = min(ok, key=med.get) if ok else None
    win = None if win is None else (ours_ if win == ours_ else "matfree")
    parts = [f"{win or 'neither'} is faster at equal-or-better accuracy" +
             ("" if len(ok) == 2 else " (the other does not reach it)" if ok else "")]
    for key, c in cmp.items():
        if key == "single_vector":
            parts.append(f"block_size=1: {c['block_lanczos_b1_matvecs']} matvecs, time "
                         f"ratio matfree/ours {b1 if b1 is None else f'{b1:.3f}'}")
            continue
        r = c["matfree_over_block_lanczos_time"]
        parts.append(f"{key}: matfree depth {c['matfree_depth']} vs "
                     f"{c['block_lanczos_matvecs']} block-Lanczos matvecs, time ratio "
                     f"matfree/ours {r if r is None else f'{r:.3f}'}, max rel err "
                     f"{c['max_rel_err']['matfree']:.1e} vs "
                     f"{c['max_rel_err'][ours_]:.1e}")
    return {"faster_at_equal_or_better_accuracy": win, "summary": "; ".join(parts),
            **cmp}


TIMING = {
    "warmup": "each solver (a fresh jitted function) is called once first: cold_seconds "
              "(retracing; XLA compilation may come from jax's in-memory cache, as the "
              "same program ran in the probe / depth search); "
              "first_call_seconds_incl_compile: the program's first call (compiling)",
    "interleaving": "block_lanczos (block sizes k and 1) and the three matfree depths "
                    "round robin, the order rotated each round; medians exclude the "
                    "warm-up",
    "what_is_timed": "one jitted solve: the operator (linearize for the Hessians), the "
                     "Lanczos run, and (block_lanczos) its k residual products",
}
CASES = ("planted", "hessian_d784", "hessian_d3072")


def main(argv=None) -> int:
    args, cfg, t_start, cases, failed = C.run_main(__doc__, DEFAULT_OUT, CASES, argv,
                                                   QUICK, FULL, run_case)
    rows = []
    for name, c in cases.items():
        for solver, s in c.get("solvers", {}).items():
            tm = s["timing"]
            rows.append({
                "case": name, "solver": solver, "depth": s.get("depth"),
                "n_matvec": s["n_matvec"], "median_s": tm["median_seconds"],
                "spread": tm["spread_rel"], "cold_s": tm["cold_seconds"],
                "first_s": s["first_call_seconds_incl_compile"],
                "max_rel_err": s["max_relative_eigenvalue_error"],
                "max_rel_res": s["max_relative_residual"],
                "criterion_met": s.get("criterion_met")})
    result = C.result_record(
        "lanczos_bench", args, cfg, cases, rows, t_start, timing=TIMING,
        advice="compare the cpu_times_seconds of the solvers",
        matfree={"version": metadata.version("matfree"), "reortho": MF_REORTHO,
                 "api": "matfree.eig.eigh_partial(matfree.decomp.tridiag_sym(depth, "
                        "reortho='full'))(matvec, v0)",
                 "reortho_note": "tridiag_sym(reortho='full') runs matfree's Arnoldi "
                                 "(decomp.hessenberg): per step one classical Gram-"
                                 "Schmidt pass and one reorthogonalisation pass against "
                                 "all previous vectors; no breakdown/deflation handling"},
        target_max_rel_eigenvalue_error=TARGET_REL_ERR)
    path = C.write_json_atomic(args.out, result)
    return C.finish(result, path, failed, C.format_table(
        rows, ["case", "solver", "depth", "n_matvec", "median_s", "spread", "cold_s",
               "first_s", "max_rel_err", "max_rel_res", "criterion_met"]),
        [f"\n{name}: {c['verdict']['summary']}" for name, c in cases.items()
         if "verdict" in c])


if __name__ == "__main__":
    sys.exit(main())
