"""The paper's deep-net experiments (THEORY.md section 4), in kind: dirty-label,
all-to-one backdoors against convolutional nets trained for real on real images, with
augmentation and the input-gradient penalty as defences.

Data: a stratified subset of ``n_train`` training images (MNIST by default;
Fashion-MNIST, or CIFAR-10/100 from ``data_path``) and ``n_test`` test images, 10 (or
100) classes. Poisoning (``attacks.backdoor_attack``, ``mode="replace"``): a fraction
``poison_rate`` of the training images, drawn from the non-target classes with the seed,
triggered and relabelled ``target_class``. Triggers: BadNets' 3x3 patch, a blend
(alpha 0.2), WaNet's warp (k = 4, s = 0.5) and the rank-one additive cross (norm
``cross_strength``).

Arms (defences): ``none``; ``aug`` (random crop with padding, plus a flip where the
data allows it); ``pen@K`` (the loss penalty ``K * |grad_x L|^2``,
:mod:`ntk_poison.train`); ``aug+pen@K``. Every arm is trained on every trigger's
poisoned set at two lengths (``epochs``: short, long; a cosine schedule over each run's
own length) and once on the clean set at the long length: the clean model gives the
trigger-alone ASR and the arm's clean accuracy without an attack.

Per epoch, on the test set: clean accuracy, ASR (triggered non-target test images
classified as the target), robust accuracy (triggered images classified as their true
label). For the ``probe_arms``, on a fixed set of ``n_probe`` non-target test images and
their triggered versions (:func:`ntk_poison.monitor.curvature_hook`): the top
eigenpairs of the input Hessian of the loss at the model's own predicted label, by
Lanczos on Hessian-vector products through the network; cos^2 of the top eigenvector
with the trigger's displacement ``x_trig - x``; the ratio of top eigenvalues triggered /
clean; the AUROC of the top eigenvalue as a detector of triggered inputs. At the end of
the long ``none`` run: a PCA of penultimate-layer features of clean, poison and
triggered test inputs (:func:`ntk_poison.monitor.feature_collapse`).

Run: ``ntk-poison run backdoor_nets --out results/backdoor_nets``. The default config is
sized for a 2-core CPU (see ``README``); ``configs/paper_cifar10.json`` and
``configs/paper_cifar100.json`` are the paper's settings for a GPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Tuple

import numpy as np

from ntk_poison import (attacks, data, image_triggers, io, metrics, monitor, nets, train,
                        triggers)
from ntk_poison.config import Config as BaseConfig
from ntk_poison.report import Report, progress, x64_run

from experiments.backdoor_nets import claims, figures
from experiments.backdoor_nets.arms import parse_arm

NAME = "backdoor_nets"
TRIGGERS = ("patch", "blend", "warp", "cross")
MODELS = ("cnn", "preact_resnet")
CLASSES = {"mnist": 10, "fashion_mnist": 10, "digits": 10, "cifar10": 10, "cifar100": 100}


@dataclasses.dataclass(frozen=True)
class Config(BaseConfig):
    """Configuration of the backdoor_nets experiment (validated; saved in results.json)."""

    dataset: str = "mnist"
    data_path: str = ""                # CIFAR (required): the extracted python-version
                                       # folder; Fashion-MNIST: an IDX folder (optional)
    n_train: int = 1000                # 0: the whole training set
    n_test: int = 1000                 # 0: the whole test set
    model: str = "cnn"
    channels: int = 8                  # cnn: conv channels (width)
    depth: int = 2                     # cnn: conv layers; preact_resnet: 18, 34 or 6n+2
    width: float = 1.0                 # preact_resnet: width multiplier
    parameterization: str = "standard"
    triggers: Tuple[str, ...] = ("patch", "blend", "warp")
    cross_strength: float = 3.0        # the cross trigger's L2 norm (pixel units)
    poison_rate: float = 0.05
    target_class: int = 0
    arms: Tuple[str, ...] = ("none", "aug", "pen@1", "aug+pen@0.3", "aug+pen@1", "aug+pen@3",
                             "aug+pen@10")
    epochs: Tuple[int, int] = (10, 20)  # the two training lengths (short, long)
    optimizer: str = "momentum"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    pad: int = 2                       # crop padding (pixels): 2 at 28x28, 4 at 32x32
    flip: bool = False                 # horizontal flips (not for digits)
    probe_arms: Tuple[str, ...] = ("none", "aug")
    evals_per_epoch: int = 4           # measures an epoch in the probed runs (else 1)
    n_probe: int = 32                  # probe images (and their triggered versions)
    probe_k: int = 3                   # eigenpairs per input
    probe_iters: int = 16              # Lanczos iterations per input
    suppress_margin: float = 0.10      # suppressed: ASR <= trigger-alone ASR + margin
    attack_margin: float = 0.5         # the attack works: undefended ASR >= alone + margin
    align_factor: float = 5.0          # aligned: cos^2 >= factor x max(comparators)
    seed: int = 0
    x64: bool = False

    def validate(self) -> None:
        super().validate()
        self.check_choice("dataset", tuple(CLASSES))
        self.check_choice("model", MODELS)
        self.check_choice("parameterization", ("standard", "ntk"))
        self.check_choice("optimizer", train.OPTIMIZERS)
        self.check_min(0, "n_train", "n_test", "target_class", "seed", "pad",
                       "weight_decay", "momentum")
        self.check_positive("width")
        self.check_min(1, "channels", "depth", "batch_size", "n_probe", "probe_k",
                       "probe_iters", "align_factor", "evals_per_epoch")
        self.check_positive("lr", "cross_strength", "suppress_margin", "attack_margin")
        if not 0 < self.poison_rate < 1:
            raise ValueError(f"`poison_rate` must be in (0, 1), got {self.poison_rate}.")
        if self.dataset == "digits" and self.data_path:
            raise ValueError("`data_path` is not used for digits (they ship with "
                             "scikit-learn); leave it empty.")
        if self.dataset.startswith("cifar") and not self.data_path:
            raise ValueError(f"`data_path` is required for {self.dataset}: the extracted "
                             "python-version folder (e.g. cifar-10-batches-py).")
        if not self.triggers or any(t not in TRIGGERS for t in self.triggers):
            raise ValueError(f"`triggers` must name triggers among {list(TRIGGERS)}, got "
                             f"{list(self.triggers)}.")
        if len(self.epochs) != 2 or not 1 <= self.epochs[0] < self.epochs[1]:
            raise ValueError(f"`epochs` must be two lengths (short, long) with "
                             f"1 <= short < long, got {list(self.epochs)}.")
        if "none" not in self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"`arms` must be distinct and include 'none', got "
                             f"{list(self.arms)}.")
        for a in self.arms:
            parse_arm(a)
        if any(a not in self.arms for a in self.probe_arms):
            raise ValueError(f"`probe_arms` must be among `arms`, got {list(self.probe_arms)}.")
        if self.probe_k > self.probe_iters:
            raise ValueError("`probe_k` must be <= `probe_iters` (Lanczos finds at most "
                             "probe_iters eigenpairs).")


# --------------------------------------------------------------------------- set-up

def load_task(cfg: Config):
    """Train/test images (n, H, W, C) and integer labels, and the number of classes."""
    dtype = np.float64 if cfg.x64 else np.float32
    kw = dict(flatten=False, dtype=dtype)
    if cfg.data_path:
        kw["path"] = cfg.data_path
    X, y, xte, yte = data.load(cfg.dataset, **kw)
    c = CLASSES[cfg.dataset]
    if cfg.target_class >= c:
        raise ValueError(f"`target_class` = {cfg.target_class} is not a class of "
                         f"{cfg.dataset} (0..{c - 1}).")
    for name, n, have in (("n_train", cfg.n_train, len(X)), ("n_test", cfg.n_test, len(xte))):
        if n > have:
            raise ValueError(f"`{name}` = {n} exceeds the {have} images; use 0 for all.")
    if cfg.n_train:
        X, y = data.subset(X, y, cfg.n_train, seed=cfg.seed)
    if cfg.n_test:
        xte, yte = data.subset(xte, yte, cfg.n_test, seed=cfg.seed + 1)
    return (np.asarray(X, dtype), np.asarray(y, np.int32), np.asarray(xte, dtype),
            np.asarray(yte, np.int32), c)


def make_trigger(name: str, cfg: Config):
    return {"patch": lambda: triggers.badnets(),
            "blend": lambda: image_triggers.BlendTrigger(alpha=0.2, seed=cfg.seed),
            "warp": lambda: image_triggers.WarpTrigger(k=4, strength=0.5, seed=cfg.seed),
            "cross": lambda: triggers.CrossTrigger(strength=cfg.cross_strength)}[name]()


def make_model(cfg: Config, shape, classes: int):
    import jax
    key = jax.random.PRNGKey(cfg.seed)
    if cfg.model == "cnn":
        return nets.cnn(key, input_shape=tuple(shape), channels=cfg.channels,
                        depth=cfg.depth, pool=2, num_outputs=classes,
                        parameterization=cfg.parameterization)
    return nets.resnet(key, depth=cfg.depth, width=cfg.width, num_outputs=classes,
                       in_channels=int(shape[-1]), parameterization=cfg.parameterization)


def train_config(cfg: Config, arm: str, epochs: int) -> train.TrainConfig:
    aug, kappa = parse_arm(arm)
    return train.TrainConfig(
        optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, schedule="cosine", batch_size=cfg.batch_size,
        epochs=epochs, loss="xent", augment=("crop_flip" if cfg.flip else "crop") if aug
        else "none", pad=cfg.pad, penalty="loss" if kappa else "none", kappa=kappa,
        seed=cfg.seed)


def measure_hook(predict, xte, yte, trig_sets, target):
    """hook(params, epoch) -> clean accuracy, and ASR and RA per trigger."""
    def hook(params, epoch):
        out = dict(clean_acc=float(metrics.clean_accuracy(predict(params, xte), yte,
                                                          multiclass=True)))
        for name, (xt, yt) in trig_sets.items():
            f = predict(params, xt)
            out[f"asr_{name}"] = float(metrics.attack_success_rate(f, target, multiclass=True))
            out[f"ra_{name}"] = float(metrics.robust_accuracy(f, yt, multiclass=True))
        return out
    return hook


def batched(apply, batch: int = 500):
    import jax
    f = jax.jit(apply)

    def predict(params, x):
        return np.concatenate([np.asarray(f(params, x[i:i + batch]))
                               for i in range(0, len(x), batch)])
    return predict


# --------------------------------------------------------------------------- entry point

@x64_run
def run(cfg: Config, out_dir: str | Path, fresh: bool = False) -> Report:
    """Run the experiment; write results.json, figures and report.md into out_dir. Each
    training run is a cell of an :class:`io.Sweep` (``out_dir/cells``; the long
    undefended runs keep their final weights and feature collapse in it): a rerun of the
    same config resumes; ``fresh`` starts over."""
    import jax
    from flax import nnx
    sweep = io.Sweep(out_dir, cfg, fresh=fresh)
    rep = Report(f"ntk-poison backdoor_nets: backdoors in {cfg.model.upper()}s on "
                 f"{cfg.dataset} (all-to-one, target {cfg.target_class})", Path(out_dir), cfg)
    rep.started = sweep.started
    X, y, xte, yte, c = load_task(cfg)
    shape = X.shape[1:]
    eye = np.eye(c, dtype=X.dtype)
    nt = yte != cfg.target_class
    x_src, y_src = xte[nt], yte[nt]
    trigs = {t: make_trigger(t, cfg) for t in cfg.triggers}
    trig_sets = {t: (np.asarray(tr.apply(x_src), X.dtype), y_src) for t, tr in trigs.items()}
    pidx = np.random.default_rng(cfg.seed + 2).permutation(len(x_src))[:cfg.n_probe]
    model0 = make_model(cfg, shape, c)
    apply = nets.apply_fn
    predict = batched(apply)
    thook = measure_hook(predict, xte, yte, trig_sets, cfg.target_class)
    long_ = cfg.epochs[1]
    runs, clean, collapse, secs, poison_idx, weights = {}, {}, {}, {}, {}, {}
    feats = jax.jit(lambda p, x: p.features(x))
    xp = x_src[pidx]

    def probes(names, prefixed):
        return [monitor.curvature_hook(apply, xp, None, trig_sets[t][0][pidx],
                                       None, trig_sets[t][0][pidx] - xp, k=cfg.probe_k,
                                       iters=cfg.probe_iters,
                                       prefix=f"{t}_" if prefixed else "")
                for t in names]

    def fit(arm, Xa, ya, epochs, hooks, tag, initial, final=None):
        """Train one run (a sweep cell); its history starts with the initial model's
        measures (epoch 0: the same initial model for every run, measured once). Runs
        with probes are measured ``evals_per_epoch`` times an epoch. ``final(params)``:
        more of the cell, from the trained model."""
        def compute():
            params, hist = train.train(model0, apply, Xa, ya, train_config(cfg, arm, epochs),
                                       hooks=[thook] + hooks, progress=True, desc=tag,
                                       evals_per_epoch=cfg.evals_per_epoch if hooks else 1)
            hist = {k: [initial.get(k)] + v for k, v in hist.items()}
            return dict(hist=hist, **(final(params) if final else {}))
        key = tag.replace(" ", "_")
        cell = sweep.cell(key, compute)
        secs[tag] = sweep.seconds([key])
        return cell

    all_probes = probes(cfg.triggers, True)
    init_all = dict(epoch=0, loss=None, accuracy=None, **thook(model0, 0))
    for h in all_probes:
        init_all.update(h(model0, 0))

    def initial_for(t):          # a poisoned run's probe keys carry no trigger prefix
        return {**init_all, **{k[len(t) + 1:]: v for k, v in init_all.items()
                               if k.startswith(f"{t}_")}}

    for arm in progress(cfg.arms, "clean runs"):
        clean[arm] = fit(arm, X, y, long_, all_probes if arm == "none" else [],
                         f"clean {arm}", init_all)["hist"]
    for t in cfg.triggers:
        art = attacks.backdoor_attack(X, eye[y], trigs[t], eye[cfg.target_class],
                                      rate=cfg.poison_rate, seed=cfg.seed, mode="replace")
        art.save(rep.out_dir / f"artefact_{t}.npz")      # what every defence consumes
        Xp, yp = np.asarray(art.x, X.dtype), np.asarray(art.y).argmax(1).astype(np.int32)
        runs[t] = {}
        for epochs in cfg.epochs:
            runs[t][str(epochs)] = {}
            for arm in cfg.arms:
                hooks = probes([t], False) if arm in cfg.probe_arms else []
                last = arm == "none" and epochs == long_

                def final(params, t=t, Xp=Xp, art=art):
                    leaves = jax.tree_util.tree_leaves(nnx.state(params))
                    return dict(weights=[np.asarray(v) for v in leaves],
                                collapse=monitor.feature_collapse(
                                    np.asarray(feats(params, xte)), yte,
                                    np.asarray(feats(params, Xp[art.poison_idx])),
                                    np.asarray(feats(params, trig_sets[t][0])),
                                    cfg.target_class))
                cell = fit(arm, Xp, yp, epochs, hooks, f"{t} {arm} {epochs}ep",
                           initial_for(t), final if last else None)
                runs[t][str(epochs)][arm] = cell["hist"]
                if last:
                    for i, v in enumerate(cell["weights"]):
                        weights[f"{t}_none_{i}"] = v
                    collapse[t] = cell["collapse"]
        poison_idx[t] = np.asarray(art.poison_idx)

    io.write_npz(rep.out_dir / "weights.npz", weights)
    rep.results = dict(
        weights="weights.npz: the final model of each trigger's long undefended run, "
                "keys '{trigger}_none_{i}', the leaves of nnx.state(model) in order",
        artefacts={t: f"artefact_{t}.npz" for t in cfg.triggers},
        runs=runs, clean=clean, collapse=collapse, seconds=secs, classes=c,
        poison_idx=poison_idx,
        n_train=len(X), n_test=len(xte), n_triggered=int(nt.sum()), image_shape=shape,
        n_poison=int(len(poison_idx[cfg.triggers[0]])),
        triggers={t: tr.to_dict() for t, tr in trigs.items()},
        random_overlap=1.0 / int(np.prod(shape)), backend=jax.default_backend(),
        dtype=str(np.dtype(X.dtype)))
    claims.claims(rep, cfg)
    figures.curves_figure(rep, cfg)
    figures.frontier_figure(rep, cfg)
    figures.overlap_figure(rep, cfg)
    figures.feature_figure(rep, cfg)
    rep.results["seconds_total"] = sweep.seconds()     # the cells' stored times
    rep.text(claims.discussion(rep.results, cfg))
    rep.write()
    return rep
