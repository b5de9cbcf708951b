"""Durable jobs (embedded default: SQLite in the store).

A job is one solve for one adapter. It serves one or more requests: a request that
arrives while an earlier job for the same adapter is queued joins it when their options
agree and their edits do not touch the same rows, so N queued requests cost one solve.

What is stored: ids, counts, hashes and reports. The replacement text of query
modifications and response corrections is needed until the job has run, so it sits in a
separate table that is deleted when the job ends (with SQLite's secure_delete, so the
freed pages are zeroed). Erased text is never stored at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from eraser.rowhash import RowHasher

from .job_model import Job, RequestPayload, State
from .job_sql import JSON_COLUMNS, SharedSQL, tables
from .payload_keys import PayloadKeys
from .report import JobReport

log = logging.getLogger("eraser.sidecar")


_SCHEMA = tables("INTEGER PRIMARY KEY AUTOINCREMENT", "REAL", "INTEGER NOT NULL DEFAULT 0")

# Columns added after the first release, with their definitions: added to older files on open.
_ADDED_COLUMNS = {
    "replicas_behind": "TEXT NOT NULL DEFAULT '[]'",
    "swap_checks": "TEXT NOT NULL DEFAULT '[]'",
}


class JobDB(SharedSQL):
    """All access goes through one connection under one lock: simple, and SQLite
    serialises writers anyway. Claims and merges run in ``BEGIN IMMEDIATE`` transactions
    so they stay correct even if a second process opens the same file."""

    # One compute sidecar per store (sidecar.store.StoreLock): no leases, nothing to fence.
    leases = False

    def __init__(self, path: str | Path, hasher: RowHasher, group_commit: bool = True, keys: PayloadKeys | None = None):
        self.path = Path(path)
        self.hasher, self.keys = hasher, keys
        # Submissions share transactions (one fsync per batch); False: one each, as before
        # (the benchmark's baseline).
        self.group = GroupCommit(self) if group_commit else None
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA secure_delete=ON")
            self._conn.executescript(_SCHEMA)
            have = {r[1] for r in self._conn.execute("PRAGMA table_info(jobs)")}
            for name, definition in _ADDED_COLUMNS.items():
                if name not in have:
                    self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
        # Queries go through a second connection: in WAL mode a reader sees the last
        # commit and never waits for the writer, so they do not queue behind a batch of
        # submissions and its fsync. (Every read ends before its lock is released, so an
        # idle reader never holds back a checkpoint.)
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._reader.row_factory = sqlite3.Row
        self._reader.execute("PRAGMA query_only=ON")
        self._read_lock = threading.Lock()
        self._checkpoint()  # a stop between a deletion and its checkpoint left the text in the WAL
        self._sweep_keys()  # and one between a job's end and its key's shred, the key

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._conn.close()

    # ---- helpers -------------------------------------------------------------------
    def _write(self):
        return self._tx()

    def _read(self):
        return self._reading()

    def _lock_adapter(self, c: sqlite3.Connection, adapter: str) -> None:
        """Nothing more to hold: BEGIN IMMEDIATE already admits one writer at a time."""

    def _lock_job(self, c: sqlite3.Connection, job_id: str) -> bool:
        return True

    def _wipe(self) -> None:
        self._checkpoint()

    def _tx(self):
        db = self

        class _Tx:
            def __enter__(self):
                db._lock.acquire()
                db._conn.execute("BEGIN IMMEDIATE")
                return db._conn

            def __exit__(self, exc_type, exc, tb):
                try:
                    db._conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
                finally:
                    db._lock.release()
                return False

        return _Tx()

    def _job(self, row: sqlite3.Row, c: sqlite3.Connection | None = None) -> Job:
        d = dict(row)
        d.pop("seq")
        d.pop("options_key")
        for k in JSON_COLUMNS:
            d[k] = json.loads(d[k]) if d[k] is not None else None
        d["state"] = State(d["state"])
        d["report"] = JobReport.from_json(d["report"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        job = Job(**d)
        # A request id retried after its job failed or was cancelled moved to past_requests:
        # the ended job still lists it.
        job.request_ids = [r[0] for r in (c or self._conn).execute(
            "SELECT request_id, created_at FROM requests WHERE job_id = ? UNION ALL "
            "SELECT request_id, created_at FROM past_requests WHERE job_id = ? ORDER BY created_at", (job.id, job.id))]
        job.request_count = len(job.request_ids)
        job.edits = self._merged_edits(c or self._conn, job.id, job.edits)
        return job

    def _checkpoint(self) -> None:
        """After a payload is deleted: secure_delete zeroes the database's pages, but the
        -wal file keeps the frames that held the text until a TRUNCATE checkpoint."""
        with self._lock, self._read_lock:  # no read in progress: it would hold the checkpoint back
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:  # another connection reads: the next deletion's checkpoint catches up
            log.warning("the job database's WAL checkpoint was blocked by a reader; it is retried on the next one")

    # ---- queries -------------------------------------------------------------------
    @contextlib.contextmanager
    def _reading(self):
        """The reader connection inside one read transaction: its queries see one commit."""
        with self._read_lock:
            self._reader.execute("BEGIN")
            try:
                yield self._reader
            finally:
                self._reader.execute("COMMIT")


    def removed_ids(self, adapter: str, ids: Iterable[str]) -> set[str]:
        """Those of ``ids`` that a succeeded job of ``adapter`` removed."""
        ids = list(ids)
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        with self._reading() as c:
            rows = c.execute(
                f"SELECT e.value ->> '$.id' FROM jobs j, json_each(j.edits) e WHERE j.adapter = ? AND j.state = 3 "
                f"AND e.value ->> '$.kind' = 'remove' AND e.value ->> '$.id' IN ({marks}) UNION "
                f"SELECT m.row_id FROM jobs j JOIN job_edits m ON m.job_id = j.id WHERE j.adapter = ? AND j.state = 3 "
                f"AND m.kind = 'remove' AND m.row_id IN ({marks})", (adapter, *ids, adapter, *ids)).fetchall()
        return {r[0] for r in rows}

    def pending_removals(self, adapter: str) -> set[str]:
        """Row ids that queued or running jobs of ``adapter`` are to remove."""
        with self._reading() as c:
            rows = c.execute(
                "SELECT e.value ->> '$.id' FROM jobs j, json_each(j.edits) e WHERE j.adapter = ? "
                "AND j.state IN (1, 2) AND e.value ->> '$.kind' = 'remove' UNION "
                "SELECT m.row_id FROM jobs j JOIN job_edits m ON m.job_id = j.id WHERE j.adapter = ? "
                "AND j.state IN (1, 2) AND m.kind = 'remove'", (adapter, adapter)).fetchall()
        return {r[0] for r in rows}

    # ---- transitions ---------------------------------------------------------------
    def submit(self, adapter: str, request_id: str, payload: RequestPayload, options: dict, fingerprint: str,
               merge: bool, max_rows: int, deadline_seconds: float = 0.0) -> tuple[Job, bool, bool]:
        """Queue a request: join a compatible queued job or start a new one.

        Returns (job, created, merged) once the transaction that queued it is committed
        (fsynced). A request id seen before returns its job unchanged (created False); the
        caller checks the fingerprint first and re-checks it here.
        """
        now = time.time()

        def work(c: sqlite3.Connection) -> tuple[Job, bool, bool]:
            return self._submit_tx(c, adapter, request_id, payload, options, fingerprint, merge, max_rows,
                                   deadline_seconds, now)

        if self.group is not None:
            return self.group.run(work)
        with self._tx() as c:
            return work(c)

    def claim(self, busy_adapters: Iterable[str], current_version) -> Job | None:
        """Take the oldest queued job whose adapter has no running job; mark it running."""
        busy = set(busy_adapters)
        with self._tx() as c:
            running = {r[0] for r in c.execute("SELECT adapter FROM jobs WHERE state = 2")}
            for row in c.execute("SELECT * FROM jobs WHERE state = 1 ORDER BY seq").fetchall():
                if row["adapter"] in running or row["adapter"] in busy:
                    continue
                start = current_version(row["adapter"])
                c.execute(
                    "UPDATE jobs SET state = 2, started_at = ?, attempts = attempts + 1, from_version = ?, to_version = ?, "
                    "stage = 'queued', fraction = 0 WHERE id = ?",
                    (time.time(), start, start + 1, row["id"]),
                )
                return self._job(c.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())
        return None

    # The pool's hooks (sidecar.job_store.JobStore): one computing sidecar holds the store
    # (StoreLock), so its jobs need no lease, no fence and no announcement.
    def renew(self, job_id: str) -> str:
        return "held"

    def release(self, job_id: str) -> None:
        """No lease to forget."""

    def fenced(self, job_id: str, adapter: str, number: int):
        return contextlib.nullcontext()

    def live_jobs(self) -> set[str]:
        return set()

    def announce_version(self, adapter: str, number: int) -> None:
        """Reconcilers read the store's directories: nothing to record."""

    def progress(self, job_id: str, stage: str, fraction: float) -> None:
        with self._lock:
            self._conn.execute("UPDATE jobs SET stage = ?, fraction = ? WHERE id = ? AND state = 2", (stage, fraction, job_id))

    def set_swap(self, job_id: str, checks: list[dict], behind: list[str]) -> None:
        with self._lock:
            self._conn.execute("UPDATE jobs SET swap_checks = ?, replicas_behind = ? WHERE id = ?",
                               (json.dumps(checks), json.dumps(behind), job_id))

    def finish(self, job_id: str, state: State, *, report: JobReport | None = None, error_code: str = "",
               error_message: str = "", to_version: int | None = None, already_erased: list[str] | None = None,
               edits: list[dict] | None = None) -> Job:
        with self._tx() as c:
            sets, args = finish_assignments(state, report, error_code, error_message, to_version, already_erased, edits)
            if c.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*args, job_id)).rowcount != 1:
                raise KeyError(job_id)  # as the PostgreSQL store: nothing was changed
            # The replacement text is not needed any more: drop it (zeroed: secure_delete).
            c.execute("DELETE FROM payloads WHERE job_id = ?", (job_id,))
            if edits is not None:  # the whole list is in the edits column now
                c.execute("DELETE FROM job_edits WHERE job_id = ?", (job_id,))
            job = self._job(c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
        self._checkpoint()
        self._shred(job_id)
        return job

    def requeue(self, job_id: str) -> None:
        """Back to the queue (drain or crash): it starts again from its adapter's current version."""
        with self._tx() as c:
            c.execute("UPDATE jobs SET state = 1, stage = 'queued', fraction = 0, started_at = NULL WHERE id = ?", (job_id,))


def finish_assignments(state: State, report: JobReport | None, error_code: str, error_message: str,
                       to_version: int | None, already_erased: list[str] | None, edits: list[dict] | None,
                       mark: str = "?") -> tuple[str, list]:
    """The SET clause and its arguments that end a job (``mark``: the driver's placeholder)."""
    columns = ["state", "finished_at", "report", "error_code", "error_message", "stage", "fraction"]
    args: list = [int(state), time.time(), json.dumps(report.to_json()) if report is not None else None, error_code,
                  error_message, "done" if state == State.SUCCEEDED else state.name.lower(),
                  1.0 if state == State.SUCCEEDED else 0.0]
    # edits: with the keyed hashes of the rows the job replaced (old_hash)
    for column, value in (("to_version", to_version), ("already_erased", already_erased), ("edits", edits)):
        if value is not None:
            columns.append(column)
            args.append(value if column == "to_version" else json.dumps(value))
    return ", ".join(f"{col} = {mark}" for col in columns), args


class _Submission:
    """One caller's share of a group commit: its work, then its result or its error."""

    def __init__(self, work: Callable[[sqlite3.Connection], Any]):
        self.work = work
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    """Leader/follower group commit for a JobDB's submissions.

    With ``synchronous=FULL`` every COMMIT waits for an fsync (milliseconds), and SQLite
    has one writer at a time: one transaction per submission caps acceptance at one fsync
    per request, and concurrent callers queue behind each other's fsyncs. Here the
    submissions that arrive while a COMMIT is in flight wait; when it is done, the first of
    them leads: it takes every waiting submission and runs them in one ``BEGIN IMMEDIATE``
    transaction, each inside its own SAVEPOINT (one that raises is rolled back alone and
    its error goes to its own caller), in arrival order, so each sees the ones before it
    exactly as if they had run one after another. Then one COMMIT, one fsync, and every
    caller of the batch returns. Nobody returns before the COMMIT that holds its writes:
    durability is that of one transaction per submission.
    """

    def __init__(self, db: "JobDB"):
        self._db = db
        self._cond = threading.Condition()
        self._waiting: list[_Submission] = []
        self._leading = False
        self.commits = 0  # COMMITs done (batches), for tests and the benchmark
        self.submissions = 0

    def run(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """``work(connection)`` inside a transaction; its result once that transaction is committed."""
        mine = _Submission(work)
        with self._cond:
            self._waiting.append(mine)
            while self._leading and not mine.done:
                self._cond.wait()
            lead = not mine.done
            if lead:
                self._leading = True
                batch, self._waiting = self._waiting, []
        if lead:
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()  # the batch's callers return; the next waiter leads
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _commit(self, batch: list[_Submission]) -> None:
        """One transaction for the batch; every submission gets its result or an error."""
        db = self._db
        try:
            with db._lock:
                c = db._conn
                c.execute("BEGIN IMMEDIATE")
                try:
                    for s in batch:
                        c.execute("SAVEPOINT submission")
                        try:
                            s.result = s.work(c)
                        except Exception as e:  # this submission leaves nothing behind; the others go on
                            c.execute("ROLLBACK TO submission")
                            s.error = e
                        c.execute("RELEASE submission")
                    c.execute("COMMIT")
                except BaseException:
                    if c.in_transaction:
                        c.execute("ROLLBACK")
                    raise
                self.commits += 1
                self.submissions += len(batch)
        except BaseException as e:  # BEGIN, a savepoint or COMMIT failed: nothing of the batch is durable
            for s in batch:
                s.result, s.error = None, s.error or e
        finally:
            for s in batch:
                s.done = True
