"""The sidecar benchmark end to end: ``python -m bench.sidecar --quick`` writes its JSON and
Markdown with every key and sane values (numbers only checked for consistency, never timed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = {"schema_version", "benchmark", "mode", "machine", "settings", "model", "acceptance", "merging",
            "total_seconds", "note", "caveats", "reading"}
LATENCY_KEYS = {"n", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms", "min_ms"}


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench-sidecar")
    proc = subprocess.run([sys.executable, "-m", "bench.sidecar", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[bench.sidecar" in proc.stderr, "progress is shown on stderr"
    assert sorted(p.name for p in out.iterdir()) == ["sidecar-quick.json", "sidecar-quick.md"]
    return json.loads((out / "sidecar-quick.json").read_text()), (out / "sidecar-quick.md").read_text()


def test_top_level_and_machine(quick_result):
    result, _ = quick_result
    assert set(result) == TOP_KEYS
    assert (result["benchmark"], result["mode"], result["schema_version"]) == ("sidecar", "quick", 1)
    machine = result["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["date"] and machine["grpcio"]
    model = result["model"]
    assert model["adapter_parameters"] > 0 and model["base_parameters"] > model["adapter_parameters"]
    assert model["train_rows"] == result["settings"]["people"] * result["settings"]["facts"]
    assert result["total_seconds"] > 0 and result["reading"] and result["caveats"]


def test_acceptance(quick_result):
    result, markdown = quick_result
    acc = result["acceptance"]
    plain = {"one_client", "worker_paused", "solving"}
    assert set(acc["variants"]) == plain | {f"{k}_commit_each" for k in plain}
    assert acc["clients"] == 50
    for name, v in acc["variants"].items():
        n = v["clients"] * v["requests_per_client"]
        assert v["requests"] == n and v["codes"] == {"OK": n}, (name, v["codes"])
        lat = v["latency"]
        assert set(lat) == LATENCY_KEYS and lat["n"] == n == len(v["latencies_ms"])
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"], name
        assert v["throughput_rps"] > 0 and v["span_seconds"] > 0 and v["server_process_cpu_seconds"] >= 0
        assert len(v["p50_ms_by_quarter"]) == len(v["ms_per_request_by_quarter"]) == 4
        assert 1 <= v["jobs_created"] <= n and 1 <= v["largest_job_requests"] <= n
        # Group commit: every request in some COMMIT; the baseline commits each alone.
        assert v["group_commit"] == (name in plain), name
        if v["group_commit"]:
            assert 1 <= v["commits"] <= n and v["mean_batch"] == round(n / v["commits"], 2), name
        else:
            assert v["commits"] is None and v["mean_batch"] is None, name
    # With the worker held off, every request joins the one queued job.
    for name in ("one_client", "worker_paused", "one_client_commit_each", "worker_paused_commit_each"):
        v = acc["variants"][name]
        assert v["jobs_created"] == 1 and v["largest_job_requests"] == v["requests"], name
    db = acc["job_db"]
    assert set(db) == {"commit_each_1", "grouped_1", "commit_each_50", "grouped_50", "sealed_1", "sealed_50"}
    for name, v in db.items():
        n = v["clients"] * v["requests_per_client"]
        assert v["latency"]["n"] == n and v["throughput_rps"] > 0 and v["sealed"] == name.startswith("sealed")
        assert v["group_commit"] == (not name.startswith("commit_each")), name
        assert 1 <= v["commits"] <= n and (v["group_commit"] or v["commits"] == n), name
    for name in ("solving", "solving_commit_each"):
        assert acc["variants"][name]["clients"] == 50 and not acc["variants"][name]["worker_paused"]
    assert "grouped:" in markdown and "one per request" in markdown and "One commit per request -> group commit" in markdown
    assert "correction, sealed" in markdown and "Sealing a correction's text" in markdown


def test_merging(quick_result):
    result, markdown = quick_result
    mg = result["merging"]
    n = result["settings"]["queued_requests"]
    assert mg["requests"] == n and set(mg["modes"]) == {"merged", "one_by_one"}
    for name, mode in mg["modes"].items():
        assert mode["all_succeeded"] and mode["requests"] == n, (name, [j["error"] for j in mode["per_job"]])
        assert mode["rows_after"] == mode["rows_before"] - n and mode["removed_as_requested"]
        assert mode["version_after"] == mode["version_before"] + mode["solves"]
        assert sum(j["requests"] for j in mode["per_job"]) == n and len(mode["per_job"]) == mode["jobs"]
        assert mode["seconds_to_all_succeeded"] > 0 and mode["solve_seconds_mean"] > 0
        assert all(j["converged"] and j["affected_loss_before"] > 0 for j in mode["per_job"])
    merged, one_by_one = mg["modes"]["merged"], mg["modes"]["one_by_one"]
    assert one_by_one["solves"] == n and 1 <= merged["solves"] < n
    assert mg["same_rows_removed"] and mg["speedup"] > 0
    ev = mg["evaluation"]
    assert set(ev["losses"]) == {"original", "merged", "one_by_one"}
    assert all(math.isfinite(v) and v > 0 for losses in ev["losses"].values() for v in losses.values())
    assert -1 <= ev["update_cosine"] <= 1 and ev["relative_difference"] >= 0
    assert "## Erase acceptance" in markdown and "merged vs one by one" in markdown and "Reading:" in markdown
