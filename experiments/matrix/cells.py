"""One cell of the matrix: an attack's artefact against one defence, in one regime.

A regime (``kernel.KernelRegime``, ``net.NetRegime``) supplies the model-specific
parts: ``fit(X, Y, arm)`` for arm in {"plain", "penalty", "penalty+aug"},
``fit_epic(X, Y) -> (model, keep)``, ``predict(model, x)`` (outputs ``(m, C)``),
``features(model, X)`` (the representation the detectors read), ``curvature(model, x)``
(the top eigenvalue of the loss input-Hessian at each input, at the model's own
label) and ``loss_fn(model)`` (per-example losses for PGD). This module holds what is
the same in both: which model a defence trains, what is measured, and the detection
scores against the ground truth.

Measured per cell (the ``alone`` cell is the same defence on the CLEAN training set):
* ``asr[t]``: triggered non-target test inputs sent to the target, per trigger t;
  with the curvature detector, flagged (rejected) inputs do not count as successes;
* ``clean_acc``; ``auroc``, ``tpr_at_5fpr``: the defence's scores against the truth
  (training rows that are poisons; for the curvature detector, triggered test inputs
  against clean ones); ``poisons_dropped``, ``clean_dropped`` (removal defences);
* ``robust``: for the deferred attack (and the alone cell), accuracy under Gaussian
  noise and PGD, and the median top input-Hessian eigenvalue at test inputs.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Dict

import numpy as np

from ntk_poison import metrics
from ntk_poison.defences import (ActivationClustering, SpectralSignatures, auroc,
                                 tpr_at_fpr)

DEFENCES = ("none", "spectral", "clustering", "curvature", "epic", "penalty",
            "penalty+aug")
#: removal defences: detect on the training set, drop the flagged rows, retrain
DETECTORS = {"spectral": lambda cfg: SpectralSignatures(eps=cfg.poison_rate),
             "clustering": lambda cfg: ActivationClustering(random_state=cfg.seed)}


def evaluation_inputs(regime, cfg, xte, yte, as_input) -> None:
    """Set the test inputs every cell reads, from test IMAGES ``xte`` and labels:
    ``xte``/``yte``, the non-target images ``src_img``, their triggered versions
    ``x_trig[t]`` per trigger, the curvature detector's clean calibration (the last
    ``n_cal``) and evaluation (the first ``n_eval``) inputs, and the robustness inputs
    ``x_rob``, ``y_rob`` (the first ``n_robust``). ``as_input`` maps images to the
    regime's inputs (flattened for the kernel, float32 images for the net)."""
    regime.src_img = xte[np.flatnonzero(yte != cfg.target_class)]
    src = as_input(regime.src_img)
    regime.x_trig = {t: as_input(tr.apply(regime.src_img)) for t, tr in cfg.trigger_objects()}
    regime.n_eval = cfg.n_eval
    regime.x_cal, regime.x_eval_clean = src[-cfg.n_cal:], src[:cfg.n_eval]
    regime.xte, regime.yte = as_input(xte), yte
    regime.x_rob, regime.y_rob = regime.xte[:cfg.n_robust], yte[:cfg.n_robust]


def fit_cached(regime, X, Y, arm):
    """``regime.fit``, memoised on the data and the arm: the undefended model is shared
    by the none, curvature and (as the feature map) removal cells of one attack."""
    h = hashlib.sha1(np.ascontiguousarray(X).tobytes())
    h.update(np.ascontiguousarray(Y).tobytes())
    key = (h.hexdigest(), arm)
    memo = regime.__dict__.setdefault("_fits", {})
    if key not in memo:
        if len(memo) > 8:
            memo.clear()
        memo[key] = regime.fit(X, Y, arm)
    return memo[key]


def detection(scores, flagged, truth) -> Dict[str, Any]:
    truth = np.asarray(truth, bool)
    out = dict(n_flagged=int(np.sum(flagged)),
               poisons_dropped=int(np.sum(flagged & truth)),
               clean_dropped=int(np.sum(flagged & ~truth)))
    if 0 < truth.sum() < truth.size:
        out["auroc"] = float(auroc(scores, truth))
        out["tpr_at_5fpr"] = float(tpr_at_fpr(scores, truth, 0.05)["tpr"])
    return out


