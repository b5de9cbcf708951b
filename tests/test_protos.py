"""The committed generated code must be what protos/ generates now."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "eraser_proto").rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT) for p in (ROOT / "eraser_proto").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert generated == committed, "run `make protos` and commit eraser_proto/"
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert not stale, f"stale generated code (run `make protos`): {stale}"


def test_public_names():
    from eraser_proto.eraser.v1 import eraser_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Eraser"]
    assert pb.DESCRIPTOR.package == "eraser.v1"
    assert {m.name for m in service.methods} >= {
        "RegisterAdapter", "GetAdapter", "ListAdapters", "Erase", "GetJob", "WatchJob", "ListJobs", "CancelJob", "Rollback",
    }
    assert [v.name for v in pb.JobState.DESCRIPTOR.values] == [
        "JOB_STATE_UNSPECIFIED", "JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED",
    ]
