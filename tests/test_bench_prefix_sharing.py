"""The prefix-sharing benchmark end to end (``python -m bench.prefix_sharing --quick``): every
way timed, the same per-row NLL, the table written (never timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_times_every_way_and_they_agree(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.prefix_sharing", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "prefix_sharing-quick.json").read_text())
    batches = result["settings"]["batches"]
    assert set(result["timings"]) == ({f"one pass, batches of {b}" for b in batches}
                                      | {f"shared prefix, batches of {b}" for b in batches})
    for way in result["timings"].values():
        for kind in ("forward", "forward_backward"):
            assert len(way[kind]["all_s"]) == result["settings"]["repeats"] and way[kind]["best_s"] > 0
    assert result["settings"]["shared_prefix_tokens"] >= 8  # the shared path ran
    assert result["agreement"]["rows"] == result["settings"]["rows"]
    assert result["agreement"]["max_abs_nll_difference"] < 1e-4
    md = (tmp_path / "prefix_sharing-quick.md").read_text()
    assert "shared prefix, batches of" in md and "quick mode" in md
