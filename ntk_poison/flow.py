"""The input-gradient-penalty defence in the kernel regime (THEORY.md section 3).

Notation: training inputs ``X = (x_1..x_n)`` of flat size d, targets ``y`` ((n,) or
(n, r)), relative ridge ``lam`` (absolute ``n*lam``), penalty weight ``kappa``.

**The objective** (both variants; THEORY.md section 3)::

    J(f) = (1/2n) sum_i (f(x_i) - y_i)^2 + (lam/2) ||f||_H^2 + (kappa/2n) sum_i P_i(f)

    penalty="output":  P_i = ||grad_x f(x_i)||^2                      (linear-quadratic)
    penalty="loss":    P_i = ||grad_x L_i||^2 = (f(x_i) - y_i)^2 ||grad_x f(x_i)||^2
                       (the paper's; for vector outputs ||sum_o e_io grad f_o(x_i)||^2)

**Representer theorem over the joint span.** J depends on f only through the n(1+d)
functionals ``f(x_i)`` and ``d f/dx_a (x_i)`` and through ``||f||_H``. Projecting f on
the span of their representers ``k(., x_j)`` and ``d/dx'_b k(., x')|_{x_j}`` keeps every
functional and does not increase the norm, so a minimiser (for either penalty, the
nonlinear one included) has the form::

    f(x) = sum_j alpha_j k(x, x_j) + sum_{j,b} beta_jb d/dx'_b k(x, x_j)
         = [k(x, X), d/dx' k(x, X)] c,        c = [alpha; vec(beta)] in R^N, N = n(1+d)

The restricted span ``{k(., x_j)}`` alone is a *different* model (:func:`fit_restricted`).

**Joint Gram** (every block by autodiff of the kernel: ``jax.jacfwd`` of
``k(X + s, X + t)`` in the shifts s, t; entry (i, j) of a Gram matrix depends only on
``(x_i, x_j)``, so the derivative in a shift of all rows is the per-pair derivative)::

    Kfull = [[K,      Dp],     K_ij = k(x_i, x_j),  Dp_i,(jb) = d/dx'_b k(x_i, x_j)
             [Dp^T,   M ]]     M_(ia),(jb) = d^2/dx_a dx'_b k(x_i, x_j)

``Kfull c = [f(X); grad f(X)]`` and ``||f||_H^2 = c^T Kfull c``. With
``W = diag(1 (n), kappa (n d))`` and ``ybar = [y; 0]`` the output-penalty minimiser is::

    c = (W Kfull + n lam I)^-1 ybar

*Symmetrisation* (used by every solver here). With ``S = W^(1/2) = diag(1, sqrt(kappa))``,
``W Kfull + n lam I = S (S Kfull S + n lam I) S^-1`` and ``S^-1 ybar = ybar`` (the
derivative block of ybar is zero), so::

    c = S (S Kfull S + n lam I)^-1 ybar

``S Kfull S + n lam I`` is symmetric positive definite for lam > 0: Cholesky (half the
cost of LU, backward stable), ``eigh`` for the flow and conjugate gradients for the
matrix-free solver all apply. Nothing is divided by ``sqrt(kappa)``, so kappa = 0 needs
no special case: the derivative block decouples and c = [(K + n lam I)^-1 y; 0], plain
KRR (:func:`fit_penalized` at kappa = 0 calls :func:`ntk_poison.krr.fit` itself, so it
is KRR to the last bit).

**Smoothness.** The derivative functionals are bounded on the RKHS only if k is twice
continuously differentiable across ``x = x'``. RBF, Matern-5/2, linear and polynomial
kernels are. The ReLU NTK (``nt_fc``) is not: it has a cusp at ``x = x'``, its mixed
derivative grows like ``1/|x - x'|``, and autodiff at ``x = x'`` returns a value that
depends on neural-tangents' clipping (8.5e6 for b_std = 0, 0.25 for b_std = 0.1). The
exact model is then not defined; a :class:`NonSmoothKernelWarning` is issued. The
same check flags kernels whose autodiff second derivative at ``x = x'`` is wrong even
though the kernel is smooth (a distance computed as ``sqrt(d2 + tiny)`` does that;
``kernels.matern52`` uses a Taylor branch near the diagonal to avoid it). The
restricted model needs only first derivatives. For a smooth network kernel use an
erf network (``stax.Erf``, ``nets.init(..., activation="erf")``).

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

from ntk_poison import _validate
from ntk_poison import krr
from ntk_poison.kernels import Kernel
from ntk_poison.krr import as_inputs, check_kernel

Array = Any

__all__ = [
    "PenalizedModel", "PenalizedPath", "NonSmoothKernelWarning", "ConvergenceWarning",
    "fit_penalized", "fit_penalized_sweep", "fit_restricted", "kernel_flow",
    "effective_dof", "joint_gram", "PENALTIES",
]

PENALTIES = ("output", "loss")
_SOLVERS = ("direct", "cg")
_METHODS = ("closed_form", "ode")

_BIG_FIX = (
    "Use flow.fit_restricted(k, X, y, ridge, kappa) (the n x n restricted model, "
    "O(n^2 + B n d) memory, O(n^3 d) time; a different, approximate model) or "
    "flow.fit_penalized(..., solver=\"cg\") (the exact model, matrix-free conjugate "
    "gradients: O(n d + B n) memory, O(n^2 d) time per iteration), or subsample the "
    "training set (ntk_poison.data.subset).")


class NonSmoothKernelWarning(UserWarning):
    """The kernel is not twice continuously differentiable across x = x'."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before its tolerance."""


