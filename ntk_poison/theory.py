"""Closed forms of the clone-poison model (THEORY.md section 2).

Notation: N clean points ``X_c`` with targets ``y_c``; ``m`` clones of ``zeta`` with
target ``y_t``; ``n = N + m``; relative ridge ``lam`` (absolute ``n*lam``);
``A = K_c + n*lam*I``; a trigger point ``x0``.

**Exact law** (block elimination of the poisoned KRR system)::

    s2(zeta)   = k(zeta, zeta) - k(zeta, X_c) A^-1 k(X_c, zeta)
    kt(x0)     = k(x0, zeta)   - k(x0, X_c)  A^-1 k(X_c, zeta)
    fc(zeta)   = k(zeta, X_c) A^-1 y_c
    alpha_p    = (y_t - fc(zeta)) / (n*lam + m*s2(zeta))
    Delta f(x0) = f_poisoned(x0) - f_clean(x0) = m * alpha_p * kt(x0)

with ``f_clean`` fitted at the same absolute ridge ``n*lam``.

**Vector targets** (one-hot, C outputs): the law is linear in ``(y_c, y_t)``, so it
holds output by output with the same ``s2`` and ``kt`` and a vector ``y_t``:
``alpha_p`` and ``Delta f(x0)`` gain a trailing class axis, and every output moves
along the same ``kt(x0)`` (the poison's gradient change is rank one over outputs).

**The paper's laws** (tight cluster, negligible clean-poison cross terms)::

    S(m; lam)   = m / (n*lam + m*k_zz)                     poison_gain
    Delta f(x0) ~ y_t * k0 * S(m; lam)                      efficacy_law
    Lambda_GN   = R_k * Delta f^2,  R_k = |grad k0|^2/k0^2   spike_factor

**How many m cost little.** The poison enters as a rank-one update, so for every m
only solves with ``A = K_c + n*lam*I`` are needed. ``A`` itself changes with m
through the shift ``mu = (N+m)*lam``. :func:`ntk_poison.linalg.shifted_solve` solves all the
shifted systems from one Cholesky factor per group of shifts, by the Neumann series
``(K + mu I)^-1 = sum_j (mu0 - mu)^j (K + mu0 I)^-(j+1)``, which converges
geometrically with ratio ``rho = max|mu - mu0| / mu0 <= 1/2``; it is truncated where
the remainder bound ``rho^(p+1) / (1 - rho)`` is below the dtype's epsilon. So the
effect of M values of m costs one O(N^3) factorisation plus O(p N^2), not M refits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, linalg
from ntk_poison.kernels import Kernel
from ntk_poison.krr import as_inputs, check_kernel

Array = Any

__all__ = [
    "poison_gain", "efficacy_law", "spike_factor", "spike_law",
    "visibility_threshold", "clone_law", "clone_effect", "CloneLaw",
    "resolvent_solve", "efficacy_law_factors", "posterior_covariance", "spike_value",
]


# --------------------------------------------------------------------------- scalar laws

def poison_gain(m: Any, n: Any, ridge: float, k_zz: Any) -> Any:
    """The scalar poison gain ``S(m; lam) = m / (n*lam + m*k_zz)`` (THEORY.md section 2).

    Args:
      m: number of clones (>= 0; scalar or array).
      n: number of training points the ridge is scaled by (poisons included), > 0.
      ridge: relative ridge lam >= 0.
      k_zz: ``k(zeta, zeta)`` > 0.

    Linear in m while ``m*k_zz << n*lam``; saturates at ``1/k_zz``.
    """
    _validate.nonneg("m", m)
    _validate.nonneg("n", n, positive=True)
    _validate.nonneg("ridge", ridge)
    _validate.nonneg("k_zz", k_zz, positive=True)
    m = np.asarray(m, dtype=float) if _validate.is_concrete(m) else m
    denom = n * ridge + m * k_zz
    # denom = 0 only at m = 0 and ridge = 0: no clones, no gain (not 0/0).
    where = np.where if _validate.is_concrete(denom) else jnp.where
    return m / where(denom == 0, 1.0, denom)


def efficacy_law(m: Any, n: Any, ridge: float, k0: Any, k_zz: Any, y_target: float) -> Any:
    """The paper's approximate efficacy ``Delta f(x0) ~ y_t k0 S(m; lam)``."""
    _validate.array("k0", k0)
    _validate.array("y_target", y_target)
    return y_target * k0 * poison_gain(m, n, ridge, k_zz)


