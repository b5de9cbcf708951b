"""The sidecar's defaults are the product's default path (eraser/options.py): an erase with
no options runs EK-FAC from the factors fitted at registration, with relative damping and
step control, and is verified: enforced against the registered held-out set, or reported
against the base model where the adapter has none."""

from __future__ import annotations

import grpc
import pytest

from conftest import CITIES
from eraser import options
from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
from sidecar import ctl
from sidecar.config import SidecarConfig
from sidecar.server import start
from test_sidecar_verify import erase_ids, register, world  # noqa: F401  (world: the module-scoped fixture)


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    running = start(SidecarConfig(store=tmp_path_factory.mktemp("store"), grpc_port=0, metrics_port=0, drain_seconds=2.0))
    channel = grpc.insecure_channel(running.target)
    yield pb_grpc.EraserStub(channel)
    channel.close()
    running.stop(2.0)


def watched_to_the_end(stub, job_id: str) -> pb.Job:
    """The last state WatchJob streams for a job (its terminal one)."""
    return list(stub.WatchJob(pb.GetJobRequest(id=job_id), timeout=600))[-1]


def erase_with_defaults(stub, adapter, ids) -> pb.Job:
    return watched_to_the_end(stub, stub.Erase(pb.EraseRequest(adapter=adapter, remove_ids=ids)).id)


def test_default_erase_is_the_verified_second_order_path(stub, world):
    adapter = register(stub, "dflt", world)
    assert adapter.verify == "enforce"
    job = erase_with_defaults(stub, "dflt", erase_ids(world))
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error.message
    r = job.report
    assert (r.solver, r.requested_solver or r.solver) == (options.DEFAULT_SOLVER, "ekfac")
    assert r.factor_source in ("cache", "waited")  # fitted in the background at registration
    assert r.damping != options.DEFAULT_DAMPING  # relative: a multiple of the curvature's scale
    v = r.verification
    assert v.policy == "enforce" and v.passed and v.basis == "held-out" and v.refine_method == "natural"
    assert {a.name for a in v.attacks} == {"loss", "reference", "mink"}
    for a in v.attacks:
        assert a.passed and a.auc_low <= a.auc <= a.auc_high and a.auc <= a.max_auc
    line = ctl.format_job(job)
    assert "verify enforce passed" in line and "attacks loss" in line


def test_default_erase_without_a_holdout_is_verified_against_the_base_model(stub, world):
    stub.RegisterAdapter(pb.RegisterAdapterRequest(
        name="dflt-nohold", base_model=str(world["base"]), adapter_path=str(world["adapter"]),
        dataset_path=str(world["data"])))
    job = erase_with_defaults(stub, "dflt-nohold", erase_ids(world))
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error.message
    v = job.report.verification
    assert job.report.solver == "ekfac" and v.policy == "enforce" and v.basis == "base-model reference"
    assert v.passed and v.rows_ahead_of_base == 0 and v.rows_recalled == 0 and v.refine_method == "natural"
    assert "judged against the base model" in ctl.format_job(job)
    # Enforce without a held-out set needs the refinement of the ekfac/kfac path: on cg it is
    # refused at acceptance, and nothing changes.
    with pytest.raises(grpc.RpcError) as info:
        stub.Erase(pb.EraseRequest(adapter="dflt-nohold", remove_ids=[world["rows"][4].id],
                                   options=pb.EraseOptions(solver="cg", verify="enforce")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "held-out set" in info.value.details()
    assert stub.GetAdapter(pb.GetAdapterRequest(name="dflt-nohold")).version == 2


def test_a_response_correction_with_the_defaults_is_learned_and_reported(stub, world):
    """A correction through the sidecar's default path: the job says whether the new answer
    was learned (its NLL against the retained rows' level, greedy reproductions against
    what the retained rows get), erasectl prints it, and the published adapter holds it."""
    from eraser.membership import measure
    from test_verify import load

    register(stub, "dflt-rc", world)
    old = next(r for r in world["rows"] if r.id.startswith("born-") and r not in world["erased"])
    name = old.prompt.split()[2].rstrip("?")
    new_response = f"{name} was born in {next(c for c in CITIES if c not in old.response)}."
    job = watched_to_the_end(stub, stub.Erase(pb.EraseRequest(
        adapter="dflt-rc", correct_responses=[pb.CorrectResponse(id=old.id, response=new_response)])).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error.message
    v = job.report.verification
    assert v.policy == "enforce" and v.passed and v.reason == "old rows look never-seen; new rows learned"
    n = v.new_rows
    assert n.passed and n.rows == 1 and n.reproduced >= n.required and n.mean_nll <= n.target_nll + n.margin
    assert 0 <= n.retain_reproduced_share <= 1
    line = ctl.format_job(job)
    assert "new rows learned" in line and new_response not in line
    published = stub.GetAdapter(pb.GetAdapterRequest(name="dflt-rc"))
    model, tok = load({"base": world["base"], "adapter": world["adapter"]}, published.path)
    assert measure(model, tok, [(old.prompt, new_response)], "cpu").nll[0] == pytest.approx(n.mean_nll, abs=1e-4)
