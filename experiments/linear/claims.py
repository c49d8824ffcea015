"""The linear experiment's claims and report text: verdicts and words that follow the data.

``crossings`` finds where each curve crosses half its range (over the evaluations
after the initial model, a random one) and judges the lag for one run by ``RULE``
(the crossings are ordered only if they are more than one evaluation interval apart);
``claims`` writes the claims; ``discussion`` the set-up and the crossing-epoch table of
report.md.
"""

from __future__ import annotations

import numpy as np

from ntk_poison import metrics


def fmt(x) -> str:
    return "never" if x is None else f"{x:.3g}"


def interval(times, x: float) -> float:
    """The length of the evaluation interval ``(t[i-1], t[i]]`` that holds ``x`` (a
    crossing lies in the interval where the curve first reaches its half level)."""
    t = np.asarray(times, float)
    i = int(np.clip(np.searchsorted(t, x, side="left"), 1, len(t) - 1))
    return float(t[i] - t[i - 1])


#: the lag's rule, as the report states it
RULE = ("the lag is SUPPORTED if ASR's half-range crossing precedes the overlap's by more "
        "than one evaluation interval h, NOT supported if the overlap's precedes ASR's by "
        "more than h, and inconclusive (within the resolution) otherwise; h = the larger "
        "of the lengths of the two evaluation intervals that hold the crossings. Untested "
        "if ASR or the overlap does not rise.")


def crossings(s: dict, times, d: int, cfg) -> dict:
    """Half-range crossing times (fractional epochs) of ASR, the overlap and the
    eigenvalue ratio over the evaluations after the initial model (``times[1:]``: the
    model at time 0 is a random one; linear interpolation in the time), and the lag
    verdict by :data:`RULE`.

    ASR RISES if its last value exceeds its first (at ``times[1]``) by
    ``cfg.asr_rise``; the overlap RISES if it ends at least ``cfg.overlap_rise`` times
    the random-direction level 1/d and at least 1/d above where it started. A crossing
    at ``times[1]`` means "by ``times[1]``": the rule then still orders it correctly
    (an earlier true crossing only widens a gap found in its favour).
    """
    t = np.asarray(times, float)
    ep = t[1:]
    asr, ov = np.asarray(s["asr"][1:], float), np.asarray(s["overlap"][1:], float)
    ratio = np.asarray(s["ratio"][1:], float)
    out = dict(asr=metrics.half_crossing(ep, asr, log_x=False),
               overlap=metrics.half_crossing(ep, ov, log_x=False),
               ratio=metrics.half_crossing(ep, ratio, log_x=False),
               asr_rises=bool(asr[-1] - asr[0] >= cfg.asr_rise),
               overlap_rises=bool(ov[-1] >= cfg.overlap_rise / d and ov[-1] - ov[0] >= 1.0 / d),
               t_first=float(ep[0]), asr_first=float(asr[0]), asr_last=float(asr[-1]),
               overlap_first=float(ov[0]), overlap_last=float(ov[-1]),
               overlap_max=float(ov.max()), ratio_first=float(ratio[0]),
               ratio_last=float(ratio[-1]), ratio_max=float(ratio.max()), interval=None)
    a, o = out["asr"], out["overlap"]
    if not out["asr_rises"]:
        ok, why = None, f"ASR does not rise ({asr[0]:.3f} -> {asr[-1]:.3f})"
    elif not out["overlap_rises"]:
        ok, why = None, (f"the overlap does not rise ({ov[0]:.3g} -> {ov[-1]:.3g}, 1/d = "
                         f"{1 / d:.3g}): the attack succeeds with no alignment to order")
    else:
        h = max(interval(t, a), interval(t, o))
        out["interval"] = h
        gap = f"overlap - ASR = {o - a:+.3g} epochs, interval h = {h:.3g} epochs"
        if o - a > h:
            ok, why = True, f"ASR first ({gap})"
        elif a - o > h:
            ok, why = False, f"the overlap first ({gap})"
        else:
            ok, why = None, f"within the resolution ({gap})"
    out["lag"], out["why"] = ok, why
    return out


def _lag_evidence(s: dict, cr: dict, m: int, n: int) -> str:
    ta = np.asarray(s["trigger_alone_asr"])
    h = ("" if cr["interval"] is None else
         f"evaluation interval at the crossings h = {cr['interval']:.3g} epochs; ")
    return (f"m = {m} ({m / n:.2%} of the training set): ASR {cr['asr_first']:.3f} (epoch "
            f"{cr['t_first']:.3g}) -> {cr['asr_last']:.3f} (last; trigger-alone "
            f"{ta[1]:.3f} -> {ta[-1]:.3f}), half-range at epoch {fmt(cr['asr'])}; "
            f"cos^2(v1, trigger) {cr['overlap_first']:.3g} -> {cr['overlap_last']:.3g} (max "
            f"{cr['overlap_max']:.3g}), half-range at epoch {fmt(cr['overlap'])}; "
            f"{h}verdict: {cr['why']}.")


