"""The unlearning benchmark end to end: ``python -m bench.unlearning --quick`` on SmolLM2-135M
writes its JSON, Markdown and plots with every task and method, and its numbers pass loose
sanity checks (which direction things move, not how far: the quick size is a smoke test).

Utility: retraining and the baselines must keep the retained rows; an influence method
that breaks them is a finding (it happens, see the brief), so for those the test demands
that the report flags it rather than forbidding it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.unlearning.methods import FULL_SIZE_ONLY, METHODS
from bench.unlearning.report import UTILITY_BROKEN_NATS
from bench.unlearning.run import TOP_KEYS, Settings
from bench.unlearning.tasks import IR, build

ROOT = Path(__file__).resolve().parents[1]
# The quick run takes about 10 minutes on an idle 2-core CPU (two fine-tunes, three
# tasks, the rows the full size alone runs skipped); a loaded machine needs more.
pytestmark = pytest.mark.timeout(2700)
STATUSES = {"ok", "unavailable", "error"}
# The never-seen level of this data is ~1-2 nats (the answers' sentence frames are
# predictable, only the values are not) and the trained rows sit near 0.01-0.1. Retraining
# and the baselines moved the retained rows' NLL by at most 0.3 in the quick runs here; a
# rise of 1 nat would mean they wrecked what they should keep.
RETAIN_RISE_BOUND = 1.0
# Beyond ln(vocabulary) ≈ 10.8 nats a model is worse than guessing tokens uniformly at random.
COLLAPSE_NLL = math.log(49152)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("bench-unlearning")
    proc = subprocess.run([sys.executable, "-m", "bench.unlearning", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "unlearning-quick.json").read_text()), (out / "unlearning-quick.md").read_text(), out


def test_files_and_schema(quick):
    result, markdown, out = quick
    assert sorted(p.name for p in out.iterdir()) == [
        "unlearning-quick-time.png", "unlearning-quick-tradeoff.png", "unlearning-quick.json", "unlearning-quick.md"]
    for png in result["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tuple(result) == TOP_KEYS
    assert (result["benchmark"], result["mode"], result["schema_version"]) == ("unlearning", "quick", 1)
    assert result["machine"]["torch"] and result["machine"]["cpu_count"] >= 1
    assert result["reading"] and result["caveats"] and result["total_seconds"] > 0
    # Every task of the quick size and every registered method, each with a status.
    expected_tasks = [t.name for t in build(Settings.quick()).tasks]
    assert list(result["tasks"]) == expected_tasks
    assert {t["kind"] for t in result["tasks"].values()} == {IR, "response_correction", "query_modification"}
    assert list(result["methods"]) == [m.name for m in METHODS]
    for tname, task in result["tasks"].items():
        assert list(task["methods"]) == [m.name for m in METHODS], tname
        for m in METHODS:
            rec = task["methods"][m.name]
            assert rec["status"] in STATUSES, (tname, m.name)
            # Only optional methods (code still being written elsewhere) may be missing, and
            # the rows only the full size runs: first-order +refine, paper preset, cg.
            full_only = (m.family == "refined" or m.name in ("llmeraser-paper", "llmeraser-cg")) \
                and rec.get("reason") == FULL_SIZE_ONLY
            assert rec["status"] == "ok" or m.optional or full_only, (tname, m.name, rec)
        assert f"## {tname}" in markdown
    assert "Reading:" in markdown and "Caveats:" in markdown


def test_originals_learnt_the_facts(quick):
    result, _, _ = quick
    for name, q in result["originals"].items():
        # The quick size is the smallest that still learns: recall near 1 (measured), >= 0.5 asked.
        assert q["greedy_recall"] >= 0.5, (name, q)
        assert q["train_nll"] < 0.5, (name, q)
        # Teacher-forced exact match is what greedy decoding does; allow one odd tokenisation.
        assert q["greedy_agrees_with_teacher_forced"] >= q["greedy_checked_rows"] - 1, (name, q)


def test_retraining_forgets_and_corrects(quick):
    result, _, _ = quick
    for tname, task in result["tasks"].items():
        orig = task["methods"]["original"]["probes"]
        scratch = task["methods"]["retrain-scratch"]["probes"]
        target = task["target_probe"]
        # Retraining without the rows (or with them corrected) loses them: their NLL rises
        # from the trained level toward the never-seen level.
        assert scratch[target]["nll"] > orig[target]["nll"] + 0.1, (tname, orig[target], scratch[target])
        if "new" in orig:  # and the corrected rows are learnt instead
            assert scratch["new"]["nll"] < orig["new"]["nll"], (tname, orig["new"], scratch["new"])
        assert task["methods"]["original"]["cosine_scratch"] is None
        assert task["methods"]["retrain-scratch"]["cosine_scratch"] == pytest.approx(1.0)


def test_metrics_are_sane_and_utility_holds(quick):
    result, markdown, _ = quick
    for tname, task in result["tasks"].items():
        orig = task["methods"]["original"]["probes"]
        for name, rec in task["methods"].items():
            if rec["status"] != "ok":
                assert rec["reason"], (tname, name)
                continue
            for probe, s in rec["probes"].items():
                assert s["n"] == task["probe_rows"][probe] > 0
                assert math.isfinite(s["nll"]) and s["nll"] >= 0 and 0 <= s["exact_match"] <= 1, (tname, name, probe)
            assert 0 <= rec["mia_auc"] <= 1
            for key in ("cosine_scratch", "cosine_warm"):
                assert rec[key] is None or -1 - 1e-9 <= rec[key] <= 1 + 1e-9
            assert rec["seconds"] >= 0 and (rec["rss_peak_mb"] is None or rec["rss_peak_mb"] > 0)
            rise = rec["probes"]["retain"]["nll"] - orig["retain"]["nll"]
            if result["methods"][name]["family"] in ("reference", "retrain", "baseline"):
                # Retraining and the plain baselines keep the retained facts: a property of
                # the setup, not of an engine under test.
                assert rise < RETAIN_RISE_BOUND, (tname, name, rise)
                assert rec["probes"]["never"]["nll"] < COLLAPSE_NLL, (tname, name)
            elif rise > UTILITY_BROKEN_NATS:
                # Influence steps can and do break the model (brief, section 2: retained NLL
                # 0.08 -> 6.5-14.7 on SmolLM2; here the quick size's 3-iteration cg on a
                # 4-row GGN did on the response-correction task). That is a result, so the
                # test does not forbid it; it demands that the report says so.
                assert f"{name} on {tname} (" in markdown, (tname, name, rise)
                assert f"UTILITY BROKEN: {name}:" in markdown, (tname, name)


def test_product_verdicts_follow_the_products_own_checks(quick):
    """Each influence step carries the product's utility check (eraser.unlearn.UtilityCheck),
    each +refine row verification's verdict under enforce; the table's "product" column and
    the reading say what the sidecar would have refused."""
    from bench.unlearning.report import verdict
    from eraser.unlearn import EraseConfig

    result, markdown, _ = quick
    bound = EraseConfig().max_retain_rise
    for tname, task in result["tasks"].items():
        for name, rec in task["methods"].items():
            if rec["status"] != "ok":
                continue
            family, info = result["methods"][name]["family"], rec["info"]
            if family == "influence":
                check = info["utility_check"]
                assert check["max_rise"] == bound and check["rows"] >= 1
                assert check["passed"] == (check["after"] - check["before"] <= bound), (tname, name, check)
                assert verdict(rec) == ("published" if check["passed"] else f"refused: utility {check['rise']:+.2f}")
            elif family == "product":
                assert verdict(rec) == "published" if info["published"] else verdict(rec).startswith("refused: ")
            elif family == "refined":
                assert isinstance(info["passed"], bool) and info["verdict"]
                assert info["retain_reference"] is not None
                assert (verdict(rec) == "verified") if info["passed"] else verdict(rec).startswith("refused: ")
            else:
                assert verdict(rec) == "", (tname, name)
            if verdict(rec).startswith("refused"):
                assert f"{name} on {tname} (" in markdown.split("Refused by the product's checks")[1]
    assert "| product |" in markdown


def test_product_row_is_the_headline(quick):
    """The product's default erase path (eraser.configure.product_erase_config through
    eraser.unlearn.erase) runs on every task as the first row after the original and the
    retrainings, with its own verdict, the benchmark's re-measurement of that verdict on
    never-trained people, and the relearning and bf16 probes."""
    from bench.unlearning.run import PROBED
    from eraser.configure import product_erase_config

    result, markdown, _ = quick
    names = [m.name for m in METHODS]
    assert names[: names.index("product")] == ["original", "retrain-scratch", "retrain-warm"]
    assert result["methods"]["product"]["family"] == "product"
    own = product_erase_config(has_holdout=True)
    for tname, task in result["tasks"].items():
        rec = task["methods"]["product"]
        assert rec["status"] == "ok", (tname, rec)
        info = rec["info"]
        assert info["published"] == (info["product_verdict"] == "published"), (tname, info["product_verdict"])
        assert info["published"] or info["product_verdict"].startswith("refused: "), (tname, info["product_verdict"])
        # The product's own config, its refinement budget reduced in quick mode and labelled so.
        assert info["config"]["solver"] == own.solver.name == "ekfac"
        assert info["config"]["relative"] is True and info["config"]["damping"] == own.curvature.damping
        assert info["config"]["policy"] == "enforce" and info["config"]["max_retain_rise"] == own.max_retain_rise
        assert info["verify_budget"]["reduced"] is True
        assert info["verify_budget"]["max_steps"] < own.verify.max_steps
        assert info["erase_wall_seconds"] > 0 and info["holdout_rows"] >= own.verify.min_holdout_rows
        # The product's own verdict: from its report when it published, from its refusal otherwise.
        if info["published"]:
            assert info["verification"]["passed"] is True and info["verdict"]["passed"] is True, tname
        if info["verdict"] is not None:
            for a in info["verdict"]["attacks"].values():
                assert 0 <= a["auc"] <= 1
        # The factors are fitted once per original adapter and read from the cache after that.
        assert info["factor_source"] in ("fitted", "cache")
        for name in PROBED:
            r = task["methods"][name]
            b = r["benchmark_verdict"]
            assert isinstance(b["passed"], bool) and b["holdout_rows"] == task["probe_rows"]["never"], (tname, name)
            assert b["attacks"] and all(0 <= a["auc"] <= 1 for a in b["attacks"].values()), (tname, name)
            target = task["target_probe"]
            values = [r["relearn"]["nll"], r["relearn"]["exact_match"]]
            if name == "product":  # served precision: the product's adapter in bf16
                values += [r["bf16"][target]["nll"], r["bf16"][target]["exact_match"], r["bf16"]["retain"]["nll"]]
            for value in values:
                assert value is not None and math.isfinite(value), (tname, name, value)
            assert 0 <= r["relearn"]["exact_match"] <= 1 and r["relearn"]["steps"] >= 1
        for name in set(task["methods"]) - set(PROBED):
            assert "relearn" not in task["methods"][name], (tname, name)
    sources = [t["methods"]["product"]["info"]["factor_source"] for t in result["tasks"].values()]
    assert sources.count("fitted") == len({t["original"] for t in result["tasks"].values()}), sources
    assert "**product**" in markdown and "REDUCED verify budget" in markdown
    assert "The product's membership verdict vs the benchmark's re-measurement" in markdown
