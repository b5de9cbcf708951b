"""Prometheus metrics of the sidecar, in a registry of their own.

Every metric is named ``eraser_*`` and lives in the ``CollectorRegistry`` of its
``Metrics`` object, not in prometheus_client's global one, so that several sidecars (and
the tests) can run in one process without "Duplicated timeseries" errors.

No label ever carries user text, because label values are series that live as long as
the process: they come only from the fixed vocabularies below, from gRPC method names
that have a registered handler, from status code names, or from adapter names (chosen by
the operator and validated by ``sidecar.config.ADAPTER_NAME``). A value outside these
raises ``ValueError``: that is a bug in the caller, and the tests should see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import re
import threading
import time
from typing import Callable, Mapping
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, start_http_server
from prometheus_client.exposition import ThreadingWSGIServer

from sidecar.aioserver import behavior_of, with_behavior
from sidecar.config import ADAPTER_NAME

TASKS = ("remove", "modify_query", "correct_response", "mixed")
# The kinds of rows a request erases; a job mixing them is task "mixed".
ROW_KINDS = ("remove", "modify_query", "correct_response")
OUTCOMES = ("succeeded", "failed", "cancelled")
# Stages pre-created at zero; the engine may report others named like these.
STAGES = ("load", "gradient", "curvature_setup", "solve", "evaluate", "write")
_STAGE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")

# RPCs: most answer in milliseconds, but a Watch stream lasts as long as its job.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
               300.0, 1800.0, 7200.0)
# Jobs take from a tenth of a second (a tiny adapter) to hours (a direct solve).
JOB_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
               7200.0)
# A stage can be much shorter than a job (writing a small adapter).
STAGE_BUCKETS = (0.01, 0.025, 0.05) + JOB_BUCKETS
# Relative residual ||Ax - b|| / ||b||, log-spaced from 1e-6 to 10. Written as text so
# that the bounds are exact decimals ("3e-05", not 2.9999999999999997e-05).
RESIDUAL_BUCKETS = tuple(float(f"{m}e{e}") for e in range(-6, 1) for m in (1, 3)) + (10.0,)
# Loading a small adapter takes milliseconds; confirming it runs one probe request.
SWAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SWAP_OUTCOMES = ("succeeded", "failed")
# Replica labels are the operator's configured vLLM URLs (sidecar.config validates them).
_REPLICA = re.compile(r"https?://[^\s\"]{1,200}")
# Factor fits: a full fit of a small adapter takes a second, of a large one minutes; a
# downdate (the affected rows only) a fraction of that.
FACTOR_FIT_BUCKETS = (0.01, 0.025, 0.05) + JOB_BUCKETS
FACTOR_FIT_KINDS = ("full", "downdate")
# Verified forgetting: the membership-inference AUC (erased vs held-out rows; 0.5 =
# never-seen-like, 1 = memorised) after the influence update ("before" refinement) and of
# the adapter as published or refused ("after"), in steps of 0.05.
VERIFY_STAGES = ("before", "after")
AUC_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
# passed: enforce, no refinement needed; refined: enforce, passed after refining; failed:
# enforce, refused (nothing published); reported: policy report (scored, never refined).
VERIFY_OUTCOMES = ("passed", "refined", "failed", "reported")
# Refinement: a few Adam steps on a tiny adapter (a tenth of a second), up to the budget
# (erase.verify_max_seconds, 600 s by default) on a real one.
REFINE_BUCKETS = (0.01, 0.025, 0.05) + JOB_BUCKETS
# Utility check (eraser.unlearn.UtilityCheck): the rise of the retained rows' mean NLL
# (nats) under an update, against erase.max_retain_rise (0.3 by default). A sound erase
# moves it by hundredths, either way; a broken step by nats (10 measured on SmolLM2).
UTILITY_OUTCOMES = ("passed", "failed")
RISE_BUCKETS = (-0.5, -0.1, -0.01, 0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)
# A NaN or infinite residual would make eraser_solver_residual_sum NaN or +Inf for the
# life of the process; it is recorded as this value instead, above the last bucket.
_RESIDUAL_CEILING = 1e3


class Metrics:
    """The sidecar's metrics and the hooks that update them.

    ``registry`` holds them all; ``serve`` exposes it over HTTP. Every method is
    thread-safe (prometheus_client's metrics are).
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = CollectorRegistry() if registry is None else registry
        self._define_job_metrics(self.registry)
        self._define_serving_metrics(self.registry)
        self._define_engine_metrics(self.registry)
        self._zero_known_series()

    def _define_job_metrics(self, r: CollectorRegistry) -> None:
        self._rpc_duration = Histogram(
            "eraser_rpc_duration_seconds", "gRPC calls handled, by method and status code, until the last response.",
            ("method", "service", "code"), buckets=RPC_BUCKETS, registry=r)
        self._jobs = Counter("eraser_jobs_total", "Erase jobs finished, by task and outcome.",
                             ("task", "outcome"), registry=r)
        self._jobs_accepted = Counter("eraser_jobs_accepted_total", "Erase jobs accepted into the queue, by task.",
                                      ("task",), registry=r)
        self._stage_duration = Histogram("eraser_job_stage_duration_seconds", "Time spent in each stage of an erase job.",
                                         ("stage",), buckets=STAGE_BUCKETS, registry=r)
        self._job_duration = Histogram("eraser_job_duration_seconds", "Wall time of erase jobs, by outcome.",
                                       ("outcome",), buckets=JOB_BUCKETS, registry=r)
        self._residual = Histogram("eraser_solver_residual", "Relative residual of the linear solve of each job.",
                                   buckets=RESIDUAL_BUCKETS, registry=r)
        self._rows_erased = Counter("eraser_rows_erased_total", "Training rows erased by succeeded jobs, by kind.",
                                    ("task",), registry=r)
        self._queue_depth = Gauge("eraser_queue_depth", "Erase jobs waiting in the queue.", registry=r)
        self._jobs_running = Gauge("eraser_jobs_running", "Erase jobs running now.", registry=r)
        self._adapter_version = Gauge("eraser_adapter_version", "Current version of each adapter.",
                                      ("adapter",), registry=r)
        self._requests_merged = Counter(
            "eraser_requests_merged_total",
            "Erase requests that joined an already queued job instead of starting a solve of their own.", registry=r)

    def _define_serving_metrics(self, r: CollectorRegistry) -> None:
        self._swap_duration = Histogram(
            "eraser_swap_duration_seconds", "Time to load a version on one replica and confirm it (path and probe).",
            ("outcome",), buckets=SWAP_BUCKETS, registry=r)
        self._swaps = Counter("eraser_swaps_total", "Adapter loads on serving replicas, by replica and outcome.",
                              ("replica", "outcome"), registry=r)
        self._replicas_behind = Gauge("eraser_replicas_behind",
                                      "Serving replicas not (yet) serving the adapter's current version.",
                                      ("adapter",), registry=r)

    def _define_engine_metrics(self, r: CollectorRegistry) -> None:
        self._factor_age = Gauge(
            "eraser_factor_age_seconds",
            "Seconds since the last full fit of the EK-FAC/K-FAC factors of the adapter's current version (downdates "
            "keep the age of the fit they started from). No series while the current version has no factors.",
            ("adapter",), registry=r)
        self._factor_fits = Counter("eraser_factor_fits_total",
                                    "EK-FAC/K-FAC factor caches written, by adapter and kind (full fit or downdate).",
                                    ("adapter", "kind"), registry=r)
        self._factor_fit_seconds = Histogram("eraser_factor_fit_seconds",
                                             "Time to fit (full) or downdate EK-FAC/K-FAC factors.",
                                             ("kind",), buckets=FACTOR_FIT_BUCKETS, registry=r)
        self._verifications = Counter(
            "eraser_verifications_total",
            "Erase jobs whose erased rows were verified against the adapter's held-out rows, by adapter and outcome "
            "(passed, refined, failed, reported).", ("adapter", "outcome"), registry=r)
        self._verification_auc = Histogram(
            "eraser_verification_auc",
            "Membership-inference AUC of erased vs held-out rows (0.5: never-seen-like; 1: memorised), after the "
            "influence update (stage before) and of the adapter as published or refused (stage after).",
            ("stage",), buckets=AUC_BUCKETS, registry=r)
        self._refine_seconds = Histogram("eraser_refine_seconds",
                                         "Time spent refining an erase until its rows looked never-seen (enforce).",
                                         buckets=REFINE_BUCKETS, registry=r)
        self._utility_checks = Counter(
            "eraser_utility_checks_total",
            "Erase updates whose retained rows' NLL was checked against erase.max_retain_rise, by adapter and "
            "outcome (passed; failed: refused, nothing published).", ("adapter", "outcome"), registry=r)
        self._utility_rise = Histogram(
            "eraser_utility_retain_nll_rise",
            "Rise of the retained rows' mean NLL (nats/token) under each checked update (negative: it fell).",
            buckets=RISE_BUCKETS, registry=r)

    def _zero_known_series(self) -> None:
        """Series known in advance exist from the start at zero, so that rate() and alerts
        (e.g. on failed jobs) see them before the first job."""
        for task in TASKS:
            self._jobs_accepted.labels(task)
            for outcome in OUTCOMES:
                self._jobs.labels(task, outcome)
        for outcome in OUTCOMES:
            self._job_duration.labels(outcome)
        for stage in STAGES:
            self._stage_duration.labels(stage)
        for kind in ROW_KINDS:
            self._rows_erased.labels(kind)
        for outcome in SWAP_OUTCOMES:
            self._swap_duration.labels(outcome)
        for kind in FACTOR_FIT_KINDS:
            self._factor_fit_seconds.labels(kind)
        for stage in VERIFY_STAGES:
            self._verification_auc.labels(stage)

    def rpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        """A grpc.aio server interceptor timing every call into ``eraser_rpc_duration_seconds``.

        Put it first (outermost) in the server's interceptors, so that calls refused by
        the interceptors after it (authentication, stream bounds) are counted too. It handles all four
        kinds of methods; a stream is timed until it ends, and counted with the status
        the client receives: the code given to ``context.abort``/``set_code``, UNKNOWN for
        an uncaught exception, CANCELLED or DEADLINE_EXCEEDED when the client went away.
        Calls to methods without a handler are not counted: their names are client text.
        """
        return _RpcMetricsInterceptor(self._rpc_duration)

    def job_finished(self, *, task: str, outcome: str, stage_seconds: Mapping[str, float], total_seconds: float,
                     residual: float | None, rows: Mapping[str, int]) -> None:
        """Record a finished job: its count, durations, residual and, on success, its rows.

        ``task`` is one of ``TASKS``, ``outcome`` one of ``OUTCOMES``; ``rows`` maps row
        kinds (``ROW_KINDS``) to counts, each added under its own ``task`` label.
        """
        _check(task in TASKS, f"task must be one of {', '.join(TASKS)}, not {task!r}")
        _check(outcome in OUTCOMES, f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        for stage, seconds in stage_seconds.items():
            _check(isinstance(stage, str) and _STAGE_NAME.fullmatch(stage) is not None,
                   f"stage names are lowercase identifiers, not {stage!r}")
            _check_seconds(seconds, f"stage {stage}")
        _check_seconds(total_seconds, "total_seconds")
        for kind, count in rows.items():
            _check(kind in ROW_KINDS, f"row kinds are {', '.join(ROW_KINDS)}, not {kind!r}")
            _check_count(count, f"rows[{kind!r}]")
        if residual is not None:
            _check(not residual < 0, "the residual is a norm ratio, it cannot be negative")
        # Everything is checked before anything is recorded: no half-recorded job.
        self._jobs.labels(task, outcome).inc()
        self._job_duration.labels(outcome).observe(total_seconds)
        for stage, seconds in stage_seconds.items():
            self._stage_duration.labels(stage).observe(seconds)
        if residual is not None:
            self._residual.observe(residual if math.isfinite(residual) else _RESIDUAL_CEILING)
        if outcome == "succeeded":
            for kind, count in rows.items():
                if count:
                    self._rows_erased.labels(kind).inc(count)

    def set_queue_depth(self, queued: int, running: int) -> None:
        """Set ``eraser_queue_depth`` (jobs waiting) and ``eraser_jobs_running``."""
        _check_count(queued, "queued")
        _check_count(running, "running")
        self._queue_depth.set(queued)
        self._jobs_running.set(running)

    def set_current_version(self, adapter: str, version: int) -> None:
        """Set ``eraser_adapter_version{adapter}`` to the adapter's current version."""
        _check_adapter(adapter)
        _check_count(version, "version")
        self._adapter_version.labels(adapter).set(version)

    def forget_adapter(self, adapter: str) -> None:
        """Drop the version series of an adapter that is no longer served (no-op if none)."""
        _check_adapter(adapter)
        for gauge in (self._adapter_version, self._factor_age):
            try:
                gauge.remove(adapter)
            except KeyError:
                pass

    def requests_merged(self, n: int) -> None:
        """Count ``n`` requests that joined an existing queued job instead of starting their own solve."""
        _check_count(n, "n")
        self._requests_merged.inc(n)

    def job_accepted(self, task: str) -> None:
        """Count a job accepted into the queue (``task`` is one of ``TASKS``)."""
        _check(task in TASKS, f"task must be one of {', '.join(TASKS)}, not {task!r}")
        self._jobs_accepted.labels(task).inc()

    def swap_finished(self, replica: str, outcome: str, seconds: float) -> None:
        """Record one swap attempt on one replica (``outcome``: succeeded or failed)."""
        _check(outcome in SWAP_OUTCOMES, f"swap outcome must be one of {', '.join(SWAP_OUTCOMES)}, not {outcome!r}")
        _check(isinstance(replica, str) and _REPLICA.fullmatch(replica) is not None,
               f"replicas are configured http(s) URLs, not {replica!r}")
        _check_seconds(seconds, "seconds")
        self._swaps.labels(replica, outcome).inc()
        self._swap_duration.labels(outcome).observe(seconds)

    def set_replicas_behind(self, adapter: str, n: int) -> None:
        """Set ``eraser_replicas_behind{adapter}``: replicas not serving its current version."""
        _check_adapter(adapter)
        _check_count(n, "n")
        self._replicas_behind.labels(adapter).set(n)

    def factor_fit(self, adapter: str, kind: str, seconds: float) -> None:
        """Count one factor cache written for ``adapter`` (``kind``: full or downdate) and its time."""
        _check_adapter(adapter)
        _check(kind in FACTOR_FIT_KINDS, f"factor fit kinds are {', '.join(FACTOR_FIT_KINDS)}, not {kind!r}")
        _check_seconds(seconds, "seconds")
        self._factor_fits.labels(adapter, kind).inc()
        self._factor_fit_seconds.labels(kind).observe(seconds)

    def set_factors_fitted_at(self, adapter: str, fitted_at: float | None) -> None:
        """``eraser_factor_age_seconds{adapter}`` counts from ``fitted_at`` (a Unix time,
        the last full fit of the current version's factors), evaluated at each scrape;
        None removes the series: the current version has no factors (yet).

        Absent rather than NaN or 0: a comparison such as ``> 86400`` is then simply
        false for that adapter, and ``eraser_adapter_version unless on (adapter)
        eraser_factor_age_seconds`` lists the adapters without factors."""
        _check_adapter(adapter)
        if fitted_at is None:
            try:
                self._factor_age.remove(adapter)
            except KeyError:
                pass
            return
        _check(isinstance(fitted_at, (int, float)) and math.isfinite(fitted_at),
               f"fitted_at must be a finite Unix time, not {fitted_at!r}")
        self._factor_age.labels(adapter).set_function(lambda: max(0.0, time.time() - fitted_at))

    def verification(self, adapter: str, outcome: str, *, auc_before: float | None, auc_after: float | None,
                     refine_seconds: float | None) -> None:
        """Record one verification: its outcome (``VERIFY_OUTCOMES``), the AUC before and
        after refinement (None: not measured, e.g. no erased rows to score) and the time
        refinement took (None: it did not run)."""
        _check_adapter(adapter)
        _check(outcome in VERIFY_OUTCOMES, f"verification outcomes are {', '.join(VERIFY_OUTCOMES)}, not {outcome!r}")
        for name, auc in (("auc_before", auc_before), ("auc_after", auc_after)):
            _check(auc is None or (isinstance(auc, (int, float)) and 0.0 <= auc <= 1.0),
                   f"{name} must be in [0, 1], not {auc!r}")
        if refine_seconds is not None:
            _check_seconds(refine_seconds, "refine_seconds")
        self._verifications.labels(adapter, outcome).inc()
        for stage, auc in (("before", auc_before), ("after", auc_after)):
            if auc is not None:
                self._verification_auc.labels(stage).observe(auc)
        if refine_seconds is not None:
            self._refine_seconds.observe(refine_seconds)

    def utility_checked(self, adapter: str, rise: float, passed: bool) -> None:
        """Record one utility check: the retained rows' NLL ``rise`` and whether it passed."""
        _check_adapter(adapter)
        _check(isinstance(rise, (int, float)), f"rise must be a number, not {rise!r}")
        _check(isinstance(passed, bool), f"passed must be a bool, not {passed!r}")
        self._utility_checks.labels(adapter, "passed" if passed else "failed").inc()
        if math.isfinite(rise):  # a NaN check fails, but has no place among the buckets
            self._utility_rise.observe(rise)

    def serve(self, host: str, port: int) -> "MetricsServer":
        """Serve the registry over HTTP (GET /metrics) on ``host:port``; port 0 picks a free one."""
        return MetricsServer(*_start_http(host, port, self.registry))


class MetricsServer:
    """A running /metrics HTTP server: ``port`` is the bound port, ``close()`` stops it."""

    def __init__(self, server, thread: threading.Thread):
        self._server = server
        self._thread = thread
        self.port: int = server.server_port
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """Stop serving and free the port; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()  # waits for serve_forever to return
        self._server.server_close()  # closes the listening socket: the port is free again
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_http(host: str, port: int, registry: CollectorRegistry):
    # prometheus_client >= 0.20 returns (server, thread), which is what close() needs. An
    # older one returns nothing, and its server could never be stopped: ask it only when
    # its signature promises the pair, else run the same WSGI app in a server of our own.
    if "Thread" in str(inspect.signature(start_http_server).return_annotation):
        server, thread = start_http_server(port, addr=host, registry=registry)
        return server, thread
    server = make_server(host, port, make_wsgi_app(registry), ThreadingWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="eraser-metrics", daemon=True)
    thread.start()
    return server, thread


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # a scrape every few seconds is not news
        pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_count(value, name: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
           f"{name} must be an integer >= 0, not {value!r}")


def _check_seconds(value, name: str) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
           f"{name} must be a finite number of seconds >= 0, not {value!r}")


def _check_adapter(adapter) -> None:
    _check(isinstance(adapter, str) and ADAPTER_NAME.fullmatch(adapter) is not None,
           f"adapter names match {ADAPTER_NAME.pattern}, not {adapter!r}")


# --- the RPC interceptor -------------------------------------------------------------
#
# grpc.aio gives an interceptor only the method name and metadata; the status of a call
# is known from inside the handler. So the interceptor wraps the handler's behavior and
# reads ``context.code()`` (what abort() and set_code() store) when it returns or raises
# or its response stream ends; a client that went away shows as the handler's task being
# cancelled.


def _code_name(context) -> str | None:
    code = context.code()
    return None if code is None else code.name


# The server's deadline is the client's timeout counted from when the call arrived, so
# it ends a little after the client's own: a client whose deadline passed may cancel while
# the server still sees some time left.
_DEADLINE_SLACK_SECONDS = 0.25


def _gone(context) -> str:
    # The client cancelled, or its deadline passed (which the server also sees as a
    # cancellation; the client sees DEADLINE_EXCEEDED).
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= _DEADLINE_SLACK_SECONDS else "CANCELLED"


def _completed(context) -> str:
    return _code_name(context) or "OK"


def _failed(context) -> str:
    # What grpc.aio sends after an uncaught exception: the code set before it, else UNKNOWN
    # (abort() is an exception with the code set).
    return _code_name(context) or "UNKNOWN"


class _Once:
    """Observes a call's duration once, whichever of its ends comes first (all of them
    run on the server's event loop)."""

    __slots__ = ("_histogram", "_method", "_service", "_start", "_done")

    def __init__(self, histogram: Histogram, method: str, service: str):
        self._histogram, self._method, self._service = histogram, method, service
        self._start = time.perf_counter()
        self._done = False

    def __call__(self, code: str) -> None:
        if self._done:
            return
        self._done = True
        self._histogram.labels(self._method, self._service, code).observe(time.perf_counter() - self._start)


class _RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, histogram: Histogram):
        self._histogram = histogram

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            # grpc answers UNIMPLEMENTED itself; the name is whatever the client sent,
            # so it must not become a label.
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        start = functools.partial(_Once, self._histogram, method, service)
        behavior = behavior_of(handler)
        timed = _timed_generator(behavior, start) if inspect.isasyncgenfunction(behavior) else _timed(behavior, start)
        return with_behavior(handler, timed)


def _timed(behavior, start: Callable[[], _Once]):
    # A coroutine: a unary call, or a stream written with context.write() (the health
    # servicer's Watch).
    @functools.wraps(behavior)
    async def timed(request, context):
        record = start()
        try:
            response = await behavior(request, context)
        except asyncio.CancelledError:
            record(_gone(context))
            raise
        except Exception:
            record(_failed(context))
            raise
        record(_completed(context))
        return response

    return timed


def _timed_generator(behavior, start: Callable[[], _Once]):
    # The time covers the whole stream, sends included (each yield returns when grpc has
    # taken the message).
    @functools.wraps(behavior)
    async def timed(request, context):
        record = start()
        try:
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, GeneratorExit):
            record(_gone(context))
            raise
        except Exception:
            record(_failed(context))
            raise
        record(_completed(context))

    return timed
