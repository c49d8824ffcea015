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
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8,
                 label="ASR - trigger-alone ASR (deferred: noise accuracy lost)")
    return rep.figure(fig, "matrix_heatmap")
