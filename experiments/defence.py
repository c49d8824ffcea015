"""The defence (THEORY.md section 3): the input-gradient penalty, kernels and finite nets.

The defended objective (output variant, ``penalty="output"`` of :mod:`ntk_poison.flow`)::

    J(f) = (1/2n) sum_i (f(x_i) - y_i)^2 + (lam/2) ||f||_H^2 + (kappa/2n) sum_i ||grad_x f(x_i)||^2

Kernel results use the EXACT minimiser over the RKHS (``flow.fit_penalized_sweep``:
the joint value-and-gradient representers, not the restricted span of k(., x_j)).
Its joint Gram matrix has n(1+d) rows, so the inputs are MNIST images reduced to
``dim`` coordinates: the top ``dim - 1`` principal components of the clean training
images plus the (orthogonalised) cross-trigger pattern, so the additive trigger
survives the reduction exactly. Coordinates are scaled to mean ``||x||^2 = dim``
(the NTK's natural input scale); l is the median pairwise distance there, and every
kappa is quoted in units of l^2 (kappa / l^2 is dimensionless). The attack is the
demo's: m dirty-label clones of the triggered prototype zeta of the non-target
training images, label +1.

What it measures (the numbers of the issue's list):

1. **Capacity.** ``flow.effective_dof`` (trace of the hat matrix) and the training
   residual ``mean (f(x_i) - y_i)^2`` against kappa.
2. **Contraction.** Start from the undefended fit (kappa = 0), switch the penalty on
   and follow the gradient flow. In orthonormal coordinates theta of the joint span
   (``Kfull = U s U^T``, features ``Phi = U s^(1/2)`` split into value rows
   ``Phi_v`` and gradient rows ``Phi_g``) the flow is linear::

       d theta/dt = -H (theta - theta*),   H = (Phi_v^T Phi_v + kappa Phi_g^T Phi_g)/n + lam I

   The poison-aligned direction is the representer of ``u . grad f(x0)``, u the top
   eigenvector of the loss input-Hessian at the trigger point x0:
   ``v = s^(-1/2) U^T b`` with b the coefficients of that functional, so
   ``v . theta = u . grad f(x0)``. Its energy ``E(t) = (v^ . (theta(t) - theta*))^2``
   is set beside the bound ``E(0) exp(-2 kappa a t)`` with the curvature of the
   penalty along v^ = v/|v|: ``a = v^T (Phi_g^T Phi_g / n) v^`` (THEORY.md: the
   penalty's Hessian ``d_w g d_w g^T`` averaged over the points).
3. **High-pass filter.** The poison's response ``Delta f = f_poisoned - f_clean``
   (clean fit at the same absolute ridge and kappa) has at zeta an effective length
   ``l_eff^2(E) = -Delta f(zeta) |E| / tr(E^T hess Delta f(zeta) E)`` over a subspace
   E (the peak-curvature definition of THEORY.md; l for an RBF bump of width l). E:
   the top eigenvectors of the clean data's input-gradient covariance
   ``mean grad f(x_i) grad f(x_i)^T`` ("along the data's gradients"), its bottom ones
   ("orthogonal"), and all of R^d. The slope c of ``l_eff^2/l^2 = l0^2/l^2 + c kappa/l^2``
   is fitted over the small-kappa range.
4. **Near clones go first.** The efficacy ``Delta f(x0)`` at trigger points
   ``x0 = zeta + r e`` (random unit e), relative to kappa = 0, against kappa for
   several r/l; ``kappa_half(r)`` is where it halves.
5. **The frontier.** ASR (triggered non-target test points classified as the
   target), clean accuracy, the clean model's own ASR at the same kappa (the trigger
   alone) and the poison's mean efficacy on triggered inputs, against kappa; with the
   penalty alone and with jitter augmentation (Gaussian copies of every training
   point, the kernel-regime stand-in for the paper's crop + flip).
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
import math
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from experiments import demo
from ntk_poison.config import Config as _Config
from ntk_poison.report import Report, new_figure, progress

NAME = "defence"


@dataclasses.dataclass(frozen=True)
class Config(_Config):
    """Configuration of the defence experiment (validated; saved in results.json)."""

    dataset: str = "mnist"
    n_train: int = 120             # clean training points (stratified subset)
    n_test: int = 400              # clean test points (clean accuracy)
    n_trigger: int = 300           # triggered non-target test points (ASR)
    positive_classes: Tuple[int, ...] = (5, 6, 7, 8, 9)   # the target class is +1
    dim: int = 12                  # reduced input dimension (dim-1 PCs + the trigger)
    trigger_strength: float = 0.5  # cross trigger norm in units of the PIXEL-space l
    poison: str = "prototype"      # zeta: the triggered "prototype" or one "image"
    y_target: float = 1.0
    m: int = 10                    # clones of zeta
    weak_m: int = 2                # a weaker attack's frontier (output penalty); 0 skips it
    ridge: float = 2e-2            # relative ridge lam (absolute n lam)
    kappas: Tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0,
                                 10.0, 30.0, 100.0)    # kappa / l^2; kappa = 0 is added
    loss_kappas: Tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)   # kappa / l^2 of the paper's
                                   # loss penalty |grad_x L|^2 (Newton fits); () skips it
    augment_copies: int = 1        # jitter copies per training point (0: no augmented run)
    augment_sigma: float = 0.3     # jitter norm, in units of l
    r_over_l: Tuple[float, ...] = (1e-3, 0.1, 0.3, 0.6, 1.0, 1.5)
    n_directions: int = 8          # random directions e of the near-clone trigger points
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
    seed: int = 0
    x64: bool = True

    def validate(self) -> None:
        demo.check_shared_fields(self)
        self.check_min(1, "n_train", "n_test", "n_trigger", "m", "n_directions",
                       "n_filter_dirs", "n_times", "net_depth", "net_seeds", "max_steps")
        if not 2 <= self.dim:
            raise ValueError(f"`dim` must be >= 2 (PCs plus the trigger), got {self.dim}.")
        if 2 * self.n_filter_dirs > self.dim:
            raise ValueError("`n_filter_dirs` must be <= dim / 2 (two disjoint subspaces).")
        self.check_positive("net_time", "lr_factor", "fd_step", "augment_sigma",
                            "fit_growth_max", "kappas", "contraction_kappas", "net_kappas",
                            "r_over_l")
        self.check_positive("widths", "loss_kappas", allow_empty=True)   # () skips a part
        self.check_min(0, "augment_copies", "weak_m")
        if list(self.kappas) != sorted(set(self.kappas)):
            raise ValueError("`kappas` must be strictly increasing.")

    def demo_config(self) -> demo.Config:
        """The demo's config for the shared pixel-space data/trigger/poison preparation."""
        return demo.Config(
            dataset=self.dataset, n_train=self.n_train, n_test=self.n_test,
            n_trigger=self.n_trigger, positive_classes=self.positive_classes,
            kernels=("rbf",), trigger="cross", trigger_strength=self.trigger_strength,
            poison=self.poison, y_target=self.y_target, seed=self.seed, x64=self.x64)


