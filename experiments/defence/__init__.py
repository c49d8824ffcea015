"""The defence (THEORY.md section 3): the input-gradient penalty, kernels and finite nets.

The defended objective is :mod:`ntk_poison.penalty`'s (output variant unless said).
Kernel results use the EXACT minimiser over the RKHS (``penalized.fit_penalized_sweep``:
the joint value-and-gradient representers, not the restricted span of k(., x_j)).
Its joint Gram matrix has n(1+d) rows, so the inputs are MNIST images reduced to
``dim`` coordinates (``data.pca_reduction``: the top ``dim - 1`` principal components
plus the orthogonalised cross-trigger pattern, so the additive trigger survives the
reduction exactly), scaled to mean ``||x||^2 = dim``; l is the median pairwise
distance there, and every kappa is quoted in units of l^2. The attack is
``attacks.clone_attack``: m dirty-label clones of the triggered prototype zeta of the
non-target training images, label +1.

What it measures (the numbers of the issue's list):

1. **Capacity.** ``penalized.effective_dof`` (trace of the hat matrix) and the training
   residual ``mean (f(x_i) - y_i)^2`` against kappa.
2. **Contraction.** Start from the undefended fit (kappa = 0), switch the penalty on
   and follow the gradient flow (``flow.contraction``, linear in orthonormal
   coordinates theta of the joint span: ``d theta/dt = -H (theta - theta*)``,
   ``H = D/n + kappa G + lam I``). The theorem tested (``contraction.eigen_contraction``,
   ``ntk_poison.modes``): along each eigenvector of H with eigenvalue h the energy is
   ``E_j(0) exp(-2 h t)``, measured on the c-space flow. The poison-aligned direction is
   the representer v of ``u . grad f(x0)`` (``flow.functional_coefficients``), u the top
   eigenvector of the loss input-Hessian at the trigger point x0; reported: the
   fraction of its energy on H's modes slower than kappa a
   (``a = v^T (Phi_g^T Phi_g / n) v^``), and its energy ``E(t) = (v^ . (theta(t) -
   theta*))^2`` beside the naive curve ``E(0) exp(-2 kappa a t)`` as a measured
   comparison only (not a theorem: v is not an eigenvector of H).
3. **High-pass filter.** The poison's response ``Delta f = f_poisoned - f_clean``
   (clean fit at the same absolute ridge and kappa) has at zeta an effective length
   ``l_eff^2(E) = -Delta f(zeta) |E| / tr(E^T hess Delta f(zeta) E)`` over a subspace
   E (the peak-curvature definition of THEORY.md; l for an RBF bump of width l). E:
   the top eigenvectors of the clean data's input-gradient covariance
   ``mean grad f(x_i) grad f(x_i)^T`` ("along the data's gradients"), its bottom ones
   ("orthogonal"), and all of R^d. The slope c of ``l_eff^2/l^2 = l0^2/l^2 + c kappa/l^2``
   is fitted over the small-kappa range. c against data density and the clean-free gap
   around zeta, and the continuum check: ``experiments/defence/filter.py`` (1-D).
4. **Which poisons the penalty reaches.** The efficacy ``Delta f(x0)`` at trigger
   points ``x0 = zeta + r e`` (random unit e), relative to kappa = 0, against kappa for
   several r/l; ``kappa_half(r)`` is where it halves (kept; r cannot show the penalty's
   leverage). Beside it (``poisons.distance_sweep``): kappa_half at zeta against zeta's
   distance D to the nearest clean point, zeta a triggered clean opposite-label image.
5. **The frontier.** ASR (triggered non-target test points classified as the
   target), clean accuracy, the clean model's own ASR at the same kappa (the trigger
   alone), the poison's mean efficacy on triggered inputs, the margin ratio
   ``Delta f / |f_clean|`` and a collapse flag (clean accuracy within 5 points of
   chance), against kappa; with the penalty alone, with jitter (Gaussian input
   noise: not the paper's augmentation), with real crop + flip (pixel space, before
   the reduction), and for near-clean-image poisons (m triggered clean
   opposite-label images).
6. **Kernel against finite width.** Erf MLPs (``nets``, NTK parameterisation,
   smooth, so the penalised kernel model exists) trained by full-batch gradient
   descent with the penalty for time T, at several widths, beside
   ``flow.kernel_flow`` of their analytic NTK (``kernels.nt_fc(activation="erf")``)
   at the same T: items 1 (residual, penalty), 2 (the contraction of
   ``u . grad f(x0)`` after the penalty is switched on at T) and 5 (ASR, clean
   accuracy), and the gap between net and kernel predictions against width.

Run: ``ntk-poison run defence --out results/defence``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ntk_poison import (data, flow, io, kernels, metrics, models, nets, penalized,
                        scenario)
from ntk_poison.artefact import Artefact
from ntk_poison.report import Report, progress, x64_run

from experiments.defence.claims import claims, reading, setup_text
from experiments.defence.contraction import eigen_contraction, rbf_contraction, top_direction
from experiments.defence.poisons import (crop_flip_sets, distance_sweep, frontier_extras,
                                         near_clean_poisons, near_clones)
from experiments.defence.figures import figures
from experiments.defence.filter import FilterPart, gap_study, gap_table

NAME = "defence"
#: the loss-penalty fits' Newton tolerance (relative RKHS gradient; tighter than the
#: library's default, 1e-8, so the frontier is the minimiser's to float64 precision)
NEWTON_TOL = 1e-10


@dataclasses.dataclass(frozen=True)
class Config(scenario.DataPart, scenario.AttackPart, scenario.RidgePart, FilterPart):
    """Configuration of the defence experiment (validated; saved in results.json)."""

    n_train: int = 120             # clean training points (stratified subset)
    n_test: int = 400              # clean test points (clean accuracy)
    dim: int = 12                  # reduced input dimension (dim-1 PCs + the trigger)
    trigger_strength: float = 0.5  # cross trigger norm in units of the PIXEL-space l
    m: int = 10                    # clones of zeta
    weak_m: int = 2                # a weaker attack's frontier (output penalty); 0 skips it
    kappas: Tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0,
                                 10.0, 30.0, 100.0)    # kappa / l^2; kappa = 0 is added
    loss_kappas: Tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)   # kappa / l^2 of the paper's
                                   # loss penalty |grad_x L|^2 (Newton fits); () skips it
    augment_copies: int = 1        # jitter copies per training point (0: no augmented run)
    augment_sigma: float = 0.3     # jitter norm, in units of l
    crop_flip_copies: int = 1      # pixel-space crop + flip copies (0: no such arm)
    crop_pad: int = 2              # crop offsets up to +-crop_pad pixels
    r_over_l: Tuple[float, ...] = (1e-3, 0.1, 0.3, 0.6, 1.0, 1.5)
    n_directions: int = 8          # random directions e of the near-clone trigger points
    distance_over_l: Tuple[float, ...] = (0.03, 0.1, 0.33, 0.67, 1.0, 1.5)  # poison to
                                   # nearest clean point (triggered clean images; () skips)
    distance_bases: int = 2        # clean non-target base images per distance
    near_clean: bool = True        # the frontier for near-clean-image poisons
    n_filter_dirs: int = 3         # |E| of the anisotropy subspaces
    fit_growth_max: float = 0.5    # the c fit uses kappa with l_eff^2/l0^2 - 1 <= this
    contraction_kappas: Tuple[float, ...] = (0.01, 0.1, 1.0)   # kappa / l^2
    n_times: int = 40              # times of the contraction curves
    # finite-width nets (erf) against their analytic NTK
    widths: Tuple[int, ...] = (128, 1024)  # () skips the finite-width part (item 6)
    net_depth: int = 1
    W_std: float = 1.5
    b_std: float = 0.1
    net_kappas: Tuple[float, ...] = (1e-3, 1e-2, 0.1, 1.0)    # kappa / l^2; 0 is added
    net_time: float = 100.0        # training time T (learning rate x steps)
    net_seeds: int = 2
    lr_factor: float = 0.5         # lr = lr_factor / (top eigenvalue of the flow's matrix)
    max_steps: int = 6000          # per run; a kappa that needs more is reported skipped
    fd_step: float = 1e-4          # finite difference (units of l) for u . grad f(x0) of nets

    def validate(self) -> None:
        super().validate()
        self.check_min(1, "n_test", "m", "n_directions",
                       "n_filter_dirs", "n_times", "net_depth", "net_seeds", "max_steps")
        if not 2 <= self.dim:
            raise ValueError(f"`dim` must be >= 2 (PCs plus the trigger), got {self.dim}.")
        if 2 * self.n_filter_dirs > self.dim:
            raise ValueError("`n_filter_dirs` must be <= dim / 2 (two disjoint subspaces).")
        self.check_positive("net_time", "lr_factor", "fd_step", "augment_sigma",
                            "fit_growth_max", "kappas", "contraction_kappas", "net_kappas",
                            "r_over_l")
        self.check_positive("widths", "loss_kappas", "distance_over_l",
                            allow_empty=True)   # () skips a part
        self.check_min(1, "distance_bases")
        self.check_min(0, "augment_copies", "weak_m", "crop_flip_copies", "crop_pad")
        if list(self.kappas) != sorted(set(self.kappas)):
            raise ValueError("`kappas` must be strictly increasing.")


# --------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True, eq=False)
class Reduced:
    """The scenario in ``dim`` coordinates (``Scenario.reduced`` by
    ``data.pca_reduction``) and its clone attack; ``aug`` holds the jitter-augmented
    poisoned and clean sets ``(Xp, yp, X, y)`` (or None)."""

    sc: scenario.Scenario
    art: Artefact
    pixel_ell: float
    aug: Optional[Tuple[np.ndarray, ...]] = None
    crop_flip: Optional[Tuple[np.ndarray, ...]] = None

    X = property(lambda self: self.sc.X)
    y = property(lambda self: self.sc.y)
    Xte = property(lambda self: self.sc.X_test)
    yte = property(lambda self: self.sc.y_test)
    Xtrig = property(lambda self: self.sc.X_trig)
    zeta = property(lambda self: self.sc.zeta)
    x0 = property(lambda self: self.sc.x0)
    ell = property(lambda self: self.sc.length_scale)
    trigger_direction = property(lambda self: self.sc.trigger_direction)
    Xp = property(lambda self: self.art.x)
    yp = property(lambda self: self.art.y)


def prepare(cfg: Config) -> Reduced:
    """The reduced clean/test/triggered sets, the clone artefact, the jitter copies and
    the crop + flip copies (``poisons.crop_flip_sets``)."""
    sc = scenario.build(cfg)
    reduce = data.pca_reduction(sc.X, sc.trigger_direction, cfg.dim)
    red = sc.reduced(reduce)
    art = red.clone_attack(cfg.m, cfg.y_target, cfg.seed)
    aug = None
    if cfg.augment_copies:
        rng = np.random.default_rng(cfg.seed + 7)
        sd = cfg.augment_sigma * red.length_scale / math.sqrt(cfg.dim)   # E|jitter|^2 = (sigma l)^2
        c = cfg.augment_copies
        aug = (data.jitter(art.x, c, sd, rng), np.tile(art.y, c + 1),
               data.jitter(red.X, c, sd, rng), np.tile(red.y, c + 1))
    cf = None if not cfg.crop_flip_copies else crop_flip_sets(
        sc, reduce, cfg.m, cfg.y_target, cfg.crop_flip_copies, cfg.crop_pad, cfg.seed + 13)
    return Reduced(red, art, sc.length_scale, aug, cf)


# --------------------------------------------------------------------------- kernel parts

def _sweeps(k, Xp, yp, Xc, yc, lam, kappas):
    """Poisoned and clean exact sweeps at the same ABSOLUTE ridge n lam and kappa."""
    sp = penalized.fit_penalized_sweep(k, Xp, yp, lam, kappas)
    sc = penalized.fit_penalized_sweep(k, Xc, yc, lam * len(Xp) / len(Xc), kappas)
    return sp, sc


def frontier(sp, sc, prep, cfg) -> dict:
    """ASR, clean accuracy and the poison's efficacy for each member of the sweeps."""
    fp_t, fc_t = np.asarray(sp.predict(prep.Xtrig)), np.asarray(sc.predict(prep.Xtrig))
    yte, tgt = prep.yte[None], cfg.y_target
    out = dict(
        asr=metrics.attack_success_rate(fp_t, tgt),
        asr_clean_model=metrics.trigger_alone_asr(fc_t, tgt),
        flip=metrics.flip_rate(fp_t, fc_t, tgt),
        clean_acc=metrics.clean_accuracy(sp.predict(prep.Xte), yte),
        clean_acc_clean_model=metrics.clean_accuracy(sc.predict(prep.Xte), yte),
        efficacy=(fp_t - fc_t).mean(1))
    return dict(out, **frontier_extras(fp_t, fc_t, out["clean_acc"], prep.yte))


