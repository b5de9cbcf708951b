"""The factor-fit benchmark's measurements, summary and report (see ``bench.factor_fit``)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import (loadavg, bench_parser, framed_caveats, machine_info, md_row, output_stem, pretrained_tiny_base, reading_and_caveats,
                          rendered, round_sig, write_outputs)

SCHEMA_VERSION = 1
TOP_KEYS = ("schema_version", "benchmark", "mode", "partial", "device", "machine", "settings", "models", "runs",
            "summary", "total_seconds", "note", "caveats", "reading")
ONE_PROCESS = "one process"  # eraser.factors.fit in this process: the existing path
RANKS = "ranks"  # eraser.distributed: spawned ranks and the all-reduce


@dataclass(frozen=True)
class ModelPlan:
    name: str  # "tiny" or "smollm2"
    rows: int
    repeats: int = 1
    method: str = "ekfac"
    lora_rank: int = 8
    train_epochs: int = 1  # the adapter only has to exist: the fit's cost does not depend on what it learnt
    lr: float = 2e-3
    batch_size: int = 4


@dataclass(frozen=True)
class Settings:
    nprocs: tuple[int, ...] = (1, 2)
    facts: int = 4  # rows per synthetic person
    seed: int = 0
    tiny_hidden: int = 64
    tiny_vocab: int = 512
    tiny_pretrain_steps: int = 40
    models: tuple[ModelPlan, ...] = field(default_factory=lambda: (
        ModelPlan("tiny", 320, repeats=2, lr=1e-2),
        ModelPlan("smollm2", 36, repeats=1),
    ))

    @classmethod
    def quick(cls) -> "Settings":
        return cls(tiny_hidden=32, tiny_vocab=300, tiny_pretrain_steps=5,
                   models=(ModelPlan("tiny", 24, repeats=1, lora_rank=2, lr=1e-2),))


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# --------------------------------------------------------------------------- the run


def _rows(n: int, facts: int, seed: int):
    from devtools.synthetic import facts_to_rows, generate_people
    from eraser.data import Row

    return [Row(**r) for r in facts_to_rows(generate_people(-(-n // facts), facts, seed))][:n]


def _prepare(plan: ModelPlan, s: Settings, workdir: Path) -> tuple[Path, Path, Path, dict]:
    """The base model, an adapter trained on the rows, and the rows' file."""
    from eraser.data import write_rows
    from eraser.train import TrainConfig, train

    rows = _rows(plan.rows, s.facts, s.seed)
    data = workdir / "train.jsonl"
    write_rows(data, rows)
    if plan.name == "smollm2":
        from eraser.pretrained import prepare_smollm2

        base, about = Path(prepare_smollm2(progress=False)), "SmolLM2-135M-Instruct"
    else:
        others = _rows(40, s.facts, s.seed + 1000)
        base = pretrained_tiny_base(workdir / "tiny-base", [r.prompt + " " + r.response for r in rows + others], others,
                                    hidden_size=s.tiny_hidden, intermediate_size=2 * s.tiny_hidden,
                                    vocab_size=s.tiny_vocab, steps=s.tiny_pretrain_steps, seed=s.seed)
        about = (f"tiny Llama, hidden {s.tiny_hidden}, 2 layers, vocab {s.tiny_vocab} (built on the spot, "
                 f"pre-trained {s.tiny_pretrain_steps} steps)")
    adapter = workdir / "adapter"
    _say(f"{plan.name}: training the adapter ({plan.train_epochs} epoch over {len(rows)} rows)")
    train(base, data, adapter, TrainConfig(rank=plan.lora_rank, alpha=2.0 * plan.lora_rank, epochs=plan.train_epochs,
                                           lr=plan.lr, batch_size=plan.batch_size, seed=s.seed))
    return base, adapter, data, {"base": about, "adapter": f"LoRA r={plan.lora_rank} on q_proj, v_proj",
                                 "rows": len(rows), "method": plan.method, "batch_size": plan.batch_size}


def _fit(plan: ModelPlan, base: Path, adapter: Path, data: Path, out: Path, way: str, nproc: int) -> dict:
    from eraser.distributed import FitJob, fit_factors
    from eraser.kfac import KFACConfig

    job = FitJob(str(base), str(adapter), str(data), str(out),
                 KFACConfig(eigen_correction=plan.method == "ekfac", batch_size=plan.batch_size))
    load = os.getloadavg()[0]
    t = time.perf_counter()
    report = fit_factors(job, nproc, spawn=way == RANKS)
    wall = time.perf_counter() - t
    return {"model": plan.name, "way": way, "nproc": nproc, "wall_seconds": round(wall, 3),
            "fit_seconds": report["fit_seconds"], "parameters": report["parameters"], "blocks": report["blocks"],
            "loadavg_1min_before": round(load, 2)}


