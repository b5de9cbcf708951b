"""Verified forgetting: an erase is done only when the erased rows look never-seen.

An influence step alone leaves memorised rows mostly memorised (brief, sections 2-3: on
SmolLM2-135M trained rows sit at NLL ~0.08, never-seen rows at ~4.6, and an influence
step lands at ~1-2). So the result is judged, and if need be refined, against a held-out
set of rows of the same kind that the adapter never saw:

- ``score`` measures the erased rows' response NLL against the held-out rows' NLL
  distribution: each erased row's percentile within it, and the loss-based
  membership-inference AUC (0.5: indistinguishable; 1.0: the erased rows are clearly
  memorised; near 0: over-forgotten, which betrays membership just as well), beside the
  retained rows' mean NLL (utility).
- ``refine`` moves the adapter's trainable parameters, in place, with a bounded forgetting
  objective (NPO, or plain gradient ascent) on the erased rows, anchored by a KL term to
  the pre-refinement model on a sample of retained rows. Only rows still below the
  held-out median are pushed, it stops as soon as the AUC reaches ``target_auc`` (the
  held-out median: to the held-out level, not beyond), and a step that overshoots far
  beyond it is undone and retried at half the step size.
- ``verify_and_refine`` applies a policy: ``off`` does nothing, ``report`` scores without
  touching the model, ``enforce`` scores, refines if needed, re-scores, and raises
  ``VerificationFailedError`` when the bounds still fail.

Reports carry ids, counts and numbers only, never row text.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from .data import EncodedRows, Row, load_rows
from .errors import InvalidRequestError, VerificationFailedError
from .losses import mean, per_row_nll, response_logits, row_losses
from .options import VERIFY_POLICIES
from .model import trainable_parameters
from .progress import Progress, silent
from .reports import Bounds, LossScores, Refinement, Verification

POLICIES = VERIFY_POLICIES
MAX_BACKTRACKS = 4
METHODS = ("npo", "ga")
Pair = tuple[str, str]


@dataclass(frozen=True)
class VerifyConfig:
    """What "looks never-seen" means, and how much refinement may be spent to get there.
    docs/defaults.md gives the measurements behind each default."""

    policy: str = "off"  # "off" | "report" | "enforce"
    # Membership-inference AUC of erased vs held-out rows (0.5 = indistinguishable): above
    # this the erased rows still look trained. Every retrain from scratch seen passed it.
    max_auc: float = 0.75
    # Where refinement aims: the held-out median, where a retrain lands in expectation.
    target_auc: float = 0.5
    # Below this the erased rows look over-forgotten, which also reveals membership.
    min_auc: float = 0.1
    # Utility: the retained rows' mean NLL may rise by at most this much (nats) over the
    # reference (the adapter before the erase when the caller gives it).
    max_retain_rise: float = 0.3
    # Refinement budget: whichever runs out first.
    max_steps: int = 200
    max_seconds: float = 600.0
    method: str = "npo"  # "npo" (Zhang et al. 2024) or "ga" (gradient ascent)
    # Adam's step size on the adapter parameters (first-order refinement): coarser steps
    # overshoot the held-out level and cost utility.
    lr: float = 1e-3
    # NPO's inverse temperature: a row's weight halves after its NLL rose by about 1/β,
    # the scale of the gaps to close.
    beta: float = 0.5
    # Weight of KL(p_ref || p_θ) per response token of retained rows: the price of utility.
    anchor_weight: float = 10.0
    # Retained rows scored for utility and used by the anchor (a seeded sample).
    retain_sample: int = 32
    batch_size: int = 8
    # Below this many held-out rows the AUC moves by over 1/8 per row: too coarse to judge.
    min_holdout_rows: int = 8
    # Full re-scoring (held-out and retained rows too) every this many steps; the erased
    # rows' losses are known every step from the refinement's own forward pass.
    rescore_every: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise InvalidRequestError(f"unknown verify policy {self.policy!r} (choose {', '.join(POLICIES)})")
        if self.method not in METHODS:
            raise InvalidRequestError(f"unknown refinement method {self.method!r} (choose {', '.join(METHODS)})")
        if not 0.5 <= self.max_auc < 1.0:
            raise InvalidRequestError(f"max_auc must be in [0.5, 1), got {self.max_auc}")
        if not 0.0 <= self.min_auc < 0.5:
            raise InvalidRequestError(f"min_auc must be in [0, 0.5), got {self.min_auc}")
        if not self.min_auc < self.target_auc <= self.max_auc:
            raise InvalidRequestError(f"target_auc must be in (min_auc, max_auc], got {self.target_auc}")
        finite = (self.max_retain_rise, self.max_seconds, self.lr, self.beta, self.anchor_weight)
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in finite):
            raise InvalidRequestError("verify thresholds, lr, beta and anchor weight must be finite numbers")
        if self.max_retain_rise < 0 or self.max_seconds <= 0 or self.lr <= 0 or self.beta <= 0 or self.anchor_weight < 0:
            raise InvalidRequestError("max_retain_rise and anchor_weight must be >= 0; max_seconds, lr and beta > 0")
        if self.max_steps < 0 or self.retain_sample < 1 or self.batch_size < 1 or self.rescore_every < 1:
            raise InvalidRequestError("max_steps must be >= 0; retain_sample, batch_size and rescore_every >= 1")
        if self.min_holdout_rows < 1:
            raise InvalidRequestError("min_holdout_rows must be >= 1")

    def bounds(self) -> Bounds:
        return Bounds(self.max_auc, self.min_auc, self.max_retain_rise)


@dataclass
class VerifyScores:
    """Erased rows against the held-out loss distribution, and the retained rows' loss."""

    auc: float  # P(held-out loss > erased loss) + ½ P(tie): 0.5 = never-seen-like, 1 = memorised
    erased_percentiles: list[float]  # per erased row: share of held-out losses below it (ties ½)
    erased_mean_nll: float
    holdout_mean_nll: float
    holdout_median_nll: float
    retain_mean_nll: float | None
    erased_rows: int
    holdout_rows: int
    retain_rows: int

    def to_json(self) -> dict:
        return asdict(self)

    def typed(self) -> LossScores:
        return LossScores(**{**self.to_json(), "erased_percentiles": tuple(self.erased_percentiles)})


