"""Membership inference against the erased rows: is each one distinguishable from rows
the adapter never saw?

Three attacks score every row (higher: more member-like) and the strictest decides:

- ``loss``: minus the row's response NLL (the classic loss attack);
- ``reference``: log(base NLL / adapter NLL), the base model's NLL on the same row with
  the adapter disabled. The base model is a free reference model: calibrating by it removes
  most of a row's own difficulty (the idea of reference-model and LiRA-style attacks), so
  it separates members from non-members on fewer rows than the raw loss. As a ratio, not a
  difference: an adapter cuts a never-seen row's NLL by about the same *share* whatever the
  row's difficulty, so the difference ranked hard never-seen rows as members and easy ones
  as over-forgotten (bench/results/target_calibration.md);
- ``mink``: Min-K%++ (Zhang et al. 2024), reference-free: the lowest 20 % of a row's
  response tokens' log-probabilities, each standardised under the model's own next-token
  distribution.

An AUC over k erased and m held-out rows is noisy: under exchangeability its standard error
is about sqrt((k+m+1)/(12km)), 0.2 for 3 rows against 9. So the decision is sized to it: an
attack fails when its AUC is above ``0.5 + z·se`` (or above ``max_auc``, whichever is
lower), and a row fails on its own when fewer held-out rows than a Bonferroni-corrected
share look at least as member-like as it does. That row test can fire only with at least
k/α - 1 held-out rows (its smallest p-value is 1/(m+1)): 59 for 3 erased rows; with fewer,
one row left near its trained level passes when the others carry the AUC.

Over-forgetting (an AUC below ``0.5 - z·se``) is judged on the calibrated attack only
(``reference``; ``loss`` where there is no base model). A row that is hard for every model
(a rare name) has a high loss after retraining from scratch too, so a low raw-loss or
Min-K% AUC is no evidence that the erase went too far: retraining fails that bound.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .data import EncodedRows
from .losses import row_features

ATTACKS = ("loss", "reference", "mink")
Pair = tuple[str, str]
# Below this (nats a token) an NLL is taken as this: a ratio to an NLL of 0 is undefined.
NLL_FLOOR = 1e-6


def nll_ratio(nll: float, base_nll: float) -> float:
    """The adapter's NLL on a row as a share of the base model's: how a never-seen row's level
    is read off the base model (the ``reference`` attack, refinement's targets)."""
    return max(nll, NLL_FLOOR) / max(base_nll, NLL_FLOOR)


def auc(members: Sequence[float], others: Sequence[float]) -> float:
    """P(a member scores above a non-member) + ½ P(tie); scores: higher = more member-like."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in members for b in others)
    return wins / (len(members) * len(others))


def null_standard_error(k: int, m: int) -> float:
    """Standard error of the AUC of two exchangeable sets of k and m rows (Mann-Whitney)."""
    return math.sqrt((k + m + 1) / (12.0 * k * m))


def hanley_mcneil_interval(a: float, k: int, m: int, z: float = 1.96) -> tuple[float, float]:
    """Hanley & McNeil (1982) confidence interval of an AUC, clipped to [0, 1]."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (k - 1) * (q1 - a * a) + (m - 1) * (q2 - a * a)) / (k * m)
    se = math.sqrt(max(var, 0.0))
    # At an AUC of exactly 0 or 1 the formula gives 0: fall back to the null's spread.
    se = max(se, null_standard_error(k, m) / 2)
    return max(0.0, a - z * se), min(1.0, a + z * se)


@dataclass(frozen=True)
class AttackResult:
    name: str
    auc: float
    interval: tuple[float, float]  # 95 % (Hanley-McNeil)
    high: float  # the AUC above which the erased rows still look trained
    low: float  # below which they look over-forgotten
    row_p_values: list[float]  # per erased row: share of held-out rows at least as member-like
    rows_flagged: int  # rows whose p-value is below the Bonferroni bound
    passed: bool

    def to_json(self) -> dict:
        return asdict(self)


def judge_attack(name: str, erased: Sequence[float], holdout: Sequence[float], max_auc: float, min_auc: float,
                 z: float = 1.645, alpha: float = 0.05, two_sided: bool = True) -> AttackResult:
    """``two_sided``: whether an AUC below the lower bound fails (over-forgotten); otherwise
    the lower bound is 0."""
    k, m = len(erased), len(holdout)
    a = auc(erased, holdout)
    se = null_standard_error(k, m)
    high, low = min(max_auc, 0.5 + z * se), max(min_auc, 0.5 - z * se) if two_sided else 0.0
    p_values = [(1 + sum(1 for h in holdout if h >= s)) / (m + 1) for s in erased]
    flagged = sum(1 for p in p_values if p < alpha / k)
    return AttackResult(name, a, hanley_mcneil_interval(a, k, m), high, low, p_values, flagged,
                        low <= a <= high and flagged == 0)


@dataclass(frozen=True)
class RowScores:
    """What the attacks need of a set of rows, at one point of the parameters."""

    nll: list[float]
    mink: list[float]
    exact: list[bool]  # greedy decoding reproduces the response (teacher-forced argmax)
    base_nll: list[float] | None  # the base model's NLL (adapter disabled), fixed

    def member_scores(self, attack: str) -> list[float]:
        if attack == "loss":
            return [-x for x in self.nll]
        if attack == "reference":
            return [-math.log(nll_ratio(x, b)) for x, b in zip(self.nll, self.base_nll)]
        return list(self.mink)


@torch.no_grad()
def measure(model, tokenizer, pairs: Sequence[Pair], device, batch_size: int = 8, max_length: int = 512,
            base_nll: list[float] | None = None) -> RowScores:
    out = {"nll": [], "mink": [], "exact": []}
    if pairs:
        data = EncodedRows(tokenizer, pairs, max_length)
        for _, batch in data.batches(batch_size, device=device):
            f = row_features(model, batch, share_prefix=True)
            for key in out:
                out[key].extend(f[key].tolist())
    return RowScores(out["nll"], out["mink"], [bool(x) for x in out["exact"]], base_nll)


@torch.no_grad()
def base_model_nll(model, tokenizer, pairs: Sequence[Pair], device, batch_size: int = 8,
                   max_length: int = 512) -> list[float] | None:
    """The base model's NLL with the adapter disabled (PEFT), or None where it cannot be."""
    from .losses import row_losses

    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        return None
    with disable():
        return row_losses(model, tokenizer, pairs, device, batch_size, max_length)


def recall_failures(recalled: int) -> list[str]:
    return [f"{recalled} erased answer(s) still reproduced by greedy decoding"] if recalled else []


@dataclass(frozen=True)
class MembershipVerdict:
    attacks: list[AttackResult]
    erased_rows: int
    holdout_rows: int
    recalled: int  # erased rows whose response greedy decoding still reproduces

    @property
    def strictest(self) -> AttackResult:
        return max(self.attacks, key=lambda a: (not a.passed, a.auc))

    @property
    def passed(self) -> bool:
        return all(a.passed for a in self.attacks) and self.recalled == 0

    @property
    def calibrated(self) -> AttackResult:
        name = calibrated_attack([a.name for a in self.attacks])
        return next(a for a in self.attacks if a.name == name)

    def failures(self) -> list[str]:
        out = []
        for a in self.attacks:
            if a.auc > a.high:
                out.append(f"erased rows still look trained ({a.name} MIA AUC {a.auc:.3f} > {a.high:.3f})")
            elif a.auc < a.low:
                out.append(f"erased rows over-forgotten ({a.name} MIA AUC {a.auc:.3f} < {a.low:.3f})")
            elif a.rows_flagged:
                out.append(f"{a.rows_flagged} erased row(s) still stand out ({a.name})")
        return out + recall_failures(self.recalled)

    def to_json(self) -> dict:
        return {"basis": "held-out", "attacks": [a.to_json() for a in self.attacks], "erased_rows": self.erased_rows,
                "holdout_rows": self.holdout_rows, "recalled": self.recalled, "passed": self.passed,
                "strictest": self.strictest.name}


def verdict(erased: RowScores, holdout: RowScores, max_auc: float, min_auc: float, z: float = 1.645) -> MembershipVerdict:
    attacks = [a for a in ATTACKS if a != "reference" or (erased.base_nll is not None and holdout.base_nll is not None)]
    calibrated = calibrated_attack(attacks)
    results = [judge_attack(a, erased.member_scores(a), holdout.member_scores(a), max_auc, min_auc, z,
                            two_sided=a == calibrated) for a in attacks]
    return MembershipVerdict(results, len(erased.nll), len(holdout.nll), sum(erased.exact))


def calibrated_attack(attacks: Sequence[str]) -> str:
    """The attack that accounts for a row's own difficulty: the one over-forgetting is judged by."""
    return "reference" if "reference" in attacks else "loss"


# Nats by which an erased row may still be more likely under the adapter than under the
# base model and count as "no advantage" (a row approaches the base level from below).
REFERENCE_MARGIN = 0.1


@dataclass(frozen=True)
class ReferenceVerdict:
    """The verdict without held-out rows: the base model (adapter disabled) is the reference.

    It passes when no erased row is more likely under the adapter than under the base model
    (by more than ``margin`` nats) and greedy decoding reproduces none. That is the level of
    a row the adapter never learned anything specific about; it says nothing of rows the
    adapter made *less* likely than the base model does (a held-out set tells that)."""

    erased_rows: int
    ahead: int  # rows still more likely under the adapter than under the base model
    recalled: int
    mean_advantage: float | None  # mean (base NLL - adapter NLL) over the erased rows
    margin: float

    @property
    def passed(self) -> bool:
        return self.mean_advantage is not None and self.ahead == 0 and self.recalled == 0

    def failures(self) -> list[str]:
        out = []
        if self.mean_advantage is None:
            out.append("no base model to compare with")
        elif self.ahead:
            out.append(f"{self.ahead} erased row(s) still more likely under the adapter than under the base model")
        return out + recall_failures(self.recalled)

    def to_json(self) -> dict:
        return {"basis": "base-model reference", "erased_rows": self.erased_rows, "ahead": self.ahead,
                "recalled": self.recalled, "mean_advantage": self.mean_advantage, "margin": self.margin,
                "passed": self.passed}


def reference_verdict(erased: RowScores, margin: float = REFERENCE_MARGIN) -> ReferenceVerdict:
    recalled = sum(erased.exact)
    if erased.base_nll is None or not erased.nll:
        return ReferenceVerdict(len(erased.nll), 0, recalled, None, margin)
    advantage = [b - x for x, b in zip(erased.nll, erased.base_nll)]
    return ReferenceVerdict(len(erased.nll), sum(1 for a in advantage if a > margin), recalled,
                            sum(advantage) / len(advantage), margin)
