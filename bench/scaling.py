"""Scaling benchmark: the cost of erasing one person (3 rows) against retraining, as N grows.

``python -m bench.scaling [--quick] [--device cpu|cuda] [--out bench/results]``

For each model and training-set size N (synthetic facts, 3 per person, nested sets), in
one process:

- train the adapter on the N rows (the "original"; its time is recorded, not compared);
- fit the EK-FAC factors for that adapter version and cache them on disk: a one-off cost
  per adapter version, timed apart from the erase;
- erase one person (3 rows) on the product's default path:
  ``eraser.configure.product_erase_config(has_holdout=True)`` through
  ``eraser.unlearn.erase`` with the cached factors and a held-out set of never-trained
  people (verification enforced, refinement included); its wall time, stage seconds,
  verdict, and the erased rows' NLL before/after;
- retrain from scratch on the N-3 remaining rows with the same hyper-parameters: measured
  end to end where affordable, else extrapolated from a timed probe of a fixed number of
  optimizer steps (model load + epochs x steps per epoch x seconds per step). Every
  figure is flagged "measured" or "extrapolated".

Models: the tiny random Llama the tests use (built and pre-trained on the spot), and
SmolLM2-135M-Instruct (``eraser prepare-model``). Results: ``<out>/scaling[-quick].json``,
``.md`` and ``.png`` (log-log seconds vs N).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.common import (loadavg, bench_parser, framed_caveats, machine_info, md_row, output_stem, pretrained_tiny_base, reading_and_caveats,
                          rendered, round_sig, write_outputs)

SCHEMA_VERSION = 1
TOP_KEYS = ("schema_version", "benchmark", "mode", "partial", "device", "machine", "settings", "models", "rows", "analysis",
            "total_seconds", "note", "caveats", "reading")
MEASURED, EXTRAPOLATED = "measured", "extrapolated"


@dataclass(frozen=True)
class ModelPlan:
    name: str  # "tiny" or "smollm2"
    measured: tuple[int, ...]  # sizes measured end to end (train, fit, erase, retrain)
    extrapolated: tuple[int, ...] = ()  # sizes where only retraining is estimated, from a probe
    epochs: int = 5
    lr: float = 1e-2
    rank: int = 4
    alpha: float = 8.0
    batch_size: int = 4
    probe_steps: int = 20  # optimizer steps timed to estimate a retrain (every size)


@dataclass(frozen=True)
class Settings:
    facts: int = 3  # per person; one person is erased
    holdout_people: int = 4  # never trained on: verification's held-out set (12 rows >= 8)
    seed: int = 0
    # tiny: pre-training of the base on other people's facts (knows the patterns, not the facts)
    tiny_pretrain_people: int = 40
    tiny_pretrain_steps: int = 300
    tiny_hidden: int = 64
    tiny_vocab: int = 512
    models: tuple[ModelPlan, ...] = field(default_factory=lambda: (
        ModelPlan("tiny", (60, 240, 960, 1920), epochs=10, lr=1e-2, rank=8, alpha=16.0, probe_steps=40),
        # 3 epochs at lr 2e-3 as bench.fastpath; measured at 60 and 120 rows, retraining
        # estimated at 480 and 1,920 from 20-step probes (keeps this model within ~25 min of CPU).
        ModelPlan("smollm2", (60, 120), (480, 1920), epochs=3, lr=2e-3, rank=8, alpha=16.0, probe_steps=20),
    ))

    @classmethod
    def quick(cls) -> "Settings":
        return cls(tiny_pretrain_people=10, tiny_pretrain_steps=20, tiny_hidden=32, tiny_vocab=300,
                   models=(ModelPlan("tiny", (30, 60), epochs=2, lr=1e-2, rank=2, alpha=4.0, probe_steps=4),))


# --------------------------------------------------------------------------- the run


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _people_rows(n_people: int, facts: int, seed: int):
    from eraser.data import Row
    from devtools.synthetic import facts_to_rows, generate_people

    return [Row(**r) for r in facts_to_rows(generate_people(n_people, facts, seed))]


def _base(plan: ModelPlan, s: Settings, rows, holdout, workdir: Path) -> tuple[Path, dict]:
    if plan.name == "smollm2":
        from eraser.pretrained import prepare_smollm2

        return Path(prepare_smollm2(progress=False)), {"base": "SmolLM2-135M-Instruct"}
    # Other people, drawn with another seed; any whose name is in the training or
    # held-out set is dropped, so pre-training never teaches a fact of theirs.
    names = {r.prompt for r in rows + holdout}
    others = [r for r in _people_rows(s.tiny_pretrain_people, s.facts, s.seed + 1000) if r.prompt not in names]
    t = time.perf_counter()
    base = pretrained_tiny_base(workdir / "tiny-base", [r.prompt + " " + r.response for r in rows + holdout + others],
                                others, hidden_size=s.tiny_hidden, intermediate_size=2 * s.tiny_hidden,
                                vocab_size=s.tiny_vocab, steps=s.tiny_pretrain_steps, seed=s.seed)
    return base, {"base": f"tiny Llama, hidden {s.tiny_hidden}, 2 layers, 2 heads, vocab {s.tiny_vocab}, pre-trained "
                          f"{s.tiny_pretrain_steps} steps on {len(others)} rows of other people (built on the spot)",
                  "build_seconds": round(time.perf_counter() - t, 2)}


def _train_config(plan: ModelPlan, seed: int):
    from eraser.train import TrainConfig

    return TrainConfig(rank=plan.rank, alpha=plan.alpha, epochs=plan.epochs, lr=plan.lr, batch_size=plan.batch_size,
                       seed=seed)


def _probe(base_dir: Path, rows, cfg, steps: int, device) -> dict:
    """Time a retrain's pieces: loading the base and attaching a fresh adapter, then
    ``steps`` optimizer steps (one epoch over steps x batch rows) after one warm-up step."""
    from eraser.model import load_base
    from eraser.train import fit, new_adapter

    t = time.perf_counter()
    base = load_base(base_dir, device)
    model = new_adapter(base, cfg)
    load = time.perf_counter() - t
    bs = cfg.batch_size
    fit(model, base.tokenizer, rows[:bs], replace(cfg, epochs=1), device)  # warm-up step, not timed
    picked = rows[: steps * bs]
    t = time.perf_counter()
    fit(model, base.tokenizer, picked, replace(cfg, epochs=1), device)
    seconds = time.perf_counter() - t
    return {"load_seconds": round(load, 3), "steps": -(-len(picked) // bs), "seconds": round(seconds, 3),
            "seconds_per_step": seconds / -(-len(picked) // bs)}


def _retrain_steps(n_rows: int, cfg) -> int:
    return cfg.epochs * -(-n_rows // cfg.batch_size)


def _fit_factors(base_dir: Path, adapter_dir: Path, rows, config, factors_dir: Path, device) -> dict:
    """Fit and cache the EK-FAC factors under the key ``erase`` will look for."""
    from eraser import factors as fx
    from eraser.model import adapter_fingerprint, load_adapter, load_base, trainable_parameters

    t = time.perf_counter()
    base = load_base(base_dir, device)
    model = load_adapter(base, adapter_dir, trainable=True)
    params = [p for _, p in trainable_parameters(model)]
    load = time.perf_counter() - t
    key = fx.FactorKey(config.solver.build().kfac_config(), base.fingerprint, adapter_fingerprint(adapter_dir),
                       fx.dataset_hash(rows), config.max_length)
    t = time.perf_counter()
    cached = fx.fit(model, params, base.tokenizer, rows, key, device)
    fit_seconds = time.perf_counter() - t
    t = time.perf_counter()
    fx.save(cached, factors_dir)
    return {"seconds": round(fit_seconds, 3), "status": MEASURED, "load_seconds": round(load, 3),
            "save_seconds": round(time.perf_counter() - t, 3), "rows": len(rows),
            "parameters": sum(p.numel() for p in params)}


def _erase(base_dir, adapter_dir, data_path, holdout_path, ids, factors_dir, out_dir, device) -> dict:
    from eraser.errors import EraserError
    from eraser.configure import product_erase_config
    from eraser.requests import UnlearningRequest
    from eraser.reports import as_json
    from eraser.unlearn import erase

    config = product_erase_config(has_holdout=True)
    request = UnlearningRequest(remove=tuple(ids))
    t = time.perf_counter()
    try:
        report = erase(base_dir, adapter_dir, data_path, request, out_dir, config=config, device=device,
                       factors_dir=factors_dir, holdout_path=holdout_path)
    except EraserError as e:  # verification or the utility check refused: nothing written
        wall = time.perf_counter() - t
        rep = getattr(e, "report", None)
        ver = rep.to_json() if hasattr(rep, "to_json") else None
        v = _verification(ver) or {}
        return {"seconds": round(wall, 3), "status": MEASURED, "written": False, "error": f"{type(e).__name__}: {e}",
                "verification_passed": False, "verification": v or None, "stages": None,
                # the NLLs verification measured before the update and after the last refinement step
                "forget_nll_before": round_sig(v.get("erased_mean_nll_before")),
                "forget_nll_after": round_sig(v.get("erased_mean_nll")), "steps": None, "factors": None}
    wall = time.perf_counter() - t
    return {"seconds": round(wall, 3), "status": MEASURED, "written": True, "error": None,
            "verification_passed": bool(report.verification and report.verification.passed),
            "verification": _verification(as_json(report.verification)), "stages": report.seconds,
            "forget_nll_before": round_sig(report.affected_loss_before), "forget_nll_after": round_sig(report.affected_loss_after),
            "steps": {"influence": sum(1 for st in report.steps or () if st.kind == "influence"),
                      "natural": sum(1 for st in report.steps or () if st.kind == "natural"),
                      "influence_scale": next((round_sig(st.scale) for st in report.steps or ()
                                               if st.kind == "influence"), None)},
            "factors": as_json(report.factors), "utility": as_json(report.utility),
            "damping": round_sig(report.damping)}


def _verification(v: dict | None) -> dict | None:
    if not v:
        return None
    after = v.get("after") or v.get("before") or {}
    return {"passed": v.get("passed"), "reason": v.get("reason"), "auc_before": (v.get("before") or {}).get("auc"),
            "erased_mean_nll_before": (v.get("before") or {}).get("erased_mean_nll"),
            "auc_after": after.get("auc"), "erased_mean_nll": after.get("erased_mean_nll"),
            "holdout_mean_nll": after.get("holdout_mean_nll"),
            "refinement": {k: x for k, x in (v.get("refinement") or {}).items() if k != "trace"} or None,
            "seconds": v.get("seconds")}


def run_model(plan: ModelPlan, s: Settings, device, workdir: Path, on_row=None) -> tuple[dict, list[dict]]:
    from eraser.data import write_rows
    from eraser.configure import product_erase_config
    from eraser.train import train

    sizes = sorted(set(plan.measured) | set(plan.extrapolated))
    n_max = max(sizes)
    people = -(-n_max // s.facts)
    drawn = _people_rows(people + s.holdout_people, s.facts, s.seed)
    all_rows, holdout = drawn[: people * s.facts], drawn[people * s.facts:]
    wd = workdir / plan.name
    wd.mkdir(parents=True, exist_ok=True)
    base_dir, summary = _base(plan, s, all_rows, holdout, wd)
    holdout_path = wd / "holdout.jsonl"
    write_rows(holdout_path, holdout)
    cfg = _train_config(plan, s.seed)
    summary.update(adapter=f"LoRA r={plan.rank}, alpha={plan.alpha:g} on q_proj, v_proj", epochs=plan.epochs, lr=plan.lr,
                   batch_size=plan.batch_size, holdout_rows=len(holdout), probe_steps=plan.probe_steps)
    _say(f"{plan.name}: base ready; sizes {sizes}")
    out: list[dict] = []
    for n in sizes:
        rows = all_rows[:n]
        n_people = n // s.facts
        victim = random.Random(f"{s.seed}:{n}").randrange(n_people)
        ids = [r.id for r in rows[victim * s.facts:(victim + 1) * s.facts]]  # one person's facts
        remaining = [r for r in rows if r.id not in set(ids)]
        d = wd / f"n{n}"
        d.mkdir()
        data_path, remaining_path = d / "train.jsonl", d / "remaining.jsonl"
        write_rows(data_path, rows)
        write_rows(remaining_path, remaining)
        row = {"model": plan.name, "n": n, "people": n_people, "erased_rows": len(ids),
               "retrain_rows": len(remaining), "train_original": None, "factor_fit": None, "erase": None}
        measured = n in plan.measured
        steps_full = _retrain_steps(len(remaining), cfg)
        if measured:
            _say(f"{plan.name} N={n}: training the original adapter ({_retrain_steps(n, cfg)} steps)")
            r = train(base_dir, data_path, d / "adapter", cfg, device=str(device))
            row["train_original"] = {"seconds": r["seconds"], "status": MEASURED, "loss_per_epoch":
                                     [round_sig(x) for x in r["loss_per_epoch"]], "parameters": r["parameters"]}
            _say(f"{plan.name} N={n}: fitting EK-FAC factors")
            row["factor_fit"] = _fit_factors(base_dir, d / "adapter", rows, product_erase_config(has_holdout=True),
                                             d / "factors", device)
            _say(f"{plan.name} N={n}: factor fit {row['factor_fit']['seconds']:.2f} s; erasing {ids}")
            row["erase"] = _erase(base_dir, d / "adapter", data_path, holdout_path, ids, d / "factors", d / "erased",
                                  str(device))
            e = row["erase"]
            _say(f"{plan.name} N={n}: erase {e['seconds']:.2f} s, verification passed {e['verification_passed']}"
                 + (f" ({e['error']})" if e["error"] else ""))
            _say(f"{plan.name} N={n}: retraining from scratch on {len(remaining)} rows ({steps_full} steps)")
            r = train(base_dir, remaining_path, d / "retrained", cfg, device=str(device))
            retrain = {"seconds": r["seconds"], "status": MEASURED, "epochs": cfg.epochs, "steps": steps_full,
                       "seconds_per_step": round_sig(r["seconds"] / steps_full),
                       "final_loss": round_sig(r["loss_per_epoch"][-1])}
        else:
            retrain = {"seconds": None, "status": EXTRAPOLATED, "epochs": cfg.epochs, "steps": steps_full}
        _say(f"{plan.name} N={n}: timing a {plan.probe_steps}-step retrain probe")
        probe = _probe(base_dir, remaining, cfg, plan.probe_steps, device)
        estimate = probe["load_seconds"] + steps_full * probe["seconds_per_step"]
        retrain["probe"] = {**probe, "seconds_per_step": round_sig(probe["seconds_per_step"]),
                            "estimate_seconds": round(estimate, 3)}
        if not measured:
            retrain["seconds"] = round(estimate, 3)
            retrain["seconds_per_step"] = round_sig(probe["seconds_per_step"])
        row["retrain"] = retrain
        erase_s = (row["erase"] or {}).get("seconds")
        row["ratio"] = round_sig(retrain["seconds"] / erase_s) if erase_s else None
        _say(f"{plan.name} N={n}: retrain {retrain['seconds']:.2f} s ({retrain['status']})"
             + (f", ratio {row['ratio']}" if row["ratio"] else ""))
        out.append(row)
        if on_row is not None:
            on_row(summary, out)
        for sub in ("adapter", "retrained", "erased", "factors"):  # keep the disk small
            shutil.rmtree(d / sub, ignore_errors=True)
    return summary, out


def run(s: Settings, device_name: str, workdir: Path, checkpoint=None) -> dict:
    """Measure every model and size; ``checkpoint(partial_result)`` after each row, so a
    run cut short still leaves what it measured."""
    import torch

    from eraser.process import quiet_libraries
    from eraser.model import resolve_device

    quiet_libraries()
    started = time.perf_counter()
    device = resolve_device(device_name)
    torch.manual_seed(s.seed)
    machine = machine_info(device)
    models, rows = {}, []

    def result(partial: bool) -> dict:
        return {"schema_version": SCHEMA_VERSION, "benchmark": "scaling", "device": str(device), "machine": machine,
                "settings": asdict(s), "models": models, "rows": rows, "partial": partial,
                "total_seconds": round(time.perf_counter() - started, 1)}

    def on_row(summary, model_rows):
        if checkpoint is not None:
            checkpoint({**result(True), "models": {**models, model_rows[0]["model"]: summary},
                        "rows": rows + model_rows})

    for plan in s.models:
        t = time.perf_counter()
        summary, model_rows = run_model(plan, s, device, workdir, on_row)
        summary["seconds"] = round(time.perf_counter() - t, 1)
        models[plan.name] = summary
        rows += model_rows
    machine["loadavg_end"] = loadavg()
    return result(False)


# --------------------------------------------------------------------------- analysis


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) against log(x): the growth exponent."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return None if sxx == 0 else sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def _fit_line(points):
    """(slope, intercept) of log y = slope * log x + intercept, or None."""
    k = slope(points)
    if k is None:
        return None
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    return k, sum(p[1] for p in pts) / len(pts) - k * sum(p[0] for p in pts) / len(pts)


def break_even(rows: list[dict]) -> dict:
    """The N where retraining starts to cost more than the erase: interpolated (log-log)
    between the two measured sizes around ratio 1, else extrapolated from both fitted
    power laws, else said to lie outside the range."""
    pairs = [(r["n"], r["ratio"]) for r in rows if r.get("ratio")]
    if not pairs:
        return {"n": None, "how": "no size has both an erase and a retrain"}
    for (n0, q0), (n1, q1) in zip(pairs, pairs[1:]):
        if (q0 - 1) * (q1 - 1) <= 0 and q0 != q1:
            f = (0 - math.log(q0)) / (math.log(q1) - math.log(q0))
            return {"n": round(math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0))), 1), "how": "interpolated",
                    "between": [n0, n1]}
    if len(pairs) < 2:
        return {"n": None, "how": f"only N={pairs[0][0]} has both an erase and a retrain (ratio {pairs[0][1]})"}
    if all(q > 1 for _, q in pairs):
        return {"n": None, "how": f"erase already cheaper at the smallest N measured ({pairs[0][0]}: ratio {pairs[0][1]})",
                "below": pairs[0][0]}
    e = _fit_line([(r["n"], r["erase"]["seconds"]) for r in rows if r.get("erase")])
    t = _fit_line([(r["n"], r["retrain"]["seconds"]) for r in rows if r.get("retrain")])
    if e and t and t[0] > e[0]:
        n = math.exp((e[1] - t[1]) / (t[0] - e[0]))
        return {"n": round(n, 1), "how": "extrapolated from the fitted power laws (outside the measured range)"}
    return {"n": None, "how": f"retraining stays cheaper at every N measured (up to {pairs[-1][0]}) and the fitted "
                              "curves do not cross above it"}


def analyse(result: dict) -> dict:
    out = {}
    for name in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == name]
        erase_pts = [(r["n"], r["erase"]["seconds"]) for r in rows if r.get("erase")]
        retrain_pts = [(r["n"], r["retrain"]["seconds"]) for r in rows if r.get("retrain")]
        measured_retrain = [(r["n"], r["retrain"]["seconds"]) for r in rows if r.get("retrain")
                            and r["retrain"]["status"] == MEASURED]
        fit_pts = [(r["n"], r["factor_fit"]["seconds"]) for r in rows if r.get("factor_fit")]
        probe_err = [round_sig(r["retrain"]["probe"]["estimate_seconds"] / r["retrain"]["seconds"] - 1, 3)
                     for r in rows if r["retrain"]["status"] == MEASURED and r["retrain"].get("probe")]
        out[name] = {
            "exponent_erase": round_sig(slope(erase_pts), 3),
            "exponent_retrain": round_sig(slope(retrain_pts), 3),
            "exponent_retrain_measured_only": round_sig(slope(measured_retrain), 3),
            "exponent_factor_fit": round_sig(slope(fit_pts), 3),
            "break_even": break_even(rows),
            "ratios": {str(r["n"]): r["ratio"] for r in rows},
            "probe_estimate_relative_error": probe_err,
        }
    return out


# --------------------------------------------------------------------------- report


def _f(x, digits=3):
    return "—" if x is None else f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def reading(result: dict) -> list[str]:
    out = []
    for name, a in result["analysis"].items():
        rows = [r for r in result["rows"] if r["model"] == name]
        be = a["break_even"]
        where = (f"break-even N ≈ {be['n']:g} ({be['how']})" if be.get("n") is not None else f"break-even: {be['how']}")
        ratios = ", ".join(f"N={n}: {q}" for n, q in a["ratios"].items() if q is not None)
        out.append(f"{name}: retrain/erase ratio {ratios}; {where}.")
        out.append(f"{name}: growth exponents (least-squares slope in log-log): erase {a['exponent_erase']}, "
                   f"retrain {a['exponent_retrain']} (measured points only: {a['exponent_retrain_measured_only']}), "
                   f"factor fit {a['exponent_factor_fit']}.")
        for r in rows:
            e = r.get("erase") or {}
            if e.get("error"):
                ref = (e.get("verification") or {}).get("refinement") or {}
                out.append(f"{name} N={r['n']}: the erase was refused after {e['seconds']:.1f} s"
                           + (f" ({ref.get('steps')} refinement step(s), {ref.get('seconds')} s)" if ref else "")
                           + f": {e['error'][:220]}…; its time still counts in the ratio: it is what the attempt cost.")
        passed = [r["n"] for r in rows if r.get("erase") and r["erase"]["verification_passed"]]
        failed = [r["n"] for r in rows if r.get("erase") and not r["erase"]["verification_passed"]]
        out.append(f"{name}: verification passed at N = {passed or 'none'}" + (f", failed at N = {failed}" if failed else "")
                   + ".")
        big = max((r for r in rows if r.get("erase") and r["erase"].get("stages")), key=lambda r: r["n"], default=None)
        if big:
            st = big["erase"]["stages"]
            parts = ", ".join(f"{k} {v:.2f}" for k, v in st.items() if k != "total" and v >= 0.01)
            out.append(f"{name}: the erase at N={big['n']} ({big['erase']['seconds']:.2f} s wall) spent (s): {parts}.")
        if a["probe_estimate_relative_error"]:
            out.append(f"{name}: where a retrain was measured, the probe-based estimate was off by "
                       f"{', '.join(f'{100 * x:+.0f}%' for x in a['probe_estimate_relative_error'])} (estimate/measured - 1),"
                       " the error the extrapolated figures carry.")
    return out


def caveats(result: dict) -> list[str]:
    m = result["machine"]
    out = [f"One run on {m.get('cpu_model') or 'this machine'} ({m.get('torch_threads')} torch threads); load average "
           f"{m.get('loadavg_start')} at the start, {m.get('loadavg_end')} at the end: other work on the machine "
           "inflates every time.",
           "Erase seconds are the wall time of one eraser.unlearn.erase call (loading the model, the influence step, "
           "verification with refinement, the utility check, writing the adapter); factors_out is not given, so the "
           "downdate that prepares the next version's factors (as the sidecar does) is not in it. The factor fit is a "
           "one-off per adapter version, reported apart.",
           "Retrain seconds are eraser.train end to end (load, epochs, save). 'extrapolated' figures are model load + "
           "epochs x steps per epoch x seconds per step of a timed probe; where both exist the probe's error is shown.",
           "One erase per size (one randomly chosen person); refinement's step count varies with the person, so the "
           "erase curve is noisy; the exponents are fitted on 2-4 points."]
    return framed_caveats(result, out, "tiny sizes and 2 epochs, a smoke test", "rows")


def markdown(result: dict) -> str:
    lines = [f"# Scaling: erasing one person vs retraining, as N grows ({result['device']}, {result['mode']})", ""]
    for name, summary in result["models"].items():
        a = result["analysis"][name]
        lines += [f"## {name}", "", f"{summary['base']}; {summary['adapter']}; {summary['epochs']} epochs at lr "
                  f"{summary['lr']:g}, batch {summary['batch_size']}; held-out {summary['holdout_rows']} rows.", "",
                  md_row(["N", "erase s", "retrain s", "retrain/erase", "factor fit s (one-off)", "retrain is",
                          "verification passed", "forget NLL before → after", "held-out NLL", "original train s",
                          "retrain s/step"]),
                  md_row(["---"] * 11)]
        for r in (r for r in result["rows"] if r["model"] == name):
            e, t, f = r.get("erase") or {}, r["retrain"], r.get("factor_fit") or {}
            v = e.get("verification") or {}
            before = e.get("forget_nll_before")
            after = e.get("forget_nll_after") if e.get("forget_nll_after") is not None else v.get("erased_mean_nll")
            nll = "—" if after is None else f"{_f(before)} → {_f(after)}"
            lines.append(md_row([r["n"], _f(e.get("seconds")), _f(t["seconds"]), _f(r["ratio"]), _f(f.get("seconds")),
                                 t["status"], "—" if not e else "yes" if e["verification_passed"] else
                                 "NO" if e["written"] else "NO (refused: nothing written)", nll,
                                 _f((e.get("verification") or {}).get("holdout_mean_nll")),
                                 _f((r.get("train_original") or {}).get("seconds")), _f(t.get("seconds_per_step"))]))
        be = a["break_even"]
        lines += ["", f"- break-even N: {be['n']:g} ({be['how']})" if be.get("n") is not None else
                  f"- break-even N: none ({be['how']})",
                  f"- growth exponents (log-log least squares): erase {a['exponent_erase']}, retrain "
                  f"{a['exponent_retrain']}, factor fit {a['exponent_factor_fit']}", ""]
    return "\n".join(lines + reading_and_caveats(result)) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = {"tiny": "tab:blue", "smollm2": "tab:red"}
    for name in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == name]
        c = colors.get(name, "tab:gray")
        er = [(r["n"], r["erase"]["seconds"]) for r in rows if r.get("erase")]
        if er:
            ax.plot(*zip(*er), "o-", color=c, label=f"{name}: erase (measured)")
        rt = [(r["n"], r["retrain"]["seconds"]) for r in rows]
        ax.plot(*zip(*rt), "--", color=c, label=f"{name}: retrain from scratch")
        for status, marker in ((MEASURED, "s"), (EXTRAPOLATED, "s")):
            pts = [(r["n"], r["retrain"]["seconds"]) for r in rows if r["retrain"]["status"] == status]
            if pts:
                ax.plot(*zip(*pts), marker, color=c, markerfacecolor=c if status == MEASURED else "none",
                        linestyle="none", label=f"{name}: retrain ({status})" if status == EXTRAPOLATED else None)
        fits = [(r["n"], r["factor_fit"]["seconds"]) for r in rows if r.get("factor_fit")]
        if fits:
            ax.plot(*zip(*fits), ":", marker="^", color=c, alpha=0.6, label=f"{name}: factor fit (one-off)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training rows N")
    ax.set_ylabel("seconds")
    ax.set_title("Erasing one person (3 rows) vs retraining from scratch")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(result: dict, out: Path, stem: str) -> None:
    result["analysis"] = analyse(result)
    result["caveats"], result["reading"] = caveats(result), reading(result)
    write_outputs(result, out, stem, TOP_KEYS, markdown, _say)
    plot(result, out / f"{stem}.png")
    _say(f"wrote {out / (stem + '.png')}")


def main(argv: list[str] | None = None) -> int:
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eraser.process.passive_openmp_waits
    p = bench_parser("scaling", __doc__.splitlines()[0], outputs="json/md/png")
    args = p.parse_args(argv)
    if args.render is not None:
        finish(rendered(args), args.out, args.render.stem)
        return 0
    settings = Settings.quick() if args.quick else Settings()
    workdir = Path(tempfile.mkdtemp(prefix="eraser-scaling-"))
    mode = "quick" if args.quick else "default"

    def checkpoint(partial: dict) -> None:  # a run cut short keeps what it measured
        partial["machine"]["loadavg_end"] = loadavg()
        finish({**partial, "mode": mode, "note": args.note}, args.out, output_stem("scaling", partial["device"], args.quick))

    try:
        result = run(settings, args.device, workdir, checkpoint)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["mode"] = mode
    result["note"] = args.note
    finish(result, args.out, output_stem("scaling", result["device"], args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
