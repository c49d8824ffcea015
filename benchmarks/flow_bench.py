"""Penalised kernel models and kernel gradient flow: speed and agreement, in one run.

Cases (float64 everywhere; see ``--help``):

1. ``kappa_sweep``: the exact output-penalty model (RBF kernel, THEORY.md section 3)
   at 32 log-spaced penalty weights ``kappa = (1e-4 .. 1e2) l^2``:
   ``penalized.fit_penalized_sweep`` (one Cholesky and one eigendecomposition serve every
   kappa) against a Python loop of 32 ``penalized.fit_penalized`` calls, each followed by
   ``predict`` on the test points. Data: the first n MNIST training points, PCA-reduced
   to d dimensions (components of the first 5000 training points), so that the joint
   Gram has N = n(1 + d) rows (full run: n = 100, d = 9, N = 1000); +-1 targets
   (classes 5-9 -> +1); relative ridge 1e-3; l the median heuristic / sqrt 2.
2. ``flow_closed_vs_ode``: ``flow.kernel_flow(method="closed_form")`` (``eigh`` of the
   symmetrised joint system) against ``method="ode"`` (jit-compiled RK4) at 8
   log-spaced times 0.1 .. 100, same problem, kappa = 0.1 l^2 (the centre of the
   sweep's grid). Goal (from the issue): predictions agree to 1e-6.
3. ``kernel_vs_width``: the infinite-width erf network against finite ones, on raw
   MNIST (d = 784) subsets of n = 500, 1000 and 2000 points, kappa = 0, ridge 0.
   The target is the kernel predictor at time t = 16 of gradient flow on
   ``(1/2n) sum (f(x_i) - y_i)^2``: the analytic NTK of ``stax.serial(Dense, Erf,
   Dense, Erf, Dense)`` (W_std = 1.5, b_std = 0.1; ``kernels.from_stax``), evaluated
   on 500 held-out test points. Paths:

   * ``kernel_flow``: ``flow.kernel_flow(k, X, y, 0, 0, times).predict(X_test)``, the
     library's closed form (at kappa = 0: ``eigh`` of the n x n Gram, no joint
     Gram) and its prediction; the time the ratios below are taken against;
   * ``closed_form``: the same predictor as one jitted function of this script:
     Gram matrices ``K = k(X, X)`` and ``k(X_test, X)``, ``eigh(K)`` and
     ``k(x, X) Q diag((1 - exp(-e t / n)) / e) Q^T y``. It also returns, from the
     same ``eigh``, the predictor of kernel gradient *descent* with the networks'
     step (O(n) extra work), which separates the discretisation part of the
     networks' error from the finite-width part;
   * ``width W``: ``nets.init(..., activation="erf")`` (same depth, W_std, b_std) and
     ``nets.train`` (full-batch gradient descent on the centred network, t = steps *
     lr) to the same t, widths 512 and 2048. The step is ``lr = t / steps`` with
     ``lr * lambda_max(K / n) <= 1`` (stable: gradient descent on the linearised
     model diverges only above 2). ``record_every = steps / 4``: the network's
     test predictions at t/4, t/2, 3t/4 and t are compared with the kernel's.

   Reported: each path's time, the time ratio network / kernel, and the relative
   error ``||f_net - f_kernel||_2 / ||f_kernel||_2`` on the test points that each
   width reaches (also against kernel gradient descent with the same step, and the
   test accuracy of every predictor). The two kernel paths are compared with each
   other and (untimed) with neural-tangents' ``predict.gradient_descent_mse``.

Timing: cases 1 and 2, and the two kernel paths of case 3, call each path once first
(``cold_seconds``: tracing and compilation), then ``--repeats`` interleaved rounds
(median reported). The networks' warm-up is ``nets.train`` for one record interval
(``steps / 4`` steps: it compiles the same training chunk, record and centring
functions at the same shapes), then ``--net-repeats`` timed full runs (default 1: a
width-2048 run at n = 2000 takes about a minute). ``nets.init`` is not timed. Results
go to ``--out`` (JSON, written atomically) and a table is printed.

Usage::

    .venv/bin/python benchmarks/flow_bench.py --blas-threads 1  # full run (README)
    .venv/bin/python benchmarks/flow_bench.py                   # default BLAS threads
    .venv/bin/python benchmarks/flow_bench.py --quick           # small smoke run

``--blas-threads 1`` limits scipy's OpenBLAS (which jax's CPU ``eigh``, Cholesky and
triangular solves call) to one thread: on a shared, loaded 2-core machine its
threads otherwise busy-wait for a core (a 500 x 500 ``eigh`` measured 1.5 s of CPU
time with two threads under load, 0.05 s with one).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (switches x64 on)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ntk_poison import data, flow, kernels, metrics, nets, penalized  # noqa: E402

DEFAULT_OUT = C.out_path("flow_bench")
CASES = ("kappa_sweep", "flow_closed_vs_ode", "kernel_vs_width")

FULL = dict(pca_n=100, pca_d=9, pca_test=200, net_ns=(500, 1000, 2000),
            widths=(512, 2048), net_test=500)
QUICK = dict(pca_n=30, pca_d=6, pca_test=50, net_ns=(100, 200), widths=(64, 256),
             net_test=100)

POSITIVE = (5, 6, 7, 8, 9)        # classes mapped to +1, the rest to -1
PCA_FIT_POINTS = 5000             # PCA components from the first 5000 training points
LAM = 1e-3                        # relative ridge of cases 1 and 2
N_KAPPAS = 32
KAPPA_RANGE = (1e-4, 1e2)         # times l^2
KAPPA_FLOW = 0.1                  # times l^2 (geometric centre of KAPPA_RANGE)
FLOW_TIMES = np.geomspace(0.1, 100.0, 8)
GOAL_ODE_DIFF = 1e-6              # the issue: closed form and ODE agree to 1e-6
SWEEP_TOL = 1e-8                  # benchmark author's bar, relative to max |f|
DEPTH, W_STD, B_STD = 2, 1.5, 0.1
T_NET = 16.0                      # the flow time the networks are trained to
N_RECORDS = 4                     # network records at t/4, t/2, 3t/4, t
LR_SCALE = 1.0                    # lr * lambda_max(K / n) <= LR_SCALE
NET_SEED = 0


def pm1(labels: np.ndarray) -> np.ndarray:
    """+1 for classes 5-9, -1 for 0-4 (float64)."""
    return data.binary_targets(labels, POSITIVE, dtype=np.float64)


def max_abs(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# =========================================================================== problems

def pca_problem(ds: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The RBF problem of cases 1 and 2: n PCA-reduced MNIST points, +-1 targets."""
    n, d, m = cfg["pca_n"], cfg["pca_d"], cfg["pca_test"]
    (X, Xt), kept = C.pca_project(ds["x_train"][:PCA_FIT_POINTS],
                                  [ds["x_train"][:n], ds["x_test"][:m]], d)
    med = metrics.median_distance(X)
    ls = med / math.sqrt(2.0)
    return {
        "k": kernels.rbf(ls), "X": jnp.asarray(X), "Xt": jnp.asarray(Xt),
        "y": jnp.asarray(pm1(ds["labels_train"][:n])), "length_scale": ls,
        "params": {"n_train": n, "d": d, "joint_gram_rows_N": n * (1 + d), "n_test": m,
                   "inputs": f"MNIST, first {n} training / {m} test points, projected on "
                             f"the top {d} principal components of the first "
                             f"{PCA_FIT_POINTS} training points (centred, not scaled)",
                   "pca_variance_kept": kept, "kernel": "rbf", "length_scale": ls,
                   "length_scale_rule": "median pairwise distance / sqrt(2)",
                   "median_pairwise_distance": med, "ridge_relative": LAM,
                   "targets": "+1 for classes 5-9, -1 for 0-4", "dtype": "float64",
                   "penalty": "output"},
    }