def _grad_first(k: Kernel, x0, zeta):
    return jax.grad(lambda a: k.pair(a, zeta))(x0)


def spike_factor(k: Kernel, x0: Array, zeta: Array) -> jax.Array:
    """``R_k(x0, zeta) = ||grad_x k(x0, zeta)||^2 / k(x0, zeta)^2``, by autodiff.

    For the RBF kernel this is ``r^2 / l^4`` with ``r = ||x0 - zeta||``.
    """
    k = check_kernel(k)
    x0 = as_inputs(k, "x0", x0, single_ok=True)[0]
    zeta = as_inputs(k, "zeta", zeta, single_ok=True)[0]
    _validate.same_trailing("x0", x0[None], "zeta", zeta[None], k.input_rank)
    return _spike_factor(k, x0, zeta)


@functools.partial(jax.jit, static_argnums=0)
def _spike_factor(k, x0, zeta):
    g = _grad_first(k, x0, zeta)
    return jnp.sum(g * g) / k.pair(x0, zeta) ** 2


def spike_law(delta_f: Any, R_k: Any) -> Any:
    """The Gauss-Newton spike of the poison alone: ``Lambda_GN = R_k * Delta f^2``."""
    return R_k * np.square(delta_f)


def visibility_threshold(lambda_clean: Any, R_k: Any) -> Any:
    """The efficacy at which the spike reaches the clean curvature.

    A spectral detector sees the poison once ``Delta f^2 >~ Lambda_clean / R_k``;
    this returns ``sqrt(Lambda_clean / R_k)`` (a threshold on ``|Delta f|``).
    """
    _validate.nonneg("lambda_clean", lambda_clean)
    _validate.nonneg("R_k", R_k, positive=True)
    return np.sqrt(np.asarray(lambda_clean) / np.asarray(R_k))


# --------------------------------------------------------------------------- shifted solves

def resolvent_solve(K: Array, rhs: Array, shifts: Sequence[float]) -> jax.Array:
    """``(K + mu I)^-1 rhs`` for every shift mu: :func:`ntk_poison.linalg.shifted_solve`
    (the solver moved there; this name stays for one release)."""
    return linalg.shifted_solve(K, rhs, shifts)


# --------------------------------------------------------------------------- exact clone law

