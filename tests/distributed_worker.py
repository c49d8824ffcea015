"""A worker for tests/test_distributed.py and benchmarks/scale_devices.py, run in a
subprocess (the device count and the distributed runtime are per process).

    python tests/distributed_worker.py forced N D C BLOCKS         (one process)
    python tests/distributed_worker.py multi ADDRESS NPROC PID N    (one of NPROC)

ADDRESS "env" makes the worker call ``distributed.initialize()`` with no arguments,
so that it reads the environment.

Prints one JSON line: the sharded products and CG solves as lists, with timings.
XLA_FLAGS (the forced device count) and JAX_ENABLE_X64 come from the caller.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

RIDGE = 1e-2
LENGTH_SCALE = 1.3
TOL = 1e-13


def problem(n: int, c: int, d: int = 5, seed: int = 0):
    """The shared test problem: X (n, d), V (n, c), both standard normal."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal((n, c))


def krr_operator(mv, n):
    """``v -> (K + n ridge I) v`` from the sharded product (one object: linalg.cg jits
    per operator, so a second solve with it reuses the compiled loop)."""
    return lambda v: mv(v) + n * RIDGE * v


def solve(op, V, tol=TOL):
    """The sharded KRR solve (K + n ridge I) alpha = V by linalg.cg."""
    from ntk_poison import linalg
    return linalg.cg(op, V, tol=tol, maxiter=2000)


def forced(n: int, D: int, c: int, blocks: str) -> dict:
    """The sharded product and CG solve on the first D devices, for each block size
    in the comma list ``blocks`` (0: the default)."""
    import jax
    from ntk_poison import distributed, kernels
    k = kernels.rbf(LENGTH_SCALE)
    X, V = problem(n, c)
    mesh = distributed.make_mesh(jax.devices()[:D])
    runs = []
    for block in map(int, blocks.split(",")):
        mv = distributed.sharded_gram_matvec(k, X, mesh, block_size=block or None)
        t = time.perf_counter()
        KV = np.asarray(jax.block_until_ready(mv(V)))
        t_cold = time.perf_counter() - t
        t = time.perf_counter()
        KV = np.asarray(jax.block_until_ready(mv(V)))
        t_mv = time.perf_counter() - t
        KV1 = np.asarray(mv(V[:, 0]))
        op = krr_operator(mv, n)
        t = time.perf_counter()
        solve(op, V)                                # compiles
        t_cg_cold = time.perf_counter() - t
        t = time.perf_counter()
        alpha, info = solve(op, V)
        alpha = np.asarray(jax.block_until_ready(alpha))
        t_cg = time.perf_counter() - t
        runs.append({"block": block, "n_pad": mv.n_pad, "block_rows": mv.block_rows,
                     "KV": KV.tolist(), "KV_vector": KV1.tolist(),
                     "alpha": alpha.tolist(), "cg": info,
                     "matvec_cold_seconds": t_cold, "matvec_seconds": t_mv,
                     "cg_cold_seconds": t_cg_cold, "cg_seconds": t_cg})
    from ntk_poison import krr            # the library's CG fit on the same mesh
    model = krr.fit(k, X, V, RIDGE, solver="cg", mesh=mesh, tol=TOL, precond_rank=20)
    return {"devices": jax.device_count(), "mesh": int(mesh.size), "runs": runs,
            "krr_fit_alpha": np.asarray(model.alpha).tolist(),
            "krr_fit_iterations": int(model.info.iterations)}


def multi(address: str, nproc: int, pid: int, n: int) -> dict:
    from ntk_poison import distributed
    if address == "env":          # from NTK_POISON_* / JAX_* variables set by the caller
        info = distributed.initialize()
        again = distributed.initialize()
        address = "127.0.0.1:1"
    else:
        info = distributed.initialize(address, nproc, pid)
        again = distributed.initialize(address, nproc, pid)    # idempotent
    try:
        distributed.initialize(address, nproc, (pid + 1) % nproc)
        clash = "no error"
    except ValueError as e:
        clash = str(e)
    import jax
    from jax.experimental import multihost_utils
    from ntk_poison import kernels
    k = kernels.rbf(LENGTH_SCALE)
    X, V = problem(n, 2)
    mesh = distributed.make_mesh()
    mv = distributed.sharded_gram_matvec(k, X, mesh, block_size=4)
    KV = multihost_utils.process_allgather(mv(V), tiled=True)
    alpha, cg_info = solve(krr_operator(mv, n), V)
    alpha = multihost_utils.process_allgather(alpha, tiled=True)
    return {"info": list(info), "again": list(again), "clash": clash,
            "mesh": int(mesh.size), "KV": np.asarray(KV).tolist(),
            "alpha": np.asarray(alpha).tolist(), "cg": cg_info}


if __name__ == "__main__":
    mode, *a = sys.argv[1:]
    if mode == "forced":
        out = forced(int(a[0]), int(a[1]), int(a[2]), a[3])
    else:
        out = multi(a[0], int(a[1]), int(a[2]), int(a[3]))
    print("RESULT " + json.dumps(out))
