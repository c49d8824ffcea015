"""Attacks: each writes ONE artefact (:class:`ntk_poison.artefact.Artefact`).

THEORY.md section 2. Following BackdoorBench, an attack is run once and its artefact
(the poisoned training set, which rows are poisons, the trigger, the target, the
seed) is what every detector, defence and experiment consumes.

* :func:`clone_attack`: ``m`` dirty-label copies of one poison point ``zeta`` with
  the target label (the clone cluster of THEORY.md section 2);
* :func:`near_clone_attack`: the clone cluster at distance exactly ``r`` from a point
  ``x0`` (the near-clone regime ``r << l``);
* :func:`backdoor_attack`: the classic dirty-label, all-to-one backdoor (Gu et al.
  2017): triggered copies of ``n_poison`` non-target training points, relabelled.

The poison point itself: :func:`prototype_poison` (the triggered mean non-target
training image, or one such image), :func:`near_clone`. Everything in this file is
plain numpy on the host: poisons are data, not computation. The optimised attacks,
which differentiate through a model, live in submodules (issue 13):
:mod:`ntk_poison.attacks.deferred` (deferred poisoning by Hessian singularization) and
:mod:`ntk_poison.attacks.optimal` (the optimal invisible clone poison).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from ntk_poison import _validate
from ntk_poison.artefact import Artefact

Array = Any

__all__ = ["clone_cluster", "near_clone", "prototype_poison", "clone_attack",
           "near_clone_attack", "backdoor_attack"]


# --------------------------------------------------------------------------- poison points

def clone_cluster(X: Array, y: Array, zeta: Array, y_target: Any, m: int
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Append ``m`` copies of ``(zeta, y_target)`` to the training set.

    Args:
      X: clean inputs ``(n, *input_shape)``.
      y: clean float targets ``(n,)`` or ``(n, c)``.
      zeta: the poison input, of shape ``input_shape``.
      y_target: the target label: a scalar for ``y`` of shape ``(n,)``, or a ``(c,)``
        vector for ``(n, c)``.
      m: the number of clones, an integer >= 0.

    Returns:
      ``(Xp, yp)`` with the ``m`` poisons appended as the last ``m`` rows.
    """
    _validate.array("X", X, ndim=(2, 3, 4))
    _validate.array("y", y, ndim=(1, 2), floating=True)
    _validate.same_rows("X", X, "y", y)
    _validate.nonneg("m", m, integer=True)
    X = np.asarray(X)
    y = np.asarray(y)
    zeta = np.asarray(_validate.array("zeta", zeta))
    if zeta.shape != X.shape[1:]:
        raise ValueError(f"`zeta` has shape {zeta.shape} but the inputs in `X` have shape "
                         f"{X.shape[1:]}; pass one input point.")
    yt = np.asarray(_validate.array("y_target", y_target))
    if yt.shape != y.shape[1:]:
        raise ValueError(f"`y_target` has shape {yt.shape} but one target in `y` has "
                         f"shape {y.shape[1:]}.")
    m = int(m)
    Xp = np.concatenate([X, np.broadcast_to(zeta.astype(X.dtype), (m,) + zeta.shape)])
    yp = np.concatenate([y, np.broadcast_to(yt.astype(y.dtype), (m,) + yt.shape)])
    return Xp, yp


def near_clone(x0: Array, r: float, seed: int = 0, direction: Array | None = None
               ) -> np.ndarray:
    """A poison point at distance exactly ``r`` from ``x0``: ``zeta = x0 + r u``.

    ``u`` is ``direction`` normalised, or a uniformly random unit vector drawn from
    ``seed``. The near-clone regime of THEORY.md section 2 is ``r << l``.
    """
    x0 = np.asarray(_validate.array("x0", x0), dtype=np.float64)
    _validate.nonneg("r", r)
    if direction is None:
        u = np.random.default_rng(seed).standard_normal(x0.shape)
    else:
        u = np.asarray(_validate.array("direction", direction), dtype=np.float64)
        if u.shape != x0.shape:
            raise ValueError(f"`direction` has shape {u.shape}; it must match `x0` "
                             f"{x0.shape}.")
    norm = np.linalg.norm(u)
    if norm == 0:
        raise ValueError("`direction` is the zero vector; pass a non-zero direction.")
    return x0 + float(r) * u / norm

