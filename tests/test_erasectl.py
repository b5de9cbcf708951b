"""``erasectl`` and ``sidecar.client``: argument handling and errors without a sidecar, a
stub servicer for the client's stream following, and the real sidecar end to end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import cg_erase
from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc
from sidecar import ctl
from sidecar.client import EraserClient, JobFailed, SidecarError, erase_options
from sidecar.receipts import public_pem

REPO = Path(__file__).resolve().parents[1]
FAST = ["--damping", "0.1", "--max-iterations", "100", "--tolerance", "1e-3"]


def erasectl(*args, target: str | None = None, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("ERASER_TOKEN", "ERASER_TARGET")}
    full_env.update({"PYTHONPATH": str(REPO), **(env or {})})
    prefix = ["--target", target] if target else []
    return subprocess.run([sys.executable, "-m", "sidecar.ctl", *prefix, *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=REPO)


def last_json(res: subprocess.CompletedProcess) -> dict:
    return json.loads(res.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("erasectl: error: "), res.stderr
    return lines[0]


# -- without a sidecar ----------------------------------------------------------------------


def parse(*argv: str):
    return ctl.build_parser().parse_args(list(argv))


def test_request_from_flags_and_file(tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"remove": ["r3"], "modify_query": [{"id": "m2", "prompt": "new prompt"}],
                                   "correct_response": [{"id": "c2", "response": "new response"}]}))
    args = parse("erase", "demo", "--remove", "r1", "r2", "--remove", "r4", "--modify-query", "m1", "q",
                 "--correct-response", "c1", "a", "--request", str(request), "--request-id", "t-1",
                 "--solver", "sqm", "--preset", "paper", "--curvature", "hessian", "--damping", "0.5",
                 "--objective", "newton", "--tolerance", "1e-4", "--max-iterations", "7", "--allow-unconverged",
                 "--curvature-rows", "9", "--deadline", "60")
    built = ctl.build_request(args)
    assert built["remove_ids"] == ["r1", "r2", "r4", "r3"]
    assert built["modify_queries"] == [("m1", "q"), ("m2", "new prompt")]
    assert built["correct_responses"] == [("c1", "a"), ("c2", "new response")]
    assert built["request_id"] == "t-1"
    opts = erase_options(built["options"])
    assert (opts.solver, opts.preset, opts.curvature, opts.objective) == ("sqm", "paper", "hessian", "newton")
    assert (opts.damping, opts.tolerance, opts.max_iterations, opts.curvature_rows) == (0.5, 1e-4, 7, 9)
    assert opts.allow_unconverged and opts.deadline_seconds == 60


def test_unset_options_stay_unset():
    opts = erase_options(ctl.build_request(parse("erase", "demo", "--remove", "x"))["options"])
    for name in ("damping", "tolerance", "max_iterations", "curvature_rows"):
        assert not opts.HasField(name)  # the sidecar's defaults apply
    assert opts == pb.EraseOptions()


def test_erase_options_mapping():
    assert erase_options(None) is None
    given = pb.EraseOptions(solver="cg")
    assert erase_options(given) is given
    assert erase_options({"damping": 0.0}).HasField("damping")  # an explicit 0 is kept
    with pytest.raises(ValueError, match="lambda"):
        erase_options({"solver": "cg", "lambda": 1})


def test_sidecar_error_and_job_failed():
    e = SidecarError(grpc.StatusCode.NOT_FOUND, "no adapter 'x'\nsecond line")
    assert str(e) == "NOT_FOUND: no adapter 'x' second line" and e.code == grpc.StatusCode.NOT_FOUND
    failed = JobFailed(pb.Job(id="j1", state=pb.JOB_STATE_FAILED,
                              error=pb.JobError(code="FAILED_PRECONDITION", message="did not converge")))
    assert failed.code == grpc.StatusCode.FAILED_PRECONDITION and failed.job.id == "j1"
    assert str(failed) == "FAILED_PRECONDITION: job j1: did not converge"
    assert JobFailed(pb.Job(id="j2", state=pb.JOB_STATE_CANCELLED)).code == grpc.StatusCode.CANCELLED
    assert isinstance(failed, SidecarError)


def test_human_lines_hold_no_text():
    job = pb.Job(id="j1", adapter="demo", state=pb.JOB_STATE_SUCCEEDED, from_version=1, to_version=2,
                 request_ids=["r1", "r2"], counts={"remove": 2, "modify_query": 0},
                 report=pb.EraseReport(residual=8.1e-4, converged=True, seconds={"total": 12.34}))
    assert ctl.format_job(job) == "job j1 succeeded  adapter demo v1 -> v2  requests r1,r2  remove 2  residual 8.1e-04  12.3 s"
    running = pb.Job(id="j2", adapter="demo", state=pb.JOB_STATE_RUNNING, from_version=2, stage="solve", fraction=0.456)
    assert ctl.format_job(running) == "job j2 running  adapter demo v2  stage solve 46%"
    failed = pb.Job(id="j3", adapter="demo", state=pb.JOB_STATE_FAILED, from_version=2,
                    error=pb.JobError(code="INVALID_ARGUMENT", message="unknown row id(s): 'x'"))
    assert "error INVALID_ARGUMENT: unknown row id(s): 'x'" in ctl.format_job(failed)
    adapter = pb.Adapter(name="demo", version=2, rows=47, base_model="/m/base", path="/s/demo/v2", retained_versions=[1, 2])
    assert ctl.format_adapter(adapter) == "adapter demo v2  rows 47  base /m/base  path /s/demo/v2  retained v1,v2"
    assert ctl.to_dict(job)["state"] == "JOB_STATE_SUCCEEDED" and ctl.to_dict(job)["request_ids"] == ["r1", "r2"]


@pytest.mark.parametrize("content, message", [
    (None, "request file not found"),
    ('{"remove": ["a"', "is not valid JSON"),
    ('["a"]', "must hold a JSON object"),
    ('{"remove": "a"}', "remove must be a list"),
    ('{"forget": ["a"]}', "unknown field(s): forget"),
    ('{"modify_query": [{"id": "a", "text": "TOP-SECRET"}]}', "modify_query entries must be"),
    ('{"remove": []}', "empty request"),
])
def test_bad_request_file_exits_2_without_a_sidecar(tmp_path, content, message):
    path = tmp_path / "request.json"
    if content is not None:
        path.write_text(content)
    # Nothing listens on the target: exit 2 shows the file was refused before any call.
    res = erasectl("erase", "demo", "--request", path, target=f"127.0.0.1:{free_port()}")
    assert res.returncode == 2, res.stderr
    assert message in one_line_error(res) and "TOP-SECRET" not in res.stderr
    assert res.stdout == ""


def test_bad_local_flags_exit_2(tmp_path):
    target = f"127.0.0.1:{free_port()}"
    res = erasectl("--token-file", tmp_path / "missing", "adapters", target=target)
    assert res.returncode == 2 and "cannot read token file" in one_line_error(res)
    res = erasectl("--tls-ca", tmp_path / "missing.pem", "adapters", target=target)
    assert res.returncode == 2 and "--tls-ca: no such file" in one_line_error(res)
    res = erasectl("erase", "demo", "--damping", "-1", target=target)  # argparse: usage and exit 2
    assert res.returncode == 2 and "--damping" in res.stderr
    res = erasectl("rollback", "demo", "zero", target=target)
    assert res.returncode == 2


def test_nothing_listening_is_unavailable_exit_1():
    started = time.monotonic()
    res = erasectl("--timeout", "3", "adapters", target=f"127.0.0.1:{free_port()}")
    assert res.returncode == 1, res.stderr
    assert "UNAVAILABLE" in one_line_error(res)
    assert time.monotonic() - started < 20


# -- the client's stream following, against a stub servicer -----------------------------


class StubEraser(eraser_pb2_grpc.EraserServicer):
    """WatchJob breaks with UNAVAILABLE on the first call, then streams the job to the end."""

    def __init__(self, final_state=pb.JOB_STATE_SUCCEEDED):
        self.watch_calls, self.final_state = 0, final_state

    def WatchJob(self, request, context):
        self.watch_calls += 1
        if request.id == "slow":
            yield pb.Job(id="slow", state=pb.JOB_STATE_RUNNING, stage="solve", fraction=0.1)
            time.sleep(5)
            return
        yield pb.Job(id=request.id, adapter="demo", state=pb.JOB_STATE_RUNNING, stage="gradient", fraction=0.5)
        if self.watch_calls == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "sidecar restarting")
        yield pb.Job(id=request.id, adapter="demo", state=pb.JOB_STATE_RUNNING, stage="solve", fraction=1.0)
        error = pb.JobError(code="CANCELLED", message="cancelled by a client") if self.final_state == pb.JOB_STATE_CANCELLED else None
        yield pb.Job(id=request.id, adapter="demo", state=self.final_state, error=error, from_version=1, to_version=2)

    def GetAdapter(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter {request.name!r}")


@pytest.fixture()
def stub():
    servicer = StubEraser()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    eraser_pb2_grpc.add_EraserServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_wait_reconnects_after_unavailable(stub):
    servicer, target = stub
    seen = []
    with EraserClient(target, timeout=5) as client:
        job = client.wait("j1", timeout=20, on_update=lambda j: seen.append((j.stage, pb.JobState.Name(j.state))))
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.to_version == 2
        assert servicer.watch_calls == 2
        assert seen[-1][1] == "JOB_STATE_SUCCEEDED" and ("solve", "JOB_STATE_RUNNING") in seen

        servicer.final_state, servicer.watch_calls = pb.JOB_STATE_CANCELLED, 1
        with pytest.raises(JobFailed) as info:
            client.wait("j2", timeout=20)
        assert info.value.code == grpc.StatusCode.CANCELLED and info.value.job.id == "j2"

        started = time.monotonic()
        with pytest.raises(SidecarError) as info:
            client.wait("slow", timeout=0.5)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "slow" in info.value.details
        assert time.monotonic() - started < 3

        with pytest.raises(SidecarError) as info:
            client.get_adapter("nope")
        assert str(info.value) == "NOT_FOUND: no adapter 'nope'"


def test_watch_cli_against_stub(stub):
    servicer, target = stub
    res = erasectl("watch", "j1", target=target)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "job j1 running  adapter demo  stage gradient 50%"
    assert lines[-1] == "job j1 succeeded  adapter demo v1 -> v2"
    servicer.final_state, servicer.watch_calls = pb.JOB_STATE_CANCELLED, 1
    res = erasectl("--json", "watch", "j2", "--bar", target=target)  # the bar goes to stderr
    assert res.returncode == 1
    assert len(res.stdout.strip().splitlines()) == 1 and last_json(res)["state"] == "JOB_STATE_CANCELLED"
    assert res.stderr.strip().splitlines()[-1] == "erasectl: error: job j2 was cancelled: CANCELLED: cancelled by a client"
    res = erasectl("adapters", "nope", target=target)
    assert res.returncode == 2 and one_line_error(res) == "erasectl: error: NOT_FOUND: no adapter 'nope'"


# -- the real sidecar, end to end --------------------------------------------------------


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    from sidecar.config import SidecarConfig
    from sidecar.server import start

    running = start(SidecarConfig(store=tmp_path_factory.mktemp("store"), grpc_port=0, metrics_port=0, device="cpu",
                                  erase=cg_erase()))
    yield running
    running.stop(grace=2.0)


@pytest.fixture(scope="module")
def client(sidecar):
    with EraserClient(sidecar.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def demo(client, tiny_base, tiny_adapter, train_file) -> str:
    """Adapter "demo", registered through the Python client."""
    adapter = client.register_adapter("demo", str(tiny_base), str(tiny_adapter), str(train_file))
    assert adapter.version == 1 and adapter.rows == 20
    return "demo"


def test_e2e_register_and_adapters(sidecar, client, tiny_base, tiny_adapter, train_file):
    t = sidecar.target
    res = erasectl("--json", "register", "ctl-reg", "--base", tiny_base, "--adapter", tiny_adapter, "--data", train_file,
                   target=t)
    assert res.returncode == 0, res.stderr
    adapter = last_json(res)
    assert adapter["name"] == "ctl-reg" and adapter["version"] == 1 and adapter["rows"] == 20
    assert adapter["retained_versions"] == [1] and len(adapter["adapter_sha256"]) == 64

    res = erasectl("adapters", target=t)
    assert res.returncode == 0, res.stderr
    assert any(line.startswith("adapter ctl-reg v1  rows 20  base ") for line in res.stdout.splitlines())
    res = erasectl("--json", "adapters", "ctl-reg", target=t)
    assert res.returncode == 0 and last_json(res)["path"] == adapter["path"]
    assert [a.name for a in client.list_adapters()].count("ctl-reg") == 1

    res = erasectl("register", "ctl-reg", "--base", tiny_base, "--adapter", tiny_adapter, "--data", train_file, target=t)
    assert res.returncode == 2 and "ALREADY_EXISTS" in one_line_error(res)
    res = erasectl("register", "Bad Name", "--base", tiny_base, "--adapter", tiny_adapter, "--data", train_file, target=t)
    assert res.returncode == 2 and "INVALID_ARGUMENT" in one_line_error(res)
    res = erasectl("adapters", "nope", target=t)
    assert res.returncode == 2 and one_line_error(res).startswith("erasectl: error: NOT_FOUND: ")
    with pytest.raises(SidecarError) as info:
        client.get_adapter("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_e2e_erase_wait_jobs_rollback(sidecar, client, demo, train_rows):
    t = sidecar.target
    # The bar goes to stderr; stdout's last line is the final job.
    res = erasectl("--json", "erase", demo, "--remove", "born-ann", "--request-id", "ticket-1", *FAST, "--wait", target=t)
    assert res.returncode == 0, res.stderr
    job = last_json(res)
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["adapter"] == demo
    assert (job["from_version"], job["to_version"]) == (1, 2) and job["request_ids"] == ["ticket-1"]
    assert job["report"]["converged"] and job["report"]["residual"] <= 1e-3
    assert job["counts"]["remove"] == 1

    res = erasectl("--json", "erase", demo, "--remove", "born-ann", "--request-id", "ticket-1", *FAST, target=t)
    assert res.returncode == 0 and last_json(res)["id"] == job["id"]  # idempotent

    res = erasectl("adapters", demo, target=t)
    assert res.returncode == 0 and res.stdout.startswith(f"adapter {demo} v2  rows 19  ")
    res = erasectl("job", job["id"], target=t)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith(f"job {job['id']} succeeded  adapter {demo} v1 -> v2  requests ticket-1  remove 1  residual ")
    assert line.endswith(" s")
    res = erasectl("jobs", "--adapter", demo, "--state", "succeeded", target=t)
    assert res.returncode == 0 and job["id"] in res.stdout
    res = erasectl("--json", "jobs", "--state", "failed", target=t)
    assert res.returncode == 0 and last_json(res) == {"jobs": []}
    assert [j.id for j in client.list_jobs(adapter=demo, state="succeeded")] == [job["id"]]

    # A correction through the Python client: its text never shows in erasectl's output.
    secret = "Bob likes Suva coffee, not tea."
    queued = client.erase(demo, correct_responses={"tea-bob": secret}, request_id="ticket-2",
                          options={"damping": 0.1, "max_iterations": 100, "tolerance": 1e-3})
    updates = []
    done = client.wait(queued.id, timeout=120, on_update=updates.append)
    assert done.state == pb.JOB_STATE_SUCCEEDED and (done.from_version, done.to_version) == (2, 3)
    assert updates[-1].state == pb.JOB_STATE_SUCCEEDED
    for args in (["job", done.id], ["--json", "job", done.id], ["--json", "jobs"], ["jobs"]):
        res = erasectl(*args, target=t)
        assert res.returncode == 0 and secret not in res.stdout + res.stderr
    res = erasectl("watch", done.id, target=t)  # an ended job: one line, exit 0
    assert res.returncode == 0 and res.stdout.strip().startswith(f"job {done.id} succeeded")

    # keep_versions=2: versions 2 and 3 remain; rolling back to 2 publishes its content as 4.
    res = erasectl("--json", "rollback", demo, "2", target=t)
    assert res.returncode == 0, res.stderr
    rolled = last_json(res)
    assert rolled["version"] == 4 and rolled["rows"] == 19
    assert client.get_adapter(demo).version == 4
    res = erasectl("rollback", demo, "v1", target=t)  # deleted by retention
    assert res.returncode == 2 and "FAILED_PRECONDITION" in one_line_error(res)
    res = erasectl("rollback", demo, "99", target=t)
    assert res.returncode == 2 and "NOT_FOUND" in one_line_error(res)
    res = erasectl("cancel", job["id"], target=t)  # already succeeded
    assert res.returncode == 2 and "FAILED_PRECONDITION" in one_line_error(res)


def test_e2e_bad_requests_exit_2(sidecar, client, demo):
    t = sidecar.target
    res = erasectl("erase", "no-such-adapter", "--remove", "born-ann", target=t)
    assert res.returncode == 2 and "NOT_FOUND" in one_line_error(res)
    res = erasectl("erase", demo, "--remove", "no-such-row", target=t)
    assert res.returncode == 2 and "INVALID_ARGUMENT" in one_line_error(res) and "no-such-row" in res.stderr
    res = erasectl("erase", demo, "--correct-response", "tea-cid", "TOP-SECRET", "--remove", "tea-cid", target=t)
    assert res.returncode == 2 and "INVALID_ARGUMENT" in one_line_error(res) and "TOP-SECRET" not in res.stderr
    res = erasectl("job", "no-such-job", target=t)
    assert res.returncode == 2 and "NOT_FOUND" in one_line_error(res)
    with pytest.raises(SidecarError) as info:
        client.erase(demo, remove_ids=["no-such-row"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError):
        client.erase(demo, remove_ids=["born-bob"], options={"lamda": 0.1})


def test_e2e_receipt_verify_and_purge(sidecar, client, tiny_base, tiny_adapter, train_file, tmp_path):
    t = sidecar.target
    client.register_adapter("rcpt", str(tiny_base), str(tiny_adapter), str(train_file))
    job = client.wait(client.erase("rcpt", remove_ids=["born-dee"], request_id="ticket-r",
                                   options={"damping": 0.1, "max_iterations": 100, "tolerance": 1e-3}).id, timeout=120)
    key, first = tmp_path / "receipt.pem", tmp_path / "first.json"
    res = erasectl("receipt-key", "--out", key, target=t)
    assert res.returncode == 0 and key.read_text().startswith("-----BEGIN PUBLIC KEY-----"), res.stderr
    res = erasectl("receipt", job.id, "--out", first, target=t)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"receipt of job {job.id}  adapter rcpt v1 -> v2  requests ticket-r  1 row(s) ")
    assert "still held by v1" in res.stdout

    res = erasectl("purge", "rcpt", "--before", "2", target=t)
    assert res.returncode == 0 and res.stdout.strip() == "purged rcpt: versions v1  factor caches none  payload rows 0  " \
                                                         "retained v2", res.stderr
    res = erasectl("purge", "rcpt", "--before", "3", target=t)
    assert res.returncode == 2 and "INVALID_ARGUMENT" in one_line_error(res)
    res = erasectl("receipt", "no-such-job", target=t)
    assert res.returncode == 2 and "NOT_FOUND" in one_line_error(res)
    res = erasectl("receipt", job.id, target=t)  # to stdout: the receipt file itself
    assert res.returncode == 0 and json.loads(res.stdout)["receipt"]["purged_at"]
    second = tmp_path / "second.json"
    second.write_text(res.stdout)

    # Offline: nothing listens at the target.
    for path in (first, second):
        res = erasectl("verify-receipt", path, "--public-key", key, target="127.0.0.1:1")
        assert res.returncode == 0 and res.stdout.startswith("valid: receipt of job "), res.stderr
    assert "no older copy retained" in res.stdout and "history purged at " in res.stdout
    tampered = tmp_path / "tampered.json"
    tampered.write_text(second.read_text().replace('"request_ids": [\n      "ticket-r"', '"request_ids": [\n      "ticket-s"'))
    assert tampered.read_text() != second.read_text()
    res = erasectl("verify-receipt", tampered, "--public-key", key)
    assert res.returncode == 1 and "does not verify" in one_line_error(res)
    other = tmp_path / "other.pem"
    other.write_text(public_pem(Ed25519PrivateKey.generate().public_key()))
    res = erasectl("verify-receipt", second, "--public-key", other)
    assert res.returncode == 1 and "does not verify" in one_line_error(res)
    res = erasectl("verify-receipt", tmp_path / "missing.json", "--public-key", key)
    assert res.returncode == 2 and "cannot read receipt file" in one_line_error(res)
    res = erasectl("verify-receipt", second, "--public-key", second)
    assert res.returncode == 2 and "not a PEM public key" in one_line_error(res)


def test_e2e_bearer_token(tmp_path):
    from sidecar.config import SidecarConfig
    from sidecar.server import start

    running = start(SidecarConfig(store=tmp_path / "store", grpc_port=0, metrics_port=0, token="s3cret-token",
                                  erase=cg_erase()))
    try:
        t = running.target
        res = erasectl("adapters", target=t)
        assert res.returncode == 2 and "UNAUTHENTICATED" in one_line_error(res)
        res = erasectl("adapters", target=t, env={"ERASER_TOKEN": "wrong"})
        assert res.returncode == 2 and one_line_error(res).split(": ")[2] in ("UNAUTHENTICATED", "PERMISSION_DENIED")
        res = erasectl("--json", "adapters", target=t, env={"ERASER_TOKEN": "s3cret-token"})
        assert res.returncode == 0, res.stderr
        assert last_json(res) == {"adapters": []}
        (tmp_path / "token").write_text("s3cret-token\n")
        res = erasectl("--token-file", tmp_path / "token", "adapters", target=t, env={"ERASER_TARGET": "127.0.0.1:1"})
        assert res.returncode == 0 and res.stdout.strip() == "no adapters"
        res = erasectl("--token-file", tmp_path / "token", "adapters", env={"ERASER_TARGET": t})  # target from env
        assert res.returncode == 0, res.stderr
        with EraserClient(t, token="s3cret-token") as c:
            assert c.list_adapters() == []
        with EraserClient(t) as c, pytest.raises(SidecarError) as info:
            c.list_jobs()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(grace=1.0)
