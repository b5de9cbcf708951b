"""The gRPC face of the sidecar: eraser.v1.Eraser, grpc.health.v1 and reflection.

A grpc.aio server on an event loop of its own (``aioserver.LoopThread``): a stream waits
as a coroutine, so open WatchJob and health Watch streams hold no thread and cannot starve
unary calls; their number is bounded (``streams``). Handlers translate protobuf to
``EraserService`` calls and back, the blocking calls in a bounded thread pool; every error
goes through ``wire.status_of`` (the one mapping to status codes) in ``_answer``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Awaitable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc

from .aioserver import HealthStatus, LoopThread
from .config import SidecarConfig
from .errors import failure_of
from .job_model import Job, RequestPayload
from .metrics import Metrics
from .report import JobReport, Utility, Verification
from .service import EraserService, Hooks
from .store import Version
from .streams import Changes, StreamLimitInterceptor, wait_for
from .wire import (adapter_message, job_message, options_dict, purge_message, receipt_key_message, receipt_message,
                   status_of)

log = logging.getLogger("eraser.sidecar")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Eraser"].full_name
WATCH_HEARTBEAT_SECONDS = 1.0
# Threads for the blocking work of unary calls (and of each WatchJob read); streams
# themselves hold none.
RPC_THREADS = 64
# Concurrent calls grpc admits beyond every stream the bounds allow: open streams can
# never make it refuse a unary call or a health check.
UNARY_RPCS = 256


class _Call:
    """What a handler body, running in the RPC pool, may ask of its call: whether the
    client still waits. (grpc.aio's context belongs to the event loop's thread.)"""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._done = threading.Event()
        context.add_done_callback(lambda _: self._done.set())

    def is_active(self) -> bool:
        return not self._done.is_set()


def _guarded(handler):
    """A unary RPC served by ``handler``, a blocking function of (self, request, call)
    run in the RPC pool; every exception becomes its status code (``_answer``)."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        return await self._answer(context, handler.__name__, self._in_pool(handler, self, request, _Call(context)))

    return wrapper


class EraserServicer(pb_grpc.EraserServicer):
    def __init__(self, service: EraserService, pool: futures.Executor, changes: Changes):
        self.service = service
        self._pool = pool
        self._changes = changes
        self._reads: dict[tuple[str, asyncio.Event], asyncio.Future] = {}

    def _in_pool(self, function, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(function, *args))

    async def _answer(self, context, name: str, pending: Awaitable):
        """What ``pending`` gives; an exception ends the call with its status code and a
        one-line detail."""
        try:
            return await pending
        except Exception as e:
            code, message = status_of(e)
            if failure_of(e)[0] == "INTERNAL":
                log.exception("%s failed", name)
            await context.abort(code, message)

    def _job_since(self, job_id: str, change: asyncio.Event) -> Awaitable[Job]:
        """The job, read after ``change`` was taken. Watchers of one job waiting on the same
        change share the read: 500 watchers cost one database read per change, not 500."""
        key = (job_id, change)
        read = self._reads.get(key)
        if read is None:
            read = self._reads[key] = self._in_pool(self.service.job, job_id)
            read.add_done_callback(lambda _: self._reads.pop(key, None))
        return asyncio.shield(read)  # one watcher leaving must not cancel the others' read

    @_guarded
    def RegisterAdapter(self, request, context):
        version = self.service.register(request.name, request.base_model, request.adapter_path, request.dataset_path,
                                        request.holdout_path, request.verify)
        return adapter_message(self.service.view(version))

    @_guarded
    def GetAdapter(self, request, context):
        return adapter_message(self.service.adapter(request.name))

    @_guarded
    def ListAdapters(self, request, context):
        return pb.ListAdaptersResponse(adapters=[adapter_message(v) for v in self.service.adapters()])

    @_guarded
    def Erase(self, request, context):
        payload = RequestPayload(
            tuple(request.remove_ids),
            tuple((m.id, m.prompt) for m in request.modify_queries),
            tuple((c.id, c.response) for c in request.correct_responses),
        )
        job = self.service.submit(request.adapter, request.request_id, payload, options_dict(request.options),
                                  request.options.deadline_seconds, still_wanted=context.is_active)
        return job_message(job)

    @_guarded
    def GetJob(self, request, context):
        return job_message(self.service.job(request.id))

    async def WatchJob(self, request, context):
        # A coroutine between changes: it holds a thread only while it reads the job.
        last = None
        while True:
            changed = self._changes.next()  # before the read: a change during it still wakes us
            job = await self._answer(context, "WatchJob", self._job_since(request.id, changed))
            seen = (job.state, job.stage, round(job.fraction, 3), job.attempts)
            if seen != last:
                last = seen
                yield job_message(job)
            if job.state.terminal:
                return
            await wait_for(changed, WATCH_HEARTBEAT_SECONDS)

    @_guarded
    def ListJobs(self, request, context):
        jobs = self.service.jobs(request.adapter or None, request.state, request.limit)
        return pb.ListJobsResponse(jobs=[job_message(j) for j in jobs])

    @_guarded
    def CancelJob(self, request, context):
        return job_message(self.service.cancel(request.id, request.request_id))

    @_guarded
    def Rollback(self, request, context):
        return adapter_message(self.service.view(self.service.rollback(request.adapter, request.version)))

    @_guarded
    def GetErasureReceipt(self, request, context):
        return receipt_message(self.service.receipt(request.job_id))

    @_guarded
    def GetReceiptKey(self, request, context):
        signer = self.service.receipt_key()
        return receipt_key_message(signer.public_key_pem, signer.key_id)

    @_guarded
    def PurgeHistory(self, request, context):
        return purge_message(self.service.purge(request.adapter, request.before_version))


