"""The penalised kernel model: exact minimisers, kappa sweeps, degrees of freedom.

THEORY.md section 3. Notation: training inputs ``X = (x_1..x_n)`` of flat size d,
targets ``y`` ((n,) or (n, r)), relative ridge ``lam`` (absolute ``n*lam``), penalty
weight ``kappa``; the objective ``J`` is :mod:`ntk_poison.penalty`'s, its minimiser
lives in the joint span of :mod:`ntk_poison.joint`::

    f(x) = [k(x, X), d/dx' k(x, X)] c,     c = (W Kfull + n lam I)^-1 [y; 0]   (output)

:func:`fit_penalized` solves it directly (Cholesky of the symmetrised system), by
matrix-free conjugate gradients (``solver="cg"``, :func:`ntk_poison.linalg.cg` on
``joint.joint_matvec``) or, for the paper's loss penalty, by damped Newton in
function space (:func:`ntk_poison.linalg.newton_lm`). At kappa = 0 it is plain KRR
(:func:`ntk_poison.krr.fit` itself, to the last bit). The fitted
:class:`PenalizedModel` and :class:`PenalizedPath` (many kappas, or a flow over
time: a leading member axis) are models of :mod:`ntk_poison.models`' protocol.

**Many kappas from one eigendecomposition** (:func:`fit_penalized_sweep`,
:func:`effective_dof`). For kappa > 0 the system is ``(Kfull + n lam W^-1) c = ybar``;
eliminating the value block (``B11 = K + n lam I``) leaves the kappa-independent Schur
complement ``C = M - Dp^T B11^-1 Dp = Q diag(e) Q^T`` shifted by ``mu = n lam / kappa``::

    w_k(kappa) = kappa / (kappa e_k + n lam)              (w = 0 at kappa = 0)
    beta = -Q diag(w) Q^T Dp^T a0,   alpha = a0 - B11^-1 Dp beta,   a0 = B11^-1 y

One O((nd)^3) ``eigh`` then serves every kappa at O((nd)^2) each.

**Effective degrees of freedom**: the trace of the hat matrix ``y -> f(X)``. For the
exact model, with ``V = Q^T Dp^T B11^-1``::

    df(kappa) = tr[K B11^-1] - n lam sum_k w_k(kappa) ||V_k||^2

Each ``w_k`` increases strictly with kappa, so df decreases strictly unless the
penalty cannot see the data (all ``V_k = 0``). Equivalently, in orthonormal
coordinates of the joint span (``Kfull = U s U^T``, ``Phi = U s^(1/2)`` split into value
rows ``Phi_v`` and gradient rows ``Phi_g``), ``df = tr[Sigma (Sigma + n lam I + kappa G)^-1]``
with ``Sigma = Phi_v^T Phi_v`` and ``G = Phi_g^T Phi_g``: THEORY.md's formula holds with
K and G read as the value and gradient Gram matrices *in these coordinates* (for an
explicit feature map: ``Phi^T Phi`` and ``sum_i J_i^T J_i``). With the dual matrices
``K_jl`` and ``G_jl = sum_i grad k(x_i,x_j).grad k(x_i,x_l)`` the hat matrix of the
restricted model is ``K (K^2 + n lam K + kappa G)^-1 K``, not ``K (K + n lam I + kappa G)^-1``.

The training residual is ``y - f(X) = n lam alpha``. What minimisation guarantees is
that ``(1/2n)|y - f(X)|^2 + (lam/2)||f||^2`` does not decrease and the penalty does not
increase with kappa. The residual alone usually increases, but not always: the
penalty can buy flatter gradients with more RKHS norm and a slightly better fit
(tests/test_flow.py has a counterexample, a 0.3% drop at small kappa).

**Restricted model** (:func:`fit_restricted`): the minimiser over ``f = k(., X) alpha``
of the output-penalty objective: ``(K^2 + n lam K + kappa G) alpha = K y``. It is
solved in orthonormal coordinates of span{k(., x_j)} (``K = U s U^T``, ``theta =
s^(1/2) U^T alpha``): ``(diag(s) + n lam I + kappa G_theta) theta = s^(1/2) U^T y``, with
``G_theta = s^-1/2 U^T G U s^-1/2``, which stays well conditioned where ``K^2`` is not.
Directions with ``s <= n eps s_max`` are numerically null and dropped.

**Costs** (N = n(1+d)): direct exact fit O(n^2 d^2) memory, O(N^3) time; sweep one
O((nd)^3) eigh plus O((nd)^2) per kappa; CG O(n d + B n) memory and O(n^2 d) time per
iteration; restricted O(n^2 + B n d) memory and O(n^3 d) time (forming G).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, joint, krr, linalg, models
from ntk_poison import penalty as penalty_mod
from ntk_poison.kernels import Kernel
from ntk_poison.krr import as_inputs, check_kernel
from ntk_poison.linalg import ConvergenceWarning
from ntk_poison.penalty import PENALTIES

Array = Any

__all__ = [
    "PenalizedModel", "PenalizedPath", "PathFunction", "ConvergenceWarning",
    "fit_penalized", "fit_penalized_sweep", "fit_restricted", "effective_dof",
    "check_kappas", "PENALTIES",
]

_SOLVERS = ("direct", "cg")
_KAPPA_HINT = "; for many kappas use penalized.fit_penalized_sweep"


def check_kappas(kappas: Any) -> np.ndarray:
    arr = np.asarray(kappas, dtype=float)
    if arr.ndim > 1 or arr.size == 0:
        raise ValueError("`kappas` must be a non-empty 1-D sequence of penalty weights, "
                         f"got shape {arr.shape}.")
    _validate.nonneg("kappas", arr)
    return np.atleast_1d(arr)


# --------------------------------------------------------------------------- functions

@functools.partial(jax.tree_util.register_dataclass, data_fields=["X", "alpha", "beta"],
                   meta_fields=["kernel", "batched"])
@dataclasses.dataclass(frozen=True)
class PathFunction(models.Function):
    """Every member of a path at ONE input ``-> (T,)`` (or a batch ``-> (T, m)``):
    ``k(x, X)`` does not depend on the member, so vmap computes it once."""

    kernel: Kernel
    X: jax.Array
    alpha: jax.Array
    beta: Optional[jax.Array]
    batched: bool = False

    def __call__(self, x):
        xb = x if self.batched else x[None]
        out = jax.vmap(lambda a, b: krr.dual_predict(self.kernel, self.X, a, b, xb))(
            self.alpha, self.beta)
        return out if self.batched else out[:, 0]


# --------------------------------------------------------------------------- models

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["X", "y", "alpha", "beta"],
                   meta_fields=["kernel", "ridge", "kappa", "penalty", "model", "time",
                                "info"])
@dataclasses.dataclass(frozen=True)
class PenalizedModel(krr.KernelModel):
    """A fitted penalised kernel model (immutable pytree), THEORY.md section 3.

    ``f(x) = k(x, X) alpha + sum_j d/dx' k(x, x_j) . beta_j``.

    Attributes:
      kernel: the kernel (static).
      X: training inputs ``(n, *s)``; y: training targets ``(n,)`` or ``(n, r)``.
      alpha: value weights ``(n,)`` / ``(n, r)``.
      beta: derivative weights ``(n, *s)`` / ``(n, *s, r)``; None for the restricted
        model (span{k(., x_j)} only).
      ridge: relative ridge lam (absolute n*lam); kappa: the penalty weight.
      penalty: "output" (||grad_x f||^2) or "loss" (||grad_x L||^2).
      model: "exact" (minimiser over the RKHS) or "restricted".
      time: the flow time of a :func:`kernel_flow` snapshot, None for a minimiser.
      info: solver diagnostics as (name, value) pairs; see :attr:`info_dict`.
    """

    kernel: Kernel
    X: jax.Array
    y: jax.Array
    alpha: jax.Array
    beta: Optional[jax.Array]
    ridge: float
    kappa: float
    penalty: str = "output"
    model: str = "exact"
    time: Optional[float] = None
    info: Tuple[Tuple[str, Any], ...] = ()

    @property
    def info_dict(self) -> dict:
        return dict(self.info)

    def objective(self, penalty: Optional[str] = None) -> jax.Array:
        """J at this model on its training set (module docstring), matrix-free.

        ``penalty`` overrides the model's own (e.g. to score an output-penalty fit
        under the loss-penalty objective). ``||f||_H^2 = alpha.f(X) + beta.grad f(X)``.
        """
        pen = self.penalty if penalty is None else penalty_mod.check_penalty(penalty)
        dt = self.alpha.dtype
        block = joint.default_block(self.n, joint.flat_dim(self.X), dt.itemsize)
        return _objective(self.kernel, self.X, self.y, self.alpha, self.beta,
                          jnp.asarray(self.ridge, dt), jnp.asarray(self.kappa, dt),
                          pen, block, self.scalar_output)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["X", "y", "alpha", "beta", "kappas", "times"],
                   meta_fields=["kernel", "ridge", "penalty", "model", "info"])
@dataclasses.dataclass(frozen=True)
class PenalizedPath(krr.KernelModel):
    """A family of penalised models sharing a training set (immutable pytree).

    A :func:`kernel_flow` trajectory (``times`` increasing, ``kappas`` constant) or a
    :func:`fit_penalized_sweep` (``kappas`` varying, ``times`` = inf: minimisers).
    ``alpha`` and ``beta`` carry a leading member axis of length T; every model
    method returns a leading member axis (``predict -> (T, m)``).
    """

    leading_axes = 1

    kernel: Kernel
    X: jax.Array
    y: jax.Array
    alpha: jax.Array
    beta: Optional[jax.Array]
    kappas: jax.Array
    times: jax.Array
    ridge: float
    penalty: str = "output"
    model: str = "exact"
    info: Tuple[Tuple[str, Any], ...] = ()

    def __len__(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def info_dict(self) -> dict:
        return dict(self.info)

    def at(self, i: int) -> PenalizedModel:
        """The model of member i (time index i of a trajectory, kappa index of a sweep)."""
        if not _validate.is_int_scalar(i) or not -len(self) <= i < len(self):
            raise ValueError(f"`i` must be an integer index in [0, {len(self)}), got {i!r}.")
        t = float(np.asarray(self.times)[i])
        alpha, beta = joint.take((self.alpha, self.beta), i)
        return PenalizedModel(
            kernel=self.kernel, X=self.X, y=self.y, alpha=alpha, beta=beta,
            ridge=self.ridge, kappa=float(np.asarray(self.kappas)[i]),
            penalty=self.penalty, model=self.model, time=None if math.isinf(t) else t,
            info=self.info)

    def as_function(self) -> PathFunction:
        """Every member's prediction at ONE input, ``(T,)`` (or ``(T, r)``)."""
        return PathFunction(self.kernel, self.X, self.alpha, self.beta)

    def batch_function(self) -> PathFunction:
        return PathFunction(self.kernel, self.X, self.alpha, self.beta, batched=True)

    def objective(self, penalty: Optional[str] = None) -> jax.Array:
        """J of every member on the training set, ``(T,)`` (see PenalizedModel.objective)."""
        return jnp.stack([self.at(i).objective(penalty) for i in range(len(self))])


