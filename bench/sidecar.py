"""Sidecar benchmark: Erase acceptance latency under 50 concurrent clients, and 20 queued
requests served merged against one by one.

``python -m bench.sidecar [--quick] [--out bench/results] [--note TEXT] [--render JSON]``

Everything runs against the real sidecar (``sidecar.server.start``) on loopback, with a
tiny Llama and a LoRA built and trained on the spot from synthetic facts
(``devtools.synthetic``), so that the run needs no model hub:

1. Acceptance latency. 50 client threads, each with its own gRPC channel, each send
   ``requests_per_client`` Erase requests (distinct request ids, each removing one
   distinct row) as fast as they can; each call is timed from call to return (validation
   plus durable queueing in SQLite). The clients run in a second process, as real clients
   would, so they do not share the sidecar's GIL; they do share its 2 CPU cores. Three
   variants, each on a fresh sidecar, each twice: with group commit (the default: requests
   that arrive while a COMMIT is being fsynced share the next one) and, just before it,
   with one transaction and fsync per request (``group_commit=False``, ``*_commit_each``,
   as before group commit):

   - ``one_client``: a single client sends 2000 requests one after another with the
     worker held off: the uncontended cost of a call, and how it grows as the one queued
     job they all join grows.
   - ``worker_paused``: the 50 clients, with the job worker held off for the measurement
     (the benchmark holds the service's publish lock, which the worker needs to claim a
     job), so no solve competes for the CPU; every request joins one queued job.
   - ``solving``: the 50 clients with the worker running as in production: solves of the
     queued jobs run in the same process, in the background, during the measurement.

   The latency adapter is the trained LoRA registered with a larger dataset (so that every
   request can remove a distinct row); its solves are only background load here.

   Then the job database alone, with and without group commit: 1 thread and 50 threads of
   the benchmark's process call ``JobDB.submit`` directly, each request its own job
   (merging off): the durable commit path without gRPC, validation or the merged job
   that grows with every request.

2. Merging against one by one. Two fresh sidecars, ``merge_queued=True`` and ``False``,
   each get the same 20 Erase requests (one distinct row each) at once; the time from the
   first submit until every request's job has succeeded, the number of solves, the final
   version, and the rows removed are recorded, and the final adapters are evaluated on
   the 20 erased rows (forget NLL) and the others (retain NLL).

Results go to ``<out>/sidecar[-quick].json`` and ``.md``. ``--quick`` shrinks everything
(smaller model, 50 + 20 requests, 5 queued requests, cg tolerance 1e-2) for a smoke run of well
under a minute; its numbers mean nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import threading
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import (bench_parser, in_workdir, loadavg, machine_info, md_row, reading_and_caveats, rendered, summary_ms,
                          write_outputs)

SCHEMA_VERSION = 1
TOP_KEYS = ("schema_version", "benchmark", "mode", "machine", "settings", "model", "acceptance", "merging",
            "total_seconds", "note", "caveats", "reading")
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    # The tiny base model (a Llama), pre-trained on facts about *other* people so that it
    # knows the sentence patterns and the adapter only has to learn the facts.
    hidden_size: int = 64
    layers: int = 2
    intermediate_size: int = 128
    vocab_size: int = 512
    pretrain_people: int = 25
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    # The adapter and its training set.
    people: int = 25
    facts: int = 4
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_MODULES
    epochs: int = 40
    lr: float = 1e-2
    batch_size: int = 8
    # The sidecar's erase defaults (requests send no options, so all of them merge).
    # Damping 1.0 keeps one cg solve at a few seconds on this tiny model (about 8
    # iterations); with 0.1 it takes ~30 iterations.
    solver: str = "cg"
    damping: float = 1.0
    tolerance: float = 1e-3
    max_iterations: int = 100
    curvature_batch_size: int = 32
    # Part 1: acceptance latency.
    clients: int = 50
    requests_per_client: int = 20
    # The same, sequentially from a single client: the uncontended cost of one call.
    # Enough for the growth of a merged queued job to show.
    single_client_requests: int = 2000
    # Part 2: merging against one by one.
    queued_requests: int = 20

    @classmethod
    def quick(cls) -> "Settings":
        return cls(hidden_size=32, intermediate_size=64, vocab_size=300, pretrain_people=6, pretrain_steps=30,
                   people=6, epochs=3, tolerance=1e-2, requests_per_client=1, single_client_requests=20,
                   queued_requests=5)


def _say(msg: str) -> None:
    print(f"[bench.sidecar {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- small helpers




def _round(x, digits: int = 4):
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _since(timestamp, wall0: float) -> float:
    return _round(timestamp.ToNanoseconds() / 1e9 - wall0)


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------- the model


def _rows(people: int, facts: int, seed: int, prefix: str):
    from eraser.data import Row
    from devtools.synthetic import facts_to_rows, generate_people

    return [Row(**r) for r in facts_to_rows(generate_people(people, facts, seed=seed), id_prefix=prefix)]


def build_model(s: Settings, workdir: Path) -> dict:
    """A tiny base (pre-trained on other people's facts), the training set, and a LoRA."""
    from transformers import AutoModelForCausalLM

    from eraser.data import write_rows
    from devtools.tiny import build_tiny_model, pretrain
    from eraser.train import TrainConfig, train

    train_rows = _rows(s.people, s.facts, s.seed, "p")
    other_rows = _rows(s.pretrain_people, s.facts, s.seed + 1, "x")
    # Rows the latency adapter is registered with: one distinct row per request.
    # One more row than requests: removing every row of an adapter is refused.
    n_latency = max(s.clients * s.requests_per_client, s.single_client_requests) + 1
    latency_rows = _rows(math.ceil(n_latency / s.facts), s.facts, s.seed + 2, "q")[:n_latency]
    texts = [r.prompt + " " + r.response for r in train_rows + other_rows + latency_rows]

    t = time.perf_counter()
    base = workdir / "base"
    build_tiny_model(base, texts, hidden_size=s.hidden_size, layers=s.layers, heads=2, kv_heads=1,
                     intermediate_size=s.intermediate_size, vocab_size=s.vocab_size, seed=s.seed)
    loss = pretrain(base, other_rows, s.pretrain_steps, s.pretrain_lr, s.seed)
    base_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    pretrain_seconds = time.perf_counter() - t
    _say(f"base model: {base_parameters:,} parameters, pre-trained {s.pretrain_steps} steps in {pretrain_seconds:.1f} s")

    train_path, latency_path = workdir / "train.jsonl", workdir / "latency.jsonl"
    write_rows(train_path, train_rows)
    write_rows(latency_path, latency_rows)
    t = time.perf_counter()
    report = train(base, train_path, workdir / "lora",
                   TrainConfig(rank=s.rank, alpha=s.alpha, targets=s.targets, epochs=s.epochs, lr=s.lr,
                               batch_size=s.batch_size, seed=s.seed))
    train_seconds = time.perf_counter() - t
    losses = report.get("loss_per_epoch") or []
    _say(f"LoRA: {report.get('parameters'):,} parameters, {len(train_rows)} rows, {s.epochs} epochs in "
         f"{train_seconds:.1f} s (last epoch loss {losses[-1] if losses else float('nan'):.3f})")
    return {
        "base_dir": str(base), "adapter_dir": str(workdir / "lora"), "train_path": str(train_path),
        "latency_path": str(latency_path),
        "train_ids": [r.id for r in train_rows], "latency_ids": [r.id for r in latency_rows],
        "summary": {
            "architecture": f"Llama, hidden {s.hidden_size}, {s.layers} layers, intermediate {s.intermediate_size}, "
                            f"vocab {s.vocab_size}",
            "base_parameters": base_parameters,
            "pretrain_steps": s.pretrain_steps,
            "pretrain_final_loss": _round(float(loss)) if loss is not None else None,
            "pretrain_seconds": round(pretrain_seconds, 2),
            "adapter": f"LoRA r={s.rank}, alpha={s.alpha:g} on {', '.join(s.targets)}",
            "adapter_parameters": report.get("parameters"),
            "train_rows": len(train_rows),
            "train_epochs": s.epochs,
            "train_loss_first_last": [_round(losses[0]), _round(losses[-1])] if losses else None,
            "train_seconds": round(train_seconds, 2),
            "latency_dataset_rows": len(latency_rows),
        },
    }


# --------------------------------------------------------------------------- sidecar helpers


def _config(s: Settings, store: Path, merge: bool = True, group_commit: bool = True):
    from sidecar.config import EraseDefaults, SidecarConfig

    return SidecarConfig(store=store, grpc_port=0, metrics_port=0, merge_queued=merge, group_commit=group_commit,
                         drain_seconds=5.0,
                         max_request_rows=100_000,
                         erase=EraseDefaults(solver=s.solver, damping=s.damping, tolerance=s.tolerance,
                                             max_iterations=s.max_iterations, damping_scale="absolute",
                                             curvature_batch_size=s.curvature_batch_size,
                                             # Merging is judged on the influence updates as
                                             # computed: a line search could scale one to zero.
                                             step_control=False))


def _register(stub, name: str, base_dir: str, adapter_dir: str, dataset: str):
    from eraser_proto.eraser.v1 import eraser_pb2 as pb

    return stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, base_model=base_dir, adapter_path=adapter_dir,
                                                          dataset_path=dataset), timeout=120)


