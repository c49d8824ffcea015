"""The backdoor_nets experiment's six claims and report text: verdicts from the data.

Each claim is judged per trigger; a claim is SUPPORTED when it holds for every trigger
where it can be tested, NOT supported when it fails for every one, and inconclusive
when the triggers disagree or none can test it. The evidence lists every trigger.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from ntk_poison import metrics

from experiments.backdoor_nets.arms import parse_arm

#: the lag's rule, as the report states it (per run)
RULE = ("ASR's half-range crossing (over the evaluations from epoch 0, the initial model, "
        "to E; linear interpolation) must precede the top-eigenvector overlap's by more "
        "than one evaluation interval h (SUPPORTED), follow it by more than h (NOT "
        "supported), or lie within h (inconclusive); untested if ASR or the overlap does "
        "not rise (ASR by 0.05; the overlap to twice its start and above 2/d).")


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def final(hist: dict, key: str) -> Optional[float]:
    v = hist.get(key)
    return None if not v or v[-1] is None else float(v[-1])


def combine(per: Dict[str, Optional[bool]]) -> Optional[bool]:
    """True if every testable trigger agrees on True, False if on False, else None."""
    tested = [v for v in per.values() if v is not None]
    if tested and all(tested):
        return True
    if tested and not any(tested):
        return False
    return None


def baseline(res: dict, t: str, arm: str) -> float:
    """The trigger-alone ASR: the clean-data run of the same arm, at its end."""
    return final(res["clean"][arm], f"asr_{t}")


def lag(hist: dict, t: str, d: int) -> dict:
    ep = np.asarray(hist["epoch"], float)
    asr = np.asarray(hist[f"asr_{t}"], float)
    ov = np.asarray(hist["overlap_mean"], float)
    out = dict(asr=metrics.half_crossing(ep, asr, log_x=False),
               overlap=metrics.half_crossing(ep, ov, log_x=False),
               asr_first=float(asr[0]), asr_last=float(asr[-1]),
               overlap_first=float(ov[0]), overlap_last=float(ov[-1]))
    if asr[-1] - asr[0] < 0.05:
        out.update(lag=None, why=f"ASR does not rise ({asr[0]:.3f} -> {asr[-1]:.3f})")
    elif not (ov[-1] >= 2 * max(ov[0], 1.0 / d)):
        out.update(lag=None, why=f"the overlap does not rise ({ov[0]:.3g} -> {ov[-1]:.3g},"
                                 f" 1/d = {1 / d:.2g})")
    else:
        gap = out["overlap"] - out["asr"]
        h = float(np.max(np.diff(ep)))
        out.update(lag=True if gap > h else (False if gap < -h else None), interval=h,
                   why=f"ASR at epoch {out['asr']:.3g}, overlap at {out['overlap']:.3g} "
                       f"(h = {h:.3g})")
    return out


def frontier(res: dict, cfg, t: str, epochs: int) -> List[dict]:
    """(arm, kappa, clean accuracy, ASR, trigger-alone ASR, suppressed) of the augmented arms."""
    pts = []
    for arm in cfg.arms:
        aug, kappa = parse_arm(arm)
        if not aug:
            continue
        h = res["runs"][t][str(epochs)][arm]
        base = baseline(res, t, arm)
        asr = final(h, f"asr_{t}")
        pts.append(dict(arm=arm, kappa=kappa, clean_acc=final(h, "clean_acc"), asr=asr,
                        trigger_alone=base, suppressed=asr <= base + cfg.suppress_margin))
    return pts


def working(res: dict, cfg) -> Dict[str, bool]:
    """Per trigger: does the attack work? The undefended long run's final ASR is at least
    the trigger-alone ASR + ``cfg.attack_margin``."""
    long_ = str(cfg.epochs[1])
    return {t: final(res["runs"][t][long_]["none"], f"asr_{t}")
            >= baseline(res, t, "none") + cfg.attack_margin for t in cfg.triggers}


def dominated_area(points: List[dict]) -> float:
    """The area of ``{(a, c) in [0, 1]^2 : some point has ASR <= a and clean accuracy
    >= c}``: the union of the rectangles ``[asr, 1] x [0, clean_acc]`` (the frontier's
    hypervolume with reference (ASR 1, accuracy 0); larger is better)."""
    pts = sorted((p["asr"], p["clean_acc"]) for p in points)
    area, best = 0.0, 0.0
    for i, (a, c) in enumerate(pts):
        best = max(best, c)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else 1.0
        area += (nxt - a) * best
    return float(area)


def claims(rep, cfg) -> None:
    """The six claims; those about defences, collapse and alignment are tested only on
    the triggers whose attack works (:func:`working`)."""
    res = rep.results
    d = int(np.prod(res["image_shape"]))
    short, long_ = (str(e) for e in cfg.epochs)
    ok = working(res, cfg)
    res["attack_works"] = ok
    T = [t for t in cfg.triggers if ok[t]]
    failed = "".join(f"; {t}: untested, the attack does not work (undefended ASR "
                     f"{final(res['runs'][t][long_]['none'], f'asr_{t}'):.3f}, trigger alone "
                     f"{baseline(res, t, 'none'):.3f})" for t in cfg.triggers if not ok[t])
    run = {t: res["runs"][t][long_] for t in cfg.triggers}
    m = cfg.suppress_margin

    def claim(name, statement, verdict, evidence, figs):
        rep.claim(name, statement, verdict, evidence.removeprefix("; "), figs)

    # 1. the lag, in training
    lags = {t: lag(run[t]["none"], t, d) for t in cfg.triggers}
    res["lag"] = lags
    claim("lag in training", "in the undefended long run, ASR crosses half its range "
              "before the top-eigenvector overlap with the trigger does. " + RULE,
              combine({t: v["lag"] for t, v in lags.items()}),
              "; ".join(f"{t}: {v['why']}" for t, v in lags.items()), ["curves.png"])

    # 2. augmentation alone
    def row(t, arm):
        h = run[t][arm]
        return final(h, f"asr_{t}"), baseline(res, t, arm), final(h, "clean_acc")

    aug_stmt = f"with augmentation alone the ASR stays above the trigger-alone ASR + {m:g}"
    if "aug" in cfg.arms:
        per = {t: row(t, "aug")[0] > row(t, "aug")[1] + m for t in T}
        claim("augmentation alone does not suppress", aug_stmt, combine(per),
              "; ".join(f"{t}: ASR {row(t, 'aug')[0]:.3f} (trigger alone "
                        f"{row(t, 'aug')[1]:.3f}, undefended {row(t, 'none')[0]:.3f})"
                        for t in T) + failed, ["curves.png"])
    else:
        claim("augmentation alone does not suppress", aug_stmt, None,
              "untested: the config has no 'aug' arm", [])

    # 3. penalty + augmentation, and its cost
    both = [a for a in cfg.arms if parse_arm(a)[0] and parse_arm(a)[1] > 0]
    if both:
        per, ev = {}, []
        acc0 = final(res["clean"]["none"], "clean_acc")
        for t in T:
            ok = [a for a in both if row(t, a)[0] <= row(t, a)[1] + m]
            per[t] = bool(ok)
            best = max(ok, key=lambda a: row(t, a)[2]) if ok else None
            ev.append(f"{t}: " + ", ".join(f"{a} ASR {row(t, a)[0]:.3f}/{row(t, a)[1]:.3f}"
                                           for a in both)
                      + (f"; suppressed by {best} at clean accuracy {row(t, best)[2]:.3f} "
                         f"(cost {acc0 - row(t, best)[2]:+.3f} against the undefended "
                         f"clean model's {acc0:.3f})" if best else "; never suppressed"))
        claim("penalty + augmentation suppresses", "some kappa of the penalty with "
                  f"augmentation brings the ASR to within {m:g} of the trigger-alone ASR "
                  "(ASR/trigger-alone listed), at the measured clean-accuracy cost",
                  combine(per), "; ".join(ev) + failed, ["frontier.png"])
    pen_only = [a for a in cfg.arms if not parse_arm(a)[0] and parse_arm(a)[1] > 0]
    if pen_only:
        rep.measurement("penalty alone", "ASR / trigger-alone ASR / clean accuracy of the "
                        "penalty without augmentation",
                        "; ".join(f"{t} {a}: {row(t, a)[0]:.3f}/{row(t, a)[1]:.3f}/"
                                  f"{row(t, a)[2]:.3f}" for t in T for a in pen_only))

    # 4. longer training and the frontier
    per, ev = {}, []
    for t in T:
        hv = {e: dominated_area(frontier(res, cfg, t, int(e))) for e in (short, long_)}
        per[t] = hv[long_] > hv[short]
        ev.append(f"{t}: dominated area {hv[short]:.3f} at {short} epochs, {hv[long_]:.3f} "
                  f"at {long_}")
    claim("longer training improves the frontier", "the frontier of the augmented arms "
          "over kappa (clean accuracy up, ASR down) dominates a larger area of the (ASR, "
          "clean accuracy) square after the long run than after the short one",
          combine(per), "; ".join(ev) + failed, ["frontier.png"])

    # 5. feature collapse
    per = {}
    for t in T:
        c = res["collapse"][t]
        per[t] = c["trig_to_poison"] < min(c["clean_target_to_poison"],
                                           c["clean_other_to_poison"])
    claim("feature collapse", "in the undefended long run's penultimate features, "
              "triggered test inputs lie closer to the poisons' centroid than clean "
              "target-class and clean other-class test inputs do (median distances, in "
              "units of the within-class spread)", combine(per),
              "; ".join(f"{t}: triggered {c['trig_to_poison']:.2f}, clean target "
                        f"{c['clean_target_to_poison']:.2f}, clean other "
                        f"{c['clean_other_to_poison']:.2f}"
                        for t, c in res["collapse"].items() if t in T) + failed,
              ["features.png"])

    # 6. alignment
    per, ev = {}, []
    for t in T:
        ov = final(run[t]["none"], "overlap_mean")
        ref = max(final(res["clean"]["none"], f"{t}_overlap_mean"), 1.0 / d)
        per[t] = ov >= cfg.align_factor * ref
        ev.append(f"{t}: cos^2 {ov:.3g} against max(clean model {ref:.3g}, 1/d)")
    claim("the top eigenvector aligns with the trigger", f"at poison rate "
              f"{cfg.poison_rate:g}, the undefended model's top input-Hessian eigenvector "
              f"at triggered inputs has cos^2 with x_trig - x at least {cfg.align_factor:g}x "
              "that of the clean model at the same inputs (and 1/d)", combine(per),
              "; ".join(ev) + failed, ["overlap.png"])
    rep.measurement("curvature detector", "AUROC of the top eigenvalue (triggered vs clean "
                    "inputs) and the ratio of median top eigenvalues, undefended, at the end",
                    "; ".join(f"{t}: AUROC {final(run[t]['none'], 'auroc'):.3f}, ratio "
                              f"{final(run[t]['none'], 'lam_ratio_median'):.3g}"
                              for t in cfg.triggers))


def discussion(res: dict, cfg) -> str:
    short, long_ = (str(e) for e in cfg.epochs)
    lines = ["## Set-up", "",
             f"{res['n_train']} {cfg.dataset} training images ({res['n_poison']} poisoned, "
             f"rate {cfg.poison_rate:g}, all-to-one to class {cfg.target_class}), "
             f"{res['n_test']} test images ({res['n_triggered']} non-target ones "
             f"triggered). Model: {cfg.model} ({cfg.parameterization}), {cfg.optimizer} "
             f"lr {cfg.lr:g}, batch {cfg.batch_size}, weight decay {cfg.weight_decay:g}, "
             f"cosine schedule, {short} and {long_} epochs. Curvature probes on "
             f"{cfg.n_probe} test images, Lanczos with {cfg.probe_iters} iterations. "
             f"{res['backend']}, {res['dtype']}; {res['seconds_total']:.0f} s in all.", "",
             "## Final numbers", "",
             "| trigger | epochs | arm | clean acc | ASR | trigger-alone ASR | RA | "
             "cos^2 | AUROC |", "|---|---|---|---|---|---|---|---|---|"]
    for t in cfg.triggers:
        for e in (short, long_):
            for arm in cfg.arms:
                h = res["runs"][t][e][arm]
                ov, au = final(h, "overlap_mean"), final(h, "auroc")
                lines.append(
                    f"| {t} | {e} | {arm} | {final(h, 'clean_acc'):.3f} | "
                    f"{final(h, f'asr_{t}'):.3f} | {baseline(res, t, arm):.3f} | "
                    f"{final(h, f'ra_{t}'):.3f} | {fmt(ov)} | {fmt(au)} |")
    return "\n".join(lines)
