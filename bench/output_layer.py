"""The output layer over response positions only, against over every position (the baseline).

Every loss the engine computes (``eraser.losses.response_logits``) needs the logits of the
positions that predict a response token; the prompt's positions (a chat template and a
question: most of each row) were computed by the model's output layer (vocabulary x hidden)
and thrown away. This times ``per_row_nll`` as the engine calls it, beside the same loss with
the logits of every position, on the rows a refinement step scores (forward: the line
search's trials and the verdicts; forward and backward: the gradients), interleaved, and
checks the two give the same per-row NLL.

    python -m bench.output_layer [--quick] [--out bench/results]
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import torch

from bench.common import (bench_parser, framed_caveats, machine_info, md_row, output_stem, reading_and_caveats,
                          rendered, write_outputs)

TOP_KEYS = ("benchmark", "mode", "device", "machine", "settings", "timings", "agreement", "reading", "caveats",
            "note")


@dataclass(frozen=True)
class Settings:
    rows: int = 32  # the retained rows a refinement step samples
    batch_size: int = 8
    repeats: int = 7

    @classmethod
    def quick(cls) -> "Settings":
        return cls(rows=8, batch_size=4, repeats=1)


def say(msg: str) -> None:
    print(f"[bench.output_layer] {msg}", file=sys.stderr, flush=True)


def every_position_nll(model, batch) -> torch.Tensor:
    """The baseline: logits at every position, then the engine's weights and cross-entropy."""
    from eraser.data import IGNORE_INDEX
    from eraser.losses import token_nll

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    mask = (targets != IGNORE_INDEX).to(logits.dtype)
    weights = mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return (token_nll(logits, targets) * weights).sum(dim=1)


