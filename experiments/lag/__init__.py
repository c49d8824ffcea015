"""The detectability lag (THEORY.md section 2): attack success comes before visibility.

A cluster of m dirty-label clones at zeta (the triggered prototype of the non-target
training images, ``attacks.prototype_poison``) raises f at triggered inputs x0 by
``Delta f(x0)`` and adds a Gauss-Newton spike ``R_k Delta f^2`` to the loss's input
Hessian at x0. THEORY.md says a spectral detector sees the spike only once it is above
the clean curvature, ``Delta f^2 >~ Lambda_clean(x0) / R_k``, so that attack success
rate (ASR) rises BEFORE visibility, in m and in training time t.

For each kernel this measures, against m (0 .. m_max on a log grid, KRR at t = inf):

* ASR on triggered non-target test points and ``Delta f(x0)`` (the exact rank-one
  law, ``theory.clone_law``, checked against the refits);
* the curvature detector (``defences.CurvatureDetector``: top loss-Hessian eigenvalue,
  threshold from clean held-out inputs at the target FPR) on each REFITTED poisoned
  model: its AUROC (triggered vs clean test inputs) and its TPR at that threshold;
* at x0: the ratio of the top eigenvalue under the poisoned model to that under the
  clean model, and the squared cosine of the top eigenvector with the trigger
  direction and with ``x0 - zeta``;

then the same against training time t at a fixed m, with the finite-time kernel
predictor of MSE gradient flow. Each curve is marked where it crosses half its range,
and the measured visibility threshold is set beside THEORY.md's prediction
``theory.visibility_threshold(Lambda_clean, R_k)``.

Eigenvalues come from block Lanczos on Hessian-vector products (``method="lanczos"``
of the detector: ~20 ms a point at d = 784, against 1-2 s for a dense 784 x 784
Hessian and ``eigh`` on this machine); the dense solver checks the Lanczos values at x0.

Kernels: RBF and the FC NTK (``nt_fc``) on flat inputs, and the CNN NTK (``nt_cnn``)
on its own small subset of images (``cnn_n_train`` points mean-pooled by ``cnn_pool``,
as ``(n, H, W, 1)`` arrays: kernels, detector and spectra take image-shaped inputs;
eigenvectors are over the flattened image). Each kernel's trigger strength and l come
from its own subset. A smoothness check (the clean top eigenvalue at x0 + delta l u
against x0) says whether the input Hessian at x0 is defined at all: the ReLU CNN NTK
has kinks wherever a filter-sized patch of the input is blank or parallel to the same
patch of a training image, which MNIST's background makes ubiquitous.

Two shortcuts keep every model the same shape (so the compiled Hessian-vector
products are reused): the m identical clone rows of a refit are merged into one row
of ``[X; zeta]`` carrying the sum of their dual weights (the same function,
``krr.fit_clones``), and the clean model is the same row set with weight 0 on zeta
(``krr.fit_clean``).

The flow. ``flow.kernel_flow`` at kappa = 0 (plain MSE gradient flow; it needs only
the n x n Gram)::

    alpha(t) = Q diag((1 - exp(-e t / n)) / e) Q^T y,   K + n lam I = Q diag(e) Q^T

Time is in units of learning rate 1 on ``(1/2n) sum (f - y)^2 + (lam/2)||f||^2``.
The clean comparison flows on the clean points with the same absolute ridge n lam
and the same 1/n (``flow.flow_pair``), so both reach the KRR models of the m-sweep as
t -> inf.

All-to-one mode (``--set target_mode=all_to_one``, :class:`scenario.TargetPart`):
multi-output KRR on centred one-hot targets over all classes, the clones labelled with
``target_class``'s row, ASR = argmax = target on triggered inputs of the other classes;
Delta f is then ``||Delta f||`` over outputs (the poison's spike is
``R_k ||Delta f||^2``: every output's gradient moves along ``grad_x kt(x0, zeta)``).
Every ASR comes with the trigger-alone ASR (the clean model's at the same inputs).

Run: ``ntk-poison run lag --out results/lag``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Tuple

import numpy as np

from ntk_poison import flow, io, krr, metrics, scenario, spectra, theory
from ntk_poison.defences.curvature import smoothness_statement, smoothness_text
from ntk_poison.report import Report, progress, x64_run

from experiments.lag import figures
from experiments.lag.claims import CURVES, agreement, claims, discussion

NAME = "lag"


@dataclasses.dataclass(frozen=True)
class Config(scenario.DataPart, scenario.AttackPart, scenario.TargetPart,
             scenario.KernelPart, scenario.ImagePart, scenario.DetectorPart):
    """Configuration of the lag experiment (validated; saved in results.json).

    The shared parts (data, attack, kernels, image subset, detector) are
    :mod:`ntk_poison.scenario`'s. The CNN NTK's Hessian-vector products are costly:
    at 14x14 and n = 150 it alone took ~3.5 CPU-minutes here, hence ``cnn_pool = 4``.
    """

    kernels: Tuple[str, ...] = ("rbf", "nt_fc", "nt_cnn")
    trigger_strength: float = 3.0  # cross trigger norm in units of l (x0 far from the data:
                                   # where the spike can exceed x0's clean curvature)
    m_max: int = 200
    n_m: int = 10                  # clone counts on a log grid 1 .. m_max, plus 0
    flow_m: int = 50               # the fixed m of the training-time sweep
    t_min: float = 1e-2            # flow times (learning-rate-1 units), log grid
    t_max: float = 1e4
    n_t: int = 8
    dense_check: bool = True       # dense eigh at x0 for the first and last m
    visibility_factor: float = 3.0  # the claim's tolerance on Delta f^2 (measured/predicted)

    def validate(self) -> None:
        super().validate()
        self.check_min(1, "m_max", "n_m", "n_t")
        self.check_min(0, "flow_m")
        if not 0 < self.t_min < self.t_max:
            raise ValueError("need 0 < `t_min` < `t_max`.")
        self.check_min(1, "visibility_factor")


# --------------------------------------------------------------------------- sweeps

def _collect(rows, d_trig, d_zeta) -> dict:
    """The per-model detector results of a sweep as arrays, with the top eigenvalue at x0
    against the clean model's, and cos^2 of the top eigenvector at x0 with the trigger
    and with x0 - zeta."""
    out = {key: np.asarray([r[key] for r in rows])
           for key in ("auroc", "tpr", "threshold", "lambda_clean_x0", "gn_x0", "gn_clean_x0",
                       "spike_x0")}
    out["lambda_x0"] = np.asarray([r["extra_vals"][0] for r in rows])
    out["ratio"] = out["lambda_x0"] / out["lambda_clean_x0"]
    for name, d in (("align_trigger", d_trig), ("align_x0_zeta", d_zeta)):
        out[name] = np.asarray([float(spectra.alignment(r["extra_vecs"][0], d)) for r in rows])
    out["scores_trig"] = np.stack([r["scores_trig"] for r in rows])
    out["scores_clean"] = np.stack([r["scores_clean"] for r in rows])
    out["lanczos_converged"] = float(np.mean([r["lanczos_converged"] for r in rows]))
    out["convergence_warnings"] = int(sum(r["convergence_warnings"] for r in rows))
    return out


def _sweep_m(k, Kb, name, sc, splits, X, y, zeta, cfg, lam, ms, det):
    import jax.numpy as jnp
    x0, x_trig_asr = sc.x0, sc.X_trig[:cfg.n_trigger]
    N = len(X)
    pts = np.concatenate([x0[None], splits.x_trig, x_trig_asr, sc.X_test])
    law = theory.clone_law(k, X, y, lam, zeta, sc.y_target, ms, pts)
    fp = np.asarray(law.f_poisoned)
    df = np.asarray(law.delta_f)
    ne, na = len(splits.x_trig), len(x_trig_asr)
    asr = sc.attack_success_rate(fp[:, 1 + ne:1 + ne + na])
    acc = sc.clean_accuracy(fp[:, 1 + ne + na:])
    R_k = float(theory.spike_factor(k, x0, zeta))
    R_eval = np.asarray([float(theory.spike_factor(k, xj, zeta)) for xj in splits.x_trig])
    out = dict(ms=ms, asr=asr, clean_acc=acc, delta_f_x0=sc.effect(df[:, 0]), f_x0=fp[:, 0],
               delta_f_eval=sc.effect(df[:, 1:1 + ne]), R_k=R_k, R_k_eval=R_eval,
               k0=float(np.asarray(law.k0)[0]), k_zz=float(np.asarray(law.k_zz)),
               # how local the attack is: |Delta f| at triggered vs at clean test inputs
               abs_df_trig_median=np.median(np.abs(sc.effect(df[:, 1 + ne:1 + ne + na])),
                                            axis=1),
               abs_df_clean_median=np.median(np.abs(sc.effect(df[:, 1 + ne + na:])), axis=1),
               # the clean model (same absolute ridge) at the same triggered inputs
               trigger_alone_asr=sc.attack_success_rate(
                   np.asarray(law.f_clean)[:, 1 + ne:1 + ne + na]))
    if sc.multiclass:
        out["delta_f_x0_vec"] = df[:, 0]
    x0c = sc.x0_clean
    rows = []
    refit_f = []
    for m in progress(ms, f"{name}: m sweep"):
        model = krr.fit_clones(k, Kb, X, y, zeta, sc.y_target, int(m), lam)
        clean = krr.fit_clean(k, Kb, X, y, zeta, lam * (N + int(m)), lam)
        s = det.assess(model, splits.x_cal, splits.x_trig, splits.x_clean,
                       extra=np.stack([x0, x0c]))
        # the clean model's curvature at x0 (same absolute ridge)
        s["lambda_clean_x0"] = det.top_eigenvalue(clean, x0)
        s.update(spectra.poison_spike(model, clean, x0))
        refit_f.append(np.asarray(model.predict(x0[None])[0])
                       - np.asarray(clean.predict(x0[None])[0]))
        rows.append(s)
    out["refit_delta_f_x0"] = sc.effect(np.asarray(refit_f))
    if sc.multiclass:
        out["refit_delta_f_x0_vec"] = np.asarray(refit_f)
    out.update(_collect(rows, sc.trigger_direction, x0 - zeta))
    out["lambda_x0_clean_input"] = np.asarray([r["extra_vals"][1] for r in rows])
    if cfg.dense_check:
        checks = []
        for i in (0, len(ms) - 1):
            model = krr.fit_clones(k, Kb, X, y, zeta, sc.y_target, int(ms[i]), lam)
            lab = rows[i]["extra_labels"][0]
            lab = lab if np.ndim(lab) else float(lab)
            v, _ = spectra.top_eigenpairs(spectra.loss_fn(model, lab), jnp.asarray(x0), k=1,
                                          method="dense")
            checks.append(dict(m=int(ms[i]), dense=float(v[0]),
                               lanczos=float(out["lambda_x0"][i])))
        out["dense_check"] = checks
    return out


def _sweep_t(k, Kb, name, sc, splits, X, y, zeta, cfg, lam, times, det):
    import jax.numpy as jnp
    x0, x_trig_asr = sc.x0, sc.X_trig[:cfg.n_trigger]
    N, m = len(X), scenario.clone_count(cfg, cfg.flow_m, sc.images)
    art = sc.clone_attack(m, sc.y_target, cfg.seed)
    Xp, yp = art.x, art.y
    ap, ac = flow.flow_pair(k, X, y, Xp, yp, lam, times)       # (T, n), (T, N)
    pts = np.concatenate([x0[None], x_trig_asr, sc.X_test])
    idx = np.r_[np.arange(N), np.full(m, N)]
    kx = np.asarray(k(jnp.asarray(pts), jnp.asarray(np.concatenate([X, zeta[None]]))))[:, idx]
    if sc.multiclass:                                        # (T, n, C) dual weights
        fp, fc = np.einsum("tnc,pn->tpc", ap, kx), np.einsum("tnc,pn->tpc", ac, kx[:, :N])
    else:
        fp = ap @ kx.T
        fc = ac @ kx[:, :N].T
    na = len(x_trig_asr)
    asr = sc.attack_success_rate(fp[:, 1:1 + na])
    acc = sc.clean_accuracy(fp[:, 1 + na:])
    # t -> inf limit: the refitted KRR model of the m sweep
    krr_f = np.asarray(krr.fit(k, Xp, yp, lam).predict(x0[None])[0])
    out = dict(times=np.asarray(times), m=m, asr=asr, clean_acc=acc,
               delta_f_x0=sc.effect(fp[:, 0] - fc[:, 0]), f_x0=fp[:, 0],
               krr_limit_error=float(np.max(np.abs(fp[-1, 0] - krr_f))),
               R_k=float(theory.spike_factor(k, x0, zeta)),
               trigger_alone_asr=sc.attack_success_rate(fc[:, 1:1 + na]))
    rows = []
    for i in progress(range(len(times)), f"{name}: t sweep"):
        w = ap[i, N:].sum(0) if sc.multiclass else ap[i, N:].sum()
        model = krr.clone_model(k, X, ap[i, :N], w, zeta, lam)
        clean = krr.clone_model(k, X, ac[i], 0.0, zeta, lam)
        s = det.assess(model, splits.x_cal, splits.x_trig, splits.x_clean, extra=x0[None])
        s["lambda_clean_x0"] = det.top_eigenvalue(clean, x0)
        s.update(spectra.poison_spike(model, clean, x0))
        rows.append(s)
    out.update(_collect(rows, sc.trigger_direction, x0 - zeta))
    return out


# --------------------------------------------------------------------------- analysis

def _crossings(xs, s) -> dict:
    s["log_ratio"] = np.log10(np.maximum(s["ratio"], 1e-300))
    return {key: metrics.half_crossing(xs, s[key]) for key, _ in CURVES}


def _visibility(xs, s, R_k) -> dict:
    """Predicted (THEORY) vs measured visibility at x0.

    Predicted: the first x where Delta f(x0)^2 >= Lambda_clean(x0) / R_k, with
    Lambda_clean(x0) the clean model's top eigenvalue at x0 at that x. Measured: the
    first x where the poisoned top eigenvalue reaches twice the clean one (the spike
    equals the clean curvature). GN: the first x where the poison's own Gauss-Newton
    spike ||grad f_p - grad f_c||^2 at x0 reaches Lambda_clean(x0) (a check of R_k).
    """
    df2 = np.asarray(s["delta_f_x0"]) ** 2
    lam_c = np.asarray(s["lambda_clean_x0"])
    thr = np.asarray(theory.visibility_threshold(np.maximum(lam_c, 0), R_k)) ** 2
    x_pred = metrics.first_crossing(xs, df2 / np.maximum(thr, 1e-300), 1.0)
    x_meas = metrics.first_crossing(xs, s["ratio"], 2.0)
    x_gn = metrics.first_crossing(xs, np.asarray(s["spike_x0"]) / np.maximum(lam_c, 1e-300), 1.0)
    out = dict(x_pred=x_pred, x_meas=x_meas, x_gn=x_gn, threshold_df2=thr)
    if x_pred is not None and x_gn is not None:
        out["df2_gn"] = metrics.interp_at(xs, df2, x_gn)
        out["factor_gn"] = out["df2_gn"] / metrics.interp_at(xs, df2, x_pred)
    if x_pred is not None and x_meas is not None:
        out["df2_pred"] = metrics.interp_at(xs, df2, x_pred)
        out["df2_meas"] = metrics.interp_at(xs, df2, x_meas)
        out["factor"] = out["df2_meas"] / out["df2_pred"]
        # the threshold itself at the measured point (Lambda_clean changes with x)
        out["threshold_at_meas"] = metrics.interp_at(xs, thr, x_meas)
        out["factor_vs_threshold"] = out["df2_meas"] / out["threshold_at_meas"]
    ratio = np.asarray(s["ratio"])
    if np.any(ratio >= 2):
        # at the first grid point where the poisoned top eigenvalue is >= 2x the clean
        # one: how much of its excess over the clean value the GN spike explains
        i = int(np.argmax(ratio >= 2))
        excess = float(s["lambda_x0"][i] - s["lambda_clean_x0"][i])
        out["excess_at_visible"] = excess
        out["spike_at_visible"] = float(s["spike_x0"][i])
        out["x_at_visible"] = float(xs[i])
    return out


# --------------------------------------------------------------------------- entry point

@x64_run
def run(cfg: Config, out_dir: str | Path, fresh: bool = False) -> Report:
    """Run the lag experiment; write results.json, figures and report.md into out_dir.
    Each kernel is a cell of an :class:`io.Sweep` (``out_dir/cells``): a rerun of the
    same config resumes; ``fresh`` starts over.

    JAX's x64 switch is ``cfg.x64`` for the run and restored afterwards."""
    import jax
    sweep = io.Sweep(out_dir, cfg, fresh=fresh)
    rep = Report(f"ntk-poison lag: attack success before visibility ({cfg.dataset.upper()})",
                 out_dir, cfg)
    rep.started = sweep.started
    times = np.geomspace(cfg.t_min, cfg.t_max, cfg.n_t)

    def kernel_cell(name, sc, splits):
        tk = time.time()
        art = sc.clone_attack(scenario.clone_count(cfg, cfg.m_max, sc.images), sc.y_target,
                              cfg.seed)
        m_max = art.n_poison
        ms = np.unique(np.concatenate([[0], np.round(np.geomspace(1, m_max, cfg.n_m))])
                       ).astype(np.int64)
        (X, y), zeta, ell = art.clean(), art.poisons()[0][0], sc.length_scale
        det = scenario.detector_for(cfg, sc.trigger_direction)
        k = scenario.kernel_for(name, cfg, ell)
        k_zz = float(k.diag(jax.numpy.asarray(zeta[None]))[0])
        lam = cfg.ridge * k_zz
        Kb = krr.clone_gram(k, X, zeta)
        clean0 = krr.fit_clean(k, Kb, X, y, zeta, lam * len(X), lam)
        smooth = det.smoothness(clean0, sc.x0, ell, cfg.smooth_deltas, cfg.seed)
        sm = _sweep_m(k, Kb, name, sc, splits, X, y, zeta, cfg, lam, ms, det)
        t1 = time.time()
        st = _sweep_t(k, Kb, name, sc, splits, X, y, zeta, cfg, lam, times, det)
        t2 = time.time()
        cm, ct = _crossings(ms, sm), _crossings(times, st)
        vm, vt = _visibility(ms, sm, sm["R_k"]), _visibility(times, st, st["R_k"])
        return dict(kernel=repr(k), lam=lam, k_zz=k_zz, m_sweep=sm, t_sweep=st,
                    cross_m=cm, cross_t=ct, visibility_m=vm, visibility_t=vt,
                    r_x0_zeta_over_l=float(np.linalg.norm(sc.x0 - zeta) / ell),
                    data=sc.info(), smoothness=smooth,
                    seconds=dict(m_sweep=t1 - tk, t_sweep=t2 - t1))

    built, res = {}, {}
    for name in progress(cfg.kernels, "kernels"):
        sc, splits = scenario.for_kernel(built, cfg, name)    # data: cached, deterministic
        res[name] = r = sweep.cell(f"kernel_{name}", lambda: kernel_cell(name, sc, splits))
        sm, st, cm, ct, vm, vt, smooth = (r[k] for k in (
            "m_sweep", "t_sweep", "cross_m", "cross_t", "visibility_m", "visibility_t",
            "smoothness"))
        rep.claim(f"{name}: input Hessian defined at x0", smoothness_statement(
            "x0", smooth["deltas"]), smooth["smooth"], smoothness_text(name, smooth, "x0"),
                  ["lag_m.png"])
        claims(rep, name, sm, st, cm, ct, vm, vt, cfg)
    figures.lag_figure(rep, res, "m", "lag_m")
    figures.threshold_figure(rep, res, "m", "threshold_m")
    figures.lag_figure(rep, res, "t", "lag_t")
    figures.threshold_figure(rep, res, "t", "threshold_t")
    ell = scenario.flat_length_scale(built)
    total = sweep.seconds()                       # the cells' stored times
    rep.results = dict(length_scale=ell, kernels=res, seconds=total,
                       x0="the first triggered non-target test point",
                       flow="flow.kernel_flow at kappa = 0 (closed form; module docstring)")
    rep.text(discussion(res, cfg, ell, total))
    rep.text(agreement(res, cfg))
    rep.write()
    return rep