def erf_ntk() -> kernels.Kernel:
    """The analytic NTK of ``nets.init(d, w, DEPTH, W_STD, B_STD, activation="erf")``."""
    from neural_tangents import stax

    layers = []
    for _ in range(DEPTH):
        layers += [stax.Dense(512, W_std=W_STD, b_std=B_STD), stax.Erf()]
    _, _, kernel_fn = stax.serial(*layers, stax.Dense(1, W_std=W_STD, b_std=B_STD))
    return kernels.from_stax(kernel_fn, "ntk", name="nt_fc_erf",
                             params=(("depth", DEPTH), ("W_std", W_STD), ("b_std", B_STD)))


# =========================================================================== case 1

def case_kappa_sweep(prob: Dict[str, Any], repeats: int) -> Dict[str, Any]:
    k, X, y, Xt, ls = (prob[a] for a in ("k", "X", "y", "Xt", "length_scale"))
    kappas = np.geomspace(*KAPPA_RANGE, N_KAPPAS) * ls ** 2

    def sweep():
        return penalized.fit_penalized_sweep(k, X, y, LAM, kappas).predict(Xt)

    def loop():
        return jnp.stack([penalized.fit_penalized(k, X, y, LAM, float(kap)).predict(Xt)
                          for kap in kappas])

    tm = C.time_group({"sweep": sweep, "loop": loop}, repeats, log=C.log)
    f_sweep = np.asarray(tm["sweep"].output)
    f_loop = np.asarray(tm["loop"].output)
    diff_per_kappa = np.max(np.abs(f_sweep - f_loop), axis=1)
    diff = float(diff_per_kappa.max())
    scale = float(np.max(np.abs(f_loop)))
    speed = C.ratio(tm["loop"].median, tm["sweep"].median)
    cross = C.ratios_by_statistic(tm, {"loop_over_sweep": ("loop", "sweep")})
    acc_ok = diff <= SWEEP_TOL * max(1.0, scale)
    return {
        "description": "penalized.fit_penalized_sweep (one eigendecomposition, all kappas) vs "
                       f"a loop of {N_KAPPAS} penalized.fit_penalized calls; each + predict",
        "params": dict(prob["params"], n_kappas=N_KAPPAS,
                       kappa_rule=f"np.geomspace({KAPPA_RANGE[0]:g}, {KAPPA_RANGE[1]:g}, "
                                  f"{N_KAPPAS}) * length_scale^2",
                       kappas=kappas),
        "methods": {"sweep": "penalized.fit_penalized_sweep(k, X, y, lam, kappas).predict(Xt)",
                    "loop": "[penalized.fit_penalized(k, X, y, lam, kappa).predict(Xt) for "
                            "kappa in kappas]"},
        "timings": {n_: t.as_dict() for n_, t in tm.items()},
        "ratios": {"loop_over_sweep": speed},
        "ratios_cross_check": cross,
        "errors": {"max_abs_prediction_diff": diff, "max_abs_prediction": scale,
                   "max_abs_prediction_diff_per_kappa": diff_per_kappa,
                   # How much the penalty moves the predictions over the grid: the
                   # sweep spans models that differ, not 32 copies of one.
                   "max_abs_prediction_change_over_grid":
                       float(np.max(np.abs(f_loop - f_loop[:1])))},
        "goal": {"text": "No goal was set by the issue for the speed; the benchmark's "
                         f"own bar for agreement: {SWEEP_TOL:g} relative to max |f|",
                 "accuracy_ok": bool(acc_ok), "source": "benchmark author"},
        "goal_met": bool(acc_ok),
    }