@dataclasses.dataclass(frozen=True)
class CloneLaw:
    """The exact clone-poison law for every m (THEORY.md section 2).

    Shapes: M = len(ms); Q = number of poison points zeta (one law per poison: each
    run adds m clones of one zeta); P = number of trigger points x0. The Q and P axes
    are dropped when ``zeta`` or ``x0`` was a single point. With vector targets
    ``y (N, C)`` the outputs' axis C is appended to ``delta_f``, ``f_clean``,
    ``alpha_p`` and ``fc_zeta``, and inserted after P in ``grad_clean`` (M, P, C, *s)
    and ``grad_delta`` (M, Q, P, C, *s).

    Attributes:
      ms: the clone counts (M,).
      n: N + m for each m (M,).
      delta_f: ``f_poisoned(x0) - f_clean(x0)`` (M, Q, P).
      f_clean: the clean prediction at x0, at the ridge ``n*lam`` (M, P).
      alpha_p: the dual weight of each clone (M, Q).
      s2: posterior variance at zeta (M, Q).
      kt: posterior covariance of x0 and zeta (M, Q, P).
      fc_zeta: the clean prediction at zeta (M, Q).
      k0: ``k(x0, zeta)`` (Q, P); k_zz: ``k(zeta, zeta)`` (Q,).
      grad_clean: ``grad_x f_clean(x0)`` (M, P, *input_shape), when asked for.
      grad_delta: the poison's contribution ``m alpha_p grad_x kt(x0)``
        (M, Q, P, *input_shape), when asked for.
      grad_k0: ``grad_x k(x0, zeta)`` (Q, P, *input_shape), when asked for. The
        paper's spike is ``(m alpha_p)^2 ||grad_k0||^2``; the exact one replaces k0 by
        the posterior covariance kt, whose gradient also carries the clean smoother of
        ``k(., zeta)``: a floor that does not vanish at near clones when clean data
        lie near zeta.
    """

    ms: np.ndarray
    n: np.ndarray
    delta_f: jax.Array
    f_clean: jax.Array
    alpha_p: jax.Array
    s2: jax.Array
    kt: jax.Array
    fc_zeta: jax.Array
    k0: jax.Array
    k_zz: jax.Array
    grad_clean: Optional[jax.Array] = None
    grad_delta: Optional[jax.Array] = None
    grad_k0: Optional[jax.Array] = None
    single_zeta: bool = False
    single_x0: bool = False

    @property
    def f_poisoned(self) -> jax.Array:
        """The poisoned prediction at x0, ``(M, Q, P)`` (squeezed like delta_f)."""
        fc = self.f_clean
        if not self.single_zeta:
            fc = fc[:, None]
        return fc + self.delta_f

    @property
    def grad_poisoned(self) -> Optional[jax.Array]:
        if self.grad_clean is None:
            return None
        gc = self.grad_clean
        if not self.single_zeta:
            gc = gc[:, None]
        return gc + self.grad_delta


def _squeezed(law: CloneLaw) -> CloneLaw:
    """Drop the Q axis (single zeta) and the P axis (single x0) where asked."""
    q, p = law.single_zeta, law.single_x0

    def take(a, q_axis, p_axis):
        if a is None:
            return None
        if p and p_axis is not None:
            a = jnp.take(a, 0, axis=p_axis)
        if q and q_axis is not None:
            a = jnp.take(a, 0, axis=q_axis)
        return a

    return dataclasses.replace(
        law, delta_f=take(law.delta_f, 1, 2), f_clean=take(law.f_clean, None, 1),
        alpha_p=take(law.alpha_p, 1, None), s2=take(law.s2, 1, None),
        kt=take(law.kt, 1, 2), fc_zeta=take(law.fc_zeta, 1, None),
        k0=take(law.k0, 0, 1), k_zz=take(law.k_zz, 0, None),
        grad_clean=take(law.grad_clean, None, 1), grad_delta=take(law.grad_delta, 1, 2),
        grad_k0=take(law.grad_k0, 0, 1))


@functools.partial(jax.jit, static_argnums=0)
def _cross_terms(k: Kernel, Xc, zeta, x0):
    Kc = k.fn(Xc, Xc)
    kz = k.fn(Xc, zeta)                       # (N, Q)
    kx = k.fn(x0, Xc)                         # (P, N)
    k0 = k.fn(zeta, x0)                       # (Q, P)
    kzz = k.diag(zeta)                        # (Q,)
    return Kc, kz, kx, k0, kzz


@functools.partial(jax.jit, static_argnums=0)
def _cross_grads(k: Kernel, Xc, zeta, x0):
    """grad_x k(x0_p, X_c) as (P, N, *s) and grad_x k(x0_p, zeta_q) as (Q, P, *s)."""
    row = lambda a: k.fn(a[None], Xc)[0]
    J = jax.vmap(jax.jacrev(row))(x0)
    gz = jax.vmap(lambda z: jax.vmap(lambda a: _grad_first(k, a, z))(x0))(zeta)
    return J, gz


@functools.partial(jax.jit, static_argnums=0)
def _cross_terms_no_gram(k: Kernel, Xc, zeta, x0):
    """:func:`_cross_terms` without the clean Gram matrix (the CG path)."""
    return k.fn(Xc, zeta), k.fn(x0, Xc), k.fn(zeta, x0), k.diag(zeta)


