"""The sidecar over real gRPC on loopback, with tiny models: every RPC, every bad input
with its status code (and nothing changed), idempotency, merging, concurrency, cancel,
deadlines, rollback and retention, crash recovery, auth, TLS and metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from conftest import cg_erase
from eraser.data import load_rows, text_sha256
from eraser.rowhash import RowHasher
from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
from sidecar_util import register, wait_job
from sidecar.config import SidecarConfig
from sidecar.server import start

FAST = pb.EraseOptions(damping=0.1, max_iterations=100, tolerance=1e-3)
# A solve that cannot converge and runs for minutes: something to cancel or kill.
SLOW = pb.EraseOptions(solver="sqm", max_iterations=100_000, tolerance=1e-12, damping=0.1)
ERASED_TEXT = "Ann was born in"


def store_listing(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_size for p in store.rglob("*")
            if p.is_file() and "staging" not in p.parts and not p.name.startswith("jobs.sqlite3")}


def config_for(store: Path, erase: dict | None = None, **overrides) -> SidecarConfig:
    return SidecarConfig(store=store, grpc_port=0, metrics_port=0, drain_seconds=2.0, erase=cg_erase(**(erase or {})),
                         **overrides)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def sidecar(request, tmp_path_factory):
    """The module's sidecar, on each job store: SQLite in the store, and PostgreSQL."""
    store = tmp_path_factory.mktemp("store")
    if request.param == "sqlite":
        running = start(config_for(store, max_request_rows=12, keep_versions=2))
        running.database_files = lambda: sorted(store.glob("jobs.sqlite3*"))
    else:
        cluster = request.getfixturevalue("postgres")
        jobs = cluster.new_database(uri=True)
        running = start(config_for(store, max_request_rows=12, keep_versions=2, jobs=jobs))
        running.database_files = lambda: _pg_database_files(cluster, jobs.rsplit("/", 1)[1])
    yield running
    running.stop(2.0)


def _pg_database_files(cluster, name: str) -> list[Path]:
    """The database's table files, after a CHECKPOINT wrote every page (its WAL keeps deleted
    text until the segment is recycled: sidecar/pg_jobs.py)."""
    import psycopg

    with psycopg.connect(cluster.dsn(name), autocommit=True) as c:
        c.execute("CHECKPOINT")
        oid = c.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
    return sorted(p for p in (cluster.data / "base" / str(oid)).iterdir() if p.is_file())


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# ---- health, reflection, adapters ----------------------------------------------------

def test_health_and_reflection(sidecar):
    with grpc.insecure_channel(sidecar.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "eraser.v1.Eraser"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"eraser.v1.Eraser", "grpc.health.v1.Health"} <= names