# --------------------------------------------------------------------------- validation

def _check_penalty(penalty: Any) -> str:
    if penalty not in PENALTIES:
        raise ValueError(f"`penalty` must be one of {PENALTIES}, got {penalty!r}: "
                         "'output' penalises ||grad_x f||^2, 'loss' ||grad_x L||^2.")
    return penalty


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}.")
    return value


def _check_scalar(name: str, value: Any) -> float:
    if np.ndim(value) != 0:
        hint = ("; for many kappas use flow.fit_penalized_sweep" if name == "kappa"
                else "")
        raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(value)}{hint}.")
    _validate.nonneg(name, value)
    return float(value)


def _check_kappas(kappas: Any) -> np.ndarray:
    arr = np.asarray(kappas, dtype=float)
    if arr.ndim > 1 or arr.size == 0:
        raise ValueError("`kappas` must be a non-empty 1-D sequence of penalty weights, "
                         f"got shape {arr.shape}.")
    _validate.nonneg("kappas", arr)
    return np.atleast_1d(arr)


def _check_times(times: Any) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(times, dtype=float))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`times` must be a non-empty 1-D array, got shape {arr.shape}.")
    _validate.nonneg("times", arr)
    if np.any(np.diff(arr) <= 0):
        raise ValueError("`times` must be strictly increasing, e.g. np.linspace(0, T, 20) "
                         "or np.geomspace(1e-2, T, 20); sort them and drop duplicates.")
    return arr


def _prepare(k: Kernel, X: Array, y: Array, ridge: Any):
    """Validate (k, X, y, ridge); return (k, X, Y (n, r), y, scalar_y, ridge).

    Reshapes happen in numpy (host), so that no small XLA program is compiled per shape.
    """
    k = check_kernel(k)
    X = as_inputs(k, "X", X)
    _validate.array("y", y, ndim=(1, 2), floating=True)
    _validate.same_rows("X", X, "y", y)
    ridge = _check_scalar("ridge", ridge)
    if X.shape[0] == 0:
        raise ValueError("`X` is empty; pass at least one training point.")
    y_np = np.asarray(y)
    dtype = jnp.result_type(X.dtype, y_np.dtype)
    if X.dtype != dtype:
        X = X.astype(dtype)
    y_np = y_np.astype(dtype)
    scalar_y = y_np.ndim == 1
    Y = jnp.asarray(y_np[:, None] if scalar_y else y_np)
    return k, X, Y, jnp.asarray(y_np), scalar_y, ridge


def _flat_dim(X) -> int:
    return int(np.prod(X.shape[1:]))


def _check_joint_memory(X, what: str, copies: int = 4) -> None:
    n, d = X.shape[0], _flat_dim(X)
    N = n * (1 + d)
    _validate.fits_in_memory(
        f"{what} (the joint Gram matrix of size n(1+d) = {N} for n={n}, d={d})",
        copies * N * N, X.dtype.itemsize, _BIG_FIX)


# --------------------------------------------------------------------------- smoothness

@functools.partial(jax.jit, static_argnums=0)
def _mixed_along(k: Kernel, x0, v, hs):
    """``d^2/da db k(x0 + a v, x0 + h v + b v)`` at a = b = 0, for each offset h."""

    def q(h):
        f = lambda a, b: k.pair(x0 + a * v, x0 + (h + b) * v)
        return jax.grad(jax.grad(f, 1), 0)(jnp.zeros((), x0.dtype), jnp.zeros((), x0.dtype))

    return jax.vmap(q)(hs)


def _warn_if_not_smooth(k: Kernel, X) -> None:
    """Warn if the mixed derivative of k jumps near the diagonal at X[0].

    For a kernel that is twice continuously differentiable across x = x', the mixed
    derivative along a direction v changes by O(h) at offset h; at a cusp it grows
    like 1/h (or is an artefact of clipping at h = 0).
    """
    x0 = np.asarray(X[0])
    v = np.random.default_rng(0).standard_normal(x0.shape).astype(x0.dtype)
    v = v / np.linalg.norm(v.ravel())
    scale = max(1.0, float(np.linalg.norm(x0.ravel())))
    hs = np.asarray([0.0, 1e-4 * scale, 1e-3 * scale], x0.dtype)
    q = np.asarray(_mixed_along(k, jnp.asarray(x0), jnp.asarray(v), jnp.asarray(hs)),
                   dtype=float)
    tiny = 1e-300
    jump = abs(q[1] - q[0]) > 0.05 * (abs(q[0]) + abs(q[2])) + tiny
    if not np.all(np.isfinite(q)) or jump:
        warnings.warn(
            f"Kernel {k!r} does not look twice continuously differentiable across "
            f"x = x', or its autodiff second derivative is wrong there: its mixed "
            f"derivative d^2k/dx dx' along a direction is {q[0]:.4g} at x' = x but "
            f"{q[1]:.4g} at |x' - x| = {float(hs[1]):.1e}. The diagonal blocks of the "
            "joint Gram matrix are then artefacts (for a kernel with a cusp at x = x', "
            "such as the ReLU NTK of nt_fc, derivative evaluations grad f(x_i) are not "
            "even bounded on the RKHS, so the exact penalised model is not defined). "
            "Prefer flow.fit_restricted (first derivatives only) or a kernel that is "
            "smooth at x = x' with exact autodiff there (rbf, linear).",
            NonSmoothKernelWarning, stacklevel=3)


