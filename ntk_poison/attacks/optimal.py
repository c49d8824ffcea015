"""The optimal invisible clone poison in the exact kernel model (issue 13; THEORY.md
section 2).

The attacker adds ``m`` clones of ``(zeta, y_t)`` to the clean set ``(X, y)`` (N
points) and the model is KRR at the absolute ridge ``n*lam``, ``n = N + m`` (the
project's convention, as in :func:`ntk_poison.theory.clone_law`). The attacker's
problem is::

    maximise_{zeta, m}  E(zeta, m) = mean_i eff_i(zeta, m)            over triggered x_i
    subject to          V_i(zeta, m) <= tau  for every i             (invisible)
                        |zeta - anchor|_inf <= radius, zeta in box   (a box around an image)

* ``eff_i``: scalar targets: ``y_t * Delta f(x_i)``; vector (centred one-hot,
  all-to-one) targets: the poisoned model's target-class margin
  ``f_t(x_i) - max_{c != t} f_c(x_i)`` (optimised through its smooth version
  ``f_t - T logsumexp_{c != t}(f_c / T)``, a lower bound within ``T log(C - 1)``).
* ``V_i``: the curvature detector's score at ``x_i`` under the poisoned model
  (:class:`ntk_poison.defences.CurvatureDetector`): the top eigenvalue of the loss
  input-Hessian ``hess_x 1/2 |f(x) - yhat|^2`` at the model's own pseudo-label
  ``yhat`` (``sign f`` for a scalar output, the centred one-hot row of ``argmax f``
  for C outputs). ``yhat`` is piecewise constant in zeta, so it is held fixed
  (``stop_gradient``) when differentiating.
* ``tau``: the clean model's q-quantile of that score over clean inputs
  (:func:`clean_threshold`, the detector's threshold at FPR ``1 - q``).

**The exact poisoned model, no refit** (block elimination; THEORY.md section 2). With
``A = K + n lam I`` (N x N, clean), ``v = A^-1 k(X, zeta)``, ``a = A^-1 y``::

    s2 = k(zeta, zeta) - k(zeta, X) v,      fc = v . y,
    w  = m (y_t - fc) / (n lam + m s2)                 (the clones' summed dual weight)
    f_poisoned(x) = k(x, X) (a - v w) + w k(x, zeta)  = f_clean(x) + w kt(x, zeta)

``kt(x, zeta) = k(x, zeta) - k(x, X) v`` the posterior covariance. ``A`` changes with
m only through the shift ``n lam``, so :func:`prepare` (a :class:`CloneSolver`) takes
the eigendecomposition ``K = U diag(e) U^T`` once (O(N^3)) and every solve at any m is
``U diag(1 / (e + n lam)) U^T b``: O(N^2) per m and per zeta, jax-differentiable in
zeta (and in m, which enters as a float). The poisoned prediction is a
:class:`ntk_poison.krr.KernelFunction` on ``[X; zeta]`` with weights
``[a - v w; w]`` (:meth:`CloneSolver.function`), the same function as
:func:`ntk_poison.krr.clone_model` of a refit.

**Visibility and its gradient.** ``method="dense"``: ``jax.hessian`` of the loss at
each point, ``eigvalsh``, the top value; differentiable through ``eigh`` (exact for a
simple top eigenvalue; O(d^3) per point, fine for d <= ~800 and a few points).
``method="lanczos"``: the top eigenvector ``u`` by block Lanczos on Hessian-vector
products (:func:`ntk_poison.spectra.lanczos_hessian`, converged to the dtype's
tolerance) at ``stop_gradient(zeta)``, then ``V = u^T H(zeta) u`` by one
Hessian-vector product: its value is the Ritz value and its zeta-gradient is the
Hellmann-Feynman derivative ``u^T (dH/dzeta) u`` of a simple top eigenvalue. O(iters
N d) per point, no d x d matrix. The Rayleigh quotient of any unit u is a lower bound
on the top eigenvalue, so a Lanczos run stopped by its iteration cap (no warning is
issued inside the optimiser) under-states the visibility; the dense method, or
:class:`~ntk_poison.defences.CurvatureDetector` on the refitted model, is the check.
Both methods assume a simple top eigenvalue (at a crossing the gradient is one
one-sided derivative).

**The optimiser** (:func:`optimal_poison`). For each m: projected Adam on the
augmented Lagrangian (constraints ``g_i = V_i / tau - 1 <= 0``)::

    L(zeta; mu, rho) = -E_smooth(zeta) + (1 / 2 rho) sum_i [max(0, mu_i + rho g_i)^2 - mu_i^2]

with the multipliers updated ``mu_i <- max(0, mu_i + rho g_i)`` every ``inner`` steps
(``method="penalty"``: ``mu = 0`` and ``rho`` doubled instead), each step followed by
the projection on ``[max(anchor - radius, lo), min(anchor + radius, hi)]``. The best
FEASIBLE iterate (highest exact efficacy with every ``V_i <= tau``) is kept.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_poison import _validate, linalg, metrics, spectra
from ntk_poison.kernels import Kernel
from ntk_poison.krr import KernelFunction, as_inputs, check_kernel

Array = Any

__all__ = ["CloneSolver", "prepare", "poisoned_outputs", "efficacy", "visibility",
           "clean_threshold", "optimal_poison", "OptimalPoison", "frontier"]

_VIS_METHODS = ("dense", "lanczos")
_OPT_METHODS = ("auglag", "penalty")


# --------------------------------------------------------------------------- the solver

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["X", "y", "evals", "evecs"], meta_fields=["kernel", "ridge"])
@dataclasses.dataclass(frozen=True)
class CloneSolver:
    """The clean factorisation for every clone count (an immutable pytree).

    ``K = k(X, X) = U diag(e) U^T``; ``(K + mu I)^-1 b = U ((U^T b) / (e + mu))``.

    Attributes:
      kernel: the kernel (static).
      X: clean inputs ``(N, *s)``; y: clean targets ``(N,)`` or ``(N, C)``.
      evals: ``e (N,)``; evecs: ``U (N, N)``.
      ridge: the relative ridge lam > 0 (absolute ``(N + m) lam``; static).
    """

    kernel: Kernel
    X: jax.Array
    y: jax.Array
    evals: jax.Array
    evecs: jax.Array
    ridge: float

    @property
    def n_clean(self) -> int:
        return int(self.X.shape[0])

    @property
    def multi(self) -> bool:
        return self.y.ndim == 2

    def solve(self, m: Any, b: jax.Array) -> jax.Array:
        """``(K + (N + m) lam I)^-1 b`` for ``b (N,)`` or ``(N, r)``; O(N^2 r)."""
        shift = (self.n_clean + m) * self.ridge
        inv = 1.0 / (self.evals + shift)
        c = self.evecs.T @ b
        c = c * (inv if b.ndim == 1 else inv[:, None])
        return self.evecs @ c

    def weights(self, zeta: jax.Array, m: Any, y_target: Any
                ) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """``(a - v w, w, v)``: the clean points' and the clones' (summed) dual weights of
        the poisoned model, and ``v = A^-1 k(X, zeta)`` (module docstring)."""
        k = self.kernel
        kz = k.fn(self.X, zeta[None])[:, 0]
        kzz = k.pair(zeta, zeta)
        shift = (self.n_clean + m) * self.ridge
        vy = self.solve(m, jnp.concatenate([kz[:, None], self.y.reshape(
            self.n_clean, -1)], axis=1))
        v, a = vy[:, 0], vy[:, 1:]
        s2 = kzz - kz @ v
        fc = v @ self.y                                   # () or (C,)
        w = m * (y_target - fc) / (shift + m * s2)
        if self.multi:
            return a - v[:, None] * w[None], w, v
        return a[:, 0] - v * w, w, v

    def function(self, zeta: jax.Array, m: Any, y_target: Any) -> KernelFunction:
        """The poisoned model's prediction (of ONE input) as a KernelFunction on
        ``[X; zeta]``; ``.batched``-callable through :meth:`outputs`."""
        ac, w, _ = self.weights(zeta, m, y_target)
        return KernelFunction(self.kernel, jnp.concatenate([self.X, zeta[None]]),
                              jnp.concatenate([ac, w[None]]))

    def outputs(self, zeta: jax.Array, m: Any, y_target: Any, x: jax.Array) -> jax.Array:
        """``f_poisoned(x)`` at a batch ``x (P, *s)``: ``(P,)`` or ``(P, C)``."""
        fn = self.function(zeta, m, y_target)
        return dataclasses.replace(fn, batched=True)(x)

    def delta(self, zeta: jax.Array, m: Any, y_target: Any, x: jax.Array) -> jax.Array:
        """``Delta f(x) = w kt(x, zeta)`` against the clean fit at the same ridge."""
        _, w, v = self.weights(zeta, m, y_target)
        kt = self.kernel.fn(x, zeta[None])[:, 0] - self.kernel.fn(x, self.X) @ v
        return kt[:, None] * w[None] if self.multi else kt * w


def prepare(k: Kernel, X: Array, y: Array, ridge: float) -> CloneSolver:
    """The :class:`CloneSolver` of a clean set: one eigendecomposition of ``k(X, X)``.

    Args:
      k: the kernel; X: clean inputs ``(N, *s)``; y: float targets ``(N,)`` or ``(N, C)``.
      ridge: relative ridge lam > 0 (absolute ``(N + m) lam`` for m clones).
    """
    k = check_kernel(k)
    X = as_inputs(k, "X", X)
    _validate.array("y", y, ndim=(1, 2), floating=True)
    _validate.same_rows("X", X, "y", y)
    if X.shape[0] == 0:
        raise ValueError("`X` is empty; pass at least one clean training point.")
    _validate.nonneg("ridge", ridge, positive=True)
    if np.ndim(ridge) != 0:
        raise ValueError(f"`ridge` must be a scalar, got shape {np.shape(ridge)}.")
    N = X.shape[0]
    _validate.fits_in_memory(f"The Gram matrix and its eigenvectors for N={N}", 3 * N * N,
                             X.dtype.itemsize, "Subsample the clean training set.")
    dtype = jnp.result_type(X.dtype, jnp.asarray(y).dtype)
    X = X.astype(dtype)
    K = k.fn(X, X)
    e, U = jnp.linalg.eigh(0.5 * (K + K.T))
    return CloneSolver(kernel=k, X=X, y=jnp.asarray(y, dtype), evals=e, evecs=U,
                       ridge=float(ridge))


# --------------------------------------------------------------------------- validation

def _solver_for(k, X, y, ridge, solver) -> CloneSolver:
    if solver is None:
        return prepare(k, X, y, ridge)
    if not isinstance(solver, CloneSolver):
        raise ValueError(f"`solver` must be a CloneSolver from prepare(k, X, y, ridge) or "
                         f"None, got {type(solver).__name__}.")
    return solver


def _check_target(s: CloneSolver, y_target: Any) -> jax.Array:
    _validate.array("y_target", y_target)
    if s.multi and np.shape(y_target) != tuple(s.y.shape[1:]):
        raise ValueError(f"`y_target` has shape {np.shape(y_target)}; for targets `y` of "
                         f"shape {tuple(s.y.shape)} pass the poison's target row, of "
                         f"shape {tuple(s.y.shape[1:])}.")
    if not s.multi and np.ndim(y_target) != 0:
        raise ValueError("`y_target` must be a scalar for scalar targets y of shape (N,).")
    return jnp.asarray(y_target, s.y.dtype)


def _check_zeta(s: CloneSolver, name: str, zeta: Any) -> jax.Array:
    z = as_inputs(s.kernel, name, zeta, single_ok=True)
    if z.shape[0] != 1 or np.ndim(zeta) != s.kernel.input_rank:
        raise ValueError(f"`{name}` must be ONE input of shape {tuple(s.X.shape[1:])}, got "
                         f"shape {np.shape(zeta)}.")
    _validate.same_trailing(name, z, "X", s.X, s.kernel.input_rank)
    return z[0].astype(s.X.dtype)


def _check_points(s: CloneSolver, name: str, x: Any) -> Tuple[jax.Array, bool]:
    single = np.ndim(x) == s.kernel.input_rank
    x = as_inputs(s.kernel, name, x, single_ok=True)
    _validate.same_trailing(name, x, "X", s.X, s.kernel.input_rank)
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` is empty; pass at least one point.")
    return x.astype(s.X.dtype), single


def _check_m(m: Any) -> Any:
    if np.ndim(m) != 0:
        raise ValueError(f"`m` must be a scalar clone count, got shape {np.shape(m)}.")
    _validate.nonneg("m", m)
    return m


def _target_class(s: CloneSolver, y_target: jax.Array, target_class: Optional[int]):
    if not s.multi:
        return None
    C = int(s.y.shape[1])
    if target_class is None:
        if not _validate.is_concrete(y_target):
            raise ValueError("`target_class` must be given when `y_target` is traced.")
        return int(np.argmax(np.asarray(y_target)))
    if not _validate.is_int_scalar(target_class) or not 0 <= target_class < C:
        raise ValueError(f"`target_class` must be an int in [0, {C}), got {target_class!r}.")
    return int(target_class)


# --------------------------------------------------------------------------- pure pieces

class _Spec(NamedTuple):
    """The static description of an objective (hashable: a jit static argument)."""
    method: str                  # visibility: "dense" | "lanczos"
    target: Optional[int]        # target class (vector outputs) or None (scalar)
    temperature: float           # smooth-margin temperature (vector outputs)
    shape: Tuple[int, ...]       # one input's shape
    plan: Any = None             # LanczosPlan (lanczos)


def _efficacy_points(s: CloneSolver, zeta, m, y_target, x, spec: _Spec, smooth: bool):
    """Per-point efficacy: ``y_t Delta f`` (scalar) or the target margin (vector)."""
    if spec.target is None:
        return y_target * s.delta(zeta, m, y_target, x)
    f = s.outputs(zeta, m, y_target, x)
    t = spec.target
    ft = f[:, t]
    others = jnp.where(jnp.arange(f.shape[1]) == t, -jnp.inf, f)
    if smooth:
        T = spec.temperature
        return ft - T * jax.nn.logsumexp(others / T, axis=1)
    return ft - jnp.max(others, axis=1)


def _pseudo_labels(f: jax.Array) -> jax.Array:
    """The detector's labels: ``sign f`` (+1 at 0) or the centred one-hot of argmax."""
    f = jax.lax.stop_gradient(f)
    if f.ndim == 1:
        return jnp.where(f >= 0, 1.0, -1.0).astype(f.dtype)
    C = f.shape[1]
    return jax.nn.one_hot(jnp.argmax(f, axis=1), C, dtype=f.dtype) - 1.0 / C


