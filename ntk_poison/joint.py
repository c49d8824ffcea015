"""The joint Gram matrix of values and input gradients, and its matrix-vector product.

THEORY.md section 3. Notation: training inputs ``X = (x_1..x_n)`` of flat size d,
``N = n(1+d)`` functionals.

**Representer theorem over the joint span.** An objective that sees f only through
the n(1+d) functionals ``f(x_i)`` and ``d f/dx_a (x_i)`` and through ``||f||_H`` (the
input-gradient penalty of :mod:`ntk_poison.penalty`, either variant) has a minimiser
in the span of their representers ``k(., x_j)`` and ``d/dx'_b k(., x')|_{x_j}``::

    f(x) = sum_j alpha_j k(x, x_j) + sum_{j,b} beta_jb d/dx'_b k(x, x_j)
         = [k(x, X), d/dx' k(x, X)] c,        c = [alpha; vec(beta)] in R^N

(``krr.dual_predict``). The restricted span ``{k(., x_j)}`` alone is a *different*
model (``penalized.fit_restricted``).

**Joint Gram** (every block by autodiff of the kernel: ``jax.jacfwd`` of
``k(X + s, X + t)`` in the shifts s, t; entry (i, j) of a Gram matrix depends only on
``(x_i, x_j)``, so the derivative in a shift of all rows is the per-pair derivative)::

    Kfull = [[K,      Dp],     K_ij = k(x_i, x_j),  Dp_i,(jb) = d/dx'_b k(x_i, x_j)
             [Dp^T,   M ]]     M_(ia),(jb) = d^2/dx_a dx'_b k(x_i, x_j)

``Kfull c = [f(X); grad f(X)]`` (:func:`joint_apply`, matrix-free) and
``||f||_H^2 = c^T Kfull c``.

*Symmetrisation* (used by every solver). With ``W = diag(1 (n), kappa (n d))``,
``S = W^(1/2)`` and ``ybar = [y; 0]``, ``W Kfull + n lam I = S (S Kfull S + n lam I)
S^-1`` and ``S^-1 ybar = ybar``, so the output-penalty minimiser is
``c = S (S Kfull S + n lam I)^-1 ybar`` (:func:`exact_system`): symmetric positive
definite for lam > 0, so Cholesky, ``eigh`` and conjugate gradients apply, and
nothing is divided by ``sqrt(kappa)``.

**Smoothness.** The derivative functionals are bounded on the RKHS only if k is twice
continuously differentiable across ``x = x'``. RBF, Matern-5/2, linear and polynomial
kernels are. The ReLU NTK (``nt_fc``) is not: it has a cusp at ``x = x'``, its mixed
derivative grows like ``1/|x - x'|``, and autodiff at ``x = x'`` returns a value that
depends on neural-tangents' clipping (8.5e6 for b_std = 0, 0.25 for b_std = 0.1). The
exact model is then not defined; :func:`warn_if_not_smooth` issues a
:class:`NonSmoothKernelWarning`. The same check flags kernels whose autodiff second
derivative at ``x = x'`` is wrong even though the kernel is smooth (a distance
computed as ``sqrt(d2 + tiny)`` does that; ``kernels.matern52`` uses a Taylor branch
near the diagonal to avoid it). For a smooth network kernel use an erf network
(``stax.Erf``, ``nets.init(..., activation="erf")``).

Costs: ``joint_gram`` O(n^2 d^2) memory; ``joint_apply`` O(n^2 d) time and
O(B n + n d) memory for B rows a block.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate
from ntk_poison.kernels import Kernel
from ntk_poison.krr import as_inputs, check_kernel, dual_predict

Array = Any

__all__ = [
    "NonSmoothKernelWarning", "joint_gram", "gram_blocks", "assemble", "joint_apply",
    "joint_matvec", "joint_diag", "exact_system", "sqrt_weights", "ybar",
    "split", "unpack", "stack_functionals", "take", "check_problem", "flat_dim",
    "check_joint_memory", "default_block", "warn_if_not_smooth", "shifted_gram",
    "BIG_FIX",
]

BIG_FIX = (
    "Use penalized.fit_restricted(k, X, y, ridge, kappa) (the n x n restricted model, "
    "O(n^2 + B n d) memory, O(n^3 d) time; a different, approximate model) or "
    "penalized.fit_penalized(..., solver=\"cg\") (the exact model, matrix-free "
    "conjugate gradients: O(n d + B n) memory, O(n^2 d) time per iteration), or "
    "subsample the training set (ntk_poison.data.subset).")


class NonSmoothKernelWarning(UserWarning):
    """The kernel is not twice continuously differentiable across x = x'."""


# --------------------------------------------------------------------------- checks

def check_problem(k: Kernel, X: Array, y: Array, ridge: Any):
    """Validate (k, X, y, ridge); return (k, X, Y (n, r), y, scalar_y, ridge).

    Reshapes happen in numpy (host), so that no small XLA program is compiled per shape.
    """
    k = check_kernel(k)
    X = as_inputs(k, "X", X)
    _validate.array("y", y, ndim=(1, 2), floating=True)
    _validate.same_rows("X", X, "y", y)
    ridge = _validate.scalar("ridge", ridge)
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


def flat_dim(X) -> int:
    return int(np.prod(X.shape[1:]))


def check_joint_memory(X, what: str, copies: int = 4) -> None:
    n, d = X.shape[0], flat_dim(X)
    N = n * (1 + d)
    _validate.fits_in_memory(
        f"{what} (the joint Gram matrix of size n(1+d) = {N} for n={n}, d={d})",
        copies * N * N, X.dtype.itemsize, BIG_FIX)


# --------------------------------------------------------------------------- smoothness

