"""The defence experiment's claims and report text: verdicts and words that follow
the data (THEORY.md section 3)."""

from __future__ import annotations

import math

import numpy as np

from experiments.defence.filter import high_pass_claims

def mean_runs(runs, key):
    """Mean over seeds of a per-kappa list (runs may skip kappas: align on 'kappa')."""
    out = {}
    for w, rows in runs.items():
        ks = sorted({kk for r in rows for kk in r["kappa"]})
        vals = [[r[key][r["kappa"].index(kk)] for r in rows if kk in r["kappa"]] for kk in ks]
        out[w] = (np.asarray(ks), np.asarray([np.mean(v) for v in vals]))
    return out


def _fmt(x, p=3) -> str:
    return "never" if x is None else f"{x:.{p}g}"


def claims(rep, res, cfg):
    cap, hp, nc = res["capacity"], res["high_pass"], res["near_clones"]
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
    high_pass_claims(rep, res, cfg)        # experiments/defence/filter.py
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
    gaps = mean_runs(nv["runs"], "gap")
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
    res_n = mean_runs(nv["runs"], "residual")
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


def reading(res) -> str:
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


def setup_text(res, cfg) -> str:
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