def percentile_within(x: float, reference: Sequence[float]) -> float:
    """Share of ``reference`` below ``x``, ties counting half."""
    below = sum(1.0 if r < x else 0.5 if r == x else 0.0 for r in reference)
    return below / len(reference)


def mia_auc(erased: Sequence[float], holdout: Sequence[float]) -> float:
    """AUC of the loss attack "lower loss means member": 1 - mean percentile of the erased rows."""
    return 1.0 - sum(percentile_within(x, holdout) for x in erased) / len(erased)


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)


def _scores(erased: Sequence[float], holdout: Sequence[float], retain: Sequence[float]) -> VerifyScores:
    pct = [percentile_within(x, holdout) for x in erased]
    return VerifyScores(
        auc=1.0 - mean(pct),
        erased_percentiles=pct,
        erased_mean_nll=mean(erased),
        holdout_mean_nll=mean(holdout),
        holdout_median_nll=_median(holdout),
        retain_mean_nll=mean(retain) if retain else None,
        erased_rows=len(erased),
        holdout_rows=len(holdout),
        retain_rows=len(retain),
    )


def score(
    model,
    tokenizer,
    erased_pairs: Sequence[Pair],
    holdout_pairs: Sequence[Pair],
    retain_pairs: Sequence[Pair],
    device,
    max_length: int = 512,
    batch_size: int = 8,
) -> VerifyScores:
    """Score the model as it is (no parameter changes); pairs are (prompt, response)."""
    return _measure(model, tokenizer, erased_pairs, holdout_pairs, retain_pairs, device, max_length, batch_size)[0]