def prototype_poison(X: Array, y: Array, trigger: Any, kind: str = "prototype",
                     target: float = 1.0) -> np.ndarray:
    """The poison point of the paper's clone attack: a triggered non-target input.

    ``kind="prototype"``: the trigger applied to the mean of the training inputs whose
    target is not ``target`` (binary +-1 targets ``(n,)``: those with ``sign y != sign
    target``; one-hot rows ``(n, c)`` and a ``(c,)`` target: those whose argmax class
    is not the target's); ``"image"``: the trigger applied to the first of them.
    Returns one input (float64).
    """
    _validate.choice("kind", kind, ("prototype", "image"))
    X, y = np.asarray(X), np.asarray(y)
    if y.ndim == 2:
        t = np.asarray(target)
        if t.shape != y.shape[1:]:
            raise ValueError(f"`target` has shape {t.shape}; for one-hot targets `y` "
                             f"{y.shape} pass the target row, of shape {y.shape[1:]}.")
        neg = X[np.argmax(y, axis=1) != np.argmax(t)]
    else:
        neg = X[np.sign(y) != np.sign(target)]
    if not len(neg):
        raise ValueError("`y` has no non-target training points to build the poison from.")
    base = neg.mean(0) if kind == "prototype" else neg[0]
    return np.asarray(trigger.apply(base[None])[0], np.float64)


# --------------------------------------------------------------------------- attacks

def clone_attack(X: Array, y: Array, zeta: Array, y_target: Any, m: int,
                 trigger: Any = None, seed: int = 0,
                 meta: Optional[Dict[str, Any]] = None) -> Artefact:
    """The cloned dirty-label poison of THEORY.md section 2, as an artefact.

    Appends ``m`` copies of ``(zeta, y_target)`` to the clean set
    (:func:`clone_cluster`), so ``poison_idx = n, ..., n + m - 1``.

    Args:
      X: clean inputs ``(n, *input_shape)``.
      y: clean float targets ``(n,)`` or ``(n, c)``.
      zeta: the poison input (one input).
      y_target: the target, a scalar (or a ``(c,)`` vector for ``(n, c)`` targets).
      m: the number of clones, >= 0.
      trigger: the trigger that carries a test input towards ``zeta``, if any.
      seed: recorded (the construction itself is deterministic).
      meta: extras; ``attack="clone"``, ``m`` and ``n_clean`` are added unless given.
    """
    Xp, yp = clone_cluster(X, y, zeta, y_target, m)
    n = int(np.asarray(X).shape[0])
    info = {"attack": "clone", "m": int(m), "n_clean": n}
    info.update(meta or {})
    return Artefact(x=Xp, y=yp, poison_idx=np.arange(n, n + int(m)), trigger=trigger,
                    target=y_target, seed=seed, meta=info)


def near_clone_attack(X: Array, y: Array, x0: Array, r: float, y_target: Any, m: int,
                      trigger: Any = None, seed: int = 0,
                      meta: Optional[Dict[str, Any]] = None) -> Artefact:
    """:func:`clone_attack` with ``zeta = x0 + r u`` (:func:`near_clone`, u a random unit
    vector from ``seed``): the near-clone regime of THEORY.md section 2 for r << l.
    ``meta`` gains ``r``."""
    zeta = near_clone(x0, r, seed=seed)
    info = {"r": float(r)}
    info.update(meta or {})
    return clone_attack(X, y, zeta, y_target, m, trigger=trigger, seed=seed, meta=info)


def _candidates(y: np.ndarray, target: np.ndarray, source_filter: Any,
                X: np.ndarray) -> np.ndarray:
    """Rows whose target differs from ``target`` and that pass ``source_filter``."""
    same = np.isclose(y, target)
    non_target = ~(same if y.ndim == 1 else same.all(axis=1))
    if source_filter is None:
        return non_target
    if callable(source_filter):
        keep = np.asarray(source_filter(X, y))
    else:
        keep = np.asarray(source_filter)
    if keep.dtype != bool or keep.shape != (X.shape[0],):
        raise ValueError(f"`source_filter` must be a boolean mask of shape "
                         f"({X.shape[0]},) or a callable (X, y) -> such a mask; got "
                         f"dtype {keep.dtype}, shape {keep.shape}.")
    return non_target & keep


