"""What the experiments measure, one definition each (THEORY.md section 4).

**Decisions.** A binary model (targets +-1) decides ``sign f(x)``; a multi-output
model (one-hot targets) decides ``argmax_c f_c(x)`` (``multiclass=True``, the class
axis last). Predictions may carry leading axes (a sweep, a flow over time): every
rate is a mean over the POINTS axis, the last one (the one before the class axis
for ``multiclass``), so ``(T, m) -> (T,)``.

* :func:`attack_success_rate`: the fraction of triggered non-target inputs sent to
  the target. Applied to the CLEAN model's predictions at the same triggered inputs
  it is the **trigger-alone ASR** (:func:`trigger_alone_asr`), the baseline every ASR
  is reported beside: a trigger can carry inputs to the target with no poison.
* :func:`flip_rate`: triggered inputs the poisoned model sends to the target and
  the clean model does not.
* :func:`clean_accuracy`: decisions equal to the true labels on clean inputs.
* :func:`robust_accuracy` (RA): triggered non-target inputs still decided as their
  TRUE label, on the same inputs as the ASR (so ``ASR + RA <= 1``).

**Curves.** :func:`half_crossing` (where a curve first reaches the middle of its
range), :func:`first_crossing` (where it first reaches a level, upwards or
downwards), both interpolated linearly in log x; :func:`interp_at`;
:func:`loglog_slope`; :func:`fit_linear_growth` (the leading linear run of a curve).

**Scales.** :func:`median_distance`: the length scale of a data set by the median
heuristic, the one rule the experiments and the benchmarks use.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

Array = Any

__all__ = [
    "decisions", "attack_success_rate", "trigger_alone_asr", "flip_rate",
    "clean_accuracy", "robust_accuracy", "half_crossing", "first_crossing", "interp_at", "loglog_slope",
    "fit_linear_growth", "median_distance",
]


# --------------------------------------------------------------------------- decisions

def decisions(f: Array, *, multiclass: bool = False) -> np.ndarray:
    """``sign f`` (binary) or ``argmax_c f_c`` (``multiclass``: class axis last)."""
    f = np.asarray(f)
    return np.argmax(f, axis=-1) if multiclass else np.sign(f)


def _target_decision(target: Any, multiclass: bool):
    if multiclass:
        t = np.asarray(target)
        return int(np.argmax(t)) if t.ndim else int(t)     # a one-hot vector or an index
    return np.sign(target)


def attack_success_rate(f_triggered: Array, target: Any, *, multiclass: bool = False
                        ) -> np.ndarray:
    """The fraction of triggered non-target inputs the model sends to the target.

    Args:
      f_triggered: predictions at triggered inputs whose true class is not the
        target, ``(..., m)`` (``(..., m, c)`` with ``multiclass``).
      target: the target value (binary: its sign, e.g. +1) or class (an index or a
        one-hot vector).

    Returns the rate over the points axis (a float for one set of predictions).
    """
    hit = decisions(f_triggered, multiclass=multiclass) == _target_decision(target,
                                                                            multiclass)
    return hit.mean(-1)


def trigger_alone_asr(f_clean_model_triggered: Array, target: Any, *,
                      multiclass: bool = False) -> np.ndarray:
    """The trigger-alone ASR: :func:`attack_success_rate` of the CLEAN (unpoisoned)
    model at the triggered inputs, the baseline beside every attacked ASR."""
    return attack_success_rate(f_clean_model_triggered, target, multiclass=multiclass)


def flip_rate(f_poisoned: Array, f_clean: Array, target: Any, *,
              multiclass: bool = False) -> np.ndarray:
    """Triggered inputs the poisoned model sends to the target and the clean model
    (at the same inputs) does not: the part of the ASR the poison causes."""
    t = _target_decision(target, multiclass)
    p = decisions(f_poisoned, multiclass=multiclass) == t
    c = decisions(f_clean, multiclass=multiclass) == t
    return (p & ~c).mean(-1)


def clean_accuracy(f: Array, labels: Array, *, multiclass: bool = False) -> np.ndarray:
    """The fraction of clean inputs decided as their label.

    ``labels``: +-1 targets (binary) or class indices (``multiclass``), of the
    points axis' length; they broadcast against leading axes of ``f``.
    """
    return (decisions(f, multiclass=multiclass) == np.asarray(labels)).mean(-1)


def robust_accuracy(f_triggered: Array, labels: Array, *, multiclass: bool = False
                    ) -> np.ndarray:
    """Robust accuracy: the fraction of triggered inputs decided as their TRUE label.

    Args:
      f_triggered: predictions at triggered inputs whose true class is not the target
        (the inputs of :func:`attack_success_rate`), ``(..., m)`` (``(..., m, c)`` with
        ``multiclass``).
      labels: their true labels, +-1 (binary) or class indices (``multiclass``), of
        length m; they broadcast against leading axes of ``f_triggered``.

    A triggered input sent to the target is not decided as its (non-target) label, so
    ``ASR + RA <= 1``; the rest are sent to a third class (multiclass only).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"`labels` must be a 1-D array of true labels (+-1 or class "
                         f"indices), got shape {labels.shape}.")
    m = np.shape(f_triggered)[-2 if multiclass else -1]
    if labels.shape[0] != m:
        raise ValueError(f"`labels` has {labels.shape[0]} entries but `f_triggered` "
                         f"holds {m} inputs; pass one true label per triggered input.")
    return clean_accuracy(f_triggered, labels, multiclass=multiclass)


