"""Durable jobs in PostgreSQL: ``sidecar.jobs.JobDB``'s store, shareable by several sidecars.

Same tables, methods and semantics as the SQLite store (``sidecar/jobs.py``): ids, counts,
keyed hashes and reports are kept; the replacement text of a request sits in ``payloads``
only until its job ends. Erased text is never stored.

Concurrency. SQLite has one writer; here transactions run side by side (several connections
of this object, several processes), so every transaction that changes an adapter's queued or
running jobs first takes that adapter's transaction-scoped advisory lock: submissions, merges,
claims, cancels, withdrawals, requeues and finishes of one adapter are serialised exactly as
by SQLite's writer lock, and those of different adapters run in parallel. A submission also
takes the lock of its request id first (always in that order: no deadlock), so one request id
is accepted once even when sent for two adapters at the same time. The statements after a
lock run in READ COMMITTED, so they see every commit made before it. A partial unique index
(one ``state = 2`` row per adapter) backs the one-running-job rule in the database itself.

Leases (a pool of workers). A claim gives the job to this store's ``worker`` with a fencing
token (a sequence: every claim a larger one) and a lease of ``lease_seconds`` on the
database's clock; the worker renews it while it works. A RUNNING job whose lease expired (its
worker died, paused or lost the database) is claimed again by any worker, with a new token.
Every write a worker makes for a job it holds names its token, so a worker that lost the
lease changes nothing; publishing runs inside ``fenced``: one transaction that checks the
token and the lease under the job's row lock and records the version number (unique per
adapter) while the caller renames the version into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from typing import Callable, Iterable, Iterator

import psycopg
from psycopg.rows import dict_row

from eraser.rowhash import RowHasher

from .errors import JobStoreUnavailable, LeaseLost, NotFoundError
from .job_model import Job, RequestPayload, State
from .job_sql import JSON_COLUMNS, SharedSQL, tables
from .payload_keys import PayloadKeys
from .jobs import finish_assignments
from .report import JobReport

log = logging.getLogger("eraser.sidecar")

_SCHEMA = tables("BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "DOUBLE PRECISION", "BOOLEAN NOT NULL DEFAULT FALSE",
                 """,
    worker TEXT NOT NULL DEFAULT '',
    lease_token BIGINT NOT NULL DEFAULT 0,
    lease_until DOUBLE PRECISION""") + """
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_running ON jobs (adapter) WHERE state = 2;
CREATE SEQUENCE IF NOT EXISTS lease_tokens;
CREATE TABLE IF NOT EXISTS versions (
    adapter TEXT NOT NULL,
    number INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    lease_token BIGINT NOT NULL,
    published_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (adapter, number)
);
CREATE TABLE IF NOT EXISTS current_versions (
    adapter TEXT PRIMARY KEY,
    number INTEGER NOT NULL
);
"""
# Reconcilers LISTEN here; the payload is the adapter's name.
CHANNEL = "eraser_versions"
# The database's clock, the one every worker's lease is measured on.
_NOW = "extract(epoch from clock_timestamp())"

# Advisory lock spaces (pg_advisory_xact_lock(space, hashtext(key))). A hash collision only
# serialises two keys that did not need it.
_SCHEMA_LOCK, _REQUEST_LOCK, _ADAPTER_LOCK = 0x45520000, 0x45520001, 0x45520002
# A job row with its request ids (also those retried since: past_requests), in one statement,
# so one snapshot.
_JOB = ("SELECT j.*, ARRAY(SELECT r.request_id FROM (SELECT request_id, created_at FROM requests WHERE job_id = j.id "
        "UNION ALL SELECT request_id, created_at FROM past_requests WHERE job_id = j.id) r ORDER BY r.created_at) "
        "AS request_ids FROM jobs j")


@contextlib.contextmanager
def _available() -> Iterator[None]:
    """The server or the network went away: a domain error (UNAVAILABLE), no driver detail."""
    try:
        yield
    except psycopg.OperationalError as e:
        raise JobStoreUnavailable(f"the job database is unavailable ({type(e).__name__})") from None


class _Pool:
    """A few connections, each used by one thread at a time (psycopg_pool would do; this
    avoids a dependency). A connection that broke or was left inside a transaction is closed."""

    def __init__(self, connect: Callable[[], psycopg.Connection], size: int):
        self._connect = connect
        self._idle: list[psycopg.Connection] = []
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        self._slots.acquire()
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the job store is closed")
                conn = self._idle.pop() if self._idle else None
            # Pinged before each reuse (one round trip): a server restarted since its last use
            # would otherwise fail the caller's transaction, ambiguously if at its COMMIT.
            if conn is not None and not self._alive(conn):
                conn.close()
                conn = None
            if conn is None:
                conn = self._connect()
            try:
                yield conn
            finally:
                reusable = (not conn.closed and not conn.broken
                            and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE)
                with self._lock:
                    if reusable and not self._closed:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()
        finally:
            self._slots.release()

    @staticmethod
    def _alive(conn: psycopg.Connection) -> bool:
        """A pooled connection still answers a query."""
        if conn.closed or conn.broken:
            return False
        try:
            conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresJobDB(SharedSQL):
    """``JobDB`` on PostgreSQL. ``dsn``: a libpq connection string or URI (the database must
    exist; the tables are created on first use). Connections: up to ``pool_size``, opened on
    demand, each transaction on one of them."""

    leases = True
    MARK = "%s"
    JOBS = _JOB

    def __init__(self, dsn: str, hasher: RowHasher, pool_size: int = 8, worker: str = "",
                 lease_seconds: float = 30.0, keys: PayloadKeys | None = None):
        self.dsn = dsn
        self.hasher, self.keys = hasher, keys
        self.worker = worker or uuid.uuid4().hex[:12]
        self.lease_seconds = float(lease_seconds)
        self._held: dict[str, int] = {}  # job id -> the fencing token of this worker's claim
        # JobDB's GroupCommit batches submissions into one SQLite transaction to share its
        # fsync; PostgreSQL already flushes the WAL of concurrent commits together.
        self.group = None
        self._pool = _Pool(self._connect, pool_size)
        with self._tx() as c:
            c.execute("SELECT pg_advisory_xact_lock(%s::int4, 0)", (_SCHEMA_LOCK,))  # two stores starting at once
            for statement in filter(str.strip, _SCHEMA.split(";")):
                c.execute(statement)
        self._scrub()  # a stop between a deletion and its scrub left the text in the table's file
        self._sweep_keys()  # and one between a job's end and its key's shred, the key

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row)
        # JobDB's synchronous=FULL: a COMMIT returns once its WAL is flushed, whatever the
        # server's default says.
        conn.execute("SET synchronous_commit = on")
        return conn

    def close(self) -> None:
        self._pool.close()

    # ---- helpers -------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self, read_only: bool = False) -> Iterator[psycopg.Connection]:
        """One transaction on a connection of the pool: COMMIT on success, ROLLBACK on error.
        Read-only ones are REPEATABLE READ: all their statements see one commit."""
        with _available(), self._pool.connection() as conn, conn.transaction():
            if read_only:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield conn

    def _write(self):
        return self._tx()

    def _read(self):
        return self._tx(read_only=True)

    def _wipe(self) -> None:
        self._scrub()

    @staticmethod
    def _lock_adapter(c: psycopg.Connection, adapter: str) -> None:
        c.execute("SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s))", (_ADAPTER_LOCK, adapter))

    def _lock_job(self, c: psycopg.Connection, job_id: str) -> bool:
        """Take the lock of the job's adapter (a job never changes adapter); False: no such job."""
        row = c.execute("SELECT adapter FROM jobs WHERE id = %s", (job_id,)).fetchone()
        if row is None:
            return False
        self._lock_adapter(c, row["adapter"])
        return True

    def _job(self, row: dict, c) -> Job:
        d = dict(row)
        for k in ("seq", "options_key", "lease_token", "lease_until"):
            d.pop(k)
        for k in JSON_COLUMNS:
            d[k] = json.loads(d[k]) if d[k] is not None else None
        d["state"] = State(d["state"])
        d["report"] = JobReport.from_json(d["report"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        d["request_ids"] = list(d["request_ids"] or [])
        d["request_count"] = len(d["request_ids"])
        d["edits"] = self._merged_edits(c, d["id"], d["edits"])
        return Job(**d)

    def _fence(self, job_id: str) -> tuple[str, tuple]:
        """A WHERE clause (and its arguments) that matches the job only while this worker
        holds it, when it does; for jobs it never claimed (a client's cancel), any row."""
        token = self._held.get(job_id)
        return ("id = %s", (job_id,)) if token is None else ("id = %s AND lease_token = %s", (job_id, token))

    def _scrub(self) -> None:
        """After payloads are deleted. SQLite zeroes their pages (secure_delete) and truncates
        its WAL; PostgreSQL zeroes nothing, so ``VACUUM FULL`` rewrites the (small) table into a
        new file and truncates the old one. Its WAL keeps the text until the segment is recycled."""
        try:
            with self._pool.connection() as conn:
                conn.execute("SET lock_timeout = '5s'")
                try:
                    conn.execute("VACUUM FULL payloads")
                finally:
                    conn.execute("RESET lock_timeout")
        except psycopg.errors.LockNotAvailable:  # busy: the next deletion's scrub catches up
            log.warning("the job database's payload table was busy; its scrub is retried on the next deletion")
        except psycopg.Error as e:  # the deletion is committed: report, do not undo the caller's success
            log.error("the job database's payload table could not be scrubbed (%s); retried on the next deletion", e)

    # ---- queries -------------------------------------------------------------------
    def removed_ids(self, adapter: str, ids: Iterable[str]) -> set[str]:
        """Those of ``ids`` that a succeeded job of ``adapter`` removed."""
        ids = list(ids)
        if not ids:
            return set()
        with self._tx(read_only=True) as c:
            rows = c.execute(
                "SELECT e ->> 'id' AS id FROM jobs j, jsonb_array_elements(j.edits::jsonb) e "
                "WHERE j.adapter = %s AND j.state = 3 AND e ->> 'kind' = 'remove' AND e ->> 'id' = ANY(%s) UNION "
                "SELECT m.row_id AS id FROM jobs j JOIN job_edits m ON m.job_id = j.id WHERE j.adapter = %s "
                "AND j.state = 3 AND m.kind = 'remove' AND m.row_id = ANY(%s)", (adapter, ids, adapter, ids)).fetchall()
        return {r["id"] for r in rows}

    def pending_removals(self, adapter: str) -> set[str]:
        """Row ids that queued or running jobs of ``adapter`` are to remove."""
        with self._tx(read_only=True) as c:
            rows = c.execute(
                "SELECT e ->> 'id' AS id FROM jobs j, jsonb_array_elements(j.edits::jsonb) e "
                "WHERE j.adapter = %s AND j.state IN (1, 2) AND e ->> 'kind' = 'remove' UNION "
                "SELECT m.row_id AS id FROM jobs j JOIN job_edits m ON m.job_id = j.id WHERE j.adapter = %s "
                "AND j.state IN (1, 2) AND m.kind = 'remove'", (adapter, adapter)).fetchall()
        return {r["id"] for r in rows}

    # ---- transitions ---------------------------------------------------------------
    def submit(self, adapter: str, request_id: str, payload: RequestPayload, options: dict, fingerprint: str,
               merge: bool, max_rows: int, deadline_seconds: float = 0.0) -> tuple[Job, bool, bool]:
        """Queue a request: join a compatible queued job or start a new one.

        Returns (job, created, merged) once the transaction that queued it is committed
        (its WAL flushed). A request id seen before returns its job unchanged (created False);
        the caller checks the fingerprint first and re-checks it here.
        """
        now = time.time()
        with self._tx() as c:
            c.execute("SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s))", (_REQUEST_LOCK, request_id))
            self._lock_adapter(c, adapter)
            return self._submit_tx(c, adapter, request_id, payload, options, fingerprint, merge, max_rows,
                                   deadline_seconds, now)

    def claim(self, busy_adapters: Iterable[str], current_version) -> Job | None:
        """Take the oldest queued job whose adapter has no running job, or a running job whose
        lease expired (its worker is gone: taken over); mark it running under this worker's
        lease. An adapter whose lock another transaction holds is skipped (like SKIP LOCKED):
        its jobs are taken by a later claim."""
        busy = set(busy_adapters)
        with self._tx() as c:
            live = {r["adapter"] for r in c.execute(f"SELECT adapter FROM jobs WHERE state = 2 AND lease_until >= {_NOW}")}
            tried: set[str] = set()
            for row in c.execute(f"SELECT id, adapter FROM jobs WHERE state = 1 OR (state = 2 AND lease_until < {_NOW}) "
                                 "ORDER BY state DESC, seq").fetchall():
                adapter = row["adapter"]
                if adapter in live or adapter in busy or adapter in tried:
                    continue
                tried.add(adapter)
                if not c.execute("SELECT pg_try_advisory_xact_lock(%s::int4, hashtext(%s)) AS ok",
                                 (_ADAPTER_LOCK, adapter)).fetchone()["ok"]:
                    continue
                # Under the lock, a fresh look: the list above may predate a claim, a renewal or a cancel.
                first = c.execute(f"SELECT id, state, lease_until < {_NOW} AS expired FROM jobs WHERE adapter = %s "
                                  "AND state IN (1, 2) ORDER BY state DESC, seq LIMIT 1", (adapter,)).fetchone()
                if first is None or (first["state"] == State.RUNNING and not first["expired"]):
                    continue
                if first["state"] == State.RUNNING:
                    log.warning("job %s: its worker's lease expired; taken over by %s", first["id"], self.worker)
                start = current_version(adapter)
                token = c.execute(
                    f"UPDATE jobs SET state = 2, started_at = {_NOW}, attempts = attempts + 1, from_version = %s, "
                    "to_version = %s, stage = 'queued', fraction = 0, worker = %s, lease_token = nextval('lease_tokens'), "
                    f"lease_until = {_NOW} + %s WHERE id = %s RETURNING lease_token",
                    (start, start + 1, self.worker, self.lease_seconds, first["id"])).fetchone()["lease_token"]
                self._held[first["id"]] = token
                return self._get(c, first["id"])
        return None

    def renew(self, job_id: str) -> str:
        """Extend this worker's lease on a job it holds. Returns "held", "cancel" (held, and a
        client asked to cancel it, possibly through another sidecar) or "lost" (another worker
        took the job over, or it ended): the worker must stop it."""
        token = self._held.get(job_id)
        if token is None:
            return "lost"
        with self._tx() as c:
            row = c.execute(f"UPDATE jobs SET lease_until = {_NOW} + %s WHERE id = %s AND state = 2 "
                            "AND lease_token = %s RETURNING cancel_requested",
                            (self.lease_seconds, job_id, token)).fetchone()
        return "lost" if row is None else "cancel" if row["cancel_requested"] else "held"

    def release(self, job_id: str) -> None:
        """This worker is done with the job (ended, requeued or lost): forget its token."""
        self._held.pop(job_id, None)

    @contextlib.contextmanager
    def fenced(self, job_id: str, adapter: str, number: int) -> Iterator[None]:
        """Publish ``number`` of ``adapter`` for a job this worker holds: the body (the rename
        into place) runs inside one transaction that holds the adapter's lock and the job's
        row, has checked the token and the lease, and records the version; the commit is the
        fence. LeaseLost: another worker holds the job (nothing was recorded).

        A worker paused inside the body keeps the row locked: the server ends its session
        after ``lease_seconds`` idle, so the job can be taken over and this commit fails."""
        token = self._held.get(job_id)
        with _available(), self._pool.connection() as conn, conn.transaction():
            conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = {max(1, int(self.lease_seconds * 1000))}")
            self._lock_adapter(conn, adapter)
            row = conn.execute(f"SELECT lease_token, state, lease_until >= {_NOW} AS live FROM jobs WHERE id = %s "
                               "FOR UPDATE", (job_id,)).fetchone()
            if token is None or row is None or row["state"] != State.RUNNING or row["lease_token"] != token \
                    or not row["live"]:
                raise LeaseLost(f"job {job_id}: this worker's lease was lost; another worker holds the job")
            try:
                conn.execute(f"INSERT INTO versions (adapter, number, job_id, lease_token, published_at) "
                             f"VALUES (%s, %s, %s, %s, {_NOW})", (adapter, number, job_id, token))
            except psycopg.errors.UniqueViolation:
                raise LeaseLost(f"version {number} of {adapter!r} was published by another job") from None
            self._announce(conn, adapter, number)  # delivered at the commit, with the version
            yield

    @staticmethod
    def _announce(c: psycopg.Connection, adapter: str, number: int) -> None:
        c.execute("INSERT INTO current_versions (adapter, number) VALUES (%s, %s) ON CONFLICT (adapter) DO UPDATE "
                  "SET number = EXCLUDED.number", (adapter, number))
        c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, adapter))

    def announce_version(self, adapter: str, number: int) -> None:
        """``number`` is ``adapter``'s current version (a registration, a rollback, a recovery):
        recorded for the reconcilers, who are notified."""
        with self._tx() as c:
            self._lock_adapter(c, adapter)
            self._announce(c, adapter, number)

    def published_versions(self, adapter: str) -> list[tuple[int, str]]:
        """The versions recorded at publish, oldest first: (number, job id)."""
        with self._tx(read_only=True) as c:
            return [(r["number"], r["job_id"]) for r in c.execute(
                "SELECT number, job_id FROM versions WHERE adapter = %s ORDER BY number", (adapter,))]

    def live_jobs(self) -> set[str]:
        """Ids of running jobs whose lease has not expired (their staging is in use)."""
        with self._tx(read_only=True) as c:
            return {r["id"] for r in c.execute(f"SELECT id FROM jobs WHERE state = 2 AND lease_until >= {_NOW}")}

    def progress(self, job_id: str, stage: str, fraction: float) -> None:
        """Best effort: a database that is away for a moment does not stop the job (its
        lease and the fence at publish decide whether its work counts)."""
        where, args = self._fence(job_id)
        try:
            with self._tx() as c:
                c.execute(f"UPDATE jobs SET stage = %s, fraction = %s WHERE {where} AND state = 2", (stage, fraction, *args))
        except JobStoreUnavailable:
            log.warning("job %s: progress not recorded (the job database is unavailable)", job_id)

    def set_swap(self, job_id: str, checks: list[dict], behind: list[str]) -> None:
        where, args = self._fence(job_id)
        with self._tx() as c:
            c.execute(f"UPDATE jobs SET swap_checks = %s, replicas_behind = %s WHERE {where}",
                      (json.dumps(checks), json.dumps(behind), *args))

    def finish(self, job_id: str, state: State, *, report: JobReport | None = None, error_code: str = "",
               error_message: str = "", to_version: int | None = None, already_erased: list[str] | None = None,
               edits: list[dict] | None = None) -> Job:
        where, fence = self._fence(job_id)
        with self._tx() as c:
            if not self._lock_job(c, job_id):
                raise KeyError(job_id)
            sets, args = finish_assignments(state, report, error_code, error_message, to_version, already_erased, edits,
                                            mark="%s")
            if c.execute(f"UPDATE jobs SET {sets}, lease_until = NULL WHERE {where}", (*args, *fence)).rowcount != 1:
                self.release(job_id)
                raise LeaseLost(f"job {job_id}: this worker's lease was lost; another worker holds the job")
            # The replacement text is not needed any more: drop it (then scrubbed).
            c.execute("DELETE FROM payloads WHERE job_id = %s", (job_id,))
            if edits is not None:  # the whole list is in the edits column now
                c.execute("DELETE FROM job_edits WHERE job_id = %s", (job_id,))
            job = self._get(c, job_id)
        self.release(job_id)
        self._scrub()
        self._shred(job_id)
        return job

    def requeue(self, job_id: str) -> None:
        """Back to the queue (drain or crash): it starts again from its adapter's current version."""
        where, args = self._fence(job_id)
        with self._tx() as c:
            if self._lock_job(c, job_id):
                c.execute("UPDATE jobs SET state = 1, stage = 'queued', fraction = 0, started_at = NULL, "
                          f"lease_until = NULL WHERE {where} AND state = 2", args)
        self.release(job_id)