def backdoor_attack(X: Array, y: Array, trigger: Any, target: Any, *,
                    n_poison: Optional[int] = None, rate: Optional[float] = None,
                    seed: int = 0, source_filter: Union[None, Array, Callable] = None,
                    mode: str = "append", meta: Optional[Dict[str, Any]] = None
                    ) -> Artefact:
    """The classic dirty-label, all-to-one backdoor (Gu et al. 2017, BadNets).

    Picks ``n_poison`` training points whose target is not ``target`` (uniformly,
    without replacement, from ``np.random.default_rng(seed)``), applies the trigger,
    and relabels them ``target``.

    * ``mode="append"`` (default): the poisons are COPIES appended after the clean
      set, which stays intact: ``x[:n] == X``, ``poison_idx = n .. n + n_poison - 1``.
    * ``mode="replace"``: the chosen rows are overwritten in place (BackdoorBench's
      convention; the training set keeps its size), ``poison_idx`` = those rows.

    ``meta["source_idx"]`` records the clean rows the poisons were made from.

    Args:
      X: clean inputs ``(n, d)`` or ``(n, H, W, C)``.
      y: float targets ``(n,)`` (e.g. +-1) or ``(n, c)`` (one-hot).
      trigger: a trigger object (:mod:`ntk_poison.triggers`); a stochastic one draws
        its per-input strengths from ``jax.random.PRNGKey(seed)``.
      target: the target value, of one target's shape (a scalar or a ``(c,)`` vector).
      n_poison: the number of poisons; or
      rate: the fraction of the CLEAN set to poison, ``n_poison = round(rate * n)``
        (the count BackdoorBench's ``pratio`` gives). Exactly one of the two.
      seed: the seed of the selection (and of a stochastic trigger).
      source_filter: restrict the candidate rows: a boolean mask ``(n,)`` or a
        callable ``(X, y) -> mask`` (e.g. a source class for a source-specific attack).
      mode: ``"append"`` or ``"replace"``.
      meta: extras; ``attack``, ``mode``, ``n_clean`` and ``source_idx`` are added.

    Returns:
      An :class:`Artefact`; deterministic given ``seed``.
    """
    _validate.array("X", X, ndim=(2, 3, 4))
    _validate.array("y", y, ndim=(1, 2), floating=True)
    X, y = np.asarray(X), np.asarray(y)
    _validate.same_rows("X", X, "y", y)
    if trigger is None or not hasattr(trigger, "apply"):
        raise ValueError("`trigger` must be a trigger object, e.g. "
                         "triggers.CrossTrigger(strength=0.5).")
    t = np.asarray(_validate.array("target", target), dtype=y.dtype)
    if t.shape != y.shape[1:]:
        raise ValueError(f"`target` has shape {t.shape} but one target in `y` has shape "
                         f"{y.shape[1:]}; for one-hot targets pass the target vector.")
    if mode not in ("append", "replace"):
        raise ValueError(f"`mode` must be 'append' or 'replace', got {mode!r}.")
    if (n_poison is None) == (rate is None):
        raise ValueError("Pass exactly one of `n_poison` (a count) and `rate` (a fraction "
                         "of the clean set).")
    n = X.shape[0]
    if rate is not None:
        _validate.nonneg("rate", rate)
        if rate > 1:
            raise ValueError(f"`rate` must be in [0, 1], got {rate}.")
        n_poison = int(np.floor(rate * n + 0.5))
    _validate.nonneg("n_poison", n_poison, integer=True)
    n_poison = int(n_poison)
    _validate.nonneg("seed", seed, integer=True)
    cand = np.flatnonzero(_candidates(y, t, source_filter, X))
    if n_poison > cand.size:
        raise ValueError(f"`n_poison` = {n_poison} exceeds the {cand.size} non-target "
                         "candidate rows (after `source_filter`); ask for fewer poisons.")
    rng = np.random.default_rng(int(seed))
    src = np.sort(rng.choice(cand, size=n_poison, replace=False))
    xp = trigger.apply(X[src], key=int(seed)) if n_poison else X[:0]
    xp = np.asarray(xp, dtype=np.result_type(X.dtype, xp.dtype))
    yp = np.broadcast_to(t, (n_poison,) + t.shape)
    if mode == "append":
        Xa = np.concatenate([X.astype(xp.dtype), xp])
        ya = np.concatenate([y, yp])
        idx = np.arange(n, n + n_poison)
    else:
        Xa = X.astype(xp.dtype, copy=True)
        ya = y.copy()
        Xa[src] = xp
        ya[src] = yp
        idx = src
    info = {"attack": "backdoor", "mode": mode, "n_clean": n,
            "source_idx": src.tolist()}
    info.update(meta or {})
    return Artefact(x=Xa, y=ya, poison_idx=idx, trigger=trigger, target=t, seed=seed,
                    meta=info)
