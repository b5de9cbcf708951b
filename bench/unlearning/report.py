"""The report: Markdown tables, a reading computed from the numbers, caveats, and plots."""

from __future__ import annotations

import math
from pathlib import Path

from bench.common import md_row, reading_and_caveats

IR = "instance_removal"
HEADLINE = "product"  # the product's default path: the headline row of every task
# A rise of the retained rows' NLL beyond this (nats per token, over the original's) is
# called broken utility in the reading: the trained rows sit near 0.01-0.1 nats and the
# never-seen level of this data is ~1-2, so such a model has lost what it should keep.
UTILITY_BROKEN_NATS = 1.0


def _f(x, fmt: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _ok(rec: dict | None) -> bool:
    return bool(rec) and rec.get("status") == "ok"


ATTACK_SHORT = {"loss": "loss", "reference": "ref", "mink": "mink"}


def _attacks(v: dict | None) -> str:
    if not v or not v.get("attacks"):
        return "none"
    return "/".join(f"{ATTACK_SHORT.get(k, k)} {_f(a['auc'])}" for k, a in v["attacks"].items())


def product_note(rec: dict) -> str:
    """The product row's notes: its time (the one-off factor fit apart), its own verdict on
    the calibration people beside the benchmark's re-measurement on never-trained people."""
    info = rec.get("info") or {}
    parts = []
    fit = info.get("factor_fit_seconds")
    wall = info.get("erase_wall_seconds")
    if fit is not None and wall is not None:
        parts.append(f"erase {_f(wall, '.1f')} s incl. one-off factor fit {_f(fit, '.1f')} s "
                     f"(without it {_f(wall - fit, '.1f')} s)")
    elif wall is not None:
        parts.append(f"erase {_f(wall, '.1f')} s, factors from the cache")
    v = info.get("verdict")
    if v:
        parts.append(f"product verdict ({v.get('holdout_rows') or info.get('holdout_rows')} calibration rows): "
                     f"{'pass' if v.get('passed') else 'FAIL'}, AUC {_attacks(v)}, {v.get('steps', 0)} refine steps"
                     + (f" ({v['trials']} line-search trials)" if v.get("trials") else "")
                     + (f", {_f(v['seconds'], '.0f')} s" if v.get("seconds") is not None else ""))
    b = rec.get("benchmark_verdict")
    if b:
        parts.append(f"benchmark re-measure ({b['holdout_rows']} never-trained rows): "
                     f"{'pass' if b['passed'] else 'FAIL'}, AUC {_attacks(b)}")
    budget = info.get("verify_budget") or {}
    if budget.get("reduced"):
        parts.append(f"REDUCED verify budget ({budget['max_steps']} steps / {budget['max_seconds']:g} s, quick mode)")
    return "; ".join(parts)


def _solve_note(rec: dict) -> str:
    info = rec.get("info") or {}
    if "product_verdict" in info:
        return product_note(rec)
    if "residual" in info or "iterations" in info:
        parts = [f"{info.get('solver')}{'/' + info['preset'] if info.get('preset') else ''}"]
        if info.get("iterations") is not None:
            parts.append(f"{info['iterations']} it")
        if info.get("residual") is not None:
            parts.append(f"res {info['residual']:.1e}" + ("" if info.get("converged") else " (unconverged)"))
        if info.get("factor_source"):
            parts.append(f"factors {info['factor_source']}")
        return ", ".join(parts)
    if "steps" in info and "stopped" in info:
        return f"{info['steps']} refine steps: {info['stopped']}"
    if "epochs" in info:
        return f"{info['epochs']} epochs on {info['rows']} rows"
    if "steps" in info:
        return f"{info['steps']} steps, lr {info['lr']:g}"
    return ""


def verdict(rec: dict) -> str:
    """What the product would do with this result: the influence step's utility check
    (eraser.unlearn.UtilityCheck), or verification under enforce for the +refine rows."""
    info = rec.get("info") or {}
    if "product_verdict" in info:
        return info["product_verdict"] if info.get("published") else refusal(info)
    if "passed" in info and "verdict" in info:
        if info["passed"]:
            return "verified"
        failed = info["verdict"]
        why = [w for k, w in (("still look trained", "still trained"), ("over-forgotten", "over-forgotten"),
                              ("retained rows", "utility")) if k in failed]
        return "refused: " + ", ".join(why or [failed])
    check = info.get("utility_check")
    if check:
        return "published" if check["passed"] else f"refused: utility {check['rise']:+.2f}"
    return ""


def refusal(info: dict) -> str:
    """The product's refusal in a few words: what failed (from its error and its verdict)."""
    text = info.get("product_verdict") or "refused"
    why = [w for k, w in (("no admissible step", "no admissible step"),
                          ("still look trained", "still trained"), ("over-forgotten", "over-forgotten"),
                          ("still stand out", "rows stand out"), ("still reproduced", "still reproduced"),
                          ("not learned", "corrections not learned"), ("old answer", "old answer given"),
                          ("retained rows", "utility")) if k in text]
    return "refused: " + (", ".join(why) if why else text[len("refused: "):][:80])


def _columns(kind: str) -> list[tuple[str, callable]]:
    def probe(name, key, fmt=".2f"):
        return lambda r: _f(r["probes"][name][key], fmt) if name in r["probes"] else "n/a"

    cols = [("method", None)]
    if kind == IR:
        cols += [("forget NLL", probe("forget", "nll")), ("forget EM", probe("forget", "exact_match")),
                 ("paraphrase EM", probe("forget_para", "exact_match"))]
    else:
        cols += [("old NLL", probe("old", "nll")), ("old EM", probe("old", "exact_match")),
                 ("new NLL", probe("new", "nll")), ("new EM", probe("new", "exact_match")),
                 ("new para. EM", probe("new_para", "exact_match"))]
    tgt = "forget" if kind == IR else "old"
    cols += [(f"{tgt} EM after relearn", lambda r: _f((r.get("relearn") or {}).get("exact_match"))),
             (f"{tgt} EM bf16", lambda r: _f(((r.get("bf16") or {}).get(tgt) or {}).get("exact_match")))]
    cols += [("retain NLL", probe("retain", "nll")), ("retain EM", probe("retain", "exact_match")),
             ("retain para. EM", probe("retain_para", "exact_match")), ("never NLL", probe("never", "nll")),
             ("MIA AUC", lambda r: _f(r.get("mia_auc"))),
             ("recovery", lambda r: _f(r.get("recovery_target"))),
             ("cos scratch", lambda r: _f(r.get("cosine_scratch"))),
             ("cos warm", lambda r: _f(r.get("cosine_warm"))),
             ("seconds", lambda r: _f(r.get("seconds"), ".1f")),
             ("CPU s", lambda r: _f(r.get("cpu_seconds"), ".0f")),
             ("peak RSS MB (rise)", lambda r: f"{_f(r.get('rss_peak_mb'), '.0f')} ({_f(r.get('rss_increase_mb'), '+.0f')})"),
             ("product", verdict),
             ("notes", _solve_note)]
    return cols


def task_table(task: dict) -> list[str]:
    cols = _columns(task["kind"])
    lines = [md_row(c for c, _ in cols), md_row("---" if i == 0 or c == "notes" else "---:"
                                              for i, (c, _) in enumerate(cols))]
    for name, rec in task["methods"].items():
        label = f"**{name}**" if name == HEADLINE else name
        if _ok(rec):
            lines.append(md_row([label] + [fn(rec) for _, fn in cols[1:]]))
        else:
            lines.append(md_row([label] + ["—"] * (len(cols) - 2) + [f"{rec['status']}: {rec.get('reason', '')}"]))
    return lines


def verdict_table(task: dict) -> list[str]:
    """The product's membership verdict (its calibration people) beside the same verdict
    re-measured by the benchmark on its never-trained people, and the relearning and bf16
    probes, for the rows that have them."""
    target = task["target_probe"]
    rows = [(n, r) for n, r in task["methods"].items() if _ok(r) and r.get("benchmark_verdict")]
    if not rows:
        return []
    lines = [md_row(["adapter", "product verdict (calibration people)", "product AUC loss/ref/mink",
                     "benchmark verdict (never-trained people)", "benchmark AUC loss/ref/mink", "agree",
                     f"{target} NLL / EM", "after relearn NLL / EM", "bf16 NLL / EM"]),
             md_row(["---"] + ["---:"] * 8)]
    for name, rec in rows:
        info = rec.get("info") or {}
        v, b = info.get("verdict"), rec["benchmark_verdict"]
        mine = "—" if not v else ("pass" if v["passed"] else "fail") + (
            "" if v.get("judged") else " (no membership verdict)")
        agree = "—" if not v or not v.get("attacks") else ("yes" if _membership_passed(v) == b["passed"] else "**NO**")
        p, rl, bf = rec["probes"][target], rec.get("relearn") or {}, (rec.get("bf16") or {}).get(target) or {}
        lines.append(md_row([f"**{name}**" if name == HEADLINE else name, mine, _attacks(v) if v else "—",
                             "pass" if b["passed"] else "fail: " + _short_failures(b), _attacks(b), agree,
                             f"{_f(p['nll'])} / {_f(p['exact_match'])}",
                             f"{_f(rl.get('nll'))} / {_f(rl.get('exact_match'))}",
                             f"{_f(bf.get('nll'))} / {_f(bf.get('exact_match'))}"]))
    return lines


def _short_failures(b: dict) -> str:
    out = [f"{ATTACK_SHORT.get(k, k)} {'high' if a['auc'] > a['high'] else 'low' if a['auc'] < a['low'] else 'rows'}"
           for k, a in b["attacks"].items() if not a["passed"]]
    if b.get("recalled"):
        out.append(f"{b['recalled']} recalled")
    return ", ".join(out) or "?"


def _membership_passed(v: dict) -> bool:
    """The product's membership verdict alone (every attack inside its bounds, nothing recalled)."""
    return all(a["passed"] for a in v["attacks"].values()) and not v.get("recalled")


def markdown(result: dict) -> str:
    m, s, d = result["machine"], result["settings"], result["data"]
    dev = m["device"] if m.get("gpu") is None else f"{m['device']} ({m['gpu']})"
    lines = [
        f"# Unlearning benchmark ({result['mode']}, {dev})",
        "",
        f"{s['model']}, LoRA r={s['rank']} on {', '.join(s['targets'])} ({s['parameters']:,} parameters), fine-tuned "
        f"{s['epochs']} epochs at lr {s['lr']:g} (batch {s['batch_size']}) on synthetic facts (devtools.synthetic, "
        f"{d['facts_per_person']} facts per person, each with a training question and a never-trained paraphrase). "
        f"Clean set: {d['clean_people']} people ({d['clean_rows']} rows); corrupted set: {d['corrupted_people']} people "
        f"({d['corrupted_rows']} rows, {d['corrupted_answers']} wrong answers, {d['corrupted_questions']} wrong "
        f"questions); {d['held_out_people']} never-trained people ({d['held_out_rows']} rows) for the never-seen "
        f"reference and utility; {d['calibration_people']} more never-trained people for +refine's calibration only. "
        f"torch {m['torch']}, {m['torch_threads']} threads, {m['cpu_count']} CPUs "
        f"({m.get('cpu_model') or m['processor']}). Total run {result['total_seconds']:.0f} s "
        f"({_f(result.get('total_cpu_seconds'), '.0f')} CPU seconds).",
        "",
        "## Original adapters",
        "",
        md_row(["training set", "rows", "epochs", "seconds", "train NLL", "greedy recall (trained questions)",
                "teacher-forced EM agrees with greedy"]),
        md_row(["---", "---:", "---:", "---:", "---:", "---:", "---:"]),
    ]
    for name, q in result["originals"].items():
        agree = (f"{q['greedy_agrees_with_teacher_forced']}/{q['greedy_checked_rows']}"
                 if q.get("greedy_checked_rows") else "not checked")
        lines.append(md_row([name, q["rows"], q["epochs"], _f(q["seconds"], ".0f"), _f(q["train_nll"], ".3f"),
                             _f(q.get("greedy_recall")), agree]))
    lines += ["", "## Methods", ""]
    for name, meta in result["methods"].items():
        lines.append(f"- `{name}`: {meta['description']}" + (" (optional)" if meta["optional"] else ""))
    lines += [
        "",
        "Columns: NLL is the mean response NLL (nats/token); EM is greedy exact match (teacher-forced, see the "
        "caveats); *forget*/*old* are the affected rows as trained (RC: the wrong answer; QM: the answer under the "
        "wrong question), *new* the corrected rows, *para.* their never-trained paraphrases; *retain* are trained "
        "rows no request touches, *never* the never-trained people. MIA AUC: loss attack between the forget/old rows "
        "and the never-trained rows (0.5 = indistinguishable, 1 = all remembered). recovery: the method's change of "
        "the forget/old NLL as a share of retraining from scratch's (1 = as far as retraining). cos: cosine of the "
        "parameter change with retraining's (from scratch / warm). seconds: the method's wall time (for +refine "
        "including the influence step before it); CPU s: the process's CPU time during the method's own call "
        "(all threads; less inflated than wall time when other processes share the CPU). product: what the "
        "sidecar would do with the result: for an influence step its utility check (the mean NLL of a seeded "
        "sample of retained training rows may rise by at most 0.3 nats, else the job fails and nothing is "
        "published), for +refine verification under enforce (verified, or refused and why); for **product** (the "
        "headline row: the product's default erase path run through eraser.unlearn.erase) whether it published or "
        "refused, and why. *EM after relearn*: the affected rows' greedy exact match after a few fine-tuning steps on "
        "other people's retained rows (relearning attack; original, retrain-scratch and product only). *EM bf16*: "
        "the same in bfloat16 (served precision). The table under each task sets the product's own membership "
        "verdict (on its calibration people) beside the same verdict re-measured on the benchmark's never-trained "
        "people.",
    ]
    for tname, task in result["tasks"].items():
        lines += ["", f"## {tname}", "", task["title"] + ".", ""] + task_table(task)
        vt = verdict_table(task)
        if vt:
            lines += ["", "The product's membership verdict re-measured on people it never saw, and the robustness "
                      "probes:", ""] + vt
    if result.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in result["plots"]]
    return "\n".join(lines + reading_and_caveats(result)) + "\n"


