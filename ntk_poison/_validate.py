"""One validation layer for public entry points.

Public functions check their inputs once, at the boundary, with these helpers. A bad
input is a ``ValueError`` that names the argument and says how to fix it; inner
jitted code then assumes valid input. Checks that need concrete values (finiteness,
signs) are skipped for tracers, so the helpers are safe to call under ``jit``.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

import jax
import numpy as np


def is_concrete(x: Any) -> bool:
    """True if ``x`` holds concrete values (not a JAX tracer under jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def array(name: str, x: Any, *, ndim: Optional[int | Sequence[int]] = None,
          finite: bool = True, floating: bool = False) -> Any:
    """Check an array argument and return it unchanged.

    Args:
      name: the argument's name, as the user wrote it, for the message.
      x: the value.
      ndim: the allowed number of dimensions (an int or a tuple of ints).
      finite: reject NaN and inf (only checked on concrete values).
      floating: reject integer and boolean dtypes.
    """
    if x is None:
        raise ValueError(f"`{name}` is None; pass an array.")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = np.asarray(x)
        except Exception as e:  # pragma: no cover - exotic inputs
            raise ValueError(f"`{name}` must be array-like, got {type(x).__name__}.") from e
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            raise ValueError(
                f"`{name}` must have {' or '.join(map(str, allowed))} dimensions, got "
                f"shape {tuple(x.shape)}.")
    if getattr(x.dtype, "kind", None) in ("c", "O", "U", "S", "V"):
        raise ValueError(
            f"`{name}` has dtype {x.dtype}; pass real numbers (float, int or bool), e.g. "
            f"`{name}.real` for a complex array.")
    if floating and not np.issubdtype(np.dtype(x.dtype), np.floating):
        raise ValueError(
            f"`{name}` has dtype {x.dtype}, but real-valued (float) targets are needed; "
            f"convert it, e.g. `{name}.astype(float)`, or encode labels as +-1 / one-hot "
            "floats (see ntk_poison.data.binary_targets).")
    if finite and is_concrete(x) and np.issubdtype(np.dtype(x.dtype), np.number):
        if not bool(np.all(np.isfinite(np.asarray(x)))):
            raise ValueError(f"`{name}` contains NaN or inf; clean or impute it first.")
    return x


def nonneg(name: str, value: Any, *, integer: bool = False, positive: bool = False) -> Any:
    """Check a scalar (or an array of scalars) is >= 0 (or > 0), and optionally integral."""
    if not is_concrete(value):
        return value
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    if integer and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"`{name}` must be a whole number, got {value!r}.")
    if positive and np.any(arr <= 0):
        raise ValueError(f"`{name}` must be > 0, got {value!r}.")
    if np.any(arr < 0):
        raise ValueError(f"`{name}` must be >= 0, got {value!r}; it is a "
                         f"{'count' if integer else 'non-negative quantity'}.")
    return value


def same_rows(name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Check two arrays have the same number of rows (leading dimension)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"`{name_a}` has {a.shape[0]} rows but `{name_b}` has {b.shape[0]}; they "
            "must describe the same points.")


def same_trailing(name_a: str, a: Any, name_b: str, b: Any, rank: int) -> None:
    """Check the trailing ``rank`` dimensions (one input's shape) agree."""
    sa = tuple(a.shape[a.ndim - rank:])
    sb = tuple(b.shape[b.ndim - rank:])
    if sa != sb:
        raise ValueError(
            f"`{name_a}` has inputs of shape {sa} but `{name_b}` has {sb}; they must "
            "live in the same input space.")


def is_int_scalar(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def memory_budget_bytes() -> int:
    """Bytes one array may take: half the default device's memory limit.

    On accelerators this is read from ``device.memory_stats()``; on the CPU it is
    half the physical RAM. Override with the environment variable
    ``NTK_POISON_MEMORY_BUDGET`` (bytes).
    """
    import os
    env = os.environ.get("NTK_POISON_MEMORY_BUDGET")
    if env:
        return int(float(env))
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) // 2
    except Exception:  # pragma: no cover - backend without stats
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 << 30


def fits_in_memory(what: str, n_elements: int, itemsize: int, fix: str) -> None:
    """Raise a ValueError if an array of ``n_elements`` would not fit the budget."""
    need = int(n_elements) * int(itemsize)
    budget = memory_budget_bytes()
    if need > budget:
        raise ValueError(
            f"{what} needs {need / 2**30:.1f} GiB, over the memory budget of "
            f"{budget / 2**30:.1f} GiB (NTK_POISON_MEMORY_BUDGET). {fix}")


# --------------------------------------------------------------------------- shared checks

def default_tol(dtype: Any) -> float:
    """The one default relative tolerance of the iterative solvers, per dtype.

    ``1e-8`` in float64 and ``1e-4`` in float32 (about ``sqrt(eps)`` of each; scipy's
    CG default is 1e-5): the relative residual of conjugate gradients, the relative
    RKHS gradient norm of the Newton-LM fits and the relative eigen-residual of block
    Lanczos (:mod:`ntk_poison.linalg`) all stop there unless the caller passes
    ``tol``. Tighter is not always reachable: a Hessian-vector product carries
    rounding relative to the terms it sums, and on small, cancelling problems the
    Lanczos residual floor was measured at 1.4e-10 of the spectral norm.
    """
    return 1e-8 if np.dtype(dtype) == np.float64 else 1e-4


def float_array(name: str, x: Any, *, ndim: Optional[int | Sequence[int]] = None) -> Any:
    """Check an array argument and return it as a jax array of a float dtype.

    Integer or boolean inputs become the default float dtype (float64 under x64).
    """
    array(name, x, ndim=ndim)
    x = jax.numpy.asarray(x)
    if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
        x = x.astype(jax.numpy.result_type(float))
    return x


def as_key(key: Any, name: str = "key") -> Any:
    """A jax PRNG key from a key or an int seed (None: ``PRNGKey(0)``)."""
    if key is None:
        return jax.random.PRNGKey(0)
    if is_int_scalar(key):
        return jax.random.PRNGKey(int(key))
    if not isinstance(key, jax.Array):
        raise ValueError(f"`{name}` must be a jax PRNG key (jax.random.PRNGKey(seed) or "
                         f"jax.random.key(seed)) or an int seed, got {type(key).__name__}.")
    return key


def choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """Check ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}.")
    return value


def scalar(name: str, value: Any, hint: str = "") -> float:
    """A real scalar >= 0, as a float."""
    if np.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(value)}{hint}.")
    nonneg(name, value)
    return float(value)


def positive_int(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """An int >= 1 (or None where allowed)."""
    if value is None and allow_none:
        return None
    if not is_int_scalar(value) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1"
                         f"{' or None' if allow_none else ''}, got {value!r}.")
    return int(value)
