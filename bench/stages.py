"""Stage-cost benchmark: what each part of an erase costs, beside retraining from scratch.

``python -m bench.stages [--quick] [--device cpu|cuda] [--out bench/results]``

On SmolLM2-135M-Instruct with a LoRA (r=8 on q_proj, v_proj) fine-tuned with
``eraser.train`` on synthetic facts (``devtools.synthetic``), in one process, it times:

- the gradient of the affected rows (one person's rows, and 10 rows);
- one curvature product (GGN and Hessian) over the whole training set and over a
  16-row sample;
- the ``cg`` solve on the damped GGN (iterations, relative residual, products);
- the ``paper`` preset of the ``sqm`` solver (the LLMEraser paper's settings), its
  residual as the solver reports it, and its step against the cg solution;
- the whole file-level ``eraser.unlearn.erase()`` call with cg (its own per-stage seconds);
- retraining the adapter from scratch without the erased rows (same config and epochs).

Every stage records wall time (``time.perf_counter``, CUDA synchronised), the process's
resident memory before, after and at its sampled peak, the process's high-water mark
(``ru_maxrss``), and on CUDA the peak allocated GPU memory. Results go to
``<out>/stages[-<device>][-quick].json`` and ``.md``; the JSON has the same keys on
every run (values that do not apply are null).

``--quick`` shrinks everything (4 rows, 1 epoch, 2 CG iterations, no recall check) for a smoke test of
about a minute; its numbers mean nothing.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from eraser.process import passive_openmp_waits
from bench.common import (loadavg, 
    Recorder,
    bench_parser,
    machine_info,
    rendered,
    output_stem as common_output_stem,
    cosine as _cosine,
    mean as _mean,
    norm as _norm,
    round_sig as _round,
)

SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    people: int = 12
    facts: int = 4
    seed: int = 0
    # Training: enough for the facts to be learnt (the adapter section records it).
    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 4
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    # What is erased / measured.
    gradient_rows: int = 10  # the second gradient measurement
    sample_rows: int = 16  # the curvature sample
    curvature_batch_size: int = 4
    damping: float = 0.1  # absolute, on the GGN
    cg_tolerance: float = 1e-3
    cg_max_iterations: int = 60
    recall: bool = True  # greedy exact-match recall of the trained adapter (context only)
    max_length: int = 512

    @classmethod
    def quick(cls) -> "Settings":
        return cls(people=2, facts=2, epochs=1, gradient_rows=10, sample_rows=2, cg_max_iterations=2, recall=False)


# --------------------------------------------------------------------------- the benchmark


def run(settings: Settings, device_name: str, quick: bool, workdir: Path) -> dict:
    import torch

    from eraser.process import quiet_libraries

    quiet_libraries()
    from eraser.curvature import Curvature, CurvatureConfig, Damped, gradient
    from eraser.data import EncodedRows, Row, load_rows, write_rows
    from eraser.evaluate import evaluate_rows
    from eraser.model import load_adapter, load_base, resolve_device, trainable_parameters
    from eraser.pretrained import prepare_smollm2
    from eraser.requests import UnlearningRequest
    from eraser.solvers import CGSolver, SolverConfig, SQMSolver
    from devtools.synthetic import facts_to_rows, generate_people
    from eraser.train import TrainConfig, train
    from eraser.losses import row_losses
    from eraser.unlearn import EraseConfig, erase

    started = time.perf_counter()
    device = resolve_device(device_name)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(settings.seed)
    machine = machine_info(device)
    rec = Recorder(device)

    # ---- data and model (setup, not a stage of an erase)
    base_dir = prepare_smollm2(progress=False)
    people = generate_people(settings.people, settings.facts, settings.seed)
    rows = [Row(**r) for r in facts_to_rows(people)]
    data_path = workdir / "train.jsonl"
    write_rows(data_path, rows)
    rows = load_rows(data_path)  # exactly what training and erase read
    n = len(rows)
    person_ids = [r.id for r in rows if r.id.startswith(rows[0].id.split("-")[0] + "-")]
    forget_idx = [i for i, r in enumerate(rows) if r.id in set(person_ids)]
    retain_idx = [i for i in range(n) if i not in set(forget_idx)]
    grad_rows_idx = list(range(min(settings.gradient_rows, n)))
    sample_idx = sorted(random.Random(settings.seed).sample(range(n), min(settings.sample_rows, n)))
    cfg = TrainConfig(peft="lora", rank=settings.rank, alpha=settings.alpha, targets=settings.targets,
                      epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size, seed=settings.seed,
                      max_length=settings.max_length)

    # ---- 1. the adapter that gets erased
    adapter_dir = workdir / "adapter"
    with rec.stage("train_initial", {"rows": n, "epochs": cfg.epochs, "steps": None, "loss_per_epoch": None}) as notes:
        result = train(base_dir, data_path, adapter_dir, cfg, device=str(device))
        notes["steps"] = -(-n // cfg.batch_size) * cfg.epochs
        notes["loss_per_epoch"] = [_round(x) for x in result["loss_per_epoch"]]

    with rec.stage("load_model", {"parameters": None}) as notes:
        base = load_base(base_dir, device)
        model = load_adapter(base, adapter_dir, trainable=True)
        params = [p for _, p in trainable_parameters(model)]
        notes["parameters"] = sum(p.numel() for p in params)
    n_params = rec.stages["load_model"]["notes"]["parameters"]

    train_data = EncodedRows.from_rows(base.tokenizer, rows, settings.max_length)
    sample_data = EncodedRows.from_rows(base.tokenizer, [rows[i] for i in sample_idx], settings.max_length)
    forget_pairs = [(rows[i].prompt, rows[i].response) for i in forget_idx]
    forget_data = EncodedRows(base.tokenizer, forget_pairs, settings.max_length)
    bs = settings.curvature_batch_size

    with rec.stage("warmup", {"what": "gradient of 1 row (first autograd pass, not part of any cost)"}):
        gradient(model, params, train_data, [0], None, bs, device)

    with rec.stage("adapter_quality", {"train_nll_mean": None, "forget_nll_mean": None, "retain_nll_mean": None,
                                       "recall_rate": None}) as notes:
        ev = evaluate_rows(model, base.tokenizer, rows, device, generate=settings.recall)
        nll = [x["nll"] for x in ev["rows"]]
        notes["train_nll_mean"] = _round(ev["mean_nll"])
        notes["forget_nll_mean"] = _round(_mean(nll[i] for i in forget_idx))
        notes["retain_nll_mean"] = _round(_mean(nll[i] for i in retain_idx))
        notes["recall_rate"] = _round(ev.get("exact_match_rate"))
    before_forget_nll = rec.stages["adapter_quality"]["notes"]["forget_nll_mean"]
    before_retain_nll = rec.stages["adapter_quality"]["notes"]["retain_nll_mean"]

    # ---- 2. gradients of the affected rows
    def grad_notes(k: int) -> dict:
        return {"rows": k, "batches": -(-k // bs), "norm": None}

    with rec.stage("gradient_person", grad_notes(len(forget_idx))) as notes:
        g_person = gradient(model, params, forget_data, list(range(len(forget_idx))), None, bs, device)
        notes["norm"] = _round(_norm(g_person))
    with rec.stage("gradient_10_rows", grad_notes(len(grad_rows_idx))) as notes:
        g10 = gradient(model, params, train_data, grad_rows_idx, None, bs, device)
        notes["norm"] = _round(_norm(g10))
    del g10

    # b exactly as compute_update builds it for an instance removal: (1/n) Σ G(z).
    b = g_person / n

    # ---- 3. one curvature product
    curv_full = {k: Curvature(model, params, train_data, list(range(n)), k, bs, device) for k in ("ggn", "hessian")}
    curv_sample = {k: Curvature(model, params, sample_data, list(range(len(sample_idx))), k, bs, device)
                   for k in ("ggn", "hessian")}
    for where, ops, k_rows in (("full", curv_full, n), ("sample", curv_sample, len(sample_idx))):
        for kind in ("ggn", "hessian"):
            with rec.stage(f"matvec_{kind}_{where}", {"rows": k_rows, "batches": -(-k_rows // bs),
                                                     "rayleigh_b": None}) as notes:
                hv = ops[kind].matvec(b)
                # vᵀAv/vᵀv along the forget gradient: the curvature's scale, to judge damping.
                notes["rayleigh_b"] = _round(float((b.double() @ hv.double()) / (b.double() @ b.double())))
            del hv

    # ---- 4. the cg solve on the damped GGN over every training row
    ggn = Curvature(model, params, train_data, list(range(n)), "ggn", bs, device)
    op = Damped(ggn, settings.damping)
    cg = CGSolver(tolerance=settings.cg_tolerance, max_iterations=settings.cg_max_iterations)
    cg_notes = {"curvature": "ggn", "rows": n, "damping": settings.damping, "tolerance": settings.cg_tolerance,
                "max_iterations": settings.cg_max_iterations, "iterations": None, "residual": None,
                "converged": None, "products": None, "solver_seconds": None, "solution_norm": None, "note": None}
    with rec.stage("solve_cg", cg_notes) as notes:
        res_cg = cg.solve(op, b)
        notes.update(iterations=res_cg.iterations, residual=_round(res_cg.residual), converged=res_cg.converged,
                     products=ggn.products, solver_seconds=_round(res_cg.seconds),
                     solution_norm=_round(_norm(res_cg.x)), note=res_cg.note or None)
    x_cg = res_cg.x
    x_cg_cpu = x_cg.detach().double().cpu()

    # ---- 5. the paper preset (sqm --preset paper), set up as compute_update does
    paper = SQMSolver.paper()
    ggn_p = Curvature(model, params, train_data, list(range(n)), "ggn", bs, device)
    lam_paper = paper.effective_damping(settings.damping)
    op_p = Damped(ggn_p, lam_paper)
    p_notes = {"curvature": "ggn", "rows": n, "damping": lam_paper, "optimizer": paper.optimizer, "lr": paper.lr,
               "iterations": None, "batch_size": paper.batch_size, "residual": None, "converged": None,
               "minibatch_products": None, "full_products": None, "solver_seconds": None,
               "step_norm_over_cg": None, "move_norm_over_cg": None, "cosine_with_cg": None, "note": None}
    with rec.stage("solve_paper", p_notes) as notes:
        res_p = paper.solve(op_p, b)
        x0 = torch.full_like(res_p.x, paper.x0)
        ncg = _norm(x_cg)
        notes.update(iterations=res_p.iterations, residual=_round(res_p.residual), converged=res_p.converged,
                     # each step is one product on `batch_size` rows (matvec_rows, not counted by
                     # Curvature.products); the residual check is one full product
                     minibatch_products=res_p.iterations, full_products=ggn_p.products,
                     solver_seconds=_round(res_p.seconds),
                     step_norm_over_cg=_round(_norm(res_p.x) / ncg) if ncg else None,
                     move_norm_over_cg=_round(_norm(res_p.x - x0) / ncg) if ncg else None,
                     cosine_with_cg=_round(_cosine(res_p.x, x_cg)), note=res_p.note or None)
    # The same x measured on the system cg solved ((GGN + damping·I) x = b): one more product.
    with rec.stage("paper_residual_on_cg_system", {"damping": settings.damping, "residual": None}) as notes:
        from eraser.solvers import relative_residual

        notes["residual"] = _round(relative_residual(op, res_p.x, b))
    del res_p, x0, curv_full, curv_sample, ggn, ggn_p, op, op_p, b, g_person

    # Free the in-process model before the file-level calls load their own.
    del model, base, params, train_data, sample_data, forget_data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- 6. the whole erase() call with cg (loads, computes, writes)
    request = UnlearningRequest(remove=tuple(person_ids))
    erase_cfg = EraseConfig(
        solver=SolverConfig("cg", None, {"tolerance": settings.cg_tolerance, "max_iterations": settings.cg_max_iterations}),
        curvature=CurvatureConfig(kind="ggn", damping=settings.damping, sample_rows=None,
                                  batch_size=bs, seed=settings.seed),
        allow_unconverged=True,  # a benchmark reports an unconverged solve instead of stopping
        max_length=settings.max_length,
        gradient_batch_size=bs,
    )
    erased_dir = workdir / "erased"
    edited_path = workdir / "edited.jsonl"
    e_notes = {"rows_removed": len(person_ids), "rows_after": None, "iterations": None, "residual": None,
               "converged": None, "products": None, "update_norm": None,
               "affected_loss_before": None, "affected_loss_after": None,
               "seconds_load": None, "seconds_gradient": None, "seconds_solve": None, "seconds_evaluate": None,
               "seconds_write": None, "seconds_total": None}
    with rec.stage("erase_cg", e_notes) as notes:
        report = erase(base_dir, adapter_dir, data_path, request, erased_dir, edited_path, erase_cfg, str(device))
        s = report.seconds
        notes.update(rows_after=report.rows_after, iterations=report.iterations, residual=_round(report.residual),
                     converged=report.converged, products=report.curvature_products,
                     update_norm=_round(report.update_norm),
                     affected_loss_before=_round(report.affected_loss_before),
                     affected_loss_after=_round(report.affected_loss_after),
                     **{f"seconds_{k}": _round(s.get(k)) for k in ("load", "gradient", "solve", "evaluate", "write",
                                                                  "total")})

    # ---- 7. retraining from scratch without the erased rows (the gold standard)
    retrained_dir = workdir / "retrained"
    r_notes = {"rows": None, "epochs": cfg.epochs, "steps": None, "loss_per_epoch": None}
    with rec.stage("retrain_scratch", r_notes) as notes:
        result = train(base_dir, edited_path, retrained_dir, cfg, device=str(device))
        notes["rows"] = result["rows"]
        notes["steps"] = -(-result["rows"] // cfg.batch_size) * cfg.epochs
        notes["loss_per_epoch"] = [_round(x) for x in result["loss_per_epoch"]]

    # ---- 8. context: what the erase and the retraining did to the losses (no generation)
    q_notes = {"forget_nll_before": before_forget_nll, "forget_nll_erased": None, "forget_nll_retrained": None,
               "retain_nll_before": before_retain_nll, "retain_nll_erased": None, "retain_nll_retrained": None,
               "cosine_erase_vs_retrain": None, "cosine_erase_vs_solve_cg": None}
    with rec.stage("evaluate_outcomes", q_notes) as notes:
        base = load_base(base_dir, device)
        vecs = {}
        for label, d in (("erased", erased_dir), ("retrained", retrained_dir), ("original", adapter_dir)):
            m = load_adapter(base, d, trainable=False)
            if label != "original":
                ls = row_losses(m, base.tokenizer, [(r.prompt, r.response) for r in rows], device,
                                max_length=settings.max_length)
                notes[f"forget_nll_{label}"] = _round(_mean(ls[i] for i in forget_idx))
                notes[f"retain_nll_{label}"] = _round(_mean(ls[i] for i in retain_idx))
            vecs[label] = torch.cat([p.detach().reshape(-1).double().cpu() for n_, p in m.named_parameters()
                                     if "lora_" in n_])
            base.model = m.unload()  # strip the adapter so the next one attaches to a clean base
        notes["cosine_erase_vs_retrain"] = _round(_cosine(vecs["erased"] - vecs["original"],
                                                          vecs["retrained"] - vecs["original"]))
        # erase() recomputes what solve_cg computed: the written adapter should carry that step.
        if vecs["erased"].numel() == x_cg_cpu.numel():
            notes["cosine_erase_vs_solve_cg"] = _round(_cosine(vecs["erased"] - vecs["original"], x_cg_cpu), 6)

    rec.sampler.stop()
    with suppress(OSError):
        machine["loadavg_end"] = loadavg()
    total = time.perf_counter() - started
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "stages",
        "mode": "quick" if quick else "full",
        "device": str(device),
        "machine": machine,
        "settings": {**asdict(settings), "targets": list(settings.targets), "model": base_dir.name,
                     "rows": n, "parameters": n_params, "erased_person_rows": len(person_ids),
                     "curvature_sample_rows": len(sample_idx)},
        "stages": rec.stages,
        "total_seconds": round(total, 1),
        "note": None,
        "caveats": caveats(machine),
        "reading": reading(rec.stages, machine),
    }


# --------------------------------------------------------------------------- report


def caveats(machine: dict, note: str | None = None) -> list[str]:
    out = [note] if note else []
    start = (machine.get("loadavg_start") or [0.0])[0]
    end = (machine.get("loadavg_end") or [0.0])[0]
    cores = machine.get("cpu_affinity") or machine.get("cpu_count") or 1
    if machine["device"] == "cpu" and max(start, end) > 0.5 * cores:
        out.append(f"load average {start:.2f} at start and {end:.2f} at the end on {cores} cores: other processes "
                   "competed for the CPU, so the seconds are inflated and stages met different "
                   "loads (compare ratios with care, not absolute numbers)")
    if (machine.get("omp_wait_policy") or "").upper() == "PASSIVE":
        out.append("OMP_WAIT_POLICY=PASSIVE: with OpenMP's default busy-waiting, a competing CPU job made products "
                   "up to 15x slower here; on an idle machine passive waiting may cost a little")
    out.append("base-model fingerprint is cached in-process after the first load, so later loads skip hashing")
    out.append("peak RSS is sampled every 20 ms per stage; maxrss is the process's high-water mark so far")
    return out


def _f(x, fmt: str = ".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def table_rows(stages: dict) -> list[tuple[str, float, str]]:
    def n(name):
        return stages[name]["notes"]

    out = []
    for name, st in stages.items():
        nt = st["notes"]
        if name == "train_initial":
            note = f"{nt['rows']} rows, {nt['epochs']} epochs ({nt['steps']} steps), last epoch loss " \
                   f"{_f((nt['loss_per_epoch'] or [None])[-1])}"
        elif name == "load_model":
            note = f"base + adapter, {nt['parameters']:,} trainable parameters"
        elif name == "warmup":
            note = "first autograd pass (excluded from costs)"
        elif name == "adapter_quality":
            note = f"train NLL {_f(nt['train_nll_mean'])}, greedy recall {_f(nt['recall_rate'])} (context)"
        elif name.startswith("gradient_"):
            note = f"{nt['rows']} rows, {nt['batches']} batches"
        elif name.startswith("matvec_"):
            note = f"{nt['rows']} rows, {nt['batches']} batches; Rayleigh quotient along b {_f(nt['rayleigh_b'])}"
        elif name == "solve_cg":
            note = (f"λ={nt['damping']:g}, {nt['iterations']} iterations, residual {_f(nt['residual'], '.2e')}, "
                    f"{'converged' if nt['converged'] else 'NOT converged'}, {nt['products']} products")
        elif name == "solve_paper":
            note = (f"λ={nt['damping']:g} (Adam weight decay), {nt['iterations']} steps × batch {nt['batch_size']}, "
                    f"residual {_f(nt['residual'], '.2e')}, step {_f(nt['step_norm_over_cg'])}× cg norm "
                    f"(moved {_f(nt['move_norm_over_cg'])}×), cosine {_f(nt['cosine_with_cg'])}, "
                    f"{nt['minibatch_products']}+{nt['full_products']} products")
        elif name == "paper_residual_on_cg_system":
            note = f"paper x on (GGN+{nt['damping']:g}I)x=b: residual {_f(nt['residual'], '.2e')}"
        elif name == "erase_cg":
            note = (f"{nt['iterations']} it, residual {_f(nt['residual'], '.2e')}, {nt['products']} products; "
                    f"load {_f(nt['seconds_load'])} + gradient {_f(nt['seconds_gradient'])} + solve "
                    f"{_f(nt['seconds_solve'])} + eval {_f(nt['seconds_evaluate'])} + write {_f(nt['seconds_write'])} s")
        elif name == "retrain_scratch":
            note = f"{nt['rows']} rows, {nt['epochs']} epochs ({nt['steps']} steps)"
        elif name == "evaluate_outcomes":
            note = (f"forget NLL {_f(nt['forget_nll_before'])} → erased {_f(nt['forget_nll_erased'])} / retrained "
                    f"{_f(nt['forget_nll_retrained'])}; retain {_f(nt['retain_nll_before'])} → "
                    f"{_f(nt['retain_nll_erased'])} / {_f(nt['retain_nll_retrained'])} (context)")
        else:
            note = ""
        out.append((name, st["seconds"], note))
    return out


def reading(stages: dict, machine: dict) -> list[str]:
    cg, pp = stages["solve_cg"]["notes"], stages["solve_paper"]["notes"]
    er, ev = stages["erase_cg"], stages["evaluate_outcomes"]["notes"]
    rt = stages["retrain_scratch"]
    moved = pp["move_norm_over_cg"]
    cg_state = "converged" if cg["converged"] else "did NOT converge"
    n_params = stages["load_model"]["notes"]["parameters"]
    # Adam moves each coordinate by about lr per step at most, whatever the system says.
    adam_bound = pp["lr"] * pp["iterations"] * math.sqrt(n_params)
    verdict = (f"its step size is set by Adam (at most about lr × steps × √n = {adam_bound:.2g} in norm), not by "
               f"the system; the cg solution's norm is {_f(cg['solution_norm'])}")
    lines = [
        f"Paper preset: relative residual {_f(pp['residual'], '.2f')} on its own system (λ={pp['damping']:g}) and "
        f"{_f(stages['paper_residual_on_cg_system']['notes']['residual'], '.2f')} on cg's; it moved x by "
        f"{_f(moved)}× the cg solution's norm (cosine {_f(pp['cosine_with_cg'])}) in "
        f"{stages['solve_paper']['seconds']:.0f} s. cg {cg_state}: residual {_f(cg['residual'], '.1e')} after "
        f"{cg['iterations']} iterations ({cg['products']} full products, {stages['solve_cg']['seconds']:.0f} s). "
        f"Paper preset: {verdict}.",
    ]
    solve_s = er["notes"]["seconds_solve"] or 0.0
    epoch_s = rt["seconds"] / max(1, rt["notes"]["epochs"])
    share = solve_s / er["seconds"] if er["seconds"] else 0.0
    lines.append(
        f"The whole erase with cg took {er['seconds']:.0f} s ({share:.0%} of it in the solve, gradient "
        f"{_f(er['notes']['seconds_gradient'], '.1f')} s); retraining from scratch took {rt['seconds']:.0f} s, so "
        f"erase/retrain = {er['seconds'] / rt['seconds']:.2g}. Each cg iteration is one GGN product over all rows "
        f"({stages['matvec_ggn_full']['seconds']:.1f} s, about "
        f"{stages['matvec_ggn_full']['seconds'] / epoch_s:.2g} training epochs) against "
        f"{stages['gradient_person']['seconds']:.1f} s for the affected rows' gradient."
    )
    lines.append(
        f"A Hessian product costs {stages['matvec_hessian_full']['seconds'] / stages['matvec_ggn_full']['seconds']:.2g}× "
        f"a GGN product; a {stages['matvec_ggn_sample']['notes']['rows']}-row sample costs "
        f"{stages['matvec_ggn_sample']['seconds'] / stages['matvec_ggn_full']['seconds']:.2g}× the full-set GGN product."
    )
    lines.append(
        f"Outcome (context, not cost): forget NLL {_f(ev['forget_nll_before'])} → {_f(ev['forget_nll_erased'])} after "
        f"the erase vs {_f(ev['forget_nll_retrained'])} retrained from scratch; retained NLL "
        f"{_f(ev['retain_nll_before'])} → {_f(ev['retain_nll_erased'])} vs {_f(ev['retain_nll_retrained'])}; cosine of "
        f"the erase's update with the retraining's change {_f(ev['cosine_erase_vs_retrain'])} (with solve_cg's "
        f"solution {_f(ev['cosine_erase_vs_solve_cg'], '.4f')})."
    )
    return lines


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    dev = m["device"] if m["gpu"] is None else f"{m['device']} ({m['gpu']})"
    lines = [
        f"# Stage costs ({result['mode']}, {dev})",
        "",
        f"{s['model']}, LoRA r={s['rank']} on {', '.join(s['targets'])} ({s['parameters']:,} parameters), "
        f"{s['rows']} synthetic fact rows ({s['people']} people × {s['facts']}), erasing one person "
        f"({s['erased_person_rows']} rows). torch {m['torch']}, {m['torch_threads']} threads "
        f"(OMP_WAIT_POLICY={m['omp_wait_policy'] or 'unset'}), "
        f"{m['cpu_count']} CPUs ({m['cpu_model'] or m['processor']}). Total run {result['total_seconds']:.0f} s.",
        "",
        "| stage | seconds | notes |",
        "| --- | ---: | --- |",
    ]
    for name, sec, note in table_rows(result["stages"]):
        lines.append(f"| {name} | {sec:.2f} | {note} |")
    lines += ["", "Reading:", ""]
    lines += [f"- {x}" for x in result["reading"]]
    lines += ["", "Caveats:", ""]
    lines += [f"- {x}" for x in result["caveats"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def output_stem(device: str, quick: bool) -> str:
    return common_output_stem("stages", device, quick)


def main(argv: list[str] | None = None) -> int:
    # Measured here: with a second CPU-heavy process on the machine, OpenMP's default
    # busy-waiting made one GGN product 15x slower (64 s against 4 s on 2 cores); passive
    # waiting avoids that. It only takes effect before torch is first imported.
    passive_openmp_waits()
    p = bench_parser("stages", __doc__.splitlines()[0])
    p.add_argument("--damping", type=float, help="absolute damping of the GGN for the cg solves (default 0.1)")
    p.add_argument("--workdir", type=Path, help="keep data and adapters here (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.render is not None:
        result = rendered(args)
        result["caveats"] = caveats(result["machine"], result.get("note"))
        result["reading"] = reading(result["stages"], result["machine"])
        stem = output_stem(result["device"], result["mode"] == "quick")
        write_outputs(result, args.out, stem)
        return 0

    settings = Settings.quick() if args.quick else Settings()
    if args.damping is not None:
        settings = replace(settings, damping=args.damping)
    if args.workdir is not None:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            p.error(f"--workdir {args.workdir} must be empty or absent")
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir, cleanup = args.workdir, False
    else:
        workdir, cleanup = Path(tempfile.mkdtemp(prefix="eraser-bench-")), True
    try:
        result = run(settings, args.device, args.quick, workdir)
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)
    result["note"] = args.note
    result["caveats"] = caveats(result["machine"], args.note)
    write_outputs(result, args.out, output_stem(result["device"], args.quick))
    return 0


TOP_KEYS = ("schema_version", "benchmark", "mode", "device", "machine", "settings", "stages", "total_seconds",
            "note", "caveats", "reading")


def write_outputs(result: dict, out: Path, stem: str) -> None:
    result = {k: result.get(k) for k in TOP_KEYS}  # the same keys, in the same order, every run
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"[bench] wrote {out / (stem + '.json')} and {out / (stem + '.md')}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
