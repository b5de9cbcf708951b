"""The output-layer benchmark end to end (``python -m bench.output_layer --quick``): both ways
timed, the same per-row NLL, the table written (never timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_times_both_ways_and_they_agree(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.output_layer", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "output_layer-quick.json").read_text())
    assert set(result["timings"]) == {"every position (baseline)", "response positions (engine)"}
    for way in result["timings"].values():
        for kind in ("forward", "forward_backward"):
            assert len(way[kind]["all_s"]) == result["settings"]["repeats"] and way[kind]["best_s"] > 0
    # The same loss either way: float32 rounding only.
    assert result["agreement"]["rows"] == result["settings"]["rows"]
    assert result["agreement"]["max_abs_nll_difference"] < 1e-4
    md = (tmp_path / "output_layer-quick.md").read_text()
    assert "response positions (engine)" in md and "quick mode" in md