def test_register_get_list(stub, sidecar, tiny_base, tiny_adapter, train_file):
    adapter = register(stub, "reg-a", tiny_base, tiny_adapter, train_file)
    assert (adapter.name, adapter.version, adapter.rows, list(adapter.retained_versions)) == ("reg-a", 1, 20, [1])
    assert Path(adapter.path, "adapter_config.json").is_file()
    assert load_rows(adapter.dataset_path) == load_rows(train_file)
    manifest = json.loads((Path(adapter.path).parent / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["files"]["train.jsonl"] and manifest["base_model_fingerprint"]
    assert not Path(adapter.path, "adapter_config.json").stat().st_mode & 0o222, "published files are read-only"
    assert stub.GetAdapter(pb.GetAdapterRequest(name="reg-a")) == adapter
    assert "reg-a" in [a.name for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters]


def test_register_bad_input_changes_nothing(stub, sidecar, tiny_base, tiny_adapter, train_file, tmp_path):
    from devtools.tiny import build_tiny_model

    register(stub, "reg-dup", tiny_base, tiny_adapter, train_file)
    before = store_listing(sidecar.config.store)
    other_base = tmp_path / "other-base"
    build_tiny_model(other_base, ["some other text entirely"], hidden_size=64, heads=2, kv_heads=1, intermediate_size=64,
                     vocab_size=300)
    cases = {
        "Bad_Name": (str(tiny_base), str(tiny_adapter), str(train_file), grpc.StatusCode.INVALID_ARGUMENT),
        "reg-dup": (str(tiny_base), str(tiny_adapter), str(train_file), grpc.StatusCode.ALREADY_EXISTS),
        "no-adapter": (str(tiny_base), str(tmp_path / "missing"), str(train_file), grpc.StatusCode.INVALID_ARGUMENT),
        "no-data": (str(tiny_base), str(tiny_adapter), str(tmp_path / "missing.jsonl"), grpc.StatusCode.INVALID_ARGUMENT),
        "no-base": (str(tmp_path), str(tiny_adapter), str(train_file), grpc.StatusCode.INVALID_ARGUMENT),
        "other-base": (str(other_base), str(tiny_adapter), str(train_file), grpc.StatusCode.FAILED_PRECONDITION),
    }
    for name, (base, adapter, data, expected) in cases.items():
        request = pb.RegisterAdapterRequest(name=name, base_model=base, adapter_path=adapter, dataset_path=data)
        assert code_of(lambda: stub.RegisterAdapter(request)) == expected, name
    assert code_of(lambda: stub.GetAdapter(pb.GetAdapterRequest(name="nope"))) == grpc.StatusCode.NOT_FOUND
    assert store_listing(sidecar.config.store) == before


def test_register_never_imports_from_the_store(stub, sidecar, tiny_base, tiny_adapter, train_file):
    """Without import roots any path outside the store is accepted, never the store: a
    retained pre-erasure version registered under a new name would bring erased rows back."""
    v1 = Path(register(stub, "reg-src", tiny_base, tiny_adapter, train_file).path).parent
    assert v1 == sidecar.config.store / "adapters" / "reg-src" / "versions" / "1"
    before = store_listing(sidecar.config.store)
    request = pb.RegisterAdapterRequest(name="reg-copy", base_model=str(tiny_base), adapter_path=str(v1 / "adapter"),
                                        dataset_path=str(v1 / "train.jsonl"))
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterAdapter(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter_path is not allowed" in info.value.details()
    assert store_listing(sidecar.config.store) == before


def test_register_confined_to_import_roots(tmp_path, tiny_base, tiny_adapter, train_file):
    import shutil

    imports, outside = tmp_path / "imports", tmp_path / "outside"
    imports.mkdir()
    shutil.copytree(tiny_adapter, outside / "lora")
    shutil.copytree(tiny_adapter, imports / "lora")
    shutil.copyfile(train_file, imports / "train.jsonl")
    (imports / "escape").symlink_to(outside / "lora")  # a link in a root that leads out of it
    inner = imports / "inner-link"  # a file inside the adapter that leads out
    shutil.copytree(tiny_adapter, inner)
    weights = next(p for p in inner.iterdir() if p.suffix in (".safetensors", ".bin"))
    weights.unlink()
    weights.symlink_to(outside / "lora" / weights.name)
    (imports / "fine-link").symlink_to(imports / "lora")  # a link that stays inside is followed
    store = tmp_path / "store"
    running = start(config_for(store, import_roots=(imports,)))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            ok = register(stub, "inside", tiny_base, imports / "fine-link", imports / "train.jsonl")
            assert ok.version == 1 and not any(p.is_symlink() for p in Path(ok.path).parent.rglob("*"))
            before = store_listing(store)
            details = {}
            for case, adapter in {"missing": imports / "nope", "outside": outside / "lora", "escape": imports / "escape",
                                  "inner-link": inner, "store": Path(ok.path)}.items():
                with pytest.raises(grpc.RpcError) as info:
                    register(stub, f"bad-{case}", tiny_base, adapter, imports / "train.jsonl")
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
                details[case] = info.value.details()
            assert len(set(details.values())) == 1, "missing and forbidden paths are told apart: " + repr(details)
            assert str(outside) not in details["missing"]
            with pytest.raises(grpc.RpcError) as info:  # the dataset and the held-out set too
                register(stub, "bad-data", tiny_base, imports / "lora", train_file)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dataset_path is not allowed" in info.value.details()
            assert store_listing(store) == before and not list((store / "staging").iterdir())
    finally:
        running.stop(1.0)


# ---- erase ---------------------------------------------------------------------------

def test_erase_watch_and_publish(stub, sidecar, tiny_base, tiny_adapter, train_file, caplog):
    caplog.set_level("DEBUG")
    register(stub, "erase-a", tiny_base, tiny_adapter, train_file)
    job = stub.Erase(pb.EraseRequest(adapter="erase-a", request_id="r-erase-1", remove_ids=["born-ann"],
                                     correct_responses=[pb.CorrectResponse(id="tea-bob", response="Bob likes no tea.")],
                                     options=FAST))
    assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING) and list(job.request_ids) == ["r-erase-1"]
    updates = list(stub.WatchJob(pb.GetJobRequest(id=job.id), timeout=120))
    final = updates[-1]
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert len(updates) >= 3 and {u.stage for u in updates} & {"gradient", "solve (cg)"}
    assert [u.stage for u in updates].count("done") == 1 and updates[-1].stage == "done"
    assert (final.from_version, final.to_version) == (1, 2)
    assert final.report.solver == "cg" and final.report.converged and final.report.residual <= 1e-3
    assert final.report.affected_loss_after > final.report.affected_loss_before
    assert final.report.edited_loss_after < final.report.edited_loss_before
    assert dict(final.counts) == {"remove": 1, "modify_query": 0, "correct_response": 1}
    assert {"load", "gradient", "solve", "write"} <= set(final.report.seconds)
    adapter = stub.GetAdapter(pb.GetAdapterRequest(name="erase-a"))
    assert (adapter.version, adapter.rows, list(adapter.retained_versions)) == (2, 19, [1, 2])
    rows = {r.id: r for r in load_rows(adapter.dataset_path)}
    assert "born-ann" not in rows and rows["tea-bob"].response == "Bob likes no tea."
    manifest = json.loads((Path(adapter.path).parent / "manifest.json").read_text())
    assert (manifest["parent_version"], manifest["job_id"], manifest["request_ids"]) == (1, job.id, ["r-erase-1"])
    assert stub.GetJob(pb.GetJobRequest(id=job.id)) == final
    # The erased text is nowhere but in the retained pre-erasure version 1: not in the
    # job database, the manifest, the new version or the log.
    db = b"".join(p.read_bytes() for p in sidecar.database_files())
    assert db and ERASED_TEXT.encode() not in db and b"Bob likes" not in db  # the payload was dropped too
    for p in (Path(adapter.path).parent).rglob("*"):
        assert not p.is_file() or ERASED_TEXT.encode() not in p.read_bytes()
    assert ERASED_TEXT not in caplog.text and "Bob likes" not in caplog.text


def test_replacement_text_leaves_no_trace_in_the_database_files(stub, sidecar, tiny_base, tiny_adapter, train_file):
    """The payload is sealed with its job's key and deleted when the job ends (with WAL the
    deleted rows would live on in the -wal file until a checkpoint: the deletion checkpoints,
    TRUNCATE); the job's key is shredded then."""
    register(stub, "wal", tiny_base, tiny_adapter, train_file)
    marker = "Zanzibar-marker-7f3c likes no tea at all."
    job = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="wal", correct_responses=[
        pb.CorrectResponse(id="tea-cid", response=marker)], options=FAST)).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    files = sidecar.database_files()
    assert files and all(p.is_file() for p in files)
    found = [p.name for p in files if marker.encode() in p.read_bytes()]
    assert not found, found
    # The text was stored sealed with the job's own key, shredded when the job ended.
    keys = sidecar.config.store / "secrets" / "payload-keys"
    assert keys.is_dir() and list(keys.iterdir()) == []
    # Every hash the sidecar records of that text, or of the row it replaced, is keyed with
    # the store's secret: a plain SHA-256 of a guess matches nothing it wrote.
    hasher = RowHasher.load_or_create(sidecar.config.store / "secrets" / "row-hash.key")
    old = next(r for r in load_rows(train_file) if r.id == "tea-cid")
    written = b"".join(p.read_bytes() for p in sidecar.config.store.rglob("*")
                       if p.is_file() and "secrets" not in p.parts)
    for plain in (text_sha256(marker), old.sha256()):
        assert plain.encode() not in written
    version = Path(stub.GetAdapter(pb.GetAdapterRequest(name="wal")).path)
    assert hasher.text(marker) in (version.parent / "manifest.json").read_text()
    assert json.loads((version / "eraser.json").read_text())["edits"][0]["old_hash"] == hasher.row(old)
    assert (sidecar.config.store / "secrets" / "row-hash.key").stat().st_mode & 0o077 == 0


