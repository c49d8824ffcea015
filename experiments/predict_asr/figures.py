"""The predict_asr experiment's figures: ASR against m per width, error against width."""

from __future__ import annotations

import numpy as np

from ntk_poison.report import new_figure


def asr_figure(rep, summary, ms, cfg):
    """Predicted (kernel flow) and trained ASR against m, one curve per width, with the
    trigger-alone ASR (m = 0 models) as dotted lines; clean accuracy beside."""
    fig, axes = new_figure(2, 1, size=(5.4, 3.9))
    x = np.asarray(ms, float)
    ax = axes[0, 0]
    ax.plot(x, summary["kernel_asr"], "k-o", lw=2, label="kernel flow (predicted)")
    ax.axhline(summary["kernel_trigger_alone"], color="k", ls=":", lw=1)
    for i, w in enumerate(cfg.widths):
        d = summary["widths"][str(w)]
        ax.errorbar(x, d["asr_mean"], yerr=d["asr_sd"], fmt="o--", ms=4, capsize=2,
                    color=f"C{i}", label=f"width {w} ({d['seeds']} seed(s))")
        ax.axhline(d["trigger_alone_asr_mean"][0], color=f"C{i}", ls=":", lw=1)
    ax.set(xlabel="poison count m", ylabel="ASR (dotted: trigger-alone)", ylim=(-0.02, 1.02),
           title=f"ASR at t = {cfg.time:g}: predicted vs trained")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    ax.plot(x, summary["kernel_clean_acc"], "k-o", lw=2, label="kernel flow")
    for i, w in enumerate(cfg.widths):
        d = summary["widths"][str(w)]
        ax.errorbar(x, d["clean_acc_mean"], yerr=d["clean_acc_sd"], fmt="o--", ms=4,
                    capsize=2, color=f"C{i}", label=f"width {w}")
    ax.set(xlabel="poison count m", ylabel="clean accuracy", title="clean accuracy")
    ax.legend(fontsize=7)
    rep.figure(fig, "asr_m")


def error_figure(rep, summary, ms, cfg):
    """The function-space error ||f_net - f_kernel|| / ||f_kernel|| against width
    (log-log), per m and its mean, with a width^-1/2 guide; and |ASR error| vs width."""
    fig, axes = new_figure(2, 1, size=(5.0, 3.9))
    ws = np.asarray(cfg.widths, float)
    ax = axes[0, 0]
    for j, m in enumerate(ms):
        e = [summary["widths"][str(w)]["rel_error_mean"][j] for w in cfg.widths]
        ax.loglog(ws, e, "o-", ms=3, lw=0.8, alpha=0.7, label=f"m = {m}")
    mean = np.asarray(summary["mean_rel_error"])
    ax.loglog(ws, mean, "k-s", lw=2, label=f"mean (slope {summary['error_slope']:.2f})")
    ax.loglog(ws, mean[0] * (ws / ws[0]) ** -0.5, "k:", label="width^-1/2 guide")
    ax.set(xlabel="width (channels)", ylabel="||f_net - f_kernel|| / ||f_kernel||",
           title="function-space error at the test inputs")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for j, m in enumerate(ms):
        e = [summary["widths"][str(w)]["asr_error"][j] for w in cfg.widths]
        ax.semilogx(ws, e, "o-", ms=3, label=f"m = {m}")
    ax.axhline(cfg.asr_tol, color="k", ls=":", lw=1, label=f"tolerance {cfg.asr_tol:g}")
    ax.set(xlabel="width (channels)", ylabel="|ASR_net - ASR_kernel|",
           title="ASR error against width")
    ax.legend(fontsize=7)
    rep.figure(fig, "error_width")
