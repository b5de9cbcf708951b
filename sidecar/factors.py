"""Factor caches for the fast solvers (EK-FAC, K-FAC), prepared in the background.

A factor cache (``eraser.factors``) belongs to one adapter version: it is keyed by the
adapter's hash, the training set's hash, the base model and the method. The store keeps
it beside the version (``AdapterStore.factors_dir``). A job that erased with factors
writes the downdated factors of the version it publishes; every other published version
(register, rollback, a job that ran another solver) gets a full fit here, in one
background thread, one fit at a time, so that the next request on that adapter finds
them ready.

``FactorPreparer`` is that thread and its queue. A job that needs factors which are not
there yet either waits for their fit (``wait``: the fit moves to the head of the queue)
or runs another solver (``fallback``); that choice is the service's. A fit whose version
stopped being current before it started (and that no job waits for) is skipped, and one
in progress is abandoned at its next step: a newer version makes it useless. Stopping
abandons the fit in progress too; ``eraser.factors.save`` writes under a temporary name
and renames, so a stop or a crash never leaves half a cache, and ``recover`` queues the
missing ones again.
"""

from __future__ import annotations

import gc
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from eraser import factors as engine_factors
from eraser.errors import EraserError
from eraser.factors import FactorKey, dataset_hash
from eraser.model import adapter_fingerprint, base_fingerprint, load_adapter, load_base, trainable_parameters
from eraser.solvers import SolverConfig

from .errors import FailedPreconditionError, NotFoundError, ShuttingDown, failure_of
from .store import AdapterStore, Version

log = logging.getLogger("eraser.sidecar")

# The solvers that read a factor cache (``datainf`` is factored too, but keeps none).
FACTOR_METHODS = ("ekfac", "kfac")


@dataclass(frozen=True)
class FactorTarget:
    """One cache to fit: the factors of ``adapter`` version ``version`` for ``method``."""

    adapter: str
    version: int
    method: str
    max_length: int

    def __str__(self) -> str:
        return f"{self.adapter} v{self.version} ({self.method})"


def kfac_config(method: str):
    return SolverConfig(method).build().kfac_config()


def wanted_key(store: AdapterStore, version: Version, method: str, max_length: int) -> FactorKey:
    """The key an erase of ``version`` would ask its cache for, computed without loading
    a model: the version's manifest records its adapter hash, the store caches its rows
    and the base model's fingerprint is cached per file."""
    record = store.record(version.adapter)
    return FactorKey(kfac_config(method), base_fingerprint(record.base_model_dir),
                     version.manifest.get("adapter_sha256") or adapter_fingerprint(version.adapter_path),
                     dataset_hash(store.rows(version)), max_length)


def cache_problem(directory: Path, wanted: FactorKey) -> str | None:
    """Why the cache in ``directory`` cannot serve ``wanted`` (None: it can, or there is
    none). Reads the manifest only; the factors are checked again when loaded."""
    if not directory.exists():
        return None
    if not engine_factors.is_cache(directory):
        return "it is not a factor cache (no manifest)"
    try:
        manifest = engine_factors.read_manifest(directory)
    except EraserError:
        return "its manifest is unreadable"
    return engine_factors.mismatch(manifest.get("key", {}), wanted)


def fitted_at(directory: Path) -> float | None:
    """When the factors in ``directory`` were last fitted in full (None: no cache)."""
    if not engine_factors.is_cache(directory):
        return None
    try:
        return float(engine_factors.read_manifest(directory)["history"]["fitted_at"])
    except (EraserError, KeyError, TypeError, ValueError):
        return None


class _Stopped(Exception):
    """The preparer is stopping: abandon the fit in progress."""


class _Obsolete(FailedPreconditionError):
    """The version is no longer current (or gone) and no job waits for its factors."""


class FactorFitFailed(FailedPreconditionError):
    """A job waited for factors whose fit failed."""