# --------------------------------------------------------------------------- data

def reduction(X: np.ndarray, direction: np.ndarray, dim: int):
    """The linear map to ``dim`` coordinates: top dim-1 PCs of X plus the trigger.

    Returns ``reduce(A) = scale (A - mean) B^T`` with orthonormal rows B (the last row
    the trigger pattern orthogonalised against the PCs), scale such that the mean
    squared norm of the reduced X is dim. An additive trigger ``x + s p`` maps to
    ``reduce(x) + s scale B p`` with ``|B p| = |p|`` up to its part outside span(B):
    none, since p is in span(B) by construction.
    """
    X = np.asarray(X, np.float64)
    mu = X.mean(0)
    _, _, Vt = np.linalg.svd(X - mu, full_matrices=False)
    B = Vt[:dim - 1]
    p = np.asarray(direction, np.float64).ravel()
    t = p - B.T @ (B @ p)
    if np.linalg.norm(t) < 1e-9 * np.linalg.norm(p):
        raise ValueError("The trigger pattern lies in the span of the principal components; "
                         "lower `dim`.")
    B = np.vstack([B, t / np.linalg.norm(t)])
    Z = (X - mu) @ B.T
    scale = math.sqrt(dim / float(np.mean((Z ** 2).sum(1))))
    return lambda A: ((np.asarray(A, np.float64) - mu) @ B.T) * scale


def prepare(cfg: Config) -> dict:
    """Reduced clean training/test/triggered sets, zeta, x0 and the jitter copies."""
    prep = demo._prepare(cfg.demo_config())
    red = reduction(prep["X"], prep["trigger_direction"], cfg.dim)
    X, Xte, Xtrig = red(prep["X"]), red(prep["Xte"]), red(prep["Xtrig"])
    zeta = red(prep["zeta"][None])[0]
    p = prep["trigger_direction"][None]
    d_trig = red(p)[0] - red(np.zeros_like(p))[0]
    ell = demo._median_distance(X)
    y = prep["y"]
    Xp = np.vstack([X, np.repeat(zeta[None], cfg.m, 0)])
    yp = np.r_[y, np.full(cfg.m, cfg.y_target)]
    out = dict(X=X, y=y, Xp=Xp, yp=yp, Xte=Xte, yte=prep["yte"], Xtrig=Xtrig, zeta=zeta,
               x0=Xtrig[0], ell=ell, trigger_direction=d_trig / np.linalg.norm(d_trig),
               pixel_ell=prep["ell"], dim=cfg.dim)
    if cfg.augment_copies:
        rng = np.random.default_rng(cfg.seed + 7)
        sd = cfg.augment_sigma * ell / math.sqrt(cfg.dim)      # E|jitter|^2 = (sigma l)^2

        def jitter(A, reps):
            return np.vstack([A] + [A + sd * rng.standard_normal(A.shape) for _ in range(reps)])
        out["Xp_aug"] = jitter(Xp, cfg.augment_copies)
        out["yp_aug"] = np.tile(yp, cfg.augment_copies + 1)
        out["X_aug"] = jitter(X, cfg.augment_copies)
        out["y_aug"] = np.tile(y, cfg.augment_copies + 1)
    return out


# --------------------------------------------------------------------------- kernel parts

def _sweeps(k, Xp, yp, Xc, yc, lam, kappas):
    """Poisoned and clean exact sweeps at the same ABSOLUTE ridge n lam and kappa."""
    from ntk_poison import flow
    sp = flow.fit_penalized_sweep(k, Xp, yp, lam, kappas)
    sc = flow.fit_penalized_sweep(k, Xc, yc, lam * len(Xp) / len(Xc), kappas)
    return sp, sc


def frontier(sp, sc, prep, cfg) -> dict:
    """ASR, clean accuracy and the poison's efficacy for each member of the sweeps."""
    fp_t, fc_t = np.asarray(sp.predict(prep["Xtrig"])), np.asarray(sc.predict(prep["Xtrig"]))
    tgt = np.sign(cfg.y_target)
    return dict(
        asr=(np.sign(fp_t) == tgt).mean(1),
        asr_clean_model=(np.sign(fc_t) == tgt).mean(1),
        flip=((np.sign(fp_t) == tgt) & (np.sign(fc_t) != tgt)).mean(1),
        clean_acc=(np.sign(np.asarray(sp.predict(prep["Xte"]))) == prep["yte"][None]).mean(1),
        clean_acc_clean_model=(np.sign(np.asarray(sc.predict(prep["Xte"])))
                               == prep["yte"][None]).mean(1),
        efficacy=(fp_t - fc_t).mean(1))


@dataclasses.dataclass(frozen=True)
class _Stack:
    """Separately fitted models with a sweep's ``predict(x) -> (K, m)`` interface."""
    models: tuple

    def predict(self, x):
        return np.stack([np.asarray(m.predict(x)) for m in self.models])


def loss_penalty_frontier(k, prep, cfg) -> dict:
    """Item 5 with the paper's penalty |grad_x L|^2 (exact minimiser by Newton)."""
    from ntk_poison import flow
    ell2, lam = prep["ell"] ** 2, cfg.ridge
    kappas = np.r_[0.0, cfg.loss_kappas] * ell2
    lam_c = lam * len(prep["Xp"]) / len(prep["X"])
    fit = lambda X, y, ridge, kappa: flow.fit_penalized(k, X, y, ridge, float(kappa),
                                                        penalty="loss")
    sp = _Stack(tuple(fit(prep["Xp"], prep["yp"], lam, kp)
                      for kp in progress(kappas, "loss penalty: poisoned")))
    sc = _Stack(tuple(fit(prep["X"], prep["y"], lam_c, kp)
                      for kp in progress(kappas, "loss penalty: clean")))
    out = frontier(sp, sc, prep, cfg)
    out["kappa_over_l2"] = kappas / ell2
    out["newton_iterations"] = [m.info_dict.get("iterations", 0) for m in sp.models]
    return out


def capacity(k, sp, Xp, yp, lam, kappas) -> dict:
    from ntk_poison import flow
    f = np.asarray(sp.predict(Xp))
    g = np.asarray(sp.input_grad(Xp)).reshape(len(kappas), len(Xp), -1)
    return dict(dof=np.asarray(flow.effective_dof(k, Xp, lam, kappas)),
                residual=((f - yp[None]) ** 2).mean(1),
                penalty=0.5 * (g ** 2).sum(-1).mean(1))