# =========================================================================== case 2

def case_flow_closed_vs_ode(prob: Dict[str, Any], repeats: int) -> Dict[str, Any]:
    k, X, y, Xt, ls = (prob[a] for a in ("k", "X", "y", "Xt", "length_scale"))
    kappa = KAPPA_FLOW * ls ** 2

    def run(method):
        path = flow.kernel_flow(k, X, y, LAM, kappa, FLOW_TIMES, method=method)
        return path.predict(Xt), path.info_dict

    tm = C.time_group({"closed_form": lambda: run("closed_form"),
                       "ode": lambda: run("ode")}, repeats, log=C.log)
    f_cf, _ = tm["closed_form"].output
    f_ode, ode_info = tm["ode"].output
    diff_per_time = np.max(np.abs(np.asarray(f_cf) - np.asarray(f_ode)), axis=1)
    diff = float(diff_per_time.max())
    ok = diff <= GOAL_ODE_DIFF
    return {
        "description": "flow.kernel_flow closed form (eigh) vs RK4 ODE, same times",
        "params": dict(prob["params"], kappa=kappa,
                       kappa_rule=f"{KAPPA_FLOW:g} * length_scale^2", times=FLOW_TIMES,
                       ode_step_scale="library default (0.05)"),
        "methods": {m: f"flow.kernel_flow(k, X, y, lam, kappa, times, method={m!r})"
                       ".predict(Xt)" for m in ("closed_form", "ode")},
        "timings": {n_: t.as_dict() for n_, t in tm.items()},
        "ratios": {"ode_over_closed_form": C.ratio(tm["ode"].median,
                                                   tm["closed_form"].median)},
        "ratios_cross_check": C.ratios_by_statistic(
            tm, {"ode_over_closed_form": ("ode", "closed_form")}),
        "ode_info": ode_info,
        "errors": {"max_abs_prediction_diff": diff,
                   "max_abs_prediction_diff_per_time": diff_per_time,
                   "max_abs_prediction": float(np.max(np.abs(np.asarray(f_cf))))},
        "goal": {"text": f"closed form and ODE predictions agree to {GOAL_ODE_DIFF:g} "
                         "(max abs difference over test points and times)",
                 "source": "issue"},
        "goal_met": bool(ok),
    }