def loss_penalty_frontier(k, prep, cfg) -> dict:
    """Item 5 with the paper's penalty |grad_x L|^2 (exact minimiser by Newton)."""
    ell2, lam = prep.ell ** 2, cfg.ridge
    kappas = np.r_[0.0, cfg.loss_kappas] * ell2
    lam_c = lam * len(prep.Xp) / len(prep.X)
    fit = lambda X, y, ridge, kappa: penalized.fit_penalized(  # noqa: E731
        k, X, y, ridge, float(kappa), penalty="loss", tol=NEWTON_TOL)
    sp = models.stack([fit(prep.Xp, prep.yp, lam, kp)
                       for kp in progress(kappas, "loss penalty: poisoned")])
    sc = models.stack([fit(prep.X, prep.y, lam_c, kp)
                       for kp in progress(kappas, "loss penalty: clean")])
    out = frontier(sp, sc, prep, cfg)
    out["kappa_over_l2"] = kappas / ell2
    out["newton_iterations"] = [m.info_dict.get("iterations", 0) for m in sp.models]
    return out


def capacity(k, sp, Xp, yp, lam, kappas) -> dict:
    f = np.asarray(sp.predict(Xp))
    g = np.asarray(sp.input_grad(Xp)).reshape(len(kappas), len(Xp), -1)
    return dict(dof=np.asarray(penalized.effective_dof(k, Xp, lam, kappas)),
                residual=((f - yp[None]) ** 2).mean(1),
                penalty=0.5 * (g ** 2).sum(-1).mean(1))