# --------------------------------------------------------------------------- objective

@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9))
def _objective(k: Kernel, X, Y, alpha, beta, ridge, kappa, penalty: str, block: int,
               scalar: bool):
    """J at the model (alpha (n[, r]), beta (n, *s[, r]) or None), matrix-free."""
    if scalar:
        Y, alpha = Y[:, None], alpha[:, None]
        beta = None if beta is None else beta[..., None]
    if beta is None:
        vals = krr.dual_predict(k, X, alpha, None, X)
        norm2 = jnp.sum(alpha * vals)
        _, grads = joint.joint_apply(k, X, alpha, jnp.zeros(X.shape + (alpha.shape[1],),
                                                        X.dtype), block)
    else:
        vals, grads = joint.joint_apply(k, X, alpha, beta, block)
        norm2 = jnp.sum(alpha * vals) + jnp.sum(beta * grads)
    return (penalty_mod.joint_objective(joint.stack_functionals(vals, grads), Y, kappa,
                                     penalty) + 0.5 * ridge * norm2)


# --------------------------------------------------------------------------- exact fits

@jax.jit
def _exact_solve(A, sw, Y):
    """``c = S (S Kfull S + n lam I)^-1 [Y; 0]`` by Cholesky, and a PD flag."""
    L = jnp.linalg.cholesky(A)
    z = jax.scipy.linalg.cho_solve((L, True), joint.ybar(Y, A.shape[0]))
    return sw[:, None] * z, jnp.all(jnp.isfinite(L))


