"""Group commit of Erase submissions (sidecar.jobs.GroupCommit) on real SQLite files with
real threads: concurrent submissions share COMMITs, each is accepted exactly once with the
merging a sequential run would give, one that fails leaves nothing behind and raises to
its own caller only, a returned submission is committed, and a kill -9 in the middle of
batches leaves whole submissions or none."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eraser.rowhash import RowHasher
from sidecar.job_model import RequestPayload, State, _merge_edits
from sidecar.jobs import JobDB
from sidecar.report import JobReport

HASHER = RowHasher(b"k" * 32)
FAST = {"solver": "cg"}
OTHER = {"solver": "sqm"}


def submit(db: JobDB, spec: dict):
    """One submission from a spec (plain data, so a subprocess can build it too)."""
    payload = RequestPayload(tuple(spec.get("remove", ())), tuple(map(tuple, spec.get("modify", ()))))
    return db.submit(spec["adapter"], spec["rid"], payload, spec["options"], spec["fingerprint"], True, 1000,
                     spec.get("deadline", 0.0))


def commits_of(db: JobDB) -> list[int]:
    """COMMIT statements the connection runs, counted by SQLite's own trace (not by the class under test)."""
    seen = [0]

    def trace(sql: str) -> None:
        if sql.strip().upper() == "COMMIT":
            seen[0] += 1

    db._conn.set_trace_callback(trace)
    return seen


def specs(threads: int, per_thread: int) -> list[list[dict]]:
    """Each thread's submissions: mostly removals that merge; some edits of shared rows
    (they cannot merge with each other: new jobs); other options and deadlines (never
    merged with the rest); duplicated request ids (sent twice by two threads, the same
    request); and invalid ones (no fingerprint: the requests insert fails after the job
    insert or merge has been written, so rolling back must undo those)."""
    out: list[list[dict]] = []
    for t in range(threads):
        mine = []
        for k in range(per_thread):
            n = t * per_thread + k
            spec = {"adapter": "a" if n % 7 else "b", "rid": f"r{n}", "remove": [f"row{n}"], "options": FAST,
                    "fingerprint": f"fp{n}"}
            if n % 11 == 0:
                spec["modify"] = [[f"shared{n % 3}", f"new text {n}"]]
            if n % 13 == 0:
                spec["options"] = OTHER
            if n % 17 == 0:
                spec["deadline"] = 60.0
            if n % 19 == 5:
                spec["fingerprint"] = None
            mine.append(spec)
        out.append(mine)
    for t in range(0, threads - 1, 5):  # thread t+1 also sends thread t's first request
        out[t + 1].insert(0, dict(out[t][0]))
    return out


def job_shapes(path: Path) -> dict[frozenset, list]:
    """Each job's set of request ids -> its edits: what merging decided, free of job ids."""
    c = sqlite3.connect(path)
    try:
        by_job: dict[str, set] = {}
        for rid, job_id in c.execute("SELECT request_id, job_id FROM requests"):
            by_job.setdefault(job_id, set()).add(rid)
        jobs = {j: stored_edits(c, j, edits) for j, edits in c.execute("SELECT id, edits FROM jobs").fetchall()}
        assert set(jobs) == set(by_job), "every job serves a request, every request has a job"
        return {frozenset(rids): jobs[j] for j, rids in by_job.items()}
    finally:
        c.close()


def stored_edits(c, job_id: str, column: str) -> list[dict]:
    """A job's edits as stored: its edits column, then the rows merged requests added."""
    more = c.execute("SELECT row_id, kind, new_hash FROM job_edits WHERE job_id = ? ORDER BY seq", (job_id,)).fetchall()
    return json.loads(column) + [{"id": i, "kind": k, **({"new_hash": h} if h else {})} for i, k, h in more]


def assert_whole(path: Path) -> list[str]:
    """Every stored submission is whole (its request, payload and job edits all there) and
    every job holds exactly its requests' edits. Returns the request ids, in commit order."""
    c = sqlite3.connect(path)
    try:
        order = [r[0] for r in c.execute("SELECT request_id FROM requests ORDER BY seq")]
        payloads = dict(c.execute("SELECT request_id, body FROM payloads").fetchall())
        assert set(payloads) == set(order), "a request without its payload or a payload without its request"
        for job_id, edits in c.execute("SELECT id, edits FROM jobs").fetchall():
            expected: list[dict] = []
            for (rid,) in c.execute("SELECT request_id FROM requests WHERE job_id = ? ORDER BY seq", (job_id,)):
                expected = _merge_edits(expected, RequestPayload.from_json(json.loads(payloads[rid])).public_edits(HASHER))
            assert stored_edits(c, job_id, edits) == expected and expected, f"job {job_id} holds part of a submission"
        return order
    finally:
        c.close()