def test_erase_bad_input_changes_nothing(stub, sidecar, tiny_base, tiny_adapter, train_file):
    register(stub, "erase-bad", tiny_base, tiny_adapter, train_file)
    before = (store_listing(sidecar.config.store), len(stub.ListJobs(pb.ListJobsRequest(limit=1000)).jobs))
    many = [f"id-{i}" for i in range(13)]  # max_request_rows is 12 here
    cases = [
        (pb.EraseRequest(adapter="missing", remove_ids=["born-ann"]), grpc.StatusCode.NOT_FOUND),
        (pb.EraseRequest(adapter="Bad Name", remove_ids=["born-ann"]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EraseRequest(adapter="erase-bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EraseRequest(adapter="erase-bad", remove_ids=["no-such-row"]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EraseRequest(adapter="erase-bad", remove_ids=many), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EraseRequest(adapter="erase-bad", remove_ids=["born-ann", "born-ann"]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EraseRequest(adapter="erase-bad", remove_ids=["born-ann"], options=pb.EraseOptions(solver="magic")),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EraseRequest(adapter="erase-bad", remove_ids=["born-ann"], options=pb.EraseOptions(preset="paper")),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EraseRequest(adapter="erase-bad", modify_queries=[pb.ModifyQuery(id="born-ann", prompt=" ")]),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EraseRequest(adapter="erase-bad", correct_responses=[pb.CorrectResponse(id="born-ann", response="Ann was born in Oslo.")]),
         grpc.StatusCode.INVALID_ARGUMENT),  # changes nothing
    ]
    for request, expected in cases:
        assert code_of(lambda: stub.Erase(request)) == expected, request
    assert code_of(lambda: stub.GetJob(pb.GetJobRequest(id="nope"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.CancelJob(pb.CancelJobRequest(id="nope"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: list(stub.WatchJob(pb.GetJobRequest(id="nope")))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.ListJobs(pb.ListJobsRequest(adapter="missing"))) == grpc.StatusCode.NOT_FOUND
    after = (store_listing(sidecar.config.store), len(stub.ListJobs(pb.ListJobsRequest(limit=1000)).jobs))
    assert after == before
    assert stub.GetAdapter(pb.GetAdapterRequest(name="erase-bad")).version == 1


def test_abusive_input_is_bounded(tmp_path, tiny_base, tiny_adapter, train_file):
    """Solver limits, messages that echo ids, enum values and control characters: each gets
    INVALID_ARGUMENT and a short message, and nothing is queued."""
    running = start(config_for(tmp_path / "store"))  # the default max_request_rows (10,000)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            register(stub, "abuse", tiny_base, tiny_adapter, train_file)
            unknown = [f"no-such-row-{i}-" + "x" * 200 for i in range(10_000)]
            cases = {
                "unknown ids": pb.EraseRequest(adapter="abuse", remove_ids=unknown),
                "duplicates": pb.EraseRequest(adapter="abuse", remove_ids=unknown[:5000] * 2),
                "iterations": pb.EraseRequest(adapter="abuse", remove_ids=["born-ann"],
                                              options=pb.EraseOptions(max_iterations=1_000_000)),
                "tolerance": pb.EraseRequest(adapter="abuse", remove_ids=["born-ann"],
                                             options=pb.EraseOptions(tolerance=1e-30)),
                "nan damping": pb.EraseRequest(adapter="abuse", remove_ids=["born-ann"],
                                               options=pb.EraseOptions(damping=float("nan"))),
                "inf deadline": pb.EraseRequest(adapter="abuse", remove_ids=["born-ann"],
                                                options=pb.EraseOptions(deadline_seconds=float("inf"))),
                "newline in request id": pb.EraseRequest(adapter="abuse", request_id="r-1\nINFO forged line",
                                                         remove_ids=["born-ann"]),
                "newline in row id": pb.EraseRequest(adapter="abuse", remove_ids=["born-ann\nINFO forged"]),
                "bidi mark in row id": pb.EraseRequest(adapter="abuse", remove_ids=["born-\u202eann"]),
            }
            for case, request in cases.items():
                with pytest.raises(grpc.RpcError) as info:
                    stub.Erase(request, timeout=60)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, info.value.code())
                assert len(info.value.details()) < 1024 and "\n" not in info.value.details(), case
            assert "and 9995 more" in _details(lambda: stub.Erase(cases["unknown ids"]))
            assert "max_iterations_limit=100000" in _details(lambda: stub.Erase(cases["iterations"]))
            for state in (99, 6):
                assert code_of(lambda: stub.ListJobs(pb.ListJobsRequest(state=state))) == grpc.StatusCode.INVALID_ARGUMENT
            assert code_of(lambda: stub.ListJobs(pb.ListJobsRequest(limit=1_000_000))) == grpc.StatusCode.INVALID_ARGUMENT
            assert not stub.ListJobs(pb.ListJobsRequest(limit=1000)).jobs, "nothing was queued"
            assert stub.GetAdapter(pb.GetAdapterRequest(name="abuse")).version == 1
    finally:
        running.stop(1.0)


def _details(call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.details()


def test_removing_every_row_is_refused(stub, sidecar, tiny_base, tiny_adapter, train_file):
    """An empty training set would be published and wedge the adapter: refused, counting
    the removals of jobs still queued or running."""
    register(stub, "all-gone", tiny_base, tiny_adapter, train_file)
    ids = [r.id for r in load_rows(train_file)]
    first = stub.Erase(pb.EraseRequest(adapter="all-gone", remove_ids=ids[:10], options=FAST))
    for rest in (ids[10:], ids[10:]):  # while the first is active, then after it
        with pytest.raises(grpc.RpcError) as info:
            stub.Erase(pb.EraseRequest(adapter="all-gone", remove_ids=rest, options=FAST))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "every row" in info.value.details()
        assert wait_job(stub, first.id).state == pb.JOB_STATE_SUCCEEDED
    before = store_listing(sidecar.config.store)
    assert stub.GetAdapter(pb.GetAdapterRequest(name="all-gone")).rows == 10
    assert len(stub.ListJobs(pb.ListJobsRequest(adapter="all-gone")).jobs) == 1, "nothing was queued"
    last = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="all-gone", remove_ids=ids[10:19], options=FAST)).id)
    assert last.state == pb.JOB_STATE_SUCCEEDED and store_listing(sidecar.config.store) != before
    assert stub.GetAdapter(pb.GetAdapterRequest(name="all-gone")).rows == 1


def test_registered_verify_policy_is_a_floor(stub, sidecar, tiny_base, tiny_adapter, train_file, tmp_path):
    from conftest import fact_rows
    from eraser.data import write_rows
    from sidecar.solver_choice import resolve_options

    holdout = tmp_path / "holdout.jsonl"
    write_rows(holdout, fact_rows(["Quo", "Rex", "Sue", "Tom", "Una"], prefix="h-"))
    for name, policy in (("floor-enforce", "enforce"), ("floor-report", "report")):
        stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, base_model=str(tiny_base), adapter_path=str(tiny_adapter),
                                                       dataset_path=str(train_file), holdout_path=str(holdout), verify=policy))
    before = store_listing(sidecar.config.store), len(stub.ListJobs(pb.ListJobsRequest(limit=1000)).jobs)
    for name, lower in (("floor-enforce", "off"), ("floor-enforce", "report"), ("floor-report", "off")):
        request = pb.EraseRequest(adapter=name, remove_ids=["born-ann"], options=pb.EraseOptions(verify=lower))
        with pytest.raises(grpc.RpcError) as info:
            stub.Erase(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "registered with" in info.value.details()
    assert (store_listing(sidecar.config.store), len(stub.ListJobs(pb.ListJobsRequest(limit=1000)).jobs)) == before
    raised = stub.Erase(pb.EraseRequest(adapter="floor-report", remove_ids=["born-ann"], options=pb.EraseOptions(verify="enforce")))
    assert stub.CancelJob(pb.CancelJobRequest(id=raised.id)).id == raised.id  # accepted; not run here
    record = sidecar.service.store.record("floor-enforce")
    lowering = config_for(sidecar.config.store, erase={"verify_allow_lower": True})
    assert "verify" not in resolve_options({"verify": "off"}, lowering, record)  # the server setting allows it


def test_idempotent_request_id(stub, sidecar, tiny_base, tiny_adapter, train_file):
    register(stub, "idem", tiny_base, tiny_adapter, train_file)
    request = pb.EraseRequest(adapter="idem", request_id="idem-1", remove_ids=["born-cid"], options=FAST)
    first = stub.Erase(request)
    assert stub.Erase(request).id == first.id
    final = wait_job(stub, first.id)
    assert final.state == pb.JOB_STATE_SUCCEEDED
    again = stub.Erase(request)  # after the end, too: the same job, nothing new queued
    assert again.id == first.id and again.state == pb.JOB_STATE_SUCCEEDED
    other = pb.EraseRequest(adapter="idem", request_id="idem-1", remove_ids=["born-dee"], options=FAST)
    assert code_of(lambda: stub.Erase(other)) == grpc.StatusCode.ALREADY_EXISTS
    # A new request to remove a row already erased is granted without another version.
    repeat = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="idem", request_id="idem-2", remove_ids=["born-cid"])).id)
    assert repeat.state == pb.JOB_STATE_SUCCEEDED and list(repeat.already_erased_ids) == ["born-cid"]
    assert repeat.from_version == repeat.to_version == 2
    assert stub.GetAdapter(pb.GetAdapterRequest(name="idem")).version == 2