def _compare(reference: Path, other: Path) -> dict:
    """The other cache against the one-process one: the sums, and the solve of random vectors."""
    import torch

    from eraser.kfac import KFAC

    one, many = KFAC.load(reference), KFAC.load(other)
    rel = lambda a, b: float((a - b).abs().max() / a.abs().max().clamp(min=1e-300))  # noqa: E731
    g = torch.Generator().manual_seed(0)
    scale = max(float(b.eigen.max()) for b in one.blocks)
    solve = 0.0
    for _ in range(3):
        v = torch.randn(one.n, generator=g, dtype=torch.float64)
        for damping in (0.1 * scale, scale):
            x1, x2 = one.solve(v, damping), many.solve(v, damping)
            solve = max(solve, float((x1 - x2).norm() / x1.norm()))
    return {"A_max_rel_diff": max(rel(a.A, b.A) for a, b in zip(one.blocks, many.blocks)),
            "G_max_rel_diff": max(rel(a.G, b.G) for a, b in zip(one.blocks, many.blocks)),
            "counts_equal": all(a.rows == b.rows and a.tokens == b.tokens for a, b in zip(one.blocks, many.blocks)),
            "solve_max_rel_diff": solve}


def run_model(plan: ModelPlan, s: Settings, workdir: Path) -> tuple[dict, list[dict]]:
    base, adapter, data, about = _prepare(plan, s, workdir)
    ways = [(ONE_PROCESS, 1)] + [(RANKS, n) for n in s.nprocs]
    runs = []
    for repeat in range(plan.repeats):  # interleaved, so that a change of load hits every way alike
        for way, nproc in ways:
            out = workdir / f"f-{way.replace(' ', '-')}-{nproc}-{repeat}"
            _say(f"{plan.name}: {way} x{nproc}, repeat {repeat + 1}/{plan.repeats}")
            r = _fit(plan, base, adapter, data, out, way, nproc)
            r["repeat"] = repeat
            if repeat == 0 and way == RANKS:
                r["against_one_process"] = _compare(workdir / "f-one-process-1-0", out)
            runs.append(r)
            _say(f"{plan.name}: {way} x{nproc}: fit {r['fit_seconds']:.2f} s, wall {r['wall_seconds']:.2f} s")
    for p in workdir.glob("f-*"):
        shutil.rmtree(p, ignore_errors=True)
    about.update(parameters=runs[0]["parameters"], blocks=runs[0]["blocks"])
    return about, runs


def run(s: Settings, workdir: Path, checkpoint=None) -> dict:
    import torch

    started = time.perf_counter()
    torch.manual_seed(s.seed)
    machine = machine_info(torch.device("cpu"))
    models, runs = {}, []

    def result(partial: bool) -> dict:
        return {"schema_version": SCHEMA_VERSION, "benchmark": "factor_fit", "device": "cpu", "machine": machine,
                "settings": asdict(s), "models": models, "runs": runs, "partial": partial,
                "total_seconds": round(time.perf_counter() - started, 1)}

    for plan in s.models:
        d = workdir / plan.name
        d.mkdir()
        t = time.perf_counter()
        about, model_runs = run_model(plan, s, d)
        about["seconds"] = round(time.perf_counter() - t, 1)
        models[plan.name] = about
        runs += model_runs
        if checkpoint is not None:
            checkpoint(result(True))
    machine["loadavg_end"] = loadavg()
    return result(False)


# --------------------------------------------------------------------------- summary and report


def summarize(result: dict) -> dict:
    out = {}
    for name in result["models"]:
        runs = [r for r in result["runs"] if r["model"] == name]
        ways = {}
        for r in runs:
            label = ONE_PROCESS if r["way"] == ONE_PROCESS else f"{r['nproc']} rank{'s' if r['nproc'] > 1 else ''}"
            w = ways.setdefault(label, {"way": r["way"], "nproc": r["nproc"], "fit_seconds": [], "wall_seconds": []})
            w["fit_seconds"].append(r["fit_seconds"])
            w["wall_seconds"].append(r["wall_seconds"])
        for w in ways.values():
            w["fit_best"], w["wall_best"] = min(w["fit_seconds"]), min(w["wall_seconds"])
        one, r1, r2 = ways.get(ONE_PROCESS), ways.get("1 rank"), ways.get("2 ranks")
        ratio = lambda a, b, k: round_sig(a[k] / b[k], 3) if a and b and b[k] > 0 else None  # noqa: E731
        out[name] = {"ways": ways,
                     "speedup_fit_2_ranks_vs_one_process": ratio(one, r2, "fit_best"),
                     "speedup_fit_2_ranks_vs_1_rank": ratio(r1, r2, "fit_best"),
                     "speedup_wall_2_ranks_vs_one_process": ratio(one, r2, "wall_best"),
                     "against_one_process": {f"{r['nproc']} rank{'s' if r['nproc'] > 1 else ''}": r["against_one_process"]
                                             for r in runs if r.get("against_one_process")}}
    return out


def _f(x) -> str:
    return "—" if x is None else f"{x:.3g}" if isinstance(x, float) and abs(x) < 0.01 else f"{x:.2f}"


