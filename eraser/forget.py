"""The erase's step-control and verification stage: from the influence update to a model
whose erased rows look never-seen (``eraser.secondorder`` for the steps,
``eraser.membership`` for the verdict, ``eraser.verify`` for the first-order fallback).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import VerificationFailedError
from .membership import RowScores, reference_verdict
from .progress import Progress, silent
from .secondorder import (Judge, LearnCheck, SampledObjective, StepConfig, controlled_influence_step,
                          refine_natural)
from .reports import Step, Verification, as_json, verification_of
from .verify import VerifyConfig, VerifyRows, VerifyScores, _scores, verify_and_refine

Pair = tuple[str, str]
# Refinement goes on past the bounds until the calibrated attack's AUC is within this of the
# target (the held-out median), while the budget lasts: a row just inside a bound is still
# likely more member-like than a retrained model's.
SETTLED_SLACK = 0.1


@dataclass
class ForgetResult:
    steps: list[Step] = field(default_factory=list)
    verification: Verification | None = None
    objective: SampledObjective | None = None

    def retained_mean(self) -> float | None:
        """The retained sample's mean NLL where the model is left (scored already when the
        last step or check ended there)."""
        return self.objective.evaluate().retain_mean if self.objective is not None else None

    @property
    def influence_scale(self) -> float | None:
        return self.steps[0].scale if self.steps else None


def _loss_scores(erased: RowScores, holdout: RowScores | None, retain_mean: float | None) -> VerifyScores | None:
    if holdout is None or not erased.nll:
        return None
    s = _scores(erased.nll, holdout.nll, [])
    s.retain_mean_nll, s.retain_rows = retain_mean, 0
    return s


@dataclass(frozen=True)
class _Rows:
    """The request's rows as the objective and the verdict see them. A corrected row's old
    text must look never-seen too: retraining from scratch on the corrected set leaves a
    replaced answer at that level."""

    removed: list[Pair]
    replaced: list[Pair]
    learn: list[Pair]

    @classmethod
    def of(cls, edits) -> "_Rows":
        return cls([(e.old.prompt, e.old.response) for e in edits if e.new is None],
                   [(e.old.prompt, e.old.response) for e in edits if e.new is not None],
                   [(e.new.prompt, e.new.response) for e in edits if e.new is not None])

    @property
    def forget(self) -> list[Pair]:
        return self.removed + self.replaced

    def success(self) -> str:
        return "; ".join(what for what, rows in (("erased rows look never-seen", self.removed),
                                                 ("old rows look never-seen", self.replaced),
                                                 ("new rows learned", self.learn)) if rows)


def forget(model, params, tokenizer, delta: torch.Tensor, factors, edits, holdout: Sequence[Pair],
           retain_pairs: Sequence[Pair], retain_losses: Sequence[float], verify: VerifyConfig, step: StepConfig,
           max_retain_rise: float | None, device, max_length: int, progress: Progress = silent) -> ForgetResult:
    """Apply ``delta`` at a controlled scale, then verify (and under enforce refine) per
    ``verify.policy``. Raises VerificationFailedError (enforce) with the model discarded."""
    rows = _Rows.of(edits)
    bounds = [b for b in (max_retain_rise, verify.max_retain_rise if verify.policy != "off" else None) if b is not None]
    budget = step.max_rise_share * min(bounds) if bounds else math.inf
    judge = Judge(model, tokenizer, rows.forget, holdout if verify.policy != "off" else [], rows.learn, device,
                  max_length, step.score_batch_size, verify.max_auc, verify.min_auc)
    objective = _objective(model, tokenizer, params, rows, retain_pairs, retain_losses, judge, verify, step,
                           device, max_length)
    # Built on the parent: how often greedy decoding reproduces retained rows sizes the learned check.
    checks = _Checks(judge, objective, rows, retain_pairs, retain_losses, verify, step, min(bounds) if bounds else math.inf)
    out = ForgetResult([controlled_influence_step(params, delta, objective, budget, step)], objective=objective)
    if verify.policy == "off":
        return out
    if factors is None and holdout:  # no curvature factors: the first-order refinement, judged by its loss AUC
        out.verification = _first_order(model, tokenizer, edits, holdout, retain_pairs, retain_losses, verify,
                                        device, progress, max_length)
        return out
    started = time.perf_counter()
    refinement = None
    if verify.policy == "enforce" and factors is not None:
        refinement = refine_natural(params, factors, objective, len(retain_pairs), budget, step, verify.max_steps,
                                    verify.max_seconds, checks, progress)
        out.steps.extend(refinement.steps)
        passed, reason = refinement.passed, refinement.reason
    else:
        passed, reason, _ = checks()
        if verify.policy == "enforce" and not passed:
            reason += " (no curvature factors to refine with: the ekfac or kfac solver)"
    out.verification = _report(verify, checks.state, passed, reason, refinement, objective.retain_reference,
                               [e.old.id for e in edits], time.perf_counter() - started, checks.learn_check)
    if verify.policy == "enforce" and not passed:
        raise VerificationFailedError(f"verification failed: {reason}; {out.verification.summary()}", out.verification)
    return out


def _objective(model, tokenizer, params, rows: _Rows, retain_pairs, retain_losses, judge: Judge, verify: VerifyConfig,
               step: StepConfig, device, max_length: int) -> SampledObjective:
    """The sampled objective: each erased row toward its never-seen target, new rows pulled
    all the way down (their term never fades), the retained rows' rise over the parent."""
    objective = SampledObjective(model, tokenizer, params, rows.forget, rows.learn, retain_pairs, device,
                                 max_length, step)
    objective.retain_reference = sum(retain_losses) / len(retain_losses) if retain_losses else None
    objective.know_retained(retain_losses)  # measured on the parent: the model is still there
    objective.learn_target = 0.0
    # Held-out-calibrated targets only where refinement may act on them (enforce): under report the
    # update written is the one verification off writes, and is only scored.
    _, erased0, holdout0, _ = judge.judge() if verify.policy == "enforce" else (None, None, None, None)
    objective.forget_targets = judge.targets(holdout0) if erased0 is not None else (
        judge.base_erased or [math.inf] * len(rows.forget))
    return objective