def clone_law(k: Kernel, X: Array, y: Array, ridge: float, zeta: Array, y_target: float,
              ms: Sequence[int], x0: Array, *, with_grad: bool = False,
              solver: str = "auto", tol: Optional[float] = None,
              precond_rank: Optional[int] = None, gram_dtype: Any = None,
              block_size: Optional[int] = None, key: Any = None,
              strict: bool = False) -> CloneLaw:
    """The exact effect of ``m`` clones of ``(zeta, y_target)`` for every m in ``ms``.

    No refit: the poison block is eliminated in closed form (a rank-one update), and
    the clean solves at each ridge ``(N+m)*lam`` come from ``linalg.shifted_solve``,
    shared by every poison and trigger point.

    Args:
      k: the kernel.
      X, y: the clean training set, ``(N, *s)`` and float ``(N,)`` (or ``(N, C)``:
        vector targets, e.g. centred one-hot).
      ridge: relative ridge lam >= 0; each m is fitted with absolute ridge
        ``(N + m) * lam``, the clean comparison too.
      zeta: the poison input ``s``, or a batch ``(Q, *s)`` of alternative poisons
        (each law adds clones of one of them).
      y_target: the poison label (a float; a ``(C,)`` row for ``y (N, C)``).
      ms: clone counts, integers >= 0.
      x0: one trigger point ``s`` or a batch ``(P, *s)``.
      with_grad: also return the input gradients at x0 (the spike).
      solver: how the shifted solves ``(K_c + (N+m) lam I)^-1 [k(X_c, zeta), y]`` are
        done: ``"cholesky"`` (``linalg.shifted_solve``: one factorisation per group of
        shifts), ``"cg"`` (:func:`ntk_poison.krr.shifted_cg_solve`: one
        Nystrom-preconditioned CG solve per m, the Gram matrix never factorised, as
        ``krr.fit(solver="cg")``), or ``"auto"`` (the rule of
        :func:`ntk_poison.krr.fit`: Cholesky while N <= ``krr.CHOLESKY_MAX_N`` and
        3 N^2 numbers fit the memory budget).
      tol, precond_rank, gram_dtype, block_size, key, strict: the CG options, as
        :func:`ntk_poison.krr.fit` (ignored by the Cholesky solver).

    Returns:
      A :class:`CloneLaw`; cost O(N^3) once plus O((Q + P) N) per m (Cholesky), or
      per m one CG solve of O(iterations N^2) (CG).
    """
    k = check_kernel(k)
    Xc = as_inputs(k, "X", X)
    _validate.array("y", y, ndim=(1, 2), floating=True)
    _validate.same_rows("X", Xc, "y", y)
    if Xc.shape[0] == 0:
        raise ValueError("`X` is empty; pass at least one clean training point.")
    multi = np.ndim(y) == 2
    _validate.scalar("ridge", ridge)
    single_zeta = np.ndim(zeta) == k.input_rank
    zeta = as_inputs(k, "zeta", zeta, single_ok=True)
    _validate.same_trailing("zeta", zeta, "X", Xc, k.input_rank)
    single_x0 = np.ndim(x0) == k.input_rank
    x0 = as_inputs(k, "x0", x0, single_ok=True)
    _validate.same_trailing("x0", x0, "X", Xc, k.input_rank)
    _validate.array("y_target", y_target)
    if not multi and np.ndim(y_target) != 0:
        raise ValueError("`y_target` must be a scalar for scalar targets y of shape (N,).")
    if multi and np.shape(y_target) != np.shape(y)[1:]:
        raise ValueError(f"`y_target` has shape {np.shape(y_target)}; for targets `y` of "
                         f"shape {np.shape(y)} pass the poison's target row, of shape "
                         f"{np.shape(y)[1:]}.")
    ms = np.atleast_1d(np.asarray(ms))
    if ms.ndim != 1 or ms.size == 0:
        raise ValueError("`ms` must be a non-empty 1-D sequence of clone counts.")
    _validate.nonneg("ms", ms, integer=True)
    ms = ms.astype(np.int64)
    N = Xc.shape[0]
    solver = _validate.choice("solver", solver, ("auto", "cholesky", "cg"))
    if solver == "auto":
        from ntk_poison import krr as krr_mod
        dense_fits = 3 * N * N * Xc.dtype.itemsize <= _validate.memory_budget_bytes()
        solver = "cholesky" if dense_fits and N <= krr_mod.CHOLESKY_MAX_N else "cg"
    if solver == "cholesky":
        _validate.fits_in_memory(f"The clean Gram matrix for N={N}", 3 * N * N,
                                 Xc.dtype.itemsize, "Subsample the clean training set, "
                                 "or pass solver=\"cg\".")
    if with_grad:
        d = int(np.prod(Xc.shape[1:]))
        _validate.fits_in_memory(
            "The input gradients of k(x0, X)", x0.shape[0] * N * d, Xc.dtype.itemsize,
            "Ask for gradients at fewer trigger points x0 at once.")

    dtype = jnp.result_type(Xc.dtype, jnp.asarray(y).dtype)
    Xc, zeta, x0 = Xc.astype(dtype), zeta.astype(dtype), x0.astype(dtype)
    yc = jnp.asarray(y, dtype)
    n = N + ms
    shifts = n * float(ridge)
    Y = yc if multi else yc[:, None]
    if solver == "cholesky":
        Kc, kz, kx, k0, kzz = _cross_terms(k, Xc, zeta, x0)
        sol = linalg.shifted_solve(Kc, jnp.concatenate([kz, Y], axis=1), shifts)
    else:
        from ntk_poison import krr as krr_mod
        kz, kx, k0, kzz = _cross_terms_no_gram(k, Xc, zeta, x0)
        sol, _ = krr_mod.shifted_cg_solve(
            k, Xc, jnp.concatenate([kz, Y], axis=1), shifts, tol=tol,
            precond_rank=precond_rank, gram_dtype=gram_dtype, block_size=block_size,
            strict=strict, key=key)
    Q = kz.shape[1]
    vz = sol[..., :Q]                               # (M, N, Q)
    s2 = kzz[None] - jnp.einsum("mnq,nq->mq", vz, kz)
    kt = k0[None] - jnp.einsum("mnq,pn->mqp", vz, kx)
    m_arr = jnp.asarray(ms, dtype)
    shift_arr = jnp.asarray(shifts, dtype)
    if multi:                                       # a trailing class axis C
        vy = sol[..., Q:]                           # (M, N, C)
        fcz = jnp.einsum("mnq,nc->mqc", vz, yc)
        f_clean = jnp.einsum("mnc,pn->mpc", vy, kx)
        alpha_p = (jnp.asarray(y_target, dtype) - fcz) / (
            shift_arr[:, None, None] + m_arr[:, None, None] * s2[..., None])
        weight = jnp.where(m_arr[:, None, None] == 0, 0.0, m_arr[:, None, None] * alpha_p)
        delta = weight[:, :, None, :] * kt[..., None]                     # (M, Q, P, C)
    else:
        vy = sol[..., Q]                            # (M, N)
        fcz = jnp.einsum("mnq,n->mq", vz, yc)       # k(zeta, X) A^-1 y
        f_clean = vy @ kx.T                         # (M, P)
        alpha_p = (jnp.asarray(y_target, dtype) - fcz) / (shift_arr[:, None]
                                                          + m_arr[:, None] * s2)
        # m = 0 adds nothing; at ridge 0 alpha_p is then 0/0, so set the weight explicitly.
        weight = jnp.where(m_arr[:, None] == 0, 0.0, m_arr[:, None] * alpha_p)   # (M, Q)
        delta = weight[:, :, None] * kt
    grad_clean = grad_delta = gz = None
    if with_grad:
        J, gz = _cross_grads(k, Xc, zeta, x0)        # (P, N, *s), (Q, P, *s)
        grad_kt = gz[None] - jnp.einsum("mnq,pn...->mqp...", vz, J)
        if multi:
            grad_clean = jnp.einsum("mnc,pn...->mpc...", vy, J)
            grad_kt = grad_kt[:, :, :, None]         # (M, Q, P, 1, *s)
            scale = weight[:, :, None].reshape(weight.shape[:2] + (1, -1) + (1,) * (
                grad_kt.ndim - 4))
        else:
            grad_clean = jnp.einsum("mn,pn...->mp...", vy, J)
            scale = weight.reshape(weight.shape + (1,) * (grad_kt.ndim - 2))
        grad_delta = scale * grad_kt
    if not bool(jnp.all(jnp.isfinite(delta))):
        raise ValueError(
            f"The poisoned system K + (N+m)*ridge*I is singular at ridge={ridge} (a clone "
            "at ridge 0 that duplicates a training point, or a non-positive-definite "
            "kernel): increase `ridge`.")
    law = CloneLaw(ms=ms, n=np.asarray(n), delta_f=delta, f_clean=f_clean, alpha_p=alpha_p,
                   s2=s2, kt=kt, fc_zeta=fcz, k0=k0, k_zz=kzz, grad_clean=grad_clean,
                   grad_delta=grad_delta, grad_k0=gz, single_zeta=single_zeta,
                   single_x0=single_x0)
    return _squeezed(law)