# =========================================================================== case 3

@functools.partial(jax.jit, static_argnums=0)
def kernel_predict(k: kernels.Kernel, X, y, Xt, times, lr):
    """Kernel gradient flow (ridge 0, from f = 0) and kernel gradient descent at Xt.

    ``K = k(X, X) = Q diag(e) Q^T``; at time t the flow predicts
    ``k(x, X) Q diag((1 - exp(-e t / n)) / e) Q^T y`` and gradient descent with step
    ``lr`` for ``t / lr`` steps ``k(x, X) Q diag((1 - (1 - lr e / n)^s) / e) Q^T y``
    (the linearised network's iterates). Returns both ``(T, m)`` and ``e_max / n``.
    """
    n = X.shape[0]
    K = k(X, X)
    e, Q = jnp.linalg.eigh(0.5 * (K + K.T))
    e = jnp.maximum(e, 0.0)
    KtQ = k(Xt, X) @ Q
    proj = Q.T @ y
    pos = e > 0
    e_safe = jnp.where(pos, e, 1.0)

    def gains(t):
        s = jnp.round(t / lr)
        g_flow = jnp.where(pos, -jnp.expm1(-e_safe * t / n) / e_safe, t / n)
        base = jnp.maximum(1.0 - lr * e_safe / n, 0.0)
        g_gd = jnp.where(pos, (1.0 - base ** s) / e_safe, s * lr / n)
        return g_flow, g_gd

    g_flow, g_gd = jax.vmap(gains)(times)                    # (T, n) each
    return (g_flow * proj) @ KtQ.T, (g_gd * proj) @ KtQ.T, e[-1] / n


def nt_reference(K, Kt, y, times) -> np.ndarray:
    """neural-tangents' closed form of the same flow (independent cross-check)."""
    import neural_tangents as nt

    predict = nt.predict.gradient_descent_mse(K, y[:, None], learning_rate=1.0)
    return np.asarray(predict(times, 0.0, 0.0, Kt)[1])[..., 0]


def accuracy(f: Any, y: np.ndarray) -> float:
    return float(np.mean(np.sign(np.asarray(f)) == y))


