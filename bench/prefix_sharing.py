"""The rows' common prefix run once, and larger batches, against one pass per batch of 8.

Every row a refinement step scores begins with the same chat-template turn (SmolLM2's system
prompt and the user header: 24 of about 56 tokens). ``eraser.losses.response_logits`` with
``share_prefix`` runs that prefix once per batch and repeats its key/value cache for every
row; the second pass costs a forward of its own, so it pays only where the batch is large
enough. This times the engine's loss on the rows a refinement step scores, forward (the line
search's trials, the verdicts) and forward with backward (the gradients), per batch size with
and without the shared prefix, interleaved, and checks that every way gives the same NLL.

    python -m bench.prefix_sharing [--quick] [--out bench/results]
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass

from bench.common import machine_info
from bench.output_layer import _setup, _timed, timings_caveats, timings_main, timings_markdown

BASELINE = "one pass, batches of 8"


@dataclass(frozen=True)
class Settings:
    rows: int = 32  # the retained rows a refinement step samples
    batches: tuple[int, ...] = (8, 16, 32)
    repeats: int = 5

    @classmethod
    def quick(cls) -> "Settings":
        return cls(rows=8, batches=(4, 8), repeats=1)


def say(msg: str) -> None:
    print(f"[bench.prefix_sharing] {msg}", file=sys.stderr, flush=True)


def _ways(settings: Settings) -> dict[str, tuple[int, bool]]:
    ways = {f"one pass, batches of {b}": (b, False) for b in settings.batches}
    ways.update({f"shared prefix, batches of {b}": (b, True) for b in settings.batches})
    return ways


def _forward(model, data, batch: int, share: bool, dev) -> list[float]:
    import torch

    from eraser.losses import per_row_nll

    with torch.no_grad():
        return [x for _, b in data.batches(batch, device=dev) for x in per_row_nll(model, b, share).tolist()]


def _forward_backward(model, data, batch: int, share: bool, dev) -> None:
    from eraser.losses import per_row_nll

    model.zero_grad(set_to_none=True)
    for _, b in data.batches(batch, device=dev):
        per_row_nll(model, b, share).sum().backward()
    model.zero_grad(set_to_none=True)


def run(settings: Settings, device: str, quick: bool) -> dict:
    from eraser.losses import shared_prefix_length

    model, data, dev = _setup(settings, device)
    ways = _ways(settings)
    nll = {way: _forward(model, data, b, share, dev) for way, (b, share) in ways.items()}  # also a warm-up
    times = {way: {"forward": [], "forward_backward": []} for way in ways}
    for r in range(settings.repeats):  # interleaved: load on the machine falls on every way alike
        for way, (b, share) in ways.items():
            times[way]["forward"].append(_timed(lambda: _forward(model, data, b, share, dev)))
            times[way]["forward_backward"].append(_timed(lambda: _forward_backward(model, data, b, share, dev)))
        say(f"repeat {r + 1}/{settings.repeats}")
    everything = data.batch(list(range(len(data))), dev)
    reference = nll[f"one pass, batches of {settings.batches[0]}"]
    return {
        "benchmark": "prefix_sharing", "mode": "quick" if quick else "full", "device": str(dev),
        "machine": machine_info(dev),
        "settings": {"rows": settings.rows, "batches": list(settings.batches), "repeats": settings.repeats,
                     "model": "SmolLM2-135M-Instruct, LoRA r=8 on q_proj, v_proj",
                     "tokens_per_row_mean": round(float(everything["attention_mask"].sum(1).float().mean()), 1),
                     "shared_prefix_tokens": shared_prefix_length(everything, everything["input_ids"].shape[1])},
        "timings": {way: {k: {"median_s": round(statistics.median(v), 4), "best_s": round(min(v), 4),
                              "all_s": [round(x, 4) for x in v]} for k, v in t.items()} for way, t in times.items()},
        "agreement": {"max_abs_nll_difference": max(abs(a - b) for way in nll for a, b in zip(nll[way], reference)),
                      "rows": len(reference)},
    }


def _baseline(result: dict) -> str:
    return BASELINE if BASELINE in result["timings"] else next(iter(result["timings"]))


def reading(result: dict) -> list[str]:
    t, base = result["timings"], _baseline(result)
    out = [f"{result['settings']['shared_prefix_tokens']} of a mean {result['settings']['tokens_per_row_mean']} "
           "tokens a row are the same in every row."]
    for k, what in (("forward", "forward (line-search trials, verdicts)"),
                    ("forward_backward", "forward and backward (gradients)")):
        b = t[base][k]["median_s"]
        best = min(t, key=lambda w: t[w][k]["median_s"])
        out.append(f"{what} over {result['settings']['rows']} rows: {b:.3f} s {base}; fastest {best}: "
                   f"{t[best][k]['median_s']:.3f} s ({b / t[best][k]['median_s']:.2f}x, medians of "
                   f"{result['settings']['repeats']}).")
    out.append(f"Per-row NLL agrees across every way to {result['agreement']['max_abs_nll_difference']:.1e} nats "
               f"over {result['agreement']['rows']} rows.")
    return out


def caveats(result: dict) -> list[str]:
    return timings_caveats(result, "Every way runs interleaved in one process on the same rows; the adapter is "
                                   "untrained (random B), which does not change the cost. Rows whose prompts share "
                                   "less (no system turn, long distinct prompts) gain less.")


def markdown(result: dict) -> str:
    s = result["settings"]
    return timings_markdown(result, "The shared prefix run once",
                            f"{s['model']}; {s['rows']} synthetic fact rows (mean {s['tokens_per_row_mean']} tokens "
                            f"a row, {s['shared_prefix_tokens']} of them the same in every row).", "way")


def main(argv: list[str] | None = None) -> int:
    return timings_main(argv, "prefix_sharing", "The rows' common prefix run once, against one pass per batch",
                        Settings, run, reading, caveats, markdown, say)


if __name__ == "__main__":
    sys.exit(main())
