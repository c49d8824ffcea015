"""Ground-truth evaluation of a detector's ``(scores, flagged)`` output.

Every detector (:mod:`ntk_poison.defences.base`) is scored the same way, against the
true poison mask (an artefact's :attr:`~ntk_poison.artefact.Artefact.is_poison`, or
which test inputs carry the trigger):

* **AUROC**, from the scores alone, in its Mann-Whitney U form (Hanley & McNeil 1982,
  "The meaning and use of the area under a ROC curve")::

      AUROC = (R_+ - n_+ (n_+ + 1) / 2) / (n_+ n_-)

  with ``R_+`` the sum of the poisons' ranks among all scores (rank 1 = lowest) and
  ties given their average rank. It is the probability that a random poison scores
  above a random clean point, counting ties as one half.
* **TPR at a fixed FPR** (default 5%), with the threshold set from the CLEAN scores:
  ``t`` is the ``(floor(fpr * n_-) + 1)``-th largest clean score and a point is
  positive when ``score > t``, so at most ``floor(fpr * n_-)`` clean points pass
  (fewer under ties): the achieved FPR never exceeds ``fpr``.
* **Confusion counts** of the detector's own ``flagged`` decision: ``tp, fp, tn,
  fn``, precision ``tp / (tp + fp)``, recall ``tp / (tp + fn)`` and FPR
  ``fp / (fp + tn)`` (NaN when the denominator is 0).

No scikit-learn in the library: the tests check :func:`auroc` against
``sklearn.metrics.roc_auc_score``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import numpy as np

from ntk_poison import _validate
from ntk_poison.defences.base import check_output

Array = Any

__all__ = ["auroc", "average_ranks", "tpr_at_fpr", "confusion", "evaluate",
           "evaluate_artefact"]


def _truth(name: str, is_poison: Array, n: int) -> np.ndarray:
    _validate.array(name, is_poison, ndim=1)
    t = np.asarray(is_poison)
    if t.dtype != bool:
        if np.issubdtype(t.dtype, np.number) and np.isin(t, (0, 1)).all():
            t = t.astype(bool)
        else:
            raise ValueError(f"`{name}` must be a boolean mask (or 0/1), got dtype "
                             f"{t.dtype}.")
    if t.shape[0] != n:
        raise ValueError(f"`{name}` has {t.shape[0]} entries but there are {n} scores; "
                         "they must describe the same points.")
    return t


def _scores(scores: Array) -> np.ndarray:
    _validate.array("scores", scores, ndim=1, finite=False)
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError("`scores` contains NaN; a detector must score every point.")
    return s


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` (1 = smallest), ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    # Boundaries of runs of equal values in sorted order.
    new = np.concatenate([[True], xs[1:] != xs[:-1]])
    run = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.concatenate([starts[1:], [x.size]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = avg[run]
    return ranks


def auroc(scores: Array, is_poison: Array) -> float:
    """Area under the ROC curve, Mann-Whitney U form with average ranks for ties.

    Raises ValueError unless both classes are present.
    """
    s = _scores(scores)
    t = _truth("is_poison", is_poison, s.size)
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both poisons and clean points; got {n_pos} poisons "
                         f"and {n_neg} clean.")
    r = average_ranks(s)
    u = r[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def tpr_at_fpr(scores: Array, is_poison: Array, fpr: float = 0.05) -> Dict[str, float]:
    """TPR at a false-positive rate of at most ``fpr``, threshold from the clean scores.

    Returns ``{"tpr", "fpr", "threshold"}``: the achieved TPR and FPR and the
    threshold ``t`` (positive when ``score > t``; see the module docstring).
    """
    s = _scores(scores)
    t = _truth("is_poison", is_poison, s.size)
    _validate.nonneg("fpr", fpr)
    if fpr >= 1:
        raise ValueError(f"`fpr` must be in [0, 1), got {fpr}.")
    clean = np.sort(s[~t])[::-1]
    if clean.size == 0 or not t.any():
        raise ValueError("TPR at FPR needs both poisons and clean points.")
    allowed = int(math.floor(fpr * clean.size))
    thr = float(clean[allowed]) if allowed < clean.size else -np.inf
    pos = s > thr
    return {"tpr": float(pos[t].mean()), "fpr": float(pos[~t].mean()),
            "threshold": thr}


def _ratio(a: int, b: int) -> float:
    return float(a / b) if b else float("nan")


def confusion(flagged: Array, is_poison: Array) -> Dict[str, Any]:
    """Confusion counts of ``flagged`` against the truth, with precision/recall/FPR."""
    _validate.array("flagged", flagged, ndim=1)
    f = np.asarray(flagged)
    if f.dtype != bool:
        raise ValueError(f"`flagged` must be a boolean array, got dtype {f.dtype}.")
    t = _truth("is_poison", is_poison, f.size)
    tp = int(np.sum(f & t))
    fp = int(np.sum(f & ~t))
    tn = int(np.sum(~f & ~t))
    fn = int(np.sum(~f & t))
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "flag_fpr": _ratio(fp, fp + tn)}


def evaluate(scores: Array, flagged: Array, is_poison: Array, fpr: float = 0.05
             ) -> Dict[str, Any]:
    """All metrics of one detector run, as a JSON-ready dict.

    Keys: ``auroc``, ``tpr_at_fpr``, ``fpr_target``, ``fpr_achieved``,
    ``threshold_at_fpr`` (the score metrics; NaN when the truth holds only one
    class), and ``tp, fp, tn, fn, precision, recall, flag_fpr`` (of ``flagged``),
    plus ``n``, ``n_poison``.
    """
    s, f = check_output(scores, flagged)
    t = _truth("is_poison", is_poison, s.size)
    both = bool(t.any() and (~t).any())
    nan = float("nan")
    if both:
        at = tpr_at_fpr(s, t, fpr)
        out = {"auroc": auroc(s, t), "tpr_at_fpr": at["tpr"], "fpr_target": float(fpr),
               "fpr_achieved": at["fpr"], "threshold_at_fpr": at["threshold"]}
    else:
        _validate.nonneg("fpr", fpr)
        out = {"auroc": nan, "tpr_at_fpr": nan, "fpr_target": float(fpr),
               "fpr_achieved": nan, "threshold_at_fpr": nan}
    out.update(confusion(f, t))
    out.update({"n": int(s.size), "n_poison": int(t.sum())})
    return out


def evaluate_artefact(detector_output: Sequence[Any], artefact: Any, fpr: float = 0.05
                      ) -> Dict[str, Any]:
    """:func:`evaluate` of a detector run on an artefact's training rows.

    Args:
      detector_output: ``(scores, flagged)`` (extra items, e.g. an info dict, are
        ignored), one entry per row of ``artefact.x``.
      artefact: an :class:`ntk_poison.artefact.Artefact`; the truth is its
        ``is_poison``.
    """
    if not isinstance(detector_output, (tuple, list)) or len(detector_output) < 2:
        raise ValueError("`detector_output` must be the (scores, flagged) pair a "
                         "detector's detect(...) returns.")
    if not hasattr(artefact, "is_poison"):
        raise ValueError(f"`artefact` must be an ntk_poison.artefact.Artefact, got "
                         f"{type(artefact).__name__}.")
    scores, flagged = detector_output[0], detector_output[1]
    truth = artefact.is_poison
    if np.shape(scores)[:1] != truth.shape:
        raise ValueError(f"The detector scored {np.shape(scores)[0]} points but the "
                         f"artefact has {truth.size} training rows; run the detector on "
                         "artefact.x.")
    return evaluate(scores, flagged, truth, fpr)