class _Checks:
    """What stops refinement: ``checks()`` says whether the verdict passes, why not, and
    whether the rows are settled (the erased at the never-seen level: the calibrated attack's
    AUC near ``target_auc``, not only inside the bounds; the new at the retained rows' median
    NLL, not only within the margin). ``state`` keeps the first and the last verdict."""

    def __init__(self, judge: Judge, objective: SampledObjective, rows: _Rows, retain_pairs, retain_losses,
                 verify: VerifyConfig, step: StepConfig, max_rise: float):
        self.judge, self.objective, self.rows, self.verify, self.max_rise = judge, objective, rows, verify, max_rise
        # New rows count as learned at the retained rows' level.
        self.learn_level = statistics.median(retain_losses) if retain_losses else 0.0
        retain_exact = (sum(judge.scores(retain_pairs, None).exact) / len(retain_pairs)
                        if retain_pairs and rows.learn else 1.0)
        self.learn_check = LearnCheck(self.learn_level, step.learn_margin, retain_exact)
        self.state: dict = {}

    def __call__(self) -> tuple[bool, str, bool]:
        v, erased, held, new = self.judge.judge()
        if v is None and self.rows.forget:  # no held-out rows: the base model is the reference
            v = reference_verdict(erased)
        elif held is not None and self.verify.policy == "enforce":
            # The never-seen level is the held-out rows' as they are now: refinement moves them
            # too, and targets fixed at the parent's left the verdict failing with Φ at zero.
            self.objective.retarget(self.judge.targets(held))
        failures = v.failures() if self.rows.forget else []
        if not self.learn_check.passed(new):
            failures.append(f"corrected rows not learned yet ({self.learn_check.describe(new)})")
        point = self.objective.evaluate()
        if point.rise > self.max_rise:
            failures.append(f"retained rows' NLL rose by {point.rise:.3f} nats")
        self.state.setdefault("before", (v, erased, held, new, point))
        self.state["after"] = (v, erased, held, new, point)
        settled = ((not self.rows.forget or not hasattr(v, "attacks")
                    or v.calibrated.auc <= self.verify.target_auc + SETTLED_SLACK)
                   and (not new.nll or sum(new.nll) / len(new.nll) <= self.learn_level))
        return not failures, "; ".join(failures) or self.rows.success(), settled


def _report(verify: VerifyConfig, state: dict, passed: bool, reason: str, refinement, retain_reference,
            ids: list[str], seconds: float, learn_check: LearnCheck) -> Verification:
    def scores(key):
        v, erased, held, new, point = state[key]
        return _loss_scores(erased, held, point.retain_mean), v, new

    before, v_before, _ = scores("before")
    after, v_after, new = scores("after")
    refined = refinement is not None and refinement.steps
    return verification_of({
        "policy": verify.policy, "passed": passed, "reason": reason, "bounds": as_json(verify.bounds()),
        "retain_reference": retain_reference, "before": before.to_json() if before else None,
        "after": after.to_json() if after and refined else None,
        "refinement": refinement.to_json() if refinement is not None else None,
        "erased_ids": ids, "seconds": round(seconds, 3),
        "membership": {"before": v_before.to_json() if v_before else None,
                       "after": v_after.to_json() if v_after else None},
        "learned": learn_check.to_json(new) if new.nll else None})


def _first_order(model, tokenizer, edits, holdout, retain_pairs, retain_losses, verify: VerifyConfig, device,
                 progress, max_length) -> Verification | None:
    from .verify import erased_rows

    erased = erased_rows(edits)
    reference = sum(retain_losses) / len(retain_losses) if retain_losses else None
    rows = VerifyRows.of([(r.prompt, r.response) for r in erased], retain_pairs, holdout, reference,
                         [r.id for r in erased])
    return verify_and_refine(model, tokenizer, rows, verify, device, progress, max_length)