def _measure(model, tokenizer, erased_pairs, holdout_pairs, retain_pairs, device, max_length, batch_size):
    """``score`` and the held-out losses it was computed from."""
    if not erased_pairs or not holdout_pairs:
        raise InvalidRequestError("verification needs at least one erased row and one held-out row")
    losses = lambda pairs: row_losses(model, tokenizer, pairs, device, batch_size, max_length)  # noqa: E731
    holdout = losses(holdout_pairs)
    return _scores(losses(erased_pairs), holdout, losses(retain_pairs)), holdout


def judge(scores: VerifyScores, config: VerifyConfig, retain_reference: float | None = None) -> list[str]:
    """The bounds that ``scores`` fail, as short phrases (empty: passed)."""
    failed = []
    if scores.auc > config.max_auc:
        failed.append(f"erased rows still look trained (MIA AUC {scores.auc:.3f} > max {config.max_auc:g})")
    if scores.auc < config.min_auc:
        failed.append(f"erased rows over-forgotten (MIA AUC {scores.auc:.3f} < min {config.min_auc:g})")
    if retain_reference is not None and scores.retain_mean_nll is not None:
        rise = scores.retain_mean_nll - retain_reference
        if not rise <= config.max_retain_rise:  # NaN fails too
            failed.append(f"retained rows' NLL rose by {rise:.3f} nats (> max {config.max_retain_rise:g})")
    return failed


@dataclass
class RefineResult:
    before: VerifyScores
    after: VerifyScores
    steps: int  # optimizer steps taken, undone ones included (what the budget counts)
    seconds: float
    method: str
    passed: bool
    reason: str
    backtracks: int = 0  # returns to an earlier state (overshoot, utility), each halving the step size
    final_lr: float | None = None

    def to_json(self) -> dict:
        return {**asdict(self), "before": self.before.to_json(), "after": self.after.to_json()}


class _Snapshot:
    """A copy of the trainable parameters, to evaluate the reference model by swapping."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.saved = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def swap(self) -> None:
        for p, s in zip(self.params, self.saved):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def _response_logp(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at the response positions only, [N, V], and their row weights [N]."""
    logits, _, weights = response_logits(model, batch)
    mask = weights > 0
    return F.log_softmax(logits[mask], dim=-1), weights[mask]


