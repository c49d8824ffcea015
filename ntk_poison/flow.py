"""Kernel gradient flow of the penalised objective, its rate, and the contraction of
poison-aligned modes (THEORY.md section 3).

**Kernel gradient flow** (:func:`kernel_flow`). For a linear model ``f = phi(x)^T w``
(a linearised network), ``[f(X); grad f(X)] = Phi_full^T w`` and
``||f||_H^2 = |w|^2``. Gradient flow ``dw/dt = -grad_w J(w)`` from ``w(0) = 0`` keeps
``w = Phi_full c`` and, with ``u = Kfull c``::

    dc/dt = -(grad_u Jdata(u) + lam c),     Jdata(u) = J without its ridge term

For the output penalty ``grad_u Jdata = (1/n) W (u - ybar)``: the linear ODE
``dc/dt = -(1/n) [(W Kfull + n lam I) c - ybar]``. In ``z = S^-1 c`` it is
``dz/dt = -(1/n) (A z - ybar)``, ``A = S Kfull S + n lam I = Q diag(e) Q^T``, so::

    c(t) = S Q diag((1 - exp(-e t / n)) / e) Q^T ybar      -> S A^-1 ybar as t -> inf

At kappa = 0 (S = diag(1, 0)) only the value block survives: :func:`kernel_flow`
then uses ``K + n lam I`` alone (n x n) and sets beta = 0.

*Time units*: t is the time of gradient flow on J as written, i.e. learning rate 1 on
J (gradient descent with step eta for s steps is t ~ eta s). Along the flow
``dJ/dt = -v^T Kfull v <= 0`` (``v = grad_u Jdata + lam c``), for either penalty.

*neural-tangents.* ``nt.predict.gradient_descent_mse(K, y, learning_rate, diag_reg)``
trains ``(1/2 y.size) sum (f - y)^2`` with kernel ``K + diag_reg I`` on the training
points. At kappa = 0 the test predictions here equal its ``fx_test`` with
``learning_rate = 1``, ``diag_reg = n*lam``, ``diag_reg_absolute_scale = True`` and the
same t (scalar targets; for (n, r) targets nt normalises by n r, i.e. its time is r
times ours). Its ``fx_train`` includes the nugget: ``fx_train_nt = f(X) + n lam alpha(t)``.

**Contraction** (:func:`contraction`). In orthonormal coordinates theta of the joint
span (``Kfull = U s U^T``, :func:`joint_coordinates`; features ``Phi = U s^(1/2)`` split
into value rows ``Phi_v`` and gradient rows ``Phi_g``) the penalised flow is linear::

    d theta/dt = -H (theta - theta*),   H = (Phi_v^T Phi_v + kappa Phi_g^T Phi_g)/n + lam I

Along each eigenvector of H with eigenvalue h the energy decays exactly as
``exp(-2 h t)``. A functional ``u . grad f(x0)`` has coefficients b
(:func:`functional_coefficients`) and representer ``v = s^(-1/2) U^T b``.

The kernel-regime model classes and fits live in :mod:`ntk_poison.penalized`, the
joint Gram in :mod:`ntk_poison.joint`, the objective in :mod:`ntk_poison.penalty`.
The names this module used to hold (``flow.fit_penalized``, ``flow.PenalizedModel``,
...) still work, with a DeprecationWarning, for one release.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, joint, krr
from ntk_poison import penalty as penalty_mod
from ntk_poison.kernels import Kernel
from ntk_poison.penalized import PenalizedPath

Array = Any

__all__ = [
    "kernel_flow", "flow_rate", "flow_pair", "joint_coordinates",
    "functional_coefficients", "penalty_curvature", "contraction", "check_times",
]

_METHODS = ("closed_form", "ode")


def check_times(times: Any) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(times, dtype=float))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`times` must be a non-empty 1-D array, got shape {arr.shape}.")
    _validate.nonneg("times", arr)
    if np.any(np.diff(arr) <= 0):
        raise ValueError("`times` must be strictly increasing, e.g. np.linspace(0, T, 20) "
                         "or np.geomspace(1e-2, T, 20); sort them and drop duplicates.")
    return arr


# --------------------------------------------------------------------------- flow

@jax.jit
def _flow_closed_form(A, sw, Y, times):
    """``c(t) = S Q diag(-expm1(-e t / n) / e) Q^T ybar`` for each t (e = 0: t / n)."""
    n = Y.shape[0]
    e, Q = jnp.linalg.eigh(A)
    e = jnp.maximum(e, 0.0)
    proj = Q.T @ joint.ybar(Y, A.shape[0])
    pos = e > 0
    e_safe = jnp.where(pos, e, 1.0)

    def at(t):
        phi = jnp.where(pos, -jnp.expm1(-e_safe * t / n) / e_safe, t / n)
        return sw[:, None] * (Q @ (phi[:, None] * proj))

    return jax.vmap(at)(times)


@functools.partial(jax.jit, static_argnums=1)
def _linear_rate(A, n: int):
    """``e_max(A) / n`` for ``A = S Kfull S + n lam I``: the linear flow's fastest rate."""
    return jnp.linalg.eigvalsh(A)[-1] / n


