"""Every attack against every defence, in two regimes: one table (issue 13).

Regimes (:mod:`experiments.matrix.kernel`, :mod:`experiments.matrix.net`): the exact
kernel model (KRR with the analytic NTK of a wide erf MLP, float64, ``kernel_n_train``
flattened images), and the small CNN trained by the engine on ``n_train`` images.
Data: MNIST, all-to-one to ``target_class``; poison budget ``poison_rate`` of the
clean set.

Attacks (each writes one artefact, ``artefacts/{regime}_{attack}.npz``, that every
defence consumes):
* ``clone``: m = round(rate n) dirty-label copies of the patch-triggered prototype;
* ``near_clone``: m copies at distance ``near_clone_r * l`` from one triggered test
  input (l the median pairwise distance);
* ``optimal``: the optimal invisible poison (``attacks.optimal``): zeta in an l_inf box
  of ``opt_radius`` around a clean non-target image and m, maximising the efficacy at
  ``opt_points`` patch-triggered inputs subject to the curvature at them staying under
  the clean model's 95% quantile; the net regime reuses the kernel regime's zeta;
* ``patch``, ``blend``, ``warp``: BadNets-style dirty-label backdoors (rows replaced);
* ``deferred``: deferred poisoning (``attacks.deferred``), correct labels, an l_inf
  budget ``deferred_eps``; scored by the robustness columns, not an ASR.

Defences (:mod:`experiments.matrix.cells`): none; spectral signatures and activation
clustering (detect, drop the flagged rows, retrain); the curvature detector (reject
test inputs above the clean 95% quantile); EPIC; the input-gradient penalty; penalty +
augmentation. Each cell: ASR beside the trigger-alone ASR (the same defence on the
clean set), clean accuracy, and the detection AUROC and TPR at 5% FPR where the
defence detects. The run is resumable: each cell is written atomically to
``cells/{regime}__{attack}__{defence}.json`` when it finishes, and a rerun of the same
config skips the cells already there (``io.Sweep``; ``--fresh`` starts over).

Run: ``ntk-poison run matrix --out results/matrix``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Tuple

import numpy as np

from ntk_poison import data, image_triggers, io, triggers, x64_scope
from ntk_poison.artefact import Artefact
from ntk_poison.config import Config as BaseConfig
from ntk_poison.report import Report, progress

from experiments.matrix import claims, figures
from experiments.matrix.cells import DEFENCES, evaluate_cell

NAME = "matrix"
ATTACKS = ("clone", "near_clone", "optimal", "patch", "blend", "warp", "deferred")
TRIGGERS = ("patch", "blend", "warp")
REGIMES = ("kernel", "net")


@dataclasses.dataclass(frozen=True)
class Config(BaseConfig):
    """Configuration of the matrix experiment (validated; saved in results.json)."""

    regimes: Tuple[str, ...] = REGIMES
    attacks: Tuple[str, ...] = ATTACKS
    defences: Tuple[str, ...] = DEFENCES
    triggers: Tuple[str, ...] = TRIGGERS
    n_train: int = 1000                # net regime's training images
    kernel_n_train: int = 200          # kernel regime's training images
    n_test: int = 1000
    target_class: int = 0
    poison_rate: float = 0.05
    # kernel regime
    kernel: str = "nt_erf"            # the erf NTK; or "rbf", "matern52" (median l)
    nt_depth: int = 2
    ridge: float = 1e-3
    kernel_kappa: float = 0.1          # output penalty, units of l^2
    n_components: int = 20             # kernel-PCA features for the detectors
    pad: int = 2                       # crop augmentation (pixels)
    # net regime
    channels: int = 8
    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 64
    net_kappa: float = 1.0             # loss penalty
    net_kappa_aug: float = 3.0         # loss penalty with augmentation
    probe_iters: int = 16              # Lanczos steps of the net's curvature
    # defences
    epic_subset: float = 0.2
    epic_rounds: int = 2               # kernel regime: EPIC rounds on the KRR fit
    # attacks
    near_clone_r: float = 0.1          # units of l
    opt_radius: float = 0.3            # l_inf box around the anchor image (pixels)
    opt_points: int = 20
    opt_steps: int = 100
    frontier_r: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)   # near clones of the
                                       # prototype on the frontier (units of l)
    deferred_eps: float = 0.1
    deferred_beta: float = 1.0
    deferred_steps: int = 20           # PGD steps on delta (net regime: per round)
    deferred_rounds: int = 3           # net regime: surrogate/delta rounds
    deferred_net_epochs: int = 2       # net regime: surrogate epochs per round
    # evaluation
    n_eval: int = 50                   # triggered and clean inputs scored by curvature
    n_cal: int = 50                    # clean inputs that set its threshold
    n_robust: int = 100                # test inputs of the robustness columns
    noise_sigmas: Tuple[float, ...] = (0.05, 0.1, 0.2)
    pgd_eps: float = 0.05
    robustness: bool = True
    suppress_margin: float = 0.10      # suppressed: ASR <= trigger-alone + margin
    seed: int = 0
    x64: bool = False

    def validate(self) -> None:
        super().validate()
        for name, allowed in (("regimes", REGIMES), ("attacks", ATTACKS),
                              ("defences", DEFENCES), ("triggers", TRIGGERS)):
            vals = getattr(self, name)
            if not vals or any(v not in allowed for v in vals) or len(set(vals)) != len(vals):
                raise ValueError(f"`{name}` must be distinct names among {list(allowed)}, "
                                 f"got {list(vals)}.")
        if "patch" not in self.triggers:
            raise ValueError("`triggers` must include 'patch' (the clone attacks' trigger).")
        if "optimal" in self.attacks and "net" in self.regimes and "kernel" not in self.regimes:
            raise ValueError("the net regime's optimal poison is the kernel regime's: add "
                             "'kernel' to `regimes` or drop 'optimal' from `attacks`.")
        self.check_min(1, "n_train", "kernel_n_train", "n_test", "n_components", "channels",
                       "epochs", "batch_size", "opt_points", "opt_steps", "deferred_steps",
                       "deferred_rounds", "deferred_net_epochs", "n_eval", "n_cal",
                       "n_robust", "probe_iters", "epic_rounds")
        self.check_min(0, "target_class", "seed", "pad", "kernel_kappa", "net_kappa",
                       "net_kappa_aug", "deferred_beta")
        self.check_positive("ridge", "lr", "near_clone_r", "opt_radius", "deferred_eps",
                            "frontier_r",
                            "pgd_eps", "noise_sigmas", "suppress_margin")
        self.check_choice("kernel", ("nt_erf", "rbf", "matern52"))
        if not 0 < self.poison_rate < 1:
            raise ValueError(f"`poison_rate` must be in (0, 1), got {self.poison_rate}.")
        if not 0 < self.epic_subset < 1:
            raise ValueError(f"`epic_subset` must be in (0, 1), got {self.epic_subset}.")
        if self.target_class > 9:
            raise ValueError(f"`target_class` must be an MNIST class 0..9, got "
                             f"{self.target_class}.")

    @classmethod
    def quick(cls, **changes) -> "Config":
        """A tiny config that runs every cell in about a minute (tests, smoke runs)."""
        base = dict(n_train=200, kernel_n_train=60, n_test=200, epochs=2, batch_size=16,
                    channels=4, n_components=8, opt_points=4, opt_steps=5,
                    deferred_steps=2, deferred_rounds=1, deferred_net_epochs=1, n_eval=8,
                    n_cal=8, n_robust=16, probe_iters=8, epic_rounds=1)
        return cls(**{**base, **changes})

    def trigger_objects(self):
        make = {"patch": lambda: triggers.badnets(),
                "blend": lambda: image_triggers.BlendTrigger(alpha=0.2, seed=self.seed),
                "warp": lambda: image_triggers.WarpTrigger(k=4, strength=0.5, seed=self.seed)}
        return [(t, make[t]()) for t in self.triggers]


#: Config fields that only choose which cells run: a rerun may change them.
SWEEP_IGNORE = ("regimes", "attacks", "defences")


def load_task(cfg: Config, n: int, dtype):
    X, y, xte, yte = data.load("mnist", flatten=False, dtype=dtype)
    X, y = data.subset(X, y, n, seed=cfg.seed)
    xte, yte = data.subset(xte, yte, cfg.n_test, seed=cfg.seed + 1)
    return np.asarray(X, dtype), np.asarray(y, np.int32), np.asarray(xte, dtype), \
        np.asarray(yte, np.int32)


def alone_asr(cell_alone, attack: str) -> float:
    trig = attack if attack in TRIGGERS else "patch"
    return cell_alone["asr"][trig]


def _regime(cfg, name):
    if name == "kernel":
        from experiments.matrix.kernel import KernelRegime
        return KernelRegime(cfg, load_task(cfg, cfg.kernel_n_train, np.float64))
    from experiments.matrix.net import NetRegime
    return NetRegime(cfg, load_task(cfg, cfg.n_train, np.float32))


def run(cfg: Config, out_dir: str | Path, fresh: bool = False) -> Report:
    """Run (or resume) the matrix; write cells, results.json, figures and report.md.
    ``fresh``: delete the finished cells and start over."""
    out = Path(out_dir)
    sweep = io.Sweep(out, cfg, fresh=fresh, ignore=SWEEP_IGNORE)
    if fresh and (out / "artefacts").exists():
        shutil.rmtree(out / "artefacts")
    rep = Report("ntk-poison matrix: every attack against every defence, kernel and net",
                 out, cfg)
    table = {}
    kernel_zeta, optimal_meta = None, None
    for rname in cfg.regimes:
        with x64_scope(rname == "kernel"):
            R = _regime(cfg, rname)
            if rname == "net" and kernel_zeta is not None:
                R.kernel_zeta = kernel_zeta
            clean = {}
            for d in progress(cfg.defences, f"{rname}: clean cells"):
                clean[d] = sweep.cell(f"{rname}__clean__{d}",
                                      lambda: evaluate_cell(R, cfg, "clean", d, None))
            table[rname] = {"clean": clean}
            for a in progress(cfg.attacks, f"{rname}: attacks"):
                art_path = out / "artefacts" / f"{rname}_{a}.npz"
                art = None

                def artefact():
                    nonlocal art
                    if art is None:
                        if art_path.exists():
                            art = Artefact.load(art_path)
                        else:
                            art = R.attack(a)
                            art.save(art_path)
                    return art

                if rname == "kernel" and a == "optimal":
                    A = artefact()
                    kernel_zeta = (np.asarray(A.x)[A.poison_idx[0]],
                                   A.n_poison / (A.n - A.n_poison))
                    optimal_meta = dict(A.meta)
                row = {}
                for d in cfg.defences:
                    def compute():
                        cell = evaluate_cell(R, cfg, a, d, artefact(), ref=clean[d])
                        return dict(cell, alone=alone_asr(clean[d], a))

                    row[d] = sweep.cell(f"{rname}__{a}__{d}", compute)
                table[rname][a] = row
    rep.started = sweep.started
    rep.results = dict(table=table, optimal=io.to_jsonable(optimal_meta),
                       artefacts=sorted(p.name for p in (out / "artefacts").glob("*.npz")))
    claims.claims(rep, cfg)
    figures.heatmap(rep, cfg)
    figures.frontier(rep, cfg)
    rep.text(claims.table_markdown(rep.results["table"], cfg))
    rep.results["seconds_total"] = sweep.seconds()      # the cells' stored times
    rep.write()
    return rep