def _losses(s, zeta, m, y_target, x):
    fn = s.function(zeta, m, y_target)
    yl = _pseudo_labels(dataclasses.replace(fn, batched=True)(x))
    return fn, yl


def _top_vectors(s: CloneSolver, zeta, m, y_target, x, start, tol, spec: _Spec):
    """Top eigenvectors ``(P, d)`` of the loss input-Hessians (Lanczos, no gradient)."""
    fn, yl = _losses(s, zeta, m, y_target, x)
    P = x.shape[0]

    def one(args):
        xi, yi = args
        out = spectra.lanczos_hessian(spectra.LossFunction(fn, yi), xi.reshape(-1), start,
                                      tol, spec.shape, 1, "LA", spec.plan)
        return out[1][0]

    return jax.lax.map(one, (x.reshape(P, -1), yl))


def _visibility_points(s: CloneSolver, zeta, m, y_target, x, u, spec: _Spec):
    """Per-point top eigenvalue of the loss input-Hessian (module docstring)."""
    fn, yl = _losses(s, zeta, m, y_target, x)
    P = x.shape[0]
    xf = x.reshape(P, -1)

    def loss(yi):
        return spectra.LossFunction(spectra.flat_function(fn, spec.shape), yi)

    if spec.method == "dense":
        def one(xi, yi):
            H = jax.hessian(loss(yi))(xi)
            return jnp.linalg.eigvalsh(0.5 * (H + H.T))[-1]
        return jax.vmap(one)(xf, yl)

    def rayleigh(xi, yi, ui):
        Hu = jax.jvp(jax.grad(loss(yi)), (xi,), (ui,))[1]
        return ui @ Hu

    return jax.vmap(rayleigh)(xf, yl, jax.lax.stop_gradient(u))


