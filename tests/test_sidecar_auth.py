"""Bearer token, TLS and mutual TLS of the sidecar, over a real gRPC server on loopback."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.auth import (BearerTokenInterceptor, channel_credentials, open_channel, server_credentials,
                          token_metadata_interceptors)
from sidecar.config import ConfigError
from sidecar.metrics import Metrics
from tlsutil import COUNT, ECHO, TestServer, make_certs, stream, unary

TOKEN = "s3cret-Token_0123456789"
WRONG = "guess-Token_9876543210"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture()
def token_server():
    with TestServer([Metrics().rpc_interceptor(), BearerTokenInterceptor(TOKEN)]) as server:
        yield server


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def _check(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.mark.parametrize("call", [unary, stream], ids=["unary", "stream"])
def test_token_is_required(token_server, call):
    with grpc.insecure_channel(token_server.target) as channel:
        code, details = _code(lambda: call(channel))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "missing bearer token" in details
    with open_channel(token_server.target, token=WRONG) as channel:
        code, details = _code(lambda: call(channel))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert details == "invalid bearer token"  # one line, and never the token presented
    with open_channel(token_server.target, token=TOKEN) as channel:
        assert call(channel) in (b"hi", [b"0", b"1", b"2"])


def test_header_forms(token_server):
    with grpc.insecure_channel(token_server.target) as channel:
        echo = channel.unary_unary(ECHO)
        assert echo(b"x", metadata=[("authorization", f"bearer {TOKEN}")], timeout=5) == b"x"  # RFC 6750: any case
        for value in (TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer ", f"Bearer {TOKEN[:-1]}"):
            code, details = _code(lambda: echo(b"x", metadata=[("authorization", value)], timeout=5))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN[:8] not in details and "\n" not in details
        two = [("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")]
        assert _code(lambda: echo(b"x", metadata=two, timeout=5))[0] == grpc.StatusCode.UNAUTHENTICATED


def test_client_interceptor_replaces_an_existing_header(token_server):
    with open_channel(token_server.target, token=TOKEN) as channel:
        assert channel.unary_unary(ECHO)(b"y", metadata=[("authorization", "Bearer stale")], timeout=5) == b"y"
        assert list(channel.unary_stream(COUNT)(b"2", metadata=[("x-other", "kept")], timeout=5)) == [b"0", b"1"]


def test_health_needs_no_token(token_server):
    assert _check(token_server.target) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(token_server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_unknown_method_stays_unimplemented(token_server):
    # The auth interceptor lets grpcio answer for methods that do not exist, so that no
    # made-up method name reaches the metrics interceptor before it.
    with grpc.insecure_channel(token_server.target) as channel:
        assert _code(lambda: unary(channel, "/test.v1.Echo/Nope"))[0] == grpc.StatusCode.UNIMPLEMENTED


def test_no_token_configured_means_open():
    with TestServer([Metrics().rpc_interceptor()]) as server, grpc.insecure_channel(server.target) as channel:
        assert unary(channel) == b"hi"
        assert stream(channel) == [b"0", b"1", b"2"]


def test_bad_tokens_are_refused_at_configuration():
    for token in ("", "two words", "tab\tbed", "caf\u00e9"):
        with pytest.raises(ConfigError) as info:
            BearerTokenInterceptor(token)
        assert token not in str(info.value) or not token
        with pytest.raises(ConfigError):
            token_metadata_interceptors(token)


def test_tls(certs):
    with TestServer(credentials=server_credentials(certs.server_cert, certs.server_key)) as server:
        with open_channel(server.target, ca=certs.ca) as channel:
            assert unary(channel) == b"hi"
            assert stream(channel) == [b"0", b"1", b"2"]
        with open_channel(server.target, ca=certs.other_ca) as channel:
            assert _code(lambda: unary(channel, timeout=3))[0] == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(server.target) as channel:  # plain text to a TLS port
            assert _code(lambda: unary(channel, timeout=3))[0] == grpc.StatusCode.UNAVAILABLE


def test_tls_with_token(certs):
    credentials = server_credentials(certs.server_cert, certs.server_key)
    with TestServer([Metrics().rpc_interceptor(), BearerTokenInterceptor(TOKEN)], credentials) as server:
        with open_channel(server.target, ca=certs.ca, token=TOKEN) as channel:
            assert unary(channel) == b"hi"
            assert stream(channel) == [b"0", b"1", b"2"]
        with open_channel(server.target, ca=certs.ca) as channel:
            assert _code(lambda: unary(channel))[0] == grpc.StatusCode.UNAUTHENTICATED


def test_mutual_tls(certs):
    credentials = server_credentials(certs.server_cert, certs.server_key, client_ca=certs.ca)
    with TestServer(credentials=credentials) as server:
        with open_channel(server.target, ca=certs.ca) as channel:  # no client certificate
            assert _code(lambda: unary(channel, timeout=3))[0] == grpc.StatusCode.UNAVAILABLE
        with open_channel(server.target, ca=certs.ca, cert=certs.client_cert, key=certs.client_key) as channel:
            assert unary(channel) == b"hi"
            assert stream(channel) == [b"0", b"1", b"2"]


def test_mutual_tls_refuses_a_certificate_from_another_ca(certs, tmp_path):
    other = make_certs(tmp_path / "other")  # a whole second PKI: its client cert is not ours
    credentials = server_credentials(certs.server_cert, certs.server_key, client_ca=certs.ca)
    with TestServer(credentials=credentials) as server:
        with open_channel(server.target, ca=certs.ca, cert=other.client_cert, key=other.client_key) as channel:
            assert _code(lambda: unary(channel, timeout=3))[0] == grpc.StatusCode.UNAVAILABLE


def test_credential_arguments(certs, tmp_path):
    with pytest.raises(ConfigError):
        channel_credentials(certs.ca, cert=certs.client_cert)  # a certificate without its key
    with pytest.raises(ConfigError, match="cannot read"):
        server_credentials(tmp_path / "absent.pem", certs.server_key)