def test_cancel_of_a_merged_job_affects_only_the_callers_request(stub, sidecar, tiny_base, tiny_adapter, train_file):
    register(stub, "share", tiny_base, tiny_adapter, train_file)
    slow = stub.Erase(pb.EraseRequest(adapter="share", request_id="s-slow", remove_ids=["born-cid"], options=SLOW))
    for job in stub.WatchJob(pb.GetJobRequest(id=slow.id), timeout=60):
        if job.state == pb.JOB_STATE_RUNNING:
            break
    mine = pb.EraseRequest(adapter="share", request_id="s-a", remove_ids=["born-ann"], options=FAST)
    theirs = pb.EraseRequest(adapter="share", request_id="s-b", remove_ids=["born-bob"], options=FAST)
    merged = stub.Erase(mine)
    joined = stub.Erase(theirs)
    # The reply to the request that joined names it alone and counts the job's requests.
    assert (joined.id, list(joined.request_ids), joined.request_count) == (merged.id, ["s-b"], 2)
    assert sorted(stub.GetJob(pb.GetJobRequest(id=merged.id)).request_ids) == ["s-a", "s-b"]
    assert code_of(lambda: stub.CancelJob(pb.CancelJobRequest(id=merged.id))) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: stub.CancelJob(pb.CancelJobRequest(id=merged.id, request_id="s-x"))) == grpc.StatusCode.NOT_FOUND
    left = stub.CancelJob(pb.CancelJobRequest(id=merged.id, request_id="s-a"))
    assert left.state == pb.JOB_STATE_QUEUED and list(left.request_ids) == ["s-b"]
    assert dict(left.counts)["remove"] == 1
    assert code_of(lambda: stub.CancelJob(pb.CancelJobRequest(id=slow.id, request_id="s-a"))) == grpc.StatusCode.NOT_FOUND
    stub.CancelJob(pb.CancelJobRequest(id=slow.id, request_id="s-slow"))  # its only request: the whole job
    assert wait_job(stub, slow.id).state == pb.JOB_STATE_CANCELLED
    done = wait_job(stub, merged.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED and list(done.request_ids) == ["s-b"]
    rows = {r.id for r in load_rows(stub.GetAdapter(pb.GetAdapterRequest(name="share")).dataset_path)}
    assert "born-bob" not in rows and {"born-ann", "born-cid"} <= rows, "the withdrawn request was not served"
    # A request id whose job was cancelled (or that left its job) is a new submission when retried.
    retry = stub.Erase(pb.EraseRequest(adapter="share", request_id="s-slow", remove_ids=["born-cid"], options=FAST))
    assert retry.id != slow.id and wait_job(stub, retry.id).state == pb.JOB_STATE_SUCCEEDED
    assert "s-slow" in stub.GetJob(pb.GetJobRequest(id=slow.id)).request_ids, "the cancelled job keeps its record"
    again = wait_job(stub, stub.Erase(mine).id)
    assert again.id not in (merged.id, retry.id) and again.state == pb.JOB_STATE_SUCCEEDED
    assert stub.Erase(mine).id == again.id, "after success the id is taken again"
    rows = {r.id for r in load_rows(stub.GetAdapter(pb.GetAdapterRequest(name="share")).dataset_path)}
    assert not {"born-ann", "born-bob", "born-cid"} & rows


def test_concurrent_erases_merge_and_stay_sequential(stub, sidecar, tiny_base, tiny_adapter, train_file):
    register(stub, "busy", tiny_base, tiny_adapter, train_file)
    ids = [r.id for r in load_rows(train_file)][:10]
    requests = [pb.EraseRequest(adapter="busy", request_id=f"busy-{i}", remove_ids=[ids[i % 10]], options=FAST)
                for i in range(20)]
    with futures.ThreadPoolExecutor(20) as pool:
        jobs = list(pool.map(stub.Erase, requests))
    finals = {j.id: wait_job(stub, j.id) for j in jobs}
    assert all(f.state == pb.JOB_STATE_SUCCEEDED for f in finals.values()), [f.error for f in finals.values()]
    served = sorted(r for f in finals.values() for r in f.request_ids)
    assert served == sorted(r.request_id for r in requests), "every request served exactly once"
    assert len(finals) < 20, "queued requests were merged into fewer solves"
    published = sorted(f.to_version for f in finals.values() if f.to_version != f.from_version)
    adapter = stub.GetAdapter(pb.GetAdapterRequest(name="busy"))
    assert published == list(range(2, adapter.version + 1)), "versions are strictly sequential"
    assert adapter.rows == 10 and not set(ids) & {r.id for r in load_rows(adapter.dataset_path)}
    listed = stub.ListJobs(pb.ListJobsRequest(adapter="busy")).jobs
    assert {j.id for j in listed} == set(finals)


def test_cancel_deadline_and_rollback(stub, sidecar, tiny_base, tiny_adapter, train_file):
    register(stub, "roll", tiny_base, tiny_adapter, train_file)
    done = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="roll", remove_ids=["born-eve"], options=FAST)).id)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.to_version == 2
    slow = stub.Erase(pb.EraseRequest(adapter="roll", remove_ids=["born-fay"], options=SLOW))
    queued = stub.Erase(pb.EraseRequest(adapter="roll", remove_ids=["born-gus"], options=FAST))
    for job in stub.WatchJob(pb.GetJobRequest(id=slow.id), timeout=60):
        if job.stage.startswith("solve"):
            break
    # Rollback refuses while jobs are active; a client deadline on a watch is honoured.
    assert code_of(lambda: stub.Rollback(pb.RollbackRequest(adapter="roll", version=1))) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: list(stub.WatchJob(pb.GetJobRequest(id=slow.id), timeout=0.5))) == grpc.StatusCode.DEADLINE_EXCEEDED
    cancelled_queued = stub.CancelJob(pb.CancelJobRequest(id=queued.id))
    assert cancelled_queued.state == pb.JOB_STATE_CANCELLED
    stub.CancelJob(pb.CancelJobRequest(id=slow.id))
    final = wait_job(stub, slow.id, timeout=60)
    assert final.state == pb.JOB_STATE_CANCELLED and final.error.code == "CANCELLED"
    assert stub.GetAdapter(pb.GetAdapterRequest(name="roll")).version == 2
    assert code_of(lambda: stub.CancelJob(pb.CancelJobRequest(id=done.id))) == grpc.StatusCode.FAILED_PRECONDITION
    late = wait_job(stub, stub.Erase(pb.EraseRequest(
        adapter="roll", remove_ids=["born-hal"], options=pb.EraseOptions(damping=0.1, deadline_seconds=1e-3))).id)
    assert late.state == pb.JOB_STATE_FAILED and late.error.code == "DEADLINE_EXCEEDED"

    rolled = stub.Rollback(pb.RollbackRequest(adapter="roll", version=1))
    assert (rolled.version, rolled.rows) == (3, 20)  # version 1's content, published as version 3
    assert list(rolled.retained_versions) == [2, 3], "keep_versions=2 deleted version 1"
    manifest = json.loads((Path(rolled.path).parent / "manifest.json").read_text())
    assert manifest["rollback_of"] == 1 and manifest["parent_version"] == 2
    assert stub.Rollback(pb.RollbackRequest(adapter="roll", version=3)).version == 3  # already there
    assert code_of(lambda: stub.Rollback(pb.RollbackRequest(adapter="roll", version=1))) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: stub.Rollback(pb.RollbackRequest(adapter="roll", version=9))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.Rollback(pb.RollbackRequest(adapter="nope", version=1))) == grpc.StatusCode.NOT_FOUND


