"""CUDA smoke run of the eraser and a timing, for a lent GPU machine.

1. Smoke: a tiny Llama trained with a LoRA on the GPU, then ``erase()`` on CUDA with each
   solver (direct, cg, default sqm, sqm --preset paper, and the fast path's ekfac, kfac and
   datainf, fitting their factors on the GPU); each must write an adapter whose erased
   rows' loss rose (the paper preset only has to run and report its residual).
2. Timing: a randomly initialised Llama with SmolLM2-135M's shape (no weights can reach
   that machine), LoRA r=8 on q_proj, v_proj (460,800 parameters), 48 synthetic fact
   rows: the affected rows' gradient, one GGN and one Hessian product over the 48 rows, a
   CG solve, and the whole update; then the fast path: EK-FAC factors fitted over the 48
   rows with the first erase, a second erase with those factors cached against its floor
   (the gradient of the same 4 rows), and the EK-FAC update's cosine with cg's. Random
   weights change the spectrum, not the cost.

    python -m bench.gpu_smoke [--out DIR] [--small]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn, repeat: int = 1):
    fn()  # warm-up: kernels, allocator
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    sync(device)
    return out, (time.perf_counter() - start) / repeat


def smoke(device: torch.device, workdir: Path) -> dict:
    from eraser.data import write_rows
    from eraser.requests import UnlearningRequest
    from eraser.solvers import SolverConfig
    from eraser.curvature import CurvatureConfig
    from devtools.synthetic import facts_to_rows, generate_people
    from eraser.data import Row
    from devtools.tiny import build_tiny_model
    from eraser.train import TrainConfig, train
    from eraser.unlearn import EraseConfig, erase

    rows = [Row(**r) for r in facts_to_rows(generate_people(10, 2, seed=0))]
    data = workdir / "train.jsonl"
    write_rows(data, rows)
    base = build_tiny_model(workdir / "tiny", [r.prompt + " " + r.response for r in rows], hidden_size=32,
                            heads=2, kv_heads=1, intermediate_size=64, vocab_size=400)
    adapter = workdir / "adapter"
    train(base, data, adapter, TrainConfig(rank=1, alpha=2, epochs=30, lr=1e-2), device=str(device))
    request = UnlearningRequest(remove=(rows[0].id, rows[1].id))
    results = {}
    for name, preset in (("direct", None), ("cg", None), ("sqm", None), ("sqm", "paper"), ("ekfac", None),
                         ("kfac", None), ("datainf", None)):
        label = name + ("-paper" if preset else "")
        cfg = EraseConfig(solver=SolverConfig(name, preset), curvature=CurvatureConfig(damping=0.05),
                          allow_unconverged=preset == "paper")
        start = time.perf_counter()
        report = erase(base, adapter, data, request, workdir / f"out-{label}", None, cfg, str(device))
        results[label] = {
            "seconds": round(time.perf_counter() - start, 3), "converged": report.converged,
            "residual": report.residual, "iterations": report.iterations,
            "loss_before": report.affected_loss_before, "loss_after": report.affected_loss_after,
            "ok": (report.affected_loss_after > report.affected_loss_before and report.converged) or preset == "paper",
        }
    return results


def timing(device: torch.device, small: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from eraser.curvature import Curvature, Damped, gradient
    from eraser.data import EncodedRows, Row
    from eraser.model import LoadedBase
    from eraser.requests import UnlearningRequest
    from eraser.solvers import CGSolver, SolverConfig
    from eraser.curvature import CurvatureConfig
    from devtools.synthetic import facts_to_rows, generate_people
    from devtools.tiny import build_tokenizer
    from eraser.train import TrainConfig, new_adapter
    from eraser.unlearn import EraseConfig, compute_update

    rows = [Row(**r) for r in facts_to_rows(generate_people(12, 4, seed=0))]
    tokenizer = build_tokenizer([r.prompt + " " + r.response for r in rows], vocab_size=600)
    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152)  # SmolLM2-135M
    if small:
        shape.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=1024)
    config = LlamaConfig(**shape, tie_word_embeddings=True, max_position_embeddings=2048,
                         attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    base = LoadedBase(model, tokenizer, "random-smollm2-shape", Path("."))
    peft_model = new_adapter(base, TrainConfig(rank=8, alpha=16))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    data = EncodedRows.from_rows(tokenizer, rows)
    tokens = sum(len(e.input_ids) for e in data.items) / len(data)
    all_rows = list(range(len(rows)))
    out = {"parameters": sum(p.numel() for p in params), "rows": len(rows), "mean_tokens_per_row": round(tokens, 1)}
    b, out["gradient_4_rows_s"] = timed(device, lambda: gradient(peft_model, params, data, [0, 1, 2, 3], None, 4, device), 3)
    for kind in ("ggn", "hessian"):
        for bs in (4, 16, 48):
            op = Curvature(peft_model, params, data, all_rows, kind, bs, device)
            _, out[f"{kind}_product_48_rows_batch{bs}_s"] = timed(device, lambda: op.matvec(b), 2)
    op = Damped(Curvature(peft_model, params, data, all_rows, "ggn", 16, device), 0.1 * float(b @ op.matvec(b)) / float(b @ b))
    res, out["cg_solve_s"] = timed(device, lambda: CGSolver(tolerance=1e-3, max_iterations=100).solve(op, b / len(rows)))
    out.update(cg_iterations=res.iterations, cg_residual=res.residual, cg_converged=res.converged)
    edits = UnlearningRequest(remove=tuple(r.id for r in rows[:4])).resolve(rows)
    cfg = EraseConfig(curvature=CurvatureConfig(damping=op.damping, batch_size=16),
                      solver=SolverConfig("cg", options={"max_iterations": 100}))
    upd, out["compute_update_s"] = timed(device, lambda: compute_update(peft_model, tokenizer, rows, edits, cfg, device))
    out.update(update_iterations=upd.solve.iterations, update_residual=upd.solve.residual)
    # The fast path: the first erase fits the EK-FAC factors, later ones reuse them.
    ek_cfg = replace(cfg, solver=SolverConfig("ekfac"))
    fitted, out["ekfac_fit_and_erase_s"] = timed(device, lambda: compute_update(peft_model, tokenizer, rows, edits,
                                                                                  ek_cfg, device))
    cached, out["ekfac_cached_erase_s"] = timed(device, lambda: compute_update(
        peft_model, tokenizer, rows, edits, ek_cfg, device, factors=fitted.factors), 3)
    out["ekfac_cached_over_floor"] = round(out["ekfac_cached_erase_s"] / out["gradient_4_rows_s"], 3)
    out["ekfac_cosine_with_cg"] = round(float(torch.nn.functional.cosine_similarity(cached.delta, upd.delta, dim=0)), 4)
    if device.type == "cuda":
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--small", action="store_true", help="tiny shapes, for a dry run on the CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "python": sys.version.split()[0], "small": args.small}
    with tempfile.TemporaryDirectory() as tmp:
        result["smoke"] = smoke(device, Path(tmp))
    print(json.dumps(result["smoke"], indent=1), flush=True)
    result["timing"] = timing(device, args.small)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"gpu-smoke-{device.type}{'-small' if args.small else ''}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# CUDA smoke run and timing ({result['device']}, torch {result['torch']})", "",
             "| smoke solver | ok | converged | residual | iterations | loss before → after | seconds |",
             "| --- | --- | --- | ---: | ---: | --- | ---: |"]
    for k, v in result["smoke"].items():
        residual = "n/a (closed form)" if v["residual"] is None else f"{v['residual']:.2e}"
        lines.append(f"| {k} | {v['ok']} | {v['converged']} | {residual} | {v['iterations']} | "
                     f"{v['loss_before']:.3f} → {v['loss_after']:.3f} | {v['seconds']:.2f} |")
    lines += ["", "| timing (SmolLM2-135M shape, random weights, 48 rows) | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result["timing"].items()]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(v["ok"] for v in result["smoke"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
