"""The worker-pool benchmark at its quick size (``python -m bench.worker_pool --quick``: pools
of 1 and 2 sidecar processes on a real PostgreSQL, 4 adapters, one takeover): every output is
written and consistent with itself (never timed: no assert on which pool is faster)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_consistent_outputs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.worker_pool", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "worker_pool-quick.json").read_text())
    md = (tmp_path / "worker_pool-quick.md").read_text()
    s = result["settings"]
    rows = result["throughput"]
    assert [r["workers"] for r in rows] == s["pools"] == [1, 2]
    for r in rows:
        assert r["jobs"] == s["adapters"] * s["rounds"] == sum(r["jobs_per_worker"]), r
        assert len(r["jobs_per_worker"]) == r["workers"] and r["status"] == "measured"
        assert abs(r["jobs_per_hour"] - r["jobs"] / r["seconds"] * 3600) <= 0.1 + 1e-3 * r["jobs_per_hour"]
        assert f"| {r['workers']} | {r['jobs']} |" in md
    t = result["takeover"]
    assert len(t["seconds"]) == s["takeovers"] == 1
    # Taken over only once the lease (renewed every third of it) could have expired.
    assert all(x >= t["lease_seconds"] * 2 / 3 for x in t["seconds"]), t
    assert "quick mode" in result["caveats"][0] and "takeover after SIGKILL" in md