# --------------------------------------------------------------------------- reading


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def broken(rec: dict) -> bool:
    """Whether a method's result lost the retained rows (see UTILITY_BROKEN_NATS)."""
    change = rec.get("retain_nll_change")
    return _ok(rec) and (change is None or not change <= UTILITY_BROKEN_NATS)


def _task_reading(tname: str, task: dict) -> list[str]:
    methods = task["methods"]
    target = task["target_probe"]
    orig, scratch = methods.get("original"), methods.get("retrain-scratch")
    if not (_ok(orig) and _ok(scratch)):
        return [f"{tname}: no original or scratch retraining to compare with"]
    o, r = orig["probes"], scratch["probes"]
    what = "forget" if target == "forget" else "old-row"
    head = (f"{tname}: retraining from scratch moved the {what} NLL {o[target]['nll']:.2f} → {r[target]['nll']:.2f} "
            f"(never-trained people: {r['never']['nll']:.2f}), exact match {o[target]['exact_match']:.2f} → "
            f"{r[target]['exact_match']:.2f}, MIA AUC {_f(orig['mia_auc'])} → {_f(scratch['mia_auc'])}")
    if "new" in o:
        head += f"; corrected rows' NLL {o['new']['nll']:.2f} → {r['new']['nll']:.2f} (EM {r['new']['exact_match']:.2f})"
    head += f"; it took {scratch['seconds']:.0f} s."
    subs = []
    order = sorted(methods, key=lambda n: n != HEADLINE)  # the product's default path first
    for name in order:
        rec = methods[name]
        if name in ("original", "retrain-scratch"):
            continue
        if not _ok(rec):
            subs.append(f"{name}: {rec['status']} ({rec.get('reason', '')})")
            continue
        p = rec["probes"]
        gap = p[target]["nll"] - r[target]["nll"]
        rcv = rec.get("recovery_target")
        side = "short of" if gap < 0 else "beyond"
        text = (f"{name}: {what} NLL {p[target]['nll']:.2f}, {abs(gap):.2f} nats {side} retraining "
                f"({_f(rcv * 100 if rcv is not None else None, '.0f')}% of its rise); EM {p[target]['exact_match']:.2f} "
                f"vs {r[target]['exact_match']:.2f}; AUC {_f(rec['mia_auc'])} vs {_f(scratch['mia_auc'])}")
        if "new" in p:
            text += f"; corrected NLL {p['new']['nll']:.2f} vs {r['new']['nll']:.2f}"
        if broken(rec):
            text = "UTILITY BROKEN: " + text
        text += (f"; retained NLL {rec['retain_nll_change']:+.2f} and never-trained NLL "
                 f"{rec['never_nll_change']:+.2f} vs the original; cosine with scratch/warm "
                 f"{_f(rec.get('cosine_scratch'))}/{_f(rec.get('cosine_warm'))}")
        if rec.get("seconds") and scratch.get("seconds"):
            text += f"; {rec['seconds']:.1f} s ({rec['seconds'] / scratch['seconds']:.2g}× retraining's time)"
        if name == HEADLINE:
            text = "HEADLINE (the product's default path, " + verdict(rec) + "): " + text + _probe_text(rec, scratch, orig, target)
        subs.append(text + ".")
    return [head + "".join(f"\n  - {x}" for x in subs)]


