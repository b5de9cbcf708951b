"""The job's typed report (sidecar/report.py): the engine's reports, as an erase writes them,
read into the tree and written back in the same flat layout (job records and manifests
written before the type must read back unchanged)."""

from __future__ import annotations

import dataclasses

from eraser.membership import RowScores, reference_verdict, verdict
from eraser.probe import VersionProbe
from eraser.secondorder import LearnCheck
from eraser.unlearn import EraseReport, UtilityCheck
from eraser.reports import FactorUse, Step, as_json, utility_of
from eraser.verify import VerifyConfig, _scores
from sidecar.report import JobReport, verification_of


def _verification(basis: str) -> dict:
    erased = RowScores([1.2, 1.4], [-3.0, -2.5], [False, False], [1.5, 1.6])
    held = RowScores([1.0, 1.3, 1.6, 1.9], [-2.0, -2.2, -2.9, -3.1], [False] * 4, [1.2, 1.5, 1.8, 2.0])
    v = verdict(erased, held, 0.75, 0.1) if basis == "held-out" else reference_verdict(erased)
    return {
        "policy": "enforce", "passed": True, "reason": "erased rows look never-seen",
        "bounds": as_json(VerifyConfig().bounds()), "retain_reference": 0.31,
        "before": _scores([0.1, 0.2], [1.0, 1.3, 1.6, 1.9], [0.3]).to_json(),
        "after": _scores([1.2, 1.4], [1.0, 1.3, 1.6, 1.9], [0.31]).to_json(),
        "refinement": {"method": "natural", "steps": 2, "seconds": 1.5, "stopped": "", "passed": True,
                       "trace": [as_json(Step("natural", 0.5, 2, 0.01, 0.002, 0.3))]},
        "erased_ids": ["a", "b"], "seconds": 2.0,
        "membership": {"before": None, "after": v.to_json()},
        "learned": LearnCheck(0.4, 0.3).to_json(RowScores([0.35], [-1.0], [True], None))}


def _engine(verification: dict) -> dict:
    report = EraseReport(
        solver="ekfac", preset=None, curvature="ggn", damping=0.002, objective="kl", iterations=0, residual=float("nan"),
        converged=True, tolerance=float("nan"), seconds={"load": 1.0, "total": 3.0}, affected_loss_before=0.1,
        affected_loss_after=1.2, edited_loss_before=None, edited_loss_after=None, rows=24, rows_after=22,
        counts={"remove": 2}, curvature_rows=24, curvature_products=0, parameters=4096, update_norm=0.7,
        adapter_out="/staging/x", adapter_sha256="ab" * 32, parent_adapter_sha256="cd" * 32,
        factors=FactorUse("cache", age_seconds=12.5, out_action="downdated", changed_fraction=0.08,
                          downdate_seconds=0.4, out="/staging/f"),
        verification=verification_of(verification), utility=utility_of(UtilityCheck(8, 0.30, 0.31, 0.3).to_json()),
        steps=(Step("influence", 0.25, 3, 0.2, 0.01),),
        probe=VersionProbe((1, 2, 3), (4, 5), (-0.1, -0.2), 0.7))
    return report.to_json()


def test_an_engine_report_reads_into_the_tree_and_back_unchanged():
    for basis in ("held-out", "base-model reference"):
        stored = _engine(_verification(basis))
        report = JobReport.from_json(stored)
        assert report.engine.solver == "ekfac" and report.engine.residual is None and report.engine.steps[0].scale == 0.25
        assert report.engine.probe == VersionProbe((1, 2, 3), (4, 5), (-0.1, -0.2), 0.7)
        assert report.factors.source == "cache" and report.factors.changed_fraction == 0.08
        v = report.verification
        assert v.verdict.basis == basis and v.final.auc == stored["verification"]["after"]["auc"]
        assert v.refinement.trace[0].damping == 0.3 and v.learned.reproduced == 1 and v.outcome == "refined"
        assert report.utility.rise == stored["utility"]["rise"]
        again = report.to_json()
        # Only the staging paths are dropped; every other stored value reads back as it was.
        expected = {k: v for k, v in stored.items() if k != "adapter_out"}
        expected["factors"] = {k: v for k, v in stored["factors"].items() if k != "out"}
        assert _subset(expected, again), (expected, again)
        assert JobReport.from_json(again) == report


def test_a_refused_update_keeps_only_its_verdict():
    report = JobReport(verification=verification_of(_verification("held-out")))
    stored = report.to_json()
    assert "solver" not in stored and JobReport.from_json(stored) == report and report.engine is None
    assert JobReport.from_json(None) is None


def test_a_report_is_frozen():
    report = JobReport.from_json(_engine(_verification("held-out")))
    try:
        report.engine.solver = "cg"
    except dataclasses.FrozenInstanceError:
        return
    raise AssertionError("a report's fields could be changed in place")


def _subset(expected, actual) -> bool:
    """Every value of ``expected`` is in ``actual`` (lists as lists, dicts key by key); the
    tree may add fields that default (a held-out verdict's ``ahead``)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _subset(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, (list, tuple)):
        return isinstance(actual, (list, tuple)) and len(expected) == len(actual) and all(
            _subset(e, a) for e, a in zip(expected, actual))
    return expected == actual


def test_erasectl_reads_a_job_message_back_as_the_same_typed_report():
    """What a client gets (the proto, mapped once in wire) reads back, in erasectl, into the
    report type the sidecar keeps: every number the proto carries is the one the sidecar had,
    and erasectl formats it from the type (the same line as from the sidecar's own report)."""
    from sidecar.ctl import _report_parts
    from sidecar.wire import report_message, report_of_message

    for basis in ("held-out", "base-model reference"):
        report = JobReport.from_json(_engine(_verification(basis))).with_(solver_reason="ekfac: factors of v1",
                                                                           serving="confirmed on 1 replica(s)")
        back = report_of_message(report_message(report))
        assert (back.engine.solver, back.engine.rows, back.engine.rows_after, back.engine.counts) == ("ekfac", 24, 22,
                                                                                                   {"remove": 2})
        assert back.utility == report.utility and back.seconds == report.seconds
        assert (back.factors.source, back.factors.out_action, back.factors.changed_fraction) == ("cache", "downdated",
                                                                                              0.08)
        v, w = report.verification, back.verification
        assert (w.policy, w.passed, w.bounds, w.retain_reference) == (v.policy, v.passed, v.bounds, v.retain_reference)
        assert (w.before.auc, w.final.auc, w.final.erased_mean_nll) == (v.before.auc, v.final.auc, v.final.erased_mean_nll)
        assert (w.refinement.steps, w.refinement.method) == (v.refinement.steps, v.refinement.method)
        assert w.verdict.basis == basis and [a.auc for a in w.verdict.attacks] == [a.auc for a in v.verdict.attacks]
        assert w.learned == v.learned
        assert _report_parts(back, succeeded=True) == _report_parts(report, succeeded=True)
        # A refused update: only its verdict travels, and reads back so.
        refused = report_of_message(report_message(JobReport(verification=v)))
        assert refused.engine is None and refused.verification.passed == v.passed
