"""The sidecar's Prometheus metrics, scraped over real HTTP after real gRPC calls."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sidecar.auth import BearerTokenInterceptor, open_channel
from sidecar.metrics import OUTCOMES, STAGES, TASKS, Metrics
from tlsutil import BROKEN, BROKEN_STREAM, ENDLESS, MISSING, SET_CODE, TestServer, stream, unary

TOKEN = "metrics-test-token"
RPC = "eraser_rpc_duration_seconds_count"


@pytest.fixture()
def metrics():
    m = Metrics()
    server = m.serve("127.0.0.1", 0)
    m.http = server
    yield m
    server.close()


@pytest.fixture()
def grpc_server(metrics):
    with TestServer([metrics.rpc_interceptor(), BearerTokenInterceptor(TOKEN)]) as server:
        yield server


def scrape(metrics: Metrics) -> dict[str, list]:
    """{family name: samples} from GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics.http.port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families, sample_name: str, **labels) -> float | None:
    family = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum").removesuffix("_bucket")
    for sample in families.get(family, ()):
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def rpc_counts(families) -> dict[tuple[str, str, str], float]:
    return {(s.labels["service"], s.labels["method"], s.labels["code"]): s.value
            for s in families.get("eraser_rpc_duration_seconds", ()) if s.name == RPC}


def _fails(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_rpc_durations_by_method_and_code(metrics, grpc_server):
    target = grpc_server.target
    with grpc.insecure_channel(target) as anonymous, open_channel(target, token="wrong-token") as wrong, \
            open_channel(target, token=TOKEN) as good:
        for _ in range(2):
            assert _fails(lambda: unary(anonymous)) == grpc.StatusCode.UNAUTHENTICATED
        assert _fails(lambda: unary(wrong)) == grpc.StatusCode.UNAUTHENTICATED
        assert _fails(lambda: stream(anonymous)) == grpc.StatusCode.UNAUTHENTICATED
        for _ in range(4):
            assert unary(good) == b"hi"
        for _ in range(2):
            assert stream(good) == [b"0", b"1", b"2"]
        assert _fails(lambda: unary(good, MISSING)) == grpc.StatusCode.NOT_FOUND
        assert _fails(lambda: unary(good, BROKEN)) == grpc.StatusCode.UNKNOWN
        assert _fails(lambda: unary(good, SET_CODE)) == grpc.StatusCode.FAILED_PRECONDITION
        responses = good.unary_stream(BROKEN_STREAM)(b"", timeout=5)
        assert next(responses) == b"first"
        assert _fails(lambda: next(responses)) == grpc.StatusCode.NOT_FOUND
        assert _fails(lambda: unary(good, "/test.v1.Echo/NoSuchMethod")) == grpc.StatusCode.UNIMPLEMENTED
        health = health_pb2_grpc.HealthStub(anonymous)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        grpc_server.health.set("eraser.v1.Eraser", health_pb2.HealthCheckResponse.SERVING)
        assert _fails(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)) \
            == grpc.StatusCode.NOT_FOUND  # the servicer's set_code, without an exception
    echo = "test.v1.Echo"
    assert rpc_counts(scrape(metrics)) == {
        (echo, "Echo", "UNAUTHENTICATED"): 3,
        (echo, "Count", "UNAUTHENTICATED"): 1,
        (echo, "Echo", "OK"): 4,
        (echo, "Count", "OK"): 2,
        (echo, "Missing", "NOT_FOUND"): 1,
        (echo, "Broken", "UNKNOWN"): 1,
        (echo, "SetCode", "FAILED_PRECONDITION"): 1,
        (echo, "BrokenStream", "NOT_FOUND"): 1,
        ("grpc.health.v1.Health", "Check", "OK"): 1,
        ("grpc.health.v1.Health", "Check", "NOT_FOUND"): 1,
    }  # and nothing for NoSuchMethod: a client's made-up name never becomes a label


