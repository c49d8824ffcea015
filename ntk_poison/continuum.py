"""The 1-D continuum oracle of the penalised kernel model (THEORY.md section 3).

A stationary kernel ``k(x, x') = k(x - x')`` on a line, with spectral density
``k_hat(omega) = int k(t) exp(-i omega t) dt`` (so ``k(t) = (1/2 pi) int k_hat
exp(i omega t) d omega``), and training points of number density ``p`` (points per
unit length: ``sum_i g(x_i) ~ int p g(x) dx``; ``p = n / L`` for n points spread
over a length L, i.e. n times the probability density). The objective is the
project's (:mod:`ntk_poison.penalty`, output variant)::

    J(f) = (1/2n) sum_i (f(x_i) - y_i)^2 + (lam/2) ||f||_H^2 + (kappa/2n) sum_i f'(x_i)^2

**Derivation.** Multiply J by n. Its stationarity condition in the RKHS (the
Frechet derivative, with ``<f, k(., x)>_H = f(x)`` and ``<f, d/dx' k(., x')>_H = f'(x')``)::

    sum_i (f(x_i) - y_i) k(x, x_i) + n lam f(x) + kappa sum_i f'(x_i) d/dx' k(x, x')|x'=x_i = 0

Replace the sums that carry f by integrals against p (uniform p: the data are
dense on the kernel's scale; for a grid of spacing h the error is the aliasing
``k_hat(2 pi/h)``, e^-(2 pi l/h)^2/2 for the RBF), keep the labels as point masses,
and integrate the penalty term by parts
(``int f'(x') d/dx' k(x - x') dx' = int f''(x') k(x - x') dx'`` up to the sign of two
derivatives, ``-> omega^2 f_hat k_hat``). In Fourier space::

    p k_hat f_hat + n lam f_hat + kappa p omega^2 k_hat f_hat = k_hat sum_i y_i e^(-i omega x_i)

so ``f(x) = sum_i y_i G(x - x_i)``: the **equivalent kernel** (one hat-matrix row)
is ``G = F^-1[H]`` with the **transfer function**::

    H(omega) = 1 / (p (1 + kappa omega^2) + n lam / k_hat(omega))
             = k_hat / (p k_hat (1 + kappa omega^2) + n lam)       (the stable form)

``n lam`` is the ABSOLUTE ridge (``ridge`` below). The penalty multiplies the data
term by ``1 + kappa omega^2``: it damps each Fourier mode of f by about
``1/(1 + kappa omega^2)`` where the data dominate, and not at all where the ridge
does (``n lam / k_hat >> p``).

**A point poison.** m clones of zeta with target y_t add ``m (delta_zeta
delta_zeta^T + kappa delta'_zeta delta'_zeta^T)`` to the (clean) operator and
``m y_t delta_zeta`` to its source. Where the clean fit is flat at zeta (f_c'(zeta)
= 0, e.g. symmetric data and labels) and G'(0) = 0, Sherman-Morrison gives::

    Delta f(zeta + t) = m (y_t - f_c(zeta)) G(t) / (1 + m G(0))

(the rank-one law of THEORY.md section 2 with ``kt = n lam G`` and ``s2 = n lam G(0)``;
the clones' own penalty drops out: the response has zero slope at its centre).
Its shape is G: the continuum response to a point poison in dense data.

**Effective width.** The peak-curvature width of G at its centre::

    l_eff^2 = -G(0) / G''(0) = int H d omega / int omega^2 H d omega

and its slope at kappa -> 0 (``dH/dkappa = -p omega^2 H^2``)::

    c = d l_eff^2 / d kappa = p (A D - B C) / B^2,
    A = int H,  B = int omega^2 H,  C = int omega^2 H^2,  D = int omega^4 H^2  (at kappa = 0)

THEORY's ``c = 2`` is the isolated picture ``F^-1[k_hat / (1 + kappa omega^2)]``
(:func:`isolated_width2`): the penalty acting on a lone RBF bump, no ridge, no data.
With data and a ridge, c is another number: the shape of G depends on p and n lam
only through ``n lam / p`` (``H = (1/p) / (1 + kappa omega^2 + (n lam / p) / k_hat)``),
and for the RBF c is 0.2-0.4 over the densities the defence experiment uses. With a
clean-free gap around zeta the exact minimiser departs from this form altogether, and
c can be negative (the defence experiment measures it).

Integrals are over omega in [0, inf) (every integrand is even): the trapezoid rule on
a uniform grid of [0, Omega], Omega the cut-off where the integrand has decayed by
``1e-13``. For a smooth even integrand it is spectrally accurate: its error is the
alias ``G(t +- 2 pi / d omega)`` (for a width, the transform at ``2 pi / d omega``),
and d omega is chosen so that this lies ``100 (l + sqrt(kappa))`` away. Everything is
float64 numpy.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ntk_poison import _validate
from ntk_poison.kernels import Kernel

Array = Any

__all__ = ["spectral_density", "transfer", "equivalent_kernel", "point_poison_response",
           "peak_width2", "width_slope", "isolated_width2", "curvature_width2"]

_DECAY = 1e-13        # H(Omega) / H(0) at the cut-off


def spectral_density(k: Kernel) -> Callable[[np.ndarray], np.ndarray]:
    """``k_hat(omega)`` of a registered stationary kernel in one dimension.

    rbf: ``sqrt(2 pi) v l exp(-l^2 omega^2 / 2)``; matern52:
    ``v (16/3) 5^(5/2) / l^5 (5/l^2 + omega^2)^-3``. (``v`` the variance; both
    integrate to ``2 pi k(0)``.)
    """
    if not isinstance(k, Kernel) or k.name not in ("rbf", "matern52"):
        raise ValueError(f"`k` must be a kernels.rbf or kernels.matern52 kernel (a "
                         f"stationary kernel with a known spectral density), got {k!r}.")
    ls, var = float(k.param_dict["length_scale"]), float(k.param_dict["variance"])
    if k.name == "rbf":
        return lambda w: var * math.sqrt(2 * math.pi) * ls * np.exp(-0.5 * (ls * w) ** 2)
    return lambda w: var * (16 / 3) * 5 ** 2.5 / ls ** 5 * (5 / ls ** 2 + w * w) ** -3.0


def _check(density, ridge, kappa):
    _validate.nonneg("density", density, positive=True)
    _validate.nonneg("ridge", ridge, positive=True)
    _validate.nonneg("kappa", kappa)
    return float(density), float(ridge), float(kappa)


def transfer(k: Kernel, omega: Array, density: float, ridge: float,
             kappa: float = 0.0) -> np.ndarray:
    """``H(omega) = k_hat / (p k_hat (1 + kappa omega^2) + n lam)`` (module docstring).

    Args: k: rbf or matern52; omega: angular frequencies (any shape); density: p,
    training points per unit length (> 0); ridge: the ABSOLUTE ridge ``n lam`` (> 0);
    kappa: the penalty weight (>= 0). Returns an array of omega's shape.
    """
    p, nl, ka = _check(density, ridge, kappa)
    w = np.asarray(omega, float)
    kh = spectral_density(k)(w)
    return kh / (p * kh * (1 + ka * w * w) + nl)


def _cutoff(H: Callable, scale: float, power: int = 0) -> float:
    """The smallest Omega = 2^j / scale past which ``omega^power H`` stays below
    ``_DECAY`` of its peak (checked on a log grid out to 2^10 Omega)."""
    w = np.geomspace(1e-3, 2.0 ** 50, 1000) / scale
    h = w ** power * H(w)
    big = np.flatnonzero(h > _DECAY * h.max())
    last = w[big[-1] + 1] if big.size and big[-1] + 1 < w.size else w[-1]
    return 2.0 ** math.ceil(math.log2(last * scale)) / scale


def _length(k: Kernel) -> float:
    return float(k.param_dict["length_scale"])


def _trapezoid(om: float, period: float):
    """Nodes and weights of the trapezoid rule on [0, Omega] for ``int_0^inf`` of an
    even function: spacing ``2 pi / period`` (the alias lies ``period`` away)."""
    n = int(math.ceil(om * period / (2 * math.pi))) + 1
    w = np.linspace(0.0, om, n)
    wt = np.full(n, w[1] - w[0])
    wt[0] = wt[-1] = wt[0] / 2
    return w, wt


def _period(k: Kernel, kappa: float, t_max: float = 0.0) -> float:
    return 4 * t_max + 100 * (_length(k) + math.sqrt(kappa))


def equivalent_kernel(k: Kernel, t: Array, density: float, ridge: float,
                      kappa: float = 0.0) -> np.ndarray:
    """``G(t) = (1/pi) int_0^inf cos(omega t) H(omega) d omega``: the hat-matrix weight
    of a training point at distance t (``f(x) = sum_i y_i G(x - x_i)``).

    Trapezoid rule on [0, Omega] with ``d omega = 2 pi / P``, the alias period P
    ``= 4 max|t| + 100 (l + sqrt(kappa))`` (module docstring). Returns t's shape.
    """
    p, nl, ka = _check(density, ridge, kappa)
    t = np.asarray(t, float)
    H = lambda w: transfer(k, w, p, nl, ka)  # noqa: E731
    w, wt = _trapezoid(_cutoff(H, _length(k)),
                       _period(k, ka, float(np.abs(t).max(initial=0.0))))
    hw = H(w) * wt / math.pi
    flat = t.ravel()
    out = [np.cos(np.outer(flat[i:i + 256], w)) @ hw for i in range(0, flat.size, 256)]
    return (np.concatenate(out) if out else flat).reshape(t.shape)


def point_poison_response(k: Kernel, t: Array, density: float, ridge: float, kappa: float,
                          m: int, residual: float) -> np.ndarray:
    """``Delta f(zeta + t) = m r G(t) / (1 + m G(0))``, ``r = y_t - f_c(zeta)``: m clones
    of zeta in dense data whose clean fit is flat at zeta (module docstring); ``ridge``
    is the absolute ``n lam`` with n counting the clones."""
    m = _validate.nonneg("m", m, integer=True)
    g0 = float(equivalent_kernel(k, np.zeros(1), density, ridge, kappa)[0])
    return m * float(residual) * equivalent_kernel(k, t, density, ridge, kappa) / (1 + m * g0)


def _moments(H: Callable, k: Kernel, kappa: float, powers):
    """``int_0^inf omega^q H`` for each q (every integrand here is even and smooth:
    the trapezoid rule up to the cut-off of ``omega^q H`` is spectrally accurate)."""
    out = []
    for q in powers:
        w, wt = _trapezoid(_cutoff(H, _length(k), q), _period(k, kappa))
        out.append(float((w ** q * H(w)) @ wt))
    return out


def _width2_of(H: Callable, k: Kernel, kappa: float) -> float:
    a, b = _moments(H, k, kappa, (0, 2))
    return a / b


def peak_width2(k: Kernel, density: float, ridge: float, kappa: float = 0.0) -> float:
    """``l_eff^2 = -G(0)/G''(0) = int H / int omega^2 H`` (module docstring)."""
    p, nl, ka = _check(density, ridge, kappa)
    return _width2_of(lambda w: transfer(k, w, p, nl, ka), k, ka)


def width_slope(k: Kernel, density: float, ridge: float) -> float:
    """``c = d l_eff^2 / d kappa`` at kappa = 0: ``p (A D - B C) / B^2`` (module
    docstring), by quadrature."""
    p, nl, _ = _check(density, ridge, 0.0)
    H = lambda w: transfer(k, w, p, nl, 0.0)  # noqa: E731
    A, B = _moments(H, k, 0.0, (0, 2))
    C, D = _moments(lambda w: H(w) ** 2, k, 0.0, (2, 4))
    return p * (A * D - B * C) / B ** 2


def isolated_width2(k: Kernel, kappa: float) -> float:
    """l_eff^2 of ``F^-1[k_hat / (1 + kappa omega^2)]``: a lone kernel bump damped
    mode by mode, no ridge and no data (THEORY's continuum picture; for the RBF
    ``l^2 + 2 kappa + O(kappa^2)``)."""
    ka = float(_validate.nonneg("kappa", kappa))
    kh = spectral_density(k)
    return _width2_of(lambda w: kh(w) / (1 + ka * w * w), k, ka)


def curvature_width2(f0: Array, f2: Array) -> np.ndarray:
    """The peak-curvature width ``l_eff^2 = -f / f''`` of a response at its peak
    (``f0`` the value, ``f2`` the second derivative along a direction); NaN where
    ``f''`` is not negative (no peak). Insensitive to the response's gain, and,
    applied to ``Delta f = f_poisoned - f_clean``, to the clean fit's offset."""
    f0, f2 = np.asarray(f0, float), np.asarray(f2, float)
    ok = f2 < 0
    return np.where(ok, -f0 / np.where(ok, f2, -1.0), np.nan)