def high_pass(sp, sc, prep, cfg, kappas) -> dict:
    """l_eff^2 of Delta f at zeta over three subspaces, and the linear fit of its growth."""
    import jax.numpy as jnp
    zeta = prep.zeta
    z = jnp.asarray(zeta[None])
    n_k = len(kappas)
    df = np.asarray(sp.predict(z))[:, 0] - np.asarray(sc.predict(z))[:, 0]
    hess = np.stack([np.asarray(sp.at(i).input_hessian(z))[0]
                     - np.asarray(sc.at(i).input_hessian(z))[0] for i in range(n_k)])
    g0 = np.asarray(sc.at(0).input_grad(prep.X)).reshape(len(prep.X), -1)
    w, V = np.linalg.eigh(g0.T @ g0 / len(g0))          # the data's gradient covariance
    q = cfg.n_filter_dirs
    spaces = dict(along=V[:, ::-1][:, :q], orthogonal=V[:, :q], isotropic=np.eye(len(zeta)))
    ell2 = prep.ell ** 2
    out = dict(delta_f_zeta=df, gradient_cov_eigs=w[::-1], kappa_over_l2=kappas / ell2)
    for name, E in spaces.items():
        curv = np.einsum("ia,kab,ib->k", E.T, hess, E.T)         # tr(E^T H E)
        le2 = np.where(curv < 0, -df * E.shape[1] / np.where(curv < 0, curv, 1.0), np.nan)
        out[f"leff2_{name}"] = le2 / ell2
        out[f"fit_{name}"] = metrics.fit_linear_growth(kappas / ell2, le2 / ell2,
                                                     cfg.fit_growth_max)
    # the response along the top "along" and "orthogonal" directions (figure)
    hs = np.linspace(-2.0, 2.0, 41) * prep.ell
    prof = {}
    for name in ("along", "orthogonal"):
        e = spaces[name][:, 0]
        pts = jnp.asarray(zeta[None] + hs[:, None] * e[None])
        prof[name] = np.asarray(sp.predict(pts)) - np.asarray(sc.predict(pts))
    out["profile_h_over_l"] = hs / prep.ell
    out["profiles"] = prof
    return out