def test_concurrent_submissions_share_commits_with_sequential_semantics(tmp_path):
    db = JobDB(tmp_path / "jobs.sqlite3", HASHER)
    commits = commits_of(db)
    plan = specs(threads=50, per_thread=5)
    go = threading.Barrier(len(plan))
    results: dict[str, list] = {}  # request id -> what each of its callers got
    lock = threading.Lock()

    def client(mine: list[dict]) -> None:
        check = sqlite3.connect(db.path)  # a second connection: is a returned submission committed?
        go.wait()
        for spec in mine:
            try:
                job, created, merged = submit(db, spec)
                visible = check.execute("SELECT job_id FROM requests WHERE request_id = ?", (spec["rid"],)).fetchone()
                got = ("ok", job.id, created, merged, visible and visible[0])
            except sqlite3.IntegrityError as e:
                got = ("error", str(e))
            with lock:
                results.setdefault(spec["rid"], []).append(got)
        check.close()

    threads = [threading.Thread(target=client, args=(mine,)) for mine in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)

    sent = [spec for mine in plan for spec in mine]
    assert len(sent) == 260 and sum(len(v) for v in results.values()) == len(sent)
    invalid = {s["rid"] for s in sent if s["fingerprint"] is None}
    assert invalid and all(g == ("error", "NOT NULL constraint failed: requests.fingerprint")
                           for rid in invalid for g in results[rid]), "a failure reaches its own caller only"
    duplicated = 0
    for rid, got in results.items():
        if rid in invalid:
            continue
        assert all(g[0] == "ok" for g in got), (rid, got)
        assert len({g[1] for g in got}) == 1, f"{rid}: every caller gets the one job"
        assert [g[2] for g in got].count(True) == 1, f"{rid}: accepted exactly once"
        assert all(g[4] == g[1] for g in got), f"{rid}: returned before a second connection could see it"
        duplicated += len(got) > 1
    assert duplicated >= 5

    # The stored result is what the same requests, sent one by one in the order they
    # were committed, give without grouping.
    order = assert_whole(db.path)
    assert set(order) == set(results) - invalid
    replay = JobDB(tmp_path / "replay.sqlite3", HASHER, group_commit=False)
    first = {}
    for spec in sent:
        first.setdefault(spec["rid"], spec)
    for rid in order:
        submit(replay, first[rid])
    assert job_shapes(db.path) == job_shapes(replay.path)
    assert len(job_shapes(db.path)) > 5, "the mix makes several jobs, not one"

    # Grouping happened: one COMMIT per valid submission without it (about 250); a dozen
    # or so with it here.
    assert commits[0] == db.group.commits < len(sent) // 4
    assert db.group.submissions == len(sent)
    db.close()
    replay.close()


def test_one_batch_merges_deduplicates_and_isolates_a_failure(tmp_path):
    """A batch made deterministic: while the first submission's transaction holds the
    database, the next five queue up and then commit together."""
    db = JobDB(tmp_path / "jobs.sqlite3", HASHER)
    commits = commits_of(db)
    base = {"adapter": "a", "options": FAST}
    batch = [
        {**base, "rid": "dup", "remove": ["r1"], "fingerprint": "f1"},
        {**base, "rid": "dup", "remove": ["r1"], "fingerprint": "f1"},  # the same request again
        {**base, "rid": "bad", "remove": ["r2"], "fingerprint": None},  # fails after its merge was written
        {**base, "rid": "edit", "modify": [["r3", "new"]], "fingerprint": "f3"},  # merges
        {**base, "rid": "edit-again", "modify": [["r3", "newer"]], "fingerprint": "f4"},  # conflicts: a new job
    ]
    results: dict[int, tuple] = {}

    def call(i: int, spec: dict) -> None:
        try:
            results[i] = submit(db, spec)
        except sqlite3.Error as e:
            results[i] = e

    db._lock.acquire()  # as if a COMMIT were in flight
    try:
        leader = threading.Thread(target=call, args=(-1, {**base, "rid": "first", "remove": ["r0"], "fingerprint": "f0"}))
        leader.start()
        while not db.group._leading:
            time.sleep(0.001)
        followers = [threading.Thread(target=call, args=(i, spec)) for i, spec in enumerate(batch)]
        for i, t in enumerate(followers):
            t.start()
            while len(db.group._waiting) < i + 1:  # queued in this order
                time.sleep(0.001)
    finally:
        db._lock.release()
    for t in [leader, *followers]:
        t.join(30)

    assert commits[0] == db.group.commits == 2, "the leader's own transaction, then one for the five"
    first = results[-1][0]
    (dup1, created1, merged1), (dup2, created2, _) = results[0], results[1]
    assert dup1.id == dup2.id == first.id and (created1, merged1, created2) == (True, True, False)
    assert isinstance(results[2], sqlite3.IntegrityError)
    edit, created, merged = results[3]
    assert edit.id == first.id and created and merged
    again, created, merged = results[4]
    assert again.id != first.id and created and not merged
    # A submission's reply names its own request and counts the job's (the list grows with each merge).
    assert again.request_ids == ["edit-again"] and (edit.request_ids, edit.request_count) == (["edit"], 3)
    assert sorted(db.get(first.id).request_ids) == ["dup", "edit", "first"]
    assert {e["id"] for e in db.get(first.id).edits} == {"r0", "r1", "r3"}, "the failed request's row is not in the job"
    assert db.by_request("bad") is None
    assert assert_whole(db.path) == ["first", "dup", "edit", "edit-again"]
    db.close()


