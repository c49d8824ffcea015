"""The matrix's heatmap: attack effect per (attack, defence), one panel per regime."""

from __future__ import annotations

import numpy as np

from ntk_poison.report import new_figure

from experiments.matrix.claims import effect


def heatmap(rep, cfg) -> str:
    table = rep.results["table"]
    regimes = list(table)
    fig, axes = new_figure(len(regimes), 1, size=(1.0 + 1.1 * len(cfg.defences), 4.2))
    for ax, rname in zip(axes[0], regimes):
        rows = [a for a in table[rname] if a != "clean"]
        M = np.full((len(rows), len(cfg.defences)), np.nan)
        for i, a in enumerate(rows):
            for j, d in enumerate(cfg.defences):
                if d in table[rname][a]:
                    M[i, j] = effect(table[rname][a][d], a, table[rname]["clean"][d])
        im = ax.imshow(M, cmap="magma", vmin=0, vmax=1, aspect="auto")
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                if np.isfinite(M[i, j]):
                    ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if M[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(cfg.defences)), cfg.defences, rotation=40, ha="right",
                      fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(f"{rname} regime", fontsize=9)
    fig.colorbar(im, ax=axes[0][-1], shrink=0.8,
                 label="ASR - trigger-alone ASR (deferred: noise accuracy lost)")
    return rep.figure(fig, "matrix_heatmap")


def frontier(rep, cfg):
    """The attacker's frontier (kernel regime): efficacy (the mean target margin) and ASR
    at the optimised-on triggered points against the largest visibility there, per
    placement and m, with the detector's threshold."""
    meta = rep.results.get("optimal")
    if not meta:
        return None
    fr = meta["frontier"]
    fig, axes = new_figure(2, 1, size=(5.2, 4.0))
    for ax, key, label in ((axes[0][0], "efficacy", "mean target margin (efficacy)"),
                           (axes[0][1], "asr", "ASR at the triggered points")):
        for name, p in fr["placements"].items():
            style = "*-" if name.startswith("optimal") else "o--"
            ax.plot(p["visibility_max"], p[key], style, label=name, ms=7)
        ax.axvline(fr["threshold"], color="k", lw=0.8, ls=":", label="clean 95% quantile")
        ax.set_xscale("log")
        ax.set_xlabel("max top input-Hessian eigenvalue at the triggered points")
        ax.set_ylabel(label)
        ax.set_title(f"attacker's frontier, m in {list(fr['ms'])}", fontsize=9)
    axes[0][1].legend(fontsize=6, ncol=2)
    return rep.figure(fig, "frontier")
