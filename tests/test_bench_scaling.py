"""The scaling benchmark end to end at its quick size (``python -m bench.scaling --quick``:
the tiny Llama at N = 30 and 60): every output is written, every row carries an erase and
a retrain time with its measured/extrapolated flag, and the ratio is what it says (never
timed: no assert on which is faster)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_consistent_outputs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.scaling", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "scaling-quick.json").read_text())
    md = (tmp_path / "scaling-quick.md").read_text()
    png = (tmp_path / "scaling-quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

    rows = result["rows"]
    assert [(r["model"], r["n"]) for r in rows] == [("tiny", 30), ("tiny", 60)]
    for r in rows:
        e, t, f = r["erase"], r["retrain"], r["factor_fit"]
        assert e["seconds"] > 0 and t["seconds"] > 0 and f["seconds"] > 0
        assert e["status"] == "measured" and f["status"] == "measured"
        assert t["status"] in ("measured", "extrapolated")
        assert r["erased_rows"] == 3 and r["retrain_rows"] == r["n"] - 3
        assert math.isclose(r["ratio"], t["seconds"] / e["seconds"], rel_tol=1e-3)
        # The erase really ran the product's path: stage seconds, a verdict, the NLLs.
        assert e["written"] is (e["error"] is None)
        assert isinstance(e["verification_passed"], bool) and e["verification"] is not None
        if e["written"]:
            assert e["stages"]["total"] > 0 and "verify" in e["stages"]
            assert e["forget_nll_before"] > 0 and e["forget_nll_after"] > 0
            assert e["factors"]["source"] == "cache"  # the factors fitted beforehand, not refitted in the erase
        assert t["probe"]["steps"] >= 1 and t["probe"]["seconds_per_step"] > 0
        assert f"| {r['n']} |" in md and t["status"] in md

    a = result["analysis"]["tiny"]
    assert set(a["ratios"]) == {"30", "60"}
    for k in ("exponent_erase", "exponent_retrain", "exponent_factor_fit"):
        assert isinstance(a[k], float) and math.isfinite(a[k])
    assert "break-even N" in md and "growth exponents" in md
