"""The matrix's claims, measurements and table (verdicts follow the data)."""

from __future__ import annotations

from typing import Any, Dict, List

CLUSTERED = ("clone", "near_clone", "optimal")
ISOLATED = ("patch", "blend", "warp")


def _asr(cell, attack):
    trig = attack if attack in ISOLATED else "patch"
    return cell["asr"][trig]


def epic_claim(rep, cfg, rname, rows: Dict[str, Any]) -> None:
    rates = {a: rows[a]["epic"]["poison_drop_rate"] for a in rows
             if a != "clean" and "epic" in rows[a] and a != "deferred"}
    clus = {a: r for a, r in rates.items() if a in CLUSTERED}
    iso = {a: r for a, r in rates.items() if a in ISOLATED}
    ok = None if not clus or not iso else max(clus.values()) < min(iso.values())
    ev = "; ".join(f"{a}: {r:.2f} of poisons dropped, {rows[a]['epic']['clean_dropped']} "
                   f"clean dropped, ASR {_asr(rows[a]['epic'], a):.2f} "
                   f"(alone {rows[a]['epic']['alone']:.2f})" for a, r in rates.items())
    rep.claim(f"epic_clusters_{rname}", f"{rname}: EPIC keeps dense clone clusters (clone, "
              "near clone, optimal) and drops the isolated poisons of BadNets-style "
              "backdoors: every clustered attack loses a smaller fraction of its poisons "
              "than every isolated one", ok, ev or "no EPIC cells")


def deferred_claims(rep, cfg, rname, rows: Dict[str, Any]) -> None:
    if "deferred" not in rows or "none" not in rows["deferred"]:
        return
    d, c = rows["deferred"]["none"], rows["clean"]["none"]
    if "robust" not in d or "robust" not in c:
        return
    sig = f"{max(cfg.noise_sigmas):g}"
    acc_gap = d["clean_acc"] - c["clean_acc"]
    rep.claim(f"deferred_stealthy_{rname}", f"{rname}: deferred poisoning leaves clean "
              "test accuracy nearly unchanged (within 0.05 of the clean-trained model)",
              abs(acc_gap) <= 0.05, f"clean accuracy {d['clean_acc']:.3f} vs "
              f"{c['clean_acc']:.3f}")
    nd = c["robust"]["noise_acc"][sig] - d["robust"]["noise_acc"][sig]
    pd = c["robust"]["pgd_acc"] - d["robust"]["pgd_acc"]
    rep.claim(f"deferred_effect_{rname}", f"{rname}: the effect is deferred: under "
              f"Gaussian noise (sigma {sig}) or an l_inf PGD of eps {cfg.pgd_eps} the "
              "poisoned model loses at least 0.05 more accuracy than the clean model",
              max(nd, pd) >= 0.05, f"noise accuracy {d['robust']['noise_acc'][sig]:.3f} "
              f"vs {c['robust']['noise_acc'][sig]:.3f}; PGD accuracy "
              f"{d['robust']['pgd_acc']:.3f} vs {c['robust']['pgd_acc']:.3f}")
    fires = d["robust"].get("curvature_fires")
    if fires is not None:
        rep.claim(f"deferred_visible_{rname}", f"{rname}: it is visible to curvature: at "
                  "clean test inputs the poisoned model's top input-Hessian eigenvalue "
                  "exceeds the clean model's 95% quantile at least 4x as often as the "
                  "clean model's does (0.05)", fires >= 0.2,
                  f"fires at {fires:.2f} of inputs; median top eigenvalue "
                  f"{d['robust']['top_eig_median']:.3g} vs {c['robust']['top_eig_median']:.3g}")
    if "penalty" in rows["deferred"] and "robust" in rows["deferred"]["penalty"]:
        p, cp = rows["deferred"]["penalty"], rows["clean"]["penalty"]
        pn = cp["robust"]["noise_acc"][sig] - p["robust"]["noise_acc"][sig]
        pp = cp["robust"]["pgd_acc"] - p["robust"]["pgd_acc"]
        worst, pworst = max(nd, pd), max(pn, pp)
        rep.claim(f"deferred_penalty_{rname}", f"{rname}: the input-gradient penalty "
                  "counters it: the poisoned model's extra loss of robust accuracy (noise "
                  "or PGD, against the clean model under the same training) at least "
                  "halves", None if worst < 0.05 else pworst <= worst / 2,
                  f"extra loss {worst:.3f} undefended, {pworst:.3f} with the penalty "
                  f"(noise accuracy {p['robust']['noise_acc'][sig]:.3f}, PGD "
                  f"{p['robust']['pgd_acc']:.3f})")