def test_metrics_scraped_over_http(stub, sidecar, tiny_base, tiny_adapter, train_file):
    register(stub, "metered", tiny_base, tiny_adapter, train_file)
    job = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="metered", remove_ids=["born-ivy"], options=FAST)).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED
    code_of(lambda: stub.GetAdapter(pb.GetAdapterRequest(name="nope")))
    text = urllib.request.urlopen(f"http://127.0.0.1:{sidecar.metrics_port}/metrics", timeout=10).read().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert all(s.name.startswith("eraser_") for s in samples if not s.name.startswith(("python_", "process_")))

    def value(name, **labels):
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("eraser_jobs_total", task="remove", outcome="succeeded") >= 1
    assert value("eraser_adapter_version", adapter="metered") == 2
    assert value("eraser_rows_erased_total", task="remove") >= 1
    assert value("eraser_job_stage_duration_seconds_count", stage="solve") >= 1
    assert value("eraser_rpc_duration_seconds_count", method="Erase", code="OK") >= 1
    assert value("eraser_rpc_duration_seconds_count", method="GetAdapter", code="NOT_FOUND") >= 1
    assert value("eraser_solver_residual_count") >= 1
    for s in samples:  # no label value carries row text or ids
        assert all("born" not in v and " " not in v for v in s.labels.values()), s


