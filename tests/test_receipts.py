"""Erasure receipts and PurgeHistory over real gRPC on loopback, with tiny models: what a
receipt names, offline verification (and its failure on any change or another key), purge
of the older versions and their factor caches, and bad input changing nothing."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import cg_erase
from eraser.data import load_rows
from eraser.rowhash import RowHasher
from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
from sidecar.config import SidecarConfig
from sidecar.jobs import JobDB, RequestPayload
from sidecar.receipts import ReceiptInvalid, ReceiptSigner, SignedReceipt, load_public_key, verify_file
from sidecar.server import start
from sidecar.wire import swap_check_message
from test_sidecar import ERASED_TEXT, FAST, SLOW, code_of, register, wait_job

NEW_TEXT = "Bob likes no tea."


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    running = start(SidecarConfig(store=tmp_path_factory.mktemp("store"), grpc_port=0, metrics_port=0,
                                  drain_seconds=2.0, keep_versions=3, erase=cg_erase()))
    yield running
    running.stop(2.0)


@pytest.fixture(scope="module")
def erased(stub, sidecar, tiny_base, tiny_adapter, train_file) -> pb.Job:
    """Adapter "rc" at v2: one job removed born-ann and corrected tea-bob; v1 has a factor cache."""
    register(stub, "rc", tiny_base, tiny_adapter, train_file)
    cache = sidecar.service.store.factors_dir("rc", 1, "ekfac")
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text("{}")
    job = stub.Erase(pb.EraseRequest(adapter="rc", request_id="ticket-rc", remove_ids=["born-ann"],
                                     correct_responses=[pb.CorrectResponse(id="tea-bob", response=NEW_TEXT)],
                                     options=FAST))
    final = wait_job(stub, job.id)
    assert final.state == pb.JOB_STATE_SUCCEEDED and (final.from_version, final.to_version) == (1, 2), final.error
    return final


def receipt_file(message: pb.ErasureReceipt) -> str:
    return SignedReceipt(message.receipt, message.signature, message.key.public_key_pem, message.key.key_id).to_file()


def pinned_key(stub):
    return load_public_key(stub.GetReceiptKey(pb.GetReceiptKeyRequest()).public_key_pem)


def store_listing(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_size for p in store.rglob("*")
            if p.is_file() and "staging" not in p.parts and not p.name.startswith("jobs.sqlite3")}


def test_receipt_names_the_request_rows_versions_and_what_still_holds_them(stub, sidecar, erased, train_file):
    message = stub.GetErasureReceipt(pb.GetErasureReceiptRequest(job_id=erased.id))
    receipt = json.loads(message.receipt)
    assert (receipt["job_id"], receipt["adapter"], receipt["request_ids"]) == (erased.id, "rc", ["ticket-rc"])
    assert (receipt["from_version"], receipt["to_version"], receipt["current_version"]) == (1, 2, 2)
    hasher = RowHasher.load_or_create(sidecar.config.store / "secrets" / "row-hash.key")
    rows = {r.id: r for r in load_rows(train_file)}
    assert receipt["edits"] == [
        {"id": "born-ann", "kind": "remove", "old_hash": hasher.row(rows["born-ann"])},
        {"id": "tea-bob", "kind": "correct_response", "old_hash": hasher.row(rows["tea-bob"]),
         "new_hash": hasher.text(NEW_TEXT)},
    ]
    assert receipt["row_hash"] == {"algorithm": "hmac-sha256", "key_id": hasher.key_id}
    assert receipt["still_holding"] == {"versions": [1], "factor_caches": [{"version": 1, "method": "ekfac"}],
                                        "payload_rows": 0}
    assert receipt["deleted"] == [] and receipt["purged_at"] is None
    assert receipt["payloads_deleted_at"] == receipt["finished_at"]
    assert receipt["serving"] == {"status": "no serving replicas configured", "replicas": [], "behind": []}
    assert receipt["adapter_sha256"] == erased.report.adapter_sha256
    assert receipt["utility"]["passed"] and receipt["issued_at"].endswith("Z")
    assert message.key.key_id == receipt["signing_key_id"] and message.key.algorithm == "ed25519"
    assert verify_file(receipt_file(message), pinned_key(stub)) == receipt
    key = sidecar.config.store / "secrets" / "receipt-signing.key"
    assert key.stat().st_mode & 0o077 == 0
    assert ReceiptSigner.load_or_create(key).key_id == message.key.key_id, "the key is kept, not redrawn"
    # Ids, keyed hashes and numbers only: neither the erased nor the new text, nor a plain hash.
    for secret in (ERASED_TEXT, NEW_TEXT, rows["born-ann"].sha256(), rows["tea-bob"].sha256()):
        assert secret.encode() not in message.receipt


def test_a_changed_receipt_or_another_key_does_not_verify(stub, erased):
    text = receipt_file(stub.GetErasureReceipt(pb.GetErasureReceiptRequest(job_id=erased.id)))
    key = pinned_key(stub)
    doc = json.loads(text)
    old = doc["receipt"]["edits"][0]["old_hash"]
    flipped = old[:-1] + ("0" if old[-1] != "0" else "1")  # one byte of one row hash
    with pytest.raises(ReceiptInvalid, match="does not verify"):
        verify_file(text.replace(old, flipped), key)
    with pytest.raises(ReceiptInvalid, match="does not verify"):
        verify_file(text.replace('"to_version": 2', '"to_version": 3'), key)
    with pytest.raises(ReceiptInvalid, match="does not verify"):
        verify_file(text, Ed25519PrivateKey.generate().public_key())
    with pytest.raises(ReceiptInvalid, match="repeats a key"):
        verify_file(text.replace('"algorithm": "ed25519",', '"algorithm": "ed25519", "algorithm": "ed25519",'), key)
    with pytest.raises(ReceiptInvalid, match="not JSON"):
        verify_file(text[:-5], key)


def test_receipt_counts_a_rollback_past_the_erase(stub, sidecar, tiny_base, tiny_adapter, train_file):
    """A version holds the erased rows by content, not by number: rolling back to v1
    publishes them again as v3, and the receipt says so."""
    register(stub, "rc-back", tiny_base, tiny_adapter, train_file)
    job = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="rc-back", remove_ids=["born-cid"], options=FAST)).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    stub.Rollback(pb.RollbackRequest(adapter="rc-back", version=1))
    receipt = json.loads(stub.GetErasureReceipt(pb.GetErasureReceiptRequest(job_id=job.id)).receipt)
    assert receipt["still_holding"]["versions"] == [1, 3] and receipt["current_version"] == 3


def test_purge_deletes_older_versions_and_their_factors(stub, sidecar, erased):
    store = sidecar.config.store
    before = stub.GetErasureReceipt(pb.GetErasureReceiptRequest(job_id=erased.id))
    purged = stub.PurgeHistory(pb.PurgeHistoryRequest(adapter="rc", before_version=2))
    assert list(purged.purged_versions) == [1] and list(purged.retained_versions) == [2]
    assert [(c.version, c.method) for c in purged.purged_factor_caches] == [(1, "ekfac")]
    assert purged.HasField("purged_at") and purged.purged_payloads == 0
    assert not (store / "adapters" / "rc" / "versions" / "1").exists()
    assert not (store / "factors" / "rc" / "1").exists()
    assert list(stub.GetAdapter(pb.GetAdapterRequest(name="rc")).retained_versions) == [2]

    message = stub.GetErasureReceipt(pb.GetErasureReceiptRequest(job_id=erased.id))
    receipt = json.loads(message.receipt)
    assert receipt["still_holding"] == {"versions": [], "factor_caches": [], "payload_rows": 0}
    assert receipt["purged_at"] and receipt["deleted"] == [{
        "deleted_at": receipt["purged_at"], "how": "purge", "versions": [1],
        "factor_caches": [{"version": 1, "method": "ekfac"}]}]
    key = pinned_key(stub)
    assert verify_file(receipt_file(message), key) == receipt
    assert verify_file(receipt_file(before), key)["still_holding"]["versions"] == [1], "earlier receipts still verify"

    with pytest.raises(grpc.RpcError) as info:
        stub.Rollback(pb.RollbackRequest(adapter="rc", version=1))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "PurgeHistory" in info.value.details()
    # Purging again deletes nothing and records nothing.
    again = stub.PurgeHistory(pb.PurgeHistoryRequest(adapter="rc", before_version=2))
    assert list(again.purged_versions) == [] and list(again.purged_factor_caches) == []
    assert len(sidecar.service.db.deletions("rc")) == 1
    # The record holds version numbers and times only.
    with sqlite3.connect(store / "jobs.sqlite3") as db:
        recorded = json.dumps(db.execute("SELECT * FROM deletions WHERE adapter = 'rc'").fetchall())
    assert ERASED_TEXT not in recorded and NEW_TEXT not in recorded
    for p in store.glob("jobs.sqlite3*"):
        assert ERASED_TEXT.encode() not in p.read_bytes() and NEW_TEXT.encode() not in p.read_bytes()


def test_bad_input_changes_nothing(stub, sidecar, tiny_base, tiny_adapter, train_file):
    register(stub, "rc-bad", tiny_base, tiny_adapter, train_file)
    failed = wait_job(stub, stub.Erase(pb.EraseRequest(
        adapter="rc-bad", remove_ids=["born-hal"], options=pb.EraseOptions(damping=0.1, deadline_seconds=1e-3))).id)
    assert failed.state == pb.JOB_STATE_FAILED
    running = stub.Erase(pb.EraseRequest(adapter="rc-bad", remove_ids=["born-fay"], options=SLOW))
    queued = stub.Erase(pb.EraseRequest(adapter="rc-bad", remove_ids=["born-gus"], options=FAST))
    for job in stub.WatchJob(pb.GetJobRequest(id=running.id), timeout=60):
        if job.stage.startswith("solve"):
            break
    assert stub.GetJob(pb.GetJobRequest(id=queued.id)).state == pb.JOB_STATE_QUEUED
    before = (store_listing(sidecar.config.store), sidecar.service.db.deletions("rc-bad"))

    def receipt(job_id):
        return lambda: stub.GetErasureReceipt(pb.GetErasureReceiptRequest(job_id=job_id))

    def purge(name, before_version):
        return lambda: stub.PurgeHistory(pb.PurgeHistoryRequest(adapter=name, before_version=before_version))

    cases = [
        (receipt("no-such-job"), grpc.StatusCode.NOT_FOUND),
        (receipt(""), grpc.StatusCode.NOT_FOUND),
        (receipt(queued.id), grpc.StatusCode.FAILED_PRECONDITION),
        (receipt(running.id), grpc.StatusCode.FAILED_PRECONDITION),
        (receipt(failed.id), grpc.StatusCode.FAILED_PRECONDITION),
        (purge("no-such-adapter", 1), grpc.StatusCode.NOT_FOUND),
        (purge("Bad Name", 1), grpc.StatusCode.INVALID_ARGUMENT),
        (purge("rc-bad", 2), grpc.StatusCode.INVALID_ARGUMENT),  # beyond the current version (1)
        (purge("rc-bad", 0), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for call, expected in cases:
        assert code_of(call) == expected
    assert (store_listing(sidecar.config.store), sidecar.service.db.deletions("rc-bad")) == before
    stub.CancelJob(pb.CancelJobRequest(id=queued.id))
    stub.CancelJob(pb.CancelJobRequest(id=running.id))
    cancelled = wait_job(stub, running.id, timeout=60)
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert code_of(receipt(cancelled.id)) == grpc.StatusCode.FAILED_PRECONDITION


def test_purge_deletes_payloads_that_ended_jobs_left(tmp_path):
    """A payload outlives its job only by accident (a restore from backup, a crash in an older
    release): a purge deletes those of ended jobs, zeroed, and leaves queued jobs theirs."""
    db = JobDB(tmp_path / "jobs.sqlite3", RowHasher.draw())
    ended, _, _ = db.submit("a", "r1", RequestPayload(correct_response=(("tea-bob", NEW_TEXT),)), {}, "f1",
                            merge=False, max_rows=10)
    queued, _, _ = db.submit("a", "r2", RequestPayload(correct_response=(("tea-cid", "Cid likes cocoa."),)), {}, "f2",
                             merge=False, max_rows=10)
    with db._tx() as c:
        c.execute("UPDATE jobs SET state = 4 WHERE id = ?", (ended.id,))  # ended, its payload left behind
    assert db.record_deletion("a", "purge", [], [], 1.0, purge_payloads=True) == 1
    assert db.payload_rows(ended.id) == 0 and db.payload_rows(queued.id) == 1
    assert db.deletions("a") == [{"deleted_at": 1.0, "how": "purge", "versions": [], "factor_caches": [],
                                  "payload_rows": 1}]
    db.close()
    for p in tmp_path.glob("jobs.sqlite3*"):
        assert NEW_TEXT.encode() not in p.read_bytes()


def test_serving_is_confirmed_only_with_a_served_time_for_every_replica():
    from sidecar.job_model import Job, State
    from sidecar.receipts import serving_record

    check = {"replica": "http://a", "served_path": "/s/v2/adapter", "max_logprob_error": 0.001, "probe_margin": 1.0,
             "seconds": 0.5, "served_at": 0.0}
    job = Job("j", "a", State.SUCCEEDED, {}, 0.0, swap_checks=[check])
    assert serving_record(job, True) == {"status": "confirmed", "behind": [], "replicas": [{
        "replica": "http://a", "served_path": "/s/v2/adapter", "served_at": "1970-01-01T00:00:00.000000Z",
        "max_logprob_error": 0.001}]}
    legacy = {k: v for k, v in check.items() if k != "served_at"}  # recorded before served_at existed
    assert serving_record(Job("j", "a", State.SUCCEEDED, {}, 0.0, swap_checks=[legacy]), True)["status"] == "unconfirmed"
    assert serving_record(Job("j", "a", State.SUCCEEDED, {}, 0.0), True)["status"] == "unconfirmed"  # recovery: no checks
    behind = Job("j", "a", State.SUCCEEDED, {}, 0.0, swap_checks=[check], replicas_behind=["http://b"])
    assert serving_record(behind, True)["status"] == "unconfirmed"
    # The job's SwapCheck messages carry the time too.
    assert swap_check_message({**check, "served_at": 12.5}).served_at.ToNanoseconds() == 12_500_000_000
    assert not swap_check_message(legacy).HasField("served_at")


def _write_private_key(path: Path, key) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def test_a_configured_receipt_key_signs_instead_of_the_store_key(tmp_path):
    key = Ed25519PrivateKey.generate()
    path = _write_private_key(tmp_path / "receipt.key", key)
    store = tmp_path / "store"
    running = start(SidecarConfig(store=store, grpc_port=0, metrics_port=0, drain_seconds=1.0, receipt_key=path))
    try:
        with grpc.insecure_channel(running.target) as channel:
            served = pb_grpc.EraserStub(channel).GetReceiptKey(pb.GetReceiptKeyRequest(), timeout=10)
        assert served.key_id == ReceiptSigner(key).key_id and served.public_key_pem == ReceiptSigner(key).public_key_pem
        assert not (store / "secrets" / "receipt-signing.key").exists()  # no second key made beside it
    finally:
        running.stop(1.0)


def test_a_receipt_key_that_is_missing_or_not_ed25519_is_a_config_error(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    from sidecar.config import ConfigError

    cases = {tmp_path / "absent.key": "no such file",
             _write_private_key(tmp_path / "ec.key", ec.generate_private_key(ec.SECP256R1())): "not an Ed25519",
             tmp_path / "garbage.key": "not a PEM private key"}
    (tmp_path / "garbage.key").write_text("not a key")
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            SidecarConfig(store=tmp_path / "store", receipt_key=path)
    assert not (tmp_path / "store").exists()


def test_a_purge_stopped_before_its_files_went_is_completed_at_the_next_start(tmp_path, tiny_base, tiny_adapter,
                                                                             train_file):
    """The purge is recorded before the versions are deleted: a stop in between (here the
    deletion fails as a killed process would leave it) leaves a record the next start
    completes, so no receipt says a version is gone while its files remain, or the reverse."""
    store = tmp_path / "store"
    config = SidecarConfig(store=store, grpc_port=0, metrics_port=0, drain_seconds=1.0, keep_versions=5,
                           erase=cg_erase())
    running = start(config)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            register(stub, "wal", tiny_base, tiny_adapter, train_file)
            job = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="wal", remove_ids=["born-ann"], options=FAST)).id)
            assert job.state == pb.JOB_STATE_SUCCEEDED and job.to_version == 2, job.error

            def stopped(name, planned):
                raise OSError("the process stopped here")

            running.service.store.delete = stopped
            with pytest.raises(grpc.RpcError):
                stub.PurgeHistory(pb.PurgeHistoryRequest(adapter="wal", before_version=2))
    finally:
        running.stop(1.0)
    assert (store / "adapters" / "wal" / "versions" / "1").is_dir()  # recorded, not yet deleted
    running = start(config)
    try:
        assert not (store / "adapters" / "wal" / "versions" / "1").exists()
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            assert list(stub.GetAdapter(pb.GetAdapterRequest(name="wal")).retained_versions) == [2]
            receipt = json.loads(stub.GetErasureReceipt(pb.GetErasureReceiptRequest(job_id=job.id)).receipt)
        assert receipt["still_holding"]["versions"] == [] and [d["versions"] for d in receipt["deleted"]] == [[1]]
    finally:
        running.stop(1.0)