def _client_process(target: str, adapter: str, clients: int, per_client: int, ids: list[str], prefix: str, conn) -> None:
    """The load generator (a separate process): ``clients`` threads, one channel each."""
    import grpc

    from eraser_proto.eraser.v1 import eraser_pb2 as pb
    from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc

    warmed = threading.Barrier(clients + 1)
    go = threading.Event()
    results: list[list] = [[] for _ in range(clients)]

    def client(c: int) -> None:
        channel = grpc.insecure_channel(target)
        stub = pb_grpc.EraserStub(channel)
        with suppress(grpc.RpcError):  # a client that cannot connect records its calls' failures below
            stub.GetAdapter(pb.GetAdapterRequest(name=adapter), timeout=60)  # connected before timing starts
        warmed.wait()
        try:
            go.wait()
            for k in range(per_client):
                i = c * per_client + k
                request = pb.EraseRequest(adapter=adapter, request_id=f"{prefix}-{c:03d}-{k:04d}", remove_ids=[ids[i]])
                t0 = time.perf_counter()
                try:
                    job = stub.Erase(request, timeout=120)
                    code, job_id, merged_requests, size = "OK", job.id, job.request_count, job.ByteSize()
                except grpc.RpcError as e:
                    code, job_id, merged_requests, size = e.code().name, None, 0, 0
                t1 = time.perf_counter()
                results[c].append((i, t0, t1, code, job_id, merged_requests, size))
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    warmed.wait()
    conn.send("ready")
    conn.recv()
    cpu0 = _cpu_seconds()
    go.set()
    for t in threads:
        t.join()
    conn.send({"results": [r for rs in results for r in rs], "cpu_seconds": _cpu_seconds() - cpu0})
    conn.close()