def clone_effect(k: Kernel, X: Array, y: Array, ridge: float, zeta: Array,
                 y_target: float, ms: Sequence[int], x0: Array) -> jax.Array:
    """Exact ``Delta f(x0) = f_poisoned(x0) - f_clean(x0)`` for every m in ``ms``.

    Both fits use the same absolute ridge ``n*ridge``, ``n = len(X) + m``. Computed
    by the rank-one update of :func:`clone_law`, not by refitting. Returns an array of
    ``len(ms)`` (``(len(ms), P)`` for a batch of P trigger points, ``(len(ms), Q, P)``
    for a batch of Q poisons too).
    """
    return clone_law(k, X, y, ridge, zeta, y_target, ms, x0).delta_f


# --------------------------------------------------------------------------- the paper's law, decomposed

def efficacy_law_factors(law: CloneLaw, ridge: float, y_target: float) -> dict:
    """Why the paper's ``y_t k0 S(m; lam)`` differs from the exact ``Delta f``
    (THEORY.md section 2, corrections). With ``S = m / (n lam + m k_zz)`` and
    ``Delta f = m (y_t - fc) kt / (n lam + m s2)`` the ratio factors exactly:

        y_t k0 S / Delta f = (k0 / kt) * (y_t / (y_t - fc(zeta)))
                             * ((n lam + m s2) / (n lam + m k_zz))

    the posterior-covariance factor (kt < k0 where the kernel covaries with clean data
    beyond zeta), the clean-prediction factor (fc -> 0 in the tight-cluster law) and the
    s2 term (s2 -> k_zz; near 1 while ``m k_zz << n lam``).

    Args:
      law: a :class:`CloneLaw` from :func:`clone_law`.
      ridge: the relative ridge lam it was computed with (absolute ``n lam``).
      y_target: its poison label.

    Returns:
      ``k0_over_kt``, ``target_over_residual``, ``s2_term`` and their ``product``, each
      shaped like ``law.kt`` (M, [Q], [P]); at m = 0 the product is defined but the
      ratio it equals is 0/0.
    """
    if not isinstance(law, CloneLaw):
        raise ValueError(f"`law` must be a theory.CloneLaw, got {type(law).__name__}.")
    _validate.nonneg("ridge", ridge)
    kt = np.asarray(law.kt)
    tail = (1,) * (kt.ndim - 1)
    fc, s2, kzz = np.asarray(law.fc_zeta), np.asarray(law.s2), np.asarray(law.k_zz)[None]
    if not law.single_x0:
        fc, s2, kzz = fc[..., None], s2[..., None], kzz[..., None]
    k0 = np.asarray(law.k0)[None]
    nlam = (np.asarray(law.n, float) * float(ridge)).reshape((-1,) + tail)
    m = np.asarray(law.ms, float).reshape((-1,) + tail)
    out = dict(k0_over_kt=k0 / kt, target_over_residual=y_target / (y_target - fc),
               s2_term=(nlam + m * s2) / (nlam + m * kzz))
    out["product"] = out["k0_over_kt"] * out["target_over_residual"] * out["s2_term"]
    return out


