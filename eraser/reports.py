"""The engine's verdicts, typed: the steps applied, the factor cache's use, the verification of
the erased rows (loss scores, membership attacks, refinement, the corrected rows' check) and the
utility check.

The engine builds its steps and the verification in these types and serialises the utility
check to the JSON ``Utility`` reads; the sidecar's job report (``sidecar.report``) is built on
them, and every summary line, the CLI's and ``erasectl``'s, is ``describe``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pydantic import TypeAdapter


@dataclass(frozen=True)
class Step:
    """One step applied to the adapter (``eraser.secondorder``): its line-search scale and
    trials, the objective and the retained-NLL rise where it stopped."""

    kind: str  # "influence" or "natural"
    scale: float
    trials: int
    phi: float
    rise: float
    damping: Optional[float] = None


@dataclass(frozen=True)
class FactorUse:
    """What an erase did with its factor cache (``eraser.factors.FactorPlan``): read it or
    fitted it, and what it wrote for the new version ("" where it wrote nothing)."""

    source: str  # "cache" or "fitted"
    out_action: str = ""  # "downdated" or "refitted"
    out: str = ""
    age_seconds: Optional[float] = None
    fit_seconds: Optional[float] = None
    downdate_seconds: Optional[float] = None
    refit_seconds: Optional[float] = None
    changed_fraction: Optional[float] = None


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
    """The verdict on the erased rows, before and after refinement (``eraser.verify`` and
    ``eraser.forget`` build it)."""

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

    def to_json(self) -> dict:
        return as_json(self)

    def summary(self) -> str:
        return describe(self)

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


def verification_of(obj: dict | None) -> Verification | None:
    """``Verification.to_json()`` read back."""
    return _VERIFICATION.validate_python(obj) if obj else None


def utility_of(obj: dict | None) -> Utility | None:
    """``UtilityCheck.to_json()`` typed."""
    return _UTILITY.validate_python(obj) if obj else None


def as_json(value) -> Any:
    """A report's part (a verification, a utility check, the steps) as the JSON it came from."""
    return TypeAdapter(type(value)).dump_python(value, mode="json") if value is not None else None


def describe(v: Verification) -> str:
    """One line of numbers: the membership AUC (before -> after refinement) against its bounds,
    the losses, the attacks, the corrected rows' check and what refinement cost."""
    text = _describe_losses(v) or _describe_reference(v) or v.reason
    judged = v.verdict
    if judged is not None and judged.attacks:
        text += "; attacks " + ", ".join(f"{a.name} {a.auc:.2f} [{a.interval[0]:.2f}, {a.interval[1]:.2f}] "
                                         f"(max {a.high:.2f})" for a in judged.attacks)
    if v.learned is not None:
        n = v.learned
        text += (f"; new rows {'learned' if n.passed else 'NOT learned'}: mean NLL {n.mean_nll:.3f} (target "
                 f"{n.target_nll:.3f} + {n.margin:g}), {n.reproduced}/{n.rows} reproduced ({n.required} required)")
    r = v.refinement
    if r is not None:
        text += f"; refined {r.steps} step(s) ({r.method}, {r.seconds:.1f} s: {r.stopped})"
    return text


def _describe_losses(v: Verification) -> str:
    final, b = v.final, v.bounds
    if final is None:
        return ""
    auc = f"{v.before.auc:.3f} -> {final.auc:.3f}" if v.after is not None and v.before is not None else f"{final.auc:.3f}"
    text = (f"MIA AUC {auc} (bounds {b.min_auc:g}-{b.max_auc:g}), erased NLL {final.erased_mean_nll:.3f} vs "
            f"held-out {final.holdout_mean_nll:.3f}")
    if final.retain_mean_nll is not None:
        text += f", retained NLL {final.retain_mean_nll:.3f}"
        if v.retain_reference is not None:
            text += f" ({final.retain_mean_nll - v.retain_reference:+.3f}, max +{b.max_retain_rise:g})"
    return text


def _describe_reference(v: Verification) -> str:
    m = v.verdict
    if m is None or m.basis != "base-model reference":
        return ""
    text = (f"no held-out set, judged against the base model: {m.ahead} of {m.erased_rows} erased row(s) still more "
            f"likely under the adapter, {m.recalled} reproduced")
    if m.mean_advantage is not None:
        text += f", mean advantage {m.mean_advantage:+.3f} nats (max +{m.margin:g} a row)"
    return text


_VERIFICATION = TypeAdapter(Verification)
_UTILITY = TypeAdapter(Utility)