class VersionFeed:
    """The adapters' current versions as a reconciler reads them from the job database, and a
    wake-up whenever one changes (LISTEN/NOTIFY): no polling of the store's directories across
    a network filesystem. Same reading interface as ``AdapterStore`` (names, current_number)."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._pool = _Pool(lambda: psycopg.connect(dsn, autocommit=True, row_factory=dict_row), 2)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def names(self) -> list[str]:
        with _available(), self._pool.connection() as c:
            return [r["adapter"] for r in c.execute("SELECT adapter FROM current_versions ORDER BY adapter")]

    def current_number(self, name: str) -> int:
        with _available(), self._pool.connection() as c:
            row = c.execute("SELECT number FROM current_versions WHERE adapter = %s", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no adapter named {name!r}")
        return row["number"]

    def listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` on every change, from a thread; reconnect (and wake, as changes may
        have been missed) after the database was away."""
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    with psycopg.connect(self.dsn, autocommit=True) as conn:
                        conn.execute(f"LISTEN {CHANNEL}")
                        wake()
                        while not self._stop.is_set():
                            for _ in conn.notifies(timeout=1.0, stop_after=1):
                                wake()
                except psycopg.Error as e:
                    log.warning("version notifications interrupted (%s); reconnecting", type(e).__name__)
                    self._stop.wait(1.0)

        self._thread = threading.Thread(target=loop, name="eraser-version-feed", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.close()