def _krr_as_penalized(k, X, y, ridge, kappa, penalty):
    m = krr.solve(k, X, y, ridge)
    beta = jnp.asarray(np.zeros(X.shape + tuple(y.shape[1:]), X.dtype))
    return PenalizedModel(kernel=k, X=X, y=y, alpha=m.alpha, beta=beta, ridge=ridge,
                          kappa=kappa, penalty=penalty, info=(("solver", "krr"),))


def fit_penalized(k: Kernel, X: Array, y: Array, ridge: float = 1e-3, kappa: float = 0.0,
                  *, penalty: str = "output", solver: str = "direct",
                  tol: Optional[float] = None, maxiter: Optional[int] = None,
                  block_size: Optional[int] = None, preconditioner: str = "jacobi",
                  precond_rank: Optional[int] = None, key: Any = None) -> PenalizedModel:
    """The exact minimiser over the RKHS of the penalised objective (THEORY.md section 3).

        J(f) = (1/2n) sum (f(x_i)-y_i)^2 + (lam/2)||f||_H^2 + (kappa/2n) sum P_i(f)

    penalty="output" (``P_i = ||grad_x f(x_i)||^2``, closed form)::

        c = S (S Kfull S + n lam I)^-1 [y; 0] = (W Kfull + n lam I)^-1 [y; 0]

    penalty="loss" (``P_i = (f(x_i)-y_i)^2 ||grad_x f(x_i)||^2``): nonlinear, so J is
    minimised numerically over the same joint representer coefficients (the
    representer theorem still holds: J depends on f only through f and grad f at the
    training points and ||f||_H). Damped Newton in function space (exact Hessian of J
    by autodiff, Levenberg-Marquardt damping; see ``_newton_loss``) starts from the
    output-penalty solution. ``info`` reports the iterations and ``grad_norm`` (the
    RKHS norm of the gradient of J; ``grad_norm0`` its value at f = 0); a
    :class:`ConvergenceWarning` is issued if their ratio did not reach ``tol``.
    ``info["stalled"]`` is True when Newton stopped because J no longer decreased in
    the working precision (the rounding floor; the warning names the reachable tol).

    Args:
      k: the kernel (twice continuously differentiable across x = x'; see module
        docstring); X: ``(n, *s)``; y: float ``(n,)`` or ``(n, r)``.
      ridge: relative ridge lam >= 0 (absolute n*lam); kappa: penalty weight >= 0.
      penalty: "output" or "loss".
      solver: "direct" (dense Cholesky, O(n^2 d^2) memory, O(n^3 d^3) time) or "cg"
        (output penalty only: preconditioned conjugate gradients on
        ``S Kfull S + n lam I`` with matrix-free products ``Kfull v`` by forward- and
        reverse-mode derivatives of k, O(n^2 d) time and O(n d + B n) memory per
        iteration; Jacobi preconditioner from the kernel's diagonal derivatives).
      tol: relative tolerance (CG residual; Newton gradient). Default
        ``_validate.default_tol``: 1e-8 in float64, 1e-4 in float32.
      maxiter: iteration cap (default min(10 N, 10000) for CG, 100 for Newton).
      block_size: rows per block of the CG matrix-vector product.
      preconditioner: CG's preconditioner: ``"jacobi"`` (the joint diagonal) or
        ``"nystrom"`` (:func:`ntk_poison.linalg.column_nystrom` on ``precond_rank``
        joint columns drawn uniformly by ``key``; default rank
        ``min(N, max(100, 2 sqrt(N)))``, N = n (1 + d)).
      precond_rank, key: the Nystrom rank and the PRNG key (or int seed) of its columns.

    Returns:
      A :class:`PenalizedModel` (model="exact"). At kappa = 0 it is
      :func:`ntk_poison.krr.fit`'s solution (beta = 0). Raises ValueError on bad
      input, a non-positive-definite system, or a joint Gram matrix over the memory
      budget with solver="direct" (the message names the alternatives).
    """
    k, X, Y, y, scalar, ridge = joint.check_problem(k, X, y, ridge)
    kappa = _validate.scalar("kappa", kappa, _KAPPA_HINT)
    penalty = penalty_mod.check_penalty(penalty)
    solver = _validate.choice("solver", solver, _SOLVERS)
    if solver == "cg" and penalty == "loss":
        raise ValueError("solver=\"cg\" solves the linear output-penalty system only; use "
                         "penalty=\"output\", or solver=\"direct\" on a smaller problem "
                         "for penalty=\"loss\".")
    if tol is not None:
        _validate.nonneg("tol", tol, positive=True)
    if maxiter is not None:
        _validate.nonneg("maxiter", maxiter, integer=True, positive=True)
    if kappa == 0.0:
        return _krr_as_penalized(k, X, y, ridge, kappa, penalty)
    shape, dt = X.shape[1:], X.dtype
    if solver == "cg":
        joint.warn_if_not_smooth(k, X)
        return _fit_cg(k, X, Y, y, scalar, ridge, kappa, tol, maxiter, block_size,
                       preconditioner, precond_rank, key)
    joint.warn_if_not_smooth(k, X)
    joint.check_joint_memory(X, "fit_penalized(solver=\"direct\")")
    Kfull, A, sw = joint.exact_system(k, X, jnp.asarray(ridge, dt), jnp.asarray(kappa, dt))
    c, ok = _exact_solve(A, sw, Y)
    if not bool(ok):
        raise ValueError(
            f"S Kfull S + n*ridge*I (the symmetrised joint system) is not positive "
            f"definite in {dt} (Cholesky failed). Increase `ridge`, check the kernel is "
            "positive definite and smooth, or enable float64 with ntk_poison.enable_x64().")
    info: Tuple[Tuple[str, Any], ...] = (("solver", "direct"),)
    if penalty == "loss":
        tol = _validate.default_tol(dt) if tol is None else float(tol)
        maxiter = 100 if maxiter is None else int(maxiter)
        c, it, g, g0, conv, stalled = _newton_loss(
            Kfull, Y, jnp.asarray(ridge, dt), jnp.asarray(kappa, dt), c,
            jnp.asarray(tol, dt), maxiter)
        it, g, g0, conv, stalled = int(it), float(g), float(g0), bool(conv), bool(stalled)
        info = (("solver", "newton"), ("iterations", it), ("grad_norm", g),
                ("grad_norm0", g0), ("converged", conv), ("stalled", stalled))
        if not conv:
            rel = g / max(g0, 1e-300)
            e = math.floor(math.log10(rel)) - 1        # rel rounded UP to 2 digits
            reachable = math.ceil(rel / 10.0 ** e) * 10.0 ** e
            why = (f"J stopped decreasing in {dt} (the rounding floor of this problem) "
                   f"at relative |grad J| {rel:.3g}; pass tol >= {reachable:.2g} to "
                   "accept that, or raise `ridge`" if stalled else
                   f"relative |grad J| {rel:.3g}; raise `maxiter` or `ridge`, or lower "
                   "`kappa`")
            warnings.warn(
                f"fit_penalized(penalty=\"loss\") did not reach tol {tol:g} in {it} "
                f"Newton iterations: {why}.", ConvergenceWarning, stacklevel=2)
    alpha, beta = joint.unpack(c, shape, scalar)
    return PenalizedModel(kernel=k, X=X, y=y, alpha=alpha, beta=beta, ridge=ridge,
                          kappa=kappa, penalty=penalty, info=info)


