"""The job worker: claim a job, run its stages (its request, the engine, publish, swap), record
the outcome. Each stage is a method; what a run has found so far travels in ``_Work``.

The runner works for a host (``EraserService``) that owns the store, the job database and
the public operations; it reads the host's collaborators and calls back into it for what
both use (notifications, factor fits, retention). See ``RunnerHost``.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from eraser import factors as engine_factors
from eraser.errors import EraserError, InvalidRequestError, quote_ids, UtilityCheckFailedError, VerificationFailedError
from eraser.requests import UnlearningRequest
from eraser.unlearn import erase

from .config import SidecarConfig
from .errors import JobCancelled, JobDeadlineExceeded, FailedPreconditionError, LeaseLost, ShuttingDown, failure_of
from .job_store import JobStore
from .job_model import Job, State
from .report import JobReport, utility_of
from .solver_choice import SolverChoice, SolverChooser
from .store import ADAPTER_DIR, DATASET, AdapterStore, Deleted, Version, file_sha256
from .swap import SwapCheck, SwapResult, Swapper

log = logging.getLogger("eraser.sidecar")

# An adapter without training rows cannot be erased from, verified or rolled forward.
EMPTYING = ("this would remove every row of adapter {adapter!r} ({rows}, counting those queued jobs remove); an "
            "adapter keeps at least one row: delete the adapter instead")


def _discard(*staged: Path | None) -> None:
    for path in staged:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def result_from_reports(reports: list[dict], version: Version) -> SwapResult:
    """The swap as the reconcilers saw it: one check per replica that serves ``version``
    (or a later one) confirmed, the others behind with their last error."""
    result = SwapResult()
    published = float(version.manifest.get("created_at") or 0.0)
    for report in reports:
        for replica, adapters in sorted(report["replicas"].items()):
            name = f"{report['instance']} {replica}"
            state = adapters.get(version.adapter) or {}
            if state.get("current") and int(state.get("served_version", 0)) >= version.number:
                served_at = float(state["checked_at"])
                result.checks.append(SwapCheck(name, state["served_path"], float(state.get("max_logprob_error", 0.0)),
                                               float(state.get("probe_margin", 0.0)), max(0.0, served_at - published),
                                               served_at, bool(state.get("weights_confirmed"))))
            else:
                result.behind[name] = state.get("error") or (f"serves v{state['served_version']}" if state
                                                             else "has not reported this adapter yet")
    return result


def serving_summary(result: SwapResult | None, version: Version, via_reports: bool) -> str:
    """One line for the job's report: how serving took the new version."""
    if result is None:
        return "unconfirmed: no serving replica is configured here or reports to the store"
    total = len(result.checks) + len(result.behind)
    if result.behind:
        return f"unconfirmed on {len(result.behind)} of {total} replica(s)"
    path_only = sum(not c.weights_confirmed for c in result.checks)
    line = f"confirmed on {total} replica(s)" + (" by their reconcilers" if via_reports else "")
    if path_only:
        line += (f"; on {path_only} by the served path only (no probe tells v{version.number} from "
                 f"v{version.number - 1} beyond the tolerance)")
    return line


class RunnerHost(Protocol):
    """What the runner needs of the service it works for."""

    store: AdapterStore
    db: JobStore
    hooks: object  # sidecar.service.Hooks
    config: SidecarConfig
    device: object
    swapper: Swapper
    solvers: SolverChooser
    changed: threading.Condition

    def notify(self) -> None: ...
    def queue_changed(self) -> None: ...
    def prepare_factors(self, version: Version, method: str | None = None) -> int: ...
    def report_factor_age(self, adapter: str) -> None: ...
    def prune(self, name: str) -> Deleted: ...
    def with_old_hashes(self, edits: list[dict], rows) -> list[dict]: ...
    def base_dir(self, adapter: str) -> str: ...


@dataclass
class Running:
    job: Job
    cancel: threading.Event
    last_write: float = 0.0
    lost: bool = False  # its lease was taken over: stop without recording anything


@dataclass
class _Work:
    """What one run of a job has found and made so far (staging is deleted unless published)."""

    job: Job
    current: Version | None = None
    request: UnlearningRequest | None = None
    already: list[str] = field(default_factory=list)
    edits: list[dict] = field(default_factory=list)
    choice: SolverChoice | None = None
    staged: Path | None = None
    staged_factors: Path | None = None