def _setup(settings: Settings, device: str):
    from devtools.synthetic import facts_to_rows, generate_people
    from eraser.data import EncodedRows
    from eraser.model import load_base, resolve_device
    from eraser.pretrained import prepare_smollm2
    from eraser.train import TrainConfig, new_adapter

    dev = resolve_device(device)
    base = load_base(prepare_smollm2(progress=False), dev)
    model = new_adapter(base, TrainConfig())
    with torch.no_grad():  # LoRA's B starts at zero: give the adapter weights, as a trained one has
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    people = generate_people((settings.rows + 2) // 3, 3, seed=0)
    rows = facts_to_rows(people)[: settings.rows]
    data = EncodedRows(base.tokenizer, [(r["prompt"], r["response"]) for r in rows], 512)
    return model, data, dev


def _forward(model, data, settings, dev, loss) -> list[float]:
    with torch.no_grad():
        return [x for _, b in data.batches(settings.batch_size, device=dev) for x in loss(model, b).tolist()]


def _forward_backward(model, data, settings, dev, loss) -> None:
    model.zero_grad(set_to_none=True)
    for _, b in data.batches(settings.batch_size, device=dev):
        loss(model, b).sum().backward()
    model.zero_grad(set_to_none=True)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run(settings: Settings, device: str, quick: bool) -> dict:
    from eraser.losses import per_row_nll

    model, data, dev = _setup(settings, device)
    ways = {"every position (baseline)": every_position_nll, "response positions (engine)": per_row_nll}
    kept = _forward(model, data, settings, dev, per_row_nll)
    full = _forward(model, data, settings, dev, every_position_nll)  # also a warm-up of both
    times = {way: {"forward": [], "forward_backward": []} for way in ways}
    for r in range(settings.repeats):  # interleaved: load on the machine falls on both alike
        for way, loss in ways.items():
            times[way]["forward"].append(_timed(lambda: _forward(model, data, settings, dev, loss)))
            times[way]["forward_backward"].append(_timed(lambda: _forward_backward(model, data, settings, dev, loss)))
        say(f"repeat {r + 1}/{settings.repeats}")
    everything = data.batch(list(range(len(data))), dev)
    scored = int((everything["labels"][:, 1:] != -100).sum())
    return {
        "benchmark": "output_layer", "mode": "quick" if quick else "full", "device": str(dev),
        "machine": machine_info(dev),
        "settings": {"rows": settings.rows, "batch_size": settings.batch_size, "repeats": settings.repeats,
                     "model": "SmolLM2-135M-Instruct, LoRA r=8 on q_proj, v_proj",
                     "tokens_per_row_mean": round(float(everything["attention_mask"].sum(1).float().mean()), 1),
                     "response_tokens": scored},
        "timings": {way: {k: {"median_s": round(statistics.median(v), 4), "best_s": round(min(v), 4), "all_s":
                              [round(x, 4) for x in v]} for k, v in t.items()} for way, t in times.items()},
        "agreement": {"max_abs_nll_difference": max(abs(a - b) for a, b in zip(kept, full)), "rows": len(kept)},
    }


def reading(result: dict) -> list[str]:
    base, engine = result["timings"].values()
    out = []
    for k, what in (("forward", "forward (line-search trials, verdicts)"),
                    ("forward_backward", "forward and backward (gradients)")):
        b, e = base[k]["median_s"], engine[k]["median_s"]
        out.append(f"{what} over {result['settings']['rows']} rows: {b:.3f} s with every position's logits, "
                   f"{e:.3f} s with the response positions' ({b / e:.2f}x, medians of "
                   f"{result['settings']['repeats']}).")
    out.append(f"Per-row NLL agrees to {result['agreement']['max_abs_nll_difference']:.1e} nats over "
               f"{result['agreement']['rows']} rows (float32 rounding of a smaller product).")
    return out


def timings_caveats(result: dict, how: str) -> list[str]:
    """Where a forward-cost benchmark ran, then ``how`` its ways were run."""
    m = result["machine"]
    out = [f"Measured on {m.get('cpu_model') or 'this machine'} with {m.get('torch_threads')} torch threads; load "
           f"average {m.get('loadavg_start')} at the start. {how}"]
    return framed_caveats(result, out, "8 rows, one repeat", "ways")


def caveats(result: dict) -> list[str]:
    return timings_caveats(result, "Both ways run interleaved in one process on the same batches; the adapter is "
                                   "untrained (random B), which does not change the cost.")


def timings_markdown(result: dict, title: str, intro: str, first: str) -> str:
    """The page of a forward-cost benchmark: forward and forward+backward seconds per way."""
    lines = [f"# {title} ({result['device']}, {result['mode']})", "", intro, "",
             md_row([first, "forward s (median)", "forward s (best)", "forward+backward s (median)",
                     "forward+backward s (best)"]), md_row(["---", "---:", "---:", "---:", "---:"])]
    for way, t in result["timings"].items():
        lines.append(md_row([way, t["forward"]["median_s"], t["forward"]["best_s"],
                             t["forward_backward"]["median_s"], t["forward_backward"]["best_s"]]))
    return "\n".join(lines + reading_and_caveats(result)) + "\n"


def markdown(result: dict) -> str:
    s = result["settings"]
    return timings_markdown(result, "The output layer over response positions only",
                            f"{s['model']}; {s['rows']} synthetic fact rows (mean {s['tokens_per_row_mean']} tokens "
                            f"a row, {s['response_tokens']} response tokens in all), batches of {s['batch_size']}.",
                            "logits")


def timings_main(argv, name: str, description: str, settings_type, run, reading, caveats, markdown, say) -> int:
    """Run (or ``--render``) a forward-cost benchmark and write its JSON and page."""
    args = bench_parser(name, description).parse_args(argv)
    if args.render is not None:
        result = rendered(args)
    else:
        result = run(settings_type.quick() if args.quick else settings_type(), args.device, args.quick)
        result["note"] = args.note
    result["reading"] = reading(result)
    result["caveats"] = caveats(result)
    write_outputs(result, args.out, output_stem(name, result["device"], result["mode"] == "quick"), TOP_KEYS,
                  markdown, say)
    return 0


def main(argv: list[str] | None = None) -> int:
    return timings_main(argv, "output_layer", "The output layer over response positions only, against every position",
                        Settings, run, reading, caveats, markdown, say)


if __name__ == "__main__":
    sys.exit(main())
