"""EK-FAC/K-FAC factor caches in the sidecar, over real gRPC on loopback with tiny models:
background fits after each publish, erases from the cache with downdated factors for the
next version, the wait and fallback policies, a foreign cache discarded and refitted,
retention, a clean stop and the refit after a restart, and the metrics."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eraser.errors import InvalidRequestError
from eraser.factors import DEFAULT_REFIT_FRACTION, is_cache, read_manifest
from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
from sidecar_util import register, wait_job
from sidecar import ctl
from sidecar.config import ConfigError, EraseDefaults, SidecarConfig, load_config
from sidecar.metrics import Metrics
from sidecar.server import start
from sidecar.solver_choice import engine_config, resolve_options

EKFAC = pb.EraseOptions(solver="ekfac", damping=0.1)


def config_for(store: Path, **erase) -> SidecarConfig:
    return SidecarConfig(store=store, grpc_port=0, metrics_port=0, drain_seconds=2.0, keep_versions=2,
                         erase=EraseDefaults(solver="ekfac", **erase))


def factor_dir(store: Path, adapter: str, version: int, method: str = "ekfac") -> Path:
    return store / "factors" / adapter / str(version) / method


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def erase(stub, adapter, row, options=EKFAC, **kw) -> pb.Job:
    return wait_job(stub, stub.Erase(pb.EraseRequest(adapter=adapter, remove_ids=[row], options=options, **kw)).id)


def samples(port: int) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def value(port: int, name: str, **labels) -> float | None:
    found = [s.value for s in samples(port) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(found) if found else None


@contextlib.contextmanager
def gated(running):
    """Hold the background fits until the gate opens (or the preparer stops)."""
    preparer = running.service.factors
    original = preparer._fit
    gate = threading.Event()

    def fit(target):
        while not gate.wait(0.05) and not preparer.stopping:
            pass
        return original(target)

    preparer._fit = fit
    try:
        yield gate
    finally:
        gate.set()
        preparer._fit = original


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    running = start(config_for(tmp_path_factory.mktemp("store")))  # factor_policy: wait (the default)
    yield running
    running.stop(2.0)


# ---- settings, options, erasectl, metrics (no model) ---------------------------------

def test_settings_and_options(tmp_path):
    assert EraseDefaults().factor_policy == "wait" and EraseDefaults().refit_fraction == DEFAULT_REFIT_FRACTION
    for solver in ("direct", "cg", "sqm", "ekfac", "kfac", "datainf"):
        assert EraseDefaults(solver=solver).solver == solver
    for bad, message in [({"factor_policy": "maybe"}, "erase.factor_policy"), ({"refit_fraction": 0}, "erase.refit_fraction"),
                         ({"refit_fraction": 1.5}, "erase.refit_fraction"), ({"solver": "magic"}, "erase.solver")]:
        with pytest.raises(ConfigError, match=message):
            load_config({"store": str(tmp_path), "erase": bad}, environ={})
    path = tmp_path / "sidecar.yaml"
    path.write_text("store: /s\nerase:\n  solver: kfac\n  factor_policy: fallback\n  refit_fraction: '0.2'\n")
    erase_config = load_config({}, path, environ={}).erase
    assert (erase_config.solver, erase_config.factor_policy, erase_config.refit_fraction) == ("kfac", "fallback", 0.2)

    config = config_for(tmp_path)
    resolved = resolve_options({"tolerance": 1e-4, "max_iterations": 50, "curvature_rows": 8}, config)
    assert resolved["solver"] == "ekfac"  # the default; tolerance and the rest serve a cg fallback
    assert engine_config(resolved).solver.name == "ekfac"
    assert engine_config(resolved).curvature.sample_rows is None  # the cache covers every row
    with pytest.raises(InvalidRequestError, match="datainf"):
        resolve_options({"solver": "datainf", "tolerance": 1e-3}, config)
    with pytest.raises(InvalidRequestError, match="tolerance"):
        resolve_options({"solver": "kfac", "tolerance": -1.0}, config)  # the fallback's settings are checked too

    args = ctl.build_parser().parse_args(["erase", "a", "--remove", "x", "--solver", "kfac"])
    assert ctl.build_request(args)["options"]["solver"] == "kfac"
    job = pb.Job(id="j1", adapter="a", state=pb.JOB_STATE_SUCCEEDED, from_version=1, to_version=2,
                 report=pb.EraseReport(solver="cg", residual=5e-4, converged=True, seconds={"total": 2.0},
                                       solver_reason="cg: ekfac requested but factors of v1 not ready; policy fallback"))
    assert ctl.format_job(job) == ("job j1 succeeded  adapter a v1 -> v2  residual 5.0e-04  solver cg: ekfac requested "
                                   "but factors of v1 not ready; policy fallback  2.0 s")


def test_factor_metrics_unit():
    m = Metrics()
    get = m.registry.get_sample_value
    assert get("eraser_factor_fit_seconds_count", {"kind": "full"}) == 0  # pre-created
    m.set_factors_fitted_at("a", time.time() - 30)
    assert 29 <= get("eraser_factor_age_seconds", {"adapter": "a"}) <= 60  # evaluated at each scrape
    m.set_factors_fitted_at("a", None)
    assert get("eraser_factor_age_seconds", {"adapter": "a"}) is None  # absent: no factors
    m.factor_fit("a", "downdate", 0.5)
    assert get("eraser_factor_fits_total", {"adapter": "a", "kind": "downdate"}) == 1
    for bad in (lambda: m.factor_fit("a", "partial", 1.0), lambda: m.factor_fit("Alice Smith", "full", 1.0),
                lambda: m.set_factors_fitted_at("a", float("nan"))):
        with pytest.raises(ValueError):
            bad()


# ---- the sidecar with solver ekfac, policy wait ---------------------------------------

def test_background_fit_then_erase_from_cache(stub, sidecar, tiny_base, tiny_adapter, train_file):
    store, port = sidecar.config.store, sidecar.metrics_port
    register(stub, "fa", tiny_base, tiny_adapter, train_file)
    wait_until(lambda: is_cache(factor_dir(store, "fa", 1)), what="the background fit of v1")
    age = wait_until(lambda: value(port, "eraser_factor_age_seconds", adapter="fa"), what="the age metric")
    assert 0 <= age < 120
    assert value(port, "eraser_factor_fits_total", adapter="fa", kind="full") == 1
    assert value(port, "eraser_factor_fit_seconds_count", kind="full") >= 1

    first = erase(stub, "fa", "born-ann")
    assert first.state == pb.JOB_STATE_SUCCEEDED, first.error
    r = first.report
    assert (r.solver, r.requested_solver, r.factor_source, r.factor_out_action, r.factor_version) == \
        ("ekfac", "ekfac", "cache", "downdated", 1)
    assert r.solver_reason.startswith("ekfac: factors of v1 from cache (age ") and "factors of v2 downdated" in r.solver_reason
    assert r.HasField("factor_age_seconds") and r.factor_changed_fraction == pytest.approx(1 / 20)
    assert "solver ekfac: factors of v1 from cache" in ctl.format_job(first)
    v2 = json.loads((store / "adapters" / "fa" / "versions" / "2" / "manifest.json").read_text())
    cached = read_manifest(factor_dir(store, "fa", 2))
    assert cached["key"]["adapter_sha256"] == v2["adapter_sha256"] and cached["history"]["downdates"] == 1
    assert v2["report"]["solver_reason"] == r.solver_reason and "out" not in v2["report"]["factors"]
    assert value(port, "eraser_factor_fits_total", adapter="fa", kind="downdate") == 1
    assert value(port, "eraser_factor_fits_total", adapter="fa", kind="full") == 1, "no refit: v2 has its factors"

    second = erase(stub, "fa", "born-bob")
    assert second.state == pb.JOB_STATE_SUCCEEDED and second.report.factor_version == 2
    assert "factors of v2 from cache" in second.report.solver_reason
    assert sorted(p.name for p in (store / "factors" / "fa").iterdir()) == ["2", "3"], "v1 pruned with its factors"
    assert value(port, "eraser_factor_age_seconds", adapter="fa") is not None
    # A rollback publishes an earlier version's content: its factors come along, unfitted.
    v2_factors = read_manifest(factor_dir(store, "fa", 2))
    rolled = stub.Rollback(pb.RollbackRequest(adapter="fa", version=2))
    assert rolled.version == 4 and list(rolled.retained_versions) == [3, 4]
    assert read_manifest(factor_dir(store, "fa", 4)) == v2_factors
    assert sorted(p.name for p in (store / "factors" / "fa").iterdir()) == ["3", "4"]
    assert value(port, "eraser_factor_fits_total", adapter="fa", kind="full") == 1
    for s in samples(port):  # no label carries row ids or text
        assert all("born" not in v and " " not in v for v in s.labels.values()), s


def test_foreign_cache_is_discarded_and_refitted(stub, sidecar, tiny_base, tiny_adapter, train_file):
    """A cache fitted on other weights (here: the previous version's) in the current
    version's place is never used: the sidecar discards it and refits. It is the sidecar's
    own store, so failing the job would only block the adapter until someone deleted it."""
    store = sidecar.config.store
    register(stub, "fb", tiny_base, tiny_adapter, train_file)
    wait_until(lambda: is_cache(factor_dir(store, "fb", 1)), what="the background fit of v1")
    assert erase(stub, "fb", "born-cid").state == pb.JOB_STATE_SUCCEEDED
    shutil.rmtree(factor_dir(store, "fb", 2))
    shutil.copytree(factor_dir(store, "fb", 1), factor_dir(store, "fb", 2))
    job = erase(stub, "fb", "born-dee")
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    reason = job.report.solver_reason
    assert job.report.solver == "ekfac" and "factors of v2 were missing; fitted in the background while the job " \
        "waited" in reason
    assert "the cache found for v2 was discarded (adapter differs" in reason
    v2 = json.loads((store / "adapters" / "fb" / "versions" / "2" / "manifest.json").read_text())
    assert read_manifest(factor_dir(store, "fb", 2))["key"]["adapter_sha256"] == v2["adapter_sha256"]


def test_policy_wait_waits_for_the_fit(stub, sidecar, tiny_base, tiny_adapter, train_file):
    store, port = sidecar.config.store, sidecar.metrics_port
    with gated(sidecar) as gate:
        register(stub, "fc", tiny_base, tiny_adapter, train_file)
        assert value(port, "eraser_factor_age_seconds", adapter="fc") is None, "absent while there are no factors"
        late = erase(stub, "fc", "born-dee", options=pb.EraseOptions(solver="ekfac", damping=0.1, deadline_seconds=1.0))
        assert late.state == pb.JOB_STATE_FAILED and late.error.code == "DEADLINE_EXCEEDED"  # honoured while waiting
        job = stub.Erase(pb.EraseRequest(adapter="fc", remove_ids=["born-dee"], options=EKFAC))
        wait_until(lambda: stub.GetJob(pb.GetJobRequest(id=job.id)).stage == "waiting for factors",
                   what="the job to wait for factors")
        time.sleep(0.3)
        assert stub.GetJob(pb.GetJobRequest(id=job.id)).state == pb.JOB_STATE_RUNNING
        assert not factor_dir(store, "fc", 1).exists()
        gate.set()
        final = wait_job(stub, job.id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.report.solver == "ekfac" and "factors of v1 were missing; fitted in the background while the job " \
        "waited" in final.report.solver_reason and "factor_wait" in final.report.seconds
    assert is_cache(factor_dir(store, "fc", 2)) and value(port, "eraser_factor_age_seconds", adapter="fc") is not None


# ---- policy fallback; stop and restart -----------------------------------------------

def test_policy_fallback_then_stop_and_refit_on_restart(tmp_path, tiny_base, tiny_adapter, train_file):
    store = tmp_path / "store"
    running = start(config_for(store, factor_policy="fallback"))
    try:
        with gated(running), grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            register(stub, "fd", tiny_base, tiny_adapter, train_file)
            job = erase(stub, "fd", "born-eve",  # verify off: a cg fallback may run it (see the next test)
                        options=pb.EraseOptions(solver="ekfac", damping=0.1, tolerance=1e-3, max_iterations=100,
                                                verify="off"))
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
            r = job.report
            assert (r.solver, r.requested_solver, r.factor_source) == ("cg", "ekfac", "")
            assert r.solver_reason == "cg: ekfac requested but factors of v1 not ready; policy fallback"
            assert r.converged and r.residual <= 1e-3
            assert "solver cg: ekfac requested but factors of v1 not ready" in ctl.format_job(job)
            # The fit of v1 is held at the gate and v2's is queued when the sidecar stops.
            assert [(t.adapter, t.version) for t in running.service.factors._queue] == [("fd", 2)]
            running.stop(2.0)
        assert not running.service.factors._thread.is_alive(), "the background thread ended"
    finally:
        running.stop(2.0)
    assert not (store / "factors").exists() or not any(p.name.startswith(".") for p in (store / "factors").rglob("*"))
    assert not is_cache(factor_dir(store, "fd", 2))

    running = start(config_for(store, factor_policy="fallback"))  # recover queues v2's fit again
    try:
        wait_until(lambda: is_cache(factor_dir(store, "fd", 2)), what="the fit of v2 after the restart")
        assert not factor_dir(store, "fd", 1).exists(), "no fit of a version that is not current"
        with grpc.insecure_channel(running.target) as channel:
            job = erase(pb_grpc.EraserStub(channel), "fd", "born-fay")
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.report.solver == "ekfac"
        assert "factors of v2 from cache" in job.report.solver_reason
    finally:
        running.stop(2.0)


def test_policy_fallback_waits_when_cg_could_not_verify(tmp_path, tiny_base, tiny_adapter, train_file):
    """The product's default on ekfac without a held-out set is enforce against the base
    model, which only the factors can refine toward: under policy fallback such a job waits
    for the fit instead of running a cg that its own verification would refuse."""
    running = start(config_for(tmp_path / "store", factor_policy="fallback"))
    try:
        with gated(running) as gate, grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            register(stub, "fw", tiny_base, tiny_adapter, train_file)
            job = stub.Erase(pb.EraseRequest(adapter="fw", remove_ids=["born-gus"], options=EKFAC))
            wait_until(lambda: stub.GetJob(pb.GetJobRequest(id=job.id)).stage == "waiting for factors",
                       what="the job to wait for factors")
            gate.set()
            final = wait_job(stub, job.id)
    finally:
        running.stop(2.0)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.report.solver == "ekfac" and final.report.verification.policy == "enforce"
    assert "fallback refused: cg cannot enforce" in final.report.solver_reason
