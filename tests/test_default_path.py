"""The product's default erase path (eraser/options.py) is what the CLI runs without flags:
EK-FAC, damping relative to the curvature's scale, step control, and verification under
enforce: against a held-out set when one is given, else against the base model."""

from __future__ import annotations

import json

from eraser import options
from eraser.membership import base_model_nll, judge_attack, measure
from eraser.verify import pairs
from test_cli import run_cli
from test_verify import load, world  # noqa: F401  (world: the module-scoped fixture)


def _cli_erase(world, tmp_path, *extra):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"remove": [r.id for r in world["erased"]]}))
    res = run_cli("erase", "--base", world["base"], "--adapter", world["adapter"], "--data", world["data"],
                  "--request", request, "--out", tmp_path / "v2", "--json", *extra)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _independent_aucs(world, adapter) -> dict[str, float]:
    """The written adapter's erased rows against the second held-out set, never given to the erase."""
    model, tok = load(world, adapter)
    erased, held = pairs(world["erased"]), pairs(world["holdout2"])
    e = measure(model, tok, erased, "cpu", base_nll=base_model_nll(model, tok, erased, "cpu"))
    h = measure(model, tok, held, "cpu", base_nll=base_model_nll(model, tok, held, "cpu"))
    return {a: judge_attack(a, e.member_scores(a), h.member_scores(a), 0.75, 0.1).auc
            for a in ("loss", "reference", "mink")} | {"recalled": sum(e.exact)}


def test_cli_default_without_a_holdout_enforces_the_base_model_level(world, tmp_path):
    report = _cli_erase(world, tmp_path)
    assert report["solver"] == options.DEFAULT_SOLVER == "ekfac"
    assert report["factors"] is None  # no cache given: the factors were fitted in the call
    # Relative damping: λ is a multiple of the curvature's scale, not the bare 0.1.
    assert report["damping"] != options.DEFAULT_DAMPING
    assert report["steps"][0]["kind"] == "influence" and report["utility"]["passed"]
    v = report["verification"]
    assert v["policy"] == "enforce" and v["passed"], v["reason"]
    assert v["membership"]["before"]["ahead"] > 0  # the influence step alone left rows ahead of the base model
    verdict = v["membership"]["after"]
    assert verdict["basis"] == "base-model reference" and verdict["erased_rows"] == len(world["erased"])
    assert verdict["ahead"] == 0 and verdict["recalled"] == 0
    assert any(s["kind"] == "natural" for s in report["steps"])
    # Against held-out people it never saw, the base-model level errs toward over-forgetting
    # (see the next test) but stays inside the bounds of a held-out verdict.
    aucs = _independent_aucs(world, tmp_path / "v2")
    assert aucs["recalled"] == 0
    assert all(0.1 <= aucs[a] <= 0.8 for a in ("loss", "reference", "mink")), aucs


def test_a_budget_too_small_for_the_base_model_level_fails_cleanly(world, tmp_path):
    """Without a held-out set the erased rows must show no advantage over the base model; a
    refinement budget too small to reach it fails with one line and writes nothing. (Whether
    that target is stricter than the held-out one depends on how well the adapter generalises
    its format to never-seen people: on this fixture the median never-seen row's advantage was
    +0.1 nats or more on one CPU and -0.07 on another.)"""
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"remove": [r.id for r in world["erased"]]}))
    res = run_cli("erase", "--base", world["base"], "--adapter", world["adapter"], "--data", world["data"],
                  "--request", request, "--out", tmp_path / "v2", "--verify-max-steps", "1")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "judged against the base model" in res.stderr and "verification failed" in res.stderr
    assert not (tmp_path / "v2").exists()


def test_cli_default_with_a_holdout_judges_against_it(world, tmp_path):
    report = _cli_erase(world, tmp_path, "--holdout", world["holdout"])
    v = report["verification"]
    assert report["solver"] == "ekfac" and v["policy"] == "enforce" and v["passed"], v["reason"]
    assert v["membership"]["after"]["basis"] == "held-out"
    assert {a["name"] for a in v["membership"]["after"]["attacks"]} == {"loss", "reference", "mink"}
    # The verdict agrees with a second held-out set the erase never saw.
    aucs = _independent_aucs(world, tmp_path / "v2")
    assert aucs["recalled"] == 0
    assert all(0.1 <= aucs[a] <= 0.8 for a in ("loss", "reference", "mink")), aucs
