"""The lag experiment's claims and report text: verdicts and words that follow the data.

``claims`` judges each claim of THEORY.md section 2 for one kernel; ``agreement``
and ``discussion`` write the data-driven sections of report.md.
"""

from __future__ import annotations

import numpy as np

from ntk_poison import scenario
from ntk_poison.defences.curvature import smoothness_text

CURVES = (("asr", "ASR"), ("auroc", "curvature AUROC"), ("tpr", "detector TPR"),
           ("log_ratio", "log top-eig ratio at x0"), ("align_x0_zeta", "cos^2(v1, x0-zeta)"),
           ("align_trigger", "cos^2(v1, trigger)"))


def fmt(x) -> str:
    return "never" if x is None else f"{x:.3g}"


def claims(rep, name, sm, st, cm, ct, vm, vt, cfg):
    # 1. exactness of the m-sweep bookkeeping: the rank-one law vs refits
    v = "_vec" if "delta_f_x0_vec" in sm else ""       # all-to-one: every output
    err = float(np.max(np.abs(sm["refit_delta_f_x0" + v] - sm["delta_f_x0" + v])))
    rep.claim(f"{name}: refits match the law",
              "The merged refitted models reproduce the exact rank-one law at x0.",
              err <= 1e-7 * max(1.0, float(np.max(np.abs(sm["delta_f_x0"])))),
              f"max |Delta f_refit - Delta f_law| at x0 = {err:.2e}; the flow at "
              f"t = {cfg.t_max:g} differs from the KRR refit at x0 by "
              f"{st['krr_limit_error']:.2e}." + (
                  " Dense eigh vs Lanczos at x0: " + "; ".join(
                      f"m={c['m']}: {c['dense']:.6g} vs {c['lanczos']:.6g}"
                      for c in sm["dense_check"]) if "dense_check" in sm else ""),
              ["lag_m.png"])
    # 2. the lag in m and in t
    for axis, c, s, unit in (("m", cm, sm, "m"), ("t", ct, st, "t")):
        ok, ev = lag_verdict(c, s, unit)
        rep.claim(f"{name}: lag in {axis}",
                  f"ASR crosses half its range before visibility does (in {unit}): before "
                  "each visibility measure that rises (curvature AUROC, top-eigenvalue ratio "
                  "at x0, cos^2 of the top eigenvector at x0 with x0 - zeta and with the "
                  "trigger).",
                  ok, ev + (f" Flow at fixed m = {st['m']}." if axis == "t" else ""),
                  [f"lag_{axis}.png"])
    # 3. the visibility threshold
    for axis, v, unit in (("m", vm, "m"), ("t", vt, "t")):
        gn = (f" The poison's GN spike alone ||grad Delta f(x0)||^2 reaches Lambda_clean(x0) "
              f"at {unit} = {fmt(v['x_gn'])}" + (
                  f" (factor {v['factor_gn']:.3g} in Delta f^2 against the prediction)."
                  if "factor_gn" in v else "."))
        x_first = float(cfg.t_min) if axis == "t" else 0.0
        if "factor" in v:
            f = v["factor"]
            ok = 1.0 / cfg.visibility_factor <= f <= cfg.visibility_factor
            early = v["x_meas"] <= x_first
            eq = "<=" if early else "="
            ev = (f"measured (top eigenvalue at x0 = 2x the clean model's) at {unit} {eq} "
                  f"{fmt(v['x_meas'])}, Delta f^2 {eq} {v['df2_meas']:.3g}"
                  + (" (already visible at the first grid point)" if early else "")
                  + f"; predicted (Delta f^2 = Lambda_clean/R_k) at {unit} = "
                  f"{fmt(v['x_pred'])}, Delta f^2 = {v['df2_pred']:.3g}: measured/predicted "
                  f"{eq} {f:.3g} in Delta f^2 (tolerance a factor {cfg.visibility_factor:g}).")
        else:
            ok = None
            ev = (f"a threshold was not reached inside the sweep: predicted at {unit} = "
                  f"{fmt(v['x_pred'])}, measured at {unit} = {fmt(v['x_meas'])}.")
        rep.claim(f"{name}: visibility threshold in {axis}",
                  "The spike becomes visible at x0 (top loss-Hessian eigenvalue twice the "
                  "clean model's) where Delta f^2 ~ Lambda_clean(x0)/R_k (THEORY.md section 2).",
                  ok, ev + gn, [f"threshold_{axis}.png"])


