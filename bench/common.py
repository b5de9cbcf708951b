"""Small helpers shared by the benchmarks: percentiles and the machine's facts."""

from __future__ import annotations

import json
import math
from contextlib import suppress
from pathlib import Path


def percentile(sorted_xs: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_xs:
        return None
    k = (len(sorted_xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def summary_ms(ms: list[float]) -> dict:
    """n, p50/p90/p99, mean, min and max of latencies in milliseconds."""
    xs = sorted(ms)
    out: dict = {"n": len(xs)}
    for name, p in (("p50", 50), ("p90", 90), ("p99", 99)):
        v = percentile(xs, p)
        out[f"{name}_ms"] = None if v is None else round(v, 2)
    out["mean_ms"] = round(sum(xs) / len(xs), 2) if xs else None
    out["min_ms"] = round(xs[0], 2) if xs else None
    out["max_ms"] = round(xs[-1], 2) if xs else None
    return out


def cpu_and_memory(info: dict) -> dict:
    """Add cpu_model and memory_total_mb to ``info`` where /proc can be read: machine facts
    are context, not results."""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_total_mb"] = round(int(line.split()[1]) / 1024, 1)
                break
    return info


def md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def reading_and_caveats(result: dict) -> list[str]:
    """The Markdown tail every benchmark shares: its reading and its caveats as bullets."""
    lines = ["", "Reading:", ""] + [f"- {x}" for x in result["reading"]]
    return lines + ["", "Caveats:", ""] + [f"- {x}" for x in result["caveats"]]


def write_outputs(result: dict, out: Path, stem: str, keys, markdown, say) -> None:
    """Write ``stem``.json (the ``keys`` of ``result``) and ``stem``.md, and print the table."""
    result = {k: result.get(k) for k in keys}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    text = markdown(result)
    (out / f"{stem}.md").write_text(text)
    print(text)
    say(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