def _wait_for(metrics, key, timeout=3.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        counts = rpc_counts(scrape(metrics))
        if key in counts or time.monotonic() > deadline:
            return counts
        time.sleep(0.02)


def test_streams_are_timed_until_they_end(metrics, grpc_server):
    with open_channel(grpc_server.target, token=TOKEN) as channel:
        responses = channel.unary_stream(ENDLESS)(b"", timeout=5)
        assert next(responses) == b"started"
        time.sleep(0.2)
        responses.cancel()
        counts = _wait_for(metrics, ("test.v1.Echo", "Endless", "CANCELLED"))
        assert counts.get(("test.v1.Echo", "Endless", "CANCELLED")) == 1
        assert value(scrape(metrics), "eraser_rpc_duration_seconds_sum", method="Endless") >= 0.2

        responses = channel.unary_stream(ENDLESS)(b"", timeout=0.3)
        assert next(responses) == b"started"
        assert _fails(lambda: next(responses)) == grpc.StatusCode.DEADLINE_EXCEEDED
        counts = _wait_for(metrics, ("test.v1.Echo", "Endless", "DEADLINE_EXCEEDED"))
        assert counts.get(("test.v1.Echo", "Endless", "DEADLINE_EXCEEDED")) == 1

    with grpc.insecure_channel(grpc_server.target) as channel:  # health Watch: a callback-style stream
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        counts = _wait_for(metrics, ("grpc.health.v1.Health", "Watch", "CANCELLED"))
        assert counts.get(("grpc.health.v1.Health", "Watch", "CANCELLED")) == 1


def test_job_metrics(metrics):
    families = scrape(metrics)
    for task in TASKS:  # pre-created at zero, before any job
        assert value(families, "eraser_jobs_accepted_total", task=task) == 0
        for outcome in OUTCOMES:
            assert value(families, "eraser_jobs_total", task=task, outcome=outcome) == 0
    for stage in STAGES:
        assert value(families, "eraser_job_stage_duration_seconds_count", stage=stage) == 0

    metrics.job_accepted("remove")
    metrics.job_accepted("mixed")
    metrics.job_finished(task="remove", outcome="succeeded", stage_seconds={"load": 0.5, "solve": 2.0},
                         total_seconds=3.0, residual=2e-5, rows={"remove": 4})
    metrics.job_finished(task="mixed", outcome="succeeded", stage_seconds={"load": 0.25},
                         total_seconds=1.0, residual=float("nan"),
                         rows={"remove": 1, "modify_query": 2, "correct_response": 3})
    metrics.job_finished(task="remove", outcome="failed", stage_seconds={"load": 0.1}, total_seconds=0.2,
                         residual=None, rows={"remove": 100})
    metrics.set_queue_depth(3, 1)
    metrics.set_current_version("support-bot.v2", 7)
    metrics.set_current_version("other", 1)
    metrics.forget_adapter("other")
    metrics.requests_merged(2)
    metrics.requests_merged(1)

    families = scrape(metrics)
    assert value(families, "eraser_jobs_accepted_total", task="remove") == 1
    assert value(families, "eraser_jobs_accepted_total", task="mixed") == 1
    assert value(families, "eraser_jobs_total", task="remove", outcome="succeeded") == 1
    assert value(families, "eraser_jobs_total", task="mixed", outcome="succeeded") == 1
    assert value(families, "eraser_jobs_total", task="remove", outcome="failed") == 1
    assert value(families, "eraser_jobs_total", task="modify_query", outcome="cancelled") == 0
    assert value(families, "eraser_job_stage_duration_seconds_count", stage="load") == 3
    assert value(families, "eraser_job_stage_duration_seconds_sum", stage="load") == pytest.approx(0.85)
    assert value(families, "eraser_job_stage_duration_seconds_count", stage="solve") == 1
    assert value(families, "eraser_job_duration_seconds_count", outcome="succeeded") == 2
    assert value(families, "eraser_job_duration_seconds_sum", outcome="succeeded") == pytest.approx(4.0)
    assert value(families, "eraser_job_duration_seconds_count", outcome="failed") == 1
    assert value(families, "eraser_job_duration_seconds_bucket", outcome="failed", le="0.25") == 1
    # Two residuals (None is skipped); the NaN lands above the last bucket, the sum stays finite.
    assert value(families, "eraser_solver_residual_count") == 2
    assert value(families, "eraser_solver_residual_bucket", le="3e-05") == 1
    assert value(families, "eraser_solver_residual_bucket", le="10.0") == 1
    assert value(families, "eraser_solver_residual_sum") < float("inf")
    # Rows of succeeded jobs only, each kind under its own label.
    assert value(families, "eraser_rows_erased_total", task="remove") == 5
    assert value(families, "eraser_rows_erased_total", task="modify_query") == 2
    assert value(families, "eraser_rows_erased_total", task="correct_response") == 3
    assert value(families, "eraser_queue_depth") == 3
    assert value(families, "eraser_jobs_running") == 1
    assert value(families, "eraser_adapter_version", adapter="support-bot.v2") == 7
    assert value(families, "eraser_adapter_version", adapter="other") is None
    assert value(families, "eraser_requests_merged_total") == 3
    assert all(name.startswith("eraser_") for name in families), sorted(families)


def test_utility_check_metrics(metrics):
    metrics.utility_checked("support-bot", 0.02, True)
    metrics.utility_checked("support-bot", -0.04, True)
    metrics.utility_checked("support-bot", 10.1, False)
    metrics.utility_checked("support-bot", float("nan"), False)  # a NaN NLL fails the check
    families = scrape(metrics)
    assert value(families, "eraser_utility_checks_total", adapter="support-bot", outcome="passed") == 2
    assert value(families, "eraser_utility_checks_total", adapter="support-bot", outcome="failed") == 2
    # The NaN is counted as a failure but not observed. (A histogram with negative buckets
    # exports no _sum, as OpenMetrics asks.)
    assert value(families, "eraser_utility_retain_nll_rise_count") == 3
    assert value(families, "eraser_utility_retain_nll_rise_bucket", le="0.0") == 1
    assert value(families, "eraser_utility_retain_nll_rise_bucket", le="0.3") == 2
    assert value(families, "eraser_utility_retain_nll_rise_bucket", le="10.0") == 2


def test_labels_take_no_free_text(metrics):
    bad_calls = [
        lambda: metrics.utility_checked("Alice Smith's rows", 0.0, True),
        lambda: metrics.job_accepted("Forget Alice Smith"),
        lambda: metrics.job_finished(task="remove", outcome="exploded", stage_seconds={}, total_seconds=1,
                                     residual=None, rows={}),
        lambda: metrics.job_finished(task="remove", outcome="failed", stage_seconds={"alice's data": 1.0},
                                     total_seconds=1, residual=None, rows={}),
        lambda: metrics.job_finished(task="remove", outcome="failed", stage_seconds={}, total_seconds=1,
                                     residual=None, rows={"alice": 1}),
        lambda: metrics.job_finished(task="remove", outcome="failed", stage_seconds={}, total_seconds=-1,
                                     residual=None, rows={}),
        lambda: metrics.set_current_version("Alice Smith's adapter", 1),
        lambda: metrics.set_current_version("ok", -1),
        lambda: metrics.set_queue_depth(-1, 0),
        lambda: metrics.requests_merged(-2),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
    families = scrape(metrics)
    assert value(families, "eraser_jobs_total", task="remove", outcome="failed") == 0  # nothing half-recorded
    assert value(families, "eraser_adapter_version") is None


def test_registries_are_separate():
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" in a shared registry
    a.requests_merged(5)
    assert a.registry is not b.registry
    assert b.registry.get_sample_value("eraser_requests_merged_total") == 0
    assert a.registry.get_sample_value("eraser_requests_merged_total") == 5


def test_close_frees_the_port():
    server = Metrics().serve("127.0.0.1", 0)
    port = server.port
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert b"eraser_queue_depth" in response.read()
    server.close()
    server.close()  # twice is fine
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with socket.socket() as s:
        # SO_REUSEADDR as any server sets it: the scrape's connection may linger in TIME_WAIT.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