# --------------------------------------------------------------------------- joint Gram

def _shifted(k: Kernel, X1, X2):
    """``F(s, t) = k(X1 + s, X2 + t)``: shifts of every row, for autodiff."""

    def F(s, t):
        return k.fn(X1 + s, X2 + t)

    return F


@functools.partial(jax.jit, static_argnums=0)
def _gram_blocks(k: Kernel, X):
    """K (n, n), Dp (n, n d) and M (n d, n d) of the joint Gram (module docstring)."""
    n, d = X.shape[0], _flat_dim(X)
    zero = jnp.zeros(X.shape[1:], X.dtype)
    F = _shifted(k, X, X)
    K = F(zero, zero)
    dF = jax.jacfwd(F, argnums=1)                   # (n, n, *s): d/dx'_b k(x_i, x_j)
    Dp = dF(zero, zero).reshape(n, n * d)
    M = jax.jacfwd(dF, argnums=0)(zero, zero)       # (n, n, *s_b, *s_a)
    M = M.reshape(n, n, d, d).transpose(0, 3, 1, 2).reshape(n * d, n * d)
    return K, Dp, 0.5 * (M + M.T)


def _assemble(K, Dp, M):
    Kfull = jnp.block([[K, Dp], [Dp.T, M]])
    return 0.5 * (Kfull + Kfull.T)


def joint_gram(k: Kernel, X: Array) -> jax.Array:
    """The joint Gram matrix ``Kfull`` of values and input gradients at X.

    Rows/columns are ordered ``[f(x_1..x_n); df/dx_a(x_i)]`` with the gradient block
    point-major (index ``n + i d + a``, a over the flattened input). Shape
    ``(n(1+d), n(1+d))``; built by autodiff of ``k``; O(n^2 d^2) memory.
    """
    k = check_kernel(k)
    X = as_inputs(k, "X", X)
    _check_joint_memory(X, "joint_gram", copies=2)
    return _assemble(*_gram_blocks(k, X))


def _sqrt_weights(n: int, N: int, kappa, dtype):
    """The diagonal of S = W^(1/2): 1 on the n values, sqrt(kappa) on the n d gradients."""
    return jnp.concatenate([jnp.ones((n,), dtype),
                            jnp.full((N - n,), jnp.sqrt(kappa), dtype)])


def _ybar(Y, N):
    return jnp.concatenate([Y, jnp.zeros((N - Y.shape[0], Y.shape[1]), Y.dtype)])


# --------------------------------------------------------------------------- predictions

def _dual_predict(k: Kernel, X, alpha, beta, x):
    """``k(x, X) alpha + sum_j d/dx' k(x, x_j) . beta_j`` for a batch x.

    The derivative term is one forward-mode derivative of ``Z -> k(x, Z)`` at X with
    tangent beta (column j of the Gram matrix depends only on row j of Z), summed over
    j: O(m n d). ``alpha`` is (n,) or (n, r); ``beta`` (n, *s) or (n, *s, r) or None.
    """
    out = k.fn(x, X) @ alpha
    if beta is None:
        return out
    f = lambda Z: k.fn(x, Z)

    def deriv(B):
        return jax.jvp(f, (X,), (B,))[1].sum(axis=1)

    if alpha.ndim == 1:
        return out + deriv(beta)
    return out + jax.vmap(deriv, in_axes=-1, out_axes=-1)(beta)


def _scalar_fn(k: Kernel, X, alpha, beta):
    def f(x):
        return _dual_predict(k, X, alpha, beta, x[None])[0]

    return f


_predict = jax.jit(_dual_predict, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _input_grad(k: Kernel, X, alpha, beta, x):
    return jax.vmap(jax.grad(_scalar_fn(k, X, alpha, beta)))(x)


@functools.partial(jax.jit, static_argnums=0)
def _input_jacobian(k: Kernel, X, alpha, beta, x):
    return jax.vmap(jax.jacrev(_scalar_fn(k, X, alpha, beta)))(x)


@functools.partial(jax.jit, static_argnums=0)
def _input_hessian(k: Kernel, X, alpha, beta, x):
    f = _scalar_fn(k, X, alpha, beta)
    shape = x.shape[1:]
    return jax.vmap(jax.hessian(lambda v: f(v.reshape(shape))))(x.reshape(x.shape[0], -1))


@functools.partial(jax.jit, static_argnums=0)
def _path_predict(k: Kernel, X, alphas, betas, x):
    # k(x, X) does not depend on the member, so vmap computes it once.
    return jax.vmap(lambda a, b: _dual_predict(k, X, a, b, x))(alphas, betas)


@functools.partial(jax.jit, static_argnums=0)
def _path_input_grad(k: Kernel, X, alphas, betas, x):
    return jax.vmap(lambda a, b: jax.vmap(jax.grad(_scalar_fn(k, X, a, b)))(x))(alphas, betas)


# --------------------------------------------------------------------------- Kfull @ c

def _joint_apply(k: Kernel, X, alpha, beta, block: int):
    """``Kfull [alpha; beta] = [f(X); grad f(X)]`` without forming Kfull.

    ``alpha`` (n, r), ``beta`` (n, *s, r). Values by :func:`_dual_predict`; input
    gradients by one reverse pass of ``sum_i f(Z)_i`` (row i depends only on Z_i).
    Rows are processed ``block`` at a time (``lax.map``): O(n^2 d) time, O(B n + n d)
    memory. Returns values (n, r) and gradients (n, *s, r).
    """
    n, shape, r = X.shape[0], X.shape[1:], alpha.shape[1]
    nb = -(-n // block)
    pad = nb * block - n
    Xp = jnp.concatenate([X, jnp.broadcast_to(X[:1], (pad,) + shape)]) if pad else X
    Xp = Xp.reshape((nb, block) + shape)

    def one(Xb):
        vals, vjp = jax.vjp(lambda Z: _dual_predict(k, X, alpha, beta, Z), Xb)
        eye = jnp.eye(r, dtype=vals.dtype)
        grads = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, vals.shape))[0],
                         out_axes=-1)(eye)
        return vals, grads

    vals, grads = jax.lax.map(one, Xp)
    return (vals.reshape((nb * block, r))[:n],
            grads.reshape((nb * block,) + shape + (r,))[:n])