def reading(result: dict) -> list[str]:
    out = []
    cpus = result["machine"].get("cpu_affinity")
    for name, s in result["summary"].items():
        out.append(f"{name}: speedup of the fit with 2 ranks (its seconds divided into the other's): "
                   f"{_f(s['speedup_fit_2_ranks_vs_one_process'])}x against one process, "
                   f"{_f(s['speedup_fit_2_ranks_vs_1_rank'])}x against 1 rank; end to end (starting the ranks and "
                   f"loading the model in each) {_f(s['speedup_wall_2_ranks_vs_one_process'])}x. The ideal on "
                   f"{cpus} cores is {min(2, cpus or 2)}x.")
        for label, c in s["against_one_process"].items():
            out.append(f"{name}: the cache of {label} against the one-process cache: A within {c['A_max_rel_diff']:.1e}, "
                       f"G within {c['G_max_rel_diff']:.1e} (relative, largest entry), row and token counts "
                       f"{'equal' if c['counts_equal'] else 'DIFFERENT'}, solves within {c['solve_max_rel_diff']:.1e}: "
                       "the same factors up to rounding.")
    out.append("The one process uses every core through torch's threads; 1 rank does too; 2 ranks use one thread "
               "each. On this machine the ranks share its cores with each other and with the other load, so what "
               "sharding buys here is bounded by 2x; ranks on machines or GPUs of their own are what it is for.")
    return out


def caveats(result: dict) -> list[str]:
    m = result["machine"]
    out = [f"Measured on {m.get('cpu_model') or 'this machine'}, {m.get('cpu_affinity')} cores, while other processes "
           f"were loading it (another benchmark was running): load average {m.get('loadavg_start')} at the start, "
           f"{m.get('loadavg_end')} at the end, and each run's 1-minute load before it is in the JSON. Every time is "
           "under load; on idle cores the times and the speedups would differ.",
           "fit s: the two passes over the rows with their all-reduces (EK-FAC), as rank 0 records them in the "
           "cache's history; wall s: the whole call, including starting the ranks (a fresh Python and torch each), "
           "loading the model in every rank and writing the cache. The one process runs in the benchmark's own "
           "process (torch already imported), as an erase that fits its factors does.",
           "Best of the repeats (interleaved); every repeat is in the JSON."]
    return framed_caveats(result, out, "a few rows of a tiny model, a smoke test", "models")


def markdown(result: dict) -> str:
    lines = [f"# Factor fit: one process against ranks of torch.distributed ({result['device']}, {result['mode']})", ""]
    for name, about in result["models"].items():
        s = result["summary"][name]
        lines += [f"## {name}", "", f"{about['base']}; {about['adapter']} ({about['parameters']} parameters, "
                  f"{about['blocks']} blocks); {about['method']} over {about['rows']} rows, batches of "
                  f"{about['batch_size']}.", "",
                  md_row(["way", "fit s (best)", "wall s (best)", "fit s (each repeat)", "wall s (each repeat)"]),
                  md_row(["---"] * 5)]
        for label, w in s["ways"].items():
            lines.append(md_row([label, _f(w["fit_best"]), _f(w["wall_best"]),
                                 ", ".join(_f(x) for x in w["fit_seconds"]), ", ".join(_f(x) for x in w["wall_seconds"])]))
        lines += ["", f"- speedup of the fit with 2 ranks: {_f(s['speedup_fit_2_ranks_vs_one_process'])}x against one "
                  f"process, {_f(s['speedup_fit_2_ranks_vs_1_rank'])}x against 1 rank; end to end "
                  f"{_f(s['speedup_wall_2_ranks_vs_one_process'])}x (ideal on 2 cores: 2x)", ""]
    return "\n".join(lines + reading_and_caveats(result)) + "\n"


def finish(result: dict, out: Path, stem: str) -> None:
    result["summary"] = summarize(result)
    result["caveats"], result["reading"] = caveats(result), reading(result)
    write_outputs(result, out, stem, TOP_KEYS, markdown, _say)


def main(argv: list[str] | None = None) -> int:
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eraser.process.passive_openmp_waits
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = bench_parser("factor_fit", "Factor fit: one process against ranks of torch.distributed", device=False)
    args = p.parse_args(argv)
    if args.render is not None:
        finish(rendered(args), args.out, args.render.stem)
        return 0
    from eraser.process import quiet_libraries

    quiet_libraries()
    settings = Settings.quick() if args.quick else Settings()
    workdir = Path(tempfile.mkdtemp(prefix="eraser-factor-fit-"))
    mode = "quick" if args.quick else "default"
    stem = output_stem("factor_fit", "cpu", args.quick)

    def checkpoint(partial: dict) -> None:  # a run cut short keeps what it measured
        partial["machine"]["loadavg_end"] = loadavg()
        finish({**partial, "mode": mode, "note": args.note}, args.out, stem)

    try:
        result = run(settings, workdir, checkpoint)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["mode"] = mode
    result["note"] = args.note
    finish(result, args.out, stem)
    return 0
