"""Hot-swapping adapter versions into serving replicas, and keeping replicas in step.

A swap loads a version's immutable path under the adapter's served name, then confirms
it on the replica: the replica must report that path, and its greedy answer to a probe
prompt must be the answer the sidecar computes itself with the same version: the same
tokens with the same log-probs, within ``probe_tolerance``. The probe prompt is the
prompt of a row of the version's own training set (never erased text), chosen where the
new and the previous version differ most (eraser/probe.py; the erase computes it while it
holds both; a rollback tries the prompt of the probe it undoes or redoes first). Where even
that row's answer moves by less than the tolerance, serving the old weights would pass too:
the check then says it confirmed the path, not the weights.

The reconcile loop (at start and every ``reconcile_seconds``) brings every replica to
every adapter's current version: a restarted vLLM gets its adapters back, a replica that
was down during a job catches up.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from eraser.model import load_adapter, load_base, trainable_parameters
from eraser.probe import VersionProbe, distinguishing_probe, probe_at, prompt_ids

from .report import JobReport
from .serving import ReplicaError, ServingBackend
from .store import AdapterStore, Version

log = logging.getLogger("eraser.sidecar")


@dataclass
class ReplicaState:
    replica: str
    served_path: str = ""
    served_version: int = 0
    current: bool = False
    error: str = ""
    checked_at: float = 0.0
    probe_margin: float = 0.0
    weights_confirmed: bool = False
    max_logprob_error: float = 0.0


@dataclass(frozen=True)
class SwapCheck:
    replica: str
    served_path: str
    max_logprob_error: float
    probe_margin: float
    seconds: float
    served_at: float  # wall clock when the replica was confirmed: the receipt's "served" time
    # Whether the probe could tell the weights apart: a margin above the tolerance. When
    # not, the replica's served path is the confirmation and the job says so.
    weights_confirmed: bool = False


@dataclass
class SwapResult:
    checks: list[SwapCheck] = field(default_factory=list)
    behind: dict[str, str] = field(default_factory=dict)  # replica -> why


class SwapHooks:
    def swap_finished(self, replica: str, outcome: str, seconds: float) -> None: ...
    def replicas_behind(self, adapter: str, n: int) -> None: ...
    def serving_in_step(self, in_step: bool) -> None: ...


def _version_of(path: str) -> int:
    m = re.search(r"/versions/(\d+)/adapter/?$", path or "")
    return int(m.group(1)) if m else 0


class Swapper:
    def __init__(self, backends: Sequence[ServingBackend], store: AdapterStore, device: str = "cpu",
                 tolerance: float = 0.02, hooks: SwapHooks | None = None, versions=None):
        self.backends = list(backends)
        self.store = store
        # Where the adapters and their current versions are read: the store's directories, or
        # the job database (sidecar.pg_jobs.VersionFeed), which also wakes the loop on a change.
        self.versions = versions or store
        self._wake = threading.Event()
        self.device = device
        self.tolerance = tolerance
        self.hooks = hooks or SwapHooks()
        self._states: dict[tuple[str, str], ReplicaState] = {}
        self._probes: dict[tuple[str, int], VersionProbe] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- state ---------------------------------------------------------------------
    def lock(self, adapter: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(adapter, threading.Lock())

    def serving(self) -> dict[str, dict[str, dict]]:
        """Replica -> adapter -> its last known state, for the serving report in the store."""
        with self._guard:
            out: dict[str, dict[str, dict]] = {b.replica: {} for b in self.backends}
            for (adapter, replica), state in self._states.items():
                out.setdefault(replica, {})[adapter] = {k: v for k, v in state.__dict__.items() if k != "replica"}
        return out

    def states(self, adapter: str) -> list[ReplicaState]:
        with self._guard:
            return [self._states.get((adapter, b.replica), ReplicaState(b.replica)) for b in self.backends]

    def _set(self, adapter: str, state: ReplicaState) -> None:
        with self._guard:
            self._states[(adapter, state.replica)] = state
            behind = sum(1 for (a, _), s in self._states.items() if a == adapter and not s.current)
            in_step = all(s.current for s in self._states.values())
        self.hooks.replicas_behind(adapter, behind)
        self.hooks.serving_in_step(in_step)

    # ---- the probe -----------------------------------------------------------------
    def probe(self, version: Version, base_dir: str) -> VersionProbe:
        """The probe for ``version``: the one its erase computed (eraser/probe.py), else
        computed here once (registrations, rollbacks, versions from before probes were
        recorded), against the parent version where it is retained."""
        key = (version.adapter, version.number)
        if key not in self._probes:
            report = JobReport.from_json(version.manifest.get("report"))
            stored = report.engine.probe if report is not None and report.engine is not None else None
            self._probes[key] = stored or self._compute_probe(version, base_dir)
        for stale in [k for k in self._probes if k[0] == version.adapter and k[1] < version.number - 2]:
            self._probes.pop(stale, None)
        return self._probes[key]

    def _compute_probe(self, version: Version, base_dir: str) -> VersionProbe:
        base = load_base(base_dir, self.device)
        model = load_adapter(base, version.adapter_path, trainable=True)
        params = [p for _, p in trainable_parameters(model)]
        rows = self.store.rows(version)
        parent_values = None
        parent = version.manifest.get("parent_version")
        if parent and parent in self.store.version_numbers(version.adapter):
            previous = load_adapter(load_base(base_dir, self.device),
                                    self.store.version(version.adapter, parent).adapter_path, trainable=True)
            parent_values = [p.detach() for _, p in trainable_parameters(previous)]
            # A rollback undoes or redoes one change: the prompt that told the parent from its own
            # parent most likely tells them apart again, without ranking every candidate.
            hint = self._known_probe(version.adapter, parent)
            # Only a prompt of this version's own rows: a probe is never erased text.
            if hint is not None and any(prompt_ids(base.tokenizer, r.prompt) == list(hint.prompt_ids) for r in rows):
                probe = probe_at(model, hint.prompt_ids, params, parent_values, self.device)
                if probe.margin > self.tolerance:
                    return probe
        return distinguishing_probe(model, base.tokenizer, rows, params, parent_values, self.device)

    def _known_probe(self, adapter: str, number: int) -> VersionProbe | None:
        """The probe of version ``number`` already at hand: recorded by its erase, or computed here."""
        if (adapter, number) in self._probes:
            return self._probes[(adapter, number)]
        report = JobReport.from_json(self.store.version(adapter, number).manifest.get("report"))
        return report.engine.probe if report is not None and report.engine is not None else None

    # ---- one replica ---------------------------------------------------------------
    def _swap_one(self, backend: ServingBackend, version: Version, probe: VersionProbe) -> SwapCheck:
        started = time.perf_counter()
        path = str(version.adapter_path)
        try:
            backend.load(version.adapter, path)
            served = backend.adapters().get(version.adapter, "")
            if served != path:
                raise ReplicaError(f"{backend.replica} reports {served or 'nothing'} for {version.adapter}, not {path}")
            ids, logprobs = backend.generate(version.adapter, probe.prompt_ids, len(probe.answer_ids))
            if tuple(ids) != probe.answer_ids:
                raise ReplicaError(f"{backend.replica} serves other weights: its greedy answer to the probe differs "
                                   f"from this version's")
            error = max(abs(a - b) for a, b in zip(logprobs, probe.answer_logprobs))
            if error > self.tolerance:
                raise ReplicaError(f"{backend.replica} serves other weights: probe log-probs differ by {error:.3g} "
                                   f"(tolerance {self.tolerance:g})")
        except ReplicaError as e:
            seconds = time.perf_counter() - started
            self.hooks.swap_finished(backend.replica, "failed", seconds)
            served = self._served_path(backend, version.adapter)
            self._set(version.adapter, ReplicaState(backend.replica, served, _version_of(served), False, str(e), time.time()))
            raise
        seconds = time.perf_counter() - started
        self.hooks.swap_finished(backend.replica, "succeeded", seconds)
        confirmed = probe.margin > self.tolerance
        self._set(version.adapter, ReplicaState(backend.replica, path, version.number, True, "", time.time(),
                                                probe.margin, confirmed, error))
        return SwapCheck(backend.replica, path, error, probe.margin, seconds, time.time(), confirmed)

    @staticmethod
    def _served_path(backend: ServingBackend, adapter: str) -> str:
        try:
            return backend.adapters().get(adapter, "")
        except ReplicaError:
            return ""

    # ---- a swap, with retries ------------------------------------------------------
    def swap(self, version: Version, base_dir: str, timeout: float, stop: threading.Event | None = None,
             progress: Callable[[int, int, list[str]], None] | None = None) -> SwapResult:
        """Load ``version`` on every replica and confirm it; retry the ones that fail
        with exponential backoff until ``timeout`` seconds have passed or ``stop`` is set."""
        result = SwapResult()
        if not self.backends:
            return result
        probe = self.probe(version, base_dir)
        pending = list(self.backends)
        deadline = time.monotonic() + timeout
        delay = 0.5
        with self.lock(version.adapter):
            while pending:
                for backend in list(pending):
                    try:
                        result.checks.append(self._swap_one(backend, version, probe))
                        pending.remove(backend)
                        result.behind.pop(backend.replica, None)
                    except ReplicaError as e:
                        result.behind[backend.replica] = str(e)
                if progress:
                    progress(len(self.backends) - len(pending), len(self.backends), sorted(result.behind))
                if not pending or time.monotonic() + delay > deadline or (stop is not None and stop.is_set()):
                    break
                log.warning("swap of %s v%d: %d replica(s) behind, retrying in %.1f s: %s", version.adapter,
                            version.number, len(pending), delay, "; ".join(result.behind.values()))
                if stop is not None:
                    if stop.wait(delay):
                        break
                else:
                    time.sleep(delay)
                delay = min(delay * 2, 10.0)
        return result

    # ---- reconcile -----------------------------------------------------------------
    def reconcile_once(self, base_dir_of: Callable[[str], str]) -> dict[str, list[str]]:
        """Make every replica serve every adapter's current version; return adapter ->
        replicas still behind. Adapters being swapped by a job right now are skipped."""
        behind: dict[str, list[str]] = {}
        for name in self.versions.names():
            lock = self.lock(name)
            if not lock.acquire(blocking=False):
                continue
            try:
                self._reconcile_adapter(name, base_dir_of, behind)
            except Exception as e:  # one adapter's fault (missing files, base model) is that adapter's
                log.exception("reconcile of %s failed", name)
                for backend in self.backends:
                    self._set(name, ReplicaState(backend.replica, "", 0, False, f"reconcile failed: {e}", time.time()))
                behind[name] = [b.replica for b in self.backends]
            finally:
                lock.release()
        return behind

    def _reconcile_adapter(self, name: str, base_dir_of: Callable[[str], str], behind: dict[str, list[str]]) -> None:
        """Bring every replica to ``name``'s current version; record who stays behind."""
        version = self.store.version(name, self.versions.current_number(name))
        probe = None
        for backend in self.backends:
            state = next((s for s in self.states(name) if s.replica == backend.replica), None)
            try:
                served = backend.adapters().get(name, "")
            except ReplicaError as e:
                self._set(name, ReplicaState(backend.replica, "", 0, False, str(e), time.time()))
                behind.setdefault(name, []).append(backend.replica)
                continue
            if served == str(version.adapter_path) and state is not None and state.current:
                continue  # confirmed earlier, still the same path
            try:
                probe = probe or self.probe(version, base_dir_of(name))
                self._swap_one(backend, version, probe)
                if served != str(version.adapter_path):
                    log.info("reconciled %s: %s now serves v%d (was %s)", backend.replica, name, version.number,
                             served or "not loaded")
            except ReplicaError as e:
                behind.setdefault(name, []).append(backend.replica)
                log.warning("reconcile: %s", e)

    def start(self, every: float, base_dir_of: Callable[[str], str], after_pass: Callable[[], None] = lambda: None) -> None:
        def loop():
            while not self._stop.is_set():
                try:
                    self.reconcile_once(base_dir_of)
                    after_pass()
                except Exception:
                    log.exception("reconcile failed")
                if self._wake.wait(every):  # a new version was announced, or the period passed
                    self._wake.clear()

        self._thread = threading.Thread(target=loop, name="eraser-reconcile", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Start the next reconcile pass now (a version changed)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