def _split(c, n: int, shape):
    """``c (N, r) -> alpha (n, r), beta (n, *s, r)``."""
    r = c.shape[1]
    return c[:n], c[n:].reshape((n,) + tuple(shape) + (r,))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unpack(c, shape: Tuple[int, ...], scalar: bool):
    """``c (..., N, r) -> alpha (..., n[, r]), beta (..., n, *s[, r])``."""
    d = int(np.prod(shape))
    N, r = c.shape[-2:]
    n = N // (1 + d)
    lead = c.shape[:-2]
    alpha = c[..., :n, :]
    beta = c[..., n:, :].reshape(lead + (n,) + tuple(shape) + (r,))
    if scalar:
        return alpha[..., 0], beta[..., 0]
    return alpha, beta


@jax.jit
def _take(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _stack(vals, grads):
    n, r = vals.shape
    return jnp.concatenate([vals, grads.reshape(-1, r)])


def _data_objective(u, Y, kappa, penalty: str):
    """``J - (lam/2)||f||^2`` as a function of ``u = [f(X); grad f(X)]`` (N, r)."""
    n, r = Y.shape
    e = u[:n] - Y
    g = u[n:].reshape(n, -1, r)                       # (n, d, r)
    if penalty == "output":
        pen = jnp.sum(g * g)
    else:
        gl = jnp.einsum("ir,idr->id", e, g)           # grad_x L_i
        pen = jnp.sum(gl * gl)
    return (0.5 / n) * (jnp.sum(e * e) + kappa * pen)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9))
def _objective(k: Kernel, X, Y, alpha, beta, ridge, kappa, penalty: str, block: int,
               scalar: bool):
    """J at the model (alpha (n[, r]), beta (n, *s[, r]) or None), matrix-free."""
    if scalar:
        Y, alpha = Y[:, None], alpha[:, None]
        beta = None if beta is None else beta[..., None]
    if beta is None:
        vals = _dual_predict(k, X, alpha, None, X)
        norm2 = jnp.sum(alpha * vals)
        _, grads = _joint_apply(k, X, alpha, jnp.zeros(X.shape + (alpha.shape[1],),
                                                        X.dtype), block)
    else:
        vals, grads = _joint_apply(k, X, alpha, beta, block)
        norm2 = jnp.sum(alpha * vals) + jnp.sum(beta * grads)
    return _data_objective(_stack(vals, grads), Y, kappa, penalty) + 0.5 * ridge * norm2


# --------------------------------------------------------------------------- models