#: visibility measures, and the level a measure must reach to count as "visible"
VISIBLE = (("auroc", "curvature AUROC", 0.6), ("log_ratio", "log10 top-eig ratio at x0",
                                                np.log10(2.0)),
            ("align_x0_zeta", "cos^2(v1, x0 - zeta)", 0.5),
            ("align_trigger", "cos^2(v1, trigger)", 0.5))


def lag_verdict(c, s, unit):
    """The lag claim's verdict and evidence.

    A visibility measure RISES if it ends above where it starts and reaches its
    visible level; it is FRONT-LOADED if it is visible at the first grid point and
    ends lower. Verdict: True if some measure rises, ASR crosses half its range before
    every rising measure does, and no measure is front-loaded; False if a rising
    measure crosses first, or if a measure is front-loaded (visible from the start and
    fading: no lag for it); None if nothing is ever visible, or ASR neither rises nor
    starts high.
    """
    parts, verdicts, front = [], [], []
    xs = np.asarray(s["ms"] if "ms" in s else s["times"], float)
    asr = np.asarray(s["asr"], float)
    a = c["asr"]
    if a is None and asr[0] >= 0.5:
        a = float(xs[0])                       # flat and already high: crossed at the start
    parts.append(f"ASR {asr[0]:.2f} -> {asr[-1]:.2f}, half-range at {unit} = {fmt(a)}")
    for key, label, level in VISIBLE:
        v = np.asarray(s[key], float)
        if v[-1] > v[0] and np.max(v) >= level:
            x = c[key]
            verdicts.append(a is not None and x is not None and a < x)
            parts.append(f"{label} {v[0]:.3g} -> {v[-1]:.3g} (max {np.max(v):.3g}), "
                         f"half-range at {unit} = {fmt(x)}")
        elif v[0] >= level and v[-1] < v[0]:
            front.append(label)
            parts.append(f"{label} is visible at the first {unit} and fades ({v[0]:.3g} -> "
                         f"{v[-1]:.3g}, visible level {level:.3g})")
        else:
            parts.append(f"{label} is not a rising signal (visible level {level:.3g}; "
                         f"{v[0]:.3g} -> {v[-1]:.3g}, max {np.max(v):.3g})")
    parts.append(f"detector TPR half-range at {unit} = {fmt(c['tpr'])}")
    if front:
        ok = False
        parts.append("no lag for " + ", ".join(front) + ": visible from the first " + unit
                     + " and fading")
    elif verdicts:
        ok = all(verdicts)
    else:
        ok = None
    if a is None:
        ok = None
        parts.append("ASR neither rises nor starts high")
    return ok, "; ".join(parts) + "."