def spike_value(k: Kernel, X: Array, ridge: float, zeta: Array, x0: Array, ms: Any,
                law: CloneLaw, spike: Any, y_target: float) -> dict:
    """The spike's value (THEORY.md section 2, corrections): by the rank-one law
    ``grad Delta f / Delta f = grad kt / kt``, so ``spike / Delta f^2 = R_k(kt)``
    exactly; it is checked against a direct solve (:func:`posterior_covariance`) at the
    first and last m > 0. Beside it, the paper-law ratio's factors
    (:func:`efficacy_law_factors`).

    Args:
      k, X, ridge, zeta, x0: the clean set and the single poison / trigger point of ``law``.
      ms: its clone counts ``(M,)``; law: :func:`clone_law`'s result for them.
      spike: the poison's Gauss-Newton spike ``||grad Delta f||^2`` per m ``(M,)``.
      y_target: the poison label.

    Returns:
      ``R_kt_ms`` (the m > 0), ``R_kt`` there, ``R_kt_direct`` (``ms``, ``R_kt``, ``kt``
      from the direct solve) and ``law_factors``.
    """
    ms = np.asarray(ms)
    pos = ms > 0
    R_kt = np.asarray(spike)[pos] / np.asarray(law.delta_f)[pos] ** 2
    check = [int(ms[pos][0]), int(ms[-1])]
    direct = [posterior_covariance(k, X, (len(X) + m) * ridge, zeta, x0) for m in check]
    fac = efficacy_law_factors(law, ridge, y_target)
    return dict(R_kt_ms=ms[pos], R_kt=R_kt, R_kt_direct=dict(
        ms=np.asarray(check), R_kt=np.asarray([d["R_kt"] for d in direct]),
        kt=np.asarray([d["kt"] for d in direct])),
        law_factors={key: np.asarray(v) for key, v in fac.items()})


