"""The job stores, SQLite (sidecar.jobs.JobDB) and PostgreSQL (sidecar.pg_jobs.PostgresJobDB),
through the same behavioural checks on real databases: a real PostgreSQL server
(devtools/pg.py, a throwaway cluster for the session, a fresh database per test) and
real SQLite files. Then PostgreSQL alone under concurrency: threads and two store objects
(as two sidecars) submitting, merging, claiming and finishing at once."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from eraser.rowhash import RowHasher
from sidecar.errors import JobStoreUnavailable, LeaseLost
from sidecar.job_store import JobStore
from sidecar.job_model import RequestPayload, State, _merge_edits
from sidecar.jobs import JobDB
from sidecar.payload_keys import PREFIX, PayloadKeyMissing, PayloadKeys
from sidecar.pg_jobs import PostgresJobDB

HASHER = RowHasher(b"k" * 32)
CG = {"solver": "cg"}
OTHER = {"solver": "sqm"}


class Backend:
    """A fresh database of one kind; ``open()`` is a new store object on it (as a restart is)."""

    def __init__(self, kind: str, tmp_path: Path, cluster=None):
        self.kind, self.cluster, self.opened = kind, cluster, []
        self.keys = PayloadKeys(tmp_path / "payload-keys")  # as the store's secrets/payload-keys
        if kind == "sqlite":
            self.path = tmp_path / "jobs.sqlite3"
        else:
            self.dsn = cluster.new_database()

    def open(self):
        db = (JobDB(self.path, HASHER, keys=self.keys) if self.kind == "sqlite"
              else PostgresJobDB(self.dsn, HASHER, keys=self.keys))
        self.opened.append(db)
        return db

    def close_all(self) -> None:
        for db in self.opened:
            with contextlib.suppress(Exception):  # a test may have closed it already
                db.close()

    def query(self, sql: str) -> list[tuple]:
        if self.kind == "sqlite":
            c = sqlite3.connect(self.path)
            try:
                return c.execute(sql).fetchall()
            finally:
                c.close()
        with psycopg.connect(self.dsn, autocommit=True) as c:
            cur = c.execute(sql)
            return cur.fetchall() if cur.description else []

    def columns_holding(self, text: str) -> list[str]:
        """Every text column of every table that holds ``text`` anywhere: 'table.column'."""
        if self.kind == "sqlite":
            cols = [(t, r[1]) for (t,) in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")
                    for r in self.query(f"PRAGMA table_info({t})") if r[2].upper() == "TEXT"]
        else:
            cols = self.query("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = "
                              "'public' AND data_type IN ('text', 'character varying', 'json', 'jsonb')")
        assert {t for t, _ in cols} >= {"jobs", "requests", "past_requests", "payloads", "deletions"}
        like = text.replace("'", "''")
        return [f"{t}.{c}" for t, c in cols
                if self.query(f"SELECT COUNT(*) FROM {t} WHERE CAST({c} AS TEXT) LIKE '%{like}%'")[0][0]]

    def files_holding(self, text: str, wal: bool = True) -> list[str]:
        """The database's files that hold ``text``: SQLite's file and its -wal; PostgreSQL's
        files of this database (after a CHECKPOINT wrote every page) and, with ``wal``, the
        cluster's write-ahead log (shared by every test's database: search for unique text)."""
        if self.kind == "sqlite":
            files = [p for p in self.path.parent.glob(self.path.name + "*") if p.is_file()]
        else:
            self.query("CHECKPOINT")
            oid = self.query("SELECT oid FROM pg_database WHERE datname = current_database()")[0][0]
            files = [p for p in (self.cluster.data / "base" / str(oid)).iterdir() if p.is_file()]
            files += [p for p in (self.cluster.data / "pg_wal").iterdir() if p.is_file()] if wal else []
        return [p.name for p in files if text.encode() in p.read_bytes()]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    b = Backend(request.param, tmp_path, request.getfixturevalue("postgres") if request.param == "postgres" else None)
    yield b
    b.close_all()


@pytest.fixture
def pg(postgres, tmp_path):
    b = Backend("postgres", tmp_path, postgres)
    yield b
    b.close_all()


def submit(db, adapter: str, rid: str, remove=(), modify=(), options=CG, merge=True, max_rows=1000, deadline=0.0):
    payload = RequestPayload(tuple(remove), tuple(map(tuple, modify)))
    return db.submit(adapter, rid, payload, options, payload.fingerprint(adapter, options, HASHER), merge, max_rows,
                     deadline)


def test_both_stores_implement_the_protocol(backend):
    assert isinstance(backend.open(), JobStore)


def test_acceptance_is_durable(backend):
    db = backend.open()
    job, created, merged = submit(db, "a", "r1", remove=["row1"], modify=[["row2", "new text"]])
    assert (created, merged, job.state, job.request_ids) == (True, False, State.QUEUED, ["r1"])
    db.close()
    again = backend.open()  # a restarted sidecar, or another one on the same database
    assert again.get(job.id) == job
    seen, fingerprint = again.by_request("r1")
    assert seen == job and fingerprint == RequestPayload(("row1",), (("row2", "new text"),)).fingerprint("a", CG, HASHER)
    assert again.payloads(job.id) == [RequestPayload(("row1",), (("row2", "new text"),))]
    assert again.list() == [job] and again.active_count() == {State.QUEUED: 1, State.RUNNING: 0}


def test_a_request_id_gives_one_job_until_it_fails_or_is_cancelled(backend):
    db = backend.open()
    job, created, _ = submit(db, "a", "r1", remove=["row1"])
    again, created2, merged2 = submit(db, "a", "r1", remove=["row1"])
    assert created and not created2 and not merged2 and again == job
    assert db.payload_rows(job.id) == 1 and len(db.list()) == 1
    # Cancelled: the id is free again; the ended job keeps it in its record.
    assert db.request_cancel(job.id).state == State.CANCELLED
    retry, created3, _ = submit(db, "a", "r1", remove=["row1"])
    assert created3 and retry.id != job.id and retry.request_ids == ["r1"]
    assert db.get(job.id).request_ids == ["r1"] and db.by_request("r1")[0].id == retry.id


def test_queued_requests_for_one_adapter_merge(backend):
    db = backend.open()
    first, _, _ = submit(db, "a", "r1", remove=["row1", "row2"])
    second, created, merged = submit(db, "a", "r2", remove=["row2", "row3"], modify=[["row4", "new"]])
    assert created and merged and second.id == first.id
    # The reply names the request that joined, and counts the job's (a list that grows with each merge).
    assert (second.request_ids, second.request_count, [e["id"] for e in second.edits]) == (
        ["r2"], 2, ["row2", "row3", "row4"])
    assert second.counts == {"remove": 3, "modify_query": 1, "correct_response": 0}
    joined = db.get(first.id)
    assert (joined.request_ids, joined.request_count, joined.counts) == (["r1", "r2"], 2, second.counts)
    assert [e["id"] for e in joined.edits] == ["row1", "row2", "row3", "row4"]  # row2 once
    assert joined.edits[-1] == {"id": "row4", "kind": "modify_query", "new_hash": HASHER.text("new")}
    # No merge (a request joins the newest compatible queued job): a second edit of a row,
    # over max_rows, other options, a deadline, merge=False, another adapter.
    separate = [submit(db, "a", "r7", modify=[["row4", "newer"]]), submit(db, "a", "r8", remove=["row9"], max_rows=1),
                submit(db, "a", "r4", remove=["row5"], options=OTHER), submit(db, "a", "r5", remove=["row6"], deadline=60.0),
                submit(db, "a", "r6", remove=["row7"], merge=False), submit(db, "b", "r3", remove=["row1"])]
    ids = {first.id}
    for job, created, merged in separate:
        assert created and not merged and job.id not in ids
        ids.add(job.id)
    assert db.payloads(first.id) == [RequestPayload(("row1", "row2")), RequestPayload(("row2", "row3"), (("row4", "new"),))]
    assert db.pending_removals("a") == {"row1", "row2", "row3", "row5", "row6", "row7", "row9"}
    assert db.queued_removal_count("a") == 7 and db.queued_removal_count("b") == 1


def test_one_running_job_per_adapter(backend):
    db = backend.open()
    a1, _, _ = submit(db, "a", "r1", remove=["row1"])
    a2, _, _ = submit(db, "a", "r2", remove=["row2"], options=OTHER)
    b1, _, _ = submit(db, "b", "r3", remove=["row1"])
    c1, _, _ = submit(db, "c", "r4", remove=["row1"])
    versions = {"a": 3, "b": 7, "c": 1}
    got = db.claim([], versions.__getitem__)
    assert (got.id, got.state, got.from_version, got.to_version, got.attempts, got.stage) == (a1.id, State.RUNNING, 3, 4, 1, "queued")
    got = db.claim(["b"], versions.__getitem__)  # b is busy in this process: c's job is next
    assert got.id == c1.id
    assert db.claim(["b"], versions.__getitem__) is None  # a and c run one job each already
    assert db.claim([], versions.__getitem__).id == b1.id  # different adapters run side by side
    assert db.active_count() == {State.QUEUED: 1, State.RUNNING: 3}
    assert db.active_count("a") == {State.QUEUED: 1, State.RUNNING: 1}
    # A request for a running adapter does not join its running job.
    a3, _, merged = submit(db, "a", "r5", remove=["row3"])
    assert not merged and a3.id != a1.id
    db.finish(a1.id, State.SUCCEEDED, to_version=4)
    assert db.claim([], versions.__getitem__).id == a2.id  # the oldest queued one


def test_the_text_is_stored_sealed_and_cannot_be_read_once_its_job_ends(backend):
    """The replacement text reaches the database only sealed with its job's key: no table, no
    database file and no write-ahead log (SQLite's -wal, PostgreSQL's pg_wal, which keeps what
    a deletion removed until its segment is recycled) holds it in the clear. When the job ends
    its key is shredded: a copy of the sealed text left anywhere can no longer be opened."""
    secret = f"SECRET-replacement-{uuid.uuid4().hex}"
    db = backend.open()
    job, _, _ = submit(db, "a", "r1", remove=["row1"], modify=[["row2", secret]])
    submit(db, "a", "r2", modify=[["row3", secret + "-two"]])
    db.claim([], lambda a: 0)
    assert db.payloads(job.id)[0].modify_query == (("row2", secret),)
    bodies = [b for (b,) in backend.query(f"SELECT body FROM payloads WHERE job_id = '{job.id}'")]
    assert len(bodies) == 2 and all(b.startswith(PREFIX) and secret not in b for b in bodies)  # r2 joined r1's job
    sealed = bodies[0]
    assert backend.columns_holding(sealed[len(PREFIX):][:40]) == ["payloads.body"], "the search finds what is there"
    assert backend.columns_holding(secret) == [] and backend.files_holding(secret) == []
    removal, _, _ = submit(db, "c", "r3", remove=["row5"])  # ids only, as the job record: not sealed, no key
    assert backend.keys.held() == [job.id] and db.payloads(removal.id) == [RequestPayload(("row5",))]
    db.finish(job.id, State.SUCCEEDED, to_version=1, edits=job.edits)
    assert backend.keys.held() == []
    with pytest.raises(PayloadKeyMissing):
        backend.keys.open(job.id, sealed)
    assert backend.files_holding(secret) == []


def test_a_key_left_by_a_stop_before_its_shred_goes_when_the_store_opens(backend):
    db = backend.open()
    ended, _, _ = submit(db, "a", "r1", modify=[["row2", "new text"]])
    queued, _, _ = submit(db, "b", "r2", modify=[["row3", "newer text"]])
    db.request_cancel(ended.id)
    backend.keys.seal(ended.id, "as if the cancel had stopped before the shred")
    backend.keys.seal("0" * 32, "a submission that rolled back")  # no job: kept for ORPHAN_KEY_SECONDS
    assert backend.keys.held() == sorted(["0" * 32, ended.id, queued.id])
    db.close()
    again = backend.open()
    assert backend.keys.held() == sorted(["0" * 32, queued.id])
    assert again.payloads(queued.id) == [RequestPayload((), (("row3", "newer text"),))]


def test_finish_deletes_the_payload_and_the_text_is_nowhere_else(backend):
    secret = "SECRET-replacement-7f3a"
    db = backend.open()
    db.keys = None  # stored as it is, as before sealing: the deletion alone leaves no copy in the tables
    job, _, _ = submit(db, "a", "r1", remove=["row1"], modify=[["row2", secret]])
    submit(db, "a", "r2", modify=[["row3", secret + "-two"]])
    db.claim([], lambda a: 0)
    assert db.payloads(job.id)[0].modify_query == (("row2", secret),)
    assert backend.columns_holding(secret) == ["payloads.body"]
    assert backend.files_holding(secret), "the search finds the text where it is"
    done = db.finish(job.id, State.SUCCEEDED, to_version=1, edits=job.edits)
    assert done.state == State.SUCCEEDED and done.stage == "done" and done.fraction == 1.0
    assert db.payload_rows(job.id) == 0 and db.payloads(job.id) == []
    assert backend.query("SELECT COUNT(*) FROM payloads")[0][0] == 0
    assert backend.columns_holding(secret) == []  # every text column of every table
    # Nor in the table's files; PostgreSQL's WAL keeps it until recycled: why payloads are sealed.
    assert backend.files_holding(secret, wal=False) == []
    assert {"id": "row2", "kind": "modify_query", "new_hash": HASHER.text(secret)} in done.edits
    assert db.removed_ids("a", ["row1", "row2", "row9"]) == {"row1"}


def test_a_merge_writes_its_own_rows_and_the_job_reads_whole(backend):
    """A request that joins a queued job adds its own edit rows: the job's edits column keeps
    its first request's (a merge does not rewrite a list that grows with every merge), while
    every reader (the job, pending and removed ids, the finish) sees all of them."""
    db = backend.open()
    first, _, _ = submit(db, "a", "r0", remove=["row0"])
    for n in range(1, 30):  # each removes a row of its own and row0 again
        reply, created, merged = submit(db, "a", f"r{n}", remove=[f"row{n}", "row0"])
        assert created and merged and reply.id == first.id and (reply.request_ids, reply.request_count) == ([f"r{n}"], n + 1)
    column = {i: json.loads(e) for i, e in backend.query("SELECT id, edits FROM jobs")}
    assert column == {first.id: [{"id": "row0", "kind": "remove"}]}
    job = db.get(first.id)
    assert [e["id"] for e in job.edits] == [f"row{n}" for n in range(30)] and job.counts["remove"] == 30
    assert db.pending_removals("a") == {f"row{n}" for n in range(30)}
    # Over max_rows once merged (30 rows + 1 new > 30): a job of its own.
    alone, _, merged = submit(db, "a", "r-big", remove=["row99"], max_rows=30)
    assert not merged and alone.id != first.id
    db.claim([], lambda a: 0)
    assert db.finish(first.id, State.SUCCEEDED, to_version=2).edits == job.edits  # failed or not: the rows stay
    assert db.removed_ids("a", ["row7", "row29", "row99"]) == {"row7", "row29"}
    second, _, _ = submit(db, "b", "s0", remove=["x0"])
    submit(db, "b", "s1", remove=["x1"])
    assert db.claim(["a"], lambda a: 1).id == second.id
    hashed = [{**e, "old_hash": "h"} for e in db.get(second.id).edits]
    assert db.finish(second.id, State.SUCCEEDED, to_version=2, edits=hashed).edits == hashed  # once, not twice
    assert backend.query("SELECT COUNT(*) FROM job_edits WHERE job_id = '" + second.id + "'")[0][0] == 0


def test_finishing_an_unknown_job_is_a_key_error_and_changes_nothing(backend):
    db = backend.open()
    job, _, _ = submit(db, "a", "r1", remove=["row1"])
    with pytest.raises(KeyError):
        db.finish("no-such-job", State.FAILED, error_code="X")
    assert db.get(job.id).state == State.QUEUED and db.get("no-such-job") is None
    assert db.payload_rows(job.id) == 1


def test_cancel_and_withdraw(backend):
    db = backend.open()
    job, _, _ = submit(db, "a", "r1", remove=["row1"], modify=[["row2", "text one"]])
    submit(db, "a", "r2", remove=["row1", "row3"])
    left = db.withdraw(job.id, "r1")
    assert left.state == State.QUEUED and left.request_ids == ["r2"]
    assert left.edits == [{"id": "row1", "kind": "remove"}, {"id": "row3", "kind": "remove"}]
    assert left.counts["modify_query"] == 0 and db.payload_rows(job.id) == 1 and db.by_request("r1") is None
    assert backend.columns_holding("text one") == []
    cancelled = db.request_cancel(job.id)
    assert (cancelled.state, cancelled.error_code, cancelled.cancel_requested) == (State.CANCELLED, "CANCELLED", True)
    assert db.payload_rows(job.id) == 0
    assert db.withdraw(job.id, "r2") is None  # no longer queued
    running, _, _ = submit(db, "b", "r3", remove=["row1"])
    db.claim([], lambda a: 0)
    flagged = db.request_cancel(running.id)
    assert flagged.state == State.RUNNING and flagged.cancel_requested and db.payload_rows(running.id) == 1
    assert db.withdraw(running.id, "r3") is None
    assert db.request_cancel("no-such-job") is None and db.withdraw("no-such-job", "r3") is None
    assert db.get("no-such-job") is None


def test_requeue_progress_and_swap(backend):
    db = backend.open()
    job, _, _ = submit(db, "a", "r1", remove=["row1"])
    db.claim([], lambda a: 2)
    db.progress(job.id, "solving", 0.5)
    assert (db.get(job.id).stage, db.get(job.id).fraction) == ("solving", 0.5)
    db.requeue(job.id)
    back = db.get(job.id)
    assert (back.state, back.stage, back.fraction, back.started_at) == (State.QUEUED, "queued", 0.0, None)
    db.progress(job.id, "ignored", 0.9)  # only a running job records progress
    assert db.get(job.id).stage == "queued"
    again = db.claim([], lambda a: 5)
    assert (again.id, again.attempts, again.from_version) == (job.id, 2, 5)
    db.set_swap(job.id, [{"replica": "r0", "ok": True}], ["r1"])
    got = db.get(job.id)
    assert got.swap_checks == [{"replica": "r0", "ok": True}] and got.replicas_behind == ["r1"]
    failed = db.finish(job.id, State.FAILED, error_code="INTERNAL", error_message="boom")
    assert (failed.state, failed.stage, failed.error_message) == (State.FAILED, "failed", "boom")


def test_list_filters_and_deletions(backend):
    db = backend.open()
    jobs = [submit(db, adapter, f"r{n}", remove=[f"row{n}"], merge=False)[0]
            for n, adapter in enumerate(["a", "b", "a", "b", "a"])]
    db.claim([], lambda a: 0)  # jobs[0]
    db.finish(jobs[0].id, State.SUCCEEDED)
    assert [j.id for j in db.list()] == [j.id for j in reversed(jobs)]  # newest first
    assert [j.id for j in db.list(adapter="a")] == [jobs[4].id, jobs[2].id, jobs[0].id]
    assert [j.id for j in db.list(state=State.SUCCEEDED)] == [jobs[0].id]
    assert [j.id for j in db.list(adapter="b", state=State.QUEUED, limit=1)] == [jobs[3].id]
    assert db.list(adapter="nobody") == []
    assert db.removed_ids("a", ["row0", "row2"]) == {"row0"} and db.removed_ids("a", []) == set()
    assert db.record_deletion("a", "retention", [], [], 1.0) == 0 and db.deletions("a") == []
    db.request_cancel(jobs[2].id)
    assert db.record_deletion("a", "purge", [1, 2], [(1, "ekfac")], 123.5, purge_payloads=True) == 0
    assert db.deletions("a") == [{"deleted_at": 123.5, "how": "purge", "versions": [1, 2],
                                  "factor_caches": [[1, "ekfac"]], "payload_rows": 0}]
    assert db.deletions("b") == []


# ---- PostgreSQL under concurrency ------------------------------------------------------

def test_pg_concurrent_submissions_one_job_per_request_id(pg):
    """Threads over two store objects (two sidecars) submit distinct and repeated request ids
    for three adapters: each id is accepted exactly once, every caller of an id gets its one
    job, and every job holds exactly the edits of its requests (none lost, none twice)."""
    stores = [pg.open(), pg.open()]
    threads, per_thread = 8, 12
    plan = [[(f"r{(t * per_thread + k) // 2 if k % 3 == 0 else t * per_thread + k}",
              "abc"[(t * per_thread + k) % 3]) for k in range(per_thread)] for t in range(threads)]
    for t in range(threads):  # the same request ids sent by every thread
        plan[t] += [("shared-0", "a"), ("shared-1", "b")]
    first_adapter = {}
    for mine in plan:
        for rid, adapter in mine:
            first_adapter.setdefault(rid, adapter)
    go = threading.Barrier(threads)
    results: dict[str, list] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(t: int) -> None:
        db = stores[t % 2]
        go.wait()
        try:
            for rid, _ in plan[t]:
                adapter = first_adapter[rid]  # one request: the same adapter and rows every time
                job, created, merged = submit(db, adapter, rid, remove=[f"row-{rid}"])
                with lock:
                    results.setdefault(rid, []).append((job.id, created, rid in job.request_ids))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not errors and not any(w.is_alive() for w in workers)

    assert set(results) == set(first_adapter)
    for rid, got in results.items():
        assert len({g[0] for g in got}) == 1, f"{rid}: one job for every caller"
        assert [g[1] for g in got].count(True) == 1, f"{rid}: accepted exactly once"
        assert all(g[2] for g in got)
    requests = pg.query("SELECT request_id, job_id FROM requests ORDER BY seq")
    assert sorted(r for r, _ in requests) == sorted(results)  # every request once, none lost
    assert {r: j for r, j in requests} == {rid: got[0][0] for rid, got in results.items()}
    payloads = dict(pg.query("SELECT request_id, body FROM payloads"))
    assert set(payloads) == set(results)
    merged = pg.query("SELECT job_id, row_id, kind, new_hash FROM job_edits ORDER BY seq")
    for job_id, adapter, edits in pg.query("SELECT id, adapter, edits FROM jobs"):
        expected: list[dict] = []
        for rid, j in requests:
            if j == job_id:
                assert first_adapter[rid] == adapter
                body = json.loads(pg.keys.open(job_id, payloads[rid]))
                expected = _merge_edits(expected, RequestPayload.from_json(body).public_edits(HASHER))
        more = [r[1:] for r in merged if r[0] == job_id]  # the rows requests merged into it added
        stored = json.loads(edits) + [{"id": i, "kind": k, **({"new_hash": h} if h else {})} for i, k, h in more]
        assert stored == expected and expected, f"job {job_id} holds exactly its requests' edits"
    # Queued requests merged: one queued job per adapter (same options, no conflicts).
    assert sorted(a for (a,) in pg.query("SELECT adapter FROM jobs")) == ["a", "b", "c"]


def test_pg_concurrent_claims_and_submissions_lose_nothing(pg):
    """Submitters and workers at once over two store objects: a worker never holds a job of
    an adapter another one runs, no job is claimed twice, and every submitted row reaches a
    worker in the payloads of a job it claimed (none merged into a job already taken)."""
    stores = [pg.open(), pg.open()]
    submitters, per_submitter, workers = 4, 15, 4
    total = submitters * per_submitter
    running: set[str] = set()
    claimed: list[str] = []
    delivered: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    submitted = threading.Event()

    def submitter(s: int) -> None:
        try:
            for k in range(per_submitter):
                n = s * per_submitter + k
                submit(stores[n % 2], "abc"[n % 3], f"r{n}", remove=[f"row{n}"])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def worker(w: int) -> None:
        db = stores[w % 2]
        try:
            while True:
                job = db.claim([], lambda a: 0)
                if job is None:
                    if submitted.is_set() and db.active_count() == {State.QUEUED: 0, State.RUNNING: 0}:
                        return
                    time.sleep(0.005)
                    continue
                with lock:
                    assert job.adapter not in running, f"two running jobs of {job.adapter}"
                    running.add(job.adapter)
                    claimed.append(job.id)
                rows = [r for p in db.payloads(job.id) for r in p.remove]
                with lock:
                    delivered.extend(rows)
                    running.discard(job.adapter)  # before finish commits: the database still says running
                db.finish(job.id, State.SUCCEEDED)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    subs = [threading.Thread(target=submitter, args=(s,)) for s in range(submitters)]
    works = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in subs + works:
        t.start()
    for t in subs:
        t.join(120)
    submitted.set()
    for t in works:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in subs + works)
    assert len(claimed) == len(set(claimed)), "a job claimed twice"
    assert sorted(delivered) == sorted(f"row{n}" for n in range(total)), "every row reached a worker once"
    assert pg.query("SELECT COUNT(*) FROM payloads")[0][0] == 0
    assert pg.query("SELECT COUNT(*) FROM jobs WHERE state <> 3")[0][0] == 0
    assert pg.query("SELECT COUNT(*) FROM requests")[0][0] == total


# ---- PostgreSQL: leases, takeover and the publish fence (a pool of workers) -------------

def _workers(pg, lease: float = 1.0):
    return (PostgresJobDB(pg.dsn, HASHER, worker="a", lease_seconds=lease),
            PostgresJobDB(pg.dsn, HASHER, worker="b", lease_seconds=lease))


def test_pg_expired_lease_is_taken_over_and_the_old_worker_is_fenced(pg):
    a, b = _workers(pg)
    pg.opened += [a, b]
    job, _, _ = submit(a, "x", "r1", remove=["row1"])
    held = a.claim([], lambda _: 3)
    assert (held.id, held.worker, held.attempts, held.from_version) == (job.id, "a", 1, 3)
    assert b.claim([], lambda _: 3) is None, "a live lease is not taken"
    assert a.renew(job.id) == "held"
    time.sleep(1.3)  # a's lease runs out without renewal (its worker paused or died)
    taken = b.claim([], lambda _: 3)
    assert (taken.id, taken.worker, taken.attempts) == (job.id, "b", 2)
    # a lost the lease: nothing it does counts.
    assert a.renew(job.id) == "lost"
    a.progress(job.id, "solve", 0.5)
    assert a.get(job.id).stage == "queued"
    with pytest.raises(LeaseLost):
        a.finish(job.id, State.SUCCEEDED, to_version=4)
    ran = []
    with pytest.raises(LeaseLost):
        with a.fenced(job.id, "x", 4):
            ran.append("a")
    assert ran == [] and a.published_versions("x") == []
    # b publishes once; a second publish of the same number is refused.
    with b.fenced(job.id, "x", 4):
        ran.append("b")
    with pytest.raises(LeaseLost):
        with b.fenced(job.id, "x", 4):
            ran.append("again")
    assert ran == ["b"] and a.published_versions("x") == [(4, job.id)]
    done = b.finish(job.id, State.SUCCEEDED, to_version=4)
    assert done.state == State.SUCCEEDED and done.worker == "b"
    assert b.renew(job.id) == "lost"


def test_pg_renewal_reports_a_cancel_sent_through_another_sidecar(pg):
    a, b = _workers(pg, lease=30)
    pg.opened += [a, b]
    job, _, _ = submit(a, "x", "r1", remove=["row1"])
    a.claim([], lambda _: 1)
    assert a.renew(job.id) == "held"
    b.request_cancel(job.id)  # a client's CancelJob reached the other sidecar
    assert a.renew(job.id) == "cancel"


def test_pg_a_worker_paused_inside_its_publish_cannot_commit(pg):
    """The fence's transaction outlives the lease (a worker stopped between its check and its
    commit): the server ends the session, the job is taken over, the version is not recorded."""
    a, b = _workers(pg)
    pg.opened += [a, b]
    job, _, _ = submit(a, "x", "r1", remove=["row1"])
    a.claim([], lambda _: 1)
    with pytest.raises(JobStoreUnavailable):
        with a.fenced(job.id, "x", 2):
            time.sleep(2.5)  # idle in its transaction past the lease
            assert b.claim([], lambda _: 1).worker == "b", "taken over while a sat in its fence"
    assert a.published_versions("x") == []
    with b.fenced(job.id, "x", 2):
        pass
    assert b.published_versions("x") == [(2, job.id)]
