"""The sidecar's domain: register adapters, accept erase requests, run jobs, roll back.

No gRPC here: ``server.py`` translates between protobuf and these calls, and maps the
typed errors raised here to status codes in one place (``errors.status_of``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import unicodedata
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from eraser import options as defaults
from eraser.data import load_rows
from eraser.errors import DataError, EraserError, InvalidRequestError, quote_ids
from eraser.model import base_fingerprint, check_adapter_dir, load_adapter, load_base, read_adapter_meta, resolve_device
from eraser.requests import UnlearningRequest
from eraser.verify import VerifyConfig, load_holdout

from .config import SidecarConfig
from .errors import (
    FailedPreconditionError,
    JobCancelled,
    NotFoundError,
    AlreadyExistsError,
    ShuttingDown,
)
from .factors import FACTOR_METHODS, FactorPreparer, FactorTarget, fitted_at
from .imports import ImportRoots
from .job_store import JobStore
from .job_model import RETRYABLE, Job, RequestPayload, State
from .jobs import JobDB
from .report import JobReport, Utility, Verification
from .receipts import ReceiptSigner, SignedReceipt, build_receipt, timestamp
from .serving import VLLMBackend
from .runner import EMPTYING, JobRunner
from .solver_choice import SolverChooser, resolve_options, verify_policy
from .store import (ADAPTER_DIR, DATASET, AdapterRecord, AdapterStore, Deleted, StoreLock, Version, check_adapter_name,
                    file_sha256)
from .swap import SwapHooks, SwapResult, Swapper

log = logging.getLogger("eraser.sidecar")

MAX_LIST_JOBS = 1000  # a longer list could outgrow gRPC's 4 MiB message limit


@dataclass(frozen=True)
class AdapterView:
    """What a client is told of an adapter: its current (or given) version, its record, the
    versions still kept, where each replica serves it, and its verification policy."""

    version: Version
    record: AdapterRecord
    retained_versions: list[int]
    replicas: list
    verify: str

class Hooks(SwapHooks):
    """What the service tells the outside world (metrics, health)."""

    def job_accepted(self, job: Job, merged: bool) -> None: ...
    def job_finished(self, job: Job) -> None: ...
    def version_published(self, adapter: str, version: Version) -> None: ...
    def queue_changed(self, queued: int, running: int) -> None: ...
    # A factor cache was written: a full fit (``kind`` "full") or a downdate.
    def factors_fitted(self, adapter: str, kind: str, seconds: float) -> None: ...
    # The last full fit of the current version's factors (None: it has none).
    def factors_age(self, adapter: str, fitted_at: float | None) -> None: ...
    # A job's erased rows were verified, whether the job then published or failed.
    def verification_finished(self, adapter: str, verification: Verification) -> None: ...
    # An update's utility check ran, passed or not.
    def utility_checked(self, adapter: str, utility: Utility) -> None: ...


# Control characters, line and paragraph separators, bidirectional and other format marks.
_UNPRINTABLE = {"Cc", "Cf", "Zl", "Zp"}


def check_printable(what: str, ids) -> None:
    """Refuse ids with control characters: ids go into logs, job records and terminal
    output, where a newline or a bidi mark would forge or hide lines."""
    bad = sum(1 for i in ids if any(unicodedata.category(c) in _UNPRINTABLE for c in i))
    if bad:
        raise InvalidRequestError(f"{what}: {bad} id(s) contain control or format characters (newlines, tabs, ...)")


@contextlib.contextmanager
def _client_paths(paths: dict[Path, str]):
    """Errors about staged copies name the paths the client gave, not the store's."""
    try:
        yield
    except EraserError as e:
        message = str(e)
        for staged, given in paths.items():
            message = message.replace(str(staged), given)
        if message == str(e):
            raise
        raise type(e)(message) from None


@dataclass(frozen=True)
class Purge:
    """What one PurgeHistory deleted, and when."""

    adapter: str
    deleted: Deleted
    payload_rows: int
    purged_at: float
    retained_versions: list[int]