def _default_block(n: int, d: int, itemsize: int) -> int:
    budget = _validate.memory_budget_bytes() // 8
    return int(max(1, min(n, 1024, budget // max(1, 16 * (n + d) * itemsize))))


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["X", "y", "alpha", "beta"],
                   meta_fields=["kernel", "ridge", "kappa", "penalty", "model", "time",
                                "info"])
@dataclasses.dataclass(frozen=True)
class PenalizedModel:
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
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def scalar_output(self) -> bool:
        return self.alpha.ndim == 1

    @property
    def info_dict(self) -> dict:
        return dict(self.info)

    def as_function(self):
        """The prediction as a pure function of ONE input (no batch axis), for jax
        transforms (``jax.grad``, ``jax.hessian``, ...) and :mod:`ntk_poison.spectra`."""
        return _scalar_fn(self.kernel, self.X, self.alpha, self.beta)

    def _inputs(self, x, batch_size):
        return krr.model_inputs(self.kernel, self.X, self.alpha.dtype, x)

    def _batched(self, fn, x, batch_size):
        return krr.map_batches(fn, (self.kernel, self.X, self.alpha, self.beta), x,
                               batch_size)

    def predict(self, x: Array, *, batch_size: Optional[int] = 4096) -> jax.Array:
        """``f(x)``: ``(m,)`` for scalar targets, ``(m, r)`` otherwise."""
        return self._batched(_predict, self._inputs(x, batch_size), batch_size)

    def input_grad(self, x: Array, *, batch_size: Optional[int] = 1024) -> jax.Array:
        """``grad_x f(x)`` for scalar outputs, ``(m, *s)``."""
        if not self.scalar_output:
            raise ValueError("input_grad is for scalar outputs (y of shape (n,)); this "
                             "model has vector outputs: use input_jacobian.")
        return self._batched(_input_grad, self._inputs(x, batch_size), batch_size)

    def input_jacobian(self, x: Array, *, batch_size: Optional[int] = 256) -> jax.Array:
        """``d f / d x``: ``(m, r, *s)`` (``(m, *s)`` for scalar outputs)."""
        return self._batched(_input_jacobian, self._inputs(x, batch_size), batch_size)

    def input_hessian(self, x: Array, *, batch_size: Optional[int] = 64) -> jax.Array:
        """``hess_x f(x)`` for scalar outputs, ``(m, d, d)`` with d the flat size."""
        if not self.scalar_output:
            raise ValueError("input_hessian is for scalar outputs (y of shape (n,)).")
        x = self._inputs(x, batch_size)
        d = _flat_dim(x)
        _validate.fits_in_memory(
            "input_hessian's output (m, d, d)", x.shape[0] * d * d, x.dtype.itemsize,
            "Ask for fewer points at once, or use ntk_poison.spectra's matrix-free "
            "eigen-solver instead of the dense Hessian.")
        return self._batched(_input_hessian, x, batch_size)

    def objective(self, penalty: Optional[str] = None) -> jax.Array:
        """J at this model on its training set (module docstring), matrix-free.

        ``penalty`` overrides the model's own (e.g. to score an output-penalty fit
        under the loss-penalty objective). ``||f||_H^2 = alpha.f(X) + beta.grad f(X)``.
        """
        pen = self.penalty if penalty is None else _check_penalty(penalty)
        dt = self.alpha.dtype
        block = _default_block(self.n, _flat_dim(self.X), dt.itemsize)
        return _objective(self.kernel, self.X, self.y, self.alpha, self.beta,
                          jnp.asarray(self.ridge, dt), jnp.asarray(self.kappa, dt),
                          pen, block, self.scalar_output)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["X", "y", "alpha", "beta", "kappas", "times"],
                   meta_fields=["kernel", "ridge", "penalty", "model", "info"])
@dataclasses.dataclass(frozen=True)
class PenalizedPath:
    """A family of penalised models sharing a training set (immutable pytree).

    A :func:`kernel_flow` trajectory (``times`` increasing, ``kappas`` constant) or a
    :func:`fit_penalized_sweep` (``kappas`` varying, ``times`` = inf: minimisers).
    ``alpha`` and ``beta`` carry a leading member axis of length T.
    """

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

    @property
    def scalar_output(self) -> bool:
        return self.alpha.ndim == 2

    def at(self, i: int) -> PenalizedModel:
        """The model of member i (time index i of a trajectory, kappa index of a sweep)."""
        if not _validate.is_int_scalar(i) or not -len(self) <= i < len(self):
            raise ValueError(f"`i` must be an integer index in [0, {len(self)}), got {i!r}.")
        t = float(np.asarray(self.times)[i])
        alpha, beta = _take((self.alpha, self.beta), i)
        return PenalizedModel(
            kernel=self.kernel, X=self.X, y=self.y, alpha=alpha, beta=beta,
            ridge=self.ridge, kappa=float(np.asarray(self.kappas)[i]),
            penalty=self.penalty, model=self.model, time=None if math.isinf(t) else t,
            info=self.info)

    def _inputs(self, x):
        return krr.model_inputs(self.kernel, self.X, self.alpha.dtype, x)

    def _batched(self, fn, x, batch_size):
        return krr.map_batches(fn, (self.kernel, self.X, self.alpha, self.beta), x,
                               batch_size, axis=1)

    def predict(self, x: Array, *, batch_size: Optional[int] = 1024) -> jax.Array:
        """Predictions of every member: ``(T, m)`` (``(T, m, r)`` for vector targets)."""
        return self._batched(_path_predict, self._inputs(x), batch_size)

    def input_grad(self, x: Array, *, batch_size: Optional[int] = 256) -> jax.Array:
        """Input gradients of every member (scalar outputs): ``(T, m, *s)``."""
        if not self.scalar_output:
            raise ValueError("input_grad is for scalar outputs; use .at(i).input_jacobian.")
        return self._batched(_path_input_grad, self._inputs(x), batch_size)

    def objective(self, penalty: Optional[str] = None) -> jax.Array:
        """J of every member on the training set, ``(T,)`` (see PenalizedModel.objective)."""
        return jnp.stack([self.at(i).objective(penalty) for i in range(len(self))])


# --------------------------------------------------------------------------- exact fits

@functools.partial(jax.jit, static_argnums=0)
def _exact_system(k: Kernel, X, ridge, kappa):
    """Kfull, the symmetrised ``A = S Kfull S + n lam I`` and diag(S)."""
    n = X.shape[0]
    Kfull = _assemble(*_gram_blocks(k, X))
    N = Kfull.shape[0]
    sw = _sqrt_weights(n, N, kappa, X.dtype)
    A = sw[:, None] * Kfull * sw[None, :] + n * ridge * jnp.eye(N, dtype=X.dtype)
    return Kfull, A, sw


@jax.jit
def _exact_solve(A, sw, Y):
    """``c = S (S Kfull S + n lam I)^-1 [Y; 0]`` by Cholesky, and a PD flag."""
    L = jnp.linalg.cholesky(A)
    z = jax.scipy.linalg.cho_solve((L, True), _ybar(Y, A.shape[0]))
    return sw[:, None] * z, jnp.all(jnp.isfinite(L))


def _krr_as_penalized(k, X, y, ridge, kappa, penalty):
    m = krr.fit(k, X, y, ridge)
    beta = jnp.asarray(np.zeros(X.shape + tuple(y.shape[1:]), X.dtype))
    return PenalizedModel(kernel=k, X=X, y=y, alpha=m.alpha, beta=beta, ridge=ridge,
                          kappa=kappa, penalty=penalty, info=(("solver", "krr"),))


def fit_penalized(k: Kernel, X: Array, y: Array, ridge: float = 1e-3, kappa: float = 0.0,
                  *, penalty: str = "output", solver: str = "direct",
                  tol: Optional[float] = None, maxiter: Optional[int] = None,
                  block_size: Optional[int] = None) -> PenalizedModel:
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
      tol: relative tolerance (CG residual; Newton gradient). Default 1e-12 / 1e-10
        in float64, 1e-5 / 1e-4 in float32.
      maxiter: iteration cap (default min(10 N, 10000) for CG, 100 for Newton).
      block_size: rows per block of the CG matrix-vector product.

    Returns:
      A :class:`PenalizedModel` (model="exact"). At kappa = 0 it is
      :func:`ntk_poison.krr.fit`'s solution (beta = 0). Raises ValueError on bad
      input, a non-positive-definite system, or a joint Gram matrix over the memory
      budget with solver="direct" (the message names the alternatives).
    """
    k, X, Y, y, scalar, ridge = _prepare(k, X, y, ridge)
    kappa = _check_scalar("kappa", kappa)
    penalty = _check_penalty(penalty)
    solver = _check_choice("solver", solver, _SOLVERS)
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
    f64 = dt == jnp.float64
    if solver == "cg":
        _warn_if_not_smooth(k, X)
        return _fit_cg(k, X, Y, y, scalar, ridge, kappa, tol, maxiter, block_size)
    _warn_if_not_smooth(k, X)
    _check_joint_memory(X, "fit_penalized(solver=\"direct\")")
    Kfull, A, sw = _exact_system(k, X, jnp.asarray(ridge, dt), jnp.asarray(kappa, dt))
    c, ok = _exact_solve(A, sw, Y)
    if not bool(ok):
        raise ValueError(
            f"S Kfull S + n*ridge*I (the symmetrised joint system) is not positive "
            f"definite in {dt} (Cholesky failed). Increase `ridge`, check the kernel is "
            "positive definite and smooth, or enable float64 with ntk_poison.enable_x64().")
    info: Tuple[Tuple[str, Any], ...] = (("solver", "direct"),)
    if penalty == "loss":
        tol = (1e-10 if f64 else 1e-4) if tol is None else float(tol)
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
    alpha, beta = _unpack(c, shape, scalar)
    return PenalizedModel(kernel=k, X=X, y=y, alpha=alpha, beta=beta, ridge=ridge,
                          kappa=kappa, penalty=penalty, info=info)


# --------------------------------------------------------------------------- loss penalty

@jax.jit
def _newton_loss(Kfull, Y, ridge, kappa, c0, tol, maxiter):
    """Minimise ``J(c) = Jdata(Kfull c) + (lam/2) c^T Kfull c`` by Newton in function space.

    ``v = grad_u Jdata + lam c`` is the coefficient vector of the RKHS gradient of J
    (``||grad J||_H^2 = v^T Kfull v``) and the Hessian acts on coefficients as
    ``H_u Kfull + lam I`` (``H_u`` the Hessian of Jdata in u). The step solves
    ``((H_u + mu I) Kfull + lam I) dc = -v`` (LU): ``mu = 0`` is Newton's step, and
    ``mu >= -min eig(H_u)`` (Gershgorin bound) makes it a descent direction
    (``Kfull ((H_u + mu) Kfull + lam)^-1 = (H_u + mu + lam Kfull^-1)^-1`` is then
    positive definite). Levenberg-Marquardt control: a step is kept if J does not
    increase (mu /= 4), else mu grows (x 8). The loop also stops when a kept step no
    longer lowers J by more than a few ulps of J (the rounding floor: further steps
    only move c by noise). Nothing is factorised from Kfull, so no null directions
    are truncated; at the fixed point ``c = -grad_u Jdata / lam`` (the representer
    form). Returns c, iterations, ``||grad J||_H``, its value at f = 0, converged,
    stalled.
    """
    N, r = c0.shape
    Kb = jnp.kron(Kfull, jnp.eye(r, dtype=Kfull.dtype))       # acts on c.ravel()
    I = jnp.eye(N * r, dtype=Kfull.dtype)

    def Jdata(u):
        return _data_objective(u.reshape(N, r), Y, kappa, "loss")

    def J(cv):
        u = Kb @ cv
        return Jdata(u) + 0.5 * ridge * cv @ u

    def v_of(cv):
        return jax.grad(Jdata)(Kb @ cv) + ridge * cv

    def hnorm(v):
        return jnp.sqrt(jnp.maximum(v @ (Kb @ v), 0.0))

    hess = jax.hessian(Jdata)
    cv0 = c0.ravel()
    g0 = hnorm(v_of(jnp.zeros_like(cv0)))

    eps = jnp.finfo(Kfull.dtype).eps

    def cond(st):
        cv, Jv, v, mu, it, fails, stalled = st
        return (hnorm(v) > tol * g0) & (it < maxiter) & (fails < 60) & ~stalled

    def body(st):
        cv, Jv, v, mu, it, fails, _ = st
        H = hess(Kb @ cv)
        dc = jnp.linalg.solve((H + mu * I) @ Kb + ridge * I, -v)
        ok = jnp.all(jnp.isfinite(dc)) & (v @ (Kb @ dc) < 0)
        dc = jnp.where(ok, dc, 0.0)
        J_new = J(cv + dc)
        accept = ok & jnp.isfinite(J_new) & (J_new <= Jv)
        off = jnp.sum(jnp.abs(H), axis=1) - jnp.abs(jnp.diag(H))
        floor = jnp.maximum(-jnp.min(jnp.diag(H) - off), 0.0)
        scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(H))), 1e-30)
        mu_up = jnp.maximum(8.0 * mu, floor + 1e-8 * scale)
        mu_down = jnp.where(mu / 4.0 < 1e-12 * scale, 0.0, mu / 4.0)
        stalled = accept & (Jv - J_new <= 4.0 * eps * jnp.abs(Jv))
        cv_new = jnp.where(accept, cv + dc, cv)
        return (cv_new, jnp.where(accept, J_new, Jv),
                jnp.where(accept, v_of(cv_new), v), jnp.where(accept, mu_down, mu_up),
                it + 1, jnp.where(accept, 0, fails + 1), stalled)

    st0 = (cv0, J(cv0), v_of(cv0), jnp.zeros((), cv0.dtype), 0, 0, jnp.zeros((), bool))
    cv, Jv, v, mu, it, fails, stalled = jax.lax.while_loop(cond, body, st0)
    gn = hnorm(v)
    return cv.reshape(N, r), it, gn, g0, gn <= tol * g0, stalled


# --------------------------------------------------------------------------- CG solver

@functools.partial(jax.jit, static_argnums=0)
def _joint_diag(k: Kernel, X):
    """diag(Kfull): k(x_i, x_i) and d^2/dx_a dx'_a k(x_i, x_i), by autodiff; O(n d^2)."""
    shape = X.shape[1:]
    d = _flat_dim(X)
    E = jnp.eye(d, dtype=X.dtype).reshape((d,) + shape)

    def point(x):
        def mixed(e):
            f = lambda a, b: k.pair(x + a * e, x + b * e)
            z = jnp.zeros((), x.dtype)
            return jax.grad(jax.grad(f, 1), 0)(z, z)

        return jax.vmap(mixed)(E)

    return k.diag(X), jax.lax.map(point, X).reshape(-1)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _cg_solve(k: Kernel, X, Y, ridge, kappa, tol, block: int, maxiter):
    """Preconditioned CG on ``(S Kfull S + n lam I) z = [Y; 0]``, all columns at once.

    Jacobi preconditioner: ``diag(S Kfull S) + n lam``. Returns ``c = S z``, the
    iterations and the true relative residual ``max_col |b - A z| / |b|``.
    """
    n, shape = X.shape[0], X.shape[1:]
    N = n * (1 + _flat_dim(X))
    sw = _sqrt_weights(n, N, kappa, X.dtype)
    shift = n * ridge
    kd, md = _joint_diag(k, X)
    precond = jnp.concatenate([kd, kappa * md]) + shift
    precond = jnp.where(precond > 0, precond, 1.0)
    Ybar = _ybar(Y, N)

    def matvec(z):
        a, b = _split(sw[:, None] * z, n, shape)
        vals, grads = _joint_apply(k, X, a, b, block)
        return sw[:, None] * _stack(vals, grads) + shift * z

    minv = 1.0 / precond[:, None]
    bnorm = jnp.linalg.norm(Ybar, axis=0)

    def safe_div(a, b):
        return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)

    def cond(st):
        x, r, p, rz, it = st
        return (it < maxiter) & jnp.any(jnp.linalg.norm(r, axis=0) > tol * bnorm)

    def body(st):
        x, r, p, rz, it = st
        Ap = matvec(p)
        a = safe_div(rz, jnp.sum(p * Ap, axis=0))
        x = x + a * p
        r = r - a * Ap
        z = minv * r
        rz_new = jnp.sum(r * z, axis=0)
        p = z + safe_div(rz_new, rz) * p
        return x, r, p, rz_new, it + 1

    z0 = minv * Ybar
    st0 = (jnp.zeros_like(Ybar), Ybar, z0, jnp.sum(Ybar * z0, axis=0), 0)
    x, r, p, rz, it = jax.lax.while_loop(cond, body, st0)
    true_res = jnp.max(safe_div(jnp.linalg.norm(Ybar - matvec(x), axis=0), bnorm))
    return sw[:, None] * x, it, true_res


