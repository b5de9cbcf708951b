"""The fast-path benchmark end to end on SmolLM2 (``python -m bench.fastpath --quick``):
every stage and quality figure is written, and the numbers are consistent (never timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_every_stage(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.fastpath", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "fastpath-quick.json").read_text())
    md = (tmp_path / "fastpath-quick.md").read_text()
    stages, quality = result["stages"], result["quality"]
    sizes = result["settings"]["sizes"]
    for k in sizes:
        assert stages[f"floor_{k}"]["seconds"] > 0 and stages[f"erase_ekfac_{k}"]["seconds"] > 0
        assert stages[f"erase_ekfac_{k}"]["notes"]["update_norm"] > 0
        assert f"erase_ekfac_{k}" in md
    mid = quality["rows"]
    for name in ("factor_fit_ekfac", "train_one_epoch", f"downdate_{mid}", f"erase_cg_{mid}",
                 f"erase_datainf_{mid}", f"retrain_scratch_{mid}", "factor_refit_after_erase"):
        assert stages[name]["seconds"] > 0 and stages[name]["rss_peak_mb"], name
    # The fast updates point roughly where cg's does, even with cg capped at 2 iterations.
    assert quality["ekfac_vs_cg_cosine"] > 0.5 and quality["datainf_vs_cg_cosine"] > 0.5
    assert -1 <= quality["downdate_vs_refit_cosine"] <= 1 and 0 < quality["changed_fraction"] < 1
    assert len(result["reading"]) == len(sizes) + 4
