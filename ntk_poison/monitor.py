"""Per-epoch measurements through a classifier: input curvature and feature collapse.

A classifier is ``apply(params, x_batch) -> logits (n, C)`` (e.g. an nnx module with
``apply = nets.apply_fn``). At one input ``x`` with label ``y`` the cross-entropy loss
and its INPUT Hessian (THEORY.md section 1, for the softmax loss) are::

    L(x) = -log softmax(f(x))_y = logsumexp(f(x)) - f_y(x),      f = apply(params, .)
    H(x) = hess_x L = J^T (diag p - p p^T) J + sum_c (p_c - e_y,c) hess_x f_c   (d, d)

with ``J = d f / d x`` ``(C, d)``, ``p = softmax(f(x))`` and ``d`` the flat input size.
The first term is the Gauss-Newton term (positive semi-definite, rank <= C - 1);
THEORY.md section 2: a backdoor turns the top eigenvector at a triggered input
towards the trigger direction and raises its eigenvalue (the curvature spike).

What is measured, once per epoch, on FIXED inputs (:func:`curvature_hook`):

* :func:`input_hessian_top`: the top-k (algebraically largest) eigenpairs of
  ``H(x_i)`` at every point, by Lanczos on Hessian-vector products through the network
  (forward over reverse), in ONE compiled function with ``params`` a traced argument.
* :func:`overlap`: ``cos^2`` of each top eigenvector with a direction.
* the top-eigenvalue ratio triggered / clean and its AUROC as a detector.

And at chosen epochs, :func:`feature_collapse` on penultimate-layer features (do the
triggered inputs land on the poison cluster?), drawn by :func:`feature_pca_figure`.

Why not :func:`ntk_poison.spectra.lanczos_hessian` (block Lanczos,
:func:`ntk_poison.linalg.block_lanczos`): it is built for one point, with an adaptive
``while_loop`` whose convergence checks are ``lax.cond`` / ``lax.switch`` branches
holding a small ``eigh``. Under ``vmap`` over points a ``cond`` becomes a select (every
branch of every check runs at every iteration, for all points), the loop runs until
the slowest point converges, and the nested batched ``eigh`` is the path that
deadlocked on CPU (see :mod:`ntk_poison.defences.curvature`). A per-epoch monitor
wants the opposite trade: a FIXED iteration count (one static program, predictable
cost, no convergence control flow), the Lanczos loop holding only Hessian-vector
products and matrix products, and the one small ``eigh`` per point after the loop,
run by ``lax.map`` (unbatched). Accuracy is then reported, not enforced: the Ritz
residual ``||H v - theta v||`` of every returned pair comes free
(``return_residuals=True``; the hook reports the worst one, relative).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, io, linalg, report
from ntk_poison.defences.evaluate import auroc

Array = Any

__all__ = ["input_hessian_top", "overlap", "curvature_hook", "feature_collapse",
           "feature_pca_plot", "feature_pca_figure"]


# --------------------------------------------------------------------------- public

def input_hessian_top(apply: Callable, params: Any, x: Array, labels: Optional[Array] = None,
                      k: int = 3, iters: int = 20, key: Any = None, *,
                      return_residuals: bool = False):
    """Top-k eigenpairs of the input Hessian of the cross-entropy loss at every point.

        H_i = hess_x [ logsumexp(f(x)) - f_{y_i}(x) ] at x = x_i,   f = apply(params, .)

    Method: plain Lanczos with full reorthogonalisation and a FIXED number of steps
    ``iters`` from a random unit start ``q_0`` (drawn from ``key``), per point::

        w = H q_j,   alpha_j = q_j . w,   w <- (I - Q Q^T)^2 w,   beta_j = |w|,
        q_{j+1} = w / beta_j

    (``Q`` the rows ``q_0 .. q_j``; the projection, done twice, removes every earlier
    direction, so the basis stays orthonormal in floating point). ``H q`` is forward
    over reverse: ``jax.linearize(jax.grad(L))`` once per point (the primal forward and
    backward pass done once), then one linear pass per step. If ``beta_j`` falls below
    ``eps^(3/4)`` times the largest ``|H q|`` so far (the Krylov space is exhausted,
    e.g. a ReLU net whose Hessian has rank <= C - 1) a fresh random direction,
    orthogonalised against ``Q``, continues with ``beta_j = 0``. The Ritz pairs of
    the tridiagonal ``T = tridiag(beta, alpha, beta)`` ``(iters, iters)`` give the
    eigenvalues ``theta`` and vectors ``Q^T y``, with residual
    ``||H v - theta v|| = beta_last |y_last|`` (up to the remainders dropped at
    deflations, each below ``eps^(3/4)`` of the scale). With ``iters = d`` the Krylov space is
    all of R^d and the pairs are exact (to rounding); with fewer steps the extreme
    eigenvalues converge first (Kaniel-Paige), the more so the larger the gap.

    Cost per point: ``iters`` Hessian-vector products (each ~3-4 forward passes) and
    ``O(iters^2 d)`` for the reorthogonalisation; memory ``O(iters d)`` per point.
    Compiled once per (``apply``, shapes, dtypes, k, iters): ``params`` is a traced
    argument, so new parameters of the same structure (every epoch) reuse the code.
    ``apply`` is a static argument: pass the same hashable function each time (a
    module-level function such as ``nets.apply_fn``; a fresh lambda recompiles).

    Args:
      apply: ``apply(params, x_batch) -> logits (n, C)``, C >= 2.
      params: the parameter pytree (e.g. an nnx module).
      x: points ``(m, *input_shape)``, float.
      labels: integer labels ``(m,)`` in ``[0, C)``; None uses the model's own
        predictions ``argmax_c f_c(x_i)``.
      k: how many pairs per point, ``1 <= k <= iters``.
      iters: Lanczos steps, ``k <= iters <= d``.
      key: a jax PRNG key or an int seed for the start vectors (default key 0).
      return_residuals: also return the residual norms ``||H v - theta v||``.

    Returns:
      ``(values (m, k), vectors (m, k, *input_shape))`` (and ``residuals (m, k)``):
      values in descending order; unit vectors, each signed so that its
      largest-magnitude entry is positive. dtype of ``x``.
    """
    x, labels, k, iters = _check_hessian_args(apply, params, x, labels, k, iters)
    start = _start_vectors(_validate.as_key(key), x)
    vals, vecs, res = _hessian_top(apply, params, x, labels, start, k=k, iters=iters)
    vecs = vecs.reshape(vecs.shape[:2] + tuple(x.shape[1:]))
    return (vals, vecs, res) if return_residuals else (vals, vecs)


def overlap(vectors: Array, directions: Array) -> np.ndarray:
    """``cos^2`` of each point's TOP eigenvector with its direction.

        overlap_i = <v_i, u_i>^2 / (|v_i|^2 |u_i|^2)  in [0, 1]

    with ``v_i = vectors[i, 0]`` (flattened), the overlap metric of THEORY.md section
    4, sign-blind as eigenvectors have no sign.

    Args:
      vectors: ``(m, k, *input_shape)`` as :func:`input_hessian_top` returns (or
        ``(m, k, d)`` flattened); only the first (top) vector of each point is used.
      directions: one direction per point ``(m, *input_shape)`` (e.g. ``x_trig - x``
        for a warp or blend trigger), or one shared direction ``input_shape`` (the
        pattern of an additive trigger); only the total size must match.

    Returns:
      ``(m,)`` numpy array.
    """
    _validate.array("vectors", vectors)
    _validate.array("directions", directions)
    V = np.asarray(vectors)
    if V.ndim < 3:
        raise ValueError(f"`vectors` must be (m, k, *input_shape) as input_hessian_top "
                         f"returns, got shape {V.shape}; for one vector per point add the "
                         "k axis: vectors[:, None].")
    m = V.shape[0]
    v = V[:, 0].reshape(m, -1)
    d = v.shape[1]
    U = np.asarray(directions)
    if U.size == d:
        u = np.broadcast_to(U.reshape(1, d), (m, d))
    elif U.ndim >= 1 and U.shape[0] == m and U.size == m * d:
        u = U.reshape(m, d)
    else:
        raise ValueError(f"`directions` has shape {U.shape}; pass one direction per point "
                         f"({m}, ...) or one shared direction, with {d} entries each (the "
                         "input size of `vectors`).")
    dtype = np.result_type(v.dtype, u.dtype, np.float32)
    v, u = v.astype(dtype), u.astype(dtype)
    nv, nu = np.einsum("ij,ij->i", v, v), np.einsum("ij,ij->i", u, u)
    for name, nrm in (("vectors", nv), ("directions", nu)):
        bad = np.flatnonzero(~(nrm > 0))
        if bad.size:
            raise ValueError(f"`{name}` row {int(bad[0])} is the zero vector; the overlap "
                             "is undefined. Pass non-zero directions.")
    return np.clip(np.einsum("ij,ij->i", v, u) ** 2 / (nv * nu), 0.0, 1.0)


def curvature_hook(apply: Callable, x_clean: Array, y_clean: Optional[Array], x_trig: Array,
                   y_trig: Optional[Array], directions: Array, k: int = 3, iters: int = 20,
                   prefix: str = "", key: Any = None) -> Callable[[Any, int], Dict[str, Any]]:
    """A ``train.train`` hook measuring the input-Hessian spike on fixed inputs.

    Per epoch, ONE compiled call of :func:`input_hessian_top` on the ``2m`` inputs
    ``[x_clean; x_trig]`` (same start vectors every epoch, so epochs differ only by
    the parameters), then on the host, with ``lambda_i`` the top eigenvalue::

        lam_ratio_median = median_i  lambda(x_trig_i) / lambda(x_clean_i)   (paired)
        lam_ratio_mean   = mean_i lambda(x_trig_i) / mean_i lambda(x_clean_i)
        auroc            = AUROC of lambda as a score, triggered = positive
        overlap_i        = cos^2(top eigenvector at x_trig_i, directions_i)

    Args:
      apply: ``apply(params, x_batch) -> logits (n, C)``, hashable (static).
      x_clean, x_trig: ``(m, *input_shape)`` clean inputs and their triggered versions
        (row i of one is row i of the other, triggered).
      y_clean, y_trig: integer labels ``(m,)``, or both None for the model's own
        predictions at each epoch.
      directions: trigger directions, ``(m, *input_shape)`` or one ``input_shape``.
      k, iters, key: as in :func:`input_hessian_top`.
      prefix: prepended to every key of the returned dict.

    Returns:
      ``hook(params, epoch) -> dict`` of plain floats and lists: ``lam_clean`` (m),
      ``lam_trig`` (m), ``overlap`` (m), ``overlap_mean``, ``overlap_clean_mean``
      (the same cos^2 at the CLEAN inputs: the control), ``lam_ratio_median``,
      ``lam_ratio_mean``, ``auroc`` (NaN if an eigenvalue is NaN) and
      ``lanczos_residual`` (the worst ``||H v - theta v|| / max|theta|`` over the
      2m top pairs: how far ``iters`` steps are from convergence).
    """
    x_clean = _validate.float_array("x_clean", x_clean)
    x_trig = _validate.float_array("x_trig", x_trig)
    if x_clean.ndim < 2:
        raise ValueError(f"`x_clean` must be a batch (m, *input_shape), got shape "
                         f"{tuple(x_clean.shape)}.")
    if tuple(x_trig.shape) != tuple(x_clean.shape):
        raise ValueError(f"`x_trig` has shape {tuple(x_trig.shape)} but `x_clean` has "
                         f"{tuple(x_clean.shape)}; pass each clean input's triggered "
                         "version, row for row.")
    if (y_clean is None) != (y_trig is None):
        raise ValueError("`y_clean` and `y_trig` must both be labels or both be None "
                         "(the model's own predictions).")
    m = x_clean.shape[0]
    x = jnp.concatenate([x_clean, x_trig.astype(x_clean.dtype)])
    labels = None
    if y_clean is not None:
        labels = jnp.concatenate([_int_labels("y_clean", y_clean, m),
                                  _int_labels("y_trig", y_trig, m)])
    # One check of `directions` now (its shape and non-zero rows), not at every epoch.
    d = int(np.prod(x.shape[1:]))
    overlap(np.ones((m, 1, d)), directions)
    directions = np.asarray(directions)
    prefix = str(prefix)
    checked = {}

    def hook(params: Any, epoch: int) -> Dict[str, Any]:
        if not checked:
            _check_hessian_args(apply, params, x, labels, k, iters)
            checked["start"] = _start_vectors(_validate.as_key(key), x)
        vals, vecs, res = _hessian_top(apply, params, x, labels, checked["start"], k=k,
                                       iters=iters)
        vals, vecs, res = np.asarray(vals), np.asarray(vecs), np.asarray(res)
        lam = vals[:, 0].astype(np.float64)
        lam_c, lam_t = lam[:m], lam[m:]
        ov_t = overlap(vecs[m:], directions)
        ov_c = overlap(vecs[:m], directions)
        scale = np.max(np.abs(vals), axis=1)
        rel = res[:, 0] / np.where(scale > 0, scale, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_median = float(np.median(lam_t / lam_c))
            ratio_mean = float(np.mean(lam_t) / np.mean(lam_c))
        score_ok = not np.isnan(lam).any()
        out = dict(
            lam_clean=lam_c.tolist(), lam_trig=lam_t.tolist(), overlap=ov_t.tolist(),
            overlap_mean=float(np.mean(ov_t)), overlap_clean_mean=float(np.mean(ov_c)),
            lam_ratio_median=ratio_median, lam_ratio_mean=ratio_mean,
            auroc=auroc(lam, np.arange(2 * m) >= m) if score_ok else float("nan"),
            lanczos_residual=float(np.max(rel)))
        return {prefix + name: v for name, v in out.items()}

    return hook


def feature_collapse(features_clean: Array, y_clean: Array, features_poison: Array,
                     features_trig: Array, target: int) -> Dict[str, Any]:
    """Do triggered inputs collapse onto the poison cluster in feature space?

    With ``mu_c`` the centroid of the clean features of class c, ``mu_P`` the poison
    centroid and ``mu_t`` the clean target-class centroid, the unit is the clean
    within-class spread::

        s = sqrt( mean_c  mean_{i in c} |phi_i - mu_c|^2 )

    and every distance below is a MEDIAN over its group, divided by ``s``:

        trig_to_poison         |phi(x_trig) - mu_P|        the collapse
        clean_target_to_poison |phi(x clean, class t) - mu_P|   comparator
        trig_to_target         |phi(x_trig) - mu_t|        comparator
        clean_other_to_poison  |phi(x clean, class != t) - mu_P|   comparator

    A backdoor that has collapsed puts ``trig_to_poison`` near the poison cluster's
    own size and well below ``clean_other_to_poison``.

    ``pca``: the 2-D coordinates of every group under ONE principal-component
    projection fitted (numpy SVD of the centred stack) on all rows of all groups,
    each axis signed so its largest-magnitude loading is positive.

    Args:
      features_clean: ``(n_c, p)`` clean features (e.g. the penultimate layer).
      y_clean: ``(n_c,)`` integer class labels of the clean rows.
      features_poison: ``(n_p, p)`` the poisoned training points' features.
      features_trig: ``(n_t, p)`` triggered test inputs' features.
      target: the backdoor's target class (present in ``y_clean``).

    Returns:
      dict: ``spread`` and the four distances (floats), ``pca`` (a dict of
      ``clean (n_c, 2)``, ``clean_labels (n_c,)``, ``poison (n_p, 2)``,
      ``trig (n_t, 2)``, ``explained (2,)`` variance fractions), ``target``.
    """
    Fc = _features("features_clean", features_clean)
    Fp = _features("features_poison", features_poison)
    Ft = _features("features_trig", features_trig)
    p = Fc.shape[1]
    for name, F in (("features_poison", Fp), ("features_trig", Ft)):
        if F.shape[1] != p:
            raise ValueError(f"`{name}` has {F.shape[1]} features per row but "
                             f"`features_clean` has {p}; pass the same layer's features.")
    yc = _int_labels("y_clean", y_clean, Fc.shape[0], numpy=True)
    if not _validate.is_int_scalar(target) and not (
            isinstance(target, np.integer)):
        raise ValueError(f"`target` must be an integer class, got {target!r}.")
    target = int(target)
    classes = np.unique(yc)
    if target not in classes:
        raise ValueError(f"`target` = {target} has no clean rows in `y_clean` (classes "
                         f"{classes.tolist()}); pass clean target-class features too.")
    if np.all(yc == target):
        raise ValueError("`y_clean` holds only the target class; the non-target "
                         "comparator needs clean rows of other classes.")

    centroids = {c: Fc[yc == c].mean(axis=0) for c in classes}
    sq = [np.mean(np.sum((Fc[yc == c] - centroids[c]) ** 2, axis=1)) for c in classes]
    spread = float(np.sqrt(np.mean(sq)))
    if not spread > 0:
        raise ValueError("The clean within-class spread is 0 (every class is one point); "
                         "the distances have no unit. Pass several clean rows per class.")
    mu_p, mu_t = Fp.mean(axis=0), centroids[target]

    def dist(F, mu):
        return float(np.median(np.linalg.norm(F - mu, axis=1)) / spread)

    allF = np.concatenate([Fc, Fp, Ft])
    mean = allF.mean(axis=0)
    _, s, Vt = np.linalg.svd(allF - mean, full_matrices=False)
    axes = np.asarray(linalg.sign_fix(jnp.asarray(Vt[:2])))
    proj = lambda F: (F - mean) @ axes.T  # noqa: E731
    var = s ** 2
    explained = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    return dict(
        spread=spread,
        trig_to_poison=dist(Ft, mu_p),
        clean_target_to_poison=dist(Fc[yc == target], mu_p),
        trig_to_target=dist(Ft, mu_t),
        clean_other_to_poison=dist(Fc[yc != target], mu_p),
        pca=dict(clean=proj(Fc), clean_labels=yc, poison=proj(Fp), trig=proj(Ft),
                 explained=explained),
        target=target)


def feature_pca_plot(result: Dict[str, Any], ax: Any, max_trig: Optional[int] = None):
    """Draw the PCA of :func:`feature_collapse` on the matplotlib axes ``ax``.

    Clean points are coloured by class (the target class ringed), poison points are
    black crosses, triggered inputs red triangles (at most ``max_trig`` of them, evenly
    strided, if given); the title carries ``trig_to_poison`` and
    ``clean_other_to_poison`` (in units of the spread). Returns the clean points'
    scatter (for a colour bar).
    """
    if not isinstance(result, dict) or "pca" not in result:
        raise ValueError("`result` must be the dict feature_collapse returns (with a "
                         "'pca' entry).")
    pca = result["pca"]
    C, y = np.asarray(pca["clean"]), np.asarray(pca["clean_labels"])
    sc = ax.scatter(C[:, 0], C[:, 1], c=y, cmap="tab10", s=8, alpha=0.6, label="clean")
    t = y == result["target"]
    ax.scatter(C[t, 0], C[t, 1], facecolors="none", edgecolors="k", s=20, linewidths=0.5,
               label=f"clean, target class {result['target']}")
    P, T = np.asarray(pca["poison"]), np.asarray(pca["trig"])
    if max_trig is not None and len(T) > max_trig:
        T = T[::-(-len(T) // max_trig)]
    ax.scatter(P[:, 0], P[:, 1], marker="x", c="k", s=18, label="poison")
    ax.scatter(T[:, 0], T[:, 1], marker="^", c="r", s=14, label="triggered")
    ev = np.asarray(pca["explained"])
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}% var)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}% var)")
    ax.set_title(f"triggered to poison {result['trig_to_poison']:.2f}, clean other to "
                 f"poison {result['clean_other_to_poison']:.2f} (x spread)", fontsize=8)
    ax.legend(fontsize=6, loc="best")
    return sc


def feature_pca_figure(result: Dict[str, Any], path: str | Path) -> Path:
    """:func:`feature_pca_plot` as a PNG with a colour bar, saved atomically; returns
    the path written."""
    if not isinstance(result, dict) or "pca" not in result:
        raise ValueError("`result` must be the dict feature_collapse returns (with a "
                         "'pca' entry).")
    fig, axes = report.new_figure()
    sc = feature_pca_plot(result, axes[0, 0])
    fig.colorbar(sc, ax=axes[0, 0], label="clean class")
    fig.tight_layout()
    import matplotlib.pyplot as plt
    try:
        out = io.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return out


# --------------------------------------------------------------------------- validation

def _int_labels(name: str, y: Array, m: int, numpy: bool = False):
    _validate.array(name, y, ndim=1)
    arr = np.asarray(y)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"`{name}` must be integer class labels, got dtype {arr.dtype}.")
    if arr.shape[0] != m:
        raise ValueError(f"`{name}` has {arr.shape[0]} labels for {m} points; pass one "
                         "label per point.")
    return arr if numpy else jnp.asarray(arr)


def _features(name: str, F: Array) -> np.ndarray:
    _validate.array(name, F, ndim=2)
    F = np.asarray(F, dtype=np.float64)
    if F.shape[0] == 0:
        raise ValueError(f"`{name}` is empty; pass at least one row.")
    return F


def _check_hessian_args(apply, params, x, labels, k, iters):
    if not callable(apply):
        raise ValueError(f"`apply` must be a function apply(params, x_batch) -> logits, "
                         f"got {type(apply).__name__}.")
    x = _validate.float_array("x", x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"`x` must be a non-empty batch (m, *input_shape), got shape "
                         f"{tuple(x.shape)}.")
    d = int(np.prod(x.shape[1:]))
    iters = _validate.positive_int("iters", iters)
    if iters > d:
        raise ValueError(f"`iters` = {iters} exceeds d = {d} (the flat input size); at "
                         f"iters = d the Krylov space is already all of R^d. Pass "
                         f"iters <= {d}.")
    if not _validate.is_int_scalar(k) or not 1 <= k <= iters:
        raise ValueError(f"`k` must be an integer with 1 <= k <= iters = {iters}, got "
                         f"{k!r}.")
    try:
        out = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype))
    except Exception as e:
        raise ValueError(f"`apply(params, x)` failed on a batch of shape "
                         f"{(1,) + tuple(x.shape[1:])}: {type(e).__name__}: {e}") from e
    if len(getattr(out, "shape", ())) != 2 or out.shape[1] < 2:
        raise ValueError(f"`apply` must return logits (n, C) with C >= 2 classes, got "
                         f"shape {getattr(out, 'shape', None)} for n = 1.")
    C = int(out.shape[1])
    if labels is not None:
        lab = _int_labels("labels", labels, x.shape[0], numpy=True)
        if lab.min() < 0 or lab.max() >= C:
            raise ValueError(f"`labels` must lie in [0, {C}), the model's classes.")
        labels = jnp.asarray(lab)
    return x, labels, int(k), iters


def _start_vectors(key, x):
    """Per point: a random unit start and a random reserve for deflation, ``(m, 2, d)``."""
    m, d = x.shape[0], int(np.prod(x.shape[1:]))
    return linalg.start_block(key, (m * 2, d), x.dtype).reshape(m, 2, d)


# --------------------------------------------------------------------------- compiled core

@functools.partial(jax.jit, static_argnames=("apply", "k", "iters"))
def _hessian_top(apply, params, x, labels, start, *, k, iters):
    """Jitted core of :func:`input_hessian_top` (no checks): ``(vals, vecs (m, k, d),
    residuals)``."""
    m = x.shape[0]
    shape = x.shape[1:]
    x_flat = x.reshape(m, -1)
    if labels is None:
        labels = jnp.argmax(apply(params, x), axis=-1)

    def lanczos_one(xf, y, st):
        def loss(v):
            logits = apply(params, v.reshape((1,) + shape))[0]
            return jax.nn.logsumexp(logits) - logits[y]

        _, hvp = jax.linearize(jax.grad(loss), xf)
        return _lanczos(hvp, st[0], st[1], iters)

    Q, T, beta_last = jax.vmap(lanczos_one)(x_flat, labels, start)
    # The small eigh runs per point (lax.map), never batched: see the module docstring.
    theta, Y = jax.lax.map(lambda t: jnp.linalg.eigh(t, symmetrize_input=False), T)
    top = jnp.arange(iters - 1, iters - 1 - k, -1)
    vals, Yk = theta[:, top], Y[:, :, top]                     # (m, k), (m, iters, k)
    vecs = jnp.einsum("mik,mid->mkd", Yk, Q)
    nrm = jnp.linalg.norm(vecs, axis=-1, keepdims=True)
    vecs = linalg.sign_fix(vecs / jnp.where(nrm > 0, nrm, 1.0))
    res = jnp.abs(beta_last[:, None] * Yk[:, -1, :])
    return vals, vecs, res


def _lanczos(matvec, q0, reserve, iters):
    """``iters`` Lanczos steps with full reorthogonalisation from ``q0`` (one point).

    Returns the basis ``Q (iters, d)``, the tridiagonal ``T (iters, iters)`` and the
    last ``beta`` (for the residuals)."""
    d = q0.shape[0]
    dtype = q0.dtype
    thresh = jnp.asarray(np.finfo(dtype).eps ** 0.75, dtype)

    def unit(v):
        n = jnp.linalg.norm(v)
        return v / jnp.where(n > 0, n, 1.0)

    def project(Q, v):
        for _ in range(2):
            v = v - Q.T @ (Q @ v)
        return v

    def step(j, carry):
        Q, alpha, beta, q, scale = carry
        Q = Q.at[j].set(q)
        w = matvec(q)
        ref = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, ref)
        alpha = alpha.at[j].set(q @ w)
        w = project(Q, w)
        b = jnp.linalg.norm(w)
        live = b > thresh * scale
        fresh = unit(project(Q, jnp.roll(reserve, j)))
        q = jnp.where(live, w / jnp.where(live, b, 1.0), fresh)
        beta = beta.at[j].set(jnp.where(live, b, 0.0))
        return Q, alpha, beta, q, scale

    init = (jnp.zeros((iters, d), dtype), jnp.zeros((iters,), dtype),
            jnp.zeros((iters,), dtype), unit(q0), jnp.zeros((), dtype))
    Q, alpha, beta, _, _ = jax.lax.fori_loop(0, iters, step, init)
    off = beta[:-1]
    T = jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1)
    return Q, T, beta[-1]