def _fit_cg(k, X, Y, y, scalar, ridge, kappa, tol, maxiter, block_size):
    n, shape, dt = X.shape[0], X.shape[1:], X.dtype
    d = _flat_dim(X)
    N = n * (1 + d)
    tol = (1e-12 if dt == jnp.float64 else 1e-5) if tol is None else float(tol)
    maxiter = min(10 * N, 10000) if maxiter is None else int(maxiter)
    if block_size is not None:
        _validate.nonneg("block_size", block_size, integer=True, positive=True)
    block = _default_block(n, d, dt.itemsize) if block_size is None else int(block_size)
    c, it, res = _cg_solve(k, X, Y, jnp.asarray(ridge, dt), jnp.asarray(kappa, dt),
                           jnp.asarray(tol, dt), block, maxiter)
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
    alpha, beta = _unpack(c, shape, scalar)
    info = (("solver", "cg"), ("iterations", it), ("residual", res), ("converged", conv))
    return PenalizedModel(kernel=k, X=X, y=y, alpha=alpha, beta=beta, ridge=ridge,
                          kappa=kappa, penalty="output", info=info)


# --------------------------------------------------------------------------- many kappas

@functools.partial(jax.jit, static_argnums=0)
def _schur_parts(k: Kernel, X, ridge):
    """B11 = K + n lam I (Cholesky L), P = B11^-1 Dp, eigh of C = M - Dp^T P."""
    n = X.shape[0]
    K, Dp, M = _gram_blocks(k, X)
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
    n = K.shape[0]
    tr0 = jnp.trace(jax.scipy.linalg.cho_solve((L, True), K))
    v2 = jnp.sum((Q.T @ P.T) ** 2, axis=1)
    return jax.vmap(lambda kap: tr0 - shift * jnp.sum(_schur_weights(kap, e, shift) * v2)
                    )(kappas)