# ---- recovery ------------------------------------------------------------------------

def test_recovery_finishes_a_version_published_before_a_crash(tmp_path, tiny_base, tiny_adapter, train_file):
    """Fault injection: the crash falls between the version's rename (the commit point)
    and the job record's update, which a real kill -9 hits only by chance."""
    running = start(config_for(tmp_path / "store"))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            register(stub, "crash", tiny_base, tiny_adapter, train_file)
            job = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="crash", remove_ids=["born-jon"], options=FAST)).id)
            assert job.state == pb.JOB_STATE_SUCCEEDED
    finally:
        running.stop(1.0)
    db = sqlite3.connect(tmp_path / "store" / "jobs.sqlite3")
    db.execute("UPDATE jobs SET state = 2, report = NULL WHERE id = ?", (job.id,))
    db.commit()
    db.close()
    current = tmp_path / "store" / "adapters" / "crash" / "current"
    current.write_text("1\n")
    (tmp_path / "store" / "staging" / "job-half.1234").mkdir()  # a half-assembled version
    running = start(config_for(tmp_path / "store"))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            recovered = stub.GetJob(pb.GetJobRequest(id=job.id))
            assert recovered.state == pb.JOB_STATE_SUCCEEDED and recovered.to_version == 2
            assert recovered.report.residual == job.report.residual
            assert stub.GetAdapter(pb.GetAdapterRequest(name="crash")).version == 2
        assert not list((tmp_path / "store" / "staging").iterdir())
    finally:
        running.stop(1.0)


