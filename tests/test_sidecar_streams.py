"""Long-lived streams on the real sidecar over loopback: hundreds of open WatchJob
streams leave health checks and unary calls answering, and the stream caps (per client,
and for the unauthenticated health Watch) refuse with RESOURCE_EXHAUSTED."""

from __future__ import annotations

import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
from sidecar.auth import open_channel
from sidecar.server import start
from test_sidecar import SLOW, config_for, register
from tlsutil import make_certs

WATCHES = 500
CHANNELS = 10
CALL_DEADLINE = 10.0  # a correctness bound for the unary calls, not a latency target
TOKEN = "streams-test-token"


def channels(target: str, n: int, token: str | None = None) -> list[grpc.Channel]:
    # A local subchannel pool: each channel its own connection, as separate clients have.
    return [open_channel(target, token=token, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)]


def open_watches(chans: list[grpc.Channel], job_id: str, n: int) -> list:
    stubs = [pb_grpc.EraserStub(c) for c in chans]
    return [stubs[i % len(stubs)].WatchJob(pb.GetJobRequest(id=job_id), timeout=300) for i in range(n)]


def health_check(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="eraser.v1.Eraser"), timeout=CALL_DEADLINE).status


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def close_all(items) -> None:
    for item in items:
        (item.cancel if hasattr(item, "cancel") else item.close)()


def test_health_and_unary_calls_answer_while_500_watches_are_open(tmp_path, tiny_base, tiny_adapter, train_file):
    sidecar = start(config_for(tmp_path / "store", max_watches_per_client=WATCHES))
    chans = channels(sidecar.target, CHANNELS)
    watches = []
    try:
        stub = pb_grpc.EraserStub(chans[0])
        register(stub, "many", tiny_base, tiny_adapter, train_file)
        slow = stub.Erase(pb.EraseRequest(adapter="many", request_id="many-slow", remove_ids=["born-ann"], options=SLOW))
        watches = open_watches(chans, slow.id, WATCHES)
        assert health_check(chans[-1]) == health_pb2.HealthCheckResponse.SERVING
        firsts = [next(w) for w in watches]  # every stream is open and has answered
        assert {f.id for f in firsts} == {slow.id}
        assert health_check(chans[1]) == health_pb2.HealthCheckResponse.SERVING
        assert stub.GetJob(pb.GetJobRequest(id=slow.id), timeout=CALL_DEADLINE).id == slow.id
        assert [a.name for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=CALL_DEADLINE).adapters] == ["many"]
        queued = stub.Erase(pb.EraseRequest(adapter="many", request_id="many-next", remove_ids=["born-bob"]),
                            timeout=CALL_DEADLINE)
        assert queued.state == pb.JOB_STATE_QUEUED
        stub.CancelJob(pb.CancelJobRequest(id=slow.id), timeout=CALL_DEADLINE)
        # Every watch follows the job to its end: the cancellation reaches all 500.
        rests = [list(w) for w in watches]
        assert all(rest and rest[-1].state == pb.JOB_STATE_CANCELLED for rest in rests)
        stub.CancelJob(pb.CancelJobRequest(id=queued.id), timeout=CALL_DEADLINE)
    finally:
        close_all(watches)
        close_all(chans)
        sidecar.stop(1.0)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def first_or_code(stream):
    """The stream's first message, or the status code it ended with instead."""
    try:
        return next(stream)
    except grpc.RpcError as e:
        return e.code()


def opens_again(open_stream, tries: int = 100):
    """A stream opened once a freed slot shows on the server (the cancel travels there)."""
    for _ in range(tries):
        stream = open_stream()
        first = first_or_code(stream)
        if first != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return stream, first
        time.sleep(0.05)
    raise AssertionError("no slot came free")