@jax.jit
def _newton_loss(Kfull, Y, ridge, kappa, c0, tol, maxiter):
    """The loss-penalty minimiser: :func:`ntk_poison.linalg.newton_lm` on
    ``J(c) = Jdata(Kfull c) + (lam/2) c^T Kfull c`` from the output-penalty ``c0``."""
    obj = lambda u: penalty_mod.joint_objective(u, Y, kappa, "loss")  # noqa: E731
    return linalg.newton_lm(obj, Kfull, ridge, c0, tol, maxiter)


# --------------------------------------------------------------------------- CG solver

@functools.partial(jax.jit, static_argnums=(0, 6))
def _cg_solve(k: Kernel, X, Y, ridge, kappa, tol, block: int, maxiter, idx=None):
    """Preconditioned CG (:func:`ntk_poison.linalg.conjugate_gradients`) on
    ``(S Kfull S + n lam I) z = [Y; 0]``, all columns at once, matrix-free.

    Preconditioner: Jacobi ``diag(S Kfull S) + n lam`` when ``idx`` is None, else the
    Nystrom preconditioner of :func:`ntk_poison.linalg.column_nystrom` on the joint
    columns ``idx`` (one blocked product of r columns). Returns ``c = S z``, the
    iterations and the true relative residual ``max_col |b - A z| / |b|``.
    """
    n = X.shape[0]
    N = n * (1 + joint.flat_dim(X))
    sw = joint.sqrt_weights(n, N, kappa, X.dtype)
    shift = n * ridge
    matvec = joint.joint_matvec(k, X, sw, shift, block)
    if idx is None:
        kd, md = joint.joint_diag(k, X)
        precond = jnp.concatenate([kd, kappa * md]) + shift
        precond = jnp.where(precond > 0, precond, 1.0)
    else:
        precond = linalg.column_nystrom(matvec, idx, N, X.dtype, shift)
    x, it, res = linalg.conjugate_gradients(matvec, joint.ybar(Y, N), precond, tol, maxiter)
    return sw[:, None] * x, it, res