def test_recovery_finishes_a_rollback_interrupted_before_set_current(tmp_path, tiny_base, tiny_adapter, train_file):
    """Fault injection: the crash falls between a rollback's rename and ``set_current``.
    A rollback has no job, so recovery must recognise its version; left as it was, every
    later publish would collide with the orphan version and fail."""
    running = start(config_for(tmp_path / "store"))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            register(stub, "rb", tiny_base, tiny_adapter, train_file)
            assert wait_job(stub, stub.Erase(pb.EraseRequest(adapter="rb", remove_ids=["born-ann"],
                                                             options=FAST)).id).state == pb.JOB_STATE_SUCCEEDED

            def crash(name, number):
                raise RuntimeError("injected crash before set_current")

            running.service.store.set_current = crash
            assert code_of(lambda: stub.Rollback(pb.RollbackRequest(adapter="rb", version=1))) == grpc.StatusCode.INTERNAL
    finally:
        running.stop(1.0)
    versions = tmp_path / "store" / "adapters" / "rb"
    assert (versions / "current").read_text() == "2\n" and (versions / "versions" / "3" / "manifest.json").is_file()
    running = start(config_for(tmp_path / "store"))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            adapter = stub.GetAdapter(pb.GetAdapterRequest(name="rb"))
            assert (adapter.version, adapter.rows, list(adapter.retained_versions)) == (3, 20, [2, 3])
            job = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="rb", remove_ids=["born-bob"], options=FAST)).id)
            assert job.state == pb.JOB_STATE_SUCCEEDED and job.to_version == 4, job.error
    finally:
        running.stop(1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(store: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "ERASER_STORE": str(store), "ERASER_GRPC_PORT": str(port), "ERASER_METRICS_PORT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "sidecar.cli"], env=env, stderr=log.open("ab"), stdout=subprocess.DEVNULL)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=120)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    return proc


def test_kill_9_during_a_job_then_restart(tmp_path, tiny_base, tiny_adapter, train_file):
    store, port, log = tmp_path / "store", _free_port(), tmp_path / "sidecar.log"
    proc = _spawn(store, port, log)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EraserStub(channel)
            register(stub, "killed", tiny_base, tiny_adapter, train_file)
            slow = stub.Erase(pb.EraseRequest(adapter="killed", request_id="k-slow", remove_ids=["born-ann"], options=SLOW))
            behind = stub.Erase(pb.EraseRequest(adapter="killed", request_id="k-fast", remove_ids=["born-bob"], options=FAST))
            for job in stub.WatchJob(pb.GetJobRequest(id=slow.id), timeout=120):
                if job.stage.startswith("solve") and job.fraction > 0:
                    break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc = _spawn(store, port, log)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EraserStub(channel)
            resumed = stub.GetJob(pb.GetJobRequest(id=slow.id))
            assert resumed.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING) and resumed.attempts >= 1
            for job in stub.WatchJob(pb.GetJobRequest(id=slow.id), timeout=120):
                if job.state == pb.JOB_STATE_RUNNING and job.attempts == 2:
                    break
            stub.CancelJob(pb.CancelJobRequest(id=slow.id))
            assert wait_job(stub, slow.id).state == pb.JOB_STATE_CANCELLED
            fast = wait_job(stub, behind.id)
            assert fast.state == pb.JOB_STATE_SUCCEEDED and (fast.from_version, fast.to_version) == (1, 2)
            assert stub.Erase(pb.EraseRequest(adapter="killed", request_id="k-fast", remove_ids=["born-bob"],
                                              options=FAST)).id == behind.id, "no request was lost or duplicated"
            adapter = stub.GetAdapter(pb.GetAdapterRequest(name="killed"))
            assert (adapter.version, adapter.rows, list(adapter.retained_versions)) == (2, 19, [1, 2])
        assert not list((store / "staging").iterdir())
        proc.send_signal(signal.SIGTERM)  # drains and exits cleanly
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"Traceback" not in log.read_bytes()


def test_one_compute_sidecar_per_store(tmp_path):
    from sidecar.errors import FailedPreconditionError

    store, port, log = tmp_path / "store", _free_port(), tmp_path / "sidecar.log"
    proc = _spawn(store, port, log)
    try:
        env = {**os.environ, "ERASER_STORE": str(store), "ERASER_GRPC_PORT": "0", "ERASER_METRICS_PORT": "0"}
        second = subprocess.run([sys.executable, "-m", "sidecar.cli"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "another compute sidecar is running on the store" in lines[0], second.stderr
        with pytest.raises(FailedPreconditionError):  # in this process too
            start(config_for(store))
        reconciler = start(config_for(store, role="reconcile"))  # reconcilers take no lock
        reconciler.stop(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    running = start(config_for(store))  # the kernel dropped the dead process's lock
    running.stop(1.0)
    start(config_for(store)).stop(1.0)  # and a stop releases it


# ---- auth and TLS on the real sidecar ------------------------------------------------

def test_token_and_mutual_tls(tmp_path, tiny_base, tiny_adapter, train_file):
    from sidecar.auth import open_channel
    from tlsutil import make_certs

    certs = make_certs(tmp_path / "certs")
    running = start(config_for(tmp_path / "store", token="t0ken-for-tests", tls_cert=certs.server_cert,
                               tls_key=certs.server_key, tls_client_ca=certs.ca))
    target = f"localhost:{running.grpc_port}"
    mtls = {"ca": certs.ca, "cert": certs.client_cert, "key": certs.client_key}
    try:
        with open_channel(target, token="t0ken-for-tests", **mtls) as channel:
            stub = pb_grpc.EraserStub(channel)
            assert register(stub, "secure", tiny_base, tiny_adapter, train_file).version == 1
            job = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="secure", remove_ids=["born-ann"], options=FAST)).id)
            assert job.state == pb.JOB_STATE_SUCCEEDED
        for token in (None, "wrong"):
            with open_channel(target, token=token, **mtls) as channel:
                stub = pb_grpc.EraserStub(channel)
                assert code_of(lambda: stub.ListAdapters(pb.ListAdaptersRequest())) == grpc.StatusCode.UNAUTHENTICATED
                assert code_of(lambda: list(stub.WatchJob(pb.GetJobRequest(id=job.id)))) == grpc.StatusCode.UNAUTHENTICATED
                health = health_pb2_grpc.HealthStub(channel)  # probes need no token
                assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        with open_channel(target, token="t0ken-for-tests", ca=certs.ca) as channel:  # no client certificate
            assert code_of(lambda: pb_grpc.EraserStub(channel).ListAdapters(pb.ListAdaptersRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(target) as channel:  # plaintext to a TLS port
            assert code_of(lambda: pb_grpc.EraserStub(channel).ListAdapters(pb.ListAdaptersRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(1.0)


def test_reconcile_role_reads_the_store_and_refuses_writes(tmp_path, tiny_base, tiny_adapter, train_file):
    compute = start(config_for(tmp_path / "store"))
    try:
        with grpc.insecure_channel(compute.target) as channel:
            register(pb_grpc.EraserStub(channel), "shared", tiny_base, tiny_adapter, train_file)
        reconciler = start(config_for(tmp_path / "store", role="reconcile"))
        try:
            with grpc.insecure_channel(reconciler.target) as channel:
                stub = pb_grpc.EraserStub(channel)
                assert stub.GetAdapter(pb.GetAdapterRequest(name="shared")).version == 1
                erase = pb.EraseRequest(adapter="shared", remove_ids=["born-ann"])
                assert code_of(lambda: stub.Erase(erase)) == grpc.StatusCode.FAILED_PRECONDITION
                assert code_of(lambda: stub.ListJobs(pb.ListJobsRequest())) == grpc.StatusCode.FAILED_PRECONDITION
                assert code_of(lambda: stub.Rollback(pb.RollbackRequest(adapter="shared", version=1))) == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            reconciler.stop(1.0)
    finally:
        compute.stop(1.0)