def _probe_text(rec: dict, scratch: dict, orig: dict, target: str) -> str:
    info = rec.get("info") or {}
    out = ""
    fit = info.get("factor_fit_seconds")
    if fit is not None:
        out += f" (of which {fit:.1f} s the one-off factor fit)"
    rl = lambda r: (r.get("relearn") or {}).get("exact_match")  # noqa: E731
    bf = lambda r: ((r.get("bf16") or {}).get(target) or {}).get("exact_match")  # noqa: E731
    out += (f"; after {((rec.get('relearn') or {}).get('steps'))} relearning steps on other people's rows its {target} "
            f"EM is {_f(rl(rec))} (retraining from scratch {_f(rl(scratch))}, the original {_f(rl(orig))}); in bf16 "
            f"{_f(bf(rec))} (fp32 {_f(rec['probes'][target]['exact_match'])})")
    return out


def disagreements(result: dict) -> list[str]:
    """Where the product's membership verdict (calibration people) and the benchmark's
    re-measurement (never-trained people) differ, per task."""
    out = []
    for tname, task in result["tasks"].items():
        rec = task["methods"].get(HEADLINE)
        if not _ok(rec) or not rec.get("benchmark_verdict"):
            continue
        v, b = (rec.get("info") or {}).get("verdict"), rec["benchmark_verdict"]
        if not v or not v.get("attacks"):
            continue
        mine = _membership_passed(v)
        if mine != b["passed"] or any(a.get("passed") != b["attacks"].get(k, {}).get("passed")
                                      for k, a in v["attacks"].items()):
            diff = ", ".join(f"{k} {_f(a['auc'])}{'✓' if a['passed'] else '✗'} vs {_f(b['attacks'][k]['auc'])}"
                             f"{'✓' if b['attacks'][k]['passed'] else '✗'}" for k, a in v["attacks"].items()
                             if k in b["attacks"])
            out.append(f"{tname}: product {'pass' if mine else 'fail'} vs benchmark {'pass' if b['passed'] else 'fail'}"
                       f" ({diff})" + ("" if rec["info"].get("published") else "; the refused candidate was not "
                                       "written, so the benchmark re-measured the original that stays served"))
    return out


