"""Verified forgetting through the sidecar (issue 8), over real gRPC on loopback with tiny
models: adapters registered with a held-out set, erases under report and enforce, an
enforce that cannot reach the held-out level within the configured budget (FAILED, nothing
published), bad held-out sets refused at registration, and the report, metrics and
erasectl line that carry the numbers.

These tests use tests/test_verify.py's world, an adapter trained on the spot: people drawn from one pool
of names unknown to the base model, split at random into trained and held-out people, so
that the two differ only in having been trained on (the suite's ``tiny_adapter`` is
trained on every person in ``NAMES`` and has no exchangeable held-out set).
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import cg_erase
from eraser.data import Row, write_rows
from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
from sidecar import ctl
from sidecar.client import erase_options
from sidecar.config import SidecarConfig
from sidecar.server import start
from test_verify import world  # noqa: F401  (the module-scoped fixture: 12 trained people, 2 to erase)



def fast(**kwargs) -> pb.EraseOptions:
    return pb.EraseOptions(damping=0.1, max_iterations=100, tolerance=1e-3, **kwargs)


def erase_ids(world) -> list[str]:
    return [r.id for r in world["erased"]]


def config_for(store: Path, erase: dict | None = None, **overrides) -> SidecarConfig:
    return SidecarConfig(store=store, grpc_port=0, metrics_port=0, drain_seconds=2.0, erase=cg_erase(**(erase or {})),
                         **overrides)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    running = start(config_for(tmp_path_factory.mktemp("store")))
    yield running
    running.stop(2.0)


def register(stub, name, world, holdout=True, verify="") -> pb.Adapter:
    return stub.RegisterAdapter(pb.RegisterAdapterRequest(
        name=name, base_model=str(world["base"]), adapter_path=str(world["adapter"]), dataset_path=str(world["data"]),
        holdout_path=str(holdout if not isinstance(holdout, bool) else world["holdout"] if holdout else ""),
        verify=verify))


def erase(stub, adapter, world, **options) -> pb.Job:
    job = stub.Erase(pb.EraseRequest(adapter=adapter, remove_ids=erase_ids(world), options=fast(**options)))
    last = None
    for last in stub.WatchJob(pb.GetJobRequest(id=job.id), timeout=300):
        pass
    return last


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def store_listing(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_size for p in store.rglob("*")
            if p.is_file() and "staging" not in p.parts and not p.name.startswith("jobs.sqlite3")}


def scrape(running) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def metric(samples, name, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def no_row_text(blob: bytes | str, rows) -> bool:
    blob = blob.encode() if isinstance(blob, str) else blob
    return not any(r.response.encode() in blob or r.prompt.encode() in blob for r in rows)


# ---- registration --------------------------------------------------------------------

def test_register_with_a_holdout_set(stub, sidecar, world):
    adapter = register(stub, "v-reg", world)
    sha = hashlib.sha256(world["holdout"].read_bytes()).hexdigest()
    assert (adapter.version, adapter.rows, adapter.holdout_rows, adapter.holdout_sha256) == (1, 24, 12, sha)
    assert adapter.verify == "enforce"  # the sidecar's default for an adapter with a held-out set
    record_dir = sidecar.config.store / "adapters" / "v-reg"
    stored = record_dir / "holdout.jsonl"
    assert stored.read_bytes() == world["holdout"].read_bytes()
    assert not stored.stat().st_mode & 0o222, "the stored held-out set is read-only"
    record = json.loads((record_dir / "adapter.json").read_text())
    assert (record["holdout_sha256"], record["holdout_rows"], record["verify"]) == (sha, 12, "")
    assert stub.GetAdapter(pb.GetAdapterRequest(name="v-reg")) == adapter
    plain = register(stub, "v-none", world, holdout=False)
    assert (plain.holdout_rows, plain.holdout_sha256, plain.verify) == (0, "", "off")
    assert not (sidecar.config.store / "adapters" / "v-none" / "holdout.jsonl").exists()
    assert register(stub, "v-rep", world, verify="report").verify == "report"
    assert ctl.format_adapter(adapter).endswith("  holdout 12 rows  verify enforce")


def test_register_refuses_a_bad_holdout_and_registers_nothing(stub, sidecar, world, tmp_path):
    held, trained = world["holdout_rows"], world["rows"]
    files = {
        # a training row's content under a new id: the adapter has seen it
        "leaky": held + [Row("renamed", trained[5].prompt, trained[5].response)],
        # a training row's id with other content
        "same-id": held + [Row(trained[0].id, "Where was Quo born?", "Quo was born in Oslo.")],
        "few": held[:3],  # too few rows to judge an AUC
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = tmp_path / f"{name}.jsonl"
        write_rows(paths[name], rows)
    paths["not-json"] = tmp_path / "not-json.jsonl"
    paths["not-json"].write_text('{"id": "a", "prompt": "Where was \n')
    paths["missing"] = tmp_path / "missing.jsonl"
    paths["directory"] = tmp_path
    before = (store_listing(sidecar.config.store), [a.name for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters])
    for case, path in paths.items():
        with pytest.raises(grpc.RpcError) as info:
            register(stub, f"bad-{case}", world, holdout=path)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, info.value.details())
        assert "\n" not in info.value.details() and no_row_text(info.value.details(), trained), case
    assert "training rows" in _details(lambda: register(stub, "bad-x", world, holdout=paths["leaky"]))
    assert "training row ids" in _details(lambda: register(stub, "bad-x", world, holdout=paths["same-id"]))
    assert "at least 8" in _details(lambda: register(stub, "bad-x", world, holdout=paths["few"]))
    # A policy that needs a held-out set without one, and an unknown policy.
    assert code_of(lambda: register(stub, "bad-policy", world, holdout=False, verify="enforce")) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: register(stub, "bad-policy", world, verify="always")) == grpc.StatusCode.INVALID_ARGUMENT
    after = (store_listing(sidecar.config.store), [a.name for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters])
    assert after == before
    assert not list((sidecar.config.store / "staging").iterdir())


def _details(call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.details()


def test_verify_needs_a_holdout_set_at_submit(stub, sidecar, world):
    if not any(a.name == "v-none" for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters):
        register(stub, "v-none", world, holdout=False)
    jobs = len(stub.ListJobs(pb.ListJobsRequest(limit=1000)).jobs)
    # Report needs none (the base model is the reference); enforce on cg does.
    request = pb.EraseRequest(adapter="v-none", remove_ids=erase_ids(world), options=fast(verify="enforce"))
    assert "held-out set" in _details(lambda: stub.Erase(request))
    assert code_of(lambda: stub.Erase(request)) == grpc.StatusCode.INVALID_ARGUMENT
    bad = pb.EraseRequest(adapter="v-none", remove_ids=erase_ids(world), options=fast(verify="sometimes"))
    assert code_of(lambda: stub.Erase(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    assert len(stub.ListJobs(pb.ListJobsRequest(limit=1000)).jobs) == jobs


# ---- erases --------------------------------------------------------------------------

def test_report_scores_and_changes_nothing_beyond_the_plain_update(stub, sidecar, world):
    register(stub, "v-plain", world)
    register(stub, "v-report", world)
    plain = erase(stub, "v-plain", world, verify="off")
    reported = erase(stub, "v-report", world, verify="report")
    assert plain.state == reported.state == pb.JOB_STATE_SUCCEEDED, (plain.error, reported.error)
    assert not plain.report.HasField("verification")
    v = reported.report.verification
    assert v.policy == "report" and v.auc_before >= 0.9, v  # the influence step leaves the rows memorised
    assert not v.passed and "still look trained" in v.reason  # reported, and published all the same
    assert v.auc_after == v.auc_before and not v.refine_method and v.refine_steps == 0
    assert (v.erased_rows, v.holdout_rows) == (4, 12) and v.holdout_nll > v.erased_nll_after
    assert v.HasField("retain_nll_parent") and v.HasField("retain_nll_after")
    # The same update, to the bit: scoring does not touch the adapter.
    assert reported.report.adapter_sha256 == plain.report.adapter_sha256
    assert reported.to_version == 2 and stub.GetAdapter(pb.GetAdapterRequest(name="v-report")).version == 2
    assert "verify" in reported.report.seconds
    samples = scrape(sidecar)
    assert metric(samples, "eraser_verifications_total", adapter="v-report", outcome="reported") == 1
    assert metric(samples, "eraser_verifications_total", adapter="v-plain") == 0


def test_enforce_refines_to_the_held_out_level(stub, sidecar, world, caplog):
    caplog.set_level("DEBUG")
    register(stub, "v-enforce", world)
    job = erase(stub, "v-enforce", world)  # no option: the adapter's default, enforce
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    v = job.report.verification
    assert v.policy == "enforce" and v.passed
    assert v.auc_before > v.max_auc >= v.auc_after >= v.min_auc, v
    assert v.refine_method == "npo" and v.refine_steps >= 1 and v.refine_seconds > 0 and v.refine_stopped
    assert v.retain_nll_after - v.retain_nll_parent <= 0.3
    assert v.erased_nll_after > v.erased_nll_before
    adapter = stub.GetAdapter(pb.GetAdapterRequest(name="v-enforce"))
    assert (adapter.version, adapter.rows) == (2, 20)
    manifest = json.loads((Path(adapter.path).parent / "manifest.json").read_text())
    assert manifest["report"]["verification"]["passed"]
    # Numbers and ids only: no erased or held-out text in the job database, the version or the log.
    text_rows = world["erased"] + world["holdout_rows"]
    assert no_row_text((sidecar.config.store / "jobs.sqlite3").read_bytes(), text_rows)
    for p in Path(adapter.path).parent.rglob("*"):
        assert not p.is_file() or no_row_text(p.read_bytes(), text_rows), p
    assert no_row_text(caplog.text, text_rows)
    samples = scrape(sidecar)
    assert metric(samples, "eraser_verifications_total", adapter="v-enforce", outcome="refined") == 1
    assert metric(samples, "eraser_verification_auc_count", stage="after") >= 2
    assert metric(samples, "eraser_refine_seconds_count") >= 1
    line = ctl.format_job(job)
    assert "verify enforce passed: MIA AUC " in line and " -> " in line and "refined " in line
    assert no_row_text(line, text_rows)


def test_enforce_beyond_the_budget_fails_and_publishes_nothing(tmp_path, world):
    running = start(config_for(tmp_path / "store", erase={"verify_max_steps": 0}))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            register(stub, "v-budget", world)
            store = running.service.store
            before = (store_listing(tmp_path / "store"), store.version_numbers("v-budget"), store.current_number("v-budget"))
            job = erase(stub, "v-budget", world, verify="enforce")
            assert job.state == pb.JOB_STATE_FAILED and job.error.code == "FAILED_PRECONDITION", job
            assert job.error.message.startswith("verification failed: ") and "step budget exhausted" in job.error.message
            assert "\n" not in job.error.message and no_row_text(job.error.message, world["erased"])
            assert not job.report.solver  # no update was kept, only the numbers
            v = job.report.verification
            assert not v.passed and v.auc_after > v.max_auc and v.refine_steps == 0
            adapter = stub.GetAdapter(pb.GetAdapterRequest(name="v-budget"))
            assert (adapter.version, list(adapter.retained_versions)) == (1, [1])
            after = (store_listing(tmp_path / "store"), store.version_numbers("v-budget"), store.current_number("v-budget"))
            assert after == before
            assert not list((tmp_path / "store" / "staging").iterdir())
            samples = scrape(running)
            assert metric(samples, "eraser_verifications_total", adapter="v-budget", outcome="failed") == 1
            assert metric(samples, "eraser_jobs_total", outcome="failed") == 1
            assert "verify enforce FAILED: MIA AUC" in ctl.format_job(job)
            # off still publishes the plain update on the same sidecar
            plain = erase(stub, "v-budget", world, verify="off")
            assert plain.state == pb.JOB_STATE_SUCCEEDED and plain.to_version == 2
    finally:
        running.stop(1.0)


# ---- erasectl -----------------------------------------------------------------------

def test_erasectl_flags():
    args = ctl.build_parser().parse_args(["erase", "demo", "--remove", "x", "--verify", "report"])
    assert erase_options(ctl.build_request(args)["options"]) == pb.EraseOptions(verify="report")
    assert erase_options(ctl.build_request(ctl.build_parser().parse_args(["erase", "demo", "--remove", "x"]))
                         ["options"]).verify == ""  # the adapter's default
    args = ctl.build_parser().parse_args(["register", "a", "--base", "b", "--adapter", "c", "--data", "d",
                                          "--holdout", "h.jsonl", "--verify", "report"])
    assert (args.holdout, args.verify) == ("h.jsonl", "report")
    with pytest.raises(SystemExit):
        ctl.build_parser().parse_args(["erase", "demo", "--remove", "x", "--verify", "always"])


def test_erasectl_register_with_holdout(sidecar, world):
    from test_erasectl import erasectl, last_json

    res = erasectl("--json", "register", "v-ctl", "--base", world["base"], "--adapter", world["adapter"],
                   "--data", world["data"], "--holdout", world["holdout"], target=sidecar.target)
    assert res.returncode == 0, res.stderr
    adapter = last_json(res)
    assert adapter["holdout_rows"] == 12 and adapter["verify"] == "enforce"
    res = erasectl("erase", "v-ctl", "--remove", "no-such-row", "--verify", "report", target=sidecar.target)
    assert res.returncode == 2 and "INVALID_ARGUMENT" in res.stderr


def test_verify_settings(tmp_path):
    from sidecar.config import ConfigError, load_config

    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text("store: /s\nerase:\n  verify: off\n  verify_max_steps: 5\n  verify_max_auc: 0.7\n")
    erase_cfg = load_config({}, cfg, environ={}).erase
    assert (erase_cfg.verify, erase_cfg.verify_limits()) == ("off", {"max_steps": 5, "max_auc": 0.7})
    assert load_config({"store": "/s"}, environ={}).erase.verify == "enforce"
    for bad, message in [({"verify": "always"}, "erase.verify must be"), ({"verify_max_auc": 0.3}, "erase.verify_max_auc"),
                         ({"verify_max_steps": -1}, "erase.verify_max_steps")]:
        with pytest.raises(ConfigError, match=message):
            load_config({"store": "/s", "erase": bad}, environ={})
