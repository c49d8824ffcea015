"""The backdoor_nets figures: curves per epoch, the frontier, overlap against ASR, and the
feature PCA."""

from __future__ import annotations

import numpy as np

from ntk_poison import monitor
from ntk_poison.report import new_figure

from experiments.backdoor_nets.claims import baseline, frontier


def _vals(h, key):
    return np.array([np.nan if v is None else v for v in h[key]], float)


def curves_figure(rep, cfg):
    """ASR (solid) and clean accuracy (dashed) against the epoch, per arm, long runs."""
    res, long_ = rep.results, str(cfg.epochs[1])
    fig, axes = new_figure(len(cfg.triggers), 1, size=(4.6, 3.8))
    for ax, t in zip(axes[0], cfg.triggers):
        for i, arm in enumerate(cfg.arms):
            h = res["runs"][t][long_][arm]
            ax.plot(h["epoch"], _vals(h, f"asr_{t}"), "o-", ms=3, color=f"C{i}", label=arm)
            ax.plot(h["epoch"], _vals(h, "clean_acc"), "--", color=f"C{i}")
            ax.axhline(baseline(res, t, arm), color=f"C{i}", lw=0.6, ls=":")
        if "overlap_mean" in res["runs"][t][long_]["none"]:
            h = res["runs"][t][long_]["none"]
            ov = _vals(h, "overlap_mean")
            ax.plot(h["epoch"], ov / max(np.nanmax(ov), 1e-300), "k^-", ms=3,
                    label=f"cos^2 (none) / {np.nanmax(ov):.2g}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("epoch")
        ax.set_title(f"{t}: ASR (solid), clean acc (dashed), trigger alone (dotted)",
                     fontsize=8)
        ax.legend(fontsize=6)
    rep.figure(fig, "curves.png")


def frontier_figure(rep, cfg):
    """Clean accuracy against ASR over kappa (augmented arms), at both lengths."""
    fig, axes = new_figure(len(cfg.triggers), 1, size=(4.2, 3.8))
    for ax, t in zip(axes[0], cfg.triggers):
        for j, e in enumerate(cfg.epochs):
            pts = sorted(frontier(rep.results, cfg, t, e), key=lambda p: p["kappa"])
            ax.plot([p["asr"] for p in pts], [p["clean_acc"] for p in pts], "o-" if j else
                    "s--", label=f"{e} epochs")
            for p in pts:
                ax.annotate(f"{p['kappa']:g}", (p["asr"], p["clean_acc"]), fontsize=6)
        if pts:
            ax.axvline(pts[0]["trigger_alone"], color="k", lw=0.6, ls=":",
                       label="trigger alone (aug)")
        ax.set_xlabel("ASR")
        ax.set_ylabel("clean accuracy")
        ax.set_title(f"{t}: frontier over kappa (labels)", fontsize=8)
        ax.legend(fontsize=6)
    rep.figure(fig, "frontier.png")


def overlap_figure(rep, cfg):
    """cos^2(top eigenvector, x_trig - x) against ASR over the epochs of the probed arms."""
    res, long_ = rep.results, str(cfg.epochs[1])
    fig, axes = new_figure(len(cfg.triggers), 1, size=(4.2, 3.8))
    for ax, t in zip(axes[0], cfg.triggers):
        for i, arm in enumerate(cfg.probe_arms):
            h = res["runs"][t][long_][arm]
            ax.plot(_vals(h, f"asr_{t}"), _vals(h, "overlap_mean"), "o-", ms=3,
                    color=f"C{i}", label=arm)
        hc = res["clean"]["none"]
        ax.plot(_vals(hc, f"asr_{t}"), _vals(hc, f"{t}_overlap_mean"), "x:", color="gray",
                label="clean model")
        ax.axhline(res["random_overlap"], color="k", lw=0.6, ls=":", label="1/d")
        ax.set_yscale("log")
        ax.set_xlabel("ASR")
        ax.set_ylabel("mean cos^2(v1, x_trig - x)")
        ax.set_title(f"{t}: overlap against ASR (epochs along each line)", fontsize=8)
        ax.legend(fontsize=6)
    rep.figure(fig, "overlap.png")


def feature_figure(rep, cfg):
    """PCA of penultimate features (:func:`ntk_poison.monitor.feature_pca_plot`): clean
    (by class), poisons, triggered test inputs (at most 200 drawn)."""
    fig, axes = new_figure(len(cfg.triggers), 1, size=(4.2, 3.8))
    for ax, t in zip(axes[0], cfg.triggers):
        monitor.feature_pca_plot(rep.results["collapse"][t], ax, max_trig=200)
        ax.set_title(f"{t}: " + ax.get_title(), fontsize=7)
    rep.figure(fig, "features.png")