def reading(result: dict) -> list[str]:
    out = []
    for q_name, q in result["originals"].items():
        if q.get("greedy_recall") is not None:
            out.append(f"The {q_name} original reached train NLL {q['train_nll']:.3f} and greedy recall "
                       f"{q['greedy_recall']:.2f} on its {q['rows']} training questions.")
    for tname, task in result["tasks"].items():
        out += _task_reading(tname, task)
    # Across tasks: how close each method gets to retraining, on average.
    names = list(result["methods"])
    summary = []
    for name in names:
        if name in ("original", "retrain-scratch"):
            continue
        recs = [t["methods"].get(name) for t in result["tasks"].values()]
        recs = [x for x in recs if _ok(x)]
        if not recs:
            continue
        rcv = [x["recovery_target"] for x in recs if x.get("recovery_target") is not None]
        gaps = []
        for t in result["tasks"].values():
            x, sc = t["methods"].get(name), t["methods"].get("retrain-scratch")
            if _ok(x) and _ok(sc) and x.get("mia_auc") is not None and sc.get("mia_auc") is not None:
                gaps.append(abs(x["mia_auc"] - sc["mia_auc"]))
        worst_retain = max(x["retain_nll_change"] for x in recs)
        summary.append(f"{name}: median recovery {_f(_median(rcv))} (range {_f(min(rcv) if rcv else None)} to "
                       f"{_f(max(rcv) if rcv else None)}) of retraining's forget/old-NLL change over {len(recs)} "
                       f"task(s); mean |AUC − retraining's| {_f(sum(gaps) / len(gaps) if gaps else None)}; worst "
                       f"retained-NLL change {worst_retain:+.2f}")
    if summary:
        out.append("Across tasks:" + "".join(f"\n  - {x}." for x in summary))
    bad = [f"{name} on {tname} ({rec['retain_nll_change']:+.2f})" for tname, task in result["tasks"].items()
           for name, rec in task["methods"].items() if broken(rec)]
    out.append(f"Broken utility (retained NLL up by more than {UTILITY_BROKEN_NATS:g} nat over the original): "
               + (", ".join(bad) if bad else "none") + ".")
    if any(_ok(t["methods"].get(HEADLINE)) for t in result["tasks"].values()):
        dis = disagreements(result)
        out.append("The product's membership verdict vs the benchmark's re-measurement on never-trained people "
                   "(per attack, ✓ inside the product's bounds): " + ("; ".join(dis) if dis else "no disagreement")
                   + ".")
    refused = [f"{name} on {tname} ({verdict(rec)[len('refused: '):]})" for tname, task in result["tasks"].items()
               for name, rec in task["methods"].items() if _ok(rec) and verdict(rec).startswith("refused")]
    out.append("Refused by the product's checks (nothing would be published): "
               + (", ".join(refused) if refused else "none") + ".")
    return out