@functools.partial(jax.jit, static_argnums=0)
def _mixed_along(k: Kernel, x0, v, hs):
    """``d^2/da db k(x0 + a v, x0 + h v + b v)`` at a = b = 0, for each offset h."""

    def q(h):
        f = lambda a, b: k.pair(x0 + a * v, x0 + (h + b) * v)
        return jax.grad(jax.grad(f, 1), 0)(jnp.zeros((), x0.dtype), jnp.zeros((), x0.dtype))

    return jax.vmap(q)(hs)


def warn_if_not_smooth(k: Kernel, X) -> None:
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

def shifted_gram(k: Kernel, X1, X2):
    """``F(s, t) = k(X1 + s, X2 + t)``: shifts of every row, for autodiff."""

    def F(s, t):
        return k.fn(X1 + s, X2 + t)

    return F


@functools.partial(jax.jit, static_argnums=0)
def gram_blocks(k: Kernel, X):
    """K (n, n), Dp (n, n d) and M (n d, n d) of the joint Gram (module docstring)."""
    n, d = X.shape[0], flat_dim(X)
    zero = jnp.zeros(X.shape[1:], X.dtype)
    F = shifted_gram(k, X, X)
    K = F(zero, zero)
    dF = jax.jacfwd(F, argnums=1)                   # (n, n, *s): d/dx'_b k(x_i, x_j)
    Dp = dF(zero, zero).reshape(n, n * d)
    M = jax.jacfwd(dF, argnums=0)(zero, zero)       # (n, n, *s_b, *s_a)
    M = M.reshape(n, n, d, d).transpose(0, 3, 1, 2).reshape(n * d, n * d)
    return K, Dp, 0.5 * (M + M.T)


def assemble(K, Dp, M):
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
    check_joint_memory(X, "joint_gram", copies=2)
    return assemble(*gram_blocks(k, X))


def sqrt_weights(n: int, N: int, kappa, dtype):
    """The diagonal of S = W^(1/2): 1 on the n values, sqrt(kappa) on the n d gradients."""
    return jnp.concatenate([jnp.ones((n,), dtype),
                            jnp.full((N - n,), jnp.sqrt(kappa), dtype)])


def ybar(Y, N):
    return jnp.concatenate([Y, jnp.zeros((N - Y.shape[0], Y.shape[1]), Y.dtype)])


@functools.partial(jax.jit, static_argnums=0)
def exact_system(k: Kernel, X, ridge, kappa):
    """Kfull, the symmetrised ``A = S Kfull S + n lam I`` and diag(S)."""
    n = X.shape[0]
    Kfull = assemble(*gram_blocks(k, X))
    N = Kfull.shape[0]
    sw = sqrt_weights(n, N, kappa, X.dtype)
    A = sw[:, None] * Kfull * sw[None, :] + n * ridge * jnp.eye(N, dtype=X.dtype)
    return Kfull, A, sw


# --------------------------------------------------------------------------- Kfull @ c

def joint_apply(k: Kernel, X, alpha, beta, block: int):
    """``Kfull [alpha; beta] = [f(X); grad f(X)]`` without forming Kfull.

    ``alpha`` (n, r), ``beta`` (n, *s, r). Values by :func:`dual_predict`; input
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
        vals, vjp = jax.vjp(lambda Z: dual_predict(k, X, alpha, beta, Z), Xb)
        eye = jnp.eye(r, dtype=vals.dtype)
        grads = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, vals.shape))[0],
                         out_axes=-1)(eye)
        return vals, grads

    vals, grads = jax.lax.map(one, Xp)
    return (vals.reshape((nb * block, r))[:n],
            grads.reshape((nb * block,) + shape + (r,))[:n])


def split(c, n: int, shape):
    """``c (N, r) -> alpha (n, r), beta (n, *s, r)``."""
    r = c.shape[1]
    return c[:n], c[n:].reshape((n,) + tuple(shape) + (r,))


@functools.partial(jax.jit, static_argnums=(1, 2))
def unpack(c, shape: Tuple[int, ...], scalar: bool):
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
def take(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def stack_functionals(vals, grads):
    n, r = vals.shape
    return jnp.concatenate([vals, grads.reshape(-1, r)])


def default_block(n: int, d: int, itemsize: int) -> int:
    budget = _validate.memory_budget_bytes() // 8
    return int(max(1, min(n, 1024, budget // max(1, 16 * (n + d) * itemsize))))


@functools.partial(jax.jit, static_argnums=0)
def joint_diag(k: Kernel, X):
    """diag(Kfull): k(x_i, x_i) and d^2/dx_a dx'_a k(x_i, x_i), by autodiff; O(n d^2)."""
    shape = X.shape[1:]
    d = flat_dim(X)
    E = jnp.eye(d, dtype=X.dtype).reshape((d,) + shape)

    def point(x):
        def mixed(e):
            f = lambda a, b: k.pair(x + a * e, x + b * e)
            z = jnp.zeros((), x.dtype)
            return jax.grad(jax.grad(f, 1), 0)(z, z)

        return jax.vmap(mixed)(E)

    return k.diag(X), jax.lax.map(point, X).reshape(-1)


def joint_matvec(k: Kernel, X, sw, shift, block: int):
    """``z -> (S Kfull S + shift I) z`` for ``z (N, r)``, matrix-free (:func:`joint_apply`).

    ``sw`` is the diagonal of S (:func:`sqrt_weights`); traceable (call it inside jit).
    """
    n, shape = X.shape[0], X.shape[1:]

    def matvec(z):
        a, b = split(sw[:, None] * z, n, shape)
        vals, grads = joint_apply(k, X, a, b, block)
        return sw[:, None] * stack_functionals(vals, grads) + shift * z

    return matvec
