"""The linear experiment's figures: ASR and overlap against the epoch, and the
triggered/clean top-eigenvalue ratio against the epoch."""

from __future__ import annotations

import numpy as np

from ntk_poison.report import new_figure


def lag_figure(rep, res, counts, cfg):
    kinds = list(res)
    fig, axes = new_figure(len(counts), len(kinds), size=(3.6, 3.0))
    ep = np.asarray(rep.results["epochs"], float)
    d = rep.results["d"]
    for row, kind in enumerate(kinds):
        for col, m in enumerate(counts):
            s, cr = res[kind]["runs"][str(m)], res[kind]["crossings"][str(m)]
            ax = axes[row, col]
            ax.plot(ep[1:], s["asr"][1:], "C0o-", ms=1.5, lw=0.8, label="ASR")
            ax.plot(ep[1:], s["trigger_alone_asr"][1:], "C0:", label="trigger-alone ASR")
            ax.plot(ep[1:], s["clean_acc"][1:], "-", color="0.5", label="clean accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xscale("log")
            ax.set_xlabel("epoch (log scale, after the initial model)")
            ax.set_title(f"{kind}, m = {m}", fontsize=9)
            ax2 = ax.twinx()
            ax2.plot(ep[1:], s["overlap"][1:], "C3s-", ms=1.5, lw=0.8,
                     label="cos^2(v1, trigger)")
            ax2.plot(ep[1:], s["overlap_clean_model"][1:], "C3:", label="cos^2, clean run")
            ax2.axhline(1.0 / d, color="C3", lw=0.5, ls="--", label="1/d")
            ax2.set_ylim(0, max(1.05 * float(np.max(s["overlap"][1:])), 2.0 / d))
            ax2.tick_params(axis="y", colors="C3", labelsize=7)
            for key, color in (("asr", "C0"), ("overlap", "C3")):
                if cr[key] is not None and cr[f"{key}_rises"]:
                    ax.axvline(cr[key], color=color, ls="--", lw=0.8)
            if row == 0 and col == 0:
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = ax2.get_legend_handles_labels()
                ax2.legend(h1 + h2, l1 + l2, fontsize=6, loc="center", framealpha=0.8)
    fig.suptitle("ASR (left axis) and overlap (right axis, red) vs epoch; dashed "
                 "verticals: half-range crossings (after the initial model) of the curves that "
                 "rise", fontsize=9)
    rep.figure(fig, "linear_lag")


def eigen_figure(rep, res, counts, cfg):
    kinds = list(res)
    fig, axes = new_figure(2, len(kinds), size=(4.6, 3.2))
    ep = np.asarray(rep.results["epochs"], float)
    for row, kind in enumerate(kinds):
        runs = res[kind]["runs"]
        for i, m in enumerate([0] + list(counts)):
            s = runs[str(m)]
            lab = "clean run" if m == 0 else f"m = {m}"
            axes[row, 0].plot(ep, s["ratio"], "o-", ms=2, color=f"C{i}", label=lab)
            axes[row, 1].semilogy(ep[1:], np.maximum(s["lam_trig"][1:], 1e-30), "o-", ms=2,
                                  color=f"C{i}", label=f"{lab}, triggered")
            axes[row, 1].semilogy(ep[1:], np.maximum(s["lam_clean"][1:], 1e-30), ":",
                                  color=f"C{i}")
        axes[row, 0].axhline(1.0, color="k", lw=0.5)
        axes[row, 0].set_title(f"{kind}: mean top eigenvalue, triggered / clean", fontsize=9)
        axes[row, 1].set_title(f"{kind}: mean top eigenvalue (dotted: clean inputs)",
                               fontsize=9)
        for ax in axes[row]:
            ax.set_xlabel("epoch")
            ax.legend(fontsize=6)
    rep.figure(fig, "linear_eigs")