def claims(rep, res: dict, counts, d: int, cfg) -> None:
    n = rep.results["n_train"]
    for kind, r in res.items():
        for m in counts:
            s, cr = r["runs"][str(m)], r["crossings"][str(m)]
            rep.claim(f"{kind}: lag at m = {m}",
                      "ASR crosses half its range (over the evaluations after the initial "
                      "model) before the overlap cos^2(top input-Hessian eigenvector, "
                      "trigger) does, by more than one evaluation interval.",
                      cr["lag"], _lag_evidence(s, cr, m, n), ["linear_lag.png"])
        m = counts[-1]
        s, clean = r["runs"][str(m)], r["runs"]["0"]
        ov, ov0 = float(s["overlap"][-1]), float(clean["overlap"][-1])
        base = max(ov0, 1.0 / d)
        rep.claim(f"{kind}: alignment under strong poisoning",
                  f"At the last epoch, with the largest poison count (m = {m}), the top "
                  "eigenvector of the input Hessian at triggered inputs aligns with the "
                  f"trigger: cos^2 >= {cfg.align_factor:g} x max(the clean run's, 1/d).",
                  ov >= cfg.align_factor * base,
                  f"cos^2 = {ov:.3g} (poisoned, m = {m}) vs {ov0:.3g} (clean run) and 1/d = "
                  f"{1 / d:.3g} (a random direction): {ov / base:.3g} x the larger baseline; "
                  f"ASR {float(s['asr'][-1]):.3f} (trigger-alone "
                  f"{float(clean['asr'][-1]):.3f}). The eigenvector is "
                  + ("mostly the trigger (cos^2 >= 0.5)." if ov >= 0.5 else
                     "still mostly NOT the trigger (cos^2 < 0.5)."), ["linear_lag.png"])


