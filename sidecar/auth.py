"""Authentication of the sidecar: a bearer token, TLS and mutual TLS.

The server side is a ``BearerTokenInterceptor`` plus ``server_credentials``; the client
side (erasectl, tests, other services) is ``open_channel``, which sets up the same three
things from paths and a token.

The token travels as ``authorization: Bearer <token>`` metadata, added by a client
interceptor rather than by gRPC call credentials: grpcio refuses call credentials on an
insecure channel, and a token over plain text on loopback or inside a pod's network
namespace is a supported setup.
"""

from __future__ import annotations

import collections
import hmac
import re
from pathlib import Path
from typing import Iterable, Sequence

import grpc

from sidecar.aioserver import handler_factory
from sidecar.config import ConfigError
from sidecar.errors import Unauthenticated
from sidecar.wire import abort

HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
# Visible ASCII without spaces: anything else could not be sent as a metadata value, or
# would make "Bearer <token>" ambiguous.
_TOKEN = re.compile(r"[\x21-\x7e]+")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED.

    Methods in ``exempt`` (full names, "/package.Service/Method") are let through: by
    default the standard health service, so that Kubernetes gRPC probes need no token.
    """

    def __init__(self, token: str, exempt: Iterable[str] = HEALTH_METHODS):
        # The messages never show the token: they end up in logs.
        if not isinstance(token, str) or not token:
            raise ConfigError("the token is empty")
        if not _TOKEN.fullmatch(token):
            raise ConfigError("the token must be printable ASCII without spaces")
        self._token = token.encode("ascii")
        self._exempt = frozenset(exempt)

    async def intercept_service(self, continuation, handler_call_details):
        # Ask for the handler first: an unknown method stays UNIMPLEMENTED (grpc's own
        # answer) instead of getting a refusal handler, so that no interceptor before
        # this one (metrics) ever sees a method name made up by a client.
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._exempt:
            return handler
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        return _refusal(handler, problem)

    def _problem(self, metadata) -> str | None:
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return "missing bearer token: send metadata 'authorization: Bearer <token>'"
        if len(values) > 1:
            return "more than one authorization header"
        value = values[0]
        if isinstance(value, bytes):  # only "-bin" keys carry bytes, but be safe
            value = value.decode("latin-1")
        scheme, _, presented = value.strip().partition(" ")
        if scheme.lower() != "bearer":  # RFC 6750: the scheme is case-insensitive
            return "the authorization header is not a bearer token"
        # Constant time: the comparison must not tell how much of a guess was right.
        if not hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), self._token):
            return "invalid bearer token"
        return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    # A handler of the same kind as the real one, so the client sees a well-formed
    # (unary or streaming) call that ends with UNAUTHENTICATED. No deserializer: the
    # request is never looked at.
    async def refuse(request_or_iterator, context):
        await abort(context, Unauthenticated(message))

    return handler_factory(handler)(refuse)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror}") from None


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials for the server; with ``client_ca``, mutual TLS: clients must
    present a certificate signed by that CA."""
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    return grpc.ssl_server_credentials([pair], root_certificates=_read(client_ca, "client CA"),
                                       require_client_auth=client_ca is not None)


def channel_credentials(ca: Path | None = None, cert: Path | None = None,
                        key: Path | None = None) -> grpc.ChannelCredentials:
    """TLS credentials for a client: trust ``ca`` (else the system roots) and, for mutual
    TLS, present ``cert`` with ``key``."""
    if (cert is None) != (key is None):
        raise ConfigError("a client certificate and its key go together")
    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "CA certificate"),
                                        private_key=_read(key, "client key"),
                                        certificate_chain=_read(cert, "client certificate"))


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call, of any kind."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        # Replace, not add: two authorization headers are refused by the server.
        metadata = [(k, v) for k, v in (getattr(details, "metadata", None) or ()) if k.lower() != "authorization"]
        metadata.append(self._header)
        return _CallDetails(details.method, getattr(details, "timeout", None), metadata,
                            getattr(details, "credentials", None), getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def token_metadata_interceptors(token: str) -> list:
    """Client interceptors sending ``token`` as a bearer token, for ``grpc.intercept_channel``.

    One object handling all four kinds of calls; works on insecure and secure channels.
    """
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise ConfigError("the token must be non-empty printable ASCII without spaces")
    return [_TokenMetadata(token)]


def open_channel(target: str, *, token: str | None = None, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to ``target``: TLS when ``ca`` or ``cert`` is given (``cert`` and ``key``
    for mutual TLS), else plain text; sending ``token`` on every call when given."""
    if ca is not None or cert is not None or key is not None:
        channel = grpc.secure_channel(target, channel_credentials(ca, cert, key), options=list(options))
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    if token is not None:
        channel = grpc.intercept_channel(channel, *token_metadata_interceptors(token))
    return channel