def posterior_covariance(k: Kernel, X: Array, shift: float, zeta: Array, x0: Array
                         ) -> dict:
    """The posterior covariance of THEORY.md section 2 and its spike factor, by one
    direct Cholesky solve (an oracle for :func:`clone_law`, independent of its shifted
    solves):

        kt(x0) = k(x0, zeta) - k(x0, X) (K + shift I)^-1 k(X, zeta),
        R_k(kt) = ||grad_x kt(x0)||^2 / kt(x0)^2   (autodiff in x0)

    ``shift`` is the absolute ridge ``(N + m) lam``. The exact poison spike is
    ``||grad Delta f||^2 = R_k(kt) Delta f^2`` (``grad Delta f / Delta f = grad kt / kt``).
    Returns ``kt``, ``grad_kt`` and ``R_kt``.
    """
    k = check_kernel(k)
    Xc = as_inputs(k, "X", X)
    _validate.nonneg("shift", shift, positive=True)
    zeta = as_inputs(k, "zeta", zeta, single_ok=True)[0]
    x0 = as_inputs(k, "x0", x0, single_ok=True)[0]
    N = Xc.shape[0]
    _validate.fits_in_memory(
        f"posterior_covariance's dense Cholesky oracle for N={N}", 3 * N * N, 8,
        "It needs the factorisation of K + shift I; at this size use "
        "clone_law(..., solver=\"cg\") (its kt is the same quantity) or subsample.")
    K = np.asarray(k.fn(Xc, Xc), dtype=float)
    kz = np.asarray(k.fn(Xc, zeta[None]), dtype=float)[:, 0]
    import scipy.linalg
    v = jnp.asarray(scipy.linalg.cho_solve(
        scipy.linalg.cho_factor(K + float(shift) * np.eye(len(K))), kz))

    def kt_fn(a):
        return k.pair(a, zeta) - k.fn(a[None], Xc)[0] @ v

    val, g = jax.value_and_grad(kt_fn)(x0)
    return dict(kt=float(val), grad_kt=np.asarray(g),
                R_kt=float(jnp.sum(g * g) / val ** 2))
