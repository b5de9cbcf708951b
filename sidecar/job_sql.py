"""The statements both job stores run the same way (SQLite in ``sidecar.jobs``, PostgreSQL in
``sidecar.pg_jobs``), written once.

A store mixes ``SharedSQL`` in and gives it: ``MARK`` (its driver's placeholder), ``JOBS`` and
``_job(row, c)`` (its SELECT of job rows, and a Job of one), ``_write()`` and ``_read()`` (a
connection inside a write or a read transaction; rows readable by column name),
``_lock_adapter(c, adapter)`` and ``_lock_job(c, job_id)`` (what serialises an adapter's
transitions across processes: nothing more on SQLite, whose writer lock already does), and
``_wipe()`` (after payloads were deleted: SQLite's TRUNCATE checkpoint,
PostgreSQL's table rewrite), and ``keys`` (``sidecar.payload_keys.PayloadKeys`` that seals each
job's payloads, or None: stored as they are). The tables both keep are ``tables()`` in the
store's column types. What differs stays in each store: its own tables, claims and leases, the
JSON queries, finishing a job (which calls ``_shred(job_id)`` after it).
"""

from __future__ import annotations

import json
import time
import uuid

from .job_model import RETRYABLE, Job, RequestPayload, State, _counts, _merge_edits
from .payload_keys import PayloadKeys

# A key whose job never got a row (its submission rolled back) is swept after this long: a
# submission that is writing its first payload has created the key but not committed yet.
ORPHAN_KEY_SECONDS = 3600.0

# One request's payload rows in submission order (its requests' sequence).
_PAYLOAD_BODIES = ("SELECT p.body FROM payloads p JOIN requests r ON r.request_id = p.request_id "
                   "WHERE p.job_id = ? ORDER BY r.seq")


# The tables both stores keep, in each dialect's types: {seq} an identity key, {real} a float,
# {flag} a boolean that starts false; {job_columns} the jobs table's columns of one store alone.
_TABLES = """
CREATE TABLE IF NOT EXISTS jobs (
    seq {seq},
    id TEXT UNIQUE NOT NULL,
    adapter TEXT NOT NULL,
    state INTEGER NOT NULL,
    options TEXT NOT NULL,
    options_key TEXT NOT NULL,
    counts TEXT NOT NULL,
    edits TEXT NOT NULL,
    from_version INTEGER NOT NULL DEFAULT 0,
    to_version INTEGER NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    fraction {real} NOT NULL DEFAULT 0,
    report TEXT,
    error_code TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    created_at {real} NOT NULL,
    started_at {real},
    finished_at {real},
    deadline_at {real},
    attempts INTEGER NOT NULL DEFAULT 0,
    already_erased TEXT NOT NULL DEFAULT '[]',
    cancel_requested {flag},
    replicas_behind TEXT NOT NULL DEFAULT '[]',
    swap_checks TEXT NOT NULL DEFAULT '[]'{job_columns}
);
CREATE INDEX IF NOT EXISTS jobs_adapter_state ON jobs (adapter, state);
CREATE TABLE IF NOT EXISTS requests (
    seq {seq},
    request_id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_job ON requests (job_id);
CREATE TABLE IF NOT EXISTS past_requests (
    seq {seq},
    request_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS past_requests_job ON past_requests (job_id);
CREATE TABLE IF NOT EXISTS payloads (
    request_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS payloads_job ON payloads (job_id);
CREATE TABLE IF NOT EXISTS job_edits (
    seq {seq},
    job_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    row_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    new_hash TEXT
);
CREATE INDEX IF NOT EXISTS job_edits_job_row ON job_edits (job_id, row_id);
CREATE TABLE IF NOT EXISTS deletions (
    seq {seq},
    adapter TEXT NOT NULL,
    deleted_at {real} NOT NULL,
    how TEXT NOT NULL,
    versions TEXT NOT NULL,
    factor_caches TEXT NOT NULL,
    payload_rows INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS deletions_adapter ON deletions (adapter);
"""
# A job's edits are its ``edits`` column (its first request's, or all of them once the job
# ended or a request left it) followed by the ``job_edits`` rows of the requests merged into it
# since: a merge inserts its own rows instead of rewriting a list that grows with every merge.
# The job columns that hold JSON.
JSON_COLUMNS = ("options", "counts", "edits", "report", "already_erased", "replicas_behind", "swap_checks")