def test_watches_are_capped_per_client_and_in_all(tmp_path, tiny_base, tiny_adapter, train_file):
    # 127.0.0.1 and ::1 are two clients to a server listening on both (a machine without
    # IPv6 loopback fails here rather than leave the cap untested).
    assert ipv6_loopback(), "two client addresses on one host need IPv6 loopback (::1)"
    sidecar = start(config_for(tmp_path / "store", listen_host="::", max_watches=5, max_watches_per_client=3))
    v4, v6 = channels(f"127.0.0.1:{sidecar.grpc_port}", 1) + channels(f"[::1]:{sidecar.grpc_port}", 1)
    streams = []
    try:
        stub = pb_grpc.EraserStub(v4)
        register(stub, "capped", tiny_base, tiny_adapter, train_file)
        slow = stub.Erase(pb.EraseRequest(adapter="capped", request_id="capped-slow", remove_ids=["born-ann"], options=SLOW))
        streams += open_watches([v4], slow.id, 3)
        assert all(first_or_code(w).id == slow.id for w in streams)
        error = refusal(lambda: next(open_watches([v4], slow.id, 1)[0]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 3 per client" in error.details()

        streams += open_watches([v6], slow.id, 2)  # another client: its own 3, of the 5 in all
        assert all(first_or_code(w).id == slow.id for w in streams[3:])
        error = refusal(lambda: next(open_watches([v6], slow.id, 1)[0]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 5" in error.details()
        assert health_check(v6) == health_pb2.HealthCheckResponse.SERVING  # unary calls are not streams
        assert stub.GetJob(pb.GetJobRequest(id=slow.id), timeout=CALL_DEADLINE).id == slow.id

        streams.pop(0).cancel()  # closing a stream frees its slot, for any client
        stream, first = opens_again(lambda: open_watches([v6], slow.id, 1)[0])
        streams.append(stream)
        assert first.id == slow.id
        stub.CancelJob(pb.CancelJobRequest(id=slow.id), timeout=CALL_DEADLINE)
        assert all(list(w)[-1].state == pb.JOB_STATE_CANCELLED for w in streams)  # and they end with the job
        streams = open_watches([v4], slow.id, 3)  # ended streams hold no slot
        assert all(first_or_code(w).state == pb.JOB_STATE_CANCELLED for w in streams)
    finally:
        close_all(streams)
        close_all([v4, v6])
        sidecar.stop(1.0)


def test_under_mutual_tls_the_per_client_cap_counts_certificates_not_addresses(tmp_path, tiny_base, tiny_adapter,
                                                                                train_file):
    # Two clients on one address (as behind a proxy) each get their own cap; one client's
    # connections count together.
    certs = make_certs(tmp_path / "pki")
    sidecar = start(config_for(tmp_path / "store", max_watches=5, max_watches_per_client=2, tls_cert=certs.server_cert,
                               tls_key=certs.server_key, tls_client_ca=certs.ca))
    target = f"localhost:{sidecar.grpc_port}"
    mtls = lambda cert, key: open_channel(target, ca=certs.ca, cert=cert, key=key,  # noqa: E731
                                          options=[("grpc.use_local_subchannel_pool", 1)])
    first = [mtls(certs.client_cert, certs.client_key) for _ in range(2)]
    second = mtls(certs.second_client_cert, certs.second_client_key)
    streams = []
    try:
        stub = pb_grpc.EraserStub(first[0])
        register(stub, "certs", tiny_base, tiny_adapter, train_file)
        slow = stub.Erase(pb.EraseRequest(adapter="certs", request_id="certs-slow", remove_ids=["born-ann"], options=SLOW))
        streams += open_watches(first, slow.id, 2)  # one client, over two connections
        assert all(first_or_code(w).id == slow.id for w in streams)
        error = refusal(lambda: next(open_watches([first[1]], slow.id, 1)[0]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 2 per client" in error.details()
        assert "eraser test client" in error.details()
        streams += open_watches([second], slow.id, 2)  # same address, another certificate
        assert all(first_or_code(w).id == slow.id for w in streams[2:])
        stub.CancelJob(pb.CancelJobRequest(id=slow.id), timeout=CALL_DEADLINE)
    finally:
        close_all(streams)
        close_all(first + [second])
        sidecar.stop(1.0)


def test_health_watches_are_bounded_without_a_token(tmp_path):
    sidecar = start(config_for(tmp_path / "store", token=TOKEN, max_health_watches=2, max_watches=3,
                               max_watches_per_client=3))
    anonymous, = channels(sidecar.target, 1)
    authenticated, = channels(sidecar.target, 1, token=TOKEN)
    health = health_pb2_grpc.HealthStub(anonymous)
    request = health_pb2.HealthCheckRequest(service="eraser.v1.Eraser")
    watches = [health.Watch(request, timeout=60) for _ in range(2)]
    try:
        assert all(first_or_code(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
        error = refusal(lambda: next(health.Watch(request, timeout=60)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "health Watch" in error.details()
        assert health_check(anonymous) == health_pb2.HealthCheckResponse.SERVING  # the probe still answers
        refused = {"service": "grpc.health.v1.Health", "method": "Watch", "code": "RESOURCE_EXHAUSTED"}
        assert sidecar.metrics.registry.get_sample_value("eraser_rpc_duration_seconds_count", refused) == 1
        # Job watches have bounds of their own: a client without the token gets none of
        # them, one with it is not held back by the health streams.
        for _ in range(5):
            error = refusal(lambda: next(open_watches([anonymous], "no-such-job", 1)[0]))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert refusal(lambda: next(open_watches([authenticated], "no-such-job", 1)[0])).code() \
            == grpc.StatusCode.NOT_FOUND

        watches.pop().cancel()
        watch, first = opens_again(lambda: health.Watch(request, timeout=60))
        watches.append(watch)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        close_all(watches)
        close_all([anonymous, authenticated])
        sidecar.stop(1.0)
