"""Devices and hosts: JAX's own multi-process runtime and a row-sharded Gram product.

Large-n kernel regression never holds the ``n x n`` Gram matrix: conjugate gradients
(:func:`ntk_poison.linalg.cg`) needs only products ``K V``. This module spreads those
products over every device of a :class:`jax.sharding.Mesh`, on one host or many:

* :func:`initialize` starts JAX's distributed runtime (``jax.distributed.initialize``)
  from arguments or from the environment, with CPU collectives (gloo) switched on, so
  that the same code runs on one laptop, on one host with several GPUs, and on a
  cluster;
* :func:`make_mesh` builds a one-axis mesh over the devices (``AxisType.Auto``:
  on JAX 0.10, ``Explicit`` axes make the ``jax.scipy`` solvers raise a
  sharding-type error);
* :func:`sharded_gram_matvec` returns ``V -> K V`` with the training rows sharded over
  the mesh through :func:`jax.shard_map`.

The sharded product (``D`` devices, rows padded from ``n`` to ``n_pad = D * m``)::

    device j holds rows  R_j = {j m, ..., (j + 1) m - 1}  of X and of V
    V_all = all_gather_j(V[R_j])                        (n_pad, c)
    (K V)[R_j] = for each row block B of R_j:  k(X[B], X_all) @ V_all

where V's ``n_pad - n`` pad rows are zero (so the pad columns of K drop out of the
sum; the pad inputs copy row 0, so K stays finite there) and pad rows are dropped, so
``(K V)[:n]`` is exactly ``k(X, X) @ V``. Each device holds one ``(block_size, n_pad)``
Gram block at a time, never ``n x n``. A dense Cholesky factorisation is *not*
distributed (XLA does not shard it); CG on this product is.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ntk_poison import _validate
from ntk_poison.kernels import Kernel

Array = Any

__all__ = ["ProcessInfo", "initialize", "make_mesh", "sharded_gram_matvec", "ENV_VARS",
           "DEFAULT_BLOCK_ELEMENTS"]

#: the environment variables :func:`initialize` reads, per argument, first match wins
ENV_VARS = {
    "coordinator_address": ("NTK_POISON_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("NTK_POISON_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("NTK_POISON_PROCESS_ID", "JAX_PROCESS_ID"),
}

#: the default size of one Gram block on a device, in elements (128 MiB in float64)
DEFAULT_BLOCK_ELEMENTS = 1 << 24

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


class ProcessInfo(NamedTuple):
    """Where this process stands after :func:`initialize`.

    Attributes:
      process_id: this process's index, ``0 <= process_id < num_processes``.
      num_processes: the number of processes (hosts) in the job.
      local_devices: the devices this process drives.
      global_devices: all devices of the job (what :func:`make_mesh` uses).
    """

    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int


# --------------------------------------------------------------------------- processes

def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               local_device_ids: Optional[int | Sequence[int]] = None) -> ProcessInfo:
    """Start JAX's multi-process runtime (``jax.distributed.initialize``) once.

    Call it at the top of the program, before any JAX computation, on every process.

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordinator service.
      num_processes: the number of processes, >= 1.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      local_device_ids: the local devices this process drives (default: all).

    The three first arguments come together or not at all. With none of them, they
    are read from the environment (first match wins):

    * ``NTK_POISON_COORDINATOR_ADDRESS`` or ``JAX_COORDINATOR_ADDRESS``;
    * ``NTK_POISON_NUM_PROCESSES`` or ``JAX_NUM_PROCESSES``;
    * ``NTK_POISON_PROCESS_ID`` or ``JAX_PROCESS_ID``;

    and again all three or none. With none set, JAX's own cluster auto-detection
    fills them in (SLURM, Open MPI, Kubernetes, Cloud TPU). CPU collectives (gloo)
    are switched on first, so CPU devices of different processes can all-gather.

    Calling it again with the same (or no) arguments returns the same
    :class:`ProcessInfo`; with different ones it is a ValueError.

    Raises:
      ValueError: a partial or invalid set of arguments or variables; no cluster
        found; a call after JAX has already started its backends.
    """
    explicit = {"coordinator_address": coordinator_address,
                "num_processes": num_processes, "process_id": process_id}
    given = {k for k, v in explicit.items() if v is not None}
    if given and len(given) < 3:
        missing = sorted(set(explicit) - given)
        raise ValueError(
            f"initialize: got {', '.join(sorted(given))} but not {', '.join(missing)}; "
            "pass coordinator_address, num_processes and process_id together, or none of "
            "them (they are then read from the environment).")
    source = "arguments"
    if not given:
        explicit, source = _from_environment(), "environment"
    args = _check_process_args(source, **explicit)
    local_device_ids = _check_local_device_ids(local_device_ids)

    if jax.distributed.is_initialized():
        return _same_process(args)
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(args["coordinator_address"], args["num_processes"],
                                   args["process_id"], local_device_ids=local_device_ids)
    except RuntimeError as e:
        raise ValueError(
            f"initialize: {e} Call ntk_poison.distributed.initialize() first thing in the "
            "program, before any array, jax.devices() or computation.") from e
    except ValueError as e:
        raise ValueError(
            f"initialize: no cluster to join ({e}). Pass coordinator_address, "
            "num_processes and process_id, or set "
            + ", ".join(v[0] for v in ENV_VARS.values())
            + " (or their JAX_* names), or run under a cluster manager JAX detects "
            "(SLURM, Open MPI, Kubernetes, Cloud TPU).") from e
    return _process_info()


def _from_environment() -> dict:
    out, found = {}, {}
    for arg, names in ENV_VARS.items():
        name = next((n for n in names if os.environ.get(n, "") != ""), None)
        out[arg] = None if name is None else os.environ[name]
        if name is not None:
            found[arg] = name
    if found and len(found) < 3:
        missing = [ENV_VARS[a][0] for a in ENV_VARS if a not in found]
        raise ValueError(
            f"initialize: the environment sets {', '.join(sorted(found.values()))} but "
            f"not {' / '.join(missing)} (or their JAX_* names); set all three, or none "
            "of them to let JAX detect the cluster (SLURM, Open MPI, Kubernetes).")
    for arg in ("num_processes", "process_id"):
        if out[arg] is not None:
            try:
                out[arg] = int(out[arg])
            except ValueError:
                raise ValueError(
                    f"initialize: {found[arg]}={out[arg]!r} is not an integer.") from None
    return out


def _check_process_args(source: str, coordinator_address, num_processes, process_id
                        ) -> dict:
    if coordinator_address is None:          # none given: JAX's cluster detection
        return {"coordinator_address": None, "num_processes": None, "process_id": None}
    where = "" if source == "arguments" else " (from the environment)"
    if not isinstance(coordinator_address, str) or not _ADDRESS.match(coordinator_address):
        raise ValueError(
            f"`coordinator_address`{where} must be 'host:port' (e.g. '10.0.0.1:1234'), "
            f"got {coordinator_address!r}.")
    port = int(_ADDRESS.match(coordinator_address).group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"`coordinator_address`{where} has port {port}; use 1..65535.")
    if not _validate.is_int_scalar(num_processes) or num_processes < 1:
        raise ValueError(f"`num_processes`{where} must be an integer >= 1, got "
                         f"{num_processes!r}.")
    if not _validate.is_int_scalar(process_id) or not 0 <= process_id < num_processes:
        raise ValueError(
            f"`process_id`{where} must be an integer with 0 <= process_id < num_processes "
            f"= {num_processes}, got {process_id!r}.")
    return {"coordinator_address": coordinator_address,
            "num_processes": int(num_processes), "process_id": int(process_id)}


def _check_local_device_ids(ids):
    if ids is None:
        return None
    seq = [ids] if _validate.is_int_scalar(ids) else ids
    try:
        seq = list(seq)
    except TypeError:
        seq = None
    if not seq or not all(_validate.is_int_scalar(i) and i >= 0 for i in seq) \
            or len(set(seq)) != len(seq):
        raise ValueError(f"`local_device_ids` must be a device index >= 0 or a list of "
                         f"distinct ones, got {ids!r}.")
    return [int(i) for i in seq]


def _process_info() -> ProcessInfo:
    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                       jax.device_count())


def _same_process(args: dict) -> ProcessInfo:
    info = _process_info()
    if args["num_processes"] is not None and (
            (args["num_processes"], args["process_id"])
            != (info.num_processes, info.process_id)):
        raise ValueError(
            f"initialize: the runtime is already started as process {info.process_id} of "
            f"{info.num_processes}; it cannot become process {args['process_id']} of "
            f"{args['num_processes']} (restart the program to change it).")
    return info


# --------------------------------------------------------------------------- the mesh

def make_mesh(devices: Optional[Sequence[Any]] = None, axis_name: str = "rows") -> Mesh:
    """A one-axis :class:`jax.sharding.Mesh` over ``devices`` (default: every device
    of every process, ``jax.devices()``), with an ``AxisType.Auto`` axis.

    Auto, not Explicit: on JAX 0.10 Explicit axes make the ``jax.scipy`` solvers raise a
    sharding-type error, and the Gram product here shards by hand (``shard_map``).
    """
    if not isinstance(axis_name, str) or not axis_name.isidentifier():
        raise ValueError(f"`axis_name` must be a non-empty identifier string such as "
                         f"'rows', got {axis_name!r}.")
    if devices is None:
        devices = jax.devices()
    try:
        devices = list(devices)
    except TypeError:
        raise ValueError(f"`devices` must be a list of jax devices (e.g. jax.devices()), "
                         f"got {type(devices).__name__}.") from None
    if not devices:
        raise ValueError("`devices` is empty; pass at least one device, e.g. "
                         "jax.devices()[:1].")
    bad = [d for d in devices if not isinstance(d, jax.Device)]
    if bad:
        raise ValueError(f"`devices` must hold jax devices (from jax.devices()), got "
                         f"{type(bad[0]).__name__}.")
    if len({(d.platform, d.id) for d in devices}) != len(devices):
        raise ValueError("`devices` lists a device twice; pass each device once.")
    if len({d.platform for d in devices}) != 1:
        raise ValueError("`devices` mixes platforms "
                         f"{sorted({d.platform for d in devices})}; use one kind.")
    return Mesh(np.asarray(devices, dtype=object), (axis_name,),
                axis_types=(AxisType.Auto,))


# --------------------------------------------------------------------------- the product

class _Plan(NamedTuple):
    n: int          # true rows
    D: int          # devices
    b: int          # rows per Gram block
    nb: int         # blocks per device
    m: int          # rows per device, nb * b
    n_pad: int      # D * m


def _plan(n: int, D: int, block_size: Optional[int]) -> _Plan:
    m0 = -(-n // D)
    if block_size is None:
        n_guess = D * m0
        block_size = max(1, min(m0, DEFAULT_BLOCK_ELEMENTS // n_guess))
    b = min(int(block_size), m0)
    nb = -(-m0 // b)
    b = -(-m0 // nb)             # even blocks: at most nb - 1 pad rows per device
    m = nb * b
    return _Plan(n, D, b, nb, m, D * m)


def sharded_gram_matvec(k: Kernel, X: Array, mesh: Mesh, *,
                        block_size: Optional[int] = None,
                        dtype: Any = None) -> Callable[[Array], jax.Array]:
    """The Gram product ``V -> k(X, X) @ V`` with the rows of ``X`` sharded over ``mesh``.

    Args:
      k: an :class:`~ntk_poison.kernels.Kernel` (``k.fn(X1, X2) -> (n1, n2)``).
      X: the training inputs ``(n, *s)`` (the same array on every process).
      mesh: a :class:`jax.sharding.Mesh` (:func:`make_mesh`); the rows are sharded over
        all of its axes, ``D = mesh.size`` devices, each holding ``m = n_pad / D`` rows.
      block_size: rows of one Gram block ``(block_size, n_pad)`` on a device (default:
        :data:`DEFAULT_BLOCK_ELEMENTS` / n_pad, at most m).
      dtype: the dtype the Gram blocks are computed and held in (default: X's); the
        product accumulates in ``V``'s dtype, e.g. float32 blocks, float64 sums.

    Returns:
      ``matvec(V)`` for ``V (n,)`` or ``(n, c)``, returning ``K V`` of the same shape,
      traceable (jit, vmap: :func:`ntk_poison.linalg.cg` vmaps it over columns). It
      carries ``matvec.mesh``, ``matvec.n_pad`` and ``matvec.block_rows`` (the plan). Padding: ``n`` rows become ``n_pad = D m``
      (pad inputs copy row 0, so every kernel stays finite; V is zero-padded, so pad
      columns add nothing, and pad rows are dropped), so any ``n`` works on any ``D``.

    The KRR system of THEORY.md section 2 is then ``(K + n lambda I) alpha = y``, solved
    by ``linalg.cg(lambda v: matvec(v) + n * lam * v, y)``.
    """
    if not isinstance(k, Kernel):
        raise ValueError(
            f"`k` must be an ntk_poison.kernels.Kernel, got {type(k).__name__}; build one "
            "with kernels.get(name, ...) or wrap a function with kernels.Kernel(fn).")
    if not isinstance(mesh, Mesh):
        raise ValueError(f"`mesh` must be a jax.sharding.Mesh (ntk_poison.distributed."
                         f"make_mesh()), got {type(mesh).__name__}.")
    if not _validate.is_concrete(X):
        raise ValueError("`X` is a traced value; build the sharded product outside jit "
                         "(it places X on the mesh once) and call it inside.")
    _validate.array("X", X)
    Xh = np.asarray(X)
    k.check_inputs("X", Xh)
    n = Xh.shape[0]
    if n == 0:
        raise ValueError("`X` is empty; pass at least one training point.")
    block_size = _validate.positive_int("block_size", block_size, allow_none=True)
    if dtype is None:
        dtype = Xh.dtype if np.issubdtype(Xh.dtype, np.floating) else jnp.result_type(float)
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype` must be a float dtype (jnp.float32 or jnp.float64), "
                         f"got {dtype!r}.")
    dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(dtype))   # float32 without x64
    plan = _plan(n, mesh.size, block_size)
    d_in = int(np.prod(Xh.shape[1:]))
    _validate.fits_in_memory(
        f"One device's Gram block plus the inputs (block_size, n_pad) + (n_pad, d) = "
        f"({plan.b}, {plan.n_pad}) + ({plan.n_pad}, {d_in})",
        plan.b * plan.n_pad + plan.n_pad * d_in, dtype.itemsize,
        "Pass a smaller block_size, or more devices.")

    Xp = np.concatenate([Xh, np.repeat(Xh[:1], plan.n_pad - n, axis=0)]).astype(dtype)
    X_all = jax.make_array_from_callback(Xp.shape, NamedSharding(mesh, P()),
                                         lambda idx: Xp[idx])
    axes = tuple(mesh.axis_names)
    product = _sharded_product(k, mesh, axes, plan)

    def matvec(V):
        V = jnp.asarray(V)
        if V.ndim not in (1, 2) or V.shape[0] != n:
            raise ValueError(f"`V` must have shape ({n},) or ({n}, c), got "
                             f"{tuple(V.shape)}.")
        if not jnp.issubdtype(V.dtype, jnp.floating):
            V = V.astype(jnp.result_type(float))
        return _apply(product, X_all, V, n, plan.n_pad)

    matvec.mesh, matvec.n_pad, matvec.block_rows = mesh, plan.n_pad, plan.b
    return matvec


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _apply(product, X_all, V, n, n_pad):
    vector = V.ndim == 1
    V2 = V[:, None] if vector else V
    V2 = jnp.pad(V2, ((0, n_pad - n), (0, 0)))
    out = product(X_all, V2)[:n]
    return out[:, 0] if vector else out


@functools.lru_cache(maxsize=64)
def _sharded_product(k: Kernel, mesh: Mesh, axes: tuple, plan: _Plan):
    """The shard_map'd ``(X_all (n_pad, *s), V (n_pad, c)) -> K V (n_pad, c)``,
    cached per (kernel, mesh, sizes) so that repeated matvecs share one trace."""
    kfn = k.fn

    def local(X_all, V_loc):
        j = jax.lax.axis_index(axes)
        X_loc = jax.lax.dynamic_slice_in_dim(X_all, j * plan.m, plan.m, axis=0)
        V_all = jax.lax.all_gather(V_loc, axes, axis=0, tiled=True)
        blocks = X_loc.reshape((plan.nb, plan.b) + X_loc.shape[1:])

        def one_block(xb):
            Kb = kfn(xb, X_all).astype(V_all.dtype)
            return Kb @ V_all

        return jax.lax.map(one_block, blocks).reshape(plan.m, V_loc.shape[1])

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes)), out_specs=P(axes))