def measure_acceptance(s: Settings, model: dict, workdir: Path, variant: str, clients: int, per_client: int,
                       paused: bool, group_commit: bool = True) -> dict:
    """One fresh sidecar; ``clients`` clients send their Erase requests; every call is timed."""
    import multiprocessing

    import grpc

    from eraser_proto.eraser.v1 import eraser_pb2 as pb
    from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
    from sidecar.server import start

    running = start(_config(s, workdir / f"store-latency-{variant}", group_commit=group_commit))
    channel = grpc.insecure_channel(running.target)
    stub = pb_grpc.EraserStub(channel)
    child = None
    held = None
    try:
        _register(stub, "latency", model["base_dir"], model["adapter_dir"], model["latency_path"])
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        child = ctx.Process(target=_client_process, daemon=True,
                            args=(running.target, "latency", clients, per_client, model["latency_ids"], variant,
                                  child_end))
        child.start()
        if not parent_end.poll(120):
            raise RuntimeError("the client process did not get ready within 120 s")
        parent_end.recv()
        if paused:
            held = running.service.runner.publish_lock  # the worker needs it to claim a job
            held.acquire()
        load_before, cpu0, w0 = loadavg(), _cpu_seconds(), time.perf_counter()
        parent_end.send("go")
        if not parent_end.poll(600):
            raise RuntimeError("the clients did not finish within 600 s")
        data = parent_end.recv()
        window = time.perf_counter() - w0
        server_cpu = _cpu_seconds() - cpu0
        load_after = loadavg()
        jobs = {j.id: j for j in stub.ListJobs(pb.ListJobsRequest(adapter="latency", limit=1000)).jobs}
        group = running.service.db.group  # None: one COMMIT per request
        commits = (group.commits, group.submissions) if group is not None else None
    finally:
        if held is not None:
            held.release()
        if child is not None:
            child.join(30)
            if child.is_alive():
                child.kill()
        channel.close()
        running.stop(0.0)  # a running solve is interrupted (it would resume on a restart)

    results = sorted(data["results"], key=lambda r: r[1])
    ok = [r for r in results if r[3] == "OK"]
    latencies = [(r[2] - r[1]) * 1000 for r in ok]
    codes: dict[str, int] = {}
    for r in results:
        codes[r[3]] = codes.get(r[3], 0) + 1
    span = (max(r[2] for r in results) - min(r[1] for r in results)) if results else 0.0
    job_ids = {r[4] for r in ok}
    states: dict[str, int] = {}
    for j in jobs.values():
        name = pb.JobState.Name(j.state).removeprefix("JOB_STATE_").lower()
        states[name] = states.get(name, 0) + 1
    # How acceptance changes as the queued job grows: per quarter of the requests, the
    # median latency (submission order) and the time per request (completion order).
    q = max(1, len(ok) // 4)
    quarters = [ok[i * q:(i + 1) * q if i < 3 else len(ok)] for i in range(4)] if len(ok) >= 8 else []
    done = sorted(r[2] for r in ok)
    per_request = []
    for i in range(len(quarters)):
        chunk = done[i * q:(i + 1) * q if i < 3 else len(done)]
        start = done[i * q - 1] if i else min(r[1] for r in ok)
        per_request.append(_round((chunk[-1] - start) / len(chunk) * 1000))
    out = {
        "variant": variant,
        "clients": clients,
        "requests_per_client": per_client,
        "worker_paused": paused,
        "group_commit": group_commit,
        # COMMITs of Erase submissions and the submissions they held (group commit only).
        "commits": commits[0] if commits else None,
        "mean_batch": round(commits[1] / commits[0], 2) if commits and commits[0] else None,
        "requests": len(results),
        "codes": codes,
        "latency": summary_ms(latencies),
        "p50_ms_by_quarter": [summary_ms([(r[2] - r[1]) * 1000 for r in c])["p50_ms"] for c in quarters],
        "ms_per_request_by_quarter": per_request,
        "span_seconds": round(span, 3),
        "throughput_rps": round(len(ok) / span, 1) if span > 0 else None,
        "jobs_created": len(job_ids),
        "largest_job_requests": max((r[5] for r in ok), default=0),
        "largest_response_bytes": max((r[6] for r in ok), default=0),
        "job_states_at_end": states,
        "server_process_cpu_seconds": round(server_cpu, 2),
        "server_process_cores_busy": round(server_cpu / window, 2) if window > 0 else None,
        "client_process_cpu_seconds": round(data["cpu_seconds"], 2),
        "window_seconds": round(window, 3),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        # Every call's milliseconds, in submission order.
        "latencies_ms": [round((r[2] - r[1]) * 1000, 2) for r in ok],
    }
    lat = out["latency"]
    _say(f"acceptance [{variant}]: {len(ok)}/{len(results)} ok, p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, "
         f"max {lat['max_ms']} ms, {out['throughput_rps']} req/s, {len(job_ids)} job(s), "
         f"{'mean batch ' + str(out['mean_batch']) if group_commit else 'one commit each'}, "
         f"server {out['server_process_cores_busy']} cores busy")
    return out


def measure_job_db(workdir: Path, clients: int, per_client: int, group_commit: bool, sealed: bool = False) -> dict:
    """The job database alone: ``clients`` threads of this process call ``JobDB.submit``,
    each request its own job (merging off), each call timed: the durable commit path
    without gRPC, validation or the growing merged job. ``sealed``: each request a response
    correction, its text sealed with a key file of its job (as the sidecar's store does),
    instead of a removal (stored as it is)."""
    from eraser.rowhash import RowHasher
    from sidecar.jobs import JobDB, RequestPayload
    from sidecar.payload_keys import PayloadKeys

    label = f"{clients}-{'grouped' if group_commit else 'each'}{'-sealed' if sealed else ''}"
    keys = PayloadKeys(workdir / f"keys-{label}") if sealed else None
    db = JobDB(workdir / f"jobs-{label}.sqlite3", RowHasher(os.urandom(32)), group_commit, keys=keys)

    def payload(row: str) -> RequestPayload:
        return RequestPayload(correct_response=((row, "a replacement answer"),)) if sealed else RequestPayload((row,))

    ready = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]

    def client(c: int) -> None:
        ready.wait()
        for k in range(per_client):
            t0 = time.perf_counter()
            db.submit("bench", f"{c}-{k}", payload(f"row-{c}-{k}"), {}, "fingerprint", False, 1)
            latencies[c].append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    w0 = time.perf_counter()
    for t in threads:
        t.join()
    window = time.perf_counter() - w0
    group = db.group
    db.close()
    ms = [x for xs in latencies for x in xs]
    out = {"clients": clients, "requests_per_client": per_client, "group_commit": group_commit, "sealed": sealed,
           "latency": summary_ms(ms), "throughput_rps": round(len(ms) / window, 1),
           "commits": group.commits if group else len(ms),
           "mean_batch": round(group.submissions / group.commits, 2) if group and group.commits else 1.0}
    _say(f"job database alone, {clients} thread(s) x {per_client}, {'sealed corrections' if sealed else 'removals'}, "
         f"{'group commit' if group_commit else 'one commit each'}: p50 {out['latency']['p50_ms']} ms, "
         f"p99 {out['latency']['p99_ms']} ms, {out['throughput_rps']} req/s, {out['commits']} COMMITs")
    return out


