"""The pieces of the sidecar's grpc.aio server: its event loop, in a thread of its own,
and rebuilding a method handler around another behavior (what the interceptors do).

The server is asynchronous so that a long-lived stream (WatchJob, health Watch) costs a
coroutine, not one of a fixed number of threads; blocking work runs in a bounded pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Callable, Coroutine

import grpc
from grpc_health.v1.health import aio as health_aio

_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class LoopThread:
    """An asyncio event loop running in a daemon thread until ``close()``."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine) -> concurrent.futures.Future:
        """Run ``coroutine`` on the loop; the future is thread-safe."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine, timeout: float | None = None) -> Any:
        """Run ``coroutine`` on the loop and wait for its result (from another thread)."""
        return self.submit(coroutine).result(timeout)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Schedule ``callback`` on the loop from any thread; a no-op once the loop is closed
        (a late notification has nobody left to wake)."""
        try:
            self.loop.call_soon_threadsafe(callback)
        except RuntimeError:
            pass

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop, stop it and join its thread."""
        if self.loop.is_closed():
            return
        self.run(_cancel_other_tasks(), timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        self.loop.close()


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable:
    """The function that serves a call of ``handler``, whichever of the four kinds it is."""
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def handler_factory(handler: grpc.RpcMethodHandler) -> Callable[..., grpc.RpcMethodHandler]:
    """The grpc function making handlers of ``handler``'s kind (unary or streaming each way)."""
    return _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]


def with_behavior(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as ``handler`` that runs ``behavior``."""
    return handler_factory(handler)(behavior, handler.request_deserializer, handler.response_serializer)


class HealthStatus:
    """A grpc.aio health servicer's statuses, set from any thread (the sidecar's hooks run
    on its worker threads); each call returns once the status is in place."""

    def __init__(self, servicer: health_aio.HealthServicer, loop: LoopThread, timeout: float = 5.0):
        self.servicer, self._loop, self._timeout = servicer, loop, timeout

    def set(self, service: str, status: int) -> None:
        self._loop.run(self.servicer.set(service, status), self._timeout)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on, whatever ``set`` is called with later."""
        self._loop.run(self.servicer.enter_graceful_shutdown(), self._timeout)