def _fit_cg(k, X, Y, y, scalar, ridge, kappa, tol, maxiter, block_size,
            preconditioner="jacobi", precond_rank=None, key=None):
    n, shape, dt = X.shape[0], X.shape[1:], X.dtype
    d = joint.flat_dim(X)
    N = n * (1 + d)
    preconditioner = _validate.choice("preconditioner", preconditioner,
                                      ("jacobi", "nystrom"))
    idx = None
    if preconditioner == "nystrom":
        if precond_rank is None:
            rank = int(min(N, max(100, int(2 * np.sqrt(N)))))
        else:
            _validate.positive_int("precond_rank", precond_rank)
            rank = int(precond_rank)
            if rank > N:
                raise ValueError(f"`precond_rank` = {rank} exceeds the joint size N = "
                                 f"n (1 + d) = {N}; use at most N.")
        idx = jax.random.choice(_validate.as_key(key), N, (rank,), replace=False)
    tol = _validate.default_tol(dt) if tol is None else float(tol)
    maxiter = min(10 * N, 10000) if maxiter is None else int(maxiter)
    if block_size is not None:
        _validate.nonneg("block_size", block_size, integer=True, positive=True)
    block = joint.default_block(n, d, dt.itemsize) if block_size is None else int(block_size)
    c, it, res = _cg_solve(k, X, Y, jnp.asarray(ridge, dt), jnp.asarray(kappa, dt),
                           jnp.asarray(tol, dt), block, maxiter, idx)
    it, res = int(it), float(res)
    if not np.all(np.isfinite(np.asarray(c))):
        raise ValueError("Conjugate gradients produced NaN/inf: S Kfull S + n*ridge*I is "
                         "not positive definite. Increase `ridge` (> 0 is needed unless "
                         "the joint Gram matrix is strictly positive definite).")
    conv = res <= 10 * tol
    if not conv:
        warnings.warn(f"CG stopped after {it} iterations at relative residual {res:.3g} "
                      f"(tol {tol:g}); raise `maxiter` or `ridge`.", ConvergenceWarning,
                      stacklevel=3)
    alpha, beta = joint.unpack(c, shape, scalar)
    info = (("solver", "cg"), ("iterations", it), ("residual", res), ("converged", conv))
    return PenalizedModel(kernel=k, X=X, y=y, alpha=alpha, beta=beta, ridge=ridge,
                          kappa=kappa, penalty="output", info=info)


