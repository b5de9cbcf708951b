"""A job's report, typed: what the engine did to the adapter, the verdicts on it, the factor
cache it used, and how serving took the new version.

The runner builds it, the job record and the version's manifest store it as JSON (the flat
layout of ``eraser.unlearn.EraseReport.to_json()`` plus the sidecar's fields, so records
written before this type read back unchanged), ``wire`` maps it to the proto once, and the
metrics hooks, receipts and the swapper read its fields. pydantic turns JSON into the tree
and back; no code reads a report by string keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import TypeAdapter

from eraser.probe import VersionProbe


@dataclass(frozen=True)
class Step:
    """One step applied to the adapter (``eraser.secondorder.StepRecord``)."""

    kind: str  # "influence" or "natural"
    scale: float
    trials: int
    phi: float
    rise: float
    damping: Optional[float] = None


@dataclass(frozen=True)
class LossScores:
    """The erased rows' loss against the held-out rows' (``eraser.verify.VerifyScores``)."""

    auc: float
    erased_mean_nll: float
    holdout_mean_nll: float
    erased_rows: int
    holdout_rows: int
    holdout_median_nll: Optional[float] = None
    retain_mean_nll: Optional[float] = None
    retain_rows: int = 0
    erased_percentiles: tuple[float, ...] = ()


@dataclass(frozen=True)
class Attack:
    """One membership attack's result (``eraser.membership.AttackResult``)."""

    name: str
    auc: float
    interval: tuple[float, float]
    high: float
    low: float
    rows_flagged: int
    passed: bool
    row_p_values: tuple[float, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """A membership verdict: against held-out rows (attacks) or the base model (rows ahead)."""

    basis: str
    passed: bool
    erased_rows: int = 0
    recalled: int = 0
    holdout_rows: int = 0
    attacks: tuple[Attack, ...] = ()
    strictest: Optional[str] = None
    ahead: int = 0
    mean_advantage: Optional[float] = None
    margin: Optional[float] = None


@dataclass(frozen=True)
class Membership:
    before: Optional[Verdict] = None
    after: Optional[Verdict] = None


@dataclass(frozen=True)
class Refinement:
    """What refinement did: natural-gradient steps (with their trace) or first-order NPO."""

    method: str
    steps: int
    seconds: float
    stopped: str = ""
    passed: Optional[bool] = None
    trace: tuple[Step, ...] = ()
    backtracks: Optional[int] = None
    final_lr: Optional[float] = None


@dataclass(frozen=True)
class NewRows:
    """The learned check on a correction's new rows (``eraser.secondorder.LearnCheck``)."""

    rows: int
    mean_nll: float
    target_nll: float
    margin: float
    reproduced: int
    required: int
    retain_reproduced_share: float
    passed: bool


@dataclass(frozen=True)
class Bounds:
    max_auc: float
    min_auc: float
    max_retain_rise: float


@dataclass(frozen=True)
class Verification:
    """``eraser.verify.VerificationReport``: the verdict on the erased rows, before and after
    refinement."""

    policy: str
    passed: bool
    reason: str
    bounds: Bounds
    retain_reference: Optional[float] = None
    before: Optional[LossScores] = None
    after: Optional[LossScores] = None
    refinement: Optional[Refinement] = None
    erased_ids: Optional[tuple[str, ...]] = None
    seconds: float = 0.0
    membership: Optional[Membership] = None
    learned: Optional[NewRows] = None

    @property
    def final(self) -> LossScores | None:
        return self.after or self.before

    @property
    def verdict(self) -> Verdict | None:
        """The last membership verdict (after refinement, else before)."""
        return (self.membership.after or self.membership.before) if self.membership else None

    @property
    def outcome(self) -> str:
        """reported, failed, refined or passed."""
        if self.policy == "report":
            return "reported"
        if not self.passed:
            return "failed"
        return "refined" if self.refinement is not None and self.refinement.steps else "passed"


@dataclass(frozen=True)
class Utility:
    """``eraser.unlearn.UtilityCheck``: the retained rows' NLL before and after the update."""

    rows: int
    before: float
    after: float
    rise: float
    max_rise: float
    passed: bool


@dataclass(frozen=True)
class Factors:
    """The factor cache a job used and what it wrote for the new version
    (``eraser.factors.FactorPlan.report`` completed by the runner)."""

    source: str = ""  # "cache" or "fitted"
    out_action: str = ""  # "downdated" or "refitted"
    version: int = 0  # the version whose factors were read
    how: str = ""
    age_seconds: Optional[float] = None
    fit_seconds: Optional[float] = None
    downdate_seconds: Optional[float] = None
    refit_seconds: Optional[float] = None
    changed_fraction: Optional[float] = None
    wait_seconds: Optional[float] = None


@dataclass(frozen=True)
class EngineReport:
    """What the engine did to the adapter (``eraser.unlearn.EraseReport``, less the paths)."""

    solver: str
    curvature: str
    damping: float
    objective: str
    iterations: int
    converged: bool
    rows: int
    rows_after: int
    counts: dict[str, int]
    update_norm: float
    adapter_sha256: str
    preset: Optional[str] = None
    residual: Optional[float] = None
    tolerance: Optional[float] = None
    affected_loss_before: Optional[float] = None
    affected_loss_after: Optional[float] = None
    edited_loss_before: Optional[float] = None
    edited_loss_after: Optional[float] = None
    curvature_rows: int = 0
    curvature_products: int = 0
    parameters: int = 0
    parent_adapter_sha256: str = ""
    note: str = ""
    steps: Optional[tuple[Step, ...]] = None
    # What confirms the new version on a serving engine (``eraser.probe``).
    probe: Optional[VersionProbe] = None


@dataclass(frozen=True)
class JobReport:
    """A job's report. ``engine`` is None for a job whose update was refused (by
    verification or the utility check): nothing was kept but the verdict's numbers."""

    engine: Optional[EngineReport] = None
    seconds: dict[str, float] = field(default_factory=dict)
    verification: Optional[Verification] = None
    utility: Optional[Utility] = None
    factors: Optional[Factors] = None
    requested_solver: str = ""
    solver_reason: str = ""
    serving: str = ""  # how serving took the version (confirmed where, or why not)

    @classmethod
    def from_json(cls, obj: dict | None) -> JobReport | None:
        """The report as stored (flat: the engine's fields at the top level)."""
        if obj is None:
            return None
        engine = _ENGINE.validate_python({k: v for k, v in obj.items() if k in _ENGINE_FIELDS}) if "solver" in obj else None
        rest = {k: v for k, v in obj.items() if k in _OWN_FIELDS}
        return dataclasses.replace(_REPORT.validate_python(rest), engine=engine)

    def to_json(self) -> dict[str, Any]:
        own = _REPORT.dump_python(dataclasses.replace(self, engine=None), mode="json", exclude_none=False)
        own.pop("engine")
        engine = _ENGINE.dump_python(self.engine, mode="json") if self.engine is not None else {}
        return {**engine, **own}

    def with_(self, **changes) -> JobReport:
        return dataclasses.replace(self, **changes)


def verification_of(obj: dict | None) -> Verification | None:
    """``VerificationReport.to_json()`` typed."""
    return _VERIFICATION.validate_python(obj) if obj else None


def utility_of(obj: dict | None) -> Utility | None:
    """``UtilityCheck.to_json()`` typed."""
    return _UTILITY.validate_python(obj) if obj else None


def factors_of(obj: dict | None) -> Factors | None:
    return _FACTORS.validate_python({k: v for k, v in obj.items() if k in _FACTOR_FIELDS}) if obj else None


def as_json(value) -> Any:
    """A report's part (a verification, a utility check) as the JSON it came from."""
    return TypeAdapter(type(value)).dump_python(value, mode="json") if value is not None else None


_ENGINE = TypeAdapter(EngineReport)
_REPORT = TypeAdapter(JobReport)
_VERIFICATION = TypeAdapter(Verification)
_UTILITY = TypeAdapter(Utility)
_FACTORS = TypeAdapter(Factors)
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineReport)}
_OWN_FIELDS = {f.name for f in dataclasses.fields(JobReport)} - {"engine"}
_FACTOR_FIELDS = {f.name for f in dataclasses.fields(Factors)}
