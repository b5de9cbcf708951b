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
        assert set(a["row_tests"]) == {"rank", "t"}
        for r in a["row_tests"].values():
            assert 0 <= r["false_alarm_rate"] <= 1 and 0 <= r["rows_flagged_share"] <= 1
        # On 12 held-out rows a rank p-value is at least 1/13, above the Bonferroni bound: never fires.
        assert a["row_tests"]["rank"]["false_alarm_rate"] == a["row_tests"]["rank"]["rows_flagged_share"] == 0
    md = (tmp_path / "target_calibration-quick.md").read_text()
    assert "ratio (the product)" in md and "quick mode" in md
    # The tables are rendered again from the JSON alone.
    again = subprocess.run([sys.executable, "-m", "bench.target_calibration", "--render",
                            str(tmp_path / "target_calibration-quick.json"), "--out", str(tmp_path / "again")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (tmp_path / "again" / "target_calibration-quick.md").read_text() == md


def test_the_t_row_test_flags_a_far_row_on_twelve_held_out_rows_where_ranks_cannot():
    """Rank p-values never go below 1/(m+1) (1/13 on 12 rows, above a Bonferroni bound of
    0.05/3): a row far above every held-out row passes; the t prediction test flags it and
    leaves a row inside the held-out spread alone."""
    from bench.target_calibration import rank_p_values, t_p_values

    holdout = [0.1 * i for i in range(12)]  # mean 0.55, sd 0.36
    rank, t = rank_p_values([3.0, 0.6], holdout), t_p_values([3.0, 0.6], holdout)
    assert abs(rank[0] - 1 / 13) < 1e-12 and rank[0] > 0.05 / 3
    assert t[0] < 1e-4 and t[1] > 0.4
    assert t_p_values([1.0], [0.5, 0.5, 0.5]) == [1.0]  # no spread: no evidence
