"""A job's report, typed: what the engine did to the adapter, the verdicts on it, the factor
cache it used, and how serving took the new version.

The runner builds it, the job record and the version's manifest store it as JSON (the flat
layout of ``eraser.unlearn.EraseReport.to_json()`` plus the sidecar's fields, so records
written before this type read back unchanged), ``wire`` maps it to the proto once, and the
metrics hooks, receipts and the swapper read its fields. The engine's verdicts (steps,
verification, utility) are ``eraser.reports``' types. pydantic turns JSON into the tree and
back; no code reads a report by string keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import TypeAdapter

from eraser.probe import VersionProbe
from eraser.reports import (Attack, Bounds, LossScores, Membership, NewRows, Refinement,  # noqa: F401
                             Step, Utility, Verdict, Verification, as_json, utility_of,
                             verification_of)


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


def factors_of(obj: dict | None) -> Factors | None:
    return _FACTORS.validate_python({k: v for k, v in obj.items() if k in _FACTOR_FIELDS}) if obj else None


_ENGINE = TypeAdapter(EngineReport)
_REPORT = TypeAdapter(JobReport)
_FACTORS = TypeAdapter(Factors)
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineReport)}
_OWN_FIELDS = {f.name for f in dataclasses.fields(JobReport)} - {"engine"}
_FACTOR_FIELDS = {f.name for f in dataclasses.fields(Factors)}