def agreement(res, cfg) -> str:
    """Where the data agree with THEORY.md and where they do not (data-driven text)."""
    agree, disagree, untested = [], [], []
    for name, r in res.items():
        sm, st = r["m_sweep"], r["t_sweep"]
        vm, vt, cm = r["visibility_m"], r["visibility_t"], r["cross_m"]
        kink = not r.get("smoothness", {"smooth": True})["smooth"]
        pos = np.asarray(sm["ms"]) > 0
        q = np.asarray(sm["spike_x0"])[pos] / (sm["R_k"] * np.asarray(sm["delta_f_x0"])[pos] ** 2)
        sm_chk = r.get("smoothness")
        if sm_chk is not None:
            (agree if sm_chk["smooth"] else disagree).append(smoothness_text(name, sm_chk))
        law_txt = (f"{name}: the poison's own GN spike ||grad Delta f(x0)||^2 is "
                   f"{q.min():.3g} .. {q.max():.3g} x R_k Delta f^2 over m > 0")
        (agree if 0.8 <= q.min() and q.max() <= 1.25 else disagree).append(
            law_txt + (" (the spike law, within 25%)." if 0.8 <= q.min() and q.max() <= 1.25
                       else ": the spike law R_k Delta f^2 (THEORY.md) is off by more than "
                            "25%; the exact spike uses the posterior covariance kt(x0, zeta), "
                            "not k0."))
        for axis, v in (("m", vm), ("t", vt)):
            xp, xg = v["x_pred"], v["x_gn"]
            head = (f"{name}: in {axis}, the GN spike alone reaches Lambda_clean(x0) at "
                    f"{axis} = {fmt(xg)}; THEORY.md's Delta f^2 = Lambda_clean/R_k predicts "
                    f"{axis} = {fmt(xp)}")
            if xp is None and xg is None:
                untested.append(head + ": neither happens inside the sweep, so the "
                                "threshold law is not tested" + (
                                    " (Lambda_clean(x0) is a kink value here)." if kink
                                    else "."))
            elif xp is None or xg is None:
                disagree.append(head + ": only one of them happens inside the sweep.")
            else:
                f = v["factor_gn"]
                ok = 1 / cfg.visibility_factor <= f <= cfg.visibility_factor
                (agree if ok else disagree).append(
                    head + f" (measured/predicted Delta f^2 = {f:.3g}, tolerance a factor "
                    f"{cfg.visibility_factor:g}).")
        lag_ok, _ = lag_verdict(cm, sm, "m")
        lag_txt = (f"{name}: ASR reaches half its range at m = {fmt(cm['asr'])}; the "
                   f"top-eigenvalue ratio at x0 at m = {fmt(cm['log_ratio'])}, cos^2 of its "
                   f"eigenvector with x0 - zeta at m = {fmt(cm['align_x0_zeta'])} and with "
                   f"the trigger at m = {fmt(cm['align_trigger'])} (half-ranges; see the "
                   "'lag in m' claim for which of these count as rising)")
        if lag_ok is True:
            agree.append(lag_txt + ": the lag in m.")
        elif lag_ok is False:
            disagree.append(lag_txt + ": no lag in m.")
        else:
            untested.append(lag_txt + ": no visibility measure rises in m (or ASR neither "
                            "rises nor starts high), so the lag in m is not tested.")
        lag_t, _ = lag_verdict(r["cross_t"], st, "t")
        t_txt = (f"{name}: in training time (m = {st['m']}) ASR goes {st['asr'][0]:.2f} -> "
                 f"{st['asr'][-1]:.2f} and the curvature AUROC {st['auroc'][0]:.2f} -> "
                 f"{st['auroc'][-1]:.2f} (the 'lag in t' claim has the details)")
        if lag_t is True:
            agree.append(t_txt + ": the lag in t.")
        elif lag_t is None:
            untested.append(t_txt + ": the lag in t is not tested (nothing becomes visible, "
                            "or ASR neither rises nor starts high).")
        else:
            rt = np.asarray(st["ratio"])
            if not (rt[0] >= 2 and rt[-1] < rt[0]):    # that case has its own text below
                disagree.append(t_txt + ": no lag in t.")
        if "factor" in vm:
            f = vm["factor"]
            txt = (f"{name}: the full top eigenvalue at x0 reaches 2x the clean one at "
                   f"Delta f^2 = {f:.3g} x the predicted Lambda_clean/R_k")
            if "excess_at_visible" in vm:
                txt += (f"; at m = {vm['x_at_visible']:g} its excess over the clean value is "
                        f"{vm['excess_at_visible'] / max(vm['spike_at_visible'], 1e-300):.3g} x "
                        "the GN spike")
            if 1 / cfg.visibility_factor <= f <= cfg.visibility_factor:
                agree.append(txt + ": the GN picture holds here.")
            else:
                disagree.append(txt + ". The loss Hessian at x0 is not GN-dominated: the "
                                "residual term (f - y) hess_x f is first order in Delta f "
                                "(for the RBF kernel the poison adds (1 - f) m alpha_p k0 / l^2 "
                                "to every eigenvalue), so visibility at x0 comes EARLIER than "
                                "THEORY.md's Delta f^2 ~ Lambda_clean/R_k.")
        a0, amax = float(sm["auroc"][0]), float(np.max(sm["auroc"]))
        thr0 = float(sm["threshold"][0])
        lmax = float(np.max(sm["lambda_x0"]))
        if amax < 0.6:
            if kink:
                why = (f" (The clean threshold is {thr0:.3g}; the top eigenvalue at x0 reaches "
                       f"{lmax:.3g}.) For this kernel every curvature score is set by kinks of "
                       "the kernel (see the smoothness line), not by the poison's spike.")
            elif lmax < thr0:
                why = (" The triggered inputs sit far from the data where the loss is FLATTER "
                       f"than at clean inputs (the clean threshold {thr0:.3g} vs a top "
                       f"eigenvalue at x0 of at most {lmax:.3g}), and a successful attack "
                       "lowers the residual |f - sign f| there.")
            else:
                why = (f" (The clean threshold is {thr0:.3g}; the top eigenvalue at x0 reaches "
                       f"{lmax:.3g}, but not at most triggered inputs.)")
            disagree.append(
                f"{name}: the curvature detector never sees the attack in m: AUROC "
                f"{a0:.2f} at m = 0, at most {amax:.2f} up to m = {int(sm['ms'][-1])}." + why
                + " THEORY.md's criterion compares the spike with the clean curvature at x0; "
                "a detector thresholded on clean INPUTS compares it with the clean curvature "
                "elsewhere.")
        ratio_t = np.asarray(st["ratio"])
        if ratio_t[0] >= 2 and ratio_t[-1] < ratio_t[0]:
            disagree.append(
                f"{name}: in training time (m = {st['m']}) there is no lag: ASR is "
                f"{st['asr'][0]:.2f} from t = {cfg.t_min:g}, and the top eigenvalue at x0 is "
                f"{ratio_t[0]:.3g}x the clean model's at the first time, falling to "
                f"{ratio_t[-1]:.3g}x by t = {cfg.t_max:g}; the detector's AUROC goes "
                f"{st['auroc'][0]:.2f} -> {st['auroc'][-1]:.2f}."
                + (" For this kernel the curvature is set by kinks of the kernel (see the "
                   "smoothness line)." if kink else
                   " Early in the flow the curvature is the residual term -y hess f, which "
                   "the poison dominates at x0; the GN spike (quadratic in Delta f) only "
                   "matters late."))
    out = ["## Agreement with THEORY.md", "", "Agrees:"]
    out += [f"- {a}" for a in agree] or ["- (nothing tested agreed)"]
    out += ["", "Does not agree:"]
    out += [f"- {d}" for d in disagree] or ["- (no disagreement found)"]
    if untested:
        out += ["", "Not tested by these data:"] + [f"- {u}" for u in untested]
    notes = []
    for name, r in res.items():
        sm = r["m_sweep"]
        if float(sm["asr"][0]) >= 0.5:
            notes.append(
                f"{name}: the trigger alone already carries {sm['asr'][0]:.0%} of the "
                "triggered non-target test points to the target at m = 0 (no poison): for "
                "this kernel the ASR measures the trigger more than the poison.")
        a0, a1 = float(sm["clean_acc"][0]), float(sm["clean_acc"][-1])
        if a0 - a1 >= 0.1:
            notes.append(
                f"{name}: the poison is not a clean backdoor for this kernel: clean accuracy "
                f"falls {a0:.2f} -> {a1:.2f} by m = {int(sm['ms'][-1])}, with median |Delta f| "
                f"{sm['abs_df_clean_median'][-1]:.3g} at clean test inputs against "
                f"{sm['abs_df_trig_median'][-1]:.3g} at triggered ones. The exact law "
                "Delta f(x) = m alpha_p kt(x, zeta) still holds (see 'refits match the law'); "
                "the posterior covariance kt(x, zeta) is just not small away from the trigger.")
    if notes:
        out += ["", "Not covered by THEORY.md:"] + [f"- {n}" for n in notes]
    return "\n".join(out)


