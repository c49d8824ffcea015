"""Gram matrices of large training sets, by row blocks (THEORY.md section 1, large n).

A Gram matrix ``K = k(X, X)`` of n points needs n^2 numbers: 28.8 GB in float64 at
n = 60,000. The large-n KRR solver (:func:`ntk_poison.krr.fit` with ``solver="cg"``)
only needs products ``K V`` and a low-rank preconditioner, which this module builds
from blocks of ``b`` rows, ``K[i*b:(i+1)*b] = k(X_block_i, X)``:

* :func:`gram_matvec`: ``V (n, c) -> K V`` recomputing the blocks at each call
  (O(n^2 d) time, O(b n) memory; never the n x n matrix);
* :func:`stored_gram` + :func:`stored_matvec`: the same blocks computed once and kept
  (n^2 numbers, optionally in float32; the product then upcasts one block at a time,
  so it accumulates in the solve's dtype);
* :func:`nystrom_factor`, :func:`pivoted_cholesky_factor`: ``B (n, r)`` with
  ``K ~ B B^T`` (the preconditioners of :func:`ntk_poison.linalg.low_rank_preconditioner`).

The rows are padded to a multiple of ``b`` with copies of the first row (a valid
input, so no NaN from a padded zero can reach the result); padded rows are dropped.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison.kernels import Kernel

Array = Any

__all__ = ["default_block_size", "padded_blocks", "gram_matvec", "blockwise_product",
           "stored_gram", "stored_matvec", "stored_product", "gram_diag", "nystrom_factor",
           "pivoted_cholesky_factor", "BLOCK_BYTES"]

#: the target size of one Gram row block, in bytes (the default ``block_size``)
BLOCK_BYTES = 1 << 27


def default_block_size(n: int, itemsize: int) -> int:
    """Rows per block so that a ``(b, n)`` block holds about :data:`BLOCK_BYTES`
    (128 MiB), between 1 and n."""
    return int(max(1, min(n, BLOCK_BYTES // max(1, n * itemsize))))


def padded_blocks(X: jax.Array, block: int) -> jax.Array:
    """``X (n, *s)`` as ``(ceil(n/b), b, *s)``, padded with copies of ``X[0]``."""
    n = X.shape[0]
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        X = jnp.concatenate([X, jnp.broadcast_to(X[:1], (pad,) + X.shape[1:])])
    return X.reshape((nb, block) + X.shape[1:])


@functools.partial(jax.jit, static_argnums=(0, 3))
def blockwise_product(k: Kernel, X, V, block: int):
    """``k(X, X) V`` for ``V (n, c)``, one ``(block, n)`` row block at a time (jitted;
    the kernel and ``block`` static); :func:`gram_matvec` is its checked wrapper."""
    n = X.shape[0]
    Xb = padded_blocks(X, block)
    out = jax.lax.map(lambda xb: k.fn(xb, X).astype(V.dtype) @ V, Xb)
    return out.reshape((-1,) + V.shape[1:])[:n]


def gram_matvec(k: Kernel, X: jax.Array, *, block_size: Optional[int] = None
                ) -> Callable[[Array], jax.Array]:
    """``V (n,) or (n, c) -> k(X, X) V``, one row block of the Gram matrix at a time.

    Memory O(b n) for the block (``b = block_size``, default
    :func:`default_block_size`), time O(n^2 d) per product; the n x n matrix is never
    held. Traceable (the returned function may be called under ``jit``).
    """
    n = X.shape[0]
    block = default_block_size(n, X.dtype.itemsize) if block_size is None else int(block_size)

    def matvec(V):
        if V.ndim == 1:
            return blockwise_product(k, X, V[:, None], block)[:, 0]
        return blockwise_product(k, X, V, block)

    return matvec


def stored_gram(k: Kernel, X: jax.Array, block: int, dtype: Any) -> jax.Array:
    """The Gram matrix ``k(X, X)`` stored as row blocks ``(nb, t, nb * t)`` in ``dtype``
    (``t`` rows per block, rows and columns padded with copies of ``X[0]`` up to
    ``nb * t >= n``; :func:`stored_matvec` pads and drops them).

    Symmetry halves the work: only the ``t x t`` tiles on and above the diagonal are
    computed (in the inputs' dtype, then cast); each is written to its place and,
    transposed, to the mirror place. ``t = min(block, max(256, ceil(n / 8)))``, so
    that even a matrix of one row block is cut into enough tiles to gain.
    """
    n = X.shape[0]
    tile = int(min(block, max(256, -(-n // 8)), n))
    return _stored_gram(k, X, tile, np.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _stored_gram(k: Kernel, X: jax.Array, tile: int, dtype: Any) -> jax.Array:
    Xb = padded_blocks(X, tile)
    nb = Xb.shape[0]
    pairs = np.array([(i, j) for i in range(nb) for j in range(i, nb)], np.int32)
    I, J = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])

    def body(p, G):
        i, j = I[p], J[p]
        T = k.fn(Xb[i], Xb[j]).astype(dtype)
        zero = jnp.zeros((), I.dtype)
        G = jax.lax.dynamic_update_slice(G, T[None], (i, zero, j * tile))
        return jax.lax.dynamic_update_slice(G, T.T[None], (j, zero, i * tile))

    G = jnp.zeros((nb, tile, nb * tile), dtype)
    return jax.lax.fori_loop(0, len(pairs), body, G)


@jax.jit
def stored_product(G, V):
    """``K V`` for ``V (n, c)`` from a :func:`stored_gram` ``G`` (jitted)."""
    n, n_pad = V.shape[0], G.shape[2]
    if n_pad > n:   # the pad columns of G meet zeros
        V = jnp.concatenate([V, jnp.zeros((n_pad - n,) + V.shape[1:], V.dtype)])
    if G.dtype == V.dtype:
        out = G.reshape(-1, n_pad) @ V
    else:       # upcast one block at a time: the products accumulate in V's dtype
        out = jax.lax.map(lambda g: g.astype(V.dtype) @ V, G)
    return out.reshape(-1, V.shape[1])[:n]


def stored_matvec(G: jax.Array) -> Callable[[Array], jax.Array]:
    """``V -> K V`` from a :func:`stored_gram` ``G (nb, t, nb * t)``. A float32 ``G`` with
    float64 ``V`` is upcast block by block (float64 accumulation; the operator is then
    the float32-rounded Gram matrix, relative error ~6e-8 per entry)."""

    def matvec(V):
        if V.ndim == 1:
            return stored_product(G, V[:, None])[:, 0]
        return stored_product(G, V)

    return matvec


@functools.partial(jax.jit, static_argnums=0)
def gram_diag(k: Kernel, X: jax.Array) -> jax.Array:
    """``k(x_i, x_i)`` for every row, ``(n,)`` (O(n d))."""
    return k.diag(X)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _nystrom(k: Kernel, X, centres, block: int):
    Kmm = k.fn(centres, centres)
    Kmm = 0.5 * (Kmm + Kmm.T)
    s, U = jnp.linalg.eigh(Kmm)
    r = s.shape[0]
    eps = jnp.finfo(X.dtype).eps
    keep = s > jnp.max(s) * eps * 100 * r
    scale = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, s, 1.0)), 0.0)
    W = U * scale[None, :]                                     # Kmm^+ = W W^T
    n = X.shape[0]
    Xb = padded_blocks(X, block)
    B = jax.lax.map(lambda xb: k.fn(xb, centres) @ W, Xb)
    return B.reshape(-1, r)[:n]


def nystrom_factor(k: Kernel, X: jax.Array, rank: int, key: Any, *,
                   block_size: Optional[int] = None) -> jax.Array:
    """The Nystrom factor ``B = K_nr U S^-1/2`` (``K_rr = U S U^T``, eigenvalues below
    ``100 r eps max(S)`` dropped), so ``B B^T = K_nr K_rr^+ K_rn ~ K``, with ``r``
    centres drawn uniformly without replacement from X by ``key`` (Falkon's
    preconditioner, Rudi et al. 2017). O(n r d + r^3) time, O(n r) memory."""
    n = X.shape[0]
    idx = jax.random.choice(key, n, (int(rank),), replace=False)
    block = default_block_size(n, X.dtype.itemsize) if block_size is None else int(block_size)
    return _nystrom(k, X, X[jnp.sort(idx)], min(block, n))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _pivoted_cholesky(k: Kernel, X, rank: int):
    n = X.shape[0]
    dtype = X.dtype
    diag0 = k.diag(X).astype(dtype)
    tiny = jnp.max(diag0) * jnp.finfo(dtype).eps * n

    def step(j, st):
        B, d = st
        i = jnp.argmax(d)
        piv = d[i]
        row = k.fn(jax.lax.dynamic_slice_in_dim(X, i, 1), X)[0] - B @ B[i]
        col = jnp.where(piv > tiny, row / jnp.sqrt(jnp.where(piv > tiny, piv, 1.0)), 0.0)
        B = B.at[:, j].set(col)
        d = jnp.maximum(d - col ** 2, 0.0)
        return B, d

    B, d = jax.lax.fori_loop(0, rank, step, (jnp.zeros((n, rank), dtype), diag0))
    return B, jnp.sum(d)


def pivoted_cholesky_factor(k: Kernel, X: jax.Array, rank: int) -> jax.Array:
    """Rank-r partial Cholesky with greedy diagonal pivoting: ``K ~ B B^T``,
    ``B (n, r)``. Each step takes the row of largest remaining diagonal
    ``d_i = K_ii - |B_i|^2``, computes that kernel row (O(n d)) and subtracts the
    previous columns (O(n r)); the trace error ``sum d`` falls monotonically
    (Harbrecht et al. 2012). O(n r (d + r)) time, O(n r) memory. Steps whose pivot
    falls below ``n eps max K_ii`` (rank exhausted) give zero columns."""
    return _pivoted_cholesky(k, X, int(rank))[0]