def _never_raises(method):
    """Metrics must never change a job's outcome: a recording error is logged, not raised."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            method(*args, **kwargs)
        except Exception:
            log.exception("recording metrics failed in %s", method.__name__)

    return wrapper


SERVING_HEALTH = "eraser.serving"  # SERVING while every replica serves every adapter's current version


class MetricsHooks(Hooks):
    def __init__(self, metrics: Metrics, health_status: HealthStatus):
        self.metrics = metrics
        self.health = health_status

    @_never_raises
    def swap_finished(self, replica: str, outcome: str, seconds: float) -> None:
        self.metrics.swap_finished(replica, outcome, seconds)

    @_never_raises
    def replicas_behind(self, adapter: str, n: int) -> None:
        self.metrics.set_replicas_behind(adapter, n)

    @_never_raises
    def serving_in_step(self, in_step: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if in_step else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(SERVING_HEALTH, status)

    @_never_raises
    def job_accepted(self, job: Job, merged: bool) -> None:
        self.metrics.job_accepted(job.task)
        if merged:
            self.metrics.requests_merged(1)

    @_never_raises
    def job_finished(self, job: Job) -> None:
        report = job.report or JobReport()
        total = (job.finished_at or time.time()) - job.created_at
        self.metrics.job_finished(task=job.task, outcome=job.state.name.lower(),
                                  stage_seconds={k: v for k, v in report.seconds.items() if k != "total"},
                                  total_seconds=total, residual=report.engine.residual if report.engine else None,
                                  rows=job.counts)

    @_never_raises
    def version_published(self, adapter: str, version: Version) -> None:
        self.metrics.set_current_version(adapter, version.number)

    @_never_raises
    def queue_changed(self, queued: int, running: int) -> None:
        self.metrics.set_queue_depth(queued, running)

    @_never_raises
    def factors_fitted(self, adapter: str, kind: str, seconds: float) -> None:
        self.metrics.factor_fit(adapter, kind, seconds)

    @_never_raises
    def factors_age(self, adapter: str, fitted_at: float | None) -> None:
        self.metrics.set_factors_fitted_at(adapter, fitted_at)

    @_never_raises
    def verification_finished(self, adapter: str, verification: Verification) -> None:
        v = verification
        self.metrics.verification(
            adapter, v.outcome, auc_before=v.before.auc if v.before else None,
            auc_after=v.final.auc if v.final else None,
            refine_seconds=v.refinement.seconds if v.refinement else None)

    @_never_raises
    def utility_checked(self, adapter: str, utility: Utility) -> None:
        self.metrics.utility_checked(adapter, utility.rise, utility.passed)


@dataclass
class RunningSidecar:
    config: SidecarConfig
    service: EraserService
    server: grpc.aio.Server
    health: HealthStatus
    metrics: Metrics
    metrics_server: object
    grpc_port: int
    metrics_port: int
    loop: LoopThread
    pool: futures.ThreadPoolExecutor
    _stopped: threading.Event

    @property
    def target(self) -> str:
        host = self.config.listen_host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '[::]') else host}:{self.grpc_port}"

    def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new RPCs, give the running job ``grace``
        seconds (config.drain_seconds by default), then leave it to resume on restart."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.drain_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        stopped = self.loop.submit(self.server.stop(grace))
        self.service.drain(grace)
        futures.wait([stopped], grace + 5)
        self.loop.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.metrics_server.close()
        log.info("stopped")

    def wait(self) -> None:
        self.loop.run(self.server.wait_for_termination())


def start(config: SidecarConfig, metrics: Metrics | None = None) -> RunningSidecar:
    """Recover the store, then serve gRPC and metrics; returns once ready."""
    metrics = metrics or Metrics()
    loop = LoopThread("eraser-grpc")
    health_status = HealthStatus(health_aio.HealthServicer(), loop)
    service = None
    try:
        service = EraserService(config, MetricsHooks(metrics, health_status))
        return _serve(config, metrics, health_status, service, loop)
    except BaseException:
        if service is not None:
            service.release_store()
        loop.close()
        raise


def _serve(config: SidecarConfig, metrics: Metrics, health_status: HealthStatus, service: EraserService,
           loop: LoopThread) -> RunningSidecar:
    from .auth import BearerTokenInterceptor

    if service.computes and not config.import_roots:
        log.warning("import_roots is empty: RegisterAdapter copies from any server path outside the store; set "
                    "import_roots (--import-root) to confine it")
    outcome = service.recover()
    if any(outcome.values()):
        log.info("recovery: %s", ", ".join(f"{k} {v}" for k, v in outcome.items()))
    streams = StreamLimitInterceptor(config.max_watches, config.max_watches_per_client, config.max_health_watches)
    interceptors = [metrics.rpc_interceptor()]
    if config.token:
        interceptors.append(BearerTokenInterceptor(config.token))
    interceptors.append(streams)  # after authentication: a refused call takes no stream slot
    pool = futures.ThreadPoolExecutor(max_workers=RPC_THREADS, thread_name_prefix="eraser-rpc")
    changes = Changes(loop)
    service.on_change(changes.notify)
    servicer = EraserServicer(service, pool, changes)
    try:
        server, port = loop.run(_bound_server(config, servicer, health_status.servicer, interceptors,
                                              streams.open_streams_limit + UNARY_RPCS))
        metrics_server = metrics.serve(config.metrics_host, config.metrics_port)
        loop.run(server.start())
    except BaseException:
        pool.shutdown(wait=False)
        raise
    service.start()
    for name in ("", SERVICE_NAME):
        health_status.set(name, health_pb2.HealthCheckResponse.SERVING)
    if not config.vllm_urls:
        health_status.set(SERVING_HEALTH, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving eraser.v1 on %s:%d (%s%s), metrics on %s:%d, store %s, device %s, %d vLLM replica(s)",
             config.listen_host, port, "TLS" if config.tls else "plaintext", ", mutual TLS" if config.tls_client_ca else "",
             config.metrics_host, metrics_server.port, config.store, config.device, len(config.vllm_urls))
    return RunningSidecar(config, service, server, health_status, metrics, metrics_server, port, metrics_server.port,
                          loop, pool, threading.Event())


async def _bound_server(config: SidecarConfig, servicer: EraserServicer, health_servicer: health_aio.HealthServicer,
                        interceptors: list, maximum_concurrent_rpcs: int) -> tuple[grpc.aio.Server, int]:
    """The server with every service added, bound to its port but not started (a grpc.aio
    server is made on the loop that runs it)."""
    from .auth import server_credentials

    server = grpc.aio.server(interceptors=interceptors, maximum_concurrent_rpcs=maximum_concurrent_rpcs)
    pb_grpc.add_EraserServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = _listen_address(config.listen_host, config.grpc_port)
    if config.tls:
        port = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise OSError(f"cannot listen on {address}")
    return server, port


def _listen_address(host: str, port: int) -> str:
    # A bare IPv6 host ("::" listens on IPv4 and IPv6) needs brackets before its port.
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
