"""Long-lived streams on the sidecar's grpc.aio server: how many may be open, and how a
WatchJob stream waits for the next change without holding a thread.

Open streams are bounded so that they never take the room unary calls need: the server's
``maximum_concurrent_rpcs`` is the sum of these bounds plus room for unary calls. Health
Watch streams need no token, so they have a bound of their own that nothing else shares.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import ipaddress
from typing import Callable, Iterator

import grpc

from .aioserver import LoopThread, behavior_of, with_behavior
from .errors import TooManyStreams
from .wire import abort

HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


class Changes:
    """The service's change notifications, as something coroutines on one loop can await.

    Take ``next()`` before reading the state it is about: a change between the read and
    the wait then still wakes the waiter.
    """

    def __init__(self, loop: LoopThread):
        self._loop = loop
        self._next = asyncio.Event()

    def next(self) -> asyncio.Event:
        """An event set at the next change."""
        return self._next

    def notify(self) -> None:
        """From any thread: wake everything waiting on ``next()``."""
        self._loop.call_soon(self._fire)

    def _fire(self) -> None:
        fired, self._next = self._next, asyncio.Event()
        fired.set()


async def wait_for(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` seconds pass, whichever comes first."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


def client_of(context) -> str:
    """Who a call comes from, for the per-client bound. Under mutual TLS: the client
    certificate's subject, so that clients behind one proxy or NAT address stay apart and one
    client's connections count together. Otherwise the peer's address without its port, so
    that every connection from one host counts together (an IPv4-mapped IPv6 address counts
    as the IPv4 one). A shared bearer token cannot tell clients apart."""
    subject = certificate_subject(context)
    if subject is not None:
        return f"certificate {subject}"
    kind, _, address = context.peer().partition(":")  # "ipv4:10.0.0.7:5123", "ipv6:[::1]:5123"
    if kind not in ("ipv4", "ipv6"):
        return context.peer()  # e.g. unix:/path: one local client
    host = address.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    return str(getattr(ip, "ipv4_mapped", None) or ip)


def certificate_subject(context) -> str | None:
    """The verified client certificate's subject (mutual TLS), or None without one."""
    properties = context.auth_context() or {}
    for key in ("x509_subject", "x509_common_name"):
        if properties.get(key):
            return properties[key][0].decode("utf-8", "replace")
    return None


class StreamSlots:
    """Open streams, counted in all and per client; refuses one beyond either bound.

    Used from the server's event loop only, so it needs no lock.
    """

    def __init__(self, what: str, total: int, per_client: int | None = None):
        self.what, self.total, self.per_client = what, total, per_client
        self._open = 0
        self._by_client: collections.Counter[str] = collections.Counter()

    def refusal(self, client: str) -> str | None:
        """Why a new stream from ``client`` is refused, or None if it may open."""
        if self._open >= self.total:
            return f"too many open {self.what} streams (at most {self.total}); try again later"
        if self.per_client is not None and self._by_client[client] >= self.per_client:
            return (f"too many open {self.what} streams from {client} (at most {self.per_client} per client); "
                    "close some first")
        return None

    @contextlib.contextmanager
    def held(self, client: str) -> Iterator[None]:
        self._open += 1
        self._by_client[client] += 1
        try:
            yield
        finally:
            self._open -= 1
            self._by_client[client] -= 1
            if not self._by_client[client]:
                del self._by_client[client]


class StreamLimitInterceptor(grpc.aio.ServerInterceptor):
    """Bounds open response streams: health Watch in all; every other stream (WatchJob,
    reflection) in all and per client. Beyond a bound: RESOURCE_EXHAUSTED.

    Put it after the authentication interceptor: a refused call never takes a slot.
    """

    def __init__(self, max_watches: int, max_watches_per_client: int, max_health_watches: int):
        self._watches = StreamSlots("watch", max_watches, max_watches_per_client)
        self._health = StreamSlots("health Watch", max_health_watches)

    @property
    def open_streams_limit(self) -> int:
        """The most streams the bounds let be open at once."""
        return self._watches.total + self._health.total

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        slots = self._health if handler_call_details.method == HEALTH_WATCH else self._watches
        return with_behavior(handler, _capped(behavior_of(handler), slots))


async def _admitted(slots: StreamSlots, context) -> str:
    """The calling client, once a slot is free for it; else the call ends RESOURCE_EXHAUSTED."""
    client = client_of(context)
    problem = slots.refusal(client)
    if problem is not None:
        await abort(context, TooManyStreams(problem))
    return client


def _capped(behavior: Callable, slots: StreamSlots) -> Callable:
    # Same kind as the behavior: grpc.aio runs an async generator and a coroutine writing
    # with context.write() (the health servicer's Watch) differently.
    if inspect.isasyncgenfunction(behavior):
        async def capped_generator(request, context):
            with slots.held(await _admitted(slots, context)):
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response

        return capped_generator

    async def capped(request, context):
        with slots.held(await _admitted(slots, context)):
            return await behavior(request, context)

    return capped