def flow_rate(Kfull: Array, n: int, kappa: float, ridge: float) -> float:
    """The fastest rate of the output-penalty flow, ``lambda_max(S Kfull S)/n + lam``.

    Gradient descent with step lr follows the flow for ``lr * rate << 1`` and is
    stable below 2. ``Kfull``: the joint Gram ``(N, N)``; n training points.
    """
    Kfull = jnp.asarray(Kfull)
    N = Kfull.shape[0]
    sw = joint.sqrt_weights(n, N, jnp.asarray(kappa, Kfull.dtype), Kfull.dtype)
    A = sw[:, None] * Kfull * sw[None, :] + n * ridge * jnp.eye(N, dtype=Kfull.dtype)
    return float(_linear_rate(A, int(n)))


@functools.partial(jax.jit, static_argnums=2)
def _stiffness(Kfull, A, n: int):
    """``e_max(S Kfull S + n lam I) / n`` (the linear flow's rate) and ``e_max(Kfull)``."""
    return _linear_rate(A, n), jnp.linalg.eigvalsh(Kfull)[-1]


@functools.partial(jax.jit, static_argnums=6)
def _flow_ode(Kfull, Y, ridge, kappa, times, rate_linear, penalty: str, step_scale,
              lam_max_K, max_steps):
    """RK4 integration of ``dc/dt = -(grad_u Jdata(Kfull c) + lam c)`` from c = 0.

    The step is ``h = step_scale / rate(c)``, with ``rate`` a bound on the spectral
    radius of the Jacobian: ``e_max(S Kfull S + n lam I) / n`` for the (linear)
    output penalty; ``lam_max(Kfull) max_i (1 + kappa (|e_i| + |grad f(x_i)|)^2) / n +
    lam`` for the loss penalty (the per-point Hessian of Jdata is bounded by that).
    ``penalty="mse"`` is kappa = 0 with ``Kfull = K`` (n x n, values only):
    ``dc/dt = -(1/n) [(K + n lam I) c - y]``.
    Each requested time is hit exactly (the last step of an interval is shortened).
    """
    n, r = Y.shape

    def rhs(c):
        u = Kfull @ c
        if penalty == "mse":                          # kappa = 0 on the n x n Gram K
            return -((u - Y) / n + ridge * c)
        return -(jax.grad(penalty_mod.joint_objective)(u, Y, kappa, penalty)
                     + ridge * c)

    def rate(c):
        if penalty in ("output", "mse"):
            return rate_linear
        u = Kfull @ c
        e = jnp.linalg.norm(u[:n] - Y, axis=1)
        g = jnp.linalg.norm(u[n:].reshape(n, -1), axis=1)
        return lam_max_K * jnp.max(1.0 + kappa * (e + g) ** 2) / n + ridge

    def rk4(c, h):
        k1 = rhs(c)
        k2 = rhs(c + 0.5 * h * k1)
        k3 = rhs(c + 0.5 * h * k2)
        k4 = rhs(c + h * k3)
        return c + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

    def advance(carry, t_target):
        def cond(st):
            c, t, steps = st
            return (t < t_target) & (steps < max_steps)

        def body(st):
            c, t, steps = st
            remaining = t_target - t
            h_max = step_scale / rate(c)
            last = h_max >= remaining
            h = jnp.where(last, remaining, h_max)
            return rk4(c, h), jnp.where(last, t_target, t + h), steps + 1

        c, t, steps = jax.lax.while_loop(cond, body, carry)
        return (c, t, steps), c

    c0 = jnp.zeros((Kfull.shape[0], r), Kfull.dtype)
    (c, t, steps), cs = jax.lax.scan(advance, (c0, jnp.zeros((), Kfull.dtype), 0), times)
    return cs, steps, t