# --------------------------------------------------------------------------- many kappas

@functools.partial(jax.jit, static_argnums=0)
def _schur_parts(k: Kernel, X, ridge):
    """B11 = K + n lam I (Cholesky L), P = B11^-1 Dp, eigh of C = M - Dp^T P."""
    n = X.shape[0]
    K, Dp, M = joint.gram_blocks(k, X)
    L = jnp.linalg.cholesky(K + n * ridge * jnp.eye(n, dtype=X.dtype))
    P = jax.scipy.linalg.cho_solve((L, True), Dp)
    C = M - Dp.T @ P
    e, Q = jnp.linalg.eigh(0.5 * (C + C.T))
    return K, L, Dp, P, jnp.maximum(e, 0.0), Q


def _schur_weights(kappa, e, shift):
    """w_k = kappa / (kappa e_k + n lam) = 1 / (e_k + mu), mu = n lam / kappa; 0 at kappa=0."""
    den = kappa * e + shift
    return jnp.where((kappa > 0) & (den > 0), kappa / jnp.where(den > 0, den, 1.0), 0.0)


@jax.jit
def _schur_sweep(L, Dp, P, e, Q, Y, kappas, shift):
    a0 = jax.scipy.linalg.cho_solve((L, True), Y)      # KRR weights (n, r)
    u = Q.T @ (Dp.T @ a0)

    def one(kappa):
        beta = -Q @ (_schur_weights(kappa, e, shift)[:, None] * u)
        return jnp.concatenate([a0 - P @ beta, beta])

    return jax.vmap(one)(kappas)                       # (K, N, r)


@jax.jit
def _schur_dof(K, L, P, e, Q, kappas, shift):
    tr0 = jnp.trace(jax.scipy.linalg.cho_solve((L, True), K))
    v2 = jnp.sum((Q.T @ P.T) ** 2, axis=1)
    return jax.vmap(lambda kap: tr0 - shift * jnp.sum(_schur_weights(kap, e, shift) * v2)
                    )(kappas)


