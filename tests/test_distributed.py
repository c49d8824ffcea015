"""ntk_poison.distributed: the sharded Gram product and CG solve on 8 forced host
devices and on 2 processes x 2 devices, against a numpy oracle and the single-device
path; and the input checks of initialize / make_mesh / sharded_gram_matvec.

The device count and the distributed runtime are per process, so the sharded runs go
through tests/distributed_worker.py in subprocesses, each with a timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_poison import cli, distributed, kernels, linalg

import distributed_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 120            # seconds; a hung collective fails the test, not CI
RTOL = 1e-10             # float64, relative to the largest entry


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
               JAX_ENABLE_X64="1", OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for names in distributed.ENV_VARS.values():
        for name in names:
            env.pop(name, None)
    return env


def _result(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result line in the worker's output:\n{stdout[-2000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _oracle(n: int, c: int):
    """numpy: the RBF Gram matrix, K V and the KRR solve (K + n ridge I)^-1 V."""
    X, V = worker.problem(n, c)
    d2 = np.sum((X[:, None, :] - X[None, :, :]) ** 2, axis=-1)
    K = np.exp(-d2 / (2 * worker.LENGTH_SCALE ** 2))
    return X, V, K, K @ V, np.linalg.solve(K + n * worker.RIDGE * np.eye(n), V)


def _close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = np.max(np.abs(a - b)) / np.max(np.abs(b))
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL:g}"


# --------------------------------------------------------------------------- 8 devices

def test_eight_forced_devices_match_single_device():
    n, c = 101, 3                      # 101 = 8 * 12 + 5: padded to 8 * 13 or 8 * 15
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "distributed_worker.py"), "forced",
         str(n), "8", str(c), "0,5"],
        env=_env(8), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _result(proc.stdout)
    assert res["devices"] == 8 and res["mesh"] == 8
    runs = res["runs"]
    X, V, K, KV, alpha = _oracle(n, c)

    # the single-device path in this process: the dense Gram product and a dense CG
    k = kernels.rbf(worker.LENGTH_SCALE)
    K1 = np.asarray(k.fn(jnp.asarray(X), jnp.asarray(X)))
    alpha1, _ = linalg.cg(lambda v: K1 @ v + n * worker.RIDGE * v, V, tol=worker.TOL)
    _close(K1 @ V, KV, "single-device K V vs numpy")
    _close(alpha1, alpha, "single-device CG vs numpy solve")

    assert [r["block"] for r in runs] == [0, 5]
    for r in runs:
        assert r["n_pad"] > n and r["n_pad"] % 8 == 0          # padding was needed
        _close(r["KV"], K1 @ V, f"sharded K V (block {r['block']})")
        _close(r["KV_vector"], (K1 @ V)[:, 0], "sharded K v, one column")
        _close(r["alpha"], alpha1, f"sharded CG (block {r['block']})")
        _close(r["alpha"], alpha, "sharded CG vs numpy solve")
        assert r["cg"]["converged"] and r["cg"]["residual"] <= 1e-12
    # krr.fit(solver="cg", mesh=mesh): the preconditioned CG fit on the sharded product
    _close(res["krr_fit_alpha"], alpha, "krr.fit(mesh=...) vs numpy solve")
    assert res["krr_fit_iterations"] >= 1


# --------------------------------------------------------------------------- 2 processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_two_devices_each_match_single_process():
    n = 37                                 # 4 devices, block 4: padded to 4 * 12
    address = f"127.0.0.1:{_free_port()}"
    # process 0 passes arguments; process 1 reads them from the environment, with
    # both spellings of the variables
    env1 = dict(_env(2), NTK_POISON_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                NTK_POISON_PROCESS_ID="1")
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "distributed_worker.py"), "multi",
         address if pid == 0 else "env", "2", str(pid), str(n)],
        env=_env(2) if pid == 0 else env1, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, cwd=ROOT) for pid in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    X, V, K, KV, alpha = _oracle(n, 2)
    for pid, out in enumerate(outs):
        r = _result(out)
        assert r["info"] == [pid, 2, 2, 4] and r["again"] == r["info"]
        assert "already started as process" in r["clash"]
        assert r["mesh"] == 4
        _close(r["KV"], KV, f"2-process K V (process {pid})")
        _close(r["alpha"], alpha, f"2-process CG solve (process {pid})")
        assert r["cg"]["converged"]


# --------------------------------------------------------------------------- one device

def test_one_device_mesh_matches_numpy():
    n, c = 13, 2
    X, V, K, KV, alpha = _oracle(n, c)
    mesh = distributed.make_mesh(jax.devices()[:1])
    assert mesh.axis_names == ("rows",)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    mv = distributed.sharded_gram_matvec(kernels.rbf(worker.LENGTH_SCALE), X, mesh,
                                         block_size=4)
    _close(mv(V), KV, "1-device sharded K V")
    # float32 Gram blocks, float64 sums: float32 accuracy
    mv32 = distributed.sharded_gram_matvec(kernels.rbf(worker.LENGTH_SCALE), X, mesh,
                                           dtype=jnp.float32)
    out = mv32(V)
    assert out.dtype == jnp.float64
    assert np.max(np.abs(np.asarray(out) - KV)) / np.max(np.abs(KV)) < 1e-5


# --------------------------------------------------------------------------- bad input

@pytest.fixture
def no_cluster_env(monkeypatch):
    for names in distributed.ENV_VARS.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("args, kwargs, match", [
    (("127.0.0.1:1234",), {}, "num_processes, process_id"),
    ((None, 2, 0), {}, "coordinator_address"),
    (("localhost", 2, 0), {}, "host:port"),
    (("127.0.0.1:70000", 2, 0), {}, "port 70000"),
    (("127.0.0.1:1234", 0, 0), {}, "num_processes"),
    (("127.0.0.1:1234", 2, 2), {}, "process_id"),
    (("127.0.0.1:1234", 2, -1), {}, "process_id"),
    (("127.0.0.1:1234", 2.0, 0), {}, "num_processes"),
    (("127.0.0.1:1234", 2, 0), {"local_device_ids": [0, 0]}, "local_device_ids"),
    (("127.0.0.1:1234", 2, 0), {"local_device_ids": -1}, "local_device_ids"),
])
def test_initialize_rejects_bad_arguments(no_cluster_env, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(*args, **kwargs)
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("env, match", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, "NTK_POISON_NUM_PROCESSES"),
    ({"NTK_POISON_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "NTK_POISON_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "two",
      "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two'"),
    ({"NTK_POISON_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
      "NTK_POISON_PROCESS_ID": "5"}, r"process_id` \(from the environment\)"),
])
def test_initialize_rejects_a_partial_or_bad_environment(no_cluster_env, env, match):
    for name, value in env.items():
        no_cluster_env.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        distributed.initialize()
    assert not jax.distributed.is_initialized()


def test_initialize_after_jax_started_is_a_value_error(no_cluster_env):
    jax.devices()                        # the backends are up in this process
    with pytest.raises(ValueError, match="before any array"):
        distributed.initialize("127.0.0.1:1", 1, 0)
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("devices, axis_name, match", [
    ([], "rows", "empty"),
    (["cpu:0"], "rows", "jax devices"),
    (5, "rows", "list of jax devices"),
    ("dup", "rows", "twice"),
    (None, "", "axis_name"),
    (None, 3, "axis_name"),
])
def test_make_mesh_rejects_bad_input(devices, axis_name, match):
    if devices == "dup":
        devices = [jax.devices()[0]] * 2
    with pytest.raises(ValueError, match=match):
        distributed.make_mesh(devices, axis_name)


def test_sharded_gram_matvec_rejects_bad_input():
    X = np.ones((6, 2))
    mesh = distributed.make_mesh(jax.devices()[:1])
    k = kernels.rbf()
    cases = [
        (lambda: distributed.sharded_gram_matvec(lambda a, b: a @ b.T, X, mesh), "`k`"),
        (lambda: distributed.sharded_gram_matvec(k, X, jax.devices()), "`mesh`"),
        (lambda: distributed.sharded_gram_matvec(k, np.ones((0, 2)), mesh), "empty"),
        (lambda: distributed.sharded_gram_matvec(k, np.full((3, 2), np.nan), mesh),
         "NaN"),
        (lambda: distributed.sharded_gram_matvec(k, np.ones(6), mesh), "`X`"),
        (lambda: distributed.sharded_gram_matvec(k, X, mesh, block_size=0),
         "block_size"),
        (lambda: distributed.sharded_gram_matvec(k, X, mesh, dtype=jnp.int32), "dtype"),
        (lambda: distributed.sharded_gram_matvec(k, X, mesh)(np.ones(5)), r"\(6,\)"),
        (lambda: distributed.sharded_gram_matvec(k, X, mesh)(np.ones((6, 2, 1))),
         "`V`"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match="traced"):
        jax.jit(lambda x: distributed.sharded_gram_matvec(k, x, mesh)(x[:, 0]))(X)


# --------------------------------------------------------------------------- the CLI

def test_cli_distributed_flag_initializes_before_the_run(monkeypatch, capsys):
    calls = []

    def fake_initialize(*args, **kwargs):
        calls.append((args, kwargs))
        return distributed.ProcessInfo(0, 1, 1, 1)

    monkeypatch.setattr(distributed, "initialize", fake_initialize)
    assert cli.main(["run", "no_such_experiment", "--distributed"]) == 2
    assert calls == [((), {})]                  # from the environment, then the run
    assert "Unknown experiment" in capsys.readouterr().err
    assert cli.main(["run", "no_such_experiment"]) == 2
    assert len(calls) == 1


# --------------------------------------------------------------------------- benchmark

@pytest.mark.slow
def test_scale_devices_benchmark_quick_agrees_across_device_counts():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import scale_devices
    res = scale_devices.run(quick=True)
    assert list(res["devices"]) == ["1", "2", "4", "8"]
    for row in res["devices"].values():
        assert row["cg_converged"] and row["cg_residual"] <= 1e-10
        assert row["KV_rel_diff_vs_1_device"] <= RTOL
        assert row["alpha_rel_diff_vs_1_device"] <= RTOL
    assert res["summary"]["agrees_to_1e-10"]