def optimal_claim(rep, cfg, rows: Dict[str, Any], meta: Dict[str, Any]) -> None:
    """The optimised poison against every clone placement on the frontier, at the
    triggered points it was optimised on, under the clean curvature threshold."""
    placements = meta["frontier"]["placements"]
    feas = {(name, m): p["asr"][i] for name, p in placements.items()
            for i, m in enumerate(meta["frontier"]["ms"]) if p["feasible"][i]}
    clones = {k: v for k, v in feas.items() if not k[0].startswith("optimal")}
    opt = {k: v for k, v in feas.items() if k[0].startswith("optimal")}
    best_c = max(clones.items(), key=lambda kv: kv[1]) if clones else None
    best_o = max(opt.items(), key=lambda kv: kv[1]) if opt else None
    ok = None if best_o is None else (best_c is None or best_o[1] > best_c[1])
    ev = (f"under the clean 95% curvature quantile {meta['threshold']:.4g} at "
          f"{cfg.opt_points} triggered points: best optimised {best_o[0][0]} (m = "
          f"{best_o[0][1]}) ASR {best_o[1]:.2f}" if best_o else "no feasible optimised poison")
    ev += (f"; best clone placement {best_c[0][0]} (m = {best_c[0][1]}) ASR {best_c[1]:.2f}"
           if best_c else "; no clone placement stays under the threshold")
    if "optimal" in rows and "none" in rows["optimal"]:
        ev += (f". Over all patch-triggered test inputs (undefended, refitted): optimal {rows['optimal']['none']['asr']['patch']:.2f}"
               + "".join(f", {a} {rows[a]['none']['asr']['patch']:.2f}"
                         for a in ("clone", "near_clone") if a in rows and "none" in rows[a]))
    rep.claim("optimal_invisible", "kernel: the optimised poison reaches a higher ASR than "
              "any clone placement (the prototype clone, near clones at "
              f"{', '.join(f'{r:g}' for r in cfg.frontier_r)} l) at the same visibility "
              "(all under the detector's threshold)", ok, ev, ["frontier.png"])


def suppression(rep, cfg, rname, rows) -> None:
    parts = []
    for d in cfg.defences:
        sup = [a for a in rows if a not in ("clean", "deferred") and d in rows[a]
               and _asr(rows[a][d], a) <= rows[a][d]["alone"] + cfg.suppress_margin]
        parts.append(f"{d}: {', '.join(sup) or 'none'} (clean accuracy "
                     f"{rows['clean'][d]['clean_acc']:.3f})")
    rep.measurement(f"suppressed_{rname}", f"{rname}: the attacks each defence suppresses "
                    f"(ASR within {cfg.suppress_margin} of the trigger-alone ASR)",
                    "; ".join(parts))


def claims(rep, cfg) -> None:
    table = rep.results["table"]
    for rname, rows in table.items():
        for a, row in rows.items():
            for cell in row.values():
                n_p = cell.get("n_poison")
                if "poisons_dropped" in cell and n_p:
                    cell["poison_drop_rate"] = cell["poisons_dropped"] / n_p
        if "epic" in cfg.defences:
            epic_claim(rep, cfg, rname, rows)
        deferred_claims(rep, cfg, rname, rows)
        suppression(rep, cfg, rname, rows)
    if "kernel" in table and rep.results.get("optimal"):
        optimal_claim(rep, cfg, table["kernel"], rep.results["optimal"])


def cell_text(cell, attack, cfg) -> str:
    if attack == "deferred":
        r = cell.get("robust")
        if not r:
            return f"acc {cell['clean_acc']:.2f}"
        s = f"{max(cfg.noise_sigmas):g}"
        return f"acc {cell['clean_acc']:.2f}, noise {r['noise_acc'][s]:.2f}, PGD " \
               f"{r['pgd_acc']:.2f}"
    txt = f"{_asr(cell, attack):.2f} ({cell['alone']:.2f}) / {cell['clean_acc']:.2f}"
    det = cell.get("detection_by_trigger", {}).get(attack if attack in ISOLATED else "patch")
    au = det["auroc"] if det else cell.get("auroc")
    return txt + (f" [{au:.2f}]" if au is not None else "")


def table_markdown(table: Dict[str, Any], cfg) -> str:
    lines: List[str] = ["## The matrix", "",
                        "Each cell: ASR (trigger-alone ASR) / clean accuracy [detection "
                        "AUROC where the defence detects]. Deferred: clean accuracy, "
                        f"accuracy under noise sigma {max(cfg.noise_sigmas)} and under "
                        f"PGD eps {cfg.pgd_eps}. The curvature column's ASR is over the "
                        f"first {cfg.n_eval} triggered inputs, rejected ones not counted "
                        "as successes.", ""]
    for rname, rows in table.items():
        ds = list(cfg.defences)
        lines += [f"### {rname} regime", "", "| attack | " + " | ".join(ds) + " |",
                  "|---|" + "---|" * len(ds)]
        for a, row in rows.items():
            if a == "clean":
                continue
            lines.append(f"| {a} | " + " | ".join(cell_text(row[d], a, cfg) if d in row else ""
                                                   for d in ds) + " |")
        lines.append("")
    return "\n".join(lines)


def effect(cell, attack, ref) -> float:
    """The heatmap's number: ASR - trigger-alone ASR; for the deferred attack the extra
    accuracy lost under the largest noise against the clean model of that defence."""
    if attack == "deferred":
        r, c = cell.get("robust"), ref.get("robust")
        if not r or not c:
            return float("nan")
        s = max(r["noise_acc"], key=float)
        return c["noise_acc"][s] - r["noise_acc"][s]
    return _asr(cell, attack) - cell["alone"]