def serve_queue(s: Settings, model: dict, workdir: Path, merge: bool, remove: list[str]) -> dict:
    """One fresh sidecar; the queued requests arrive at once; wait until all succeeded."""
    from concurrent import futures

    import grpc

    from eraser.data import load_rows
    from eraser_proto.eraser.v1 import eraser_pb2 as pb
    from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
    from sidecar.server import start

    label = "merged" if merge else "one_by_one"
    running = start(_config(s, workdir / f"store-{label}", merge=merge))
    channel = grpc.insecure_channel(running.target)
    stub = pb_grpc.EraserStub(channel)
    try:
        registered = _register(stub, "facts", model["base_dir"], model["adapter_dir"], model["train_path"])
        requests = [pb.EraseRequest(adapter="facts", request_id=f"{label}-{i:03d}", remove_ids=[rid])
                    for i, rid in enumerate(remove)]
        barrier = threading.Barrier(len(requests))

        def submit(request):
            barrier.wait()
            t = time.perf_counter()
            job = stub.Erase(request, timeout=120)
            return job, time.perf_counter() - t

        wall0 = time.time()
        t0 = time.perf_counter()
        with futures.ThreadPoolExecutor(len(requests)) as pool:
            accepted = list(pool.map(submit, requests))
        t_accepted = time.perf_counter() - t0
        created = {j.id: j.created_at.ToNanoseconds() for j, _ in accepted}
        job_ids = sorted(created, key=created.get)  # the order the worker runs them
        finals = {}
        done = 0
        for job_id in job_ids:
            last = None
            for last in stub.WatchJob(pb.GetJobRequest(id=job_id), timeout=3600):
                pass
            finals[job_id] = last
            done += len(last.request_ids)
            _say(f"  [{label}] job {job_ids.index(job_id) + 1}/{len(job_ids)} "
                 f"{pb.JobState.Name(last.state).removeprefix('JOB_STATE_').lower()} "
                 f"({len(last.request_ids)} request(s), {done}/{len(requests)} served, "
                 f"{time.perf_counter() - t0:.1f} s)"
                 + (f": {last.error.code}: {last.error.message}" if last.error.code else ""))
        t_done = time.perf_counter() - t0
        adapter = stub.GetAdapter(pb.GetAdapterRequest(name="facts"))
    finally:
        channel.close()
        running.stop(2.0)

    final_ids = {r.id for r in load_rows(adapter.dataset_path)}
    removed = sorted(set(model["train_ids"]) - final_ids)
    per_job = []
    for job_id in job_ids:
        j = finals[job_id]
        r = j.report
        per_job.append({
            "state": pb.JobState.Name(j.state).removeprefix("JOB_STATE_").lower(),
            "requests": len(j.request_ids),
            "rows_removed": dict(j.counts).get("remove", 0),
            "from_version": j.from_version,
            "to_version": j.to_version,
            # Seconds after the first submit.
            "started_at_seconds": _since(j.started_at, wall0) if j.HasField("started_at") else None,
            "finished_at_seconds": _since(j.finished_at, wall0) if j.HasField("finished_at") else None,
            "engine_seconds": {k: _round(v) for k, v in sorted(r.seconds.items())} if j.HasField("report") else None,
            "iterations": r.iterations if j.HasField("report") else None,
            "residual": _round(r.residual) if j.HasField("report") else None,
            "converged": r.converged if j.HasField("report") else None,
            "affected_loss_before": _round(r.affected_loss_before) if j.HasField("report") else None,
            "affected_loss_after": _round(r.affected_loss_after) if j.HasField("report") else None,
            "update_norm": _round(r.update_norm) if j.HasField("report") else None,
            "error": f"{j.error.code}: {j.error.message}" if j.HasField("error") else None,
        })
    solves = [p for p in per_job if p["engine_seconds"]]
    accept_ms = [a * 1000 for _, a in accepted]
    out = {
        "merge_queued": merge,
        "requests": len(requests),
        "all_succeeded": all(p["state"] == "succeeded" for p in per_job),
        "jobs": len(job_ids),
        "solves": len(solves),
        "seconds_to_accept_all": round(t_accepted, 3),
        "accept_latency": summary_ms(accept_ms),
        "seconds_to_all_succeeded": round(t_done, 3),
        "solve_seconds_total": _round(sum(p["engine_seconds"]["total"] for p in solves)),
        "solve_seconds_mean": _round(sum(p["engine_seconds"]["total"] for p in solves) / len(solves)) if solves else None,
        "iterations_total": sum(p["iterations"] or 0 for p in solves),
        "version_before": registered.version,
        "version_after": adapter.version,
        "rows_before": registered.rows,
        "rows_after": adapter.rows,
        "removed_ids": removed,
        "removed_as_requested": removed == sorted(remove),
        "adapter_path": adapter.path,
        "per_job": per_job,
    }
    _say(f"{label}: {out['solves']} solve(s), {t_done:.1f} s until all {len(requests)} succeeded, "
         f"version {registered.version} -> {adapter.version}, rows {registered.rows} -> {adapter.rows}")
    return out