def _schur(k, X, ridge):
    _warn_if_not_smooth(k, X)
    _check_joint_memory(X, "the kappa sweep", copies=5)
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
        A = jax.jacfwd(_shifted(k, Xb, X), argnums=0)(zero, zero)    # (B, n, *s)
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
    n, d = X.shape[0], _flat_dim(X)
    block = _default_block(n, d, X.dtype.itemsize) if block_size is None else block_size
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
    path = fit_penalized_sweep(k, X, y, ridge, [_check_scalar("kappa", kappa)],
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
    k, X, Y, y, scalar, ridge = _prepare(k, X, y, ridge)
    kappas = _check_kappas(kappas)
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
        alphas, betas = _unpack(cs, shape, scalar)
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
    ridge = _check_scalar("ridge", ridge)
    scalar = np.ndim(kappa) == 0
    kappas = _check_kappas(kappa)
    kj = jnp.asarray(kappas.astype(X.dtype))
    if restricted:
        s, U, Us, Dm, mu, Qg = _restricted(k, X, ridge, block_size)
        df = _restricted_dof(s, Dm, mu, Qg, kj)
    else:
        K, L, Dp, P, e, Q = _schur(k, X, ridge)
        df = _schur_dof(K, L, P, e, Q, kj, jnp.asarray(X.shape[0] * ridge, X.dtype))
    return float(df[0]) if scalar else df


# --------------------------------------------------------------------------- flow

@jax.jit
def _flow_closed_form(A, sw, Y, times):
    """``c(t) = S Q diag(-expm1(-e t / n) / e) Q^T ybar`` for each t (e = 0: t / n)."""
    n = Y.shape[0]
    e, Q = jnp.linalg.eigh(A)
    e = jnp.maximum(e, 0.0)
    proj = Q.T @ _ybar(Y, A.shape[0])
    pos = e > 0
    e_safe = jnp.where(pos, e, 1.0)

    def at(t):
        phi = jnp.where(pos, -jnp.expm1(-e_safe * t / n) / e_safe, t / n)
        return sw[:, None] * (Q @ (phi[:, None] * proj))

    return jax.vmap(at)(times)


@functools.partial(jax.jit, static_argnums=2)
def _stiffness(Kfull, A, n: int):
    """``e_max(S Kfull S + n lam I) / n`` (the linear flow's rate) and ``e_max(Kfull)``."""
    return jnp.linalg.eigvalsh(A)[-1] / n, jnp.linalg.eigvalsh(Kfull)[-1]


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
        return -(jax.grad(_data_objective)(u, Y, kappa, penalty) + ridge * c)

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
    A = krr._gram_plus_ridge(k, X, jnp.asarray(n * ridge, dt))
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
    k, X, Y, y, scalar, ridge = _prepare(k, X, y, ridge)
    kappa = _check_scalar("kappa", kappa)
    penalty = _check_penalty(penalty)
    times = _check_times(times)
    if method is None:
        method = "closed_form" if penalty == "output" else "ode"
    method = _check_choice("method", method, _METHODS)
    if method == "closed_form" and penalty == "loss":
        raise ValueError("The loss-penalty flow is nonlinear and has no closed form; use "
                         "method=\"ode\" (the default for penalty=\"loss\").")
    _validate.nonneg("step_scale", step_scale, positive=True)
    _validate.nonneg("max_steps", max_steps, integer=True, positive=True)
    if kappa == 0.0:
        return _flow_values_only(k, X, Y, y, scalar, ridge, times, penalty, method,
                                 step_scale, max_steps)
    _warn_if_not_smooth(k, X)
    _check_joint_memory(X, "kernel_flow")
    n, shape, dt = X.shape[0], X.shape[1:], X.dtype
    Kfull, A, sw = _exact_system(k, X, jnp.asarray(ridge, dt), jnp.asarray(kappa, dt))
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
    alphas, betas = _unpack(cs, shape, scalar)
    return PenalizedPath(kernel=k, X=X, y=y, alpha=alphas, beta=betas,
                         kappas=jnp.asarray(np.full(len(times), kappa, dt)), times=tj,
                         ridge=ridge, penalty=penalty, info=info)
