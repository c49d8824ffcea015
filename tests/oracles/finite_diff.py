"""Central finite differences in float64 numpy, with one Richardson step.

``D(h) = (f(x + h e) - f(x - h e)) / 2h`` has error ``c2 h^2 + c4 h^4 + ...``; the
Richardson combination ``(4 D(h/2) - D(h)) / 3`` cancels the ``h^2`` term, so with
``h ~ 1e-3`` the truncation error is ~1e-12 and round-off ~eps/h ~1e-13 for O(1)
functions.
"""

from __future__ import annotations

import numpy as np


def directional_derivative(f, x, v, h=1e-3):
    """Richardson-extrapolated central difference of ``f`` at ``x`` along ``v``."""
    x = np.asarray(x, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)

    def central(step):
        return (np.asarray(f(x + step * v), np.float64)
                - np.asarray(f(x - step * v), np.float64)) / (2.0 * step)

    return (4.0 * central(h / 2.0) - central(h)) / 3.0


def gradient(f, x, h=1e-3, coords=None):
    """Gradient of a scalar function of an array ``x`` (any shape).

    ``coords`` optionally restricts to a list of flat indices; the result is then a
    1-D array of those partial derivatives. Otherwise it has the shape of ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    idx = range(x.size) if coords is None else coords
    out = []
    for i in idx:
        e = np.zeros(x.size)
        e[i] = 1.0
        out.append(float(directional_derivative(f, x, e.reshape(x.shape), h)))
    out = np.asarray(out)
    return out.reshape(x.shape) if coords is None else out


def jacobian(g, x, h=1e-3):
    """Jacobian ``d g / d x`` of a vector function of a vector: ``(len(g(x)), x.size)``."""
    x = np.asarray(x, dtype=np.float64)
    cols = []
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = 1.0
        cols.append(np.ravel(directional_derivative(g, x, e.reshape(x.shape), h)))
    return np.stack(cols, axis=1)
