"""The utility check every erase passes before anything is written (eraser.unlearn):
the retained rows' mean NLL may rise by at most ``max_retain_rise`` nats.

Measured in bench/results/unlearning.md: a converged influence step on a response
correction raised SmolLM2's retained NLL by 10 nats. The tiny model shows the same with a
nearly undamped exact solve of a large correction; a damped removal passes.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from conftest import cg_erase
from eraser.curvature import CurvatureConfig
from eraser.errors import InvalidRequestError, UtilityCheckFailedError
from eraser.model import load_adapter, load_base
from eraser.requests import UnlearningRequest
from eraser.solvers import SolverConfig
from eraser.losses import row_losses
from eraser.secondorder import StepConfig
from eraser.unlearn import EraseConfig, erase
from eraser.verify import VerifyConfig, retained_sample
from test_cli import listing, run_cli

SOUND = EraseConfig(solver=SolverConfig("cg", None, {"max_iterations": 100, "tolerance": 1e-3}),
                    curvature=CurvatureConfig(damping=0.1))
# Six answers replaced by a sentence frame the adapter never saw: their gradient is large,
# and 20 cg iterations at damping 0.01 raise the retained rows' NLL by about 4.8 nats.
# Step control (eraser/secondorder.py) would scale such an update down to within the bound:
# these tests switch it off to exercise the check that stands behind it.
BROKEN = EraseConfig(solver=SolverConfig("cg", None, {"max_iterations": 20}), curvature=CurvatureConfig(damping=0.01),
                     allow_unconverged=True, step=StepConfig(enabled=False))
BROKEN_CLI = ["--solver", "cg", "--damping-scale", "absolute", "--damping", "0.01", "--max-iterations", "20",
              "--allow-unconverged", "--step-control", "off"]


def broken_request(rows) -> UnlearningRequest:
    return UnlearningRequest(correct_response=tuple((r.id, "Nobody knows anything about that at all.") for r in rows[:6]))


def mean_nll(base_dir, adapter_dir, pairs) -> float:
    base = load_base(base_dir)
    model = load_adapter(base, adapter_dir)
    losses = row_losses(model, base.tokenizer, pairs, "cpu")
    return sum(losses) / len(losses)


def test_a_sound_erase_passes_and_reports_the_check(tmp_path, tiny_base, tiny_adapter, train_file, train_rows):
    request = UnlearningRequest(remove=(train_rows[0].id,))
    report = erase(tiny_base, tiny_adapter, train_file, request, tmp_path / "v2", config=SOUND)
    check = report.utility
    assert check is not None and check.passed
    assert check.rows == SOUND.utility_rows and check.max_rise == 0.3
    assert abs(check.rise) <= 0.3
    # The numbers are the sampled retained rows' mean NLL under the parent and under the
    # adapter that was written (recomputed here from the files).
    sample = retained_sample(train_rows, request.resolve(train_rows), VerifyConfig(retain_sample=SOUND.utility_rows))
    assert train_rows[0].id not in {r.id for r in sample}
    pairs = [(r.prompt, r.response) for r in sample]
    assert check.before == pytest.approx(mean_nll(tiny_base, tiny_adapter, pairs), abs=1e-5)
    assert check.after == pytest.approx(mean_nll(tiny_base, tmp_path / "v2", pairs), abs=1e-5)


def test_a_broken_update_is_refused_and_nothing_is_written(tmp_path, tiny_base, tiny_adapter, train_file, train_rows):
    request = broken_request(train_rows)
    out, data_out = tmp_path / "v2", tmp_path / "edited.jsonl"
    with pytest.raises(UtilityCheckFailedError, match="retained rows' NLL") as e:
        erase(tiny_base, tiny_adapter, train_file, request, out, data_out, config=BROKEN)
    assert e.value.check.rise > 0.3 and not e.value.check.passed
    assert listing(tmp_path) == set()
    # The check, not something else, refused it: switched off, the same erase writes.
    report = erase(tiny_base, tiny_adapter, train_file, request, out, data_out, config=replace(BROKEN, max_retain_rise=None))
    assert report.utility is None and out.exists() and data_out.exists()
    retained = [(r.prompt, r.response) for r in train_rows[6:]]
    assert mean_nll(tiny_base, out, retained) > mean_nll(tiny_base, tiny_adapter, retained) + 0.3


def test_cli_refuses_a_broken_update_in_one_line(tmp_path, tiny_base, tiny_adapter, train_file, train_rows):
    request = broken_request(train_rows)
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"correct_response": [{"id": i, "response": t} for i, t in request.correct_response]}))
    args = ["erase", "--base", tiny_base, "--adapter", tiny_adapter, "--data", train_file, "--request", path,
            *BROKEN_CLI]
    res = run_cli(*args, "--out", tmp_path / "v2", "--data-out", tmp_path / "e.jsonl")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "retained rows' NLL" in lines[0] and "nothing was written" in lines[0]
    assert listing(tmp_path) == {"request.json"}
    res = run_cli(*args, "--out", tmp_path / "v2", "--max-retain-rise", "off", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["utility"] is None
    res = run_cli(*args, "--out", tmp_path / "v3", "--max-retain-rise", "-1")
    assert res.returncode != 0 and not (tmp_path / "v3").exists()


def test_config_validation():
    for bad in (-0.1, float("nan"), float("inf"), "0.3"):
        with pytest.raises(InvalidRequestError, match="max_retain_rise"):
            EraseConfig(max_retain_rise=bad)
    with pytest.raises(InvalidRequestError, match="utility_rows"):
        EraseConfig(utility_rows=0)
    assert EraseConfig(max_retain_rise=None).max_retain_rise is None


# ---- sidecar: a job whose update fails the check publishes nothing --------------------

def test_sidecar_job_failing_the_check_publishes_nothing(tmp_path, tiny_base, tiny_adapter, train_file, train_rows):
    import grpc

    from eraser_proto.eraser.v1 import eraser_pb2 as pb
    from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
    from sidecar import ctl
    from sidecar.config import SidecarConfig
    from sidecar.server import start
    from test_sidecar_verify import metric, no_row_text, scrape, store_listing

    running = start(SidecarConfig(store=tmp_path / "store", grpc_port=0, metrics_port=0, drain_seconds=2.0,
                                  erase=cg_erase(step_control=False)))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            stub.RegisterAdapter(pb.RegisterAdapterRequest(name="u", base_model=str(tiny_base),
                                                           adapter_path=str(tiny_adapter), dataset_path=str(train_file)))

            def run(request: pb.EraseRequest) -> pb.Job:
                job = stub.Erase(request)
                last = None
                for last in stub.WatchJob(pb.GetJobRequest(id=job.id), timeout=300):
                    pass
                return last

            before = (store_listing(tmp_path / "store"), running.service.store.current_number("u"))
            corrections = [pb.CorrectResponse(id=i, response=t) for i, t in broken_request(train_rows).correct_response]
            job = run(pb.EraseRequest(adapter="u", correct_responses=corrections,
                                      options=pb.EraseOptions(damping=0.01, max_iterations=20,
                                                              allow_unconverged=True)))
            assert job.state == pb.JOB_STATE_FAILED and job.error.code == "FAILED_PRECONDITION", job
            assert "retained rows' NLL" in job.error.message and "\n" not in job.error.message
            assert not job.report.solver  # no update was kept, only the check's numbers
            u = job.report.utility
            assert not u.passed and u.retain_nll_after - u.retain_nll_parent > u.max_rise == 0.3 and u.rows == 8
            assert "utility FAILED: retained NLL" in ctl.format_job(job)
            assert (store_listing(tmp_path / "store"), running.service.store.current_number("u")) == before
            assert not list((tmp_path / "store" / "staging").iterdir())
            assert metric(scrape(running), "eraser_jobs_total", outcome="failed") == 1
            assert no_row_text(job.SerializeToString(), train_rows[:6])

            ok = run(pb.EraseRequest(adapter="u", remove_ids=[train_rows[0].id],
                                     options=pb.EraseOptions(damping=0.1, max_iterations=100, tolerance=1e-3)))
            assert ok.state == pb.JOB_STATE_SUCCEEDED and ok.to_version == 2, ok
            assert ok.report.utility.passed and abs(ok.report.utility.retain_nll_after - ok.report.utility.retain_nll_parent) <= 0.3
            assert "utility ok: retained NLL" in ctl.format_job(ok)
            samples = scrape(running)
            assert metric(samples, "eraser_utility_checks_total", adapter="u", outcome="failed") == 1
            assert metric(samples, "eraser_utility_checks_total", adapter="u", outcome="passed") == 1
            assert metric(samples, "eraser_utility_retain_nll_rise_count") == 2
            # One rise above the 0.3 bound (the refused update), one within it.
            assert metric(samples, "eraser_utility_retain_nll_rise_bucket", le="0.3") == 1
    finally:
        running.stop(1.0)