def outcome(regime, model, cfg, rejected=None) -> Dict[str, Any]:
    """Clean accuracy and the ASR of every trigger. With ``rejected`` (the curvature
    detector's flags on the first ``n_eval`` triggered inputs) the ASR is over those
    inputs, and a rejected input does not succeed."""
    out = dict(clean_acc=float(metrics.clean_accuracy(
        regime.predict(model, regime.xte), regime.yte, multiclass=True)), asr={})
    for t, xt in regime.x_trig.items():
        if rejected is not None:
            xt = xt[:regime.n_eval]
        hit = metrics.decisions(regime.predict(model, xt), multiclass=True) == cfg.target_class
        if rejected is not None and t in rejected:
            hit = hit & ~rejected[t]
        out["asr"][t] = float(np.mean(hit))
    return out


def robustness(regime, model, cfg, threshold=None) -> Dict[str, Any]:
    """Accuracy under Gaussian noise and l_inf PGD on the robustness inputs
    (``attacks.deferred.robustness``), and the top input-Hessian eigenvalue at the first
    ``n_eval`` of them: its median, and with ``threshold`` (the clean model's 95%
    quantile) the fraction above it."""
    from ntk_poison.attacks import deferred
    x, y = regime.x_rob, regime.y_rob
    r = deferred.robustness(lambda a: regime.predict(model, a), x, y,
                            sigmas=tuple(cfg.noise_sigmas), pgd_eps=(cfg.pgd_eps,),
                            loss_fn=regime.loss_fn(model), seed=cfg.seed)
    out = dict(clean_acc=r["clean"], pgd_acc=r[f"pgd_{cfg.pgd_eps:g}"],
               noise_acc={f"{s:g}": r[f"noise_{s:g}"] for s in cfg.noise_sigmas})
    top = np.asarray(regime.curvature(model, x[:regime.n_eval]))
    out["top_eig_median"] = float(np.median(top))
    if threshold is not None:
        out["curvature_fires"] = float(np.mean(top > threshold))
    return out


def evaluate_cell(regime, cfg, attack: str, defence: str, art, ref=None) -> Dict[str, Any]:
    """Run ``defence`` against the artefact ``art`` (``attack == "clean"``: the clean
    training set, no poisons) and measure the cell. ``ref``: the clean cell of the same
    defence (its curvature threshold for the deferred attack)."""
    t0 = time.time()
    X, Y = regime.train_arrays(art)
    truth = np.asarray(art.is_poison, bool) if art is not None else np.zeros(len(X), bool)
    out: Dict[str, Any] = {"n_poison": int(truth.sum())}
    rejected = None
    if defence in ("none", "curvature", "spectral", "clustering"):
        model = fit_cached(regime, X, Y, "plain")
    if defence in DETECTORS:
        s, f = DETECTORS[defence](cfg).detect(regime.features(model, X), regime.classes(Y))
        out.update(detection(s, f, truth))
        model = fit_cached(regime, X[~f], Y[~f], "plain")
    elif defence == "epic":
        model, keep = regime.fit_epic(X, Y)
        out.update(detection((~keep).astype(float), ~keep, truth))
    elif defence in ("penalty", "penalty+aug"):
        model = fit_cached(regime, X, Y, defence)
    if defence == "curvature":
        cal = np.asarray(regime.curvature(model, regime.x_cal))
        thr = float(np.quantile(cal, 1 - 0.05))
        clean_s = np.asarray(regime.curvature(model, regime.x_eval_clean))
        rejected, det = {}, {}
        for t, xt in regime.x_trig.items():
            s = np.asarray(regime.curvature(model, xt[:regime.n_eval]))
            rejected[t] = s > thr
            sc = np.concatenate([s, clean_s])
            truth_t = np.r_[np.ones(len(s), bool), np.zeros(len(clean_s), bool)]
            det[t] = dict(auroc=float(auroc(sc, truth_t)),
                          tpr_at_5fpr=float(np.mean(s > thr)),
                          fpr=float(np.mean(clean_s > thr)))
        out["detection_by_trigger"] = det
        out["threshold"] = thr
    out.update(outcome(regime, model, cfg, rejected))
    if attack in ("clean", "deferred") and cfg.robustness:
        thr = None
        if attack == "deferred" and ref is not None:
            thr = ref.get("clean_threshold")
        out["robust"] = robustness(regime, model, cfg, thr)
        if attack == "clean":
            out["clean_threshold"] = float(np.quantile(
                np.asarray(regime.curvature(model, regime.x_cal)), 0.95))
    out["seconds"] = time.time() - t0
    return out
