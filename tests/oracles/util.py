"""Small numeric helpers shared by the tests (no reference to ntk_poison).

* :func:`rel_err` - a relative error ``||a - b|| / max(||b||, floor)``;
* :func:`eps` - machine epsilon of a dtype, the unit of every dtype-aware tolerance.
"""

from __future__ import annotations

import numpy as np


def eps(dtype) -> float:
    """Machine epsilon of ``dtype`` (2.2e-16 for float64, 1.2e-7 for float32)."""
    return float(np.finfo(np.dtype(dtype)).eps)


def rel_err(a, b, floor: float = 1e-300) -> float:
    """Frobenius relative error ``||a - b|| / ||b||`` in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor))


def cache_size(jitted) -> int:
    """Compiled programs held by a ``jax.jit`` or ``equinox.filter_jit`` function."""
    return getattr(jitted, "_cached", jitted)._cache_size()
