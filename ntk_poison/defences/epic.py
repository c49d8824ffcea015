"""EPIC (Yang et al. 2022, "Not All Poisons are Created Equal"; THEORY.md section 5):
drop the training points that are isolated in gradient space, in the kernel regime and in
the training engine.

**The rule.** Every few epochs, with per-example gradients ``g_i``: per class c, pick
``k_c`` medoids by greedy facility location on the similarity ``exp(-||g_i - g_j|| / C)``
(C the number of classes), assign each point to its nearest medoid, and drop every point
whose cluster has at most one member. Drops accumulate (a dropped point never returns).

**Facility location.** For a similarity matrix ``S >= 0`` (n x n) and a set A of
medoids, ``F(A) = sum_i max_{j in A} S_ij`` (``F({}) = 0``) is monotone submodular, so
the greedy choice, adding the j with the largest gain ``sum_i max(0, S_ij - m_i)``
(``m`` the running max), reaches ``F >= (1 - 1/e) F(OPT)`` (Nemhauser, Wolsey & Fisher
1978).

**Medoid counts.** ``k_c = max(1, floor(subset_size * n_c + 1/2))`` (round half up,
:func:`~ntk_poison.defences.base.top_fraction_count`), at most ``n_c``: in all about
``subset_size * N``, split across classes in proportion to class size.

**Last-layer gradients** (finite nets, :func:`last_layer_gradients`). For the softmax
cross-entropy the gradient in the logits is ``softmax(z) - onehot(y)`` (the gradient of
the last layer's weights is its outer product with the penultimate features; EPIC uses
the logit part).

**Kernel-regime gradients.** For the linearised model ``f = phi(x)^T w`` and the squared
loss ``1/2 (f(x_i) - y_i)^2`` the per-example gradient is ``g_i = r_i phi(x_i)`` with
residual ``r_i = f(x_i) - y_i``, so distances need only the Gram matrix:

    ||g_i - g_j||^2 = r_i^2 k_ii + r_j^2 k_jj - 2 r_i r_j k_ij

For C outputs (one-hot targets, ``w`` a d x C matrix) the gradient is ``phi(x_i) r_i^T``
and ``||g_i - g_j||_F^2 = |r_i|^2 k_ii + |r_j|^2 k_jj - 2 (r_i . r_j) k_ij``.
:func:`epic_krr` applies the rule to KRR refits, :func:`epic_flow` inside kernel gradient
flow, :func:`epic_filter` between the epochs of :func:`ntk_poison.train.train`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, krr
from ntk_poison.defences.base import check_output, class_ids, top_fraction_count

Array = Any

__all__ = ["facility_location", "facility_value", "gradient_distances",
           "last_layer_gradients", "pairwise_distances", "EpicSelection", "epic_select",
           "EPIC", "EpicKernelResult", "epic_krr", "EpicFlowResult", "epic_flow",
           "epic_filter", "epic_schedule"]


def facility_location(S: Array, k: int) -> np.ndarray:
    """Greedy facility location: ``k`` medoid indices, in the order picked.

    Args:
      S: a similarity matrix ``(n, n)``, finite and >= 0 (row i: how well medoid j
        serves point i).
      k: the number of medoids, ``1 <= k <= n``.

    Returns:
      ``(k,)`` int indices; each maximises the gain ``sum_i max(0, S_ij - m_i)`` given
      the earlier ones (ties: the smallest index). One jit-compiled ``lax.fori_loop``.
    """
    S = np.asarray(_validate.array("S", S, ndim=2), dtype=np.float64)
    n = S.shape[0]
    if S.shape != (n, n):
        raise ValueError(f"`S` must be square (n, n), got shape {S.shape}.")
    if not np.all(np.isfinite(S)) or np.min(S) < 0:
        raise ValueError("`S` must be finite and >= 0 (a similarity, e.g. exp(-distance)).")
    if not _validate.is_int_scalar(k) or not 1 <= k <= n:
        raise ValueError(f"`k` must be an int in [1, {n}] (medoids among n points), got {k!r}.")
    return np.asarray(_greedy(jnp.asarray(S), int(k)))


def facility_value(S: Array, medoids: Array) -> float:
    """``F(A) = sum_i max_{j in A} S_ij`` (0 for an empty A)."""
    S = np.asarray(S, dtype=np.float64)
    idx = np.asarray(medoids, dtype=int)
    return float(S[:, idx].max(axis=1).sum()) if idx.size else 0.0


def gradient_distances(K: Array, residuals: Array) -> np.ndarray:
    """Exact per-example gradient distances ``||g_i - g_j||`` of the kernel regime.

    Args:
      K: the Gram matrix ``(n, n)`` of the (empirical or analytic) NTK at the training
        points.
      residuals: ``r = f(X) - y``, ``(n,)`` or ``(n, C)``.

    Returns:
      ``(n, n)`` distances (module docstring), with rounding negatives clamped to 0.
    """
    K = np.asarray(_validate.array("K", K, ndim=2), dtype=np.float64)
    r = np.asarray(_validate.array("residuals", residuals, ndim=(1, 2)), dtype=np.float64)
    n = K.shape[0]
    if K.shape != (n, n):
        raise ValueError(f"`K` must be square (n, n), got shape {K.shape}.")
    if r.shape[0] != n:
        raise ValueError(f"`residuals` must have one row per point of `K` ({n}), got "
                         f"shape {r.shape}.")
    r = r.reshape(n, -1)
    R = r @ r.T                                          # r_i . r_j
    d = np.diag(K) * np.diag(R)                          # |r_i|^2 k_ii
    sq = d[:, None] + d[None, :] - 2.0 * R * K
    return np.sqrt(np.maximum(sq, 0.0))


def last_layer_gradients(logits: Array, labels: Array) -> np.ndarray:
    """``softmax(z_i) - onehot(y_i)``: the gradient of the softmax cross-entropy in the
    logits, one row per example.

    Args:
      logits: ``(n, C)`` finite logits.
      labels: ``(n,)`` integer labels in ``[0, C)``.

    Returns:
      ``(n, C)`` float array (numpy, the logits' float dtype).
    """
    z = np.asarray(_validate.array("logits", logits, ndim=2))
    y = np.asarray(_validate.array("labels", labels, ndim=1))
    _validate.same_rows("logits", z, "labels", y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"`labels` must be integer class ids (n,), got dtype {y.dtype}; "
                         "use defences.class_ids(labels).")
    C = z.shape[1]
    if y.size and (y.min() < 0 or y.max() >= C):
        raise ValueError(f"`labels` must lie in [0, {C}) (the logits' classes).")
    z = z if np.issubdtype(z.dtype, np.floating) else z.astype(np.float64)
    p = np.array(jax.nn.softmax(jnp.asarray(z), axis=1), dtype=z.dtype)
    p[np.arange(len(y)), y] -= 1
    return p


def pairwise_distances(G: Array, block: int = 256) -> np.ndarray:
    """Euclidean distances ``D_ij = ||g_i - g_j||`` between the rows of ``G``.

    Computed in JAX, ``block`` rows at a time (``lax.map`` over row blocks, each the
    exact ``sqrt(sum_p (g_ip - g_jp)^2)``, so ``D_ii = 0`` exactly): O(block n p) working
    memory beside the ``(n, n)`` result. One compiled program per ``(n, p, block)``.

    Args:
      G: ``(n, p)`` finite rows (e.g. :func:`last_layer_gradients`).
      block: rows a block, an int >= 1.

    Returns:
      ``(n, n)`` numpy distances in G's float dtype (float32 unless x64 is on).
    """
    G = _validate.array("G", G, ndim=2)
    block = _validate.positive_int("block", block)
    G = jnp.asarray(G)
    if not jnp.issubdtype(G.dtype, jnp.floating):
        G = G.astype(jnp.result_type(float))
    if G.shape[0] == 0:
        return np.zeros((0, 0), np.asarray(G).dtype)
    return np.asarray(_blockwise_distances(G, min(block, G.shape[0])))


class EpicSelection(NamedTuple):
    """One EPIC selection (all indices are rows of the input, all arrays numpy).

    Attributes:
      medoids: ``(k,)`` int rows of the medoids, class by class (classes in increasing
        id), each class's in greedy order.
      assignment: ``(n,)`` int, the row of the medoid each point is assigned to.
      cluster_size: ``(n,)`` int, the size of each point's cluster.
      drop: ``(n,)`` bool, ``cluster_size <= 1``.
    """

    medoids: np.ndarray
    assignment: np.ndarray
    cluster_size: np.ndarray
    drop: np.ndarray


def epic_select(distances: Array, labels: Array, subset_size: float,
                num_classes: Optional[int] = None) -> EpicSelection:
    """EPIC's per-class medoid selection and drop rule on a distance matrix.

    Per class c (``n_c`` points): ``k_c = max(1, floor(subset_size n_c + 1/2))``
    (at most ``n_c``) medoids by greedy facility location (:func:`facility_location`)
    on ``S = exp(-D / C)`` restricted to the class; every point of the class goes to
    its nearest medoid (ties: the medoid picked first); a point is dropped when its
    cluster has at most one member.

    Args:
      distances: ``(n, n)`` gradient distances, finite, >= 0 (e.g.
        :func:`pairwise_distances`, :func:`gradient_distances`). Only within-class
        entries are read.
      labels: class labels in any encoding of :func:`~ntk_poison.defences.class_ids`.
      subset_size: the medoid fraction, in (0, 1].
      num_classes: C of the similarity (default: the number of distinct labels).

    Returns:
      An :class:`EpicSelection`.
    """
    D = np.asarray(_validate.array("distances", distances, ndim=2))
    n = D.shape[0]
    if D.shape != (n, n):
        raise ValueError(f"`distances` must be square (n, n), got shape {D.shape}.")
    if n and D.min() < 0:
        raise ValueError("`distances` must be >= 0 (a distance matrix).")
    cls = class_ids(labels)
    _validate.same_rows("distances", D, "labels", cls)
    subset_size = _check_subset_size(subset_size)
    C = _num_classes(num_classes, cls)
    return _select(lambda rows: D[np.ix_(rows, rows)], cls, subset_size, C)


@dataclasses.dataclass(frozen=True)
class EPIC:
    """The EPIC drop rule as a detector: ``detect(gradients, labels) -> (scores, flagged)``.

    ``flagged`` is :func:`epic_select`'s ``drop``. The score ranks by isolation:

        score_i = 1/s_i + u_i / (s_i (s_i + 1)),    u_i = nn_i / (1 + nn_i) in [0, 1)

    with ``s_i`` the size of i's cluster and ``nn_i`` the distance from i to its nearest
    other point of its class (``inf`` alone: ``u = 1``). The second term is below the gap
    ``1/s - 1/(s+1)``, so points rank first by cluster size (singletons highest) and
    within a size by how far they lie from their class.

    Attributes:
      subset_size: the medoid fraction in (0, 1] (EPIC uses 0.1, 0.2, 0.3).
      num_classes: C of the similarity ``exp(-d / C)`` (default: distinct labels).
    """

    subset_size: float = 0.1
    num_classes: Optional[int] = None

    def __post_init__(self):
        _check_subset_size(self.subset_size)
        if self.num_classes is not None:
            _validate.positive_int("num_classes", self.num_classes)

    def detect(self, gradients: Array, labels: Array) -> Tuple[np.ndarray, np.ndarray]:
        """Scores and flags from per-example gradients ``(n, p)`` (e.g. last-layer ones)."""
        G = _validate.array("gradients", gradients, ndim=2)
        _validate.same_rows("gradients", G, "labels", _validate.array("labels", labels))
        return self.detect_distances(pairwise_distances(G), labels)

    def detect_distances(self, distances: Array, labels: Array
                         ) -> Tuple[np.ndarray, np.ndarray]:
        """Scores and flags from a gradient-distance matrix ``(n, n)``."""
        sel = epic_select(distances, labels, self.subset_size, self.num_classes)
        D = np.asarray(distances, np.float64)
        cls = class_ids(labels)
        same = (cls[:, None] == cls[None, :]) & ~np.eye(len(cls), dtype=bool)
        nn = np.where(same, D, np.inf).min(axis=1) if len(cls) else np.zeros(0)
        u = np.where(np.isinf(nn), 1.0, nn / (1.0 + nn))
        s = sel.cluster_size.astype(np.float64)
        return check_output(1.0 / s + u / (s * (s + 1.0)), sel.drop)


# --------------------------------------------------------------------------- kernel regime

@dataclasses.dataclass(frozen=True)
class EpicKernelResult:
    """:func:`epic_krr`'s result: ``keep`` (n,) bool, ``dropped_at`` (n,) int (the round,
    from 0, in which a point was dropped; -1 kept) and ``model``, the KRR model
    (:func:`ntk_poison.krr.fit`) on the kept rows."""

    keep: np.ndarray
    dropped_at: np.ndarray
    model: krr.KRRModel


def epic_krr(k: Any, X: Array, y: Array, ridge: float, *, subset_size: float = 0.1,
             rounds: int = 1, num_classes: Optional[int] = None) -> EpicKernelResult:
    """EPIC on kernel ridge regression: fit, drop the isolated gradients, refit.

    Round r (from 0): fit KRR on the kept rows P (``krr.fit``, relative ridge, absolute
    ``|P| ridge``), residuals ``r = f(X_P) - y_P``, exact gradient distances from the
    Gram (:func:`gradient_distances`; Frobenius form for ``(n, C)`` targets),
    :func:`epic_select` per class (classes: ``defences.class_ids(y)``; C the number of
    distinct classes of the whole y unless given) and drop. Rounds stop early when one
    drops nothing. Finally the model is refitted on the kept rows.

    Args:
      k: a :class:`~ntk_poison.kernels.Kernel`.
      X: training inputs ``(n, *input_shape)``.
      y: float targets ``(n,)`` (e.g. +-1) or ``(n, C)`` (one-hot).
      ridge: the relative ridge >= 0.
      subset_size: the medoid fraction in (0, 1].
      rounds: an int >= 1.
      num_classes: C of the similarity.

    Returns:
      An :class:`EpicKernelResult`.
    """
    k, X, y, cls, C, subset_size = _kernel_problem(k, X, y, ridge, subset_size,
                                                   num_classes)
    rounds = _validate.positive_int("rounds", rounds)
    n = X.shape[0]
    K = _gram(k, X)
    y_np = np.asarray(y, np.float64)
    keep = np.ones(n, bool)
    dropped_at = np.full(n, -1, int)
    for r in range(rounds):
        rows = np.flatnonzero(keep)
        if rows.size == 0:
            break
        model = krr.fit(k, X[rows], y[rows], ridge)
        Kp = K[np.ix_(rows, rows)]
        resid = Kp @ np.asarray(model.alpha, np.float64) - y_np[rows]
        D = gradient_distances(Kp, resid)
        drop = _select(lambda i: D[np.ix_(i, i)], cls[rows], subset_size, C).drop
        if not drop.any():
            break
        keep[rows[drop]] = False
        dropped_at[rows[drop]] = r
    if not keep.any():
        raise ValueError("EPIC dropped every training point; lower `subset_size` (now "
                         f"{subset_size}) so that clusters hold more than one point.")
    rows = np.flatnonzero(keep)
    return EpicKernelResult(keep, dropped_at, krr.fit(k, X[rows], y[rows], ridge))


@dataclasses.dataclass(frozen=True)
class EpicFlowResult:
    """:func:`epic_flow`'s result: ``keep`` (n,) bool, ``dropped_at`` (n,) float (the flow
    time of the drop; NaN kept), ``model`` a :class:`~ntk_poison.krr.KRRModel` on all n
    training inputs whose ``alpha`` is the flow's coefficient vector ``a(time)`` (so
    ``model.predict(x) = k(x, X) a``; ``model.ridge`` is the relative ridge), ``times``
    the EPIC times used."""

    keep: np.ndarray
    dropped_at: np.ndarray
    model: krr.KRRModel
    times: np.ndarray

    def predict(self, x: Array) -> jax.Array:
        return self.model.predict(x)


def epic_flow(k: Any, X: Array, y: Array, ridge: float, *, time: float,
              subset_size: float = 0.1, subset_freq: Optional[float] = None,
              warmup: Optional[float] = None, num_classes: Optional[int] = None
              ) -> EpicFlowResult:
    """Kernel gradient flow (squared loss, f_0 = 0) with EPIC drops along the way.

    The linearised model ``f = phi^T w``, ``w = Phi_X a``: on the kept set P (m points)
    the flow of ``J = (1/2m) sum_P (f(x_i) - y_i)^2 + (ridge/2) |w|^2`` is

        da_P/dt = -(1/m) (K_PP a_P + K_PQ a_Q - y_P) - ridge a_P,
        da_Q/dt = -ridge a_Q                          (Q: the dropped points)

    with time as in :func:`ntk_poison.flow.kernel_flow` (learning rate 1 on J; with no
    drops this IS kernel_flow at kappa = 0). At the times ``warmup, warmup +
    subset_freq, ... < time`` the residuals ``f(X_P) - y_P`` give the gradient distances
    (:func:`gradient_distances`) and :func:`epic_select` drops; the flow continues from
    the current a. Each segment is closed form by ``K_PP = V diag(s) V^T``,
    ``z = V^T a_P``, ``rho = s/m + ridge``, over a segment of length tau:

        a_Q(tau) = exp(-ridge tau) a_Q(0)
        z(tau) = exp(-rho tau) z(0) + phi(rho, tau) V^T y_P / m
                 - exp(-ridge tau) phi(s/m, tau) V^T K_PQ a_Q(0) / m

    with ``phi(c, tau) = (1 - exp(-c tau)) / c`` (``tau`` at c = 0). The prediction is
    the sum of the segments' kernel expansions, ``f(x) = k(x, X) a(time)``.

    Args:
      k, X, y, ridge: as :func:`epic_krr` (relative ridge).
      time: the flow time, > 0.
      subset_size: the medoid fraction in (0, 1].
      subset_freq: time between EPIC steps (> 0); default ``time / 20`` (2 of 40 epochs).
      warmup: time of the first EPIC step (>= 0); default ``time / 4`` (10 of 40).
      num_classes: C of the similarity.

    Returns:
      An :class:`EpicFlowResult`.
    """
    k, X, y, cls, C, subset_size = _kernel_problem(k, X, y, ridge, subset_size,
                                                   num_classes)
    ridge = float(ridge)
    time = _validate.scalar("time", time)
    if time <= 0:
        raise ValueError(f"`time` must be > 0 (the flow time), got {time!r}.")
    freq = time / 20 if subset_freq is None else _validate.scalar("subset_freq", subset_freq)
    if freq <= 0:
        raise ValueError(f"`subset_freq` must be > 0 (time between EPIC steps), got {freq!r}.")
    warm = time / 4 if warmup is None else _validate.scalar("warmup", warmup)
    events = warm + freq * np.arange(max(0, math.ceil((time - warm) / freq)))
    events = events[events < time]
    n = X.shape[0]
    K = _gram(k, X)
    y_np = np.asarray(y, np.float64)
    Y = y_np.reshape(n, -1)
    a = np.zeros_like(Y)
    keep = np.ones(n, bool)
    dropped_at = np.full(n, np.nan)
    t = 0.0
    for te in events:
        a = _flow_segment(K, Y, a, keep, ridge, te - t)
        t = te
        rows = np.flatnonzero(keep)
        if rows.size == 0:
            break
        Kp = K[np.ix_(rows, rows)]
        resid = K[rows] @ a - Y[rows]
        D = gradient_distances(Kp, resid)
        drop = _select(lambda i: D[np.ix_(i, i)], cls[rows], subset_size, C).drop
        keep[rows[drop]] = False
        dropped_at[rows[drop]] = te
    a = _flow_segment(K, Y, a, keep, ridge, time - t)
    alpha = a.reshape(y_np.shape).astype(np.asarray(y).dtype)
    model = krr.KRRModel(kernel=k, X=X, alpha=jnp.asarray(alpha), ridge=ridge)
    return EpicFlowResult(keep, dropped_at, model, events)


# --------------------------------------------------------------------------- training engine

def epic_schedule(epochs: int) -> Tuple[int, int]:
    """``(warmup, subset_freq)`` scaled from EPIC's 10 and 2 of a 40-epoch run:
    ``max(1, round(epochs / 4))`` and ``max(1, round(epochs / 20))`` (half up)."""
    epochs = _validate.positive_int("epochs", epochs)
    return max(1, math.floor(epochs / 4 + 0.5)), max(1, math.floor(epochs / 20 + 0.5))


def epic_filter(apply: Callable, X: Array, labels: Array, *, subset_size: float = 0.1,
                subset_freq: int = 2, warmup: int = 10, num_classes: Optional[int] = None,
                batch: int = 1024, block: int = 256
                ) -> Callable[[Any, int, np.ndarray], np.ndarray]:
    """EPIC as a ``data_filter`` of :func:`ntk_poison.train.train`.

    The returned ``filter(params, epoch, keep) -> keep`` acts at epochs ``e >= warmup``
    with ``(e - warmup) % subset_freq == 0`` (otherwise returns ``keep``): logits of the
    kept rows (``apply`` jit-compiled, ``batch`` rows at a time, the last batch padded
    so one program serves all), :func:`last_layer_gradients`, per class
    :func:`pairwise_distances` (``block`` rows a block) and the selection of
    :func:`epic_select`; the dropped rows leave ``keep``. Drops accumulate, since only
    kept rows are looked at. :func:`epic_schedule` scales warmup and frequency to a
    run's length. To record the masks, wrap the filter.

    Args:
      apply: ``apply(params, x_batch) -> (n, C)`` logits (as for train).
      X: the training inputs train sees ``(n, *input_shape)``.
      labels: their integer labels ``(n,)``.
      subset_size: the medoid fraction in (0, 1].
      subset_freq, warmup: ints >= 1 and >= 0 (epochs).
      num_classes: C of the similarity (default: distinct labels of ``labels``).
      batch, block: ints >= 1.
    """
    X = _validate.array("X", X)
    lab = np.asarray(_validate.array("labels", labels, ndim=1))
    _validate.same_rows("X", X, "labels", lab)
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"`labels` must be integer labels (n,), got dtype {lab.dtype}.")
    subset_size = _check_subset_size(subset_size)
    freq = _validate.positive_int("subset_freq", subset_freq)
    _validate.nonneg("warmup", warmup, integer=True)
    batch = _validate.positive_int("batch", batch)
    block = _validate.positive_int("block", block)
    C = _num_classes(num_classes, lab)
    X = jnp.asarray(X)
    n = X.shape[0]
    fwd = jax.jit(apply)

    def data_filter(params: Any, epoch: int, keep: np.ndarray) -> np.ndarray:
        keep = np.asarray(keep, bool)
        if epoch < warmup or (epoch - warmup) % freq:
            return keep
        rows = np.flatnonzero(keep)
        if rows.size == 0:
            return keep
        logits = _batched_logits(fwd, params, X, rows, min(batch, n))
        G = last_layer_gradients(logits, lab[rows])
        drop = _select(lambda i: pairwise_distances(G[i], block), lab[rows], subset_size,
                       C).drop
        out = keep.copy()
        out[rows[drop]] = False
        return out

    return data_filter


# --------------------------------------------------------------------------- private

def _check_subset_size(subset_size: Any) -> float:
    if (np.ndim(subset_size) != 0 or not np.isfinite(subset_size)
            or not 0 < subset_size <= 1):
        raise ValueError(f"`subset_size` must be a fraction in (0, 1] (EPIC uses 0.1, 0.2, "
                         f"0.3), got {subset_size!r}.")
    return float(subset_size)


def _num_classes(num_classes: Any, cls: np.ndarray) -> int:
    if num_classes is None:
        return max(1, len(np.unique(cls)))
    return _validate.positive_int("num_classes", num_classes)


def _medoid_count(n_c: int, subset_size: float) -> int:
    """``max(1, floor(subset_size n_c + 1/2))``, at most ``n_c``."""
    return min(n_c, max(1, top_fraction_count(n_c, subset_size)))


def _select(class_distances: Callable[[np.ndarray], Any], cls: np.ndarray,
            subset_size: float, C: int) -> EpicSelection:
    """:func:`epic_select` given ``class_distances(rows) -> (n_c, n_c)`` per class."""
    n = cls.shape[0]
    assignment = np.zeros(n, int)
    medoids = []
    for c in np.unique(cls):
        rows = np.flatnonzero(cls == c)
        D = np.asarray(class_distances(rows), np.float64)
        kc = _medoid_count(rows.size, subset_size)
        med = _medoids(np.exp(-D / C), kc)
        assignment[rows] = rows[med[np.argmin(D[:, med], axis=1)]]
        medoids.append(rows[med])
    size = np.bincount(assignment, minlength=n)[assignment]
    med = np.concatenate(medoids) if medoids else np.zeros(0, int)
    return EpicSelection(med, assignment, size, size <= 1)


def _bucket(m: int) -> int:
    return 1 << max(0, int(m - 1).bit_length())


def _medoids(S: np.ndarray, k: int) -> np.ndarray:
    """Greedy facility location, padded to power-of-two sizes so that few programs are
    compiled: zero rows add no gain; zero columns have gain 0 and lie after every real
    column, so argmax (first maximum) picks a real unchosen column (gain >= 0) while one
    is left. The first k picks of the padded greedy are the greedy's."""
    n = S.shape[0]
    m, kb = _bucket(n), _bucket(k)
    Sp = np.zeros((m, m), S.dtype)
    Sp[:n, :n] = S
    return np.asarray(_greedy(jnp.asarray(Sp), min(kb, m)))[:k]