def table(res: dict, counts, n: int) -> str:
    """The crossing-epoch table (markdown)."""
    lines = ["| model | m (fraction) | ASR first -> last | trigger-alone ASR (last) | "
             "clean acc (last) | ASR half-range epoch | cos^2 first -> last | overlap "
             "half-range epoch | overlap - ASR (epochs) | interval h (epochs) | top-eig "
             "ratio trig/clean first -> last (max) | lag |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in res.items():
        for m in counts:
            s, cr = r["runs"][str(m)], r["crossings"][str(m)]
            v = {True: "yes", False: "no", None: "untested" if cr["interval"] is None
                 else "inconclusive"}[cr["lag"]]
            gap = (f"{cr['overlap'] - cr['asr']:+.3g}" if cr["asr_rises"]
                   and cr["overlap_rises"] else "-")
            h = "-" if cr["interval"] is None else f"{cr['interval']:.3g}"
            lines.append(
                f"| {kind} | {m} ({m / n:.2%}) | {cr['asr_first']:.3f} -> {cr['asr_last']:.3f}"
                f" | {float(s['trigger_alone_asr'][-1]):.3f} | "
                f"{float(s['clean_acc'][-1]):.3f} | {fmt(cr['asr'])} | "
                f"{cr['overlap_first']:.3g} -> {cr['overlap_last']:.3g} | "
                f"{fmt(cr['overlap'])} | {gap} | {h} | {cr['ratio_first']:.3g} -> "
                f"{cr['ratio_last']:.3g} "
                f"({cr['ratio_max']:.3g}) | {v}: {cr['why']} |")
    return "\n".join(lines)


def _grid_text(results: dict, cfg) -> str:
    t = np.asarray(results["epochs"], float)
    k = int(round(1.0 / t[1])) if len(t) > 1 and t[1] > 0 else 1
    fine = (f"in the first {cfg.fine_epochs} epochs, once an epoch after them"
            if cfg.fine_epochs and cfg.fine_epochs < cfg.epochs else "in every epoch")
    return (f"Every measure is taken {cfg.evals_per_epoch} times an epoch {fine} (the "
            f"epoch's {results['steps_per_epoch']} minibatch steps cut into chunks; "
            f"{len(t)} evaluation times, the first after the initial model at epoch "
            f"{t[1]:.3g}, about 1/{k}). Half-range crossings (linear interpolation in the "
            "time) are over the evaluations after the initial model (a random one). Rule: "
            + RULE)


def discussion(results: dict, cfg, secs: float) -> str:
    res, counts, n, d = (results["models"], results["poison_counts"], results["n_train"],
                         results["d"])
    lrs = ", ".join(f"{k} {cfg.lr_softmax if k == 'softmax' else cfg.lr_squares:g}"
                    for k in res)
    bs = "full batch" if cfg.batch_size == 0 else f"minibatches of {cfg.batch_size}"
    per_run = {k: np.mean(list(r["seconds"].values())) for k, r in res.items()}
    out = [f"""## Set-up
{cfg.dataset}: {n} training images (d = {d}), {results['n_test']} test images, 10 classes,
all-to-one to class {cfg.target_class}. Trigger: the additive cross (one row and one
column, unit norm) of norm {cfg.trigger_strength:g} l = {cfg.trigger_strength *
results['length_scale']:.3g} (l = {results['length_scale']:.4g}, the median pairwise
distance). Poisons: m triggered non-target training images relabelled
{cfg.target_class}, in place (BackdoorBench's "replace"), m in {list(counts)}. Models:
z = W x + b, softmax cross-entropy and least squares on one-hot targets (1/2 ||z -
e_y||^2), SGD ({lrs}) on {bs}, {cfg.epochs} epochs, from W0 = {cfg.init_scale:g}
N(0,1)/sqrt(d) (seed {cfg.seed}); the clean run (m = 0) starts from the same model with
the same minibatch order. dtype {results['dtype']} on {results['backend']}. ASR on all
{results['n_triggered']} triggered non-target test images, with the trigger-alone ASR
(the clean run's, same epoch) beside it. Input Hessian W^T A(x) W of the loss (closed
form; label-free, so the true-label and target-label conventions agree) at
{cfg.n_hessian} of the triggered test images and at the same images untriggered;
overlap = mean cos^2 of the top eigenvector with the trigger direction (1/d =
{1 / d:.3g} for a random direction); ratio = mean top eigenvalue triggered / clean.
Least squares: the input Hessian is W^T W, the same at every input, so its ratio is 1
and its overlap does not depend on the input. Time {secs:.1f} s (mean per run: """
           + ", ".join(f"{k} {v:.1f} s" for k, v in per_run.items()) + ").",
           "", "## Crossing epochs", "", _grid_text(results, cfg), "",
           table(res, counts, n), ""]
    notes = []
    for kind, r in res.items():
        verdicts = [r["crossings"][str(m)]["lag"] for m in counts]
        yes = [m for m, v in zip(counts, verdicts) if v is True]
        no = [m for m, v in zip(counts, verdicts) if v is False]
        un = [m for m, v in zip(counts, verdicts) if v is None]
        notes.append(f"- {kind}: ASR first at m = {yes or 'none'}; the overlap first at m = "
                     f"{no or 'none'}; not ordered (within the resolution, or a curve that "
                     f"does not rise) at m = {un or 'none'}.")
        close = [m for m in counts if r["crossings"][str(m)]["interval"] is not None and
                 abs(r["crossings"][str(m)]["overlap"] - r["crossings"][str(m)]["asr"]) < 1]
        if close:
            notes.append(f"  At m = {close} the two crossings are less than one epoch apart: "
                         "ASR and the overlap rise together there, whatever the order.")
        blind = [m for m in counts if not r["crossings"][str(m)]["overlap_rises"]
                 and float(r["runs"][str(m)]["asr"][-1]) >= 0.5]
        if blind:
            notes.append("  The attack succeeds unseen at m = " + ", ".join(
                f"{m} (ASR {float(r['runs'][str(m)]['asr'][-1]):.2f}, cos^2 "
                f"{float(r['runs'][str(m)]['overlap'][-1]):.3g})" for m in blind)
                + f": ASR passes 0.5 while the overlap does not rise (it stays within a "
                f"few x 1/d = {1 / d:.3g}, the level of a random direction).")
        clean = r["runs"]["0"]
        if kind == "squares":
            dev = max(float(np.max(np.abs(np.asarray(x["ratio"]) - 1))) for x in
                      r["runs"].values())
            notes.append(f"  Least squares: the input Hessian is W^T W at every input, so the "
                         f"triggered/clean ratio is 1 (measured max |ratio - 1| = {dev:.2g}); "
                         "its top eigenvector is W's top right singular vector.")
        else:
            big = r["runs"][str(counts[-1])]
            rt = np.asarray(big["ratio"])
            notes.append(f"  Softmax, m = {counts[-1]}: the triggered/clean top-eigenvalue "
                         f"ratio peaks at {rt.max():.3g} (epoch "
                         f"{float(results['epochs'][int(np.argmax(rt))]):.3g}) and ends "
                         f"at {rt[-1]:.3g}" + (": below 1, the triggered inputs become FLATTER "
                         "than clean ones once the model sends them confidently to the target "
                         "(p -> one-hot, A = diag p - p p^T -> 0)." if rt[-1] < 1 else "."))
        notes.append(f"  The clean run: clean accuracy {float(clean['clean_acc'][-1]):.3f}, "
                     f"trigger-alone ASR {float(clean['asr'][-1]):.3f}, cos^2 "
                     f"{float(clean['overlap'][-1]):.3g} at the last epoch.")
    out += ["## What the data say", ""] + notes
    return "\n".join(out)