def _flow_values_only(k: Kernel, X, Y, y, scalar: bool, ridge: float, times: np.ndarray,
                      penalty: str, method: str, step_scale: float, max_steps: int
                      ) -> PenalizedPath:
    """:func:`kernel_flow` at kappa = 0 on the n x n Gram (MSE gradient flow).

    ``dc/dt = -(1/n) [(K + n lam I) c - y]`` from c = 0 for the value coefficients;
    the derivative coefficients stay 0. Closed form by ``eigh`` of ``K + n lam I``
    (the joint closed form with S = diag(1 (n), 0 (n d)) restricted to its value
    block), or RK4 on the n-dim system.
    """
    n, shape, dt = X.shape[0], X.shape[1:], X.dtype
    _validate.fits_in_memory(f"kernel_flow at kappa = 0 (the n x n Gram for n={n})",
                             4 * n * n, dt.itemsize, "Subsample the training set "
                             "(ntk_poison.data.subset).")
    A = krr.gram_plus_ridge(k, X, jnp.asarray(n * ridge, dt))
    A = 0.5 * (A + A.T)
    tj = jnp.asarray(times.astype(dt))
    info: Tuple[Tuple[str, Any], ...] = (("method", method), ("gram", "n x n (kappa = 0)"))
    if method == "closed_form":
        cs = _flow_closed_form(A, jnp.ones((n,), dt), Y, tj)
    else:
        K = A - n * ridge * jnp.eye(n, dtype=dt)
        e_max = float(jnp.linalg.eigvalsh(A)[-1])
        rate_lin = e_max / n
        if times[-1] * rate_lin / step_scale > max_steps:
            raise ValueError(
                f"The ODE needs about {times[-1] * rate_lin / step_scale:.3g} RK4 steps "
                f"(stiffness {rate_lin:.3g}, t_max {times[-1]:g}), over max_steps="
                f"{max_steps}. Use method=\"closed_form\", smaller times, or raise "
                "max_steps.")
        cs, steps, t_end = _flow_ode(K, Y, jnp.asarray(ridge, dt), jnp.asarray(0.0, dt),
                                     tj, jnp.asarray(rate_lin, dt), "mse",
                                     jnp.asarray(step_scale, dt), jnp.asarray(e_max, dt),
                                     int(max_steps))
        if float(t_end) < times[-1]:
            raise ValueError(
                f"The ODE reached t = {float(t_end):.4g} < {times[-1]:g} within "
                f"max_steps={max_steps} RK4 steps. Ask for smaller times or raise max_steps.")
        info = info + (("steps", int(steps)),)
    T, r = cs.shape[0], Y.shape[1]
    alphas = cs[..., 0] if scalar else cs
    betas = jnp.zeros((T, n) + tuple(shape) + (() if scalar else (r,)), dt)
    return PenalizedPath(kernel=k, X=X, y=y, alpha=alphas, beta=betas,
                         kappas=jnp.zeros((T,), dt), times=tj, ridge=ridge,
                         penalty=penalty, info=info)