def _kernel_problem(k, X, y, ridge, subset_size, num_classes):
    k, X, y = krr.check_training(k, X, y, ridge)
    cls = class_ids(np.asarray(y))
    return k, X, y, cls, _num_classes(num_classes, cls), _check_subset_size(subset_size)


def _gram(k, X) -> np.ndarray:
    K = np.asarray(krr.gram_plus_ridge(k, X, jnp.asarray(0.0, X.dtype)), np.float64)
    return 0.5 * (K + K.T)


def _phi(c: np.ndarray, tau: float) -> np.ndarray:
    """``(1 - exp(-c tau)) / c`` elementwise, ``tau`` where c = 0."""
    safe = np.where(c > 0, c, 1.0)
    return np.where(c > 0, -np.expm1(-safe * tau) / safe, tau)


def _flow_segment(K, Y, a, keep, ridge, tau):
    """Advance the coefficients ``a`` (n, r) by ``tau`` on the kept set (epic_flow)."""
    if tau <= 0:
        return a
    P, Q = np.flatnonzero(keep), np.flatnonzero(~keep)
    out = a.copy()
    out[Q] = np.exp(-ridge * tau) * a[Q]
    m = P.size
    if m == 0:
        return out
    s, V = np.linalg.eigh(K[np.ix_(P, P)])
    s = np.maximum(s, 0.0)
    rho = s / m + ridge
    z0 = V.T @ a[P]
    z = (np.exp(-rho * tau)[:, None] * z0 + _phi(rho, tau)[:, None] * (V.T @ Y[P]) / m
         - np.exp(-ridge * tau) * _phi(s / m, tau)[:, None] * (V.T @ (K[np.ix_(P, Q)] @ a[Q])) / m)
    out[P] = V @ z
    return out


