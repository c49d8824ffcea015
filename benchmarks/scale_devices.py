"""The sharded Gram product and a sharded CG KRR solve on 1, 2, 4 and 8 forced host
devices (issue 15, benchmark item 3): time, and agreement with the 1-device result.

Each device count runs in its own subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (the count is fixed when JAX
starts). The problem: X standard normal ``(n, 16)``, an RBF kernel of length scale 4,
10 target columns (one solve for all), ridge 1e-2 (absolute ``n * 1e-2``), float64,
Gram blocks of 512 rows, CG (:func:`ntk_poison.linalg.cg`) to a relative residual of
1e-10, no preconditioner. n = 20,000 (quick: 2,000).

Reported per device count: the first product (with compilation), the median warm
product, the first CG solve (with compilation), a warm CG solve, the iterations and
true residual, the padded size, and the largest relative difference
``max|a - a_1| / max|a_1|`` of ``K V`` and of the solution from the 1-device ones.

On a 2-core CPU this shows correctness, not speed: the forced host devices are slices
of the same 2 cores, so more devices cannot run faster; the times show the overhead
of sharding (collectives, padding), and a GPU or multi-host run is where the speed-up
would show.

Usage::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/scale_devices.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

DEVICE_COUNTS = (1, 2, 4, 8)
SIZES = {"full": 20000, "quick": 2000}
D_IN, COLUMNS, LENGTH_SCALE, RIDGE, BLOCK, TOL = 16, 10, 4.0, 1e-2, 512, 1e-10
WORKER_TIMEOUT = 900     # seconds per device count
NOTE = ("On a 2-core CPU this shows correctness, not speed: the forced host devices "
        "share the same 2 cores, so the times show the cost of sharding (collectives, "
        "padding), not a speed-up.")


def run(quick: bool) -> Dict[str, Any]:
    """Run every device count in its own subprocess; return the JSON record."""
    import _common
    n = SIZES["quick" if quick else "full"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for D in DEVICE_COUNTS:
            _common.log(f"{D} device(s), n = {n}")
            rows[D] = _worker_subprocess(D, n, tmp)
            _common.log(f"  {json.dumps(rows[D])}")
        ref = {key: np.load(os.path.join(tmp, f"{key}_1.npy")) for key in ("KV", "alpha")}
        for D in DEVICE_COUNTS:
            for key in ("KV", "alpha"):
                a = np.load(os.path.join(tmp, f"{key}_{D}.npy"))
                rows[D][f"{key}_rel_diff_vs_1_device"] = float(
                    np.max(np.abs(a - ref[key])) / np.max(np.abs(ref[key])))
    worst = max(max(r["KV_rel_diff_vs_1_device"], r["alpha_rel_diff_vs_1_device"])
                for r in rows.values())
    return {"benchmark": "scale_devices", "mode": "quick" if quick else "full",
            "note": NOTE,
            "problem": {"n": n, "d": D_IN, "columns": COLUMNS, "kernel": "rbf",
                        "length_scale": LENGTH_SCALE, "ridge": RIDGE,
                        "block_size": BLOCK, "cg_tol": TOL, "dtype": "float64",
                        "data": "standard normal, seed 0"},
            "machine": _common.machine_info(_common.REPO),
            "devices": {str(D): rows[D] for D in DEVICE_COUNTS},
            "summary": {"max_rel_diff_vs_1_device": worst,
                        "agrees_to_1e-10": worst <= 1e-10,
                        "warm_cg_seconds": {str(D): rows[D]["cg_warm_seconds"]
                                            for D in DEVICE_COUNTS}}}


def _worker_subprocess(D: int, n: int, tmp: str) -> Dict[str, Any]:
    import _common
    env = dict(os.environ)
    env.update(PYTHONPATH=_common.REPO + os.pathsep + env.get("PYTHONPATH", ""),
               JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu",
               OPENBLAS_NUM_THREADS=env.get("OPENBLAS_NUM_THREADS", "1"),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={D}")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(D),
                           "--n", str(n), "--tmp", tmp], env=env, capture_output=True,
                          text=True, timeout=WORKER_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"the {D}-device worker failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _worker(D: int, n: int, tmp: str) -> None:
    """One device count, in this process: times, and K V and alpha saved to tmp."""
    import jax
    from ntk_poison import distributed, kernels, linalg
    assert jax.device_count() == D, (jax.device_count(), D)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, D_IN))
    V = rng.standard_normal((n, COLUMNS))
    mv = distributed.sharded_gram_matvec(kernels.rbf(LENGTH_SCALE), X,
                                         distributed.make_mesh(), block_size=BLOCK)

    def timed(f):
        t = time.perf_counter()
        out = jax.block_until_ready(f())
        return time.perf_counter() - t, out

    mv_cold, KV = timed(lambda: mv(V))
    mv_warm = [timed(lambda: mv(V))[0] for _ in range(3)]
    op = lambda v: mv(v) + n * RIDGE * v  # noqa: E731  (one object: one compilation)
    cg_cold, _ = timed(lambda: linalg.cg(op, V, tol=TOL, maxiter=1000)[0])
    t = time.perf_counter()
    alpha, info = linalg.cg(op, V, tol=TOL, maxiter=1000)
    alpha = jax.block_until_ready(alpha)
    cg_warm = time.perf_counter() - t
    np.save(os.path.join(tmp, f"KV_{D}.npy"), np.asarray(KV))
    np.save(os.path.join(tmp, f"alpha_{D}.npy"), np.asarray(alpha))
    print("RESULT " + json.dumps({
        "devices": D, "n_pad": mv.n_pad, "block_rows": mv.block_rows,
        "matvec_cold_seconds": mv_cold, "matvec_warm_median_seconds":
            float(np.median(mv_warm)), "matvec_warm_seconds": mv_warm,
        "cg_cold_seconds": cg_cold, "cg_warm_seconds": cg_warm,
        "cg_iterations": info["iterations"], "cg_residual": info["residual"],
        "cg_converged": info["converged"]}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"n = {SIZES['quick']}")
    p.add_argument("--out", default=None,
                   help="JSON output (default benchmarks/results/scale_devices.json; "
                        "quick: scale_devices_quick.json)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.n, args.tmp)
        return 0
    import _common
    t0 = time.perf_counter()
    res = run(args.quick)
    res["wall_seconds_total"] = time.perf_counter() - t0
    out = args.out or _common.out_path("scale_devices" + ("_quick" if args.quick else ""))
    path = _common.write_json_atomic(out, res)
    rows = [{"devices": D, **{k: r[k] for k in (
        "n_pad", "matvec_warm_median_seconds", "cg_warm_seconds", "cg_iterations",
        "cg_residual", "KV_rel_diff_vs_1_device", "alpha_rel_diff_vs_1_device")}}
        for D, r in ((int(D), r) for D, r in res["devices"].items())]
    print(_common.format_table(rows, list(rows[0])))
    print(NOTE)
    print(f"wall {res['wall_seconds_total']:.0f} s; wrote {path}")
    return 0 if res["summary"]["agrees_to_1e-10"] else 1


if __name__ == "__main__":
    sys.exit(main())
