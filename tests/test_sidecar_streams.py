"""Long-lived streams on the real sidecar over loopback: hundreds of open WatchJob
streams leave health checks and unary calls answering, and the stream caps (per client,
and for the unauthenticated health Watch) refuse with RESOURCE_EXHAUSTED."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
from sidecar.auth import open_channel
from test_sidecar import SLOW, config_for, register
from sidecar.server import start

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