def _one_size(k, ds, n: int, cfg: Dict[str, Any], repeats: int,
              net_repeats: int) -> Dict[str, Any]:
    m = cfg["net_test"]
    X = jnp.asarray(ds["x_train"][:n])
    y = jnp.asarray(pm1(ds["labels_train"][:n]))
    Xt = jnp.asarray(ds["x_test"][:m])
    yt = pm1(ds["labels_test"][:m])
    times = T_NET * np.arange(1, N_RECORDS + 1) / N_RECORDS

    # Set-up (untimed): the step from lambda_max(K / n), and the nt cross-check.
    K, Kt = k(X, X), k(Xt, X)
    lam_max = float(np.linalg.eigvalsh(np.asarray(K))[-1]) / n
    steps = N_RECORDS * math.ceil(T_NET * lam_max / (LR_SCALE * N_RECORDS))
    lr = T_NET / steps
    every = steps // N_RECORDS
    f_nt = nt_reference(K, Kt, y, times)
    del K, Kt

    times_j, lr_j = jnp.asarray(times), jnp.asarray(lr)
    tk = C.time_group({
        "kernel_flow": lambda: flow.kernel_flow(k, X, y, 0.0, 0.0, times).predict(Xt),
        "closed_form": lambda: kernel_predict(k, X, y, Xt, times_j, lr_j)},
        repeats, log=C.log)
    t_ker = tk["kernel_flow"]
    f_lib = np.asarray(t_ker.output)
    f_flow, f_gd, lam_max_jit = (np.asarray(a) for a in tk["closed_form"].output)
    out: Dict[str, Any] = {
        "params": {"n_train": n, "n_test": m, "d": int(X.shape[1]), "t": T_NET,
                   "lr": lr, "steps": steps, "record_every": every,
                   "lambda_max_K_over_n": lam_max, "lr_times_lambda_max": lr * lam_max,
                   "record_times": times},
        "kernel": {
            "timings": {n_: t.as_dict() for n_, t in tk.items()},
            "ratio_kernel_flow_over_closed_form": C.ratio(t_ker.median,
                                                          tk["closed_form"].median),
            "max_abs_diff_kernel_flow_vs_closed_form": max_abs(f_lib, f_flow),
            "max_abs_diff_closed_form_vs_neural_tangents": max_abs(f_flow, f_nt),
            "lambda_max_check": abs(float(lam_max_jit) - lam_max),
            "max_abs_prediction_at_t": float(np.max(np.abs(f_flow[-1]))),
            "test_accuracy_at_t": accuracy(f_flow[-1], yt),
            "gd_vs_flow_relative_diff_per_time": [C.relative_error(f_gd[i], f_flow[i])
                                                  for i in range(N_RECORDS)],
        },
        "widths": {},
    }
    for w in cfg["widths"]:
        p0 = nets.init(jax.random.key(NET_SEED), int(X.shape[1]), w, DEPTH, W_STD, B_STD,
                       activation="erf")

        def train(n_steps, p0=p0):
            _, hist = nets.train(p0, nets.apply_fn, X, y, lr, n_steps, record_every=every,
                                 X_eval=Xt)
            return hist.predictions

        t_net = C.time_repeats(f"width {w}", lambda: train(steps), net_repeats,
                               warmup=lambda: train(every), log=C.log)
        f_net = np.asarray(t_net.output)[1:]               # drop the t = 0 record
        rel = [C.relative_error(f_net[i], f_flow[i]) for i in range(N_RECORDS)]
        rel_gd = [C.relative_error(f_net[i], f_gd[i]) for i in range(N_RECORDS)]
        out["widths"][str(w)] = {
            "timing": t_net.as_dict(),
            "time_ratio_net_over_kernel": C.ratio(t_net.median, t_ker.median),
            "time_ratio_net_over_closed_form": C.ratio(t_net.median,
                                                       tk["closed_form"].median),
            "time_ratio_net_over_kernel_cpu": C.ratio(
                float(np.median(t_net.cpu_times)), float(np.median(t_ker.cpu_times))),
            "seconds_per_step": t_net.median / steps,
            "relative_error_vs_kernel_flow_at_t": rel[-1],
            "relative_error_vs_kernel_flow_per_time": rel,
            "relative_error_vs_kernel_gd_at_t": rel_gd[-1],
            "relative_error_vs_kernel_gd_per_time": rel_gd,
            "max_abs_error_vs_kernel_flow_at_t": max_abs(f_net[-1], f_flow[-1]),
            "test_accuracy_at_t": accuracy(f_net[-1], yt),
            "sign_agreement_with_kernel_at_t": float(np.mean(
                np.sign(f_net[-1]) == np.sign(f_flow[-1]))),
            "seed": NET_SEED,
        }
    return out