class FactorPreparer:
    """One background thread fitting factor caches from a queue, one at a time.

    ``on_fitted(adapter, seconds)`` is called after each full fit, ``on_ready(target)``
    when a cache has been written; both run on the preparer's thread and must not raise.
    """

    POLL_SECONDS = 0.25

    def __init__(self, store: AdapterStore, device, on_fitted: Callable[[str, float], None] = lambda a, s: None,
                 on_ready: Callable[[FactorTarget], None] = lambda t: None, processes: int = 1,
                 min_rows_per_process: int = 100_000):
        self.store = store
        self.device = device
        # A training set of at least processes x min_rows_per_process rows is fitted over that
        # many torch.distributed ranks on this machine (eraser.distributed); smaller ones here.
        self.processes = processes
        self.min_rows_per_process = min_rows_per_process
        self.on_fitted = on_fitted
        self.on_ready = on_ready
        self._cond = threading.Condition()
        self._queue: list[FactorTarget] = []  # first = next; a waited-for target goes first
        self._active: FactorTarget | None = None
        self._active_fraction = 0.0
        self._failed: dict[FactorTarget, BaseException] = {}
        self._waiters: dict[FactorTarget, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="eraser-factors", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Abandon the fit in progress at its next step and end the thread; queued fits
        are dropped (``recover`` queues them again on the next start)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """True while the thread takes fits (a job may wait for one)."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ---- requests ------------------------------------------------------------------
    def ready(self, target: FactorTarget) -> bool:
        return engine_factors.is_cache(self.store.factors_dir(target.adapter, target.version, target.method))

    def pending(self, target: FactorTarget) -> bool:
        with self._cond:
            return target == self._active or target in self._queue

    def request(self, target: FactorTarget, urgent: bool = False) -> bool:
        """Queue a fit unless its cache exists or it is queued already (``urgent``: move
        it to the head of the queue). True when a fit was queued."""
        with self._cond:
            if target == self._active:
                return False
            if target in self._queue:
                if urgent and self._queue[0] != target:
                    self._queue.remove(target)
                    self._queue.insert(0, target)
                return False
            if self.ready(target):
                return False
            self._failed.pop(target, None)
            self._queue.insert(0, target) if urgent else self._queue.append(target)
            self._cond.notify_all()
        log.info("factors of %s queued for a background fit%s", target, " (a job waits)" if urgent else "")
        return True

    def wait(self, target: FactorTarget, check: Callable[[float], None]) -> float:
        """Block until the cache of ``target`` exists, fitting it first in the queue.

        ``check(fraction)`` runs every ``POLL_SECONDS`` with the fit's progress in [0, 1];
        it raises to stop waiting (cancel, deadline, drain). Raises ``ShuttingDown`` when
        the preparer stops, ``FactorFitFailed`` when the fit failed. Returns the seconds
        waited."""
        started = time.monotonic()
        with self._cond:
            self._waiters[target] = self._waiters.get(target, 0) + 1
        try:
            self.request(target, urgent=True)
            while True:
                with self._cond:
                    pending = target == self._active or target in self._queue
                    failed = self._failed.get(target)
                    fraction = self._active_fraction if target == self._active else 0.0
                if not pending:
                    if self.ready(target):
                        return time.monotonic() - started
                    if failed is not None:
                        code, message = failure_of(failed)
                        raise FactorFitFailed(f"the factors of v{target.version} could not be fitted ({code}: "
                                              f"{message})")
                    if self._stop.is_set():
                        raise ShuttingDown("the sidecar is shutting down")
                    self.request(target, urgent=True)  # skipped or deleted meanwhile: again
                    continue
                if self._stop.is_set():
                    raise ShuttingDown("the sidecar is shutting down")
                check(fraction)
                with self._cond:
                    self._cond.wait(self.POLL_SECONDS)
        finally:
            with self._cond:
                self._waiters[target] -= 1
                if not self._waiters[target]:
                    del self._waiters[target]
                    self._failed.pop(target, None)

    def _record_failure(self, target: FactorTarget, error: BaseException) -> None:
        """Kept for the jobs waiting for ``target`` (until the last one has seen it); a
        later request fits again."""
        with self._cond:
            if self._waiters.get(target):
                self._failed[target] = error

    # ---- the thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    break
                target = self._queue.pop(0)
                self._active, self._active_fraction = target, 0.0
            try:
                self._fit(target)
            except _Stopped:
                log.info("background fit of the factors of %s abandoned: stopping", target)
            except _Obsolete as e:
                self._record_failure(target, e)
                log.info("background fit of the factors of %s skipped: %s", target, e)
            except Exception as e:  # noqa: BLE001 - recorded for the waiters, logged
                self._record_failure(target, e)
                code, message = failure_of(e)
                if isinstance(e, EraserError):
                    log.warning("background fit of the factors of %s failed: %s: %s", target, code, message)
                else:
                    log.exception("background fit of the factors of %s failed", target)
            finally:
                with self._cond:
                    self._active = None
                    self._cond.notify_all()
                gc.collect()  # the fit's model copy is garbage now; free it before the next

    def _wanted(self, target: FactorTarget) -> bool:
        with self._cond:
            if self._waiters.get(target):
                return True
        try:
            return self.store.current_number(target.adapter) == target.version
        except (NotFoundError, OSError, ValueError):
            return False

    def _fit(self, target: FactorTarget) -> None:
        if self._stop.is_set():
            raise _Stopped()
        try:
            version = self.store.version(target.adapter, target.version)
        except NotFoundError:
            raise _Obsolete("the version was deleted") from None
        directory = self.store.factors_dir(target.adapter, target.version, target.method)
        problem = cache_problem(directory, wanted_key(self.store, version, target.method, target.max_length))
        if engine_factors.is_cache(directory) and problem is None:
            return
        if problem is not None:  # replaced whole by the save below
            log.warning("the factor cache of %s does not belong to it (%s); refitting", target, problem)
        if not self._wanted(target):
            raise _Obsolete("a newer version is current")
        last_check = [time.monotonic()]

        def progress(stage: str, done: int, total: int, info: dict | None = None) -> None:
            if self._stop.is_set():
                raise _Stopped()
            with self._cond:
                self._active_fraction = min(1.0, done / total) if total else 0.0
            now = time.monotonic()
            if now - last_check[0] > 1.0:
                last_check[0] = now
                if not self._wanted(target):
                    raise _Obsolete("a newer version became current during the fit")

        record = self.store.record(target.adapter)
        started = time.perf_counter()
        ranks = self._ranks(len(self.store.rows(version)))
        log.info("fitting the factors of %s in the background%s", target, f" over {ranks} processes" if ranks > 1 else "")
        if ranks > 1:
            seconds, rows = self._fit_over_ranks(target, version, record, ranks, progress)
        else:
            seconds, rows = self._fit_here(target, version, record, directory, progress)
        if target.version not in self.store.version_numbers(target.adapter):  # pruned during the fit
            self.store.discard_factors(target.adapter, target.version)
            raise _Obsolete("the version was deleted during the fit")
        log.info("factors of %s fitted in %.1f s (%d rows; %.1f s with loading)", target, seconds, rows,
                 time.perf_counter() - started)
        self.on_fitted(target.adapter, seconds)
        self.on_ready(target)

    def _ranks(self, rows: int) -> int:
        return max(1, min(self.processes, rows // max(1, self.min_rows_per_process)))

    def _fit_here(self, target: FactorTarget, version: Version, record, directory: Path, progress) -> tuple[float, int]:
        base = load_base(record.base_model_dir, self.device)
        model = load_adapter(base, version.adapter_path, trainable=True)
        params = [p for _, p in trainable_parameters(model)]
        rows = self.store.rows(version)
        key = FactorKey(kfac_config(target.method), base.fingerprint, adapter_fingerprint(version.adapter_path),
                        dataset_hash(rows), target.max_length)
        cached = engine_factors.fit(model, params, base.tokenizer, rows, key, self.device, progress)
        del model, params, base
        if self._stop.is_set():
            raise _Stopped()
        engine_factors.save(cached, directory)
        return cached.history.fit_seconds, len(rows)

    def _fit_over_ranks(self, target: FactorTarget, version: Version, record, ranks: int, progress) -> tuple[float, int]:
        """The same fit sharded over ``ranks`` processes (gloo on the CPU, NCCL on GPUs), its
        cache written under staging/ and moved into place whole."""
        from eraser.distributed import FitJob, fit_factors

        staged = self.store.new_staging(f"factors-{target.adapter}-v{target.version}-ranks")
        try:
            job = FitJob(record.base_model_dir, str(version.adapter_path), str(version.dataset_path),
                         str(staged / target.method), kfac_config(target.method), target.max_length, str(self.device))
            report = fit_factors(job, nproc=ranks, progress=progress)
            if self._stop.is_set():
                raise _Stopped()
            self.store.install_factors(staged / target.method, target.adapter, target.version, target.method)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return float(report["fit_seconds"]), int(report["rows"])
