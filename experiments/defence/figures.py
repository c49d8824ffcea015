"""The defence experiment's figures: capacity, contraction, the high-pass filter,
near clones, the frontier and the finite nets."""

from __future__ import annotations

import numpy as np

from ntk_poison.report import new_figure

from experiments.defence.claims import mean_runs
from experiments.defence.filter import gap_figure

def figures(rep, res, cfg):
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
        for w, (ks, v) in mean_runs(nv["runs"], "residual").items():
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
    ax[0, 0].semilogy(x, np.exp(-2 * x), "k--",
                      label="naive exp(-2 kappa a t) (a comparison, not a theorem)")
    ax[0, 0].set(xlabel="kappa a t", ylabel="E(t) / E(0)",
                 title="RBF: poison-aligned energy after the penalty is on")
    ax[0, 0].legend(fontsize=7)
    if nv is not None:
        _net_contraction_panel(ax[0, 1], nv)
    rep.figure(fig, "contraction")
    _high_pass_figure(rep, hp, kx, xp)
    gap_figure(rep, res)
    _near_clone_figure(rep, nc, xp)
    if "distance_sweep" in res:
        _distance_figure(rep, res["distance_sweep"], xp)
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
    a = ax[0, 0]
    a.semilogx(xp, nc["relative"], "o-", ms=3)
    a.legend([f"r/l = {r:g}" for r in nc["r_over_l"]], fontsize=7)
    a.axhline(0.5, color="k", lw=0.5)
    a.set(xlabel="kappa / l^2", ylabel="Delta f(zeta + r e) / (kappa = 0 value)",
          title="efficacy against kappa by distance to the poison")
    rep.figure(fig, "near_clones")


def _distance_figure(rep, ds, xp):
    """kappa_half against the poison's distance to the nearest clean point."""
    fig, ax = new_figure(2, 1, size=(5.0, 3.8))
    rel = np.asarray(ds["relative"])
    for j, d in enumerate(ds["distance_over_l"]):
        ax[0, 0].semilogx(xp, rel[:, j].mean(0), "o-", ms=3, label=f"D/l = {d:g}")
    ax[0, 0].axhline(0.5, color="k", lw=0.5)
    ax[0, 0].set(xlabel="kappa / l^2", ylabel="Delta f(zeta) / (kappa = 0 value)",
                 title="efficacy at zeta (mean over base images)")
    ax[0, 0].legend(fontsize=7)
    for b, row in enumerate(ds["kappa_half"]):
        kh = [np.nan if h is None else h for h in row]
        ax[0, 1].semilogy(ds["distance_over_l"], kh, "o-", ms=3, label=f"base image {b}")
    ax[0, 1].set(xlabel="distance from zeta to the nearest clean point / l",
                 ylabel="kappa_half / l^2 (missing: never)", title="which poisons it reaches")
    ax[0, 1].legend(fontsize=7)
    rep.figure(fig, "distance")


def _frontier_figure(rep, res, nv):
    fig, ax = new_figure(2, 1, size=(5.0, 3.8))
    curves = [("RBF, output penalty", res["frontier"])]
    for key, label in (("frontier_loss", "RBF, loss penalty"),
                       ("frontier_weak", "RBF, output penalty, weaker attack"),
                       ("frontier_augmented", "RBF, output penalty + jitter (Gaussian noise)"),
                       ("frontier_crop_flip", "RBF, output penalty + crop + flip"),
                       ("frontier_near_clean", "RBF, output penalty, near-clean-image poisons")):
        if key in res:
            curves.append((label, res[key]))
    for label, f in curves:
        ax[0, 0].plot(f["clean_acc"], f["asr"], "o-", ms=3, label=label)
    f = res["frontier"]
    ax[0, 0].plot(f["clean_acc_clean_model"], f["asr_clean_model"], "k:", lw=1,
                  label="trigger alone (clean model)")
    for label, f in curves:
        ax[0, 1].plot(f["clean_acc"], f["efficacy"], "o-", ms=3, label=label)
    if nv is not None:
        ax[0, 0].plot(nv["kernel"]["clean_acc"], nv["kernel"]["asr"], "s-", ms=3,
                      label="erf NTK at T")
        asr = mean_runs(nv["runs"], "asr")
        for w, (ks, acc) in mean_runs(nv["runs"], "clean_acc").items():
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
    gaps = mean_runs(nv["runs"], "gap")
    ws = sorted(gaps)
    ax[0, 0].loglog(ws, [gaps[w][1].mean() for w in ws], "o-", label="mean over kappa")
    ax[0, 0].loglog(ws, gaps[ws[0]][1].mean() * (np.asarray(ws) / ws[0]) ** -0.5, "k:",
                    label="width^-1/2")
    ax[0, 0].set(xlabel="width", ylabel="relative RMS gap net vs kernel_flow at T",
                 title="erf nets approach their NTK")
    ax[0, 0].legend(fontsize=7)
    rep.figure(fig, "nets")