_outputs_jit = jax.jit(lambda s, zeta, m, y_target, x: s.outputs(zeta, m, y_target, x))
_efficacy_jit = jax.jit(_efficacy_points, static_argnames=("spec", "smooth"))
_visibility_jit = jax.jit(_visibility_points, static_argnames=("spec",))


@functools.partial(jax.jit, static_argnames=("spec",))
def _top_vectors_jit(s, zeta, m, y_target, x, start, tol, spec):
    return _top_vectors(s, zeta, m, y_target, x, start, tol, spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _evaluate(s, zeta, m, y_target, x, u, spec):
    eff = _efficacy_points(s, zeta, m, y_target, x, spec, smooth=False)
    vis = _visibility_points(s, zeta, m, y_target, x, u, spec)
    return eff, vis, s.outputs(zeta, m, y_target, x)


def _lagrangian(zeta, s, m, y_target, x, u, mult, rho, thr, spec):
    eff_s = _efficacy_points(s, zeta, m, y_target, x, spec, smooth=True)
    eff = _efficacy_points(s, zeta, m, y_target, x, spec, smooth=False)
    vis = _visibility_points(s, zeta, m, y_target, x, u, spec)
    g = vis / thr - 1.0
    pen = jnp.sum(jnp.maximum(0.0, mult + rho * g) ** 2 - mult ** 2) / (2.0 * rho)
    return -jnp.mean(eff_s) + pen, (eff, vis, g)


_lagrangian_grad = jax.jit(jax.value_and_grad(_lagrangian, has_aux=True),
                           static_argnames=("spec",))


class _Vis(NamedTuple):
    spec: _Spec
    start: Any
    tol: Any


def _vis_setup(s: CloneSolver, x: jax.Array, method: str, target, temperature, key, tol,
               max_iters) -> _Vis:
    _validate.choice("method", method, _VIS_METHODS)
    shape = tuple(int(a) for a in x.shape[1:])
    d = int(np.prod(shape))
    if method == "dense":
        _validate.fits_in_memory(f"The dense loss Hessians (P, d, d) = ({x.shape[0]}, {d}, "
                                 f"{d})", 4 * x.shape[0] * d * d, x.dtype.itemsize,
                                 "Use method='lanczos' (matrix-free).")
        return _Vis(_Spec("dense", target, float(temperature), shape), None, None)
    plan = linalg.lanczos_plan(d, 1, None, max_iters, x.dtype.itemsize)
    tol = _validate.default_tol(x.dtype) if tol is None else tol
    _validate.nonneg("tol", tol, positive=True)
    start = linalg.start_block(_validate.as_key(key), (2 * plan.b, d), x.dtype)
    return _Vis(_Spec("lanczos", target, float(temperature), shape, plan), start,
                jnp.asarray(tol, x.dtype))


def _vectors(s, zeta, m, y_target, x, vis: _Vis):
    if vis.spec.method == "dense":
        return None
    z = jax.lax.stop_gradient(zeta)
    return _top_vectors_jit(s, z, jax.lax.stop_gradient(m), y_target, x, vis.start,
                            vis.tol, vis.spec)


# --------------------------------------------------------------------------- public API

def poisoned_outputs(k: Kernel, X: Array, y: Array, ridge: float, zeta: Array, m: Any,
                     x: Array, *, y_target: Any, solver: Optional[CloneSolver] = None
                     ) -> jax.Array:
    """The exact prediction at ``x`` of KRR on ``X`` plus ``m`` clones of
    ``(zeta, y_target)`` at absolute ridge ``(N + m) lam`` (module docstring), by the
    rank-one update: O(N^2) given ``solver`` (:func:`prepare`; else it is built, O(N^3)).

    Differentiable in ``zeta`` (and ``m``, a float here). Returns ``(P,)`` / ``(P, C)``
    for a batch ``x (P, *s)``, ``()`` / ``(C,)`` for one input.
    """
    s = _solver_for(k, X, y, ridge, solver)
    yt = _check_target(s, y_target)
    z = _check_zeta(s, "zeta", zeta)
    xs, single = _check_points(s, "x", x)
    m = _check_m(m)
    out = _outputs_jit(s, z, jnp.asarray(m, s.X.dtype), yt, xs)
    return out[0] if single else out


def efficacy(k: Kernel, X: Array, y: Array, ridge: float, zeta: Array, m: Any,
             x_trig: Array, *, y_target: Any, target_class: Optional[int] = None,
             smooth: bool = False, temperature: float = 0.05,
             solver: Optional[CloneSolver] = None) -> jax.Array:
    """Per-point efficacy ``(P,)`` at the triggered points (module docstring): scalar
    targets ``y_t Delta f(x_i)``; vector targets the target margin
    ``f_t - max_{c != t} f_c`` of the poisoned model (``smooth``: ``f_t - T
    logsumexp_{c != t}(f_c / T)``, ``T = temperature``). ``target_class`` defaults to
    ``argmax y_target``. Differentiable in ``zeta``."""
    s = _solver_for(k, X, y, ridge, solver)
    yt = _check_target(s, y_target)
    z = _check_zeta(s, "zeta", zeta)
    xs, _ = _check_points(s, "x_trig", x_trig)
    _validate.nonneg("temperature", temperature, positive=True)
    spec = _Spec("dense", _target_class(s, y_target, target_class), float(temperature),
                 tuple(xs.shape[1:]))
    return _efficacy_jit(s, z, jnp.asarray(_check_m(m), s.X.dtype), yt, xs, spec=spec,
                         smooth=bool(smooth))


def visibility(k: Kernel, X: Array, y: Array, ridge: float, zeta: Array, m: Any,
               x: Array, *, y_target: Any, method: str = "dense", key: Any = 0,
               tol: Optional[float] = None, max_iters: Optional[int] = None,
               solver: Optional[CloneSolver] = None) -> jax.Array:
    """The curvature detector's score at each ``x`` under the poisoned model ``(P,)``:
    the top eigenvalue of ``hess_x 1/2 |f(x) - yhat|^2``, ``yhat`` the model's own
    pseudo-label (``sign f``; centred one-hot of ``argmax f``), as
    :class:`ntk_poison.defences.CurvatureDetector` computes it.

    Differentiable in ``zeta``: ``"dense"`` through ``eigvalsh``; ``"lanczos"`` by the
    Hellmann-Feynman derivative ``u^T (dH/dzeta) u`` at the Lanczos top vector ``u``
    (module docstring). ``key``, ``tol``, ``max_iters``: the Lanczos start block and
    stopping rule (:func:`ntk_poison.spectra.top_eigenpairs`).
    """
    s = _solver_for(k, X, y, ridge, solver)
    yt = _check_target(s, y_target)
    z = _check_zeta(s, "zeta", zeta)
    xs, _ = _check_points(s, "x", x)
    mm = jnp.asarray(_check_m(m), s.X.dtype)
    vis = _vis_setup(s, xs, method, None, 1.0, key, tol, max_iters)
    u = _vectors(s, z, mm, yt, xs, vis)
    return _visibility_jit(s, z, mm, yt, xs, u, spec=vis.spec)


def clean_threshold(k: Kernel, X: Array, y: Array, ridge: float, x_clean: Array,
                    q: float = 0.95, *, method: str = "dense") -> float:
    """The clean model's ``q``-quantile of the curvature score over clean inputs: the
    threshold :class:`ntk_poison.defences.CurvatureDetector` (FPR ``1 - q``) sets when
    fitted on KRR of the clean set (absolute ridge ``N lam``) and ``x_clean``."""
    from ntk_poison import krr
    from ntk_poison.defences import CurvatureDetector
    q = _validate.scalar("q", q)
    if not 0.0 < q < 1.0:
        raise ValueError(f"`q` must be in (0, 1) (the clean quantile), got {q}.")
    model = krr.fit(k, X, y, ridge)
    det = CurvatureDetector(k=1, method=method, fpr=1.0 - q).fit(model, x_clean)
    return float(det.threshold)


@dataclasses.dataclass(frozen=True)
class OptimalPoison:
    """The result of :func:`optimal_poison`.

    Attributes:
      zeta: the best poison input (feasible if any m found a feasible point).
      m: its clone count.
      efficacy: its mean efficacy over the triggered points (exact, not smoothed).
      visibility: its visibility at each triggered point ``(P,)``.
      asr: the fraction of triggered points sent to the target.
      feasible: every visibility <= threshold.
      per_m: ``ms (M,)``, ``zeta (M, *s)``, ``efficacy``, ``visibility_max``, ``asr``,
        ``feasible (M,)``, ``visibility (M, P)``, and the anchor's (start point's)
        ``efficacy_start``, ``visibility_max_start`` and ``asr_start``.
      history: ``efficacy``, ``visibility_max``, ``multiplier_max`` per step ``(M, steps + 1)``.
      threshold: the visibility threshold used.
    """

    zeta: np.ndarray
    m: int
    efficacy: float
    visibility: np.ndarray
    asr: float
    feasible: bool
    per_m: Dict[str, np.ndarray]
    history: Dict[str, np.ndarray]
    threshold: float


def _asr(f, y_target, target):
    f = np.asarray(f)
    if target is None:
        return float(metrics.attack_success_rate(f, float(y_target)))
    return float(metrics.attack_success_rate(f, target, multiclass=True))


def optimal_poison(k: Kernel, X: Array, y: Array, ridge: float, x_trig: Array,
                   anchor: Array, *, radius: float, y_target: Any, ms: Sequence[int],
                   threshold: float, steps: int = 100, lr: float = 0.01,
                   method: str = "auglag", box: Tuple[float, float] = (0.0, 1.0),
                   target_class: Optional[int] = None, rho: float = 10.0, inner: int = 10,
                   temperature: float = 0.05, vis_method: str = "lanczos", key: Any = 0,
                   solver: Optional[CloneSolver] = None) -> OptimalPoison:
    """The attacker's best invisible clone poison, for each m in ``ms`` (module
    docstring): maximise the mean efficacy over ``x_trig`` subject to every
    visibility <= ``threshold``, zeta in ``[anchor - radius, anchor + radius] cap box``.

    Args:
      k, X, y, ridge: the clean task (y ``(N,)`` or centred one-hot ``(N, C)``).
      x_trig: the triggered points ``(P, *s)``; anchor: the clean image zeta stays near.
      radius: the l_inf radius (>= 0; ``inf`` for the box only).
      y_target: the poison label (a float, or the ``(C,)`` target row).
      ms: clone counts (integers >= 1).
      threshold: the visibility bound tau > 0 (``inf``: unconstrained).
      steps, lr: projected Adam steps and learning rate per m.
      method: ``"auglag"`` (augmented Lagrangian) or ``"penalty"`` (quadratic penalty,
        rho doubled every ``inner`` steps).
      box: ``(lo, hi)`` pixel bounds (``(-inf, inf)`` for none).
      target_class: vector targets: the target class (default ``argmax y_target``).
      rho, inner: the penalty weight and the steps between multiplier updates.
      temperature: the smooth margin's temperature (vector targets).
      vis_method: ``"lanczos"`` (Hellmann-Feynman) or ``"dense"`` (module docstring).
      key: the Lanczos start block.
      solver: a :func:`prepare` result for ``(k, X, y, ridge)`` (built if None).

    Returns:
      An :class:`OptimalPoison`: the best feasible ``(zeta, m)`` by efficacy (if none
      is feasible, the point of least maximal violation, ``feasible=False``).
    """
    s = _solver_for(k, X, y, ridge, solver)
    yt = _check_target(s, y_target)
    xs, _ = _check_points(s, "x_trig", x_trig)
    a = np.asarray(_check_zeta(s, "anchor", anchor))
    _validate.choice("method", method, _OPT_METHODS)
    if np.ndim(radius) != 0 or not float(radius) >= 0.0:
        raise ValueError(f"`radius` must be a scalar >= 0 (inf: the box only), got "
                         f"{radius!r}.")
    r = float(radius)
    thr = float(threshold) if np.ndim(threshold) == 0 else None
    if thr is None or not thr > 0:
        raise ValueError(f"`threshold` must be a scalar > 0 (inf: unconstrained), got "
                         f"{threshold!r}; use clean_threshold(...).")
    ms_arr = np.atleast_1d(np.asarray(ms))
    if ms_arr.ndim != 1 or ms_arr.size == 0:
        raise ValueError("`ms` must be a non-empty 1-D sequence of clone counts.")
    _validate.nonneg("ms", ms_arr, integer=True, positive=True)
    steps = _validate.positive_int("steps", steps)
    inner = _validate.positive_int("inner", inner)
    _validate.nonneg("lr", lr, positive=True)
    _validate.nonneg("rho", rho, positive=True)
    _validate.nonneg("temperature", temperature, positive=True)
    if np.shape(box) != (2,) or not float(box[0]) < float(box[1]):
        raise ValueError(f"`box` must be a pair (lo, hi) with lo < hi, got {box!r}.")
    lo = np.maximum(a - r, float(box[0]))
    hi = np.minimum(a + r, float(box[1]))
    if np.any(lo > hi):
        raise ValueError("The l_inf ball of `radius` around `anchor` misses `box`; move the "
                         "anchor into the box or enlarge the radius.")
    target = _target_class(s, y_target, target_class)
    vis = _vis_setup(s, xs, vis_method, target, temperature, key, None, None)
    lo_j, hi_j = jnp.asarray(lo, s.X.dtype), jnp.asarray(hi, s.X.dtype)
    opt = optax.adam(float(lr))
    P = xs.shape[0]
    keys = ("efficacy", "visibility_max", "multiplier_max")
    per = {n: [] for n in ("zeta", "efficacy", "visibility", "visibility_max", "asr",
                           "feasible", "efficacy_start", "visibility_max_start",
                           "asr_start")}
    hist = {n: np.zeros((len(ms_arr), steps + 1)) for n in keys}
    for j, m_int in enumerate(ms_arr):
        m = jnp.asarray(float(m_int), s.X.dtype)
        zeta = jnp.clip(jnp.asarray(a), lo_j, hi_j)
        state = opt.init(zeta)
        mult = jnp.zeros(P, s.X.dtype)
        rho_t = float(rho)
        best = None            # (feasible, score, zeta)
        for t in range(steps + 1):
            u = _vectors(s, zeta, m, yt, xs, vis)
            (_, (eff, v, g)), grad = _lagrangian_grad(zeta, s, m, yt, xs, u, mult,
                                                      jnp.asarray(rho_t, s.X.dtype),
                                                      jnp.asarray(thr, s.X.dtype),
                                                      spec=vis.spec)
            e_mean, v_max = float(jnp.mean(eff)), float(jnp.max(v))
            hist["efficacy"][j, t] = e_mean
            hist["visibility_max"][j, t] = v_max
            hist["multiplier_max"][j, t] = float(jnp.max(mult))
            feas = bool(v_max <= thr)
            score = (feas, e_mean if feas else -v_max)
            if best is None or score > best[:2]:
                best = score + (zeta,)
            if t == 0:
                f0 = _outputs_jit(s, zeta, m, yt, xs)
                per["efficacy_start"].append(e_mean)
                per["visibility_max_start"].append(v_max)
                per["asr_start"].append(_asr(f0, yt, target))
            if t == steps:
                break
            upd, state = opt.update(grad, state, zeta)
            zeta = jnp.clip(optax.apply_updates(zeta, upd), lo_j, hi_j)
            if (t + 1) % inner == 0:
                if method == "auglag":
                    mult = jnp.maximum(0.0, mult + rho_t * g)
                else:
                    rho_t *= 2.0
        zb = best[2]                 # evaluated by the compiled step (no new program)
        (_, (eff, v, _)), _ = _lagrangian_grad(
            zb, s, m, yt, xs, _vectors(s, zb, m, yt, xs, vis), jnp.zeros_like(mult),
            jnp.asarray(rho_t, s.X.dtype), jnp.asarray(thr, s.X.dtype), spec=vis.spec)
        f = _outputs_jit(s, zb, m, yt, xs)
        per["zeta"].append(np.asarray(zb))
        per["efficacy"].append(float(jnp.mean(eff)))
        per["visibility"].append(np.asarray(v))
        per["visibility_max"].append(float(jnp.max(v)))
        per["asr"].append(_asr(f, yt, target))
        per["feasible"].append(bool(jnp.max(v) <= thr))
    per_m = {n: np.asarray(v) for n, v in per.items()}
    per_m["ms"] = ms_arr.astype(np.int64)
    feas = per_m["feasible"]
    if feas.any():
        i = int(np.argmax(np.where(feas, per_m["efficacy"], -np.inf)))
    else:
        i = int(np.argmin(per_m["visibility_max"]))
    return OptimalPoison(zeta=per_m["zeta"][i], m=int(ms_arr[i]),
                         efficacy=float(per_m["efficacy"][i]),
                         visibility=per_m["visibility"][i], asr=float(per_m["asr"][i]),
                         feasible=bool(feas[i]), per_m=per_m, history=hist, threshold=thr)


def frontier(k: Kernel, X: Array, y: Array, ridge: float, x_trig: Array, *, y_target: Any,
             ms: Sequence[int], zetas: Dict[str, Array], threshold: Optional[float] = None,
             target_class: Optional[int] = None, method: str = "lanczos", key: Any = 0,
             solver: Optional[CloneSolver] = None) -> Dict[str, Any]:
    """The attacker's frontier: efficacy, ASR and visibility of each named poison
    placement (e.g. the clone at the triggered prototype, near clones at several
    distances, the optimised poison) for each m, by the rank-one law (no refit).

    Returns ``{"ms": (M,), "threshold": ..., "placements": {name: {"efficacy" (M,),
    "asr" (M,), "visibility" (M, P), "visibility_max" (M,), and with a threshold
    "flagged" (M,) (the fraction of triggered points above it, the detector's TPR) and
    "feasible" (M,) (none above it)}}}``.
    """
    s = _solver_for(k, X, y, ridge, solver)
    yt = _check_target(s, y_target)
    xs, _ = _check_points(s, "x_trig", x_trig)
    if not isinstance(zetas, dict) or not zetas:
        raise ValueError("`zetas` must be a non-empty dict name -> poison input.")
    ms_arr = np.atleast_1d(np.asarray(ms))
    if ms_arr.ndim != 1 or ms_arr.size == 0:
        raise ValueError("`ms` must be a non-empty 1-D sequence of clone counts.")
    _validate.nonneg("ms", ms_arr, integer=True)
    if threshold is not None:
        _validate.nonneg("threshold", threshold, positive=True)
    target = _target_class(s, y_target, target_class)
    vis = _vis_setup(s, xs, method, target, 1.0, key, None, None)
    out = {}
    for name, z in zetas.items():
        z = _check_zeta(s, f"zetas[{name!r}]", z)
        rows = dict(efficacy=[], asr=[], visibility=[])
        for m_int in ms_arr:
            m = jnp.asarray(float(m_int), s.X.dtype)
            u = _vectors(s, z, m, yt, xs, vis)
            eff, v, f = _evaluate(s, z, m, yt, xs, u, vis.spec)
            rows["efficacy"].append(float(jnp.mean(eff)))
            rows["asr"].append(_asr(f, yt, target))
            rows["visibility"].append(np.asarray(v))
        res = {n: np.asarray(v) for n, v in rows.items()}
        res["visibility_max"] = res["visibility"].max(axis=1)
        if threshold is not None:
            res["flagged"] = (res["visibility"] > threshold).mean(axis=1)
            res["feasible"] = res["visibility_max"] <= threshold
        out[name] = res
    return dict(ms=ms_arr.astype(np.int64), threshold=threshold, placements=out)
