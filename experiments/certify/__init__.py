"""The certified and spectral views side by side (issue 14): how soon an attack is
certifiably possible, how soon it succeeds, and how soon it is spectrally visible.

The binary MNIST task of :mod:`ntk_poison.scenario` (``positive_classes`` -> +1, the
target), KRR with an RBF kernel at the median distance l. For each poison budget m:

* **the exact kernel certificates** of the CLEAN model at the triggered test inputs
  (``ntk_poison.certify``): the label-flip radius r(x) (the largest number of +-1 label
  flips of clean training points that cannot change sign f(x)); the fraction of
  triggered inputs an attacker with m flips can send to the target,
  ``mean(f_clean(x) > 0 or r(x) < m)``; and the fraction that m clones at the best of a
  finite candidate set (the triggered prototype and triggered training images) can send
  there (``certify.clone_worst_case``, exact over the set: a lower bound on an attacker
  free to place the clones anywhere);
* **the AGT bound** of a linear model on the same task (``certify.agt``, label flips of
  m points): the largest ASR any such poisoning can reach (when AGT is available);
* **the ASR actually reached** by m clones at the triggered prototype and by m BadNets-
  style poisons (the trigger on m non-target training images, relabelled +1);
* **the spectral visibility** of each attacked model: the curvature detector's AUROC
  (triggered against clean test inputs; threshold from clean calibration inputs) and
  the ratio of median top loss input-Hessian eigenvalues, triggered / clean.

Claim, reported as measured: an attack is certifiably possible long before it is
spectrally visible (the lag, seen from the certification side). Run:
``ntk-poison run certify --out results/certify``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Tuple

import numpy as np

from ntk_poison import attacks, io, krr, scenario
from ntk_poison.defences import auroc
from ntk_poison.report import Report, new_figure, progress, x64_run

NAME = "certify"


@dataclasses.dataclass(frozen=True)
class Config(scenario.DataPart, scenario.AttackPart, scenario.RidgePart,
             scenario.DetectorPart):
    """Configuration of the certify experiment (validated; saved in results.json)."""

    n_train: int = 300
    n_trigger: int = 100
    trigger_strength: float = 1.0  # the cross trigger's norm in units of l    ridge: float = 1e-3
    ms: Tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)
    n_candidates: int = 50        # triggered training images beside the prototype
    agt_dim: int = 32             # AGT: PCA dimension (the trigger kept), 2 classes
    agt_hidden: Tuple[int, ...] = ()   # AGT: ReLU hidden widths (): a linear model
    agt_lr: float = 5.0           # AGT: full-batch gradient descent (the reference
    agt_steps: int = 2            # notebook's MNIST example: lr 5, 2 steps)
    visible_auroc: float = 0.9    # visible: detector AUROC at least this
    possible_rate: float = 0.5    # certifiably possible: this fraction can be flipped

    def validate(self) -> None:
        super().validate()
        if not self.ms or any(m < 0 for m in self.ms) or list(self.ms) != sorted(set(self.ms)):
            raise ValueError(f"`ms` must be increasing counts >= 0, got {list(self.ms)}.")
        self.check_min(1, "n_candidates", "agt_steps")
        self.check_min(2, "agt_dim")
        if any(h < 1 for h in self.agt_hidden):
            raise ValueError(f"`agt_hidden` must be widths >= 1, got {list(self.agt_hidden)}.")
        self.check_positive("agt_lr")
        if not 0.5 < self.visible_auroc <= 1 or not 0 < self.possible_rate <= 1:
            raise ValueError("`visible_auroc` must be in (0.5, 1] and `possible_rate` in "
                             "(0, 1].")


def visibility(cfg, splits, model):
    """The curvature detector's AUROC (triggered against clean test inputs) and the
    ratio of median top loss input-Hessian eigenvalues, triggered / clean."""
    det = scenario.detector_for(cfg, None).fit(model, splits.x_cal)
    s_t, _ = det.detect(model, splits.x_trig)
    s_c, _ = det.detect(model, splits.x_clean)
    truth = np.r_[np.ones(len(s_t), bool), np.zeros(len(s_c), bool)]
    return dict(auroc=float(auroc(np.r_[s_t, s_c], truth)),
                ratio=float(np.median(s_t) / np.median(s_c)))


def agt_part(cfg, sc):
    """A linear 2-class model (or a ReLU MLP with ``agt_hidden``) on the PCA features
    (trigger kept; scaled to mean squared norm 1), trained by full-batch gradient
    descent: returns ``bound(m) -> (lower, nominal, upper)`` ASR on the
    triggered inputs over every flip of at most m labels to the target class (AGT)."""
    import jax
    from ntk_poison import data
    from ntk_poison.certify import agt
    reduce = data.pca_reduction(sc.X, sc.trigger.direction(sc.X.shape[1:]), cfg.agt_dim)
    scale = 1.0 / np.sqrt(cfg.agt_dim)
    Z, Zt, Zte = (reduce(a) * scale for a in (sc.X, sc.X_trig, sc.X_test))
    labels = (sc.y > 0).astype(np.int32)
    params = agt.init_mlp(jax.random.PRNGKey(cfg.seed),
                          [cfg.agt_dim, *cfg.agt_hidden, 2])

    def bound(m):
        conf = agt.AGTConfig(learning_rate=cfg.agt_lr, n_steps=cfg.agt_steps,
                             label_k_poison=int(m), poison_target=1)
        box = agt.train(params, Z, labels, conf)
        lo, nom, up = agt.backdoor_asr_bound(box, Zt, 1)
        acc = agt.certified_accuracy(box, Zte, (sc.y_test > 0).astype(np.int32))
        return dict(agt_asr_lower=lo, agt_asr_nominal=nom, agt_asr_upper=up,
                    agt_acc_lower=acc[0], agt_acc_nominal=acc[1], agt_acc_upper=acc[2])
    return bound


def first_m(ms, values, level):
    hit = [m for m, v in zip(ms, values) if v is not None and v >= level]
    return hit[0] if hit else None


@x64_run
def run(cfg: Config, out_dir: str | Path, fresh: bool = False) -> Report:
    """Run the experiment; write results.json, the figure and report.md. The clean model's
    certificates, and each budget m, are cells of an :class:`io.Sweep` (``out_dir/cells``):
    a rerun of the same config resumes; ``fresh`` starts over."""
    from ntk_poison import certify, kernels
    sweep = io.Sweep(out_dir, cfg, fresh=fresh)
    rep = Report("ntk-poison certify: certified, reached and visible, against the poison "
                 "budget", out_dir, cfg)
    rep.started = sweep.started
    sc, splits = scenario.build_for_detection(cfg)
    k = kernels.rbf(length_scale=sc.length_scale)
    x_trig = sc.X_trig
    rng = np.random.default_rng(cfg.seed)
    neg = np.flatnonzero(sc.y < 0)
    cand_src = sc.X[rng.choice(neg, size=min(cfg.n_candidates, len(neg)), replace=False)]
    candidates = np.concatenate([sc.zeta[None], np.asarray(sc.trigger.apply(cand_src))])
    positive = [int(m) for m in cfg.ms if m > 0]

    def clean():   # the clean model's certificates; the clone worst case at every m > 0
        wcs = certify.clone_worst_case(k, sc.X, sc.y, cfg.ridge, x_trig, candidates,
                                       positive, sc.y_target) if positive else []
        return dict(f0=krr.fit(k, sc.X, sc.y, cfg.ridge).predict(x_trig),
                    radius=certify.certified_radius(k, sc.X, sc.y, cfg.ridge, x_trig),
                    clones_possible={m: float(np.mean(np.asarray(w.worst_effect) > 0))
                                     for m, w in zip(positive, wcs)})

    base = sweep.cell("clean", clean)
    f0, radius = np.asarray(base["f0"]), np.asarray(base["radius"])
    agt_bound = agt_part(cfg, sc)

    def budget(m):
        row = dict(m=int(m), flips_possible=float(np.mean((f0 > 0) | (radius < m))))
        row.update(agt_bound(m))
        row["clones_possible"] = (base["clones_possible"][int(m)] if m
                                  else float(np.mean(f0 > 0)))
        for name in ("clone", "backdoor"):
            if name == "clone":
                art = attacks.clone_attack(sc.X, sc.y, sc.zeta, sc.y_target, m)
            else:
                art = attacks.backdoor_attack(sc.X, sc.y, sc.trigger, sc.y_target,
                                              n_poison=m, seed=cfg.seed)
            model = krr.fit(k, art.x, art.y, cfg.ridge)
            row[f"{name}_asr"] = float(sc.attack_success_rate(np.asarray(model.predict(x_trig))))
            row.update({f"{name}_{kk}": v for kk, v in
                        visibility(cfg, splits, model).items()})
        return row

    rows = [sweep.cell(f"m{int(m)}", lambda: budget(m)) for m in progress(cfg.ms, "budgets")]
    res = dict(rows=rows, radius=radius.tolist(), trigger_alone=float(np.mean(f0 > 0)),
               length_scale=sc.length_scale, n_train=len(sc.X))
    ms = [r["m"] for r in rows]
    lines = {}
    for name in ("clone", "backdoor"):
        m_pos = first_m(ms, [r["flips_possible"] for r in rows], cfg.possible_rate)
        m_cl = first_m(ms, [r["clones_possible"] for r in rows], cfg.possible_rate)
        m_asr = first_m(ms, [r[f"{name}_asr"] for r in rows], cfg.possible_rate)
        m_vis = first_m(ms, [r[f"{name}_auroc"] for r in rows], cfg.visible_auroc)
        m_agt = first_m(ms, [r["agt_asr_upper"] for r in rows], cfg.possible_rate)
        lines[name] = dict(flips=m_pos, clones=m_cl, asr=m_asr, visible=m_vis, agt=m_agt)
        rep.measurement(
            f"lag_{name}", f"{name}: the budget m at which an attack is certifiably "
            f"possible (>= {cfg.possible_rate} of triggered inputs flippable), reached "
            f"(ASR >= {cfg.possible_rate}) and visible (curvature AUROC >= "
            f"{cfg.visible_auroc})", f"label flips: m = {m_pos}; clones at the best "
            f"candidate: m = {m_cl}; AGT (linear model, flips): m = {m_agt}; ASR reached by "
            f"{name}: m = {m_asr}; visible: m = "
            f"{m_vis} (None: not within ms = {list(ms)})")
    res["first_m"] = lines
    rep.results = res
    head = ["m", "flips possible", "clones possible", "AGT ASR bound", "clone ASR",
            "clone AUROC", "backdoor ASR", "backdoor AUROC"]
    keys = ["flips_possible", "clones_possible", "agt_asr_upper", "clone_asr",
            "clone_auroc", "backdoor_asr", "backdoor_auroc"]
    table = [f"Trigger-alone ASR (the clean model): {res['trigger_alone']:.2f}; AGT's "
             f"nominal ASR at m = 0: {rows[0]['agt_asr_nominal']:.2f}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join([str(r["m"])] + [f"{r[kk]:.2f}" for kk in keys]) + " |"
              for r in rows]
    rep.text("\n".join(table))
    fig, axes = new_figure(1, 1, size=(6.0, 4.2))
    ax = axes[0][0]
    x = np.maximum(ms, 0.5)
    ax.plot(x, [r["flips_possible"] for r in rows], "k-o", label="certified: m label flips")
    ax.plot(x, [r["clones_possible"] for r in rows], "k--s", label="certified: m clones "
            "(best candidate)")
    ax.plot(x, [r["agt_asr_upper"] for r in rows], "-.", color="C2",
            label="AGT bound (linear, m flips)")
    for name, c in (("clone", "C0"), ("backdoor", "C1")):
        ax.plot(x, [r[f"{name}_asr"] for r in rows], "-^", color=c, label=f"ASR {name}")
        ax.plot(x, [r[f"{name}_auroc"] for r in rows], ":", color=c, label=f"AUROC {name}")
    ax.set_xscale("log")
    ax.set_xlabel("poison budget m (0 drawn at 0.5)")
    ax.set_ylabel("fraction of triggered inputs / AUROC")
    ax.legend(fontsize=7)
    rep.figure(fig, "certified_vs_visible")
    rep.results["seconds_total"] = sweep.seconds()     # the cells' stored times
    rep.write()
    return rep