def kernel_flow(k: Kernel, X: Array, y: Array, ridge: float, kappa: float, times: Any, *,
                penalty: str = "output", method: Optional[str] = None,
                step_scale: float = 0.05, max_steps: int = 1_000_000) -> PenalizedPath:
    """Kernel gradient flow of the penalised objective from f = 0 (THEORY.md section 3).

    The gradient flow ``dw/dt = -grad_w J`` of the linearised model ``f = phi^T w``,
    ``w(0) = 0``, in the joint representer coefficients c (module docstring)::

        dc/dt = -(grad_u Jdata(Kfull c) + lam c)
        output penalty: dc/dt = -(1/n) [(W Kfull + n lam I) c - [y; 0]]

    Time is in units of learning rate 1 on J as written. As t -> inf the flow reaches
    the minimiser of :func:`fit_penalized`; at kappa = 0 the test predictions equal
    neural-tangents' ``gradient_descent_mse(K, y, learning_rate=1, diag_reg=n*lam,
    diag_reg_absolute_scale=True)`` at the same t (module docstring).

    Args:
      k, X, y, ridge, kappa: as :func:`fit_penalized`.
      times: strictly increasing times >= 0.
      penalty: "output" or "loss".
      method: "closed_form" (output penalty: ``eigh`` of ``S Kfull S + n lam I``) or
        "ode" (jit-compiled RK4 in ``lax.while_loop``; the only option for "loss").
        Default: closed form for "output", ODE for "loss".
      step_scale: the RK4 step times the stiffness bound (0.05 keeps the error per
        unit amplitude near 1e-8).
      max_steps: a cap on RK4 steps; over it the call raises ValueError.

    Returns:
      A :class:`PenalizedPath`: ``.times``, ``.predict(x) -> (T, m)``,
      ``.input_grad(x) -> (T, m, *s)``, ``.at(i)`` a model at time index i. Cost:
      O(n^2 d^2) memory, O(N^3) time plus O(N^2) per time (closed form) or per RK4
      stage (ODE), N = n(1+d).

    At kappa = 0 both penalties vanish and the flow is plain MSE gradient flow,
    which needs only the n x n Gram K (the derivative block decouples, beta = 0)::

        c(t) = Q diag((1 - exp(-e t / n)) / e) Q^T y,    K + n lam I = Q diag(e) Q^T

    so no joint Gram is built: O(n^2) memory, O(n^3) time plus O(n^2) per time
    (closed form, for either penalty) or per RK4 stage (ODE, the n-dim system).
    ``beta`` is returned as zeros of the usual shape.
    """
    k, X, Y, y, scalar, ridge = joint.check_problem(k, X, y, ridge)
    kappa = _validate.scalar("kappa", kappa)
    penalty = penalty_mod.check_penalty(penalty)
    times = check_times(times)
    if method is None:
        method = "closed_form" if penalty == "output" else "ode"
    method = _validate.choice("method", method, _METHODS)
    if method == "closed_form" and penalty == "loss":
        raise ValueError("The loss-penalty flow is nonlinear and has no closed form; use "
                         "method=\"ode\" (the default for penalty=\"loss\").")
    _validate.nonneg("step_scale", step_scale, positive=True)
    _validate.nonneg("max_steps", max_steps, integer=True, positive=True)
    if kappa == 0.0:
        return _flow_values_only(k, X, Y, y, scalar, ridge, times, penalty, method,
                                 step_scale, max_steps)
    joint.warn_if_not_smooth(k, X)
    joint.check_joint_memory(X, "kernel_flow")
    n, shape, dt = X.shape[0], X.shape[1:], X.dtype
    Kfull, A, sw = joint.exact_system(k, X, jnp.asarray(ridge, dt), jnp.asarray(kappa, dt))
    tj = jnp.asarray(times.astype(dt))
    info: Tuple[Tuple[str, Any], ...] = (("method", method),)
    if method == "closed_form":
        cs = _flow_closed_form(A, sw, Y, tj)
    else:
        rate, lam_max_K = _stiffness(Kfull, A, n)
        rate_lin = float(rate)
        if penalty == "output" and times[-1] * rate_lin / step_scale > max_steps:
            raise ValueError(
                f"The ODE needs about {times[-1] * rate_lin / step_scale:.3g} RK4 steps "
                f"(stiffness {rate_lin:.3g}, t_max {times[-1]:g}), over max_steps="
                f"{max_steps}. Use method=\"closed_form\", smaller times, or raise "
                "max_steps.")
        cs, steps, t_end = _flow_ode(Kfull, Y, jnp.asarray(ridge, dt), jnp.asarray(kappa, dt),
                                     tj, rate, penalty, jnp.asarray(step_scale, dt),
                                     lam_max_K, int(max_steps))
        if float(t_end) < times[-1]:
            raise ValueError(
                f"The ODE reached t = {float(t_end):.4g} < {times[-1]:g} within "
                f"max_steps={max_steps} RK4 steps. Ask for smaller times or raise max_steps.")
        info = info + (("steps", int(steps)),)
    alphas, betas = joint.unpack(cs, shape, scalar)
    return PenalizedPath(kernel=k, X=X, y=y, alpha=alphas, beta=betas,
                         kappas=jnp.asarray(np.full(len(times), kappa, dt)), times=tj,
                         ridge=ridge, penalty=penalty, info=info)