def test_without_grouping_every_submission_commits_alone(tmp_path):
    """The baseline the benchmark compares against: one COMMIT per submission."""
    db = JobDB(tmp_path / "jobs.sqlite3", HASHER, group_commit=False)
    commits = commits_of(db)
    plan = specs(threads=10, per_thread=3)
    threads = [threading.Thread(target=lambda m=mine: [submit(db, s) for s in m if s["fingerprint"]]) for mine in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert db.group is None and commits[0] == sum(1 for m in plan for s in m if s["fingerprint"])
    db.close()


_SUBMITTER = """
import sys, threading
sys.path[:0] = {paths!r}
from test_group_commit import JobDB, HASHER, specs, submit
db = JobDB(sys.argv[1], HASHER)
out = threading.Lock()

def client(mine):
    for round in range(1000):
        for spec in mine:
            if spec["fingerprint"] is None:
                continue
            spec = dict(spec, rid=f"{{spec['rid']}}-{{round}}", remove=[f"{{spec['remove'][0]}}-{{round}}"])
            submit(db, spec)
            with out:  # acknowledged: printed only after submit returned
                print(spec["rid"], flush=True)

for mine in specs(20, 5):
    threading.Thread(target=client, args=(mine,)).start()
"""


@pytest.mark.parametrize("acknowledged", [50, 400])
def test_kill_9_in_the_middle_of_batches_leaves_whole_submissions(tmp_path, acknowledged):
    """20 threads of a second process submit without pause; it is killed with SIGKILL
    after ``acknowledged`` submissions returned. On reopening, every acknowledged one is
    there and every stored one is whole: a batch's COMMIT is all or nothing. (A process
    kill keeps what the OS had been given; losing power is the fsync's part, which is
    SQLite's synchronous=FULL and unchanged.)"""
    path = tmp_path / "jobs.sqlite3"
    paths = [str(Path(__file__).parent), *sys.path]
    proc = subprocess.Popen([sys.executable, "-c", _SUBMITTER.format(paths=paths), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        while len(seen) < acknowledged:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]
            seen.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    seen += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    proc.stdout.close()
    proc.stderr.close()
    db = JobDB(path, HASHER)  # recovery from the WAL, as a restarted sidecar does
    db.close()
    stored = assert_whole(path)
    assert set(seen) <= set(stored), "an acknowledged submission was lost"


def test_reads_see_each_commit_and_never_hold_back_the_checkpoint(tmp_path):
    """Queries use a second connection: they see a submission as soon as it returns, and
    a job's end still truncates the WAL (the replacement text must not stay in it)."""
    db = JobDB(tmp_path / "jobs.sqlite3", HASHER)
    job, created, _ = submit(db, {"adapter": "a", "rid": "r", "modify": [["x", "secret new text"]], "options": FAST,
                                  "fingerprint": "f"})
    assert created and db.get(job.id).request_ids == ["r"] and db.by_request("r")[0].id == job.id
    assert db.payloads(job.id)[0].modify_query == (("x", "secret new text"),)
    assert db.list("a")[0].id == job.id and db.active_count("a")
    db.finish(job.id, State.SUCCEEDED, report=JobReport())
    assert (tmp_path / "jobs.sqlite3-wal").stat().st_size == 0, "a reader held back the TRUNCATE checkpoint"
    assert not db.payloads(job.id) and db.get(job.id).state == State.SUCCEEDED
    db.close()