def high_pass(sp, sc, prep, cfg, kappas) -> dict:
    """l_eff^2 of Delta f at zeta over three subspaces, and the linear fit of its growth."""
    import jax.numpy as jnp
    zeta = prep["zeta"]
    z = jnp.asarray(zeta[None])
    n_k = len(kappas)
    df = np.asarray(sp.predict(z))[:, 0] - np.asarray(sc.predict(z))[:, 0]
    hess = np.stack([np.asarray(sp.at(i).input_hessian(z))[0]
                     - np.asarray(sc.at(i).input_hessian(z))[0] for i in range(n_k)])
    g0 = np.asarray(sc.at(0).input_grad(prep["X"])).reshape(len(prep["X"]), -1)
    w, V = np.linalg.eigh(g0.T @ g0 / len(g0))          # the data's gradient covariance
    q = cfg.n_filter_dirs
    spaces = dict(along=V[:, ::-1][:, :q], orthogonal=V[:, :q], isotropic=np.eye(len(zeta)))
    ell2 = prep["ell"] ** 2
    out = dict(delta_f_zeta=df, gradient_cov_eigs=w[::-1], kappa_over_l2=kappas / ell2)
    for name, E in spaces.items():
        curv = np.einsum("ia,kab,ib->k", E.T, hess, E.T)         # tr(E^T H E)
        le2 = np.where(curv < 0, -df * E.shape[1] / np.where(curv < 0, curv, 1.0), np.nan)
        out[f"leff2_{name}"] = le2 / ell2
        out[f"fit_{name}"] = _fit_growth(kappas / ell2, le2 / ell2, cfg.fit_growth_max)
    # the response along the top "along" and "orthogonal" directions (figure)
    hs = np.linspace(-2.0, 2.0, 41) * prep["ell"]
    prof = {}
    for name in ("along", "orthogonal"):
        e = spaces[name][:, 0]
        pts = jnp.asarray(zeta[None] + hs[:, None] * e[None])
        prof[name] = np.asarray(sp.predict(pts)) - np.asarray(sc.predict(pts))
    out["profile_h_over_l"] = hs / prep["ell"]
    out["profiles"] = prof
    return out


def _fit_growth(x, le2, growth_max) -> dict:
    """Least squares ``le2 = a + c x`` over the leading points with le2/le2[0] - 1 <= growth_max.

    Returns c, its standard error, the intercept, the relative RMS misfit and the
    number of points (at least 3: kappa = 0 and two more), or c = None if too few.
    """
    x, le2 = np.asarray(x, float), np.asarray(le2, float)
    if not np.isfinite(le2[0]) or le2[0] <= 0:
        return dict(c=None, reason="no peak at zeta at kappa = 0")
    ok = np.isfinite(le2) & (le2 / le2[0] - 1 <= growth_max)
    n = int(np.argmin(ok)) if not ok.all() else len(x)        # leading run only
    n = max(n, 3)
    if n > len(x) or not np.isfinite(le2[:n]).all():
        return dict(c=None, reason="too few finite points")
    A = np.stack([np.ones(n), x[:n]], 1)
    coef, *_ = np.linalg.lstsq(A, le2[:n], rcond=None)
    r = le2[:n] - A @ coef
    dof = max(n - 2, 1)
    cov = np.linalg.inv(A.T @ A) * (r @ r) / dof
    return dict(c=float(coef[1]), c_stderr=float(np.sqrt(max(cov[1, 1], 0))),
                intercept=float(coef[0]), rel_rms=float(np.sqrt(np.mean(r ** 2)) / le2[0]),
                n_points=n, kappa_max=float(x[n - 1]))


def near_clones(sp, sc, prep, cfg, kappas) -> dict:
    """Efficacy ``Delta f(zeta + r e)`` (mean over random unit e) relative to kappa = 0."""
    rng = np.random.default_rng(cfg.seed + 3)
    E = rng.standard_normal((cfg.n_directions, cfg.dim))
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    rs = np.asarray(cfg.r_over_l, float)
    pts = prep["zeta"][None, None] + (rs[:, None, None] * prep["ell"]) * E[None]   # (R, D, d)
    flat = pts.reshape(-1, cfg.dim)
    df = (np.asarray(sp.predict(flat)) - np.asarray(sc.predict(flat))).reshape(
        len(kappas), len(rs), cfg.n_directions).mean(-1)
    rel = df / df[0]
    x = np.asarray(kappas) / prep["ell"] ** 2
    return dict(r_over_l=rs, efficacy=df, relative=rel,
                kappa_half=[kappa_half(x, rel[:, j]) for j in range(len(rs))])


def kappa_half(xs, rel) -> Optional[float]:
    """The first kappa/l^2 where rel falls to 1/2 (log-interpolated), None if never."""
    xs, rel = np.asarray(xs, float), np.asarray(rel, float)
    below = rel <= 0.5
    if not below.any():
        return None
    i = int(np.argmax(below))
    if i == 0:
        return float(xs[0])
    x0, x1 = np.log(max(xs[i - 1], xs[1] / 10)), np.log(xs[i])    # kappa = 0 drawn a decade low
    f = (0.5 - rel[i - 1]) / (rel[i] - rel[i - 1])
    return float(np.exp(x0 + f * (x1 - x0)))


# --------------------------------------------------------------------------- contraction

def joint_coordinates(k, X, rtol: float = 1e-12):
    """Orthonormal coordinates of the joint span: ``Kfull = U s U^T``, numerically null
    directions (``s <= rtol s_max``) dropped. Returns (Kfull, U, s)."""
    from ntk_poison import flow
    Kf = np.asarray(flow.joint_gram(k, X), np.float64)
    s, U = np.linalg.eigh(0.5 * (Kf + Kf.T))
    keep = s > rtol * s.max()
    return Kf, U[:, keep], s[keep]


def functional_coefficients(model, x0, u):
    """b with ``b . c = u . grad f(x0)`` for ``f = [k(., X), d k(., X)] c``, and the
    coefficient vector c of ``model`` (both flattened point-major like flow.joint_gram)."""
    import jax
    import jax.numpy as jnp

    def g(alpha, beta):
        f = dataclasses.replace(model, alpha=alpha, beta=beta).as_function()
        return jnp.vdot(jnp.asarray(u), jax.grad(f)(jnp.asarray(x0)))
    ba, bb = jax.grad(g, argnums=(0, 1))(model.alpha, model.beta)
    c = np.r_[np.asarray(model.alpha).ravel(), np.asarray(model.beta).ravel()]
    return np.r_[np.asarray(ba).ravel(), np.asarray(bb).ravel()], c


def penalty_curvature(U, s, n, b) -> float:
    """a = v^T (Phi_g^T Phi_g / n) v for the unit poison-aligned direction v (item 2)."""
    v = (U.T @ b) / np.sqrt(s)
    g = (U[n:] * np.sqrt(s)[None]) @ (v / np.linalg.norm(v))
    return float(g @ g / n)