def flow_pair(k: Kernel, X: Array, y: Array, Xp: Array, yp: Array, ridge: float,
              times: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Dual weights of a poisoned and the clean MSE gradient flow at ``times``.

    Both by :func:`kernel_flow` at kappa = 0 (the n x n closed form). The poisoned
    flow trains on the n = N + m points of ``(Xp, yp)`` at relative ridge lam. The
    clean flow trains on the N clean points with the same ABSOLUTE ridge n lam
    (relative ``n lam / N``); kernel_flow normalises its loss by 1/N where the
    poisoned flow has 1/n, so the clean flow's clock runs at ``t N / n``: then both
    solve ``dc/dt = -(1/n) [(K + n lam I) c - y]`` and reach the KRR models at the
    same ridge as t -> inf. Returns ``(T, n)`` and ``(T, N)`` float64 arrays.
    """
    N, n = len(X), len(Xp)
    times = np.asarray(times, float)
    pois = kernel_flow(k, Xp, yp, ridge, 0.0, times)
    clean = kernel_flow(k, X, y, ridge * n / N, 0.0, times * N / n)
    return np.asarray(pois.alpha, np.float64), np.asarray(clean.alpha, np.float64)


# --------------------------------------------------------------------------- contraction

def joint_coordinates(k: Kernel, X: Array, rtol: float = 1e-12):
    """Orthonormal coordinates of the joint span: ``Kfull = U s U^T`` (numpy, float64),
    numerically null directions (``s <= rtol s_max``) dropped. Returns (Kfull, U, s)."""
    Kf = np.asarray(joint.joint_gram(k, X), np.float64)
    s, U = np.linalg.eigh(0.5 * (Kf + Kf.T))
    keep = s > rtol * s.max()
    return Kf, U[:, keep], s[keep]


def functional_coefficients(model: Any, x0: Array, u: Array):
    """b with ``b . c = u . grad f(x0)`` for ``f = [k(., X), d k(., X)] c``, and the
    coefficient vector c of the penalised ``model`` (both flattened point-major, like
    ``joint.joint_gram``)."""

    def g(alpha, beta):
        f = dataclasses.replace(model, alpha=alpha, beta=beta).as_function()
        return jnp.vdot(jnp.asarray(u), jax.grad(f)(jnp.asarray(x0)))
    ba, bb = jax.grad(g, argnums=(0, 1))(model.alpha, model.beta)
    c = np.r_[np.asarray(model.alpha).ravel(), np.asarray(model.beta).ravel()]
    return np.r_[np.asarray(ba).ravel(), np.asarray(bb).ravel()], c


def penalty_curvature(U: np.ndarray, s: np.ndarray, n: int, b: np.ndarray) -> float:
    """``a = v^T (Phi_g^T Phi_g / n) v`` for the unit representer v of the functional b:
    the curvature of the penalty along the poison-aligned direction."""
    v = (U.T @ b) / np.sqrt(s)
    g = (U[n:] * np.sqrt(s)[None]) @ (v / np.linalg.norm(v))
    return float(g @ g / n)


def contraction(U: np.ndarray, s: np.ndarray, n: int, y: np.ndarray, ridge: float,
                kappa: float, b: np.ndarray, c0: np.ndarray, times: np.ndarray) -> dict:
    """The penalised flow from coefficients ``c0``, in theta coordinates (module doc).

    Returns the energy ``E(t) = (v^ . (theta(t) - theta*))^2`` of the unit
    poison-aligned direction v^ (the representer of b), the functional's value
    ``u . grad f(x0)(t)`` (``g``) and its limit, the naive comparison
    ``E(0) exp(-2 kappa a t)`` (``bound``; not a theorem: v^ need not be an
    eigenvector of H), its largest ratio and first violation, the weight of v^ on H's
    modes slower than kappa a (``slow_weight``), the fitted early decay rate, and the
    Rayleigh quotient ``v^T H v``.
    """
    Phi = U * np.sqrt(s)[None]                       # (N, r) features of the functionals
    Pv, Pg = Phi[:n], Phi[n:]
    Gp = Pg.T @ Pg / n                               # the penalty's curvature (per kappa)
    H = Pv.T @ Pv / n + kappa * Gp + ridge * np.eye(len(s))
    h, W = np.linalg.eigh(0.5 * (H + H.T))
    theta_star = W @ ((W.T @ (Pv.T @ y / n)) / h)
    theta0 = np.sqrt(s) * (U.T @ c0)
    v = (U.T @ b) / np.sqrt(s)                       # v . theta = u . grad f(x0)
    vh = v / np.linalg.norm(v)
    a = float(vh @ Gp @ vh)
    dv = W.T @ vh
    d0 = W.T @ (theta0 - theta_star)
    proj = (np.exp(-np.outer(times, h)) * (dv * d0)[None]).sum(1)     # vh . delta(t)
    E = proj ** 2
    g = np.linalg.norm(v) * (proj + vh @ theta_star)                  # u . grad f(x0)(t)
    bound = E[0] * np.exp(-2 * kappa * a * np.asarray(times))
    n_fit = max(3, len(times) // 4)                  # the early decay: first quarter
    sel = (E > 1e-300)[:n_fit]
    rate = None
    if sel.sum() >= 3:
        rate = float(-np.polyfit(times[:n_fit][sel], np.log(E[:n_fit][sel]), 1)[0] / 2)
    viol = np.flatnonzero(E[1:] > bound[1:] * (1 + 1e-9))
    return dict(kappa=kappa, a=a, times=np.asarray(times), energy=E, bound=bound, g=g,
                g_inf=float(np.linalg.norm(v) * (vh @ theta_star)),
                max_ratio=(float(np.max(E[1:] / np.maximum(bound[1:], 1e-300)))
                           if len(E) > 1 else float("nan")),
                first_violation=None if viol.size == 0 else float(times[1 + viol[0]]),
                slow_weight=float(np.sum(dv[h < kappa * a] ** 2)),
                rate=rate, rate_bound=kappa * a,
                rayleigh=float(vh @ H @ vh))


# --------------------------------------------------------------------------- old names

_MOVED = {
    "fit_penalized": "penalized", "fit_penalized_sweep": "penalized",
    "fit_restricted": "penalized", "effective_dof": "penalized",
    "PenalizedModel": "penalized", "PenalizedPath": "penalized",
    "joint_gram": "joint", "NonSmoothKernelWarning": "joint",
    "ConvergenceWarning": "linalg", "PENALTIES": "penalty",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        mod = _MOVED[name]
        warnings.warn(f"ntk_poison.flow.{name} moved to ntk_poison.{mod}.{name}; the old "
                      "name is a deprecated alias and goes in the next release.",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"ntk_poison.{mod}"), name)
    raise AttributeError(f"module 'ntk_poison.flow' has no attribute {name!r}")
