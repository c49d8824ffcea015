"""Predict a trained CNN's attack success rate (ASR) from its analytic NTK.

For a small ReLU CNN in the NTK parameterisation (``nets.cnn``, ``parameterization=
"ntk"``) the infinite-width theory says that full-batch gradient descent on the MSE
loss from a centred start follows the kernel gradient flow of the analytic NTK
(``CNN.kernel()``, per logit ``k(x, x') I_C``). This experiment asks whether that
flow predicts the ASR of a poisoned training run, and how the prediction degrades at
finite width.

**Task.** ``n_train`` stratified training images of ``dataset`` (MNIST), mean-pooled
by ``pool`` (28x28 -> 14x14) as ``(n, H, W, 1)`` images, 10 classes, CENTRED one-hot
targets (``scenario.centred_one_hot``: ``1 - 1/C`` at the label, ``-1/C`` elsewhere,
so each output's targets average to ~0 over a balanced set and the flow's constant
mode is barely excited). The trigger is a BadNets patch (``triggers.PatchTrigger``,
a ``patch_size`` square of 1.0 in the bottom-right corner; ``patch_size = 3`` is
``triggers.badnets()``) stamped on the pooled images. The poison
(``attacks.backdoor_attack``, all-to-one, dirty-label, ``mode="replace"``): ``m``
non-target training images chosen with the seed, triggered and relabelled
``target_class``, in place, so n is the same for every m (one compiled step a width,
one 1/n in both clocks). m = 0 is the clean run.

**The predictor** (``flow.kernel_flow`` at ridge 0, kappa 0)::

    f_kernel(x, t) = k(x, X) Q diag((1 - exp(-e t / n)) / e) Q^T Y,   K = Q diag(e) Q^T

the gradient flow of ``(1/2n) sum_i ||f(x_i) - y_i||^2`` from f = 0, evaluated at
``t = lr * steps`` on the poisoned set; predicted ASR = the fraction of triggered
non-target test images whose argmax is the target (``metrics.attack_success_rate``).

**The nets.** For each width (``channels``) and seed, ``train.train`` with
``loss="mse"``, ``optimizer="sgd"`` (plain SGD: optax.sgd without momentum; the
config's momentum field is not read), ``batch_size = n`` (one step an epoch) for
``steps`` epochs at ``lr``. train's objective is ``(1/n) sum_i 1/2 ||f(x_i) - y_i||^2``,
the flow's J above, so ``s`` steps at ``lr`` discretise the flow to ``t = s lr``
(tests/test_experiment_predict_asr.py checks the clock against ``kernel_flow``).
**Centring:** the net fits ``g(x) = f(x; w) - f(x; w0)``, which starts at 0 like
the flow. Training the raw f on targets ``y_i + f(x_i; w0)`` has exactly the same
loss, gradients and trajectory (``f(x_i; w0)`` is a constant), so that is what runs
(plain ``nets.apply_fn``: one compiled step per width); every prediction is then
``f(x; w_T) - f(x; w0)``. Nets run in float32; the kernel in float64 (``x64``).

**Measures**, per m: the predicted ASR; per width the trained ASR (mean and spread
over seeds); beside each, the trigger-alone ASR (the same model trained at m = 0, at
the same triggered inputs); clean accuracy on ``n_test`` clean test images; the
function-space error ``||f_net - f_kernel||_F / ||f_kernel||_F`` over every output at
the clean and triggered test images, against width, with its fitted log-log slope
(``metrics.loglog_slope``; the NTK literature's O(width^-1/2) is reported beside, not
asserted), beside the part of it that width cannot remove: the gap between the flow
and full-batch gradient descent at ``lr`` on the same kernel (``kernel_gd_gap``).
Where the prediction fails: the (m, width) with the largest ASR error, and whether it
sits at the ASR's transition in m.

Run: ``ntk-poison run predict_asr --out results/predict_asr``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Tuple

import numpy as np

from ntk_poison import attacks, data, flow, io, metrics, nets, scenario, train, triggers
from ntk_poison.config import Config as BaseConfig
from ntk_poison.report import Report, progress, x64_run

from experiments.predict_asr import figures
from experiments.predict_asr.claims import claims, discussion

NAME = "predict_asr"


@dataclasses.dataclass(frozen=True)
class Config(BaseConfig):
    """Configuration of the predict_asr experiment (validated; saved in results.json).

    All-to-one, 10-class and BadNets-patched, so the fields are its own (the shared
    parts of :mod:`ntk_poison.scenario` describe the clone attack). The defaults run
    in about 3 minutes on 2 shared CPU cores (170 s measured); :meth:`quick` is a
    seconds-long variant.
    """

    dataset: str = "mnist"
    n_train: int = 100                 # stratified training images (n, fixed over m)
    pool: int = 2                      # mean-pool factor of the images (28x28 -> 14x14)
    n_test: int = 200                  # clean test images (clean accuracy)
    n_trigger: int = 200               # triggered non-target test images (ASR)
    target_class: int = 0
    patch_size: int = 3                # BadNets square (3: triggers.badnets())
    poison_counts: Tuple[int, ...] = (1, 2, 4, 8)   # m > 0; m = 0 always runs
    depth: int = 2                     # CNN: depth x [Conv(3x3, SAME), ReLU], Dense(10)
    filter_size: int = 3
    W_std: float = 1.0
    b_std: float = 0.0
    widths: Tuple[int, ...] = (8, 32, 128)          # channels of the finite CNNs
    net_seeds: Tuple[int, ...] = (3, 2, 2)          # seeds per width (same length)
    lr: float = 25.0                   # full-batch SGD step; t = lr * steps
    steps: int = 20
    asr_tol: float = 0.1               # claim: |ASR_net - ASR_kernel| at the widest width
    seed: int = 0
    x64: bool = True                   # the kernel flow in float64 (nets: float32)

    def validate(self) -> None:
        super().validate()
        self.check_choice("dataset", ("mnist", "digits", "fashion_mnist"))
        self.check_min(1, "n_train", "pool", "n_test", "n_trigger", "patch_size", "depth",
                       "filter_size", "steps")
        self.check_min(0, "seed", "b_std")
        self.check_positive("W_std", "lr", "asr_tol", "widths", "net_seeds")
        if not 0 <= self.target_class <= 9:
            raise ValueError(f"`target_class` must be a class index in 0..9, got "
                             f"{self.target_class}.")
        if not self.poison_counts or not all(m >= 1 for m in self.poison_counts) or list(
                self.poison_counts) != sorted(set(self.poison_counts)):
            raise ValueError(f"`poison_counts` must be distinct counts >= 1 in increasing "
                             f"order (m = 0 always runs), got {list(self.poison_counts)}.")
        if len(self.widths) < 2 or list(self.widths) != sorted(set(self.widths)):
            raise ValueError(f"`widths` must be at least 2 distinct increasing channel "
                             f"counts, got {list(self.widths)}.")
        if len(self.net_seeds) != len(self.widths):
            raise ValueError(f"`net_seeds` must give one seed count per width ({len(self.widths)}"
                             f" values), got {list(self.net_seeds)}.")

    @property
    def time(self) -> float:
        """The flow time of the trained nets, ``t = lr * steps``."""
        return float(self.lr) * int(self.steps)

    @classmethod
    def quick(cls, **changes) -> "Config":
        """A seconds-long variant (sklearn's 8x8 digits, tiny nets) for tests."""
        small = dict(dataset="digits", n_train=40, pool=1, n_test=40, n_trigger=40,
                     patch_size=2, poison_counts=(4,), depth=1, widths=(8, 1024),
                     net_seeds=(1, 1), lr=1.0, steps=10)
        return cls(**(small | changes))


# --------------------------------------------------------------------------- data

def load_task(cfg: Config):
    """``(X, labels, X_test, y_test, X_trig, trigger)``: pooled training images
    ``(n, H, W, 1)`` and their labels, clean test images and labels, triggered
    non-target test images (float64), and the patch trigger. The test images are a
    permutation (seed + 1) of the test set: its first ``n_test``, and its first
    ``n_trigger`` non-target images, triggered."""
    xtr, ytr, xte, yte = data.load(cfg.dataset, dtype=np.float64)
    X, labels = data.subset(xtr, ytr, cfg.n_train, seed=cfg.seed)
    perm = np.random.default_rng(cfg.seed + 1).permutation(len(xte))
    neg = perm[yte[perm] != cfg.target_class][:cfg.n_trigger]

    def images(x):
        x = data.mean_pool(x, cfg.pool)
        s = int(round(np.sqrt(x.shape[1])))
        return x.reshape(len(x), s, s, 1)

    trig = triggers.PatchTrigger(size=cfg.patch_size, value=1.0, corner="bottom_right")
    X_trig = np.asarray(trig.apply(images(xte[neg])), np.float64)
    return (images(X), labels, images(xte[perm[:cfg.n_test]]), yte[perm[:cfg.n_test]],
            X_trig, trig)


# --------------------------------------------------------------------------- the runs

def kernel_prediction(k, Xp, Yp, X_eval, t: float) -> np.ndarray:
    """``f_kernel(X_eval, t)`` ``(m, C)``: ``flow.kernel_flow`` (ridge 0, kappa 0) on the
    poisoned set, its dual weights at t applied to ``k(X_eval, Xp)``."""
    import jax.numpy as jnp
    path = flow.kernel_flow(k, jnp.asarray(Xp), jnp.asarray(Yp), 0.0, 0.0, [t])
    alpha = np.asarray(path.alpha)[0]                          # (n, C)
    return np.asarray(k(jnp.asarray(X_eval), jnp.asarray(Xp))) @ alpha


def kernel_gd_gap(k, Xp, Yp, X_eval, lr: float, steps: int, f_flow) -> float:
    """How far the flow is from its own gradient descent: full-batch GD at ``lr`` on the
    linear model of kernel k, ``s`` steps from f = 0, has dual weights
    ``Q diag((1 - (1 - lr e/n)^s) / e) Q^T Y`` (the flow's with ``exp(-e t/n)`` in place
    of ``(1 - lr e/n)^s``); returns ``||f_GD - f_flow|| / ||f_flow||`` at ``X_eval``, the
    part of the net-kernel error that width does not remove (numpy ``eigh``)."""
    import jax.numpy as jnp
    n = len(Xp)
    K = np.asarray(k(jnp.asarray(Xp), jnp.asarray(Xp)))
    e, Q = np.linalg.eigh(0.5 * (K + K.T))
    e = np.maximum(e, 1e-300)
    alpha = Q @ (((1 - (1 - lr * e / n) ** steps) / e)[:, None] * (Q.T @ np.asarray(Yp)))
    return rel_error(np.asarray(k(jnp.asarray(X_eval), jnp.asarray(Xp))) @ alpha, f_flow)


def train_centred(model, Xp, Yp, X_eval, cfg: Config) -> np.ndarray:
    """The centred net ``f(X_eval; w_T) - f(X_eval; w0)`` after ``cfg.steps`` full-batch
    SGD steps at ``cfg.lr`` on ``(1/n) sum 1/2 ||f(x_i) - f(x_i; w0) - y_i||^2`` (the
    raw f trained on targets ``y + f(X; w0)``: the same trajectory)."""
    import jax
    import jax.numpy as jnp
    dt = model.dtype
    Xp = jnp.asarray(Xp, dt)
    apply = jax.jit(nets.apply_fn)
    targets = jnp.asarray(Yp, dt) + apply(model, Xp)
    tc = train.TrainConfig(optimizer="sgd", lr=float(cfg.lr), batch_size=int(Xp.shape[0]),
                           epochs=int(cfg.steps), loss="mse", seed=int(cfg.seed))
    trained, _ = train.train(model, nets.apply_fn, Xp, targets, tc, progress=False)
    Xe = jnp.asarray(X_eval, dt)
    return np.asarray(apply(trained, Xe) - apply(model, Xe), np.float64)


def rel_error(f, f_ref) -> float:
    """``||f - f_ref||_F / ||f_ref||_F`` over every point and output."""
    return float(np.linalg.norm(f - f_ref) / np.linalg.norm(f_ref))


@x64_run
def run(cfg: Config, out_dir: str | Path, fresh: bool = False) -> Report:
    """Run the experiment; write results.json, figures and report.md into out_dir. Each
    kernel flow (per m; with its predictions, which the nets' errors use) and each net
    (per width, seed and m) is a cell of an :class:`io.Sweep` (``out_dir/cells``): a
    rerun of the same config resumes; ``fresh`` starts over."""
    import jax
    import jax.numpy as jnp
    sweep = io.Sweep(out_dir, cfg, fresh=fresh)
    rep = Report(f"ntk-poison predict_asr: a CNN's ASR from its analytic NTK "
                 f"({cfg.dataset.upper()}, all-to-one, patch trigger)", out_dir, cfg)
    rep.started = sweep.started
    X, labels, X_test, y_test, X_trig, trig = load_task(cfg)
    n, shape, C = len(X), X.shape[1:], 10
    Y = scenario.centred_one_hot(labels, C)
    target = scenario.centred_one_hot([cfg.target_class], C)[0]
    X_eval = np.concatenate([X_test, X_trig])
    nt = len(X_test)
    arch = dict(input_shape=shape, depth=cfg.depth, filter_size=cfg.filter_size, pool=1,
                num_outputs=C, parameterization="ntk", W_std=cfg.W_std, b_std=cfg.b_std)
    k = nets.cnn(jax.random.key(0), channels=cfg.widths[-1], **arch).kernel()
    ms = [0] + list(cfg.poison_counts)

    def measures(f):
        return dict(asr=float(metrics.attack_success_rate(f[nt:], cfg.target_class,
                                                          multiclass=True)),
                    clean_acc=float(metrics.clean_accuracy(f[:nt], y_test, multiclass=True)))

    @functools.cache
    def art(m):                                   # the poisoned set: deterministic
        return attacks.backdoor_attack(X, Y, trig, target, n_poison=m, seed=cfg.seed,
                                       mode="replace")

    def kernel_cell(m):
        f = kernel_prediction(k, art(m).x, art(m).y, X_eval, cfg.time)
        return measures(f) | dict(
            poison_idx=np.asarray(art(m).poison_idx), f_eval=f,
            gd_gap=kernel_gd_gap(k, art(m).x, art(m).y, X_eval, cfg.lr, cfg.steps, f))

    kern, nets_out, f_k = {}, {str(w): {} for w in cfg.widths}, {}
    for m in progress(ms, "kernel flow: poison counts"):
        kern[str(m)] = sweep.cell(f"kernel_m{m}", lambda: kernel_cell(m))
        f_k[m] = np.asarray(kern[str(m)].pop("f_eval"))
    secs = dict(kernel=sweep.seconds([f"kernel_m{m}" for m in ms]))
    for w, n_seeds in zip(cfg.widths, cfg.net_seeds):
        for s in range(n_seeds):
            model = nets.cnn(jax.random.key(1000 * cfg.seed + s), channels=w,
                             dtype=jnp.float32, **arch)

            def net_cell(m):
                f = train_centred(model, art(m).x, art(m).y, X_eval, cfg)
                return measures(f) | dict(rel_error=rel_error(f, f_k[m]))

            nets_out[str(w)][str(s)] = {
                str(m): sweep.cell(f"net_w{w}_s{s}_m{m}", lambda: net_cell(m))
                for m in progress(ms, f"width {w} seed {s}: poison counts")}
        secs[f"width_{w}"] = sweep.seconds([f"net_w{w}_s{s}_m{m}" for s in range(n_seeds)
                                            for m in ms])
    for m in ms:                                  # the clean run's ASR beside every ASR
        kern[str(m)]["trigger_alone_asr"] = kern["0"]["asr"]
        for w in nets_out.values():
            for rows in w.values():
                rows[str(m)]["trigger_alone_asr"] = rows["0"]["asr"]
    summary = summarise(kern, nets_out, ms, cfg)
    rep.results = dict(kernel=repr(k), time=cfg.time, n_train=n, image_shape=list(shape),
                       poison_counts=ms, poison_fraction=[m / n for m in ms],
                       kernel_runs=kern, net_runs=nets_out, summary=summary,
                       trigger=trig.to_dict(), n_test=nt, n_triggered=len(X_trig),
                       backend=jax.default_backend(), seconds=secs | dict(
                           total=sweep.seconds()))           # the cells' stored times
    claims(rep, summary, ms, cfg)
    figures.asr_figure(rep, summary, ms, cfg)
    figures.error_figure(rep, summary, ms, cfg)
    rep.text(discussion(rep.results, cfg, sweep.seconds()))
    rep.write()
    return rep


def summarise(kern, nets_out, ms, cfg: Config) -> dict:
    """Per width and m: the seed means and spreads of ASR, trigger-alone ASR, clean
    accuracy and relative error; the ASR error against the kernel's; the error's
    log-log slope against width (over the seed-and-m mean)."""
    out = dict(kernel_asr=[kern[str(m)]["asr"] for m in ms],
               kernel_clean_acc=[kern[str(m)]["clean_acc"] for m in ms],
               kernel_trigger_alone=kern["0"]["asr"], widths={},
               gd_gap=[kern[str(m)]["gd_gap"] for m in ms])
    mean_err = []
    for w in cfg.widths:
        runs = nets_out[str(w)].values()
        per = {key: np.asarray([[r[str(m)][key] for m in ms] for r in runs])
               for key in ("asr", "trigger_alone_asr", "clean_acc", "rel_error")}
        d = {f"{key}_mean": v.mean(0) for key, v in per.items()}
        d |= {f"{key}_sd": v.std(0) for key, v in per.items()}
        d["asr_error"] = np.abs(d["asr_mean"] - np.asarray(out["kernel_asr"]))
        d["seeds"] = len(per["asr"])
        out["widths"][str(w)] = d
        mean_err.append(float(d["rel_error_mean"].mean()))
    out["mean_rel_error"] = mean_err
    out["error_slope"] = metrics.loglog_slope(cfg.widths, mean_err)
    return out
