"""Test helpers for the sidecar's transport: throwaway certificates and a tiny gRPC server.

``make_certs`` writes a CA, a server certificate for localhost/127.0.0.1 and a client
certificate signed by it, plus an unrelated CA that must be refused. EC P-256 keys (fast
to make) and one-day validity: nothing here should outlive a test run.

``TestServer`` serves the standard health service and a generic ``test.v1.Echo`` service
(bytes in, bytes out: no protos) on 127.0.0.1, port 0.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from sidecar.aioserver import HealthStatus, LoopThread


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    second_client_cert: Path  # another client of the same CA
    second_client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool, usage=None, sans=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               # A few minutes back for clock skew; one day ahead is plenty for a test.
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def make_certs(directory: Path) -> Certs:
    """Write a test PKI into ``directory`` and return the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, other_key = _key(), _key()
    ca = _cert("eraser test CA", ca_key, _name("eraser test CA"), ca_key, ca=True)
    other = _cert("unrelated test CA", other_key, _name("unrelated test CA"), other_key, ca=True)
    server_key, client_key, second_key = _key(), _key(), _key()
    server = _cert("localhost", server_key, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   sans=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    client = _cert("eraser test client", client_key, ca.subject, ca_key, ca=False,
                   usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    second = _cert("eraser second test client", second_key, ca.subject, ca_key, ca=False,
                   usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return Certs(
        ca=_write_cert(directory / "ca.pem", ca),
        server_cert=_write_cert(directory / "server.pem", server),
        server_key=_write_key(directory / "server.key", server_key),
        client_cert=_write_cert(directory / "client.pem", client),
        client_key=_write_key(directory / "client.key", client_key),
        other_ca=_write_cert(directory / "other-ca.pem", other),
        second_client_cert=_write_cert(directory / "client2.pem", second),
        second_client_key=_write_key(directory / "client2.key", second_key),
    )


# --- a tiny gRPC server -----------------------------------------------------------------

ECHO_SERVICE = "test.v1.Echo"
ECHO = f"/{ECHO_SERVICE}/Echo"  # unary-unary: returns the request
COUNT = f"/{ECHO_SERVICE}/Count"  # unary-stream: request b"3" -> b"0", b"1", b"2"
MISSING = f"/{ECHO_SERVICE}/Missing"  # unary-unary: aborts with NOT_FOUND
BROKEN = f"/{ECHO_SERVICE}/Broken"  # unary-unary: raises (UNKNOWN)
BROKEN_STREAM = f"/{ECHO_SERVICE}/BrokenStream"  # unary-stream: one message, then aborts NOT_FOUND
SET_CODE = f"/{ECHO_SERVICE}/SetCode"  # unary-unary: set_code(FAILED_PRECONDITION), returns b""
ENDLESS = f"/{ECHO_SERVICE}/Endless"  # unary-stream: one message, then waits until cancelled


async def _echo(request: bytes, context) -> bytes:
    return request


async def _count(request: bytes, context):
    for i in range(int(request or b"0")):
        yield str(i).encode()


async def _missing(request: bytes, context) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


async def _broken(request: bytes, context) -> bytes:
    raise RuntimeError("a bug")


async def _broken_stream(request: bytes, context):
    yield b"first"
    await context.abort(grpc.StatusCode.NOT_FOUND, "gone while streaming")


async def _set_code(request: bytes, context) -> bytes:
    context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
    context.set_details("not now")
    return b""


async def _endless(request: bytes, context):
    yield b"started"
    await asyncio.Event().wait()  # until the call is cancelled


def echo_handler() -> grpc.GenericRpcHandler:
    unary = grpc.unary_unary_rpc_method_handler
    stream = grpc.unary_stream_rpc_method_handler
    return grpc.method_handlers_generic_handler(ECHO_SERVICE, {
        "Echo": unary(_echo), "Count": stream(_count), "Missing": unary(_missing), "Broken": unary(_broken),
        "BrokenStream": stream(_broken_stream), "SetCode": unary(_set_code), "Endless": stream(_endless),
    })


class TestServer:
    """A started grpc.aio server on 127.0.0.1 (plain or TLS), like the sidecar's:
    ``target``, ``health`` (a ``HealthStatus``), ``stop()``."""

    __test__ = False  # not a pytest test class

    def __init__(self, interceptors=(), credentials: grpc.ServerCredentials | None = None):
        self._loop = LoopThread("test-grpc")
        self.server = self._loop.run(self._build(list(interceptors), credentials))
        self.target = f"127.0.0.1:{self.port}"

    async def _build(self, interceptors, credentials) -> grpc.aio.Server:
        server = grpc.aio.server(interceptors=interceptors)
        self.health = HealthStatus(health_aio.HealthServicer(), self._loop)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        server.add_generic_rpc_handlers((echo_handler(),))
        if credentials is None:
            self.port = server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = server.add_secure_port("127.0.0.1:0", credentials)
        assert self.port, "could not bind 127.0.0.1:0"
        await server.start()
        return server

    def stop(self) -> None:
        self._loop.run(self.server.stop(grace=None), 5)
        self._loop.close()

    def __enter__(self) -> "TestServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def unary(channel: grpc.Channel, method: str = ECHO, request: bytes = b"hi", timeout: float = 5) -> bytes:
    return channel.unary_unary(method)(request, timeout=timeout)


def stream(channel: grpc.Channel, method: str = COUNT, request: bytes = b"3", timeout: float = 5) -> list[bytes]:
    return list(channel.unary_stream(method)(request, timeout=timeout))