# --------------------------------------------------------------------------- curves

def _interp_log(xs, v, level, i, log_x, zero_divisor):
    """The x between ``xs[i-1]`` and ``xs[i]`` where ``v`` reaches ``level``, linear in
    ``log x`` (x <= 0 drawn at the smallest positive x over ``zero_divisor``)."""
    x0, x1 = xs[i - 1], xs[i]
    if log_x:
        pos = xs[xs > 0]
        floor = pos.min() / zero_divisor if pos.size else 1.0
        x0, x1 = np.log(max(x0, floor)), np.log(max(x1, floor))
    f = 0.0 if v[i] == v[i - 1] else (level - v[i - 1]) / (v[i] - v[i - 1])
    x = x0 + f * (x1 - x0)
    return float(np.exp(x) if log_x else x)


def first_crossing(xs: Array, vals: Array, level: float, *, direction: str = "up",
                   log_x: bool = True, zero_divisor: float = 2.0) -> Optional[float]:
    """The x at which ``vals`` first reaches ``level``: ``>= level`` (``"up"``) or
    ``<= level`` (``"down"``); None if never.

    Interpolated linearly in log x between the grid points around the crossing;
    a grid point x <= 0 is drawn at the smallest positive x divided by
    ``zero_divisor`` (2: half of it; 10: a decade below). ``xs[0]`` if the first
    value already reaches the level.
    """
    if direction not in ("up", "down"):
        raise ValueError(f"`direction` must be 'up' or 'down', got {direction!r}.")
    xs, v = np.asarray(xs, float), np.asarray(vals, float)
    reached = v >= level if direction == "up" else v <= level
    if not reached.any():
        return None
    i = int(np.argmax(reached))
    if i == 0:
        return float(xs[0])
    return _interp_log(xs, v, level, i, log_x, zero_divisor)


def half_crossing(xs: Array, vals: Array, log_x: bool = True) -> Optional[float]:
    """The x at which ``vals`` first reaches the middle of its range.

    The direction is that of ``vals[-1] - vals[0]``; the crossing is interpolated
    linearly in log x (x <= 0 drawn at half the smallest positive x). None if the
    range is zero.
    """
    xs, v = np.asarray(xs, float), np.asarray(vals, float)
    lo, hi = np.nanmin(v), np.nanmax(v)
    if not hi > lo:
        return None
    mid = 0.5 * (lo + hi)
    up = v[-1] >= v[0]
    reached = v >= mid if up else v <= mid
    i = int(np.argmax(reached))
    if i == 0:
        return float(xs[0])
    return _interp_log(xs, v, mid, i, log_x, 2.0)


def interp_at(xs: Array, vals: Array, x: float, log: bool = True) -> float:
    """``|vals|`` at x by linear interpolation in (log x, log |vals|) (or linear)."""
    xs, v = np.asarray(xs, float), np.abs(np.asarray(vals, float))
    ok = (xs > 0) & (v > 0)
    if log:
        return float(np.exp(np.interp(np.log(x), np.log(xs[ok]), np.log(v[ok]))))
    return float(np.interp(x, xs, v))


def loglog_slope(x: Array, y: Array) -> float:
    """The least-squares slope of log y against log x over the points where both are
    positive (NaN with fewer than two)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = (x > 0) & (y > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def fit_linear_growth(x: Array, y: Array, growth_max: float) -> Dict[str, Any]:
    """Least squares ``y = a + c x`` over the leading points with ``y/y[0] - 1 <=
    growth_max`` (at least 3).

    Returns c, its standard error, the intercept, the relative RMS misfit, the number
    of points and the largest x used, or ``c = None`` with a reason.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not np.isfinite(y[0]) or y[0] <= 0:
        return dict(c=None, reason="no peak at zeta at kappa = 0")
    ok = np.isfinite(y) & (y / y[0] - 1 <= growth_max)
    n = int(np.argmin(ok)) if not ok.all() else len(x)        # leading run only
    n = max(n, 3)
    if n > len(x) or not np.isfinite(y[:n]).all():
        return dict(c=None, reason="too few finite points")
    A = np.stack([np.ones(n), x[:n]], 1)
    coef, *_ = np.linalg.lstsq(A, y[:n], rcond=None)
    r = y[:n] - A @ coef
    dof = max(n - 2, 1)
    cov = np.linalg.inv(A.T @ A) * (r @ r) / dof
    return dict(c=float(coef[1]), c_stderr=float(np.sqrt(max(cov[1, 1], 0))),
                intercept=float(coef[0]), rel_rms=float(np.sqrt(np.mean(r ** 2)) / y[0]),
                n_points=n, kappa_max=float(x[n - 1]))


# --------------------------------------------------------------------------- scales

def median_distance(X: Array, n: int = 500) -> float:
    """The median pairwise Euclidean distance over the first ``n`` rows of ``X``
    (flattened), in float64: the length scale of the median heuristic."""
    Z = np.asarray(X, np.float64)[:n].reshape(min(n, len(X)), -1)
    sq = (Z * Z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * Z @ Z.T, 0)
    return float(np.median(np.sqrt(d2[np.triu_indices(len(Z), 1)])))