# --------------------------------------------------------------------------- finite nets

def _net_eval_points(prep, u, h):
    x0 = prep.x0
    return np.vstack([prep.Xte, prep.Xtrig, (x0 + h * u)[None], (x0 - h * u)[None]])


def _scores(f_eval, prep, cfg) -> dict:
    """ASR, clean accuracy from predictions at _net_eval_points, and the FD directional
    derivative u . grad f(x0)."""
    nte, ntr = len(prep.Xte), len(prep.Xtrig)
    f_eval = np.asarray(f_eval)
    h = cfg.fd_step * prep.ell
    return dict(clean_acc=float(metrics.clean_accuracy(f_eval[:nte], prep.yte)),
                asr=float(metrics.attack_success_rate(f_eval[nte:nte + ntr], cfg.y_target)),
                g_x0=float((f_eval[-2] - f_eval[-1]) / (2 * h)))


def nets_vs_kernel(prep, cfg) -> dict:
    """Item 6: erf nets of several widths against kernel_flow of their analytic NTK."""
    import jax
    import jax.numpy as jnp
    k = kernels.nt_fc(depth=cfg.net_depth, W_std=cfg.W_std, b_std=cfg.b_std,
                      activation="erf")
    Xp, yp, ell2, lam = prep.Xp, prep.yp, prep.ell ** 2, cfg.ridge
    n, T = len(Xp), cfg.net_time
    kappas = np.r_[0.0, cfg.net_kappas] * ell2
    Kf, U, s = flow.joint_coordinates(k, Xp)
    # the kernel at time T for every kappa (library closed form), and the flow's top rate
    kern = dict(residual=[], penalty=[], clean_acc=[], asr=[], g_x0=[], lr=[], rate=[])
    paths = []
    for kappa in progress(kappas, "erf NTK: kernel_flow"):
        p = flow.kernel_flow(k, Xp, yp, lam, float(kappa), [T])
        paths.append(p.at(0))
        rate = flow.flow_rate(Kf, n, kappa, lam)
        kern["rate"].append(rate)
        kern["lr"].append(cfg.lr_factor / rate)
    m0 = paths[0]
    _, u = top_direction(m0, prep.x0, cfg.y_target)
    h = cfg.fd_step * prep.ell
    Xe = _net_eval_points(prep, u, h)
    for mod in paths:
        f = np.asarray(mod.predict(Xp))
        g = np.asarray(mod.input_grad(Xp)).reshape(n, -1)
        kern["residual"].append(float(((f - yp) ** 2).mean()))
        kern["penalty"].append(float(0.5 * (g ** 2).sum(1).mean()))
        sc = _scores(mod.predict(jnp.asarray(Xe)), prep, cfg)
        for key in ("clean_acc", "asr", "g_x0"):
            kern[key].append(sc[key])
    kern["g_x0_exact"] = [float(u @ np.asarray(mod.input_grad(prep.x0[None]))[0])
                          for mod in paths]
    kern["dof"] = np.asarray(penalized.effective_dof(k, Xp, lam, kappas))
    # contraction after switching the penalty on at T (kernel: exact linear flow)
    kc = float(cfg.net_kappas[-1] if len(cfg.net_kappas) < 2 else cfg.net_kappas[-2]) * ell2
    b, c0 = flow.functional_coefficients(m0, prep.x0, u)
    t_end = 3.0 / max(kc * flow.penalty_curvature(U, s, n, b), 1e-12)
    times = np.linspace(0.0, t_end, cfg.n_times)
    con = flow.contraction(U, s, n, yp, lam, kc, b, c0, times)
    con["eigen"] = eigen_contraction(Kf, U, s, n, yp, lam, kc, b, c0, times)
    con_lr = cfg.lr_factor / flow.flow_rate(Kf, n, kc, lam)
    # the nets
    runs = {}
    for w in progress(cfg.widths, "erf nets: widths"):
        rows = []
        for seed in range(cfg.net_seeds):
            p0 = nets.init(jax.random.key(cfg.seed * 1000 + seed), cfg.dim, w, cfg.net_depth,
                           cfg.W_std, cfg.b_std, activation="erf")
            row = dict(seed=seed, kappa=[], residual=[], penalty=[], clean_acc=[], asr=[],
                       g_x0=[], gap=[], steps=[], skipped=[])
            params_T0 = None
            for i, kappa in enumerate(kappas):
                lr = kern["lr"][i]
                steps = int(math.ceil(T / lr))
                if steps > cfg.max_steps:
                    row["skipped"].append(float(kappa / ell2))
                    continue
                lr = T / steps                                  # end exactly at T
                pT, hist = nets.train(p0, nets.apply_fn, Xp, yp, lr, steps, kappa=float(kappa),
                                      ridge=lam, X_eval=Xe)
                if kappa == 0:
                    params_T0 = pT
                f_eval = hist.predictions[-1]
                sc = _scores(f_eval, prep, cfg)
                f_k = np.asarray(paths[i].predict(jnp.asarray(Xe[:-2])))
                row["kappa"].append(float(kappa / ell2))
                row["residual"].append(float(2 * hist.loss[-1]))
                row["penalty"].append(float(hist.penalty[-1]))
                for key in ("clean_acc", "asr", "g_x0"):
                    row[key].append(sc[key])
                row["gap"].append(float(np.sqrt(np.mean((f_eval[:-2] - f_k) ** 2))
                                        / np.sqrt(np.mean(f_k ** 2))))
                row["steps"].append(steps)
            # contraction: continue the kappa = 0 net with the penalty on
            if params_T0 is not None:
                steps = int(math.ceil(t_end / con_lr))
                every = max(1, steps // (cfg.n_times - 1))
                steps = every * (cfg.n_times - 1)
                if steps <= cfg.max_steps * 4:
                    _, hist = nets.train(params_T0, nets.apply_fn, Xp, yp, t_end / steps, steps,
                                         kappa=kc, ridge=lam, X_eval=Xe[-2:], params0=p0,
                                         record_every=every)
                    gp = (hist.predictions[:, 0] - hist.predictions[:, 1]) / (2 * h)
                    row["contraction"] = dict(times=hist.times, g=gp)
            rows.append(row)
        runs[int(w)] = rows
    return dict(kernel=kern, kappas_over_l2=kappas / ell2, runs=runs, contraction=con,
                contraction_kappa_over_l2=kc / ell2, u=u, time=T,
                kernel_name=repr(k))


# --------------------------------------------------------------------------- entry point

STEPS = ("sweeps", "capacity", "filter", "contraction", "loss penalty", "weak attack",
         "augmented", "crop flip", "distance", "near clean", "nets")


@x64_run
def run(cfg: Config, out_dir: str | Path, fresh: bool = False) -> Report:
    """Run the defence experiment (x64 = ``cfg.x64``, restored after); write results.json,
    figures and report.md. Each step is an :class:`io.Sweep` cell: a rerun resumes (the
    shared penalized sweeps refitted only if a step left needs them); ``fresh`` restarts."""
    sweep = io.Sweep(out_dir, cfg, fresh=fresh)
    prep = prepare(cfg)
    rep = Report(f"ntk-poison defence: the input-gradient penalty ({cfg.dataset.upper()})",
                 out_dir, cfg)
    rep.started = sweep.started
    ell, lam, secs = prep.ell, cfg.ridge, {}
    kappas = np.r_[0.0, cfg.kappas] * ell ** 2
    k = kernels.rbf(ell)
    res = dict(length_scale=ell, pixel_length_scale=prep.pixel_ell, dim=cfg.dim,
               n_poisoned=len(prep.Xp), kappa_over_l2=kappas / ell ** 2,
               r_x0_zeta_over_l=float(np.linalg.norm(prep.x0 - prep.zeta) / ell),
               train_mean_label=[float(np.mean(prep.yp)), float(np.mean(prep.y))],
               r_zeta_data_over_l=float(np.sqrt(((prep.X - prep.zeta) ** 2).sum(1)).min()
                                        / ell))
    # the poisoned and clean penalized sweeps, fitted once, on first use
    base = functools.cache(lambda: _sweeps(k, prep.Xp, prep.yp, prep.X, prep.y, lam, kappas))

    def step_cell(step):
        if step == "sweeps":
            sp, sc = base()
            return dict(frontier=frontier(sp, sc, prep, cfg),
                        near_clones=near_clones(sp, sc, prep, cfg, kappas))
        if step == "capacity":
            return dict(capacity=capacity(k, base()[0], prep.Xp, prep.yp, lam, kappas))
        if step == "filter":
            sp, sc = base()
            return dict(high_pass=high_pass(sp, sc, prep, cfg, kappas),
                        filter_1d=gap_study(cfg))             # c against density and gap
        if step == "contraction":
            return dict(contraction=rbf_contraction(k, base()[0].at(0), prep, cfg))
        if step == "loss penalty":
            return dict(frontier_loss=loss_penalty_frontier(k, prep, cfg))
        if step == "weak attack":
            n = len(prep.X) + cfg.weak_m
            spw, scw = _sweeps(k, prep.Xp[:n], prep.yp[:n], prep.X, prep.y, lam, kappas)
            return dict(frontier_weak=frontier(spw, scw, prep, cfg))
        if step in ("augmented", "crop flip"):
            aug = step == "augmented"
            spa, sca = _sweeps(k, *(prep.aug if aug else prep.crop_flip), lam, kappas)
            arm = ("jitter (Gaussian input noise; not crop + flip)" if aug
                   else "crop + flip in pixel space, before the PCA")
            return {"frontier_" + step.replace(" ", "_"): dict(frontier(spa, sca, prep, cfg),
                                                                arm=arm)}
        if step == "distance":
            return dict(distance_sweep=distance_sweep(k, base()[1], prep, cfg, kappas))
        if step == "near clean":
            Xn, yn, info = near_clean_poisons(prep, cfg)     # same n: the clean sweep is sc
            return dict(frontier_near_clean=dict(frontier(
                penalized.fit_penalized_sweep(k, Xn, yn, lam, kappas), base()[1], prep, cfg),
                **info))
        return dict(nets=nets_vs_kernel(prep, cfg))

    on = {"loss penalty": cfg.loss_kappas, "weak attack": cfg.weak_m, "augmented":
          cfg.augment_copies, "crop flip": cfg.crop_flip_copies, "distance":
          cfg.distance_over_l, "near clean": cfg.near_clean, "nets": cfg.widths}
    for step in progress([s for s in STEPS if on.get(s, True)], "defence"):
        key = step.replace(" ", "_")
        res.update(sweep.cell(key, lambda: step_cell(step)))
        secs[step] = sweep.seconds([key])
    res["seconds"] = dict(secs, total=sweep.seconds())      # the cells' stored times
    claims(rep, res, cfg)
    figures(rep, res, cfg)
    rep.results = res
    rep.text(setup_text(res, cfg))
    rep.text(reading(res))
    rep.text(gap_table(res))
    rep.write()
    return rep