class JobRunner:
    def __init__(self, host: RunnerHost):
        self.host = host
        self.store, self.db, self.hooks, self.config = host.store, host.db, host.hooks, host.config
        self.device, self.swapper, self.solvers = host.device, host.swapper, host.solvers
        self.publish_lock = threading.Lock()  # one publisher (job, rollback) at a time
        self.running: dict[str, Running] = {}
        self.stopping = threading.Event()
        self.draining = threading.Event()

    def work(self) -> None:
        while not self.stopping.is_set():
            job = None
            if not self.draining.is_set():
                with self.publish_lock:
                    job = self._claim()
                    if job is not None:
                        self.running[job.id] = Running(job, threading.Event())
            if job is None:
                with self.host.changed:
                    self.host.changed.wait(0.5)
                continue
            self.host.queue_changed()
            self.host.notify()
            try:
                self._run(job)
            except Exception:  # the runner records every failure; this is a last resort
                log.exception("job %s: runner crashed", job.id)
            finally:
                self.running.pop(job.id, None)
                self.db.release(job.id)
                self.host.queue_changed()
                self.host.notify()

    def _claim(self) -> Job | None:
        try:
            return self.db.claim(self.running.keys(), self.store.current_number)
        except Exception as e:  # a job database that is away (PostgreSQL restarting): try again shortly
            if not self.db.leases:
                raise
            log.warning("no job claimed: the job database is unavailable (%s)", type(e).__name__)
            self.stopping.wait(1.0)
            return None

    def renew_leases(self) -> None:
        """A pool's lease keeper: renew every running job's lease a few times per lease; a job
        whose lease was lost, or that a client cancelled through another sidecar, is stopped."""
        every = self.config.lease_seconds / 3
        while not self.stopping.wait(every):
            for running in list(self.running.values()):
                try:
                    status = self.db.renew(running.job.id)
                except Exception as e:  # the database is away: the lease runs on; the fence decides
                    log.warning("job %s: lease not renewed (%s)", running.job.id, type(e).__name__)
                    continue
                if status == "lost":
                    running.lost = True
                if status != "held":
                    running.cancel.set()

    def _run(self, job: Job) -> None:
        """One job, stage by stage: its request, the engine, publish, swap; every outcome recorded."""
        running = self.running[job.id]
        work = _Work(job)
        log.info("job %s started on %s v%d (attempt %d)", job.id, job.adapter, job.from_version, job.attempts)
        try:
            if job.cancel_requested:
                raise JobCancelled("cancelled by a client")
            self._check_deadline(job)
            if self.db.leases and job.attempts > 1 and not self._take_over(job):
                return
            if not self._resolve(work):
                return
            progress = self._progress_hook(running)
            report = self._job_report(work, self._compute(work, progress))
            progress("publish", 0, 1)
            version = self._publish(work, running, report)
            self.host.prepare_factors(version, work.choice.requested)
            self.host.report_factor_age(job.adapter)
            # The version is published: from here the job cannot be cancelled, only served.
            finished = self._swap_in(job, version, report, work.already, work.edits)
            if finished is not None:
                self.hooks.job_finished(finished)
        except LeaseLost as e:
            _discard(work.staged, work.staged_factors)
            log.warning("job %s stopped: %s", job.id, e)
        except ShuttingDown:
            self.db.requeue(job.id)
            log.info("job %s interrupted by shutdown; it resumes on the next start", job.id)
        except JobCancelled as e:
            _discard(work.staged, work.staged_factors)  # before the record ends: a client that sees it finds nothing staged
            self.hooks.job_finished(self.db.finish(job.id, State.CANCELLED, error_code="CANCELLED", error_message=str(e)))
            log.info("job %s cancelled", job.id)
        except BaseException as e:
            _discard(work.staged, work.staged_factors)
            self._record_failure(job, e)
        finally:
            _discard(work.staged, work.staged_factors)

    def _take_over(self, job: Job) -> bool:
        """A job claimed again after its worker's lease expired: clean what that worker staged;
        finish the job if it had published its version; fail it once it was interrupted
        ``max_attempts`` times. True: run it."""
        cleared = self.store.clear_staging(prefix=f"job-{job.id}")
        current = self.store.current(job.adapter)
        if current.manifest.get("job_id") == job.id:
            self.hooks.job_finished(self.db.finish(
                job.id, State.SUCCEEDED, report=JobReport.from_json(current.manifest.get("report")),
                to_version=current.number, already_erased=current.manifest.get("already_erased", []),
                edits=current.manifest.get("edits")))
            log.info("job %s taken over: v%d of %s was published before its worker stopped", job.id, current.number,
                     job.adapter)
            return False
        if job.attempts > self.config.max_attempts:
            self.hooks.job_finished(self.db.finish(
                job.id, State.FAILED, error_code="ABORTED",
                error_message=f"interrupted {job.attempts - 1} times (a worker died or lost its lease) before it could finish"))
            return False
        log.info("job %s taken over (attempt %d; %d staged folder(s) of its last worker deleted)", job.id, job.attempts,
                 cleared)
        return True

    def _resolve(self, work: _Work) -> bool:
        """The job's merged request against the current version; False (and the job
        finished) when earlier jobs already erased every row it names."""
        job = work.job
        work.current = self.store.current(job.adapter)
        rows = self.store.rows(work.current)
        work.request, work.already = self._merged_request(job, {r.id for r in rows})
        work.edits = self.host.with_old_hashes(job.edits, rows)
        if work.request is None:
            finished = self.db.finish(job.id, State.SUCCEEDED, to_version=work.current.number,
                                      already_erased=work.already, report=None)
            log.info("job %s: every row was already erased by earlier jobs; nothing to publish", job.id)
            self.hooks.job_finished(finished)
            return False
        if not {r.id for r in rows} - set(work.request.remove):  # queued jobs checked each other; this is the last guard
            raise InvalidRequestError(EMPTYING.format(adapter=job.adapter, rows=len(rows)))
        return True

    def _compute(self, work: _Work, progress):
        """The engine's erase into staging, with the chosen solver; a factor cache the engine
        cannot read is discarded and the choice made again, once."""
        job, current = work.job, work.current
        work.staged = self.store.new_staging(f"job-{job.id}")
        for attempt in (1, 2):
            work.choice = choice = self.solvers.choose(job, current, progress)
            if choice.method is not None and work.staged_factors is None:
                work.staged_factors = self.store.new_staging(f"job-{job.id}-factors")
            factor_args = {} if choice.method is None else {
                "factors_dir": choice.source, "factors_out": work.staged_factors / choice.method,
                "refit_fraction": self.config.erase.refit_fraction}
            if choice.config.verify.policy != "off" and self.store.record(job.adapter).holdout_sha256 is not None:
                factor_args["holdout_path"] = self._holdout_for(job.adapter)
            try:
                return erase(self.store.record(job.adapter).base_model_dir, current.adapter_path,
                             current.dataset_path, work.request, work.staged / ADAPTER_DIR, work.staged / DATASET,
                             choice.config, str(self.device), progress, **factor_args, row_hasher=self.store.row_hasher,
                             serving_probe=True)  # reconcilers anywhere confirm the version with it
            except EraserError as e:
                if attempt == 2 or not choice.bad_cache(e):
                    raise
                # The cache passed the manifest check but not the load (damaged files, or
                # another layout): discard it and decide again, as if it were missing.
                log.warning("job %s: the %s factors of %s v%d cannot be used (%s); discarded", job.id, choice.method,
                            job.adapter, current.number, type(e).__name__)
                self.store.discard_factors(job.adapter, current.number, choice.method)
                self.host.report_factor_age(job.adapter)

    def _job_report(self, work: _Work, engine_report) -> JobReport:
        """The engine's report as the job records it, with why its solver ran."""
        report = JobReport.from_json(engine_report.to_json())
        report = self._note_factors(work.job, work.current, work.choice, report)
        if report.verification is not None:
            self.hooks.verification_finished(work.job.adapter, report.verification)
        if report.utility is not None:
            self.hooks.utility_checked(work.job.adapter, report.utility)
        return report

    def _publish(self, work: _Work, running: Running, report: JobReport) -> Version:
        """The staged version becomes the adapter's next, with its factors; old versions past
        the retention are pruned."""
        job = work.job
        with self.publish_lock:
            if running.cancel.is_set():
                raise self._interruption(running)
            version = self._publish_fenced(work, report)
            self._install_job_factors(job, version, work.choice, work.staged_factors)
            pruned = self.host.prune(job.adapter)
        residual = f"{report.engine.residual:.2e}" if report.engine.residual is not None else "not measured"
        log.info("job %s published %s v%d (%d rows; %s; residual %s; %.1f s)%s", job.id, job.adapter, version.number,
                 version.rows, report.solver_reason, residual, report.seconds.get("total", 0.0),
                 f"; deleted versions {pruned.versions} (retention)" if pruned.versions else "")
        self.hooks.version_published(job.adapter, version)
        return version

    def _publish_fenced(self, work: _Work, report: JobReport) -> Version:
        """Rename the staged version into place inside the job store's fence: a worker that
        lost its lease publishes nothing, and a rename whose fence did not commit is undone."""
        job, current = work.job, work.current
        number = current.number + 1
        version = None
        try:
            with self.db.fenced(job.id, job.adapter, number):
                self.store.write_manifest(work.staged, {
                    "adapter": job.adapter, "version": number, "parent_version": current.number,
                    "job_id": job.id, "request_ids": job.request_ids, "base_model": current.manifest.get("base_model"),
                    "base_model_fingerprint": current.manifest.get("base_model_fingerprint"), "created_at": time.time(),
                    "rows": report.engine.rows_after, "source": "erase", "edits": work.edits,
                    "already_erased": work.already, "report": report.to_json(),
                })
                version = self.store.publish(job.adapter, number, work.staged)
                work.staged = None
        except BaseException:
            if version is not None:
                self.store.unpublish(job.adapter, number)
            raise
        return version

    def _record_failure(self, job: Job, e: BaseException) -> None:
        """A failed job's record: its status and, for a refused update, the numbers that refused it."""
        code, message = failure_of(e)
        if not isinstance(e, EraserError):
            log.exception("job %s failed with an internal error", job.id)
        else:
            log.info("job %s failed: %s: %s", job.id, code, message)
        report = None
        if isinstance(e, VerificationFailedError) and e.report is not None:
            # Nothing was written; the job keeps the numbers of the refused update.
            report = JobReport(verification=e.report)
            self.hooks.verification_finished(job.adapter, report.verification)
        elif isinstance(e, UtilityCheckFailedError) and e.check is not None:
            report = JobReport(utility=utility_of(e.check.to_json()))
            self.hooks.utility_checked(job.adapter, report.utility)
        self.hooks.job_finished(self.db.finish(job.id, State.FAILED, error_code=code, error_message=message,
                                               report=report))

    def _holdout_for(self, adapter: str) -> Path:
        """The adapter's stored held-out set, checked against its recorded hash: a job
        verifies against exactly the rows that were registered."""
        record = self.store.record(adapter)
        path = self.store.holdout_path(adapter)
        if path is None:
            raise FailedPreconditionError(f"adapter {adapter!r} has no held-out set to verify against")
        try:
            intact = file_sha256(path) == record.holdout_sha256
        except OSError:
            intact = False
        if not intact:
            raise FailedPreconditionError(f"the stored held-out set of adapter {adapter!r} is missing or was changed "
                                          "since registration")
        return path

    def _note_factors(self, job: Job, current: Version, choice: SolverChoice, report: JobReport) -> JobReport:
        """Complete a job's report with why its solver ran and what it did with factors;
        count the fits in the metrics."""
        factors, seconds = report.factors, report.seconds
        if factors is not None:
            factors = replace(factors, version=current.number, how=choice.how)
            if choice.wait_seconds:
                factors = replace(factors, wait_seconds=round(choice.wait_seconds, 3))
                seconds = {**seconds, "factor_wait": round(choice.wait_seconds, 4)}
            if factors.source == "fitted":
                self.hooks.factors_fitted(job.adapter, "full", factors.fit_seconds or 0.0)
            if factors.out_action == "downdated":
                self.hooks.factors_fitted(job.adapter, "downdate", factors.downdate_seconds or 0.0)
            elif factors.out_action == "refitted":
                self.hooks.factors_fitted(job.adapter, "full", factors.refit_seconds or 0.0)
        return report.with_(factors=factors, seconds=seconds, requested_solver=choice.requested,
                            solver_reason=choice.describe(current.number, factors))

    def _install_job_factors(self, job: Job, version: Version, choice: SolverChoice, staged: Path | None) -> None:
        """Move the factors a job wrote for the version it just published into place.
        Never fails the job (it is published): without them, a background fit follows."""
        if choice.method is None or staged is None or not engine_factors.is_cache(staged / choice.method):
            return
        try:
            self.store.install_factors(staged / choice.method, job.adapter, version.number, choice.method)
        except OSError as e:
            log.warning("job %s: could not install the %s factors of %s v%d (%s); they will be refitted", job.id,
                        choice.method, job.adapter, version.number, type(e).__name__)

    def _swap_in(self, job: Job, version: Version, report: JobReport, already: list[str],
                 edits: list[dict]) -> Job | None:
        """Serve the published version on every replica, confirmed, then end the job.
        Without replicas of its own, the sidecar waits for the reconcilers' reports.

        Returns None when the sidecar is draining: the job stays RUNNING and the next
        start finishes it (its version is published) and reconciles the replicas.
        """
        started = time.perf_counter()

        def progress(done: int, total: int, behind: list[str]) -> None:
            self.db.progress(job.id, "swap", done / total if total else 1.0)
            self.db.set_swap(job.id, [], behind)
            self.host.notify()

        if self.swapper.backends:
            progress(0, len(self.swapper.backends), [])
            result = self.swapper.swap(version, self.host.base_dir(job.adapter), self.config.swap_timeout_seconds,
                                       stop=self.draining, progress=progress)
        else:
            result = self._await_reconcilers(version, progress)
        report = report.with_(seconds={**report.seconds, "swap": round(time.perf_counter() - started, 4)},
                              serving=serving_summary(result, version, via_reports=not self.swapper.backends))
        result = result or SwapResult()
        self.db.set_swap(job.id, [c.__dict__ for c in result.checks], sorted(result.behind))
        if result.behind and self.draining.is_set():
            log.info("job %s: draining during its swap; the next start finishes it", job.id)
            return None
        if result.behind:
            why = "; ".join(f"{r}: {e}" for r, e in sorted(result.behind.items()))
            log.warning("job %s: %s v%d published but not served everywhere: %s", job.id, job.adapter, version.number, why)
            return self.db.finish(
                job.id, State.FAILED, report=report, to_version=version.number, already_erased=already, edits=edits,
                error_code="UNAVAILABLE",
                error_message=f"version {version.number} is published and current, but {len(result.behind)} replica(s) "
                              f"did not confirm it within {self.config.swap_timeout_seconds:g} s "
                              f"({', '.join(sorted(result.behind))}); the reconcile loop keeps trying")
        log.info("job %s: %s v%d %s", job.id, job.adapter, version.number, report.serving)
        return self.db.finish(job.id, State.SUCCEEDED, report=report, to_version=version.number, already_erased=already,
                              edits=edits)

    def _await_reconcilers(self, version: Version, progress) -> SwapResult | None:
        """Wait, within ``swap_timeout_seconds``, until every live reconciler reports
        ``version`` (or a later one) served and confirmed; None when none reports."""
        deadline = time.monotonic() + self.config.swap_timeout_seconds
        while True:
            reports = self.store.serving_reports()
            if not reports:
                return None
            result = result_from_reports(reports, version)
            progress(len(result.checks), len(result.checks) + len(result.behind), sorted(result.behind))
            if not result.behind or time.monotonic() >= deadline or self.draining.wait(0.5):
                return result

    def _merged_request(self, job: Job, present: set[str]) -> tuple[UnlearningRequest | None, list[str]]:
        """One request from the job's requests. A removal of a row that an earlier job
        already erased is done; an edit of such a row cannot be done."""
        remove: dict[str, None] = {}
        modify: dict[str, str] = {}
        correct: dict[str, str] = {}
        for p in self.db.payloads(job.id):
            remove.update(dict.fromkeys(p.remove))
            modify.update(dict(p.modify_query))
            correct.update(dict(p.correct_response))
        gone = sorted(i for i in list(modify) + list(correct) if i not in present)
        if gone:
            raise InvalidRequestError(f"row(s) {quote_ids(gone)} were removed by an earlier job and cannot be edited")
        already = sorted(i for i in remove if i not in present)
        remaining = tuple(i for i in remove if i in present)
        if not (remaining or modify or correct):
            return None, already
        return UnlearningRequest(remaining, tuple(modify.items()), tuple(correct.items())), already

    def _check_deadline(self, job: Job) -> None:
        if job.deadline_at is not None and time.time() > job.deadline_at:
            raise JobDeadlineExceeded("the request's deadline passed before the job finished")

    def _interruption(self, running: Running) -> EraserError:
        """Why the cancel flag is up: the lease lost, a client's CancelJob, or the sidecar draining."""
        job = running.job
        if running.lost:
            return LeaseLost(f"job {job.id}: another worker took it over after this worker's lease expired")
        if self.db.get(job.id).cancel_requested:
            return JobCancelled("cancelled by a client")
        return ShuttingDown("the sidecar is shutting down")

    def _progress_hook(self, running: Running):
        job = running.job

        def progress(stage: str, done: int, total: int, info: dict | None = None) -> None:
            if running.cancel.is_set():
                raise self._interruption(running)
            self._check_deadline(job)
            if stage == "done":  # the engine is done; the job is not until it has published
                return
            fraction = min(1.0, done / total) if total else 0.0
            now = time.monotonic()
            # Throttled: a solve reports every iteration, the job table needs a few a second.
            if stage != job.stage or now - running.last_write > 0.25 or fraction >= 1.0:
                job.stage, job.fraction, running.last_write = stage, fraction, now
                self.db.progress(job.id, stage, fraction)
                self.host.notify()

        return progress