def _batched_logits(fwd, params, X, rows: np.ndarray, batch: int) -> np.ndarray:
    """``fwd(params, X[rows])`` in batches of ``batch`` rows (the last one padded by
    repeating row 0, its padding discarded)."""
    outs = []
    for start in range(0, rows.size, batch):
        idx = rows[start:start + batch]
        pad = batch - idx.size
        idx_p = np.concatenate([idx, np.full(pad, idx[0])]) if pad else idx
        outs.append(np.asarray(fwd(params, X[idx_p]))[:idx.size])
    return np.concatenate(outs)


@functools.partial(jax.jit, static_argnums=1)
def _blockwise_distances(G, block):
    n = G.shape[0]
    nb = -(-n // block)
    Gp = jnp.concatenate([G, jnp.zeros((nb * block - n, G.shape[1]), G.dtype)])

    def rows(B):
        return jnp.sqrt(jnp.sum((B[:, None, :] - G[None, :, :]) ** 2, axis=-1))

    return jax.lax.map(rows, Gp.reshape(nb, block, -1)).reshape(nb * block, n)[:n]


@functools.partial(jax.jit, static_argnums=1)
def _greedy(S, k):
    n = S.shape[0]

    def pick(t, carry):
        best, chosen = carry
        gain = jnp.sum(jnp.maximum(S - best[:, None], 0.0), axis=0)
        gain = jnp.where(jnp.isin(jnp.arange(n), chosen), -1.0, gain)   # unfilled: -1
        j = jnp.argmax(gain)                             # first maximum: smallest index
        return jnp.maximum(best, S[:, j]), chosen.at[t].set(j.astype(jnp.int32))

    best0 = jnp.zeros((n,), S.dtype)
    _, chosen = jax.lax.fori_loop(0, k, pick, (best0, jnp.full((k,), -1, jnp.int32)))
    return chosen
