"""The lag experiment's figures: curves against m and t, and visibility at x0."""

from __future__ import annotations

import numpy as np

from ntk_poison.report import new_figure

from experiments.lag.claims import CURVES

def lag_figure(rep, res, axis, fname):
    names = list(res)
    fig, axes = new_figure(2, len(names), size=(5.6, 3.8))
    key = "m_sweep" if axis == "m" else "t_sweep"
    for row, name in enumerate(names):
        s, c = res[name][key], res[name][f"cross_{axis}"]
        xs = np.asarray(s["ms"] if axis == "m" else s["times"], float)
        xp = np.where(xs > 0, xs, 0.5 * xs[xs > 0].min())
        ax = axes[row, 0]
        for (k_, lab), col in zip(CURVES, ("C0", "C1", "C2", "C3", "C4", "C5")):
            v = np.asarray(s[k_], float)
            lo, hi = np.nanmin(v), np.nanmax(v)
            ax.semilogx(xp, (v - lo) / (hi - lo) if hi > lo else 0 * v, "o-", ms=3,
                        color=col, label=f"{lab} [{lo:.2g}, {hi:.2g}]")
            if c[k_] is not None:
                ax.axvline(max(c[k_], xp.min()), color=col, ls=":", lw=1)
        ax.axhline(0.5, color="k", lw=0.5)
        ax.set_xlabel("m (m=0 drawn at 0.5)" if axis == "m" else
                      f"training time t (m = {s['m']})")
        ax.set_ylabel("fraction of range")
        ax.set_title(f"{name}: curves scaled to their range; dotted = half-range")
        ax.legend(fontsize=7, loc="upper left")
        ax = axes[row, 1]
        ax.semilogx(xp, s["asr"], "o-", ms=3, label="ASR")
        ax.semilogx(xp, s["auroc"], "s-", ms=3, label="curvature AUROC")
        ax.semilogx(xp, s["tpr"], "^-", ms=3, label=f"detector TPR @ {rep.config.fpr:g} FPR")
        ax.semilogx(xp, s["clean_acc"], "--", label="clean accuracy")
        ax.semilogx(xp, s["align_x0_zeta"], "x-", ms=3, label="cos^2(v1(x0), x0-zeta)")
        ax.semilogx(xp, s["align_trigger"], "+-", ms=4, label="cos^2(v1(x0), trigger)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(axes[row, 0].get_xlabel())
        ax.set_title(f"{name}: raw values")
        ax.legend(fontsize=7)
    rep.figure(fig, fname)


def threshold_figure(rep, res, axis, fname):
    names = list(res)
    fig, axes = new_figure(len(names), 1, size=(5.6, 4.0))
    key = "m_sweep" if axis == "m" else "t_sweep"
    for ax, name in zip(axes[0], names):
        s, v = res[name][key], res[name][f"visibility_{axis}"]
        xs = np.asarray(s["ms"] if axis == "m" else s["times"], float)
        xp = np.where(xs > 0, xs, 0.5 * xs[xs > 0].min())
        R_k = s["R_k"]
        ax.loglog(xp, np.abs(s["lambda_x0"]), "o-", ms=3, label="top eig at x0 (poisoned)")
        ax.loglog(xp, np.abs(s["lambda_clean_x0"]), "s--", ms=3, label="Lambda_clean(x0)")
        ax.loglog(xp, np.asarray(s["spike_x0"]), "^-", ms=3,
                  label="poison GN spike |grad Delta f|^2")
        ax.loglog(xp, R_k * np.asarray(s["delta_f_x0"]) ** 2, "k:",
                  label=f"R_k Delta f^2 (R_k = {R_k:.3g})")
        if v["x_pred"] is not None:
            ax.axvline(v["x_pred"], color="C2", ls="--", lw=1,
                       label=f"predicted: Delta f^2 = Lambda_clean/R_k ({axis}={v['x_pred']:.3g})")
        if v["x_meas"] is not None:
            ax.axvline(v["x_meas"], color="C3", ls="-", lw=1,
                       label=f"measured: eig = 2 Lambda_clean ({axis}={v['x_meas']:.3g})")
        ax.set_xlabel("m (m=0 drawn at 0.5)" if axis == "m" else
                      f"training time t (m = {s['m']})")
        ax.set_ylabel("loss-Hessian eigenvalue at x0")
        ax.set_title(f"{name}: visibility at x0")
        ax.legend(fontsize=7)
    rep.figure(fig, fname)