def caveats(result: dict) -> list[str]:
    m, s = result["machine"], result["settings"]
    out = [result["note"]] if result.get("note") else []
    if result["mode"] == "quick":
        out.append("quick mode: tiny sets and capped solves, a smoke test; the numbers mean little")
    start = (m.get("loadavg_start") or [0.0])[0]
    end = (m.get("loadavg_end") or [0.0])[0]
    cores = m.get("cpu_affinity") or m.get("cpu_count") or 1
    if m["device"] == "cpu" and max(start, end) > 0.5 * cores:
        out.append(f"load average {start:.2f} at the start and {end:.2f} at the end on {cores} cores: other processes "
                   "competed for the CPU, so seconds are inflated unevenly; compare times as rough ratios")
    checked = [q for q in result["originals"].values() if q.get("greedy_checked_rows")]
    if checked:
        agree = sum(q["greedy_agrees_with_teacher_forced"] for q in checked)
        total = sum(q["greedy_checked_rows"] for q in checked)
        out.append(f"exact match is computed teacher-forced (every response token up to the end-of-turn token is the "
                   f"argmax), which is what greedy decoding reproduces; checked against real greedy generation on the "
                   f"originals' training questions: {agree}/{total} rows agree")
    aucs = []
    for task in result["tasks"].values():
        k, n = task["probe_rows"][task["target_probe"]], task["probe_rows"]["never"]
        aucs.append((k, n, math.sqrt((k + n + 1) / (12 * k * n))))
    if aucs:
        worst = max(aucs, key=lambda x: x[2])
        out.append(f"the MIA AUC compares few rows (as few as {worst[0]} affected vs {worst[1]} never-trained rows: "
                   f"standard error about {worst[2]:.2f} for exchangeable sets), one seed; read differences below "
                   "about 0.2 as noise")
    for tname, task in result["tasks"].items():
        scratch = task["methods"].get("retrain-scratch")
        if task["kind"] != IR and _ok(scratch) and scratch.get("mia_auc") is not None and scratch["mia_auc"] > 0.75:
            out.append(f"{tname}: even retraining from scratch leaves the old rows' AUC at {scratch['mia_auc']:.2f}: "
                       "the old and corrected rows share their sentence frame and differ in a few tokens, so the old "
                       "row's NLL stays below never-trained rows' after the correction; the AUC says little here")
    cg = [t["methods"].get("llmeraser-cg") for t in result["tasks"].values()]
    cg = [x["info"] for x in cg if _ok(x)]
    if cg:
        unconv = [x for x in cg if not x.get("converged")]
        rows = cg[0].get("curvature_rows")
        text = (f"llmeraser-cg: GGN over {rows} training row(s) ({'every row' if s['curvature_rows'] is None else 'a seeded sample'}),"
                f" damping {s['damping']:g}, tolerance {s['cg_tolerance']:g}, at most {s['cg_max_iterations']} "
                f"iterations; residuals {', '.join(_f(x.get('residual'), '.1e') for x in cg)}")
        if unconv:
            text += f"; {len(unconv)} of {len(cg)} solves did NOT converge (applied anyway, as stated)"
        out.append(text)
    if any(_ok(t["methods"].get("llmeraser-paper")) for t in result["tasks"].values()):
        out.append("llmeraser-paper is unconverged by design (the paper's 20 Adam steps at lr 1e-5 move each "
                   "coordinate by at most about 2e-4); its residual is reported, not hidden")
    else:
        out.append("llmeraser-paper, llmeraser-cg and the first-order +refine rows run at the full size only")
    out.append(f"retrain-warm runs {s['warm_epochs']} epoch(s) from the original adapter, fewer than the original's "
               f"{s['epochs']}; gradient-ascent runs {s['ga_steps']} AdamW steps at lr {s['ga_lr']:g}")
    out.append(f"+refine is capped at {s['refine_max_steps']} refinement steps here to bound the run (the product's "
               "budget is 200 steps or 600 s, eraser.verify.VerifyConfig): a 'still trained' refusal at that cap is "
               "this benchmark's budget, where the sidecar would go on refining. Its verdict is judged on the "
               f"{result['data'].get('calibration_rows', '?')} calibration rows, while the table's MIA AUC uses the "
               "evaluation's never-trained people, so the two can disagree by the AUC's sampling noise")
    ek = [t["methods"].get("llmeraser-ekfac") for t in result["tasks"].values()]
    if any(_ok(x) for x in ek):
        out.append("llmeraser-ekfac's time includes fitting the factors on the first task of each original adapter; "
                   "later tasks on the same adapter reuse them (info.factor_source says which)")
    prod = [t["methods"].get(HEADLINE) for t in result["tasks"].values()]
    prod = [x for x in prod if _ok(x)]
    if prod:
        budget = prod[0]["info"].get("verify_budget") or {}
        out.append("product: eraser.unlearn.erase with eraser.configure.product_erase_config(has_holdout=True) on files, "
                   "as the sidecar calls it, minus factors_out (the next version's factor cache, prepared after the "
                   "adapter is written; the adapter is the same either way); it loads its own copy of the base model "
                   "in every call (in its seconds). Its holdout is the calibration people, never the evaluation's "
                   "never-trained people. A refused erase writes nothing, so the row then scores the original "
                   "adapter, what stays served; its verdict column gives the reason. Verification budget: "
                   + (f"REDUCED to {budget.get('max_steps')} steps / {budget.get('max_seconds'):g} s (quick mode)"
                      if budget.get("reduced") else f"the product's own ({budget.get('max_steps')} steps / "
                      f"{budget.get('max_seconds'):g} s)"))
    probed = [t["methods"].get("product", {}).get("relearn") for t in result["tasks"].values()]
    probed = [x for x in probed if x]
    if probed:
        out.append(f"relearning attack: {probed[0]['steps']} AdamW steps at lr {probed[0]['lr']:g} (the training lr, "
                   f"batch {s['batch_size']}) on {probed[0]['rows']} retained rows of people no request touches (a "
                   "seeded sample, not the retain probe), then the erased/old rows are scored again; run on the "
                   "original, retraining from scratch and the product only. bf16: a copy of the model and adapter "
                   "cast to bfloat16 for evaluation only (weights and activations), same rows")
    out.append("peak RSS is the whole process's (base model, tokenizer and all held adapters included), sampled "
               "every 20 ms; the JSON also has the rise over the level before each method")
    return out