def ta(s) -> str:
    """The trigger-alone ASR of a sweep (the clean model's, at the same inputs)."""
    t = np.asarray(s["trigger_alone_asr"], float)
    return f"{t[0]:.2f}" if np.all(t == t[0]) else f"{t[0]:.2f} -> {t[-1]:.2f}"


def discussion(res, cfg, ell, secs) -> str:
    lines = [f"""## Set-up
{scenario.describe_kernels(res, cfg.dataset)} {scenario.describe_targets(cfg)}
Trigger: the additive cross x + s p,
s = {cfg.trigger_strength:g} l (l = the median pairwise distance of that kernel's
training subset). Poison: m
clones of the triggered {cfg.poison} of the non-target training images, label
{cfg.y_target:+g}. Ridge {cfg.ridge:g} x k(zeta, zeta), absolute (N + m) x that. x0 is
the first triggered non-target test image. ASR on {cfg.n_trigger} triggered non-target
test points, beside the trigger-alone ASR (the clean model's, same absolute ridge, at
the same inputs); the curvature detector (top loss-Hessian eigenvalue, pseudo-labels
the model's decision, Lanczos tol {cfg.eig_tol:g}) is fitted on {cfg.n_cal} clean test inputs
(threshold = the {1 - cfg.fpr:.0%} quantile) and scored on {cfg.n_eval} triggered and
{cfg.n_eval} clean test inputs, on every refitted poisoned model. m grid: 0 and
{cfg.n_m} log-spaced values up to {cfg.m_max}; t grid: {cfg.n_t} log-spaced times in
[{cfg.t_min:g}, {cfg.t_max:g}] at m = {cfg.flow_m} (image kernels: clone counts scaled
by {cfg.cnn_n_train}/{cfg.n_train}, the same poison fractions). Total time {secs:.1f} s.

## What the data say, kernel by kernel"""]
    for name, r in res.items():
        sm, st = r["m_sweep"], r["t_sweep"]
        cm, ct, vm, vt = r["cross_m"], r["cross_t"], r["visibility_m"], r["visibility_t"]
        lines.append(f"""
**{name}** ({scenario.describe(r['data'])}; ||x0 - zeta|| = {r['r_x0_zeta_over_l']:.3g} l,
R_k(x0, zeta) = {sm['R_k']:.3g}, k0 = {sm['k0']:.3g}). In m: ASR {sm['asr'][0]:.2f} -> {sm['asr'][-1]:.2f} (trigger-alone
{ta(sm)}; half-range at m = {fmt(cm['asr'])}; clean accuracy {sm['clean_acc'][0]:.2f} -> {sm['clean_acc'][-1]:.2f}, median
|Delta f| at m = {int(sm['ms'][-1])}: {sm['abs_df_trig_median'][-1]:.3g} at triggered and
{sm['abs_df_clean_median'][-1]:.3g} at clean test inputs); curvature AUROC {sm['auroc'][0]:.2f} -> {sm['auroc'][-1]:.2f}
(range {np.min(sm['auroc']):.2f}..{np.max(sm['auroc']):.2f}, half-range at
m = {fmt(cm['auroc'])}); detector TPR {sm['tpr'][0]:.2f} -> {sm['tpr'][-1]:.2f}; top-eigenvalue
ratio at x0 {sm['ratio'][0]:.3g} -> {sm['ratio'][-1]:.3g}; cos^2 of the top eigenvector with
x0 - zeta {sm['align_x0_zeta'][0]:.2f} -> {sm['align_x0_zeta'][-1]:.2f}, with the trigger
{sm['align_trigger'][0]:.2f} -> {sm['align_trigger'][-1]:.2f}. Visibility at x0: predicted
m = {fmt(vm['x_pred'])}, measured m = {fmt(vm['x_meas'])}. In t (m = {st['m']}): ASR
{st['asr'][0]:.2f} -> {st['asr'][-1]:.2f} (trigger-alone {ta(st)}),
half-range at t = {fmt(ct['asr'])}{' (flat)' if ct['asr'] is None else ''}, AUROC
half-range at t = {fmt(ct['auroc'])}; predicted visibility t = {fmt(vt['x_pred'])}, measured
t {'<=' if vt['x_meas'] is not None and vt['x_meas'] <= cfg.t_min else '='}
{fmt(vt['x_meas'])}.""")
    return "\n".join(lines)