def tables(seq: str, real: str, flag: str, job_columns: str = "") -> str:
    """The shared tables' statements in one dialect (``_TABLES``)."""
    return _TABLES.format(seq=seq, real=real, flag=flag, job_columns=job_columns)


class SharedSQL:
    MARK = "?"
    # The store's SELECT of job rows, the jobs table named ``j``; ``_job(row, c)`` makes a Job of one.
    JOBS = "SELECT * FROM jobs j"
    keys: PayloadKeys | None = None

    def _q(self, sql: str) -> str:
        return sql if self.MARK == "?" else sql.replace("?", self.MARK)

    # ---- queries -------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._read() as c:
            return self._get(c, job_id)

    def _get(self, c, job_id: str) -> Job | None:
        row = c.execute(self._q(self.JOBS + " WHERE j.id = ?"), (job_id,)).fetchone()
        return self._job(row, c) if row else None

    def list(self, adapter: str | None = None, state: State | None = None, limit: int = 100) -> list[Job]:
        sql, args = self.JOBS + " WHERE 1=1", []
        if adapter:
            sql += " AND j.adapter = ?"
            args.append(adapter)
        if state:
            sql += " AND j.state = ?"
            args.append(int(state))
        sql += " ORDER BY j.seq DESC LIMIT ?"
        args.append(limit)
        with self._read() as c:
            return [self._job(r, c) for r in c.execute(self._q(sql), args).fetchall()]

    def by_request(self, request_id: str) -> tuple[Job, str] | None:
        with self._read() as c:
            row = c.execute(self._q("SELECT job_id, fingerprint FROM requests WHERE request_id = ?"),
                            (request_id,)).fetchone()
            return (self._get(c, row["job_id"]), row["fingerprint"]) if row else None

    def active_count(self, adapter: str | None = None) -> dict[State, int]:
        sql = ("SELECT state, COUNT(*) AS n FROM jobs WHERE state IN (1, 2)" + (" AND adapter = ?" if adapter else "")
               + " GROUP BY state")
        with self._read() as c:
            counts = {r["state"]: r["n"] for r in c.execute(self._q(sql), (adapter,) if adapter else ()).fetchall()}
        return {State.QUEUED: counts.get(1, 0), State.RUNNING: counts.get(2, 0)}

    def payload_rows(self, job_id: str) -> int:
        with self._read() as c:
            return c.execute(self._q("SELECT COUNT(*) AS n FROM payloads WHERE job_id = ?"), (job_id,)).fetchone()["n"]

    def deletions(self, adapter: str) -> list[dict]:
        """What was deleted of an adapter's history, oldest first: {deleted_at, how (purge |
        retention), versions, factor_caches [[version, method]], payload_rows}."""
        with self._read() as c:
            rows = c.execute(self._q("SELECT deleted_at, how, versions, factor_caches, payload_rows FROM deletions "
                                     "WHERE adapter = ? ORDER BY seq"), (adapter,)).fetchall()
        return [{"deleted_at": r["deleted_at"], "how": r["how"], "versions": json.loads(r["versions"]),
                 "factor_caches": json.loads(r["factor_caches"]), "payload_rows": r["payload_rows"]} for r in rows]

    def payloads(self, job_id: str) -> list[RequestPayload]:
        with self._read() as c:
            rows = c.execute(self._q(_PAYLOAD_BODIES), (job_id,)).fetchall()
        return [self._unseal(job_id, r["body"]) for r in rows]

    # ---- sealed payloads (sidecar.payload_keys) ------------------------------------
    def _seal(self, job_id: str, payload: RequestPayload) -> str:
        """Sealed where it carries text (a removal carries row ids only, as the job's record does:
        no key, no key file's fsyncs on the acceptance path)."""
        text = json.dumps(payload.to_json())
        carries_text = payload.modify_query or payload.correct_response
        return self.keys.seal(job_id, text) if self.keys is not None and carries_text else text

    def _unseal(self, job_id: str, body: str) -> RequestPayload:
        return RequestPayload.from_json(json.loads(self.keys.open(job_id, body) if self.keys is not None else body))

    def _shred(self, job_id: str) -> None:
        """After the job's payloads were deleted (committed): its key goes, and with it every
        copy of their text the database's logs still hold."""
        if self.keys is not None:
            self.keys.shred(job_id)

    def _sweep_keys(self) -> None:
        """Shred the keys of ended jobs (a stop between a job's end and its shred) and of
        submissions that never committed."""
        if self.keys is None:
            return
        held = set(self.keys.held())
        if not held:
            return
        with self._read() as c:
            rows = {r["id"]: r["state"] for r in c.execute("SELECT id, state FROM jobs").fetchall() if r["id"] in held}
        old = set(self.keys.held(older_than=ORPHAN_KEY_SECONDS))
        for job_id in sorted(held):
            if rows.get(job_id, 0) in (State.SUCCEEDED, State.FAILED, State.CANCELLED) or (
                    job_id not in rows and job_id in old):
                self.keys.shred(job_id)

    # ---- transitions ---------------------------------------------------------------
    def _submit_tx(self, c, adapter: str, request_id: str, payload: RequestPayload, options: dict, fingerprint: str,
                   merge: bool, max_rows: int, deadline_seconds: float, now: float) -> tuple[Job, bool, bool]:
        """``submit``'s writes, inside a transaction the caller owns (holding what the store
        needs held): join a compatible queued job or start one. Returns (job, created, merged);
        a request id seen before returns its job unchanged (created False)."""
        q = self._q
        options_key = json.dumps(options, sort_keys=True)
        seen = c.execute(q("SELECT r.job_id, j.state FROM requests r JOIN jobs j ON j.id = r.job_id "
                           "WHERE r.request_id = ?"), (request_id,)).fetchone()
        if seen and seen["state"] in RETRYABLE:  # it ended without effect: the id is free for a new submission
            c.execute(q("INSERT INTO past_requests (request_id, job_id, fingerprint, created_at) SELECT request_id, "
                        "job_id, fingerprint, created_at FROM requests WHERE request_id = ?"), (request_id,))
            c.execute(q("DELETE FROM requests WHERE request_id = ?"), (request_id,))
        elif seen:
            return self._get(c, seen["job_id"]), False, False
        target = self._merge_target(c, adapter, options_key, payload, max_rows, deadline_seconds) if merge else None
        edits = payload.public_edits(self.hasher)
        if target is not None:
            job_id, counts, present = target
            added = [e for e in edits if not (e["kind"] == "remove" and e["id"] in present)]  # removed once
            for e in added:
                c.execute(q("INSERT INTO job_edits (job_id, request_id, row_id, kind, new_hash) VALUES (?, ?, ?, ?, ?)"),
                          (job_id, request_id, e["id"], e["kind"], e.get("new_hash")))
            more = _counts(added)
            c.execute(q("UPDATE jobs SET counts = ? WHERE id = ?"),
                      (json.dumps({k: counts.get(k, 0) + more[k] for k in more}), job_id))
        else:
            job_id = uuid.uuid4().hex
            c.execute(q("INSERT INTO jobs (id, adapter, state, options, options_key, counts, edits, created_at, "
                        "deadline_at) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?)"),
                      (job_id, adapter, json.dumps(options), options_key, json.dumps(_counts(edits)), json.dumps(edits),
                       now, now + deadline_seconds if deadline_seconds else None))
        c.execute(q("INSERT INTO requests (request_id, job_id, fingerprint, created_at) VALUES (?, ?, ?, ?)"),
                  (request_id, job_id, fingerprint, now))
        c.execute(q("INSERT INTO payloads (request_id, job_id, body) VALUES (?, ?, ?)"),
                  (request_id, job_id, self._seal(job_id, payload)))
        if target is None:
            return self._get(c, job_id), True, False
        return self._joined(c, job_id, request_id, edits), True, True

    def _joined(self, c, job_id: str, request_id: str, edits: list[dict]) -> Job:
        """A queued job as the reply to a request that joined it: the job's counts and number of
        requests, with the request's own id and edits, not every request's (a list that grows
        with every merge: reading it back made a burst of n merges cost O(n²))."""
        row = c.execute(self._q("SELECT id, adapter, state, options, counts, created_at, deadline_at FROM jobs "
                                "WHERE id = ?"), (job_id,)).fetchone()
        count = c.execute(self._q("SELECT COUNT(*) AS n FROM requests WHERE job_id = ?"), (job_id,)).fetchone()["n"]
        return Job(id=row["id"], adapter=row["adapter"], state=State(row["state"]), options=json.loads(row["options"]),
                   created_at=row["created_at"], deadline_at=row["deadline_at"], counts=json.loads(row["counts"]),
                   request_ids=[request_id], edits=edits, request_count=count)

    def _merge_target(self, c, adapter: str, options_key: str, payload: RequestPayload, max_rows: int,
                      deadline_seconds: float) -> tuple[str, dict, set[str]] | None:
        """The queued job this request joins, if any: the adapter's newest queued job with the
        same options, no deadline and no edit of the same rows. Returns (its id, its counts, which
        of the request's rows it already has); reads only those rows, whatever the job's size."""
        if deadline_seconds:  # a request with a deadline runs alone
            return None
        row = c.execute(self._q("SELECT id, edits, counts FROM jobs WHERE adapter = ? AND state = 1 AND options_key = ? "
                                "AND cancel_requested = FALSE AND deadline_at IS NULL ORDER BY seq DESC LIMIT 1"),
                        (adapter, options_key)).fetchone()
        if row is None:
            return None
        kinds = self._kinds_of(c, row["id"], json.loads(row["edits"]), payload.ids)
        edited = {i for i, k in kinds.items() if k != "remove"}
        # Two edits of one row cannot be summed into one solve; removals can.
        if (payload.edited_ids & set(kinds)) or (payload.ids & edited):
            return None
        # The job's distinct rows: removals are counted once and an edited row is nowhere else.
        counts = json.loads(row["counts"])
        if sum(counts.values()) + len(payload.ids - set(kinds)) > max_rows:
            return None
        return row["id"], counts, set(kinds)

    def _kinds_of(self, c, job_id: str, listed: list[dict], ids: set[str]) -> dict[str, str]:
        """Of ``ids``, those the job edits already, with the kind of their edit (an edit over a
        removal where both are listed)."""
        found = {e["id"]: e["kind"] for e in listed if e["id"] in ids}
        wanted = sorted(ids)
        for i in range(0, len(wanted), 500):  # bounded statements: a request may name many rows
            chunk = wanted[i:i + 500]
            marks = ",".join(["?"] * len(chunk))
            for r in c.execute(self._q(f"SELECT row_id, kind FROM job_edits WHERE job_id = ? AND row_id IN ({marks})"),
                               (job_id, *chunk)).fetchall():
                if found.get(r["row_id"], "remove") == "remove":
                    found[r["row_id"]] = r["kind"]
        return found

    def _merged_edits(self, c, job_id: str, listed: list[dict]) -> list[dict]:
        """The job's edits: its ``edits`` column, then the rows merged requests added."""
        more = c.execute(self._q("SELECT row_id, kind, new_hash FROM job_edits WHERE job_id = ? ORDER BY seq"),
                         (job_id,)).fetchall()
        return listed + [{"id": r["row_id"], "kind": r["kind"], **({"new_hash": r["new_hash"]} if r["new_hash"] else {})}
                         for r in more]

    def queued_removal_count(self, adapter: str) -> int:
        """The removals of ``adapter``'s queued and running jobs, counted per job (a row two
        jobs remove counts twice): a bound read from each job's counts, not its edits."""
        with self._read() as c:
            rows = c.execute(self._q("SELECT counts FROM jobs WHERE adapter = ? AND state IN (1, 2)"),
                             (adapter,)).fetchall()
        return sum(json.loads(r["counts"])["remove"] for r in rows)

    def record_deletion(self, adapter: str, how: str, versions: list[int], factor_caches: list[tuple[int, str]],
                        deleted_at: float, purge_payloads: bool = False) -> int:
        """Record that versions and factor caches of ``adapter`` were deleted (``how``: purge
        or retention); with ``purge_payloads``, delete the payloads ended jobs left, in the same
        transaction. Returns the payload rows deleted."""
        with self._write() as c:
            self._lock_adapter(c, adapter)
            payload_rows = 0
            if purge_payloads:
                payload_rows = c.execute(self._q("DELETE FROM payloads WHERE job_id IN (SELECT id FROM jobs WHERE "
                                                 "adapter = ? AND state IN (3, 4, 5))"), (adapter,)).rowcount
            if not (versions or factor_caches or payload_rows):
                return 0
            c.execute(self._q("INSERT INTO deletions (adapter, deleted_at, how, versions, factor_caches, payload_rows) "
                              "VALUES (?, ?, ?, ?, ?, ?)"),
                      (adapter, deleted_at, how, json.dumps(versions), json.dumps([list(fc) for fc in factor_caches]),
                       payload_rows))
        if payload_rows:
            self._wipe()
            self._sweep_keys()
        return payload_rows

    def withdraw(self, job_id: str, request_id: str) -> Job | None:
        """Take one request out of a queued job that serves others too; the job's edits are
        those of the requests left. None when the job is no longer queued."""
        q = self._q
        with self._write() as c:
            if not self._lock_job(c, job_id):
                return None
            row = c.execute(q("SELECT state FROM jobs WHERE id = ?"), (job_id,)).fetchone()
            if row is None or row["state"] != State.QUEUED:
                return None
            c.execute(q("DELETE FROM requests WHERE request_id = ? AND job_id = ?"), (request_id, job_id))
            c.execute(q("DELETE FROM payloads WHERE request_id = ? AND job_id = ?"), (request_id, job_id))
            edits: list[dict] = []
            for r in c.execute(q(_PAYLOAD_BODIES), (job_id,)).fetchall():
                edits = _merge_edits(edits, self._unseal(job_id, r["body"]).public_edits(self.hasher))
            c.execute(q("UPDATE jobs SET edits = ?, counts = ? WHERE id = ?"),
                      (json.dumps(edits), json.dumps(_counts(edits)), job_id))
            c.execute(q("DELETE FROM job_edits WHERE job_id = ?"), (job_id,))  # all in the column now
            job = self._get(c, job_id)
        self._wipe()
        return job

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now; flag a running one (its runner stops at the next step)."""
        q = self._q
        with self._write() as c:
            if not self._lock_job(c, job_id):
                return None
            row = c.execute(q("SELECT state FROM jobs WHERE id = ?"), (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] == State.QUEUED:
                c.execute(q("UPDATE jobs SET state = 5, finished_at = ?, stage = 'cancelled', cancel_requested = TRUE, "
                            "error_code = 'CANCELLED', error_message = 'cancelled by a client before it started' "
                            "WHERE id = ?"), (time.time(), job_id))
                c.execute(q("DELETE FROM payloads WHERE job_id = ?"), (job_id,))
            elif row["state"] == State.RUNNING:
                c.execute(q("UPDATE jobs SET cancel_requested = TRUE WHERE id = ?"), (job_id,))
            job = self._get(c, job_id)
        if job.state == State.CANCELLED:
            self._wipe()
            self._shred(job_id)
        return job