def contraction(U, s, n, y, lam, kappa, b, c0, times) -> dict:
    """The penalised flow from ``c0`` in theta coordinates (module docstring, item 2)."""
    Phi = U * np.sqrt(s)[None]                       # (N, r) features of the functionals
    Pv, Pg = Phi[:n], Phi[n:]
    Gp = Pg.T @ Pg / n                               # the penalty's curvature (per kappa)
    H = Pv.T @ Pv / n + kappa * Gp + lam * np.eye(len(s))
    h, W = np.linalg.eigh(0.5 * (H + H.T))
    theta_star = W @ ((W.T @ (Pv.T @ y / n)) / h)
    theta0 = np.sqrt(s) * (U.T @ c0)
    v = (U.T @ b) / np.sqrt(s)                       # v . theta = u . grad f(x0)
    vh = v / np.linalg.norm(v)
    a = float(vh @ Gp @ vh)
    dv = W.T @ vh
    d0 = W.T @ (theta0 - theta_star)
    proj = (np.exp(-np.outer(times, h)) * (dv * d0)[None]).sum(1)     # vh . delta(t)
    E = proj ** 2
    g = np.linalg.norm(v) * (proj + vh @ theta_star)                  # u . grad f(x0)(t)
    bound = E[0] * np.exp(-2 * kappa * a * np.asarray(times))
    n_fit = max(3, len(times) // 4)                  # the early decay: first quarter
    sel = (E > 1e-300)[:n_fit]
    rate = None
    if sel.sum() >= 3:
        rate = float(-np.polyfit(times[:n_fit][sel], np.log(E[:n_fit][sel]), 1)[0] / 2)
    viol = np.flatnonzero(E[1:] > bound[1:] * (1 + 1e-9))
    return dict(kappa=kappa, a=a, times=np.asarray(times), energy=E, bound=bound, g=g,
                g_inf=float(np.linalg.norm(v) * (vh @ theta_star)),
                max_ratio=(float(np.max(E[1:] / np.maximum(bound[1:], 1e-300)))
                           if len(E) > 1 else float("nan")),
                first_violation=None if viol.size == 0 else float(times[1 + viol[0]]),
                slow_weight=float(np.sum(dv[h < kappa * a] ** 2)),
                rate=rate, rate_bound=kappa * a,
                rayleigh=float(vh @ H @ vh))


def top_direction(model, x0, label):
    """u: the top eigenvector of the loss input-Hessian at x0 (dense; d is small)."""
    import jax.numpy as jnp
    from ntk_poison import spectra
    vals, vecs = spectra.top_eigenpairs(spectra.loss_fn(model, label), jnp.asarray(x0), k=1,
                                        method="dense")
    return float(vals[0]), np.asarray(vecs[0])


# --------------------------------------------------------------------------- finite nets

def _net_eval_points(prep, u, h):
    x0 = prep["x0"]
    return np.vstack([prep["Xte"], prep["Xtrig"], (x0 + h * u)[None], (x0 - h * u)[None]])


def _scores(f_eval, prep, cfg) -> dict:
    """ASR, clean accuracy from predictions at _net_eval_points, and the FD directional
    derivative u . grad f(x0)."""
    nte, ntr = len(prep["Xte"]), len(prep["Xtrig"])
    f_eval = np.asarray(f_eval)
    h = cfg.fd_step * prep["ell"]
    return dict(clean_acc=float((np.sign(f_eval[:nte]) == prep["yte"]).mean()),
                asr=float((np.sign(f_eval[nte:nte + ntr]) == np.sign(cfg.y_target)).mean()),
                g_x0=float((f_eval[-2] - f_eval[-1]) / (2 * h)))


def flow_rate(Kf, n, kappa, lam) -> float:
    """The fastest rate of the penalised flow, ``lambda_max(S Kfull S)/n + lam``: gradient
    descent with step lr follows the flow for ``lr * rate << 1`` and is stable below 2."""
    sw = np.r_[np.ones(n), np.full(len(Kf) - n, math.sqrt(kappa))]
    return float(np.linalg.eigvalsh(sw[:, None] * Kf * sw[None])[-1] / n + lam)


def nets_vs_kernel(prep, cfg) -> dict:
    """Item 6: erf nets of several widths against kernel_flow of their analytic NTK."""
    import jax
    import jax.numpy as jnp
    from ntk_poison import flow, kernels, nets
    k = kernels.nt_fc(depth=cfg.net_depth, W_std=cfg.W_std, b_std=cfg.b_std,
                      activation="erf")
    Xp, yp, ell2, lam = prep["Xp"], prep["yp"], prep["ell"] ** 2, cfg.ridge
    n, T = len(Xp), cfg.net_time
    kappas = np.r_[0.0, cfg.net_kappas] * ell2
    Kf, U, s = joint_coordinates(k, Xp)
    # the kernel at time T for every kappa (library closed form), and the flow's top rate
    kern = dict(residual=[], penalty=[], clean_acc=[], asr=[], g_x0=[], lr=[], rate=[])
    paths = []
    for kappa in progress(kappas, "erf NTK: kernel_flow"):
        p = flow.kernel_flow(k, Xp, yp, lam, float(kappa), [T])
        paths.append(p.at(0))
        rate = flow_rate(Kf, n, kappa, lam)
        kern["rate"].append(rate)
        kern["lr"].append(cfg.lr_factor / rate)
    m0 = paths[0]
    _, u = top_direction(m0, prep["x0"], cfg.y_target)
    h = cfg.fd_step * prep["ell"]
    Xe = _net_eval_points(prep, u, h)
    for mod in paths:
        f = np.asarray(mod.predict(Xp))
        g = np.asarray(mod.input_grad(Xp)).reshape(n, -1)
        kern["residual"].append(float(((f - yp) ** 2).mean()))
        kern["penalty"].append(float(0.5 * (g ** 2).sum(1).mean()))
        sc = _scores(mod.predict(jnp.asarray(Xe)), prep, cfg)
        for key in ("clean_acc", "asr", "g_x0"):
            kern[key].append(sc[key])
    kern["g_x0_exact"] = [float(u @ np.asarray(mod.input_grad(prep["x0"][None]))[0])
                          for mod in paths]
    kern["dof"] = np.asarray(flow.effective_dof(k, Xp, lam, kappas))
    # contraction after switching the penalty on at T (kernel: exact linear flow)
    kc = float(cfg.net_kappas[-1] if len(cfg.net_kappas) < 2 else cfg.net_kappas[-2]) * ell2
    b, c0 = functional_coefficients(m0, prep["x0"], u)
    t_end = 3.0 / max(kc * penalty_curvature(U, s, n, b), 1e-12)
    times = np.linspace(0.0, t_end, cfg.n_times)
    con = contraction(U, s, n, yp, lam, kc, b, c0, times)
    con_lr = cfg.lr_factor / flow_rate(Kf, n, kc, lam)
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

def run(cfg: Config, out_dir: str | Path) -> Report:
    """Run the defence experiment; write results.json, figures and report.md."""
    import jax
    from ntk_poison import kernels
    jax.config.update("jax_enable_x64", cfg.x64)
    t0 = time.time()
    rep = Report(f"ntk-poison defence: the input-gradient penalty ({cfg.dataset.upper()})",
                 out_dir, cfg)
    prep = prepare(cfg)
    ell, lam = prep["ell"], cfg.ridge
    kappas = np.r_[0.0, cfg.kappas] * ell ** 2
    k = kernels.rbf(ell)
    secs = {}
    res = dict(length_scale=ell, pixel_length_scale=prep["pixel_ell"], dim=cfg.dim,
               n_poisoned=len(prep["Xp"]), kappa_over_l2=kappas / ell ** 2,
               r_x0_zeta_over_l=float(np.linalg.norm(prep["x0"] - prep["zeta"]) / ell),
               train_mean_label=[float(np.mean(prep["yp"])), float(np.mean(prep["y"]))],
               r_zeta_data_over_l=float(np.sqrt(((prep["X"] - prep["zeta"]) ** 2).sum(1)).min()
                                        / ell))
    steps = ["sweeps", "capacity", "filter", "contraction", "loss penalty", "weak attack",
             "augmented", "nets"]
    bar = progress(steps, "defence")
    for step in bar:
        ts = time.time()
        if step == "sweeps":
            sp, sc = _sweeps(k, prep["Xp"], prep["yp"], prep["X"], prep["y"], lam, kappas)
            res["frontier"] = frontier(sp, sc, prep, cfg)
            res["near_clones"] = near_clones(sp, sc, prep, cfg, kappas)
        elif step == "capacity":
            res["capacity"] = capacity(k, sp, prep["Xp"], prep["yp"], lam, kappas)
        elif step == "filter":
            res["high_pass"] = high_pass(sp, sc, prep, cfg, kappas)
        elif step == "contraction":
            res["contraction"] = _rbf_contraction(k, sp.at(0), prep, cfg)
        elif step == "loss penalty" and cfg.loss_kappas:
            res["frontier_loss"] = loss_penalty_frontier(k, prep, cfg)
        elif step == "weak attack" and cfg.weak_m:
            n = len(prep["X"]) + cfg.weak_m
            spw, scw = _sweeps(k, prep["Xp"][:n], prep["yp"][:n], prep["X"], prep["y"], lam,
                               kappas)
            res["frontier_weak"] = frontier(spw, scw, prep, cfg)
        elif step == "augmented" and cfg.augment_copies:
            spa, sca = _sweeps(k, prep["Xp_aug"], prep["yp_aug"], prep["X_aug"], prep["y_aug"],
                               lam, kappas)
            res["frontier_augmented"] = frontier(spa, sca, prep, cfg)
        elif step == "nets" and cfg.widths:
            res["nets"] = nets_vs_kernel(prep, cfg)
        secs[step] = time.time() - ts
    res["seconds"] = dict(secs, total=time.time() - t0)
    _claims(rep, res, cfg)
    _figures(rep, res, cfg)
    rep.results = res
    rep.text(_setup_text(res, cfg))
    rep.text(_reading(res))
    rep.write()
    return rep


def _rbf_contraction(k, m0, prep, cfg) -> dict:
    """Item 2 for the RBF kernel: the flow from the undefended minimiser, per kappa."""
    Xp, yp, ell2 = prep["Xp"], prep["yp"], prep["ell"] ** 2
    _, U, s = joint_coordinates(k, Xp)
    lam_top, u = top_direction(m0, prep["x0"], cfg.y_target)
    b, c0 = functional_coefficients(m0, prep["x0"], u)
    g = np.asarray(m0.input_grad(prep["x0"][None]))[0]
    out = dict(top_eigenvalue=lam_top, u_trigger_cos2=float((u @ prep["trigger_direction"]) ** 2),
               u_grad_cos2=float((u @ g) ** 2 / (g @ g)), runs=[])
    for kr in cfg.contraction_kappas:
        kappa = kr * ell2
        a = penalty_curvature(U, s, len(Xp), b)
        times = np.linspace(0.0, 3.0, cfg.n_times) / max(kappa * a, 1e-300)
        r = contraction(U, s, len(Xp), yp, cfg.ridge, kappa, b, c0, times)
        r["kappa_over_l2"] = kr
        out["runs"].append(r)
    return out


def _mean_runs(runs, key):
    """Mean over seeds of a per-kappa list (runs may skip kappas: align on 'kappa')."""
    out = {}
    for w, rows in runs.items():
        ks = sorted({kk for r in rows for kk in r["kappa"]})
        vals = [[r[key][r["kappa"].index(kk)] for r in rows if kk in r["kappa"]] for kk in ks]
        out[w] = (np.asarray(ks), np.asarray([np.mean(v) for v in vals]))
    return out


def _fmt(x, p=3) -> str:
    return "never" if x is None else f"{x:.{p}g}"


def _claims(rep, res, cfg):
    fr, cap, hp, nc = res["frontier"], res["capacity"], res["high_pass"], res["near_clones"]
    kx = res["kappa_over_l2"]
    # 1. capacity
    dd = np.diff(cap["dof"])
    rep.claim("capacity: degrees of freedom",
              "effective_dof strictly decreases in kappa (RBF, exact model).",
              bool(np.all(dd < 0)),
              f"df {cap['dof'][0]:.3f} -> {cap['dof'][-1]:.3f} over kappa/l^2 in "
              f"[0, {kx[-1]:g}]; largest step {dd.max():.3g} (must be < 0).", ["capacity.png"])
    dr = np.diff(cap["residual"])
    rep.claim("capacity: training residual",
              "The training residual mean (f(x_i) - y_i)^2 strictly increases in kappa (RBF).",
              bool(np.all(dr > 0)),
              f"residual {cap['residual'][0]:.4f} -> {cap['residual'][-1]:.4f}; "
              f"{int((dr <= 0).sum())} of {len(dr)} steps do not increase (smallest step "
              f"{dr.min():.3g}); the penalty term falls {cap['penalty'][0]:.3g} -> "
              f"{cap['penalty'][-1]:.3g}. (Minimisation guarantees only fit + ridge up and "
              "penalty down; see flow's module docstring.)", ["capacity.png"])
    # 2. contraction
    con = res["contraction"]
    ok = all(r["max_ratio"] <= 1 + 1e-9 for r in con["runs"])
    ev = "; ".join(
        f"kappa/l^2 = {r['kappa_over_l2']:g}: a = {r['a']:.3g}, early decay rate "
        f"{_fmt(r['rate'])} vs kappa a = {r['rate_bound']:.3g}, max_t E/bound = "
        f"{r['max_ratio']:.3g}" + ("" if r["first_violation"] is None else
                                   f" (first above the bound at kappa a t = "
                                   f"{r['first_violation'] * r['rate_bound']:.3g})")
        + f", weight of v on flow modes slower than kappa a: {r['slow_weight']:.3g}"
        for r in con["runs"])
    ev += (". The bound is a Rayleigh-quotient statement: v is not an eigenvector of the "
           "flow matrix H, so its energy eventually decays at the rate of the slowest H "
           "modes it overlaps, which can be below kappa a")
    rep.claim("contraction (RBF)",
              "Switching the penalty on, the energy of the poison-aligned mode at the trigger "
              "point decays at least like exp(-2 kappa a t).", ok,
              f"u (top loss-Hessian eigenvector at x0) has cos^2 {con['u_grad_cos2']:.3f} "
              f"with grad f(x0) and {con['u_trigger_cos2']:.3f} with the trigger. " + ev + ".",
              ["contraction.png"])
    # 3. high-pass filter
    fi, fa, fo = hp["fit_isotropic"], hp["fit_along"], hp["fit_orthogonal"]
    le = hp["leff2_isotropic"]
    grows = bool(np.nanmax(le) > le[0] * 1.05)
    linear = fi.get("c") is not None and fi["c"] > 2 * fi["c_stderr"] and fi["rel_rms"] < 0.05
    rep.claim("high-pass: l_eff^2 = l^2 + c kappa",
              "The effective length scale of the poison's response grows with kappa, "
              "linearly in l_eff^2 for small kappa.", grows and linear,
              f"l_eff^2/l^2 (isotropic) {le[0]:.3f} at kappa = 0, min {np.nanmin(le):.3f}, max "
              f"{np.nanmax(le):.3f}; linear fit over kappa/l^2 <= {_fmt(fi.get('kappa_max'))}: "
              f"c = {_fmt(fi.get('c'))} +- {_fmt(fi.get('c_stderr'), 2)}, relative RMS misfit "
              f"{_fmt(fi.get('rel_rms'), 2)} (THEORY's guess: c = 2). "
              f"{'Non-monotone: it first shrinks, then grows.' if np.nanargmin(le) > 0 else ''}",
              ["high_pass.png"])
    ca, co = fa.get("c"), fo.get("c")
    rep.claim("high-pass: anisotropy",
              "The widening acts along the data's input-gradient directions more than "
              "orthogonal to them.",
              None if ca is None or co is None else bool(ca > co + 2 * fo["c_stderr"]),
              f"c along the top {cfg.n_filter_dirs} gradient-covariance eigenvectors "
              f"{_fmt(ca)} +- {_fmt(fa.get('c_stderr'), 2)}, along the bottom ones {_fmt(co)} "
              f"+- {_fmt(fo.get('c_stderr'), 2)}; l_eff^2/l^2 at the largest kappa "
              f"{hp['leff2_along'][-1]:.3f} vs {hp['leff2_orthogonal'][-1]:.3f}.",
              ["high_pass.png"])
    # 4. near clones first
    kh = nc["kappa_half"]
    ok = None if kh[0] is None or kh[-1] is None else bool(kh[-1] >= 1.25 * kh[0])
    rep.claim("near clones go first",
              "Efficacy at trigger points closer to the poison (small r/l) is halved at a "
              "smaller kappa than at far ones.", ok,
              "kappa_half/l^2 by r/l: " + ", ".join(f"{r:g}: {_fmt(h)}" for r, h in
                                                   zip(nc["r_over_l"], kh))
              + f"; at the largest kappa the relative efficacy is {nc['relative'][-1, 0]:.3f} "
              f"at r/l = {nc['r_over_l'][0]:g} and {nc['relative'][-1, -1]:.3f} at "
              f"r/l = {nc['r_over_l'][-1]:g} (supported needs kappa_half to grow >= 25% "
              "from the nearest to the farthest r).", ["near_clones.png"])
    # 5. frontier
    for key, label in (("frontier", "output penalty"), ("frontier_loss", "loss penalty"),
                       ("frontier_weak", f"output penalty, m = {cfg.weak_m}"),
                       ("frontier_augmented", "output penalty + jitter")):
        if key not in res:
            continue
        f = res[key]
        kx = np.asarray(f.get("kappa_over_l2", res["kappa_over_l2"]))
        stop = np.flatnonzero(f["asr"] <= 0.5)
        half = np.flatnonzero(f["efficacy"] <= 0.5 * f["efficacy"][0])
        acc0 = f["clean_acc"][0]
        if stop.size:
            i = stop[np.argmax(f["clean_acc"][stop])]
            ok = bool(f["clean_acc"][i] <= acc0 - 0.01)
            txt = (f"ASR <= 0.5 first at kappa/l^2 = {kx[stop[0]]:g}; the best clean accuracy "
                   f"with ASR <= 0.5 is {f['clean_acc'][i]:.3f} (kappa = 0: {acc0:.3f})")
        else:
            ok = None
            txt = (f"ASR never falls to 0.5 (min {f['asr'].min():.3f}; the clean model's own "
                   f"ASR from the trigger alone {f['asr_clean_model'][0]:.3f} at kappa = 0)")
        if half.size:
            j = half[0]
            txt += (f"; the poison's mean efficacy on triggered inputs halves at kappa/l^2 = "
                    f"{kx[j]:g}, where clean accuracy is {f['clean_acc'][j]:.3f} and ASR "
                    f"{f['asr'][j]:.3f}")
        txt += (f"; at the largest kappa clean accuracy is {f['clean_acc'][-1]:.3f}, ASR "
                f"{f['asr'][-1]:.3f}, and the poison-caused flips {f['flip'][-1]:.3f}.")
        rep.claim(f"frontier ({label}, RBF): the attack is stopped",
                  "Some kappa brings ASR to <= 0.5 while clean accuracy stays within 5 points "
                  "of kappa = 0.",
                  bool(stop.size and np.any(f["clean_acc"][stop] >= acc0 - 0.05)), txt,
                  ["frontier.png"])
        rep.claim(f"frontier ({label}, RBF): the trade-off",
                  "Stopping the attack (ASR <= 0.5) costs clean accuracy (at least 1 point "
                  "at every kappa that stops it).", ok, txt,
                  ["frontier.png"])
    # 6. nets vs kernel
    if "nets" not in res:
        rep.text("The finite-width part (item 6) was skipped: `widths` is empty.")
        return
    nv = res["nets"]
    gaps = _mean_runs(nv["runs"], "gap")
    ws = sorted(gaps)
    g_small, g_big = gaps[ws[0]][1].mean(), gaps[ws[-1]][1].mean()
    slope = math.log(g_big / g_small) / math.log(ws[-1] / ws[0])
    rep.claim("finite width: nets approach the kernel",
              "Penalised erf MLPs approach kernel_flow of their NTK at the same T as width "
              "grows.", bool(g_big < g_small),
              f"relative RMS gap (mean over kappa and {cfg.net_seeds} seeds): "
              + ", ".join(f"width {w}: {gaps[w][1].mean():.3f}" for w in ws)
              + f"; log-log slope {slope:.2f} (width^-1/2 expected).", ["nets.png"])
    kern = nv["kernel"]
    res_n = _mean_runs(nv["runs"], "residual")
    mono = [bool(np.all(np.diff(res_n[w][1]) > 0)) for w in ws]
    rep.claim("finite width: capacity falls",
              "The erf NTK's dof falls with kappa, and the training residual at T rises with "
              "kappa for the kernel and every width.",
              bool(np.all(np.diff(kern["dof"]) < 0) and np.all(np.diff(kern["residual"]) > 0)
                   and all(mono)),
              f"erf NTK dof {kern['dof'][0]:.2f} -> {kern['dof'][-1]:.2f}; residual at T: kernel "
              f"{kern['residual'][0]:.3f} -> {kern['residual'][-1]:.3f}, "
              + ", ".join(f"width {w}: {res_n[w][1][0]:.3f} -> {res_n[w][1][-1]:.3f}"
                          for w in ws) + ".", ["nets.png"])
    c = nv["contraction"]
    net_err = []
    for w in ws:
        gs = [r["contraction"]["g"] for r in nv["runs"][w] if "contraction" in r]
        if gs:
            net_err.append((w, float(np.sqrt(np.mean((np.mean(gs, 0) - c["g"]) ** 2))
                                     / abs(c["g"][0] - c["g_inf"]))))
    rep.claim("finite width: nets follow the kernel's contraction",
              "After the penalty is switched on, u.grad f(x0) of the nets follows the erf "
              "kernel's exact flow, closer as width grows.",
              bool(net_err) and net_err[-1][1] < net_err[0][1],
              f"kappa/l^2 = {nv['contraction_kappa_over_l2']:g}; kernel u.grad f(x0): "
              f"{c['g'][0]:.3f} -> {c['g'][-1]:.3f} (limit {c['g_inf']:.3f}); net-vs-kernel RMS "
              "difference of the curve relative to its drop: "
              + ", ".join(f"width {w}: {e:.3f}" for w, e in net_err) + ".", ["contraction.png"])
    rep.claim("contraction (erf NTK)",
              "The poison-aligned energy of the erf kernel's flow obeys the exp(-2 kappa a t) "
              "bound.", bool(c["max_ratio"] <= 1 + 1e-9),
              f"a = {c['a']:.3g}, early decay rate {_fmt(c['rate'])} vs kappa a = "
              f"{c['rate_bound']:.3g}, max_t E/bound = {c['max_ratio']:.3g}"
              + ("" if c["first_violation"] is None else
                 f" (first above the bound at kappa a t = "
                 f"{c['first_violation'] * c['rate_bound']:.3g})")
              + f"; weight of v on flow modes slower than kappa a: {c['slow_weight']:.3g}.",
              ["contraction.png"])
    for w in ws:
        sk = sorted({x for r in nv["runs"][w] for x in r["skipped"]})
        if sk:
            rep.text(f"Width {w}: kappa/l^2 in {sk} skipped: more than max_steps = "
                     f"{cfg.max_steps} gradient steps to reach T = {cfg.net_time:g} stably.")


def _reading(res) -> str:
    """Data-driven notes on what the frontier numbers mean."""
    f = res["frontier"]
    ym, yc = res["train_mean_label"]
    lines = ["## Reading the frontier", ""]
    lines.append(
        f"- ASR counts triggered non-target test images that the model labels +1. The "
        f"trigger alone does part of this: the CLEAN model (no poison) already labels "
        f"{f['asr_clean_model'][0]:.0%} of them +1 at kappa = 0. 'flip' counts only those "
        "the clean model at the same kappa labels -1 and the poisoned model +1.")
    if f["clean_acc"][-1] < 0.6:
        lines.append(
            f"- At the largest kappa clean accuracy is {f['clean_acc'][-1]:.3f}: the model is "
            "nearly constant, with the sign of the poisoned training set's mean label "
            f"({ym:+.3f}), so ASR tends to 1 there for a trivial reason; the clean model "
            f"(mean label {yc:+.3f}) labels {f['asr_clean_model'][-1]:.0%} of the triggered inputs +1.")
    e = np.asarray(f["efficacy"])
    lines.append(
        f"- The poison's mean efficacy on triggered inputs (Delta f = f_poisoned - f_clean) "
        f"falls from {e[0]:.3f} to {e.min():.3f}; it is the measure in which the penalty "
        "acts most clearly, well before clean accuracy moves.")
    return "\n".join(lines)


def _setup_text(res, cfg) -> str:
    s = res["seconds"]
    return f"""## Set-up
{cfg.n_train} stratified {cfg.dataset} training images (classes {list(cfg.positive_classes)}
-> +1, else -1), reduced to {cfg.dim} coordinates (top {cfg.dim - 1} principal components +
the cross-trigger pattern; scaled to mean |x|^2 = {cfg.dim}); l = {res['length_scale']:.4g}
(median pairwise distance). Attack: m = {cfg.m} clones of the triggered prototype zeta,
label {cfg.y_target:+g}; cross trigger of norm {cfg.trigger_strength:g} x the pixel-space l.
zeta is {res['r_zeta_data_over_l']:.3g} l from the nearest clean point; the trigger point x0
(first triggered non-target test image) is {res['r_x0_zeta_over_l']:.3g} l from zeta. Ridge
lam = {cfg.ridge:g} (absolute n lam), output penalty, exact kernel minimiser
(flow.fit_penalized_sweep); kappa/l^2 in 0 and {list(cfg.kappas)}. ASR on
{cfg.n_trigger} triggered non-target test images, clean accuracy on {cfg.n_test}. Jitter
augmentation: {cfg.augment_copies} Gaussian cop{'y' if cfg.augment_copies == 1 else 'ies'} of
every training point, |jitter| ~ {cfg.augment_sigma:g} l. Nets: erf MLP, depth {cfg.net_depth},
W_std {cfg.W_std:g}, b_std {cfg.b_std:g}, widths {list(cfg.widths)}, {cfg.net_seeds} seeds, full-batch
gradient descent (lr = {cfg.lr_factor:g} / the flow's top rate) to T = {cfg.net_time:g}, against
flow.kernel_flow of kernels.nt_fc(activation="erf") at the same T.

Time: {s['total']:.1f} s (""" + ", ".join(f"{k} {v:.1f} s" for k, v in s.items()
                                           if k != "total") + ")."


def _figures(rep, res, cfg):
    kx = res["kappa_over_l2"]
    xp = np.where(kx > 0, kx, kx[1] / 10)          # kappa = 0 drawn a decade low
    cap, hp, nc = res["capacity"], res["high_pass"], res["near_clones"]
    nv = res.get("nets")
    # capacity
    fig, ax = new_figure(3, 1, size=(4.6, 3.6))
    ax[0, 0].semilogx(xp, cap["dof"], "o-", label="RBF (t = inf)")
    ax[0, 1].semilogx(xp, cap["residual"], "o-", label="RBF residual (t = inf)")
    if nv is not None:
        nk = np.where(nv["kappas_over_l2"] > 0, nv["kappas_over_l2"], kx[1] / 10)
        ax[0, 0].semilogx(nk, nv["kernel"]["dof"], "s-", label="erf NTK (t = inf)")
        ax[0, 1].semilogx(nk, nv["kernel"]["residual"], "s-", label="erf NTK at T")
        for w, (ks, v) in _mean_runs(nv["runs"], "residual").items():
            ax[0, 1].semilogx(np.where(ks > 0, ks, kx[1] / 10), v, "x--",
                              label=f"erf net {w} at T")
    ax[0, 0].set(xlabel="kappa / l^2 (0 drawn a decade low)", ylabel="effective dof",
                 title="capacity: dof")
    ax[0, 1].set(xlabel="kappa / l^2", ylabel="mean (f - y)^2 on the training set",
                 title="capacity: residual")
    ax[0, 2].semilogx(xp, cap["penalty"], "o-")
    ax[0, 2].set(xlabel="kappa / l^2", ylabel="(1/2n) sum |grad f(x_i)|^2", title="penalty term")
    for a in ax[0, :2]:
        a.legend(fontsize=7)
    rep.figure(fig, "capacity")
    # contraction
    fig, ax = new_figure(2 if nv is not None else 1, 1, size=(5.0, 3.8))
    for r in res["contraction"]["runs"]:
        x = r["rate_bound"] * r["times"]
        ax[0, 0].semilogy(x, r["energy"] / r["energy"][0], "o-", ms=2,
                          label=f"kappa/l^2 = {r['kappa_over_l2']:g} (a = {r['a']:.2g})")
    x = np.linspace(0, 3, 50)
    ax[0, 0].semilogy(x, np.exp(-2 * x), "k--", label="bound exp(-2 kappa a t)")
    ax[0, 0].set(xlabel="kappa a t", ylabel="E(t) / E(0)",
                 title="RBF: poison-aligned energy after the penalty is on")
    ax[0, 0].legend(fontsize=7)
    if nv is not None:
        _net_contraction_panel(ax[0, 1], nv)
    rep.figure(fig, "contraction")
    _high_pass_figure(rep, hp, kx, xp)
    _near_clone_figure(rep, nc, xp)
    _frontier_figure(rep, res, nv)
    if nv is not None:
        _nets_figure(rep, nv)


def _net_contraction_panel(ax, nv):
    c = nv["contraction"]
    ax.plot(c["times"], c["g"], "k-", lw=2, label="erf NTK (exact flow)")
    for w, rows in nv["runs"].items():
        for r in rows:
            if "contraction" in r:
                ax.plot(r["contraction"]["times"], r["contraction"]["g"], "--", lw=1,
                        label=f"erf net width {w} seed {r['seed']}")
    ax.axhline(c["g_inf"], color="grey", lw=0.8)
    ax.set(xlabel=f"time after switching on kappa/l^2 = {nv['contraction_kappa_over_l2']:g}",
           ylabel="u . grad f(x0)", title="erf: kernel vs finite nets")
    ax.legend(fontsize=6)


def _high_pass_figure(rep, hp, kx, xp):
    fig, ax = new_figure(2, 1, size=(5.0, 3.8))
    for name, st in (("isotropic", "o-"), ("along", "s-"), ("orthogonal", "^-")):
        ax[0, 0].semilogx(xp, hp[f"leff2_{name}"], st, ms=3, label=name)
        f = hp[f"fit_{name}"]
        if f.get("c") is not None:
            xs = xp[: f["n_points"]]
            ax[0, 0].semilogx(xs, f["intercept"] + f["c"] * kx[: f["n_points"]], ":",
                              label=f"fit {name}: c = {f['c']:.3g}")
    ax[0, 0].set(xlabel="kappa / l^2", ylabel="l_eff^2 / l^2 (peak curvature at zeta)",
                 title="the poison response widens")
    ax[0, 0].legend(fontsize=6)
    for name, st in (("along", "-"), ("orthogonal", "--")):
        P = hp["profiles"][name]
        for i in (0, len(kx) // 2, len(kx) - 1):
            ax[0, 1].plot(hp["profile_h_over_l"], P[i] / P[i][len(P[i]) // 2], st,
                          label=f"{name}, kappa/l^2 = {kx[i]:.2g}")
    ax[0, 1].set(xlabel="h / l (x = zeta + h e)", ylabel="Delta f / Delta f(zeta)",
                 title="response profiles")
    ax[0, 1].legend(fontsize=6)
    rep.figure(fig, "high_pass")


def _near_clone_figure(rep, nc, xp):
    fig, ax = new_figure(1, 1, size=(5.0, 3.8))
    for j, r in enumerate(nc["r_over_l"]):
        ax[0, 0].semilogx(xp, nc["relative"][:, j], "o-", ms=3, label=f"r/l = {r:g}")
    ax[0, 0].axhline(0.5, color="k", lw=0.5)
    ax[0, 0].set(xlabel="kappa / l^2", ylabel="Delta f(zeta + r e) / (kappa = 0 value)",
                 title="efficacy against kappa by distance to the poison")
    ax[0, 0].legend(fontsize=7)
    rep.figure(fig, "near_clones")


def _frontier_figure(rep, res, nv):
    fig, ax = new_figure(2, 1, size=(5.0, 3.8))
    curves = [("RBF, output penalty", res["frontier"])]
    for key, label in (("frontier_loss", "RBF, loss penalty"),
                       ("frontier_weak", "RBF, output penalty, weaker attack"),
                       ("frontier_augmented", "RBF, output penalty + jitter")):
        if key in res:
            curves.append((label, res[key]))
    for label, f in curves:
        ax[0, 0].plot(f["clean_acc"], f["asr"], "o-", ms=3, label=label)
        ax[0, 1].plot(f["clean_acc"], f["efficacy"], "o-", ms=3, label=label)
    if nv is not None:
        ax[0, 0].plot(nv["kernel"]["clean_acc"], nv["kernel"]["asr"], "s-", ms=3,
                      label="erf NTK at T")
        asr = _mean_runs(nv["runs"], "asr")
        for w, (ks, acc) in _mean_runs(nv["runs"], "clean_acc").items():
            ax[0, 0].plot(acc, asr[w][1], "x--", label=f"erf net {w}")
    ax[0, 0].set(xlabel="clean accuracy", ylabel="ASR", title="safety-efficacy frontier "
                 "(kappa sweeps along each curve)")
    ax[0, 1].set(xlabel="clean accuracy", ylabel="mean Delta f on triggered inputs",
                 title="the poison's efficacy")
    for a in ax[0]:
        a.legend(fontsize=6)
    rep.figure(fig, "frontier")


def _nets_figure(rep, nv):
    fig, ax = new_figure(1, 1, size=(5.0, 3.8))
    gaps = _mean_runs(nv["runs"], "gap")
    ws = sorted(gaps)
    ax[0, 0].loglog(ws, [gaps[w][1].mean() for w in ws], "o-", label="mean over kappa")
    ax[0, 0].loglog(ws, gaps[ws[0]][1].mean() * (np.asarray(ws) / ws[0]) ** -0.5, "k:",
                    label="width^-1/2")
    ax[0, 0].set(xlabel="width", ylabel="relative RMS gap net vs kernel_flow at T",
                 title="erf nets approach their NTK")
    ax[0, 0].legend(fontsize=7)
    rep.figure(fig, "nets")