class EraserService:
    def __init__(self, config: SidecarConfig, hooks: Hooks | None = None):
        self.config = config
        self.hooks = hooks or Hooks()
        self.store = AdapterStore(config.store)
        self.imports = ImportRoots(config.import_roots, config.store)
        self.computes = config.role == "compute"
        self.instance = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"  # names this sidecar's serving report and leases
        # Only computing sidecars use the job database; reconcilers read the store. On SQLite
        # one of them owns the store; on PostgreSQL a pool shares it.
        self._lock_file = StoreLock(self.store.root) if self.computes and not config.jobs else None
        self.db: JobStore | None = self._open_jobs(config) if self.computes else None
        # The configured key, else the store's (created with it, like the row-hash key); only the
        # computing sidecar issues receipts.
        self.signer = (config.receipt_signer or self.store.receipt_signer) if self.computes else None
        self.device = resolve_device(config.device)
        self.changed = threading.Condition()
        self._listeners: list[Callable[[], None]] = []
        self._workers: list[threading.Thread] = []
        backends = [VLLMBackend(url, api_key=config.vllm_api_key) for url in config.vllm_urls]
        # A reconciler of a pool reads current versions from the job database, told of each change.
        self.versions = self._version_feed(config) if not self.computes and config.jobs else None
        self.swapper = Swapper(backends, self.store, str(self.device), config.probe_tolerance, self.hooks,
                               versions=self.versions)
        # Factor caches for ekfac/kfac, fitted in the background (compute role only).
        self.factors = FactorPreparer(self.store, self.device, on_fitted=self._full_fit_done,
                                      on_ready=lambda target: self.report_factor_age(target.adapter),
                                      processes=config.factor_fit_processes,
                                      min_rows_per_process=config.factor_fit_min_rows)
        self.solvers = SolverChooser(self.store, self.factors, config, self.report_factor_age)
        self._age_lock = threading.Lock()
        self.runner = JobRunner(self)  # the job worker (compute role): claims, runs, publishes, swaps

    def _open_jobs(self, config: SidecarConfig) -> JobStore:
        if not config.jobs:
            return JobDB(Path(config.store) / "jobs.sqlite3", self.store.row_hasher, config.group_commit,
                         self.store.payload_keys)
        import psycopg

        from .pg_jobs import PostgresJobDB

        try:
            return PostgresJobDB(config.jobs, self.store.row_hasher, worker=self.instance,
                                 lease_seconds=config.lease_seconds, keys=self.store.payload_keys)
        except psycopg.Error as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise FailedPreconditionError(f"the job database cannot be used ({type(e).__name__}: {first})") from None

    @staticmethod
    def _version_feed(config: SidecarConfig):
        from .pg_jobs import VersionFeed

        return VersionFeed(config.jobs)

    def announce(self, name: str, version: Version) -> None:
        """``version`` is ``name``'s current one: recorded for the pool's reconcilers, counted."""
        self.db.announce_version(name, version.number)
        self.hooks.version_published(name, version)

    # ---- lifecycle -----------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Bring the store and the job table to a consistent state after any stop.

        A job left RUNNING by a crash either published its version (the rename happened:
        finish it), or did not (requeue it, or fail it once it has been interrupted
        ``max_attempts`` times). Half-assembled versions in staging/ are deleted. In a pool
        (PostgreSQL) running jobs are other workers' until their leases expire (the runner
        takes them over then), and only staging no live job uses is deleted.
        """
        if not self.computes:
            for name in self.store.names():
                try:
                    self.hooks.version_published(name, self.store.current(name))
                except EraserError as e:  # that adapter's fault: its reconcile pass records it
                    log.error("adapter %s: %s", name, e)
            return {}
        outcome = {"finished": 0, "resumed": 0, "failed": 0, "staging_cleared": self._clear_staging()}
        if not self.db.leases:
            for job in self.db.list(state=State.RUNNING, limit=1_000_000):
                outcome[self._recover_job(job)] += 1
        for name in self.store.names():  # a version renamed into place but never made current
            if self._finish_publish(name):
                outcome["rollbacks_finished"] = outcome.get("rollbacks_finished", 0) + 1
            self.announce(name, self.store.current(name))
            outcome["deletions_finished"] = outcome.get("deletions_finished", 0) + self._finish_deletions(name)
        outcome["factors_swept"] = self.store.sweep_factors()
        for name in self.store.names():  # current versions whose factors were never written
            outcome["factors_queued"] = outcome.get("factors_queued", 0) + self.prepare_factors(self.store.current(name))
            self.report_factor_age(name)
        self.queue_changed()
        return outcome

    def _finish_deletions(self, name: str) -> int:
        """Versions a recorded purge or retention meant to delete but a stop left on disk:
        deleted now (the record is written before the files go). Returns how many."""
        recorded = {n for d in self.db.deletions(name) for n in d["versions"]}
        left = sorted((recorded & set(self.store.version_numbers(name))) - {self.store.current_number(name)})
        if left:
            self.store.delete(name, Deleted(left, [(n, m) for n, m in self.store.factor_caches(name) if n in left]))
            log.warning("adapter %s: versions %s were recorded as deleted before a stop; deleted now", name, left)
        return len(left)

    def _clear_staging(self) -> int:
        if not self.db.leases:
            return self.store.clear_staging()
        live = self.db.live_jobs()  # staging/job-<id>[-factors].<random>
        return self.store.clear_staging(prefix="job-", keep=lambda name: name[4:].split("-")[0].split(".")[0] in live)

    def _recover_job(self, job: Job) -> str:
        """A job a stop left RUNNING: finished, resumed or failed (the outcome's key)."""
        version = self._published_by(job)
        if version is not None:
            if self.store.current_number(job.adapter) < version.number:
                self.store.set_current(job.adapter, version.number)
            self.db.finish(job.id, State.SUCCEEDED, report=JobReport.from_json(version.manifest.get("report")),
                           to_version=version.number, already_erased=version.manifest.get("already_erased", []),
                           edits=version.manifest.get("edits"))
            log.info("recovered job %s: version %d of %s was published before the stop", job.id, version.number,
                     job.adapter)
            return "finished"
        if job.attempts >= self.config.max_attempts:
            self.db.finish(job.id, State.FAILED, error_code="ABORTED",
                           error_message=f"interrupted {job.attempts} times (crash or restart) before it could finish")
            log.warning("job %s failed: interrupted %d times", job.id, job.attempts)
            return "failed"
        self.db.requeue(job.id)
        log.info("job %s was interrupted; queued again (attempt %d of %d next)", job.id, job.attempts + 1,
                 self.config.max_attempts)
        return "resumed"

    def _finish_publish(self, name: str) -> bool:
        """Make current a version renamed into place before a stop whose job succeeded or that
        a rollback published (its rename is its commit point); True for a rollback."""
        numbers = self.store.version_numbers(name)
        current = self.store.current_number(name)
        if not numbers or numbers[-1] <= current:
            return False
        manifest = self.store.version(name, numbers[-1]).manifest
        job = self.db.get(manifest.get("job_id") or "")
        rollback = manifest.get("source") == "rollback" and manifest.get("parent_version") == current
        if not ((job is not None and job.state == State.SUCCEEDED) or rollback):
            return False
        self.store.set_current(name, numbers[-1])
        if rollback:
            self.prune(name)
            log.info("recovered the rollback of %s to the content of v%s as v%d (published before the stop)",
                     name, manifest.get("rollback_of"), numbers[-1])
        return rollback

    def _published_by(self, job: Job) -> Version | None:
        try:
            version = self.store.version(job.adapter, job.to_version)
        except NotFoundError:
            return None
        return version if version.manifest.get("job_id") == job.id else None

    def view(self, version: Version) -> AdapterView:
        record = self.store.record(version.adapter)
        return AdapterView(version, record, self.store.version_numbers(version.adapter),
                           self.swapper.states(version.adapter), verify_policy(None, record, self.config))

    def adapter(self, name: str) -> AdapterView:
        """The adapter's current version as a client sees it (NotFoundError: none of that name)."""
        self.store.record(name)
        return self.view(self.store.current(name))

    def adapters(self) -> list[AdapterView]:
        return [self.view(self.store.current(n)) for n in self.store.names()]

    def base_dir(self, adapter: str) -> str:
        return self.store.record(adapter).base_model_dir

    def start(self) -> None:
        if self.swapper.backends:
            self.swapper.start(self.config.reconcile_seconds, self.base_dir, self.report_serving)
            if self.versions is not None:
                self.versions.listen(self.swapper.wake)
        if self.computes:
            self.factors.start()
        for i in range(self.config.workers if self.computes else 0):
            t = threading.Thread(target=self.runner.work, name=f"eraser-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        if self.computes and self.db.leases:
            t = threading.Thread(target=self.runner.renew_leases, name="eraser-leases", daemon=True)
            t.start()
            self._workers.append(t)

    def drain(self, timeout: float) -> None:
        """Stop taking jobs; give running ones ``timeout`` seconds, then interrupt them
        (they go back to the queue and resume on the next start)."""
        self.runner.draining.set()
        self.notify()
        deadline = time.monotonic() + timeout
        while self.runner.running and time.monotonic() < deadline:
            time.sleep(0.05)
        self.runner.stopping.set()
        self.swapper.stop()
        if self.versions is not None:
            self.versions.close()
        if self.swapper.backends:
            self.store.withdraw_serving(self.instance)  # its replicas are no longer vouched for
        for r in list(self.runner.running.values()):
            r.cancel.set()
        self.notify()
        # After the jobs' grace (a job may be waiting for a fit): the fit in progress is
        # abandoned at its next step, and what is queued is queued again by recover().
        self.factors.stop()
        for t in self._workers:
            t.join(timeout=60)
        if self.db is not None:
            self.db.close()
        self.release_store()

    def release_store(self) -> None:
        """Let another computing sidecar open this store (after a drain, or a failed start)."""
        if self._lock_file is not None:
            self._lock_file.release()

    # ---- adapters ------------------------------------------------------------------
    def resolve_base(self, base_model: str) -> Path:
        if not base_model:
            raise InvalidRequestError("base_model is required")
        path = Path(self.config.base_models.get(base_model, base_model))
        if not (path / "config.json").is_file():
            known = ", ".join(sorted(self.config.base_models)) or "none configured"
            raise InvalidRequestError(f"base model {base_model!r} is neither a configured name ({known}) nor a model directory")
        return path

    def register(self, name: str, base_model: str, adapter_path: str, dataset_path: str, holdout_path: str = "",
                 verify: str = "") -> Version:
        self._require_compute()
        base_dir = self._check_registration(name, base_model, adapter_path, dataset_path, holdout_path, verify)
        # Confined before anything is read; what is checked below is the staged copy, so
        # the store holds exactly what passed.
        given = {"adapter_path": adapter_path, "dataset_path": dataset_path, "holdout_path": holdout_path}
        sources = {what: self.imports.confine(path, what, "dir" if what == "adapter_path" else "file")
                   for what, path in given.items() if path}
        staged = self.store.new_staging(f"register-{name}-v1")
        holdout = None
        try:
            holdout = self._stage_sources(name, sources, staged)
            with _client_paths({staged / ADAPTER_DIR: adapter_path, staged / DATASET: dataset_path,
                                **({holdout: holdout_path} if holdout is not None else {})}):
                rows, holdout_rows, fingerprint = self._check_staged(staged, holdout, base_dir, base_model, dataset_path)
            self.store.write_manifest(staged, {
                "adapter": name, "version": 1, "parent_version": None, "job_id": None, "request_ids": [],
                "base_model": base_model, "base_model_fingerprint": fingerprint, "created_at": time.time(),
                "rows": len(rows), "source": "register",
            })
            record = AdapterRecord(name, base_model, str(base_dir.resolve()), fingerprint, time.time(),
                                   holdout_sha256=file_sha256(holdout) if holdout is not None else None,
                                   holdout_rows=len(holdout_rows or ()), verify=verify)
            version = self.store.register(record, staged, holdout)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
            if holdout is not None:
                shutil.rmtree(holdout.parent, ignore_errors=True)
        log.info("registered adapter %s (%d rows%s) as version 1", name, len(rows),
                 f", held-out set of {len(holdout_rows)} rows" if holdout_rows is not None else "")
        self.announce(name, version)
        self.prepare_factors(version)
        self.report_factor_age(name)
        self._serve_now(version)
        return version

    def _check_registration(self, name: str, base_model: str, adapter_path: str, dataset_path: str, holdout_path: str,
                            verify: str) -> Path:
        """The request's own checks (nothing read yet); the base model's directory."""
        check_adapter_name(name)
        if self.store.exists(name):
            raise AlreadyExistsError(f"an adapter named {name!r} is already registered")
        base_dir = self.resolve_base(base_model)
        if not adapter_path or not dataset_path:
            raise InvalidRequestError("adapter_path and dataset_path are required")
        if verify and verify not in defaults.VERIFY_POLICIES:
            raise InvalidRequestError(f"unknown verify policy {verify!r} (choose {', '.join(defaults.VERIFY_POLICIES)})")
        if verify in ("report", "enforce") and not holdout_path:
            raise InvalidRequestError(f"verify {verify} needs a held-out set (holdout_path)")
        return base_dir

    def _stage_sources(self, name: str, sources: dict[str, Path], staged: Path) -> Path | None:
        """Copy the adapter and the training set into ``staged``, the held-out set beside it (not
        in the version: erases never change it); the held-out set's staged path, if any."""
        self.imports.copy_tree(sources["adapter_path"], staged / ADAPTER_DIR, "adapter_path")
        self.imports.copy_file(sources["dataset_path"], staged / DATASET, "dataset_path")
        if "holdout_path" not in sources:
            return None
        holdout = self.store.new_staging(f"register-{name}-holdout") / "holdout.jsonl"
        self.imports.copy_file(sources["holdout_path"], holdout, "holdout_path")
        return holdout

    def _check_staged(self, staged: Path, holdout: Path | None, base_dir: Path, base_model: str,
                      dataset_path: str) -> tuple[list, list | None, str]:
        """The staged copies checked: (training rows, held-out rows, the base model's fingerprint)."""
        check_adapter_dir(staged / ADAPTER_DIR)
        rows = load_rows(staged / DATASET)
        if not rows:
            raise InvalidRequestError(f"dataset {Path(dataset_path).name} has no rows")
        holdout_rows = self._check_holdout(holdout, rows) if holdout is not None else None
        fingerprint = base_fingerprint(base_dir)
        recorded = read_adapter_meta(staged / ADAPTER_DIR).get("base_model_fingerprint")
        if recorded and recorded != fingerprint:
            from eraser.errors import BaseModelMismatchError

            raise BaseModelMismatchError(f"adapter was trained on base model {recorded[:12]}, not on "
                                         f"{base_model} ({fingerprint[:12]})")
        # Loading the adapter onto the base is the only complete check that its tensors fit.
        load_adapter(load_base(base_dir, "cpu"), staged / ADAPTER_DIR, trainable=False)
        return rows, holdout_rows, fingerprint

    def _check_holdout(self, path: Path, rows) -> list:
        """The held-out rows, refused (INVALID_ARGUMENT) when unreadable, too few, or
        sharing a row's content (``eraser.verify.load_holdout``) or id with the training set."""
        try:
            holdout = load_holdout(path, rows, VerifyConfig(policy="enforce"))
        except OSError as e:
            raise DataError(f"cannot read held-out set {path}: {e.strerror or type(e).__name__}") from None
        trained = {r.id for r in rows}
        shared = sorted(r.id for r in holdout if r.id in trained)
        if shared:
            raise InvalidRequestError(
                f"{len(shared)} held-out row id(s) are training row ids (e.g. {shared[0]!r}); held-out rows must be "
                "rows the adapter never saw, under ids of their own")
        return holdout

    def _serve_now(self, version: Version) -> SwapResult:
        """Swap a version in outside a job (register, rollback): a short bounded try; a
        replica that is behind is left to the reconcile loop and shown in the adapter's
        replica status."""
        result = self.swapper.swap(version, self.base_dir(version.adapter), min(30.0, self.config.swap_timeout_seconds),
                                   stop=self.runner.draining)
        for replica, why in result.behind.items():
            log.warning("%s v%d is not served by %s yet (the reconcile loop retries): %s", version.adapter,
                        version.number, replica, why)
        return result

    def rollback(self, name: str, number: int) -> Version:
        """Publish the content of retained version ``number`` as a new current version.

        Versions stay strictly increasing and immutable (a serving engine never sees
        changed weights under a path it has seen). Rolling back past an erase brings the
        erased rows back, by the operator's explicit choice.
        """
        self._require_compute()
        self.store.record(name)
        with self.runner.publish_lock:
            current = self.store.current(name)
            if number == current.number:
                return current
            if number < 1 or number > current.number:
                raise NotFoundError(f"adapter {name!r} has no version {number} (current is {current.number})")
            if number not in self.store.version_numbers(name):
                raise FailedPreconditionError(f"version {number} of {name!r} was deleted {self._deleted_how(name, number)}")
            active = self.db.active_count(name)
            if active[State.QUEUED] or active[State.RUNNING]:
                raise FailedPreconditionError(f"adapter {name!r} has queued or running jobs; wait for them or cancel them first")
            source = self.store.version(name, number)
            staged = self.store.new_staging(f"rollback-{name}-v{current.number + 1}")
            try:
                self.store.copy_version(source, staged)
                self.store.write_manifest(staged, {
                    **{k: source.manifest.get(k) for k in ("adapter", "base_model", "base_model_fingerprint", "rows")},
                    "version": current.number + 1, "parent_version": current.number, "rollback_of": number,
                    "job_id": None, "request_ids": [], "created_at": time.time(), "source": "rollback",
                })
                version = self.store.publish(name, current.number + 1, staged)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            for method in FACTOR_METHODS:  # the same adapter and rows: the same factors
                try:
                    self.store.copy_factors(name, number, version.number, method)
                except OSError as e:
                    log.warning("could not copy the %s factors of %s v%d to v%d (%s); they will be refitted", method,
                                name, number, version.number, type(e).__name__)
            self.prune(name)
        log.info("adapter %s rolled back to the content of version %d as version %d", name, number, version.number)
        self.announce(name, version)
        self.prepare_factors(version)
        self.report_factor_age(name)
        self._serve_now(version)
        return version

    # ---- history: retention, purge, receipts ------------------------------------------
    def prune(self, name: str) -> Deleted:
        """Retention (``keep_versions``), recorded so that receipts say when a version went."""
        planned = self.store.prune_plan(name, self.config.keep_versions)
        if planned:  # recorded first: a stop before the files went is completed at the next start
            self.db.record_deletion(name, "retention", planned.versions, planned.factor_caches, time.time())
        return self.store.delete(name, planned)

    def _deleted_how(self, name: str, number: int) -> str:
        """How a version went, for an error message: by PurgeHistory (when) or by retention."""
        for d in reversed(self.db.deletions(name)):
            if number in d["versions"]:
                return f"by {'PurgeHistory' if d['how'] == 'purge' else 'retention'} at {timestamp(d['deleted_at'])}"
        return f"by retention (keep_versions={self.config.keep_versions})"

    def purge(self, name: str, before_version: int) -> Purge:
        """Delete the versions of ``name`` older than ``before_version`` now, whatever
        ``keep_versions`` says, with their factor caches and the payloads ended jobs left;
        recorded (time, what) so later receipts say when. The current version stays."""
        self._require_compute()
        self.store.record(name)
        with self.runner.publish_lock:  # no publish, rollback or prune in between
            current = self.store.current_number(name)
            if not 1 <= before_version <= current:
                raise InvalidRequestError(f"before_version must be in [1, {current}] for adapter {name!r} (its current "
                                          f"version, which is never purged), not {before_version}")
            planned = self.store.purge_plan(name, before_version)
            purged_at = time.time()
            # Recorded (and the payloads deleted) first: a stop before the files went is
            # completed at the next start, so the record never misses a deletion.
            payload_rows = self.db.record_deletion(name, "purge", planned.versions, planned.factor_caches, purged_at,
                                                   purge_payloads=True)
            deleted = self.store.delete(name, planned)
        log.info("purged %s before v%d: versions %s, %d factor cache(s), %d payload row(s)", name, before_version,
                 deleted.versions, len(deleted.factor_caches), payload_rows)
        self.report_factor_age(name)
        return Purge(name, deleted, payload_rows, purged_at, self.store.version_numbers(name))

    def with_old_hashes(self, edits: list[dict], rows) -> list[dict]:
        """A job's edits with the keyed hash of each row before the job (``old_hash``, as in
        eraser.json): how a receipt names the erased rows. Rows already erased have none."""
        by_id = {r.id: r for r in rows}
        return [{**e, "old_hash": self.store.row_hasher.row(by_id[e["id"]])} if e["id"] in by_id else e for e in edits]

    def receipt(self, job_id: str) -> SignedReceipt:
        """The signed erasure receipt of a SUCCEEDED job (``sidecar.receipts``), with what
        the store holds of the erased rows now."""
        job = self.job(job_id)
        if job.state != State.SUCCEEDED:
            raise FailedPreconditionError(f"job {job_id} is {job.state.name.lower()}: receipts are issued for "
                                          "succeeded jobs only")
        with self.runner.publish_lock:  # a consistent view: no version appears or goes meanwhile
            holding = self._versions_holding(job)
            caches = [{"version": n, "method": m} for n, m in self.store.factor_caches(job.adapter) if n in holding]
            current = self.store.current_number(job.adapter)
            deleted = self._deleted_before(job)
        receipt = build_receipt(job, row_hash=self.store.row_hasher.describe(), current_version=current,
                                holding_versions=holding, holding_factors=caches,
                                payload_rows=self.db.payload_rows(job.id), deleted=deleted,
                                replicas_configured=bool(self.config.vllm_urls), signing_key_id=self.signer.key_id,
                                issued_at=time.time())
        return self.signer.sign(receipt)

    def receipt_key(self) -> ReceiptSigner:
        """The key receipts are signed with (its public half is what a verifier pins)."""
        self._require_compute()
        return self.signer

    def _versions_holding(self, job: Job) -> list[int]:
        """Retained versions whose training set (and so whose weights) still has a row the job
        erased: a removed id that is present, an edited row with its old text (by keyed hash).
        Older versions, and a rollback past the erase. Jobs recorded before edits carried
        ``old_hash``: an edited row counts in the versions before the job's."""
        hasher = self.store.row_hasher
        holding = []
        for number in self.store.version_numbers(job.adapter):
            rows = {r.id: r for r in self.store.rows(self.store.version(job.adapter, number))}
            for e in job.edits:
                row = rows.get(e["id"])
                if row is not None and (e["kind"] == "remove" or hasher.row(row) == e.get("old_hash")
                                        or ("old_hash" not in e and number < job.to_version)):
                    holding.append(number)
                    break
        return holding

    def _deleted_before(self, job: Job) -> list[dict]:
        """Deletions of versions published before the job's (and of their factor caches):
        when, how (purge, retention), which. A deleted version cannot be inspected, so the
        receipt names what was deleted, not which of those held the rows."""
        out = []
        for d in self.db.deletions(job.adapter):
            versions = [n for n in d["versions"] if n < job.to_version]
            caches = [{"version": n, "method": m} for n, m in d["factor_caches"] if n < job.to_version]
            if versions or caches:
                out.append({"deleted_at": timestamp(d["deleted_at"]), "how": d["how"], "versions": versions,
                            "factor_caches": caches})
        return out

    # ---- jobs ----------------------------------------------------------------------
    def submit(self, adapter: str, request_id: str, payload: RequestPayload, options: dict,
               deadline_seconds: float = 0.0, still_wanted: Callable[[], bool] = lambda: True) -> Job:
        """Validate a request against the adapter's current version and queue it.

        Every check happens before anything is written; a request id seen before returns
        its job (or ALREADY_EXISTS if it named a different request).
        """
        self._require_compute()
        record = self.store.record(adapter)
        if request_id and len(request_id) > 128:
            raise InvalidRequestError("request_id is longer than 128 characters")
        check_printable("request_id", [request_id])
        check_printable("row ids", payload.ids)
        if not (math.isfinite(deadline_seconds) and deadline_seconds >= 0):
            raise InvalidRequestError("deadline_seconds must be a finite number >= 0")
        request = UnlearningRequest(payload.remove, payload.modify_query, payload.correct_response)
        if request.size > self.config.max_request_rows:
            raise InvalidRequestError(f"request touches {request.size} rows; the limit is {self.config.max_request_rows}")
        resolved = resolve_options(options, self.config, record)
        fingerprint = payload.fingerprint(adapter, {**resolved, "deadline_seconds": deadline_seconds},
                                          self.store.row_hasher)
        if request_id:
            seen = self.db.by_request(request_id)
            if seen is not None and seen[0].state not in RETRYABLE:
                return self._same_request(seen, fingerprint, request_id)
        else:
            request_id = uuid.uuid4().hex
        if self.runner.draining.is_set():
            raise ShuttingDown("the sidecar is shutting down; retry against the restarted instance")
        current = self.store.current(adapter)
        rows = self.store.rows(current)
        present = self.store.row_ids(current)
        # Removing a row an earlier job already erased is a repeat of a right already
        # granted: it is accepted, and its job records the id as already erased.
        gone = self.db.removed_ids(adapter, [i for i in payload.remove if i not in present])
        pending = tuple(i for i in payload.remove if i not in gone)
        if pending or payload.modify_query or payload.correct_response:
            UnlearningRequest(pending, payload.modify_query, payload.correct_response).resolve(rows)
        # Counting the removals already queued: jobs that each leave rows can empty it together.
        if pending and self._would_empty(adapter, present, pending):
            raise InvalidRequestError(EMPTYING.format(adapter=adapter, rows=len(present)))
        if not still_wanted():  # the caller gave up (deadline or cancel): do not queue
            raise JobCancelled("the call was cancelled before the request was queued")
        job, created, merged = self.db.submit(adapter, request_id, payload, resolved, fingerprint,
                                              self.config.merge_queued, self.config.max_request_rows, deadline_seconds)
        if not created:  # a concurrent call with the same id won the race
            return self._same_request(self.db.by_request(request_id), fingerprint, request_id)
        log.info("request %s for %s queued in job %s (%s; %s)", request_id, adapter, job.id,
                 ", ".join(f"{k} {v}" for k, v in request.counts().items() if v), "merged" if merged else "new job")
        self.hooks.job_accepted(job, merged)
        self.queue_changed()
        self.notify()
        return job

    def _would_empty(self, adapter: str, present: frozenset[str], pending: Sequence[str]) -> bool:
        left = present - set(pending)
        # The set of queued removals (every queued edit read) only where their count could cover
        # what is left: merged into one queued job, reading it made each acceptance O(queued rows).
        return len(left) <= self.db.queued_removal_count(adapter) and not left - self.db.pending_removals(adapter)

    @staticmethod
    def _same_request(seen: tuple[Job, str], fingerprint: str, request_id: str) -> Job:
        job, recorded = seen
        if recorded != fingerprint:
            raise AlreadyExistsError(f"request_id {request_id!r} was already used for a different request")
        return job

    def _require_compute(self) -> None:
        if not self.computes:
            raise FailedPreconditionError("this sidecar only reconciles its replicas (role reconcile); send writes and "
                                          "job queries to the computing sidecar")

    def job(self, job_id: str) -> Job:
        self._require_compute()
        job = self.db.get(job_id) if job_id else None
        if job is None:
            raise NotFoundError(f"no job with id {job_id!r}")
        return job

    def jobs(self, adapter: str | None, state: int, limit: int) -> list[Job]:
        """Jobs, newest first; ``state`` 0 for any, ``limit`` 0 for the default (100)."""
        self._require_compute()
        if state and state not in State.__members__.values():
            raise InvalidRequestError(f"unknown job state {state} (choose {', '.join(f'{s.value} {s.name}' for s in State)})")
        if not 0 <= limit <= MAX_LIST_JOBS:
            raise InvalidRequestError(f"limit must be between 0 (the default, 100) and {MAX_LIST_JOBS}")
        state, limit = (State(state) if state else None), (limit or 100)
        if adapter:
            self.store.record(adapter)
        return self.db.list(adapter, state, limit)

    def cancel(self, job_id: str, request_id: str = "") -> Job:
        """Cancel a job, or only the caller's request (``request_id``) of a job that serves
        several merged requests: the others must not lose their erasure to one client."""
        job = self.job(job_id)
        if job.state in (State.SUCCEEDED, State.FAILED):
            raise FailedPreconditionError(f"job {job_id} has already ended ({job.state.name.lower()})")
        check_printable("request_id", [request_id])
        if request_id and request_id not in job.request_ids:
            raise NotFoundError(f"job {job_id} serves no request {quote_ids([request_id])}")
        if job.state != State.CANCELLED and len(job.request_ids) > 1:
            if not request_id:
                raise FailedPreconditionError(
                    f"job {job_id} serves {len(job.request_ids)} merged requests; cancel yours with its request_id")
            withdrawn = self.db.withdraw(job_id, request_id)
            if withdrawn is None:
                raise FailedPreconditionError(
                    f"job {job_id} is running for {len(job.request_ids)} requests; one of them cannot leave a running "
                    "solve (it can be retried once the job has ended)")
            log.info("request %s withdrawn from job %s (%d request(s) left)", request_id, job_id,
                     len(withdrawn.request_ids))
            self.notify()
            return withdrawn
        job = self.db.request_cancel(job_id)
        running = self.runner.running.get(job_id)
        if running is not None:
            running.cancel.set()
        if job.state == State.CANCELLED:
            self.hooks.job_finished(job)
        self.queue_changed()
        self.notify()
        return job

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the changing thread; it must not block) after every change
        of a job or the queue: WatchJob streams wait for these without a thread each."""
        self._listeners.append(callback)

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()
        for callback in self._listeners:
            callback()

    def queue_changed(self) -> None:
        if self.db is None:
            return
        counts = self.db.active_count()
        self.hooks.queue_changed(counts[State.QUEUED], counts[State.RUNNING])

    # ---- the worker ----------------------------------------------------------------
    # ---- factors -------------------------------------------------------------------
    def prepare_factors(self, version: Version, method: str | None = None) -> int:
        """Queue background fits for a newly current version: for the configured solver if
        it reads factors, and for ``method`` (a job's own request). Returns how many."""
        if not self.computes:
            return 0
        methods = {m for m in (self.config.erase.solver, method) if m in FACTOR_METHODS}
        queued = 0
        for m in sorted(methods):
            target = FactorTarget(version.adapter, version.number, m, self.config.erase.max_length)
            queued += self.factors.request(target)
        return queued

    def _full_fit_done(self, adapter: str, seconds: float) -> None:
        self.hooks.factors_fitted(adapter, "full", seconds)

    def report_factor_age(self, adapter: str) -> None:
        """Tell the metrics when the current version's factors were last fitted in full
        (the configured method's first), or that it has none."""
        with self._age_lock:  # computed and set together: the last call reports the latest state
            try:
                number = self.store.current_number(adapter)
            except (NotFoundError, OSError, ValueError):
                return
            order = sorted(FACTOR_METHODS, key=lambda m: m != self.config.erase.solver)
            when = next((t for t in (fitted_at(self.store.factors_dir(adapter, number, m)) for m in order)
                         if t is not None), None)
            self.hooks.factors_age(adapter, when)

    def report_serving(self) -> None:
        """After each reconcile pass: what this sidecar's replicas serve, for a computing
        sidecar elsewhere that waits on it."""
        self.store.report_serving(self.instance, self.config.reconcile_seconds, self.swapper.serving())
