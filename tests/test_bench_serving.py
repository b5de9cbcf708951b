"""The serving benchmark end to end: ``python -m bench.serving --quick`` starts a real vLLM on
a tiny Llama, erases through the sidecar, swaps versions, and writes its JSON and Markdown
with every key and sane values (numbers only checked for consistency, never timed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = {"schema_version", "benchmark", "mode", "machine", "settings", "model", "erase_to_served", "swap_latency",
            "raw_vllm_load", "served_answer", "total_seconds", "note", "caveats", "reading"}
SUMMARY_KEYS = {"n", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms"}
ENGINE_STAGES = ("load", "gradient", "curvature_setup", "solve", "evaluate", "write")
SWAP_MEASURES = ("rollback_rpc_ms", "probe_build_ms", "load_confirm_ms", "post_load_lora_adapter_ms",
                 "load_models_lookup_ms", "models_check_ms", "probe_generate_ms", "probe_generate_again_ms")


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench-serving")
    proc = subprocess.run([sys.executable, "-m", "bench.serving", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[bench.serving" in proc.stderr, "progress is shown on stderr"
    assert sorted(p.name for p in out.iterdir()) == ["serving-quick.json", "serving-quick.md"]
    return json.loads((out / "serving-quick.json").read_text()), (out / "serving-quick.md").read_text()


def _sane(summary: dict, n: int) -> None:
    assert set(summary) == SUMMARY_KEYS and summary["n"] == n
    assert 0 <= summary["min_ms"] <= summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert summary["min_ms"] <= summary["mean_ms"] <= summary["max_ms"]


def test_top_level_and_machine(quick_result):
    result, _ = quick_result
    assert set(result) == TOP_KEYS
    assert (result["benchmark"], result["mode"], result["schema_version"]) == ("serving", "quick", 1)
    machine = result["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["date"] and machine["vllm"]
    assert result["model"]["train_rows"] > result["settings"]["erase_rows"] > 0
    assert result["model"]["vllm_start_seconds"] > 0 and result["model"]["register_seconds"] > 0
    assert result["total_seconds"] > 0 and result["reading"] and result["caveats"]


def test_erase_to_served(quick_result):
    result, markdown = quick_result
    e = result["erase_to_served"]
    assert e["rows_erased"] == result["settings"]["erase_rows"] == len(e["erased_ids"])
    assert (e["from_version"], e["to_version"]) == (1, 2)
    assert e["solver"] == "cg" and e["converged"] and 1 <= e["iterations"] <= result["settings"]["max_iterations"]
    stages = e["stages"]
    for k in ("erase_rpc", "queue_wait", "publish", "swap.probe_lookup", "swap.load_confirm", "client_notified",
              "first_served_answer", *(f"engine.{k}" for k in ENGINE_STAGES)):
        assert k in stages, k
    for name, v in stages.items():
        assert math.isfinite(v["ms"]) and v["what"], name
    # Every stage but the two remainders is a duration; the stages add up to the total.
    assert all(v["ms"] >= 0 for k, v in stages.items() if not k.endswith(".other")), stages
    total = e["erase_to_served_seconds"]
    assert total > 0 and abs(sum(v["ms"] for v in stages.values()) / 1000 - total) < 0.01 * total + 0.01
    assert 0 < e["erase_call_to_succeeded_seen_seconds"] <= total and e["erase_rpc_return_ms"] > 0
    assert stages["engine.solve"]["ms"] / 1000 == pytest.approx(e["report_seconds"]["solve"], abs=1e-3)
    # The job's own swap stage contains the probe lookup and the replica's load+confirm; the
    # probe comes from the erase, so the stage is shorter than with one built in the sidecar.
    swap_ms = e["report_seconds"]["swap"] * 1000
    assert stages["swap.probe_lookup"]["ms"] + stages["swap.load_confirm"]["ms"] <= swap_ms + 1
    assert e["report_seconds"]["probe"] > 0 and e["sidecar_probe_build_seconds"] > 0
    assert e["swap_stage_seconds"]["recorded_probe"] == pytest.approx(e["report_seconds"]["swap"], abs=1e-3)
    assert e["swap_stage_seconds"]["probe_built_in_sidecar"] > e["swap_stage_seconds"]["recorded_probe"]
    assert len(e["swap_checks"]) == 1 and e["swap_checks"][0]["max_logprob_error"] <= 0.02
    split = e["swap_split"]
    assert split["post_load_lora_adapter_ms"] > 0 and split["probe_generate_ms"] > 0
    assert "## Erase to served" in markdown and "## Swap latency" in markdown and "Reading:" in markdown


def test_swap_latency_and_raw_loads(quick_result):
    result, _ = quick_result
    n = result["settings"]["swaps"]
    sw = result["swap_latency"]
    assert len(sw["per_swap"]) == n and set(sw["summary"]) == set(SWAP_MEASURES)
    versions = [s["version"] for s in sw["per_swap"]]
    assert versions == list(range(3, 3 + n)), "every rollback publishes a fresh version"
    for s in sw["per_swap"]:
        assert s["content_of"] == s["version"] - 2  # alternating between the two retained versions
        assert s["load_confirm_ms"] <= s["rollback_rpc_ms"] and s["probe_build_ms"] <= s["rollback_rpc_ms"]
        assert s["post_load_lora_adapter_ms"] + s["probe_generate_ms"] <= s["load_confirm_ms"] + 1
    for key in SWAP_MEASURES:
        _sane(sw["summary"][key], n)
    hist = sw["metrics_histogram"]
    assert hist and hist["count"] >= n + 2  # register, the erase, the rollbacks
    raw = result["raw_vllm_load"]
    assert len(raw["per_load_ms"]) == result["settings"]["raw_loads"]
    _sane(raw["summary"], result["settings"]["raw_loads"])
    answer = result["served_answer"]
    assert answer["before"] and answer["after"] and answer["first_answer_ms"] > 0
    _sane(answer["steady_answer_ms"], 3)