def evaluate_adapters(model: dict, adapters: dict[str, str], removed: list[str]) -> dict:
    """Mean NLL of the erased rows (forget) and of the others (retain) per adapter, and how
    far apart the final adapters' weights are."""
    import torch
    from safetensors.torch import load_file

    from eraser.data import load_rows
    from eraser.model import load_adapter, load_base
    from eraser.losses import row_losses

    rows = load_rows(model["train_path"])
    gone = set(removed)
    forget = [(r.prompt, r.response) for r in rows if r.id in gone]
    retain = [(r.prompt, r.response) for r in rows if r.id not in gone]
    out: dict = {"losses": {}}
    weights = {}
    for label, path in adapters.items():
        base = load_base(model["base_dir"], "cpu")
        net = load_adapter(base, path, trainable=False)
        with torch.no_grad():
            f = row_losses(net, base.tokenizer, forget, "cpu")
            r = row_losses(net, base.tokenizer, retain, "cpu")
        out["losses"][label] = {"forget_nll": _round(sum(f) / len(f)), "retain_nll": _round(sum(r) / len(r))}
        tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
        weights[label] = torch.cat([tensors[k].flatten().double() for k in sorted(tensors)])
    if {"original", "merged", "one_by_one"} <= set(weights):
        w0, wm, ws = weights["original"], weights["merged"], weights["one_by_one"]
        dm, ds = wm - w0, ws - w0
        out["update_norm_merged"] = _round(float(dm.norm()))
        out["update_norm_one_by_one"] = _round(float(ds.norm()))
        both = dm.norm() > 0 and ds.norm() > 0
        out["update_cosine"] = _round(float(dm @ ds / (dm.norm() * ds.norm()))) if both else None
        out["relative_difference"] = _round(float((wm - ws).norm() / ds.norm())) if ds.norm() > 0 else None
    return out


# --------------------------------------------------------------------------- the run