def _kl_to_reference(model, batch, ref_logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the per-token KL(p_ref || p_θ) on response tokens."""
    logp, weights = _response_logp(model, batch)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [N]
    return (kl * weights).sum() / batch["input_ids"].shape[0]


@torch.no_grad()
def _reference_logp(model, batch, snapshot: _Snapshot) -> torch.Tensor:
    snapshot.swap()
    try:
        return _response_logp(model, batch)[0]
    finally:
        snapshot.swap()


@dataclass(frozen=True)
class VerifyRows:
    """What verification judges: the erased rows against the held-out ones, with the retained
    sample for the utility bound (``retain_reference``: their mean NLL before the erase;
    without it the bound is measured from the model as given) and the erased rows' ids for
    the report."""

    erased: tuple[Pair, ...]
    retain: tuple[Pair, ...]
    holdout: tuple[Pair, ...]
    retain_reference: float | None = None
    erased_ids: tuple[str, ...] | None = None

    @classmethod
    def of(cls, erased: Sequence[Pair], retain: Sequence[Pair], holdout: Sequence[Pair],
           retain_reference: float | None = None, erased_ids: Sequence[str] | None = None) -> "VerifyRows":
        return cls(tuple(erased), tuple(retain), tuple(holdout), retain_reference,
                   tuple(erased_ids) if erased_ids is not None else None)


def refine(model, tokenizer, rows: VerifyRows, config: VerifyConfig, device, progress: Progress = silent,
           max_length: int = 512, before: VerifyScores | None = None) -> RefineResult:
    """Raise the erased rows' loss to the held-out level, in place, within the budget.

    Each step minimises the forgetting objective on the erased rows still below the
    held-out median plus ``anchor_weight`` x KL to the pre-refinement model on a batch of
    retained rows (Adam on the trainable parameters). Before each step the erased rows'
    current losses (from that step's own forward pass) are compared with the held-out
    losses (cached from the last full scoring); once the AUC is <= ``target_auc`` a full
    re-score (erased, held-out and retained rows) confirms it and refinement stops. A step
    after which the AUC falls below 1 - ``max_auc`` (overshoot) is undone and the step
    size halved, up to MAX_BACKTRACKS times. It also stops when the step or time budget is
    spent, or when a re-score (every ``rescore_every`` steps) finds the retained rows' NLL
    beyond ``max_retain_rise`` or the AUC below ``min_auc``. NPO uses the per-token mean
    log-ratio (response NLL) rather than the sequence log-ratio, so β does not depend on
    the response length. On failure the model is left as refined: callers discard it
    (``erase`` writes nothing).
    """
    run = _FirstOrderRefinement(model, tokenizer, rows, config, device, max_length, before)
    return run.until_done(progress)


class _FirstOrderRefinement:
    """One ``refine`` call: the encoded rows, Adam and its step size, the last held-out
    losses and scores, and the states a trust-region backtrack returns to."""

    def __init__(self, model, tokenizer, rows: VerifyRows, config: VerifyConfig, device, max_length: int,
                 before: VerifyScores | None):
        self.started = time.perf_counter()
        self.model, self.config, self.device = model, config, device
        self.params = [p for _, p in trainable_parameters(model)]
        self._rows = (tokenizer, rows.erased, rows.holdout, rows.retain, device, max_length, config.batch_size)
        if before is None:
            self.scores, self.holdout = self.measure()
        else:
            self.scores = before
            self.holdout = row_losses(model, tokenizer, rows.holdout, device, config.batch_size, max_length)
        self.first = self.scores
        self.reference = self.first.retain_mean_nll if rows.retain_reference is None else rows.retain_reference
        self.forget = EncodedRows(tokenizer, rows.erased, max_length)
        self.anchor = (EncodedRows(tokenizer, rows.retain, max_length)
                       if rows.retain and config.anchor_weight > 0 else None)
        self.snapshot = _Snapshot(self.params)
        with torch.no_grad():
            self.ref_nll = torch.cat([per_row_nll(model, b)
                                      for _, b in self.forget.batches(config.batch_size, device=device)])
        self.order = list(range(len(self.anchor))) if self.anchor else []
        random.Random(config.seed).shuffle(self.order)
        self.opt = torch.optim.Adam(self.params, lr=config.lr)
        self.lr, self.backtracks, self.steps, self.since_rescore = config.lr, 0, 0, 0

    def until_done(self, progress: Progress) -> RefineResult:
        """Step until a full re-score passes, or a budget or the backtracks run out.

        Trust region: a step after which the erased rows sit as far above the held-out rows
        as memorised rows sit below them (AUC < 1 - max_auc) is undone; a re-score that finds
        the utility bound broken, or the rows over-forgotten, returns to the last state whose
        re-score was sound. Either way the step size is halved, at most MAX_BACKTRACKS times."""
        config = self.config
        previous, sound = None, self.save()
        progress("refine", 0, config.max_steps, {"auc": self.scores.auc})
        while True:
            nll_now = self.forget_pass()
            auc_now = mia_auc(nll_now, self.holdout)
            if auc_now < 1.0 - config.max_auc and previous is not None and self.backtracks < MAX_BACKTRACKS:
                self.restore(previous)
                previous = None
                continue
            if auc_now <= config.target_auc or self.since_rescore >= config.rescore_every:
                self.scores, self.holdout = self.measure()
                self.since_rescore = 0
                if self.scores.auc <= config.target_auc and not judge(self.scores, config, self.reference):
                    return self.finish("reached the held-out level" if self.steps else "already at the held-out level",
                                       self.scores)
                broken = self.broken()
                if broken and self.backtracks >= MAX_BACKTRACKS:
                    return self.finish(broken, self.scores)
                if broken:
                    self.restore(sound)
                    previous = None
                    continue
                sound = self.save()
            out_of = self.out_of_budget()
            if out_of:
                return self.finish(f"{out_of} budget exhausted", self.measure()[0] if self.since_rescore else self.scores)
            previous = self.step()
            progress("refine", self.steps, config.max_steps,
                     {"auc": auc_now, "erased_nll": mean(nll_now), "lr": self.lr})

    def measure(self) -> tuple[VerifyScores, list[float]]:
        return _measure(self.model, *self._rows)

    def forget_pass(self) -> list[float]:
        """One pass over the erased rows: their current losses, and the forgetting gradient of
        the rows still below the held-out median."""
        config = self.config
        self.opt.zero_grad(set_to_none=True)
        nll_now = []
        target = _median(self.holdout)
        for idx, batch in self.forget.batches(config.batch_size, device=self.device):
            nll = per_row_nll(self.model, batch)
            nll_now.extend(nll.detach().tolist())
            active = (nll.detach() < target).to(nll.dtype)
            if config.method == "npo":
                loss_rows = -(2.0 / config.beta) * F.logsigmoid(config.beta * (nll - self.ref_nll[idx]))
            else:
                loss_rows = -nll
            loss = (loss_rows * active).sum() / len(self.forget)
            if active.any():
                loss.backward()
        return nll_now

    def step(self) -> tuple:
        """Add the anchor's gradient, take one Adam step; the state before it."""
        config = self.config
        if self.anchor is not None:
            n = min(config.batch_size, len(self.order))
            chunk = [self.order[(self.steps * config.batch_size + k) % len(self.order)] for k in range(n)]
            batch = self.anchor.batch(chunk, self.device)
            ref_logp = _reference_logp(self.model, batch, self.snapshot)
            (config.anchor_weight * _kl_to_reference(self.model, batch, ref_logp)).backward()
        before = self.save()
        self.opt.step()
        self.steps += 1
        self.since_rescore += 1
        return before

    def broken(self) -> str | None:
        """Why the last re-score is not a state to keep, if it is not."""
        s, config = self.scores, self.config
        if s.auc < config.min_auc:
            return "over-forgotten"
        if (self.reference is not None and s.retain_mean_nll is not None
                and not s.retain_mean_nll - self.reference <= config.max_retain_rise):
            return "utility bound exceeded"
        return None

    def out_of_budget(self) -> str | None:
        if self.steps >= self.config.max_steps:
            return "step"
        return "time" if time.perf_counter() - self.started >= self.config.max_seconds else None

    def save(self) -> tuple:
        return ([p.detach().clone() for p in self.params], copy.deepcopy(self.opt.state_dict()), list(self.holdout),
                self.scores)

    def restore(self, state: tuple) -> None:
        """Return to ``state`` with half the step size."""
        with torch.no_grad():
            for p, saved in zip(self.params, state[0]):
                p.copy_(saved)
        self.opt.load_state_dict(state[1])
        self.holdout, self.scores = list(state[2]), state[3]
        self.lr, self.backtracks = self.lr / 2, self.backtracks + 1
        for group in self.opt.param_groups:
            group["lr"] = self.lr

    def finish(self, reason: str, final: VerifyScores) -> RefineResult:
        for p in self.params:
            p.grad = None
        passed = not judge(final, self.config, self.reference)
        return RefineResult(self.first, final, self.steps, time.perf_counter() - self.started, self.config.method,
                            passed, reason, self.backtracks, self.lr)


def verify_and_refine(model, tokenizer, rows: VerifyRows, config: VerifyConfig, device, progress: Progress = silent,
                      max_length: int = 512) -> Verification | None:
    """Apply ``config.policy``: off → None; report → score only (the model is not
    touched); enforce → score, refine if a bound fails, re-score, and raise
    ``VerificationFailedError`` if a bound still fails."""
    if config.policy == "off":
        return None
    started = time.perf_counter()
    retain_reference = rows.retain_reference
    if not rows.erased:
        return Verification(config.policy, True, "no erased rows to verify", config.bounds(), retain_reference,
                            erased_ids=rows.erased_ids)
    if len(rows.holdout) < config.min_holdout_rows:
        raise InvalidRequestError(
            f"verification needs at least {config.min_holdout_rows} held-out rows, got {len(rows.holdout)}")
    progress("verify", 0, 1)
    before = score(model, tokenizer, rows.erased, rows.holdout, rows.retain, device, max_length, config.batch_size)
    if retain_reference is None:
        retain_reference = before.retain_mean_nll
    failed = judge(before, config, retain_reference)
    after, refinement = None, None
    # Refinement only raises the erased rows' loss: it cannot mend over-forgetting or utility.
    if config.policy == "enforce" and before.auc > config.max_auc:
        result = refine(model, tokenizer, replace(rows, retain_reference=retain_reference), config, device, progress,
                        max_length, before)
        after = result.after
        refinement = Refinement(result.method, result.steps, round(result.seconds, 3), result.reason,
                                backtracks=result.backtracks, final_lr=result.final_lr)
        failed = judge(after, config, retain_reference)
    progress("verify", 1, 1)
    report = Verification(
        policy=config.policy,
        passed=not failed,
        reason="; ".join(failed) if failed else "erased rows look never-seen",
        bounds=config.bounds(),
        retain_reference=retain_reference,
        before=before.typed(),
        after=after.typed() if after else None,
        refinement=refinement,
        erased_ids=rows.erased_ids,
        seconds=round(time.perf_counter() - started, 3),
    )
    if config.policy == "enforce" and failed:
        raise VerificationFailedError(f"verification failed: {report.reason}; {report.summary()}", report)
    return report



# ---- helpers for the file-level erase (eraser/unlearn.py)


def load_holdout(path, training_rows: Sequence[Row], config: VerifyConfig) -> list[Row]:
    """Held-out rows for verification, refused when missing, too few, or trained on."""
    if path is None:
        raise InvalidRequestError(f"verify policy {config.policy!r} needs a held-out set of rows the adapter never saw")
    rows = load_rows(path)
    if len(rows) < config.min_holdout_rows:
        raise InvalidRequestError(f"verification needs at least {config.min_holdout_rows} held-out rows, got {len(rows)}")
    trained = {r.sha256() for r in training_rows}
    overlap = [r.id for r in rows if r.sha256() in trained]
    if overlap:
        raise InvalidRequestError(
            f"{len(overlap)} held-out row(s) are training rows (e.g. held-out id {overlap[0]!r}); "
            "held-out rows must be rows the adapter never saw")
    return rows


def erased_rows(edits) -> list[Row]:
    """The rows whose response leaves the training set: removals and response corrections.

    A query modification keeps its response (under the new prompt), so its old row is not
    expected to look never-seen and is not verified.
    """
    return [e.old for e in edits if e.new is None or e.new.response != e.old.response]


def retained_sample(rows: Sequence[Row], edits, config: VerifyConfig) -> list[Row]:
    """A seeded sample of the rows no edit touches, in dataset order."""
    affected = {e.old.id for e in edits}
    kept = [r for r in rows if r.id not in affected]
    if len(kept) <= config.retain_sample:
        return kept
    chosen = set(random.Random(config.seed).sample(range(len(kept)), config.retain_sample))
    return [r for i, r in enumerate(kept) if i in chosen]


def pairs(rows: Sequence[Row]) -> list[Pair]:
    return [(r.prompt, r.response) for r in rows]
