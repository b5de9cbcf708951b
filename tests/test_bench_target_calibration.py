"""The target-calibration benchmark end to end (``python -m bench.target_calibration --quick``):
every way scored on never-seen rows, the tables written (numbers not asserted beyond sanity)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_scores_every_way_on_never_seen_rows(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.target_calibration", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "target_calibration-quick.json").read_text())
    assert result["mode"] == "quick" and len(result["regimes"]) == 1
    regime = result["regimes"][0]
    never = result["settings"]["never_rows"]
    assert regime["rows"]["never_seen"] == never
    assert set(regime["targets"]) == {"difference (before)", "ratio (the product)", "held-out median (no base model)"}
    for t in regime["targets"].values():
        assert t["mae"] >= 0 and t["mae_resampled_p90"] >= 0 and 0 <= t["at_or_below_zero"] <= never
    # A ratio of positive NLLs is positive: the product's targets never ask for an NLL of zero or less.
    assert regime["targets"]["ratio (the product)"]["at_or_below_zero"] == 0
    for a in regime["attacks"].values():
        assert -1 <= a["rank_correlation_with_base_nll"] <= 1 and 0 <= a["member_auc"] <= 1
        assert a["never_seen_auc_by_kind"] and 0 <= a["calibration_error"] <= 0.5
    md = (tmp_path / "target_calibration-quick.md").read_text()
    assert "ratio (the product)" in md and "quick mode" in md
    # The tables are rendered again from the JSON alone.
    again = subprocess.run([sys.executable, "-m", "bench.target_calibration", "--render",
                            str(tmp_path / "target_calibration-quick.json"), "--out", str(tmp_path / "again")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (tmp_path / "again" / "target_calibration-quick.md").read_text() == md