def _schur(k, X, ridge):
    joint.warn_if_not_smooth(k, X)
    joint.check_joint_memory(X, "the kappa sweep", copies=5)
    parts = _schur_parts(k, X, jnp.asarray(ridge, X.dtype))
    if not bool(jnp.all(jnp.isfinite(parts[1]))):
        raise ValueError("K + n*ridge*I is not positive definite (Cholesky failed). "
                         "Increase `ridge` or enable float64 (ntk_poison.enable_x64()).")
    return parts


# --------------------------------------------------------------------------- restricted

@functools.partial(jax.jit, static_argnums=(0, 3))
def _restricted_parts(k: Kernel, X, ridge, block: int):
    """Orthonormal coordinates of span{k(., x_j)} and the gradient Gram G_theta.

    ``K = U s U^T``; basis functions ``e_k = sum_j U_jk s_k^-1/2 k(., x_j)``;
    ``G_theta[k, l] = sum_(i,a) d_a e_k(x_i) d_a e_l(x_i)`` accumulated ``block``
    training points at a time (O(B n d) memory). Then ``D = s + n lam`` and
    ``D^-1/2 G_theta D^-1/2 = Qg diag(mu) Qg^T``.
    """
    n, shape = X.shape[0], X.shape[1:]
    K = k.fn(X, X)
    s, U = jnp.linalg.eigh(0.5 * (K + K.T))
    eps = jnp.finfo(K.dtype).eps
    keep = s > n * eps * jnp.max(jnp.abs(s))
    s = jnp.where(keep, s, 0.0)
    Us = U * jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, s, 1.0)), 0.0)
    nb = -(-n // block)
    pad = nb * block - n
    Xp = jnp.concatenate([X, jnp.broadcast_to(X[:1], (pad,) + shape)]) if pad else X
    mask = (jnp.arange(nb * block) < n).astype(X.dtype).reshape(nb, block)
    zero = jnp.zeros(shape, X.dtype)

    def acc(G, xs):
        Xb, mb = xs
        A = jax.jacfwd(joint.shifted_gram(k, Xb, X), argnums=0)(zero, zero)    # (B, n, *s)
        A = A.reshape(block, n, -1) * mb[:, None, None]
        Psi = jnp.einsum("ija,jk->iak", A, Us).reshape(-1, n)
        return G + Psi.T @ Psi, None

    G, _ = jax.lax.scan(acc, jnp.zeros((n, n), X.dtype),
                        (Xp.reshape((nb, block) + shape), mask))
    D = s + n * ridge
    D = jnp.where(D > 0, D, 1.0)
    Dm = 1.0 / jnp.sqrt(D)
    mu, Qg = jnp.linalg.eigh(Dm[:, None] * (0.5 * (G + G.T)) * Dm[None, :])
    return s, U, Us, Dm, jnp.maximum(mu, 0.0), Qg


@functools.partial(jax.jit, static_argnums=8)
def _restricted_sweep(s, U, Us, Dm, mu, Qg, Y, kappas, scalar: bool):
    b = Qg.T @ (Dm[:, None] * (jnp.sqrt(s)[:, None] * (U.T @ Y)))

    def one(kappa):
        theta = Dm[:, None] * (Qg @ (b / (1.0 + kappa * mu)[:, None]))
        return Us @ theta

    alphas = jax.vmap(one)(kappas)
    return alphas[..., 0] if scalar else alphas


@jax.jit
def _restricted_dof(s, Dm, mu, Qg, kappas):
    weights = jnp.sum(Qg ** 2 * (s * Dm ** 2)[:, None], axis=0)     # (n,)
    return jax.vmap(lambda kap: jnp.sum(weights / (1.0 + kap * mu)))(kappas)


def _restricted(k, X, ridge, block_size):
    n, d = X.shape[0], joint.flat_dim(X)
    block = joint.default_block(n, d, X.dtype.itemsize) if block_size is None else block_size
    _validate.nonneg("block_size", block, integer=True, positive=True)
    _validate.fits_in_memory(
        f"The restricted model for n={n}", 6 * n * n + 2 * block * n * d,
        X.dtype.itemsize, "Subsample the training set (ntk_poison.data.subset).")
    return _restricted_parts(k, X, jnp.asarray(ridge, X.dtype), int(block))


def fit_restricted(k: Kernel, X: Array, y: Array, ridge: float = 1e-3, kappa: float = 0.0,
                   *, block_size: Optional[int] = None) -> PenalizedModel:
    """The output-penalty minimiser over span{k(., x_j)} only (THEORY.md section 3).

    A *different, approximate* model (the exact one, :func:`fit_penalized`, also spans
    the derivative functions)::

        (K^2 + n lam K + kappa G) alpha = K y,   G_jl = sum_i grad k(x_i,x_j).grad k(x_i,x_l)

    solved in orthonormal coordinates of the span (module docstring). Only first
    derivatives of k are needed, so it is defined for the ReLU NTK too (at x = x' its
    autodiff gradient is the symmetric derivative across the cusp). Cost O(n^3 d)
    time, O(n^2 + B n d) memory (``block_size`` = B points per gradient block).
    Equals KRR at kappa = 0. Returns a :class:`PenalizedModel` with model="restricted"
    and beta = None.
    """
    path = fit_penalized_sweep(k, X, y, ridge, [_validate.scalar("kappa", kappa, _KAPPA_HINT)],
                               restricted=True, block_size=block_size)
    return path.at(0)


def fit_penalized_sweep(k: Kernel, X: Array, y: Array, ridge: float, kappas: Sequence[float],
                        *, restricted: bool = False,
                        block_size: Optional[int] = None) -> PenalizedPath:
    """Output-penalty minimisers for every kappa in ``kappas``, batched (vmap over kappa).

    Exact model (default): one Cholesky of ``K + n lam I`` and one eigendecomposition
    of the Schur complement ``C = M - Dp^T (K + n lam I)^-1 Dp``; each kappa is then a
    diagonal rescaling (module docstring), O((nd)^2). Cost O((nd)^3) once, i.e. about
    one direct fit, instead of one refit per kappa. ``restricted=True``: the model of
    :func:`fit_restricted`, from one generalised eigendecomposition (O(n^3 d) once,
    O(n^2) per kappa).

    Returns a :class:`PenalizedPath` with ``kappas`` and ``times = inf``; ``.at(i)`` is
    the model at ``kappas[i]``.
    """
    k, X, Y, y, scalar, ridge = joint.check_problem(k, X, y, ridge)
    kappas = check_kappas(kappas)
    dt = X.dtype
    kj = jnp.asarray(kappas.astype(dt))
    n, shape = X.shape[0], X.shape[1:]
    if restricted:
        parts = _restricted(k, X, ridge, block_size)
        alphas, betas = _restricted_sweep(*parts, Y, kj, scalar), None
        model = "restricted"
    else:
        K, L, Dp, P, e, Q = _schur(k, X, ridge)
        cs = _schur_sweep(L, Dp, P, e, Q, Y, kj, jnp.asarray(n * ridge, dt))
        alphas, betas = joint.unpack(cs, shape, scalar)
        model = "exact"
    return PenalizedPath(kernel=k, X=X, y=y, alpha=alphas, beta=betas, kappas=kj,
                         times=jnp.asarray(np.full(len(kappas), np.inf, dt)), ridge=ridge,
                         model=model, info=(("solver", "sweep"),))


def effective_dof(k: Kernel, X: Array, ridge: float, kappa: Any, *,
                  restricted: bool = False, block_size: Optional[int] = None) -> Any:
    """Effective degrees of freedom: the trace of the hat matrix ``y -> f(X)``.

    Exact model (default; the minimiser of :func:`fit_penalized`)::

        df(kappa) = tr[K (K + n lam I)^-1] - n lam sum_k w_k(kappa) ||V_k||^2

    (module docstring), equal to ``tr[Sigma (Sigma + n lam I + kappa G)^-1]`` in
    orthonormal coordinates of the joint span. ``restricted=True``: the model of
    :func:`fit_restricted`, ``df = tr[K (K^2 + n lam K + kappa G)^-1 K]`` with the dual
    ``G``. Both decrease strictly in kappa when the penalty sees the data.

    ``kappa`` may be a scalar (returns a float) or a 1-D array (returns an array,
    all from one eigendecomposition).
    """
    k = check_kernel(k)
    X = as_inputs(k, "X", X)
    ridge = _validate.scalar("ridge", ridge)
    scalar = np.ndim(kappa) == 0
    kappas = check_kappas(kappa)
    kj = jnp.asarray(kappas.astype(X.dtype))
    if restricted:
        s, U, Us, Dm, mu, Qg = _restricted(k, X, ridge, block_size)
        df = _restricted_dof(s, Dm, mu, Qg, kj)
    else:
        K, L, Dp, P, e, Q = _schur(k, X, ridge)
        df = _schur_dof(K, L, P, e, Q, kj, jnp.asarray(X.shape[0] * ridge, X.dtype))
    return float(df[0]) if scalar else df