# --------------------------------------------------------------------------- plots


def plots(result: dict, out: Path, stem: str) -> list[str]:
    """Forgetting vs utility per task, and time per method (log scale); returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    names = list(result["methods"])
    cmap = plt.get_cmap("tab10")
    bases = [n for n in names if "+" not in n]
    # A "+refine" variant takes its base method's colour and a triangle marker.
    colour = {n: cmap(bases.index(n.split("+")[0]) % 10) if n.split("+")[0] in bases else "grey" for n in names}
    colour["retrain-scratch"] = "black"
    marker = {n: "*" if n == "retrain-scratch" else "D" if n == HEADLINE else "^" if "+" in n else "o" for n in names}
    if HEADLINE in colour:
        colour[HEADLINE] = "red"
    tasks = result["tasks"]
    files = []

    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax, (tname, task) in zip(axes.flat, tasks.items()):
        target = task["target_probe"]
        never = None
        for name, rec in task["methods"].items():
            if not _ok(rec):
                continue
            x, y = rec["probes"][target]["nll"], rec["probes"]["retain"]["nll"]
            ax.scatter([x], [y], color=colour[name], s=90 if name == "retrain-scratch" else 40, label=name,
                       zorder=3, marker=marker[name], alpha=0.85)
            if name == "original":
                never = rec["probes"]["never"]["nll"]
        if never is not None:
            ax.axvline(never, color="grey", ls="--", lw=1, label="never-trained NLL (original)")
        ax.set_title(tname)
        ax.set_xlabel(f"{'forget' if target == 'forget' else 'old (wrong) row'} NLL  (forgetting →)")
        ax.set_ylabel("retained rows' NLL  (↑ utility lost)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5, len(handles)), fontsize=8)
    fig.suptitle(f"Forgetting vs utility ({result['mode']})")
    fig.tight_layout(rect=(0, 0.1, 1, 0.96))
    name = f"{stem}-tradeoff.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    files.append(name)

    timed = [n for n in names if n != "original"]
    fig, ax = plt.subplots(figsize=(9, min(10.0, 1.5 + 0.16 * len(timed) * max(1, len(tasks)))))
    height = 0.8 / max(1, len(tasks))
    tcmap = plt.get_cmap("tab10")
    for j, (tname, task) in enumerate(tasks.items()):
        ys, xs = [], []
        for i, n in enumerate(timed):
            rec = task["methods"].get(n)
            if _ok(rec) and rec.get("seconds"):
                ys.append(i + j * height)
                xs.append(rec["seconds"])
        ax.barh(ys, xs, height=height, color=tcmap(j % 10), label=tname)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(timed))])
    ax.set_yticklabels(timed)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s, log scale)")
    ax.set_title(f"Time per method ({result['mode']}, {result['machine']['device']})")
    ax.grid(axis="x", alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = f"{stem}-time.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    files.append(name)
    return files