def run(s: Settings, quick: bool, workdir: Path) -> dict:
    import torch

    from eraser.process import quiet_libraries

    quiet_libraries()
    logging.getLogger("eraser.sidecar").setLevel(logging.WARNING)
    started = time.perf_counter()
    torch.manual_seed(s.seed)
    machine = machine_info(serving=True)
    _say(f"{'quick' if quick else 'full'} run on {machine['cpu_affinity']} CPU(s), torch {machine['torch']}, "
         f"load {machine['loadavg_start']}")
    model = build_model(s, workdir)

    acceptance = {"clients": s.clients, "requests_per_client": s.requests_per_client, "variants": {}}
    variants = (("one_client", 1, s.single_client_requests, True),
                ("worker_paused", s.clients, s.requests_per_client, True),
                ("solving", s.clients, s.requests_per_client, False))
    for variant, clients, per_client, paused in variants:
        # The baseline just before, so that both see about the same load on the machine.
        for group_commit in (False, True):
            name = variant if group_commit else f"{variant}_commit_each"
            _say(f"acceptance [{name}]: {clients} client(s) x {per_client} Erase requests, "
                 f"{'worker held off' if paused else 'worker solving'}, "
                 f"{'group commit' if group_commit else 'one commit per request'}")
            acceptance["variants"][name] = measure_acceptance(s, model, workdir, name, clients, per_client, paused,
                                                              group_commit)

    sizes = ((1, s.single_client_requests // 10), (s.clients, s.requests_per_client))
    acceptance["job_db"] = {
        f"{'grouped' if group_commit else 'commit_each'}_{clients}": measure_job_db(workdir, clients, per_client,
                                                                                     group_commit)
        for clients, per_client in sizes for group_commit in (False, True)}
    # A correction's text is sealed with a key file of its job: what that costs acceptance.
    acceptance["job_db"].update({f"sealed_{clients}": measure_job_db(workdir, clients, per_client, True, sealed=True)
                                 for clients, per_client in sizes})

    ids = model["train_ids"]
    step = max(1, len(ids) // s.queued_requests)
    remove = ids[::step][: s.queued_requests]
    merging: dict = {"requests": len(remove), "modes": {}}
    for merge in (True, False):
        label = "merged" if merge else "one_by_one"
        _say(f"{label}: {len(remove)} Erase requests at once, each removing one row (merge_queued={merge})")
        merging["modes"][label] = serve_queue(s, model, workdir, merge, remove)
    m, o = merging["modes"]["merged"], merging["modes"]["one_by_one"]
    merging["speedup"] = _round(o["seconds_to_all_succeeded"] / m["seconds_to_all_succeeded"], 3)
    merging["same_rows_removed"] = m["removed_ids"] == o["removed_ids"] == sorted(remove)
    _say("evaluating the final adapters on the erased and the retained rows")
    merging["evaluation"] = evaluate_adapters(
        model, {"original": model["adapter_dir"], "merged": m["adapter_path"], "one_by_one": o["adapter_path"]},
        sorted(remove))
    for mode in (m, o):
        mode.pop("adapter_path")  # a temporary directory, meaningless afterwards

    machine["loadavg_end"] = loadavg()
    settings = asdict(s)
    settings["targets"] = list(s.targets)
    return {
        "schema_version": SCHEMA_VERSION, "benchmark": "sidecar", "mode": "quick" if quick else "full",
        "machine": machine, "settings": settings, "model": model["summary"], "acceptance": acceptance,
        "merging": merging, "total_seconds": round(time.perf_counter() - started, 1),
    }


# --------------------------------------------------------------------------- reporting


def _smollm2_erase_seconds(out: Path) -> float | None:
    for path in (out / "stages.json", Path(__file__).parent / "results" / "stages.json"):
        with suppress(OSError, ValueError, KeyError, TypeError):
            return float(json.loads(path.read_text())["stages"]["erase_cg"]["seconds"])
    return None


def caveats(result: dict) -> list[str]:
    m = result["machine"]
    out = [
        f"the model is tiny ({result['model']['adapter_parameters']:,} adapter parameters, "
        f"{result['model']['train_rows']} rows): one solve costs seconds here, not minutes",
        f"damping {result['settings']['damping']:g} (absolute, on the GGN) keeps a cg solve at about 10 "
        "iterations on this model (0.1 took about 3x as many while sizing the benchmark): it sets the cost of a "
        "solve, not the number of solves merging saves",
        "the clients run in a second process on the same CPUs as the sidecar (loopback, plaintext); "
        "the 'worker_paused' variant holds the service's publish lock so that no job starts during the measurement",
        "the latency adapter is the trained LoRA registered with rows it was not trained on, so every request can "
        "remove a distinct row; its solves are only background load",
    ]
    la, lb = m.get("loadavg_start"), m.get("loadavg_end")
    if la and lb:
        out.append(f"load average {la[0]} at start and {lb[0]} at the end on {m['cpu_affinity']} CPUs "
                   "(other work on the machine inflates the numbers)")
    if result.get("note"):
        out.append(result["note"])
    return out


def _arrow(xs) -> str:
    return " -> ".join(str(x) for x in xs)


def reading(result: dict, smollm2_seconds: float | None) -> list[str]:
    clients, cores = result["acceptance"]["clients"], result["machine"]["cpu_affinity"]
    one, p, sv = (result["acceptance"]["variants"][k] for k in ("one_client", "worker_paused", "solving"))
    mg = result["merging"]
    m, o = mg["modes"]["merged"], mg["modes"]["one_by_one"]
    ev = mg["evaluation"]
    lo, lm, ls = ev["losses"]["original"], ev["losses"]["merged"], ev["losses"]["one_by_one"]
    in_flight = round(p["throughput_rps"] * p["latency"]["mean_ms"] / 1000) if p["throughput_rps"] else None
    gil = (f"; a solve in the same process, mostly Python autograd on this tiny model, competes with the handlers "
           f"for the interpreter (the server process stayed at {sv['server_process_cores_busy']} of {cores} cores)"
           if sv["server_process_cores_busy"] is not None and sv["server_process_cores_busy"] < 1.3 else "")
    out = [
        f"Acceptance with {clients} concurrent clients (group commit): p50 {p['latency']['p50_ms']} ms / p99 "
        f"{p['latency']['p99_ms']} ms at {p['throughput_rps']} req/s with no solve running, p50 "
        f"{sv['latency']['p50_ms']} / p99 {sv['latency']['p99_ms']} ms at {sv['throughput_rps']} req/s with one "
        f"running in the same process; one client alone gets p50 {one['latency']['p50_ms']} ms at "
        f"{one['throughput_rps']} req/s. The server validates one request at a time (one Python interpreter; the "
        f"job database has one writer), so the latency under load is queueing (Little's law: about {in_flight} "
        f"of {clients} clients inside a call at any time){gil}.",
    ]
    out += _group_commit_reading(result)
    quarters = one["p50_ms_by_quarter"]
    if quarters and quarters[-1] > 1.5 * quarters[0]:
        out.append(
            f"Requests queued behind a running job all merge into one job ({p['jobs_created']} job(s) for "
            f"{p['requests']} requests with the worker held off, {sv['jobs_created']} with it solving), and each merge "
            f"costs O(requests already merged): one client's p50 went {_arrow(quarters)} ms over the quarters of its "
            f"{one['requests']} requests, so a burst of n costs O(n^2) (each merge re-reads every merged request id and "
            f"re-encodes the job's edit list; the reply lists all merged ids, {one['largest_response_bytes']:,} bytes "
            f"at the end).")
    else:
        out.append(
            f"Requests queued behind a running job all merge into one job ({p['jobs_created']} job(s) for "
            f"{p['requests']} requests with the worker held off, {sv['jobs_created']} with it solving); one client's "
            f"p50 over the quarters of its {one['requests']} requests was {_arrow(quarters)} ms: a merge inserts its own "
            f"edit rows and the reply names its own request with the job's count (largest reply "
            f"{one['largest_response_bytes']:,} bytes, for a job of {one['largest_job_requests']:,} requests).")
    split = " + ".join(str(j["requests"]) for j in m["per_job"])
    out.append(
        f"{mg['requests']} queued requests: merged, {m['solves']} solves ({split} requests) took {m['seconds_to_all_succeeded']} s; one by one, {o['solves']} solves took "
        f"{o['seconds_to_all_succeeded']} s ({mg['speedup']}x; {m['iterations_total']} against "
        f"{o['iterations_total']} cg iterations). Same rows removed: {mg['same_rows_removed']}; versions "
        f"{m['version_before']}->{m['version_after']} against {o['version_before']}->{o['version_after']}. Forget NLL "
        f"{lo['forget_nll']} -> {lm['forget_nll']} merged, {ls['forget_nll']} one by one (retain {lo['retain_nll']} -> "
        f"{lm['retain_nll']} / {ls['retain_nll']}); the updates have cosine {ev.get('update_cosine')} and differ by "
        f"{ev.get('relative_difference')} of the sequential one's norm: one influence step at the original weights "
        f"against {o['solves']} steps each from the last, equal only to first order."
    )
    if smollm2_seconds:
        out.append(
            f"Scale: on SmolLM2-135M one cg erase took {smollm2_seconds:.0f} s on this CPU (bench/results/stages.md), "
            f"nearly all of it curvature products over the whole training set (the erased rows only set the "
            f"right-hand side): "
            f"{o['requests']} one-by-one erases would take about {o['requests'] * smollm2_seconds / 3600:.1f} h, "
            f"merged about {m['solves']} solves ({m['solves'] * smollm2_seconds / 60:.0f} min)."
        )
    return out


def _group_commit_reading(result: dict) -> list[str]:
    """Group commit against one commit per request (absent from results older than it)."""
    variants, clients = result["acceptance"]["variants"], result["acceptance"]["clients"]
    pairs = [(k, variants[k], variants[f"{k}_commit_each"]) for k in ("worker_paused", "solving", "one_client")
             if f"{k}_commit_each" in variants]
    if not pairs:
        return []
    labels = {"worker_paused": f"{clients} clients, worker held off", "solving": f"{clients} clients, worker solving",
              "one_client": "one client"}
    parts = [f"{labels[k]}: p50 {b['latency']['p50_ms']} -> {g['latency']['p50_ms']} ms, p99 {b['latency']['p99_ms']} "
             f"-> {g['latency']['p99_ms']} ms, {b['throughput_rps']} -> {g['throughput_rps']} req/s ({g['commits']} "
             f"COMMITs for {g['requests']} requests, mean batch {g['mean_batch']})" for k, g, b in pairs]
    out = ["One commit per request -> group commit (each pair measured back to back in this run): " + "; ".join(parts)
           + "."]
    db = result["acceptance"].get("job_db")
    if db:
        parts = [f"{b['clients']} thread(s): p50 {b['latency']['p50_ms']} -> {g['latency']['p50_ms']} ms, p99 "
                 f"{b['latency']['p99_ms']} -> {g['latency']['p99_ms']} ms, {b['throughput_rps']} -> "
                 f"{g['throughput_rps']} req/s ({g['commits']} COMMITs, mean batch {g['mean_batch']})"
                 for b, g in ((db[f"commit_each_{n}"], db[f"grouped_{n}"]) for n in sorted({v["clients"] for v in db.values()}))]
        out.append("The job database alone (JobDB.submit from threads, each request its own job): " + "; ".join(parts)
                   + ". This is the part group commit changes: one fsync per batch instead of one per request.")
        sealed = [(db[f"grouped_{n}"], db[f"sealed_{n}"]) for n in sorted({v["clients"] for v in db.values()})
                  if f"sealed_{n}" in db]
        if sealed:
            out.append("Sealing a correction's text (a key file of its job, written and fsynced at submission), "
                       "removal -> sealed correction, both grouped: " + "; ".join(
                           f"{g['clients']} thread(s): p50 {g['latency']['p50_ms']} -> {c['latency']['p50_ms']} ms, "
                           f"p99 {g['latency']['p99_ms']} -> {c['latency']['p99_ms']} ms, {g['throughput_rps']} -> "
                           f"{c['throughput_rps']} req/s" for g, c in sealed) + ".")
    p = variants.get("worker_paused")
    if p and p["requests"] and p["server_process_cpu_seconds"]:
        cpu_ms = p["server_process_cpu_seconds"] / p["requests"] * 1000
        cores = result["machine"]["cpu_affinity"]
        met = p["latency"]["p99_ms"] <= 20
        out.append(
            f"The goal of p99 <= 20 ms at {clients} clients is {'met' if met else 'not met'} here "
            f"({p['latency']['p99_ms']} ms). Each client sends its next request when the last returns, so by "
            f"Little's law the mean latency is {clients} / throughput: 20 ms needs {clients / 0.02:,.0f} req/s. The "
            f"sidecar process spent {cpu_ms:.2f} ms of CPU per accepted request (gRPC, validation, the merge into "
            f"the one queued job and its reply), so {cores} cores give at most about "
            f"{cores * 1000 / cpu_ms:,.0f} req/s even with the clients elsewhere: what group commit removes is the "
            f"fsync per request, not that CPU.")
    return out


def markdown(result: dict) -> str:
    s, md, m = result["settings"], result["model"], result["machine"]
    acc = result["acceptance"]
    mg = result["merging"]
    lines = [
        f"# Sidecar: acceptance latency and merging ({result['mode']}, cpu)",
        "",
        f"Tiny {md['architecture']} ({md['base_parameters']:,} parameters), {md['adapter']} "
        f"({md['adapter_parameters']:,} parameters) trained on {md['train_rows']} synthetic fact rows "
        f"(loss {md['train_loss_first_last'][0]} -> {md['train_loss_first_last'][1]}). Solver {s['solver']}, damping "
        f"{s['damping']:g}, tolerance {s['tolerance']:g}, curvature batch {s['curvature_batch_size']}. "
        f"torch {m['torch']}, grpcio {m['grpcio']}, {m['cpu_affinity']} CPUs ({m['cpu_model']}), {m['date']}. "
        f"Total run {result['total_seconds']} s.",
        "",
        "## Erase acceptance (call to return: validation and durable queueing)",
        "",
        "Every figure is measured in this run; each variant ran first with one COMMIT (one fsync) per request, as "
        "before group commit, then with group commit (the default), each on a fresh sidecar.",
        "",
        md_row(["variant", "worker", "commits", "clients x requests", "ok", "p50 ms", "p90 ms", "p99 ms", "max ms",
              "req/s", "jobs created", "p50 ms by quarter", "server cores busy"]),
        md_row(["---"] * 4 + ["---:"] * 9),
    ]
    for name, v in acc["variants"].items():
        lat = v["latency"]
        commits = ("one per request" if not v.get("group_commit", False)
                   else f"grouped: {v['commits']} (batch {v['mean_batch']})")
        lines.append(md_row([name.replace("_", " "), "held off" if v["worker_paused"] else "solving", commits,
                           f"{v['clients']} x {v['requests_per_client']}", v["codes"].get("OK", 0), lat["p50_ms"],
                           lat["p90_ms"], lat["p99_ms"], lat["max_ms"], v["throughput_rps"], v["jobs_created"],
                           " / ".join(map(str, v["p50_ms_by_quarter"])),
                           v["server_process_cores_busy"]]))
    if acc.get("job_db"):
        lines += [
            "",
            "The job database alone (measured in this run): threads of the benchmark's process call JobDB.submit, "
            "each request its own job (merging off), each call timed; no gRPC, validation or merged job. A sealed "
            "correction's text is encrypted with a key file of its job (written and fsynced at submission).",
            "",
            md_row(["commits", "request", "threads x requests", "p50 ms", "p90 ms", "p99 ms", "max ms", "req/s", "COMMITs",
                    "mean batch"]),
            md_row(["---"] * 3 + ["---:"] * 7),
        ]
        for v in acc["job_db"].values():
            lat = v["latency"]
            lines.append(md_row(["grouped" if v["group_commit"] else "one per request",
                                 "correction, sealed" if v.get("sealed") else "removal", f"{v['clients']} x {v['requests_per_client']}", lat["p50_ms"], lat["p90_ms"],
                                 lat["p99_ms"], lat["max_ms"], v["throughput_rps"], v["commits"], v["mean_batch"]]))
    lines += [
        "",
        f"## {mg['requests']} queued requests (one row each): merged vs one by one",
        "",
        md_row(["mode", "solves", "s to accept all", "s until all succeeded", "mean s per solve", "cg iterations",
              "version", "rows", "forget NLL", "retain NLL"]),
        md_row(["---"] + ["---:"] * 9),
    ]
    ev = mg["evaluation"]["losses"]
    lo = ev["original"]
    lines.append(md_row(["(before)", "", "", "", "", "", mg["modes"]["merged"]["version_before"],
                       mg["modes"]["merged"]["rows_before"], lo["forget_nll"], lo["retain_nll"]]))
    for name, v in mg["modes"].items():
        lines.append(md_row([name.replace("_", " "), v["solves"], v["seconds_to_accept_all"], v["seconds_to_all_succeeded"],
                           v["solve_seconds_mean"], v["iterations_total"], v["version_after"], v["rows_after"],
                           ev[name]["forget_nll"], ev[name]["retain_nll"]]))
    lines += ["", f"Speedup {mg['speedup']}x; the same {mg['requests']} rows removed by both: {mg['same_rows_removed']}."]
    lines += reading_and_caveats(result)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from eraser.process import passive_openmp_waits

    passive_openmp_waits()  # before torch is imported: a shared CPU makes busy-waiting threads very slow
    p = bench_parser("sidecar", __doc__.splitlines()[0], device=False)
    args = p.parse_args(argv)
    if args.render is not None:
        result = rendered(args)
    else:
        settings = Settings.quick() if args.quick else Settings()
        result = in_workdir("eraser-bench-sidecar-", lambda workdir: run(settings, args.quick, workdir))
        result["note"] = args.note
    result["caveats"] = caveats(result)
    result["reading"] = reading(result, _smollm2_erase_seconds(args.out))
    write_outputs(result, args.out, "sidecar-quick" if result["mode"] == "quick" else "sidecar", TOP_KEYS, markdown, _say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