def case_kernel_vs_width(ds: Dict[str, Any], cfg: Dict[str, Any], repeats: int,
                         net_repeats: int) -> Dict[str, Any]:
    k = erf_ntk()
    sizes = {}
    for n in cfg["net_ns"]:
        C.log(f"  n = {n}")
        before = C.load_info()["loadavg_1_5_15"]
        sizes[str(n)] = _one_size(k, ds, n, cfg, repeats, net_repeats)
        sizes[str(n)]["load_before"] = before
        sizes[str(n)]["load_after"] = C.load_info()["loadavg_1_5_15"]
    return {
        "description": "time to the kernel predictor at t: analytic erf NTK (Gram + eigh "
                       "closed form) vs finite erf MLPs trained by nets.train",
        "params": {"kernel": f"stax.serial({DEPTH} x (Dense, Erf), Dense), W_std={W_STD}, "
                             f"b_std={B_STD}, get='ntk' (kernels.from_stax)",
                   "network": f"nets.init(key({NET_SEED}), 784, width, depth={DEPTH}, "
                              f"W_std={W_STD}, b_std={B_STD}, activation='erf'); "
                              "nets.train(..., kappa=0, ridge=0, centre=True, "
                              "X_eval=test points)",
                   "inputs": "raw MNIST pixels in [0, 1] (d = 784), first n training / "
                             "first n_test test points",
                   "targets": "+1 for classes 5-9, -1 for 0-4",
                   "t": T_NET, "kappa": 0.0, "ridge": 0.0, "widths": list(cfg["widths"]),
                   "lr_rule": f"lr = t / steps, steps the smallest multiple of "
                              f"{N_RECORDS} with lr * lambda_max(K / n) <= {LR_SCALE:g}",
                   "error_metric": "||f_net - f_kernel||_2 / ||f_kernel||_2 over the "
                                   "test points",
                   "timed_kernel_calls": {
                       "kernel_flow": "flow.kernel_flow(k, X, y, 0, 0, record times)"
                                      ".predict(Xt) (the denominator of "
                                      "time_ratio_net_over_kernel)",
                       "closed_form": "kernel_predict(k, X, y, Xt, record times, lr): "
                                      "both Gram matrices, eigh, flow and "
                                      "gradient-descent predictions at 4 times"},
                   "timed_network_call": "nets.train(p0, nets.apply_fn, X, y, lr, steps, "
                                         "record_every=steps/4, X_eval=Xt) (5 records: "
                                         "loss, input-gradient penalty and test "
                                         "predictions); nets.init excluded",
                   "net_repeats": net_repeats, "kernel_repeats": repeats},
        "sizes": sizes,
        "goal": {"text": "No goal set; reported: time ratio network / kernel and the "
                         "relative error each width reaches", "source": "issue"},
        "goal_met": None,
    }


# =========================================================================== driver

def _summary_rows(cases: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []

    def add(case, path, timing, ratio=None, ratio_is=None, err=None, err_is=None,
            goal=None):
        rows.append({"case": case, "path": path, "median_s": timing["median_seconds"],
                     "spread": timing["spread_rel"], "cold_s": timing["cold_seconds"],
                     "ratio": ratio, "ratio_is": ratio_is, "error": err,
                     "error_is": err_is, "goal_met": goal})

    c = cases.get("kappa_sweep")
    if c and "timings" in c:
        p = c["params"]
        add(f"1 sweep n={p['n_train']} d={p['d']} N={p['joint_gram_rows_N']}",
            f"fit_penalized_sweep ({p['n_kappas']} kappas)", c["timings"]["sweep"],
            goal=c["goal_met"])
        add("", f"{p['n_kappas']} x fit_penalized", c["timings"]["loop"],
            c["ratios"]["loop_over_sweep"], "loop/sweep",
            c["errors"]["max_abs_prediction_diff"], "max abs diff")
    c = cases.get("flow_closed_vs_ode")
    if c and "timings" in c:
        p = c["params"]
        add(f"2 flow N={p['joint_gram_rows_N']}, {len(p['times'])} times",
            "kernel_flow closed_form", c["timings"]["closed_form"], goal=c["goal_met"])
        add("", f"kernel_flow ode ({c['ode_info'].get('steps')} RK4 steps)",
            c["timings"]["ode"], c["ratios"]["ode_over_closed_form"], "ode/closed",
            c["errors"]["max_abs_prediction_diff"], "max abs diff")
    c = cases.get("kernel_vs_width")
    if c and "sizes" in c:
        for n, s in c["sizes"].items():
            kr = s["kernel"]
            add(f"3 erf n={n} t={s['params']['t']:g} ({s['params']['steps']} steps)",
                "kernel_flow(kappa=0) + predict", kr["timings"]["kernel_flow"],
                err=kr["max_abs_diff_kernel_flow_vs_closed_form"], err_is="abs vs jit")
            add("", "jit Gram + eigh closed form", kr["timings"]["closed_form"],
                err=kr["max_abs_diff_closed_form_vs_neural_tangents"], err_is="abs vs nt")
            for w, r in s["widths"].items():
                add("", f"net width {w}", r["timing"], r["time_ratio_net_over_kernel"],
                    "net/kernel", r["relative_error_vs_kernel_flow_at_t"],
                    "rel vs kernel")
    return rows


def main(argv=None) -> int:
    p = C.arg_parser(__doc__, DEFAULT_OUT, CASES,
                     repeats_help="timed repeats per kernel path, after one warm-up call")
    p.add_argument("--net-repeats", type=int, default=1,
                   help="timed full training runs per network width (default 1)")
    args, wanted = C.parse_args(p, argv, CASES)
    if args.net_repeats < 1:
        p.error("--net-repeats must be >= 1")
    cfg = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    ds = C.load_flat_dataset(max(PCA_FIT_POINTS, max(cfg["net_ns"])),
                             max(cfg["pca_test"], cfg["net_test"]), name="mnist")
    C.log(f"data: {ds['source']}" + (f" (fallback: {ds['fallback_reason']})"
                                     if ds["fallback_reason"] else ""))
    needs_pca = bool({"kappa_sweep", "flow_closed_vs_ode"} & set(wanted))
    prob = pca_problem(ds, cfg) if needs_pca else None
    runners = {
        "kappa_sweep": lambda: case_kappa_sweep(prob, args.repeats),
        "flow_closed_vs_ode": lambda: case_flow_closed_vs_ode(prob, args.repeats),
        "kernel_vs_width": lambda: case_kernel_vs_width(ds, cfg, args.repeats,
                                                        args.net_repeats),
    }
    cases, failed = C.run_cases(wanted, runners)
    summary = _summary_rows(cases)
    result = C.result_record(
        "flow_bench", args, cfg, cases, summary, t_start, net_repeats=args.net_repeats,
        data={"source": ds["source"], "fallback_reason": ds["fallback_reason"],
              "n_train_loaded": int(ds["x_train"].shape[0]),
              "n_test_loaded": int(ds["x_test"].shape[0]), "d": ds["d"]},
        timing=dict(
            warmup="each path is called once before timing, on the same shapes; that "
                   "call's time is cold_seconds (tracing and XLA compilation included); "
                   "medians exclude it. Networks: the warm-up trains for one record "
                   "interval (steps / 4), which compiles the same code",
            interleaving="cases 1 and 2: the two paths alternate round robin, the order "
                         "rotated each round; case 3: kernel repeats, then each width's "
                         "runs, one after the other",
            dtype="float64 everywhere (jax_enable_x64), networks included",
            machine_note="shared 2-core machine: other processes may run at the same "
                         "time; see load_before / load_after per case (and per n in "
                         "case 3) and the CPU-time cross-checks"),
        advice="compare the CPU-time and min-wall cross-checks before trusting a ratio")
    path = C.write_json_atomic(args.out, result)
    goals = "; ".join(f"{n}: {'met' if c.get('goal_met') else 'NOT met'}"
                      for n, c in cases.items() if c.get("goal_met") is not None)
    return C.finish(result, path, failed, C.format_table(
        summary, ["case", "path", "median_s", "spread", "cold_s", "ratio", "ratio_is", "error",
                  "error_is", "goal_met"]),
        [f"\ngoals: {goals or 'none in the cases run'}",
         f"data: {ds['source']}; repeats: {args.repeats}"])


if __name__ == "__main__":
    sys.exit(main())
