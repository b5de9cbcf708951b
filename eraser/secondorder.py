"""Step control and second-order refinement: an erase that forgets, safe by construction.

The influence formula assumes the adapter sits at a minimum of its training loss; a real
fine-tune stops early, so the formula's step length is controlled by nothing. Here every
step, the influence step first, is scaled by a backtracking (and expanding) line search on
a *sampled objective*:

- each erased row i has a never-seen target NLL τᵢ: its base-model NLL (adapter disabled)
  times the median ratio of adapter to base NLL on held-out rows the adapter never saw
  (without a held-out set: the base NLL itself, "no advantage at all");
- each new row of a correction (RC/QM) has the retained rows' median NLL as its target;
- Φ(θ) = mean ½·(relu(τᵢ − NLLᵢ)² + relu(NLLᵢ − τᵢ − b)²) over erased rows + mean
  relu(NLLⱼ − τ_new) over new rows: zero once every erased row is within a band b above its
  target (a row pushed far beyond the never-seen level betrays membership too, so it is
  pulled back) and every new row at its target;
- a scale is admissible when the retained sample's mean NLL rose by at most a share of the
  utility bound and the erased rows did not overshoot their targets.

Where the erased rows are not yet at the never-seen level, further steps follow the
natural gradient of Φ plus a penalty on the retained rows' NLL rise, preconditioned by
the same cached EK-FAC/K-FAC factors ((F + λI)⁻¹ g, λ relative to F's scale along g: in the
spirit of SOUL, Jia et al. 2024), each again line-searched, until the membership verdict
(``eraser.membership``) passes and the new rows are learned, or the budget is spent.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .curvature import flatten
from .data import EncodedRows
from .errors import InvalidRequestError
from .losses import per_row_nll
from .membership import MembershipVerdict, RowScores, base_model_nll, measure, nll_ratio, verdict
from .progress import Progress, silent
from .reports import Step, as_json

Pair = tuple[str, str]


@dataclass(frozen=True)
class StepConfig:
    """How far one step may go, and how the second-order steps are built."""

    enabled: bool = True
    # A step may spend this share of the utility bound (the retained sample's NLL rise);
    # the rest is margin for the final check on the same rows.
    max_rise_share: float = 0.8
    # Mean nats the erased rows may end above their never-seen targets (over-forgetting
    # also reveals a row).
    overshoot: float = 0.5
    # Nats above its never-seen target within which an erased row counts as there; beyond
    # it the objective pulls the row back.
    band: float = 0.2
    backtracks: int = 12
    expansions: int = 4
    # λ = ratio × the curvature's Rayleigh quotient along the gradient being preconditioned.
    damping_ratio: float = 0.1
    anchor_weight: float = 10.0
    # New rows (RC/QM) count as learned when their mean NLL is within this of the retained
    # rows' median and greedy decoding gives them about as often as it gives retained rows.
    learn_margin: float = 0.3
    batch_size: int = 16  # rows in a batch whose gradient is taken
    score_batch_size: int = 32  # rows per forward pass without gradients (a larger batch shares its prefix wider)

    def __post_init__(self):
        numbers = (self.max_rise_share, self.overshoot, self.band, self.damping_ratio, self.anchor_weight,
                   self.learn_margin)
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in numbers):
            raise InvalidRequestError("step settings must be finite numbers >= 0")
        if not 0 < self.max_rise_share <= 1 or self.damping_ratio <= 0:
            raise InvalidRequestError("max_rise_share must be in (0, 1] and damping_ratio > 0")
        if self.backtracks < 1 or self.expansions < 0 or self.batch_size < 1 or self.score_batch_size < 1:
            raise InvalidRequestError("backtracks, batch_size and score_batch_size must be >= 1, expansions >= 0")


@dataclass
class Point:
    """The sampled objective at one parameter vector."""

    forget: list[float]
    learn: list[float]
    retain_mean: float | None
    phi: float
    rise: float
    overshoot: float

    def merit(self, weight: float) -> float:
        return self.phi + weight * max(0.0, self.rise)

    def admissible(self, budget: float, overshoot: float) -> bool:
        return self.rise <= budget and self.overshoot <= overshoot and math.isfinite(self.phi)


class SampledObjective:
    """Φ and the utility constraint on the erased, new and retained rows (module docstring)."""

    def __init__(self, model, tokenizer, params, forget: Sequence[Pair], learn: Sequence[Pair], retain: Sequence[Pair],
                 device, max_length: int, config: StepConfig):
        self.model, self.params, self.device, self.config = model, list(params), device, config
        enc = lambda pairs: EncodedRows(tokenizer, pairs, max_length) if pairs else None  # noqa: E731
        self.forget, self.learn, self.retain = enc(forget), enc(learn), enc(retain)
        self.forget_targets: list[float] = [0.0] * len(forget)
        self.learn_target = 0.0
        self.retain_reference: float | None = None
        self._last: tuple[torch.Tensor, Point] | None = None  # the point last evaluated, and where
        self._known_retain: tuple[torch.Tensor, float] | None = None  # a retained mean measured elsewhere, and where

    def _nll(self, data: EncodedRows | None) -> list[float]:
        if data is None:
            return []
        with torch.no_grad():
            return [x for _, b in data.batches(self.config.score_batch_size, device=self.device)
                    for x in per_row_nll(self.model, b, share_prefix=True).tolist()]

    def evaluate(self, phi_ceiling: float = math.inf, overshoot_cap: float = math.inf) -> Point:
        """The objective at the current parameters. Where Φ alone is above ``phi_ceiling``, or
        the erased rows overshoot their targets by more than ``overshoot_cap``, the retained
        rows (most of the cost) are not scored and the point is inadmissible."""
        theta = parameters_to_vector(self.params).detach()
        if self._last is not None and torch.equal(self._last[0], theta):
            return self._last[1]  # done() and the refinement loop ask at the same parameters
        forget, learn = self._nll(self.forget), self._nll(self.learn)
        band = self.config.band
        gaps = [max(0.0, t - x) + max(0.0, x - t - band) for x, t in zip(forget, self.forget_targets)]
        over = [max(0.0, x - t) for x, t in zip(forget, self.forget_targets)]
        new_gaps = [max(0.0, x - self.learn_target) for x in learn]
        phi = _half_mean_square(gaps) + (sum(new_gaps) / len(new_gaps) if new_gaps else 0.0)
        overshoot = sum(over) / len(over) if over else 0.0
        if phi > phi_ceiling or overshoot > overshoot_cap:
            return Point(forget, learn, None, phi, math.inf, overshoot)
        known = self._known_retain
        if known is not None and torch.equal(known[0], theta):
            retain_mean = known[1]
        else:
            retain = self._nll(self.retain)
            retain_mean = sum(retain) / len(retain) if retain else None
        if self.retain_reference is None:
            self.retain_reference = retain_mean
        rise = retain_mean - self.retain_reference if retain_mean is not None else 0.0
        point = Point(forget, learn, retain_mean, phi, rise, overshoot)
        self._last = (theta.clone(), point)
        return point

    def retarget(self, targets: Sequence[float]) -> None:
        """New never-seen targets for the erased rows (the held-out rows moved with the
        adapter); Φ changes with them, so the point last scored is forgotten, not its retained mean."""
        targets = list(targets)
        if targets == self.forget_targets:
            return
        self.forget_targets = targets
        if self._last is not None and self._last[1].retain_mean is not None:
            self._known_retain = (self._last[0], self._last[1].retain_mean)
        self._last = None

    def know_retained(self, losses: Sequence[float]) -> None:
        """The retained rows' losses at the current parameters, measured by the caller (the
        parent's, before the erase): not scored again there."""
        if losses:
            self._known_retain = (parameters_to_vector(self.params).detach().clone(), sum(losses) / len(losses))

    def remember(self, point: Point) -> None:
        """``point`` is the objective at the current parameters (scored earlier)."""
        if point.retain_mean is not None or self.retain is None:
            self._last = (parameters_to_vector(self.params).detach().clone(), point)

    def gradient(self) -> torch.Tensor:
        """∇Φ: the erased rows' gaps to their targets and the new rows' gaps to theirs."""
        self.model.zero_grad(set_to_none=True)
        for data, sign, targets in ((self.forget, 1.0, self.forget_targets), (self.learn, -1.0, None)):
            if data is None:
                continue
            for idx, batch in data.batches(self.config.batch_size, device=self.device):
                nll = per_row_nll(self.model, batch, share_prefix=True)
                target = (torch.tensor([targets[i] for i in idx], dtype=nll.dtype, device=nll.device)
                          if targets is not None else torch.full_like(nll, self.learn_target))
                gap = torch.relu(sign * (target - nll))
                # Erased rows: a squared gap (either side of the band), which slows down near
                # it; new rows: the gap itself, whose pull does not fade before they are learned.
                if targets is not None:
                    gap = gap + torch.relu(nll - target - self.config.band)
                (0.5 * gap.square() if targets is not None else gap).sum().div(len(data)).backward()
        return self._take_gradient()

    def retain_gradient(self, rows: Sequence[int]) -> torch.Tensor | None:
        """The gradient of the mean NLL of a batch of retained rows."""
        if not rows or self.retain is None:
            return None
        rows = list(rows)
        self.model.zero_grad(set_to_none=True)
        # In batches (less padding, smaller activations): the gradients add up to the mean's.
        for i in range(0, len(rows), self.config.batch_size):
            batch = self.retain.batch(rows[i:i + self.config.batch_size], self.device)
            per_row_nll(self.model, batch, share_prefix=True).sum().div(len(rows)).backward()
        return self._take_gradient()

    def _take_gradient(self) -> torch.Tensor:
        g = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]).detach().clone()
        self.model.zero_grad(set_to_none=True)
        return g


def _half_mean_square(xs: Sequence[float]) -> float:
    return 0.5 * sum(x * x for x in xs) / len(xs) if xs else 0.0


@dataclass
class LineSearch:
    scale: float
    trials: int
    point: Point


def line_search(params, theta: torch.Tensor, direction: torch.Tensor, objective: SampledObjective, current: Point,
                start: float, budget: float, config: StepConfig, expand: bool = True,
                stop_on_ascent: bool = False) -> LineSearch:
    """The largest admissible scale s of θ + s·d found by halving (or doubling) from ``start``
    that does not raise Φ; the parameters are left at it (s = 0: unchanged). With
    ``stop_on_ascent`` the halving stops once two trials show the merit rising along d from
    θ (a direction not built to descend it, such as the influence step's)."""
    search = _Search(params, theta, direction, objective, current, budget, config, stop_on_ascent)
    point = search.at(start)
    if search.ok(point):
        best = search.expand((start, point)) if expand else (start, point)
    else:
        best = search.backtrack(start)
    with torch.no_grad():
        vector_to_parameters(theta + best[0] * direction.to(theta.dtype), params)
    objective.remember(best[1])  # the next evaluate() is at these parameters: no rescoring
    return LineSearch(best[0], search.trials, best[1])


class _Search:
    """The trials of one line search along θ + s·d: each sets the parameters and scores them."""

    def __init__(self, params, theta, direction, objective: SampledObjective, current: Point, budget: float,
                 config: StepConfig, stop_on_ascent: bool = False):
        self.params, self.theta, self.direction, self.objective = params, theta, direction, objective
        self.current, self.budget, self.config, self.stop_on_ascent = current, budget, config, stop_on_ascent
        self.w = config.anchor_weight
        # Past the overshoot cap already, the band's term in Φ pulls the rows back: the cap would
        # refuse the steps that trade a little overshoot for utility on the way.
        self.overshoot = config.overshoot if current.overshoot <= config.overshoot else math.inf
        self.trials = 0

    def at(self, s: float) -> Point:
        self.trials += 1
        with torch.no_grad():
            vector_to_parameters(self.theta + s * self.direction.to(self.theta.dtype), self.params)
        # The merit is at least Φ: where Φ alone is above the current merit, or the rows overshoot
        # past the cap, the point cannot be accepted: no need to score the retained rows.
        return self.objective.evaluate(phi_ceiling=self.current.merit(self.w), overshoot_cap=self.overshoot)

    def ok(self, p: Point) -> bool:
        m = self.current.merit(self.w)
        return p.admissible(self.budget, self.overshoot) and p.merit(self.w) <= m - 1e-4 * abs(m)

    def expand(self, best: tuple[float, Point]) -> tuple[float, Point]:
        """From an admissible scale: doubling while the merit improves."""
        for _ in range(self.config.expansions):
            trial = self.at(2 * best[0])
            if not (self.ok(trial) and trial.merit(self.w) < best[1].merit(self.w)):
                break
            best = (2 * best[0], trial)
        return best

    def backtrack(self, s: float) -> tuple[float, Point]:
        """From an inadmissible scale: halving to the first admissible one; (0, the current
        point) when none is."""
        m0, above = self.current.merit(self.w), None  # (scale, merit excess) of the last trial scored
        for _ in range(self.config.backtracks):
            s /= 2
            point = self.at(s)
            if self.ok(point):
                return s, point
            excess = point.merit(self.w) - m0
            if self.stop_on_ascent and above is not None and math.isfinite(excess) and excess > 0:
                if merit_slope(s, excess, above[1]) >= 0:
                    break
            above = (s, excess) if math.isfinite(excess) and excess > 0 else None
        return 0.0, self.current


def merit_slope(s: float, excess: float, excess_at_double: float) -> float:
    """The merit's slope at scale 0 along the direction, from its excess over the current
    merit at s and at 2s (the quadratic through the three points): at or above 0, no smaller
    scale can lower the merit unless higher-order terms dominate."""
    return (4 * excess - excess_at_double) / (2 * s)


class Judge:
    """The membership verdict and the learned check at the current parameters."""

    def __init__(self, model, tokenizer, erased: Sequence[Pair], holdout: Sequence[Pair], learn: Sequence[Pair], device,
                 max_length: int, batch_size: int, max_auc: float, min_auc: float):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.erased, self.holdout, self.learn = list(erased), list(holdout), list(learn)
        self.max_length, self.batch_size, self.max_auc, self.min_auc = max_length, batch_size, max_auc, min_auc
        base = lambda pairs: base_model_nll(model, tokenizer, pairs, device, batch_size, max_length) if pairs else []  # noqa: E731
        self.base_erased, self.base_holdout = base(self.erased), base(self.holdout)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._last: tuple[torch.Tensor, tuple] | None = None  # the last verdict, and where

    def scores(self, pairs, base) -> RowScores:
        return measure(self.model, self.tokenizer, pairs, self.device, self.batch_size, self.max_length, base)

    def judge(self) -> tuple[MembershipVerdict | None, RowScores, RowScores | None, RowScores]:
        # An influence step scaled to 0 leaves the parameters where the first verdict was taken.
        theta = parameters_to_vector(self._params).detach()
        if self._last is None or not torch.equal(self._last[0], theta):
            self._last = (theta.clone(), self._judge())
        return self._last[1]

    def _judge(self) -> tuple[MembershipVerdict | None, RowScores, RowScores | None, RowScores]:
        erased = self.scores(self.erased, self.base_erased)
        holdout = self.scores(self.holdout, self.base_holdout) if self.holdout else None
        learn = self.scores(self.learn, None)
        v = verdict(erased, holdout, self.max_auc, self.min_auc) if holdout is not None and self.erased else None
        return v, erased, holdout, learn

    def targets(self, holdout: RowScores | None) -> list[float]:
        return never_seen_targets(self.base_erased, holdout, len(self.erased))


def never_seen_targets(base_erased: list[float] | None, holdout: RowScores | None, rows: int) -> list[float]:
    """Each erased row's never-seen NLL: its base NLL times the held-out rows' median ratio of
    adapter to base NLL. A ratio, because an adapter cuts a never-seen row's NLL by about the
    same share whatever its difficulty; a median difference sent rows the base finds easy to
    targets at or below zero (bench/results/target_calibration.md)."""
    if base_erased is None:  # no base model to calibrate by: the held-out median
        return [statistics.median(holdout.nll)] * rows if holdout else [math.inf] * rows
    if holdout is None or holdout.base_nll is None:
        return list(base_erased)
    ratio = statistics.median(nll_ratio(x, b) for x, b in zip(holdout.nll, holdout.base_nll))
    return [b * ratio for b in base_erased]


@dataclass(frozen=True)
class LearnCheck:
    """When the new rows of a correction (RC/QM) count as learned: their mean NLL within
    ``margin`` of ``target`` (the retained rows' median on the parent), and greedy decoding
    reproducing them about as often as it reproduces retained rows (``exact_share_floor``)."""

    target: float
    margin: float
    retain_exact: float = 1.0

    def required(self, rows: int) -> int:
        """How many of ``rows`` new rows greedy decoding must reproduce."""
        return max(0, math.ceil(exact_share_floor(self.retain_exact, rows) * rows - 1e-9)) if rows else 0

    def passed(self, scores: RowScores) -> bool:
        if not scores.nll:
            return True
        return (sum(scores.exact) >= self.required(len(scores.exact))
                and sum(scores.nll) / len(scores.nll) <= self.target + self.margin)

    def describe(self, scores: RowScores) -> str:
        return (f"mean NLL {sum(scores.nll) / len(scores.nll):.3f}, target {self.target:.3f} + {self.margin:g}; "
                f"{sum(scores.exact)}/{len(scores.exact)} reproduced, {self.required(len(scores.exact))} required")

    def to_json(self, scores: RowScores) -> dict:
        return {"rows": len(scores.nll), "mean_nll": sum(scores.nll) / len(scores.nll), "target_nll": self.target,
                "margin": self.margin, "reproduced": sum(scores.exact), "required": self.required(len(scores.exact)),
                "retain_reproduced_share": self.retain_exact, "passed": self.passed(scores)}


def exact_share_floor(retain_exact: float, rows: int) -> float:
    """The least share of ``rows`` new rows greedy decoding must reproduce when it reproduces a
    share ``retain_exact`` of the retained rows: that share less 0.1, less the one-sided 95 %
    margin of a share over so few rows. An adapter that reproduces every retained row must
    reproduce every new one; where it reproduces a third of them, one new row that is not
    reproduced is no evidence that it was not learned (retraining would miss it as often)."""
    p = min(max(retain_exact, 0.0), 1.0)
    return p - 0.1 - 1.645 * math.sqrt(p * (1 - p) / rows)


@dataclass
class Refinement:
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0
    passed: bool = False
    reason: str = ""

    def to_json(self) -> dict:
        return {"method": "natural", "steps": sum(1 for s in self.steps if s.kind == "natural"),
                "seconds": round(self.seconds, 3), "stopped": self.reason, "passed": self.passed,
                "trace": [as_json(s) for s in self.steps]}


def controlled_influence_step(params, delta: torch.Tensor, objective: SampledObjective, budget: float,
                              config: StepConfig) -> Step:
    """Apply the influence update at the largest admissible scale (0: not at all)."""
    theta = parameters_to_vector(params).detach().clone()
    current = objective.evaluate()
    if not config.enabled:
        with torch.no_grad():
            vector_to_parameters(theta + delta.to(theta.dtype), params)
        p = objective.evaluate()
        return Step("influence", 1.0, 1, p.phi, p.rise)
    if current.phi == 0.0:
        return Step("influence", 0.0, 0, 0.0, current.rise)
    # From where Φ's linear model along the step reaches zero, as a natural step's search: the
    # formula's own length (scale 1) was often many halvings too long, each a scoring pass. Never
    # from beyond it: past 1 the search only expands while the merit keeps improving.
    start = min(1.0, _gauss_newton_scale(current.phi, objective.gradient(), delta))
    ls = line_search(params, theta, delta, objective, current, start, budget, config, stop_on_ascent=True)
    return Step("influence", ls.scale, ls.trials, ls.point.phi, ls.point.rise)


def _project_out(step: torch.Tensor, retain_grad: torch.Tensor | None, factors, damping: float) -> torch.Tensor:
    """``step`` (= F⁻¹g) less its part that raises the retained rows' NLL to first order, in the
    metric of F: the direction then forgets without trading utility for it (gradient
    projection); Φ still decreases along it (Cauchy-Schwarz)."""
    if retain_grad is None:
        return step
    along = factors.solve(retain_grad, damping)
    denominator = float(retain_grad.double() @ along.double())
    coefficient = float(retain_grad.double() @ step.double()) / denominator if denominator > 0 else 0.0
    # The step is -``step``: it raises the retained NLL where the coefficient is negative.
    return step - coefficient * along if coefficient < 0 else step


def _gauss_newton_scale(phi: float, gradient: torch.Tensor, direction: torch.Tensor) -> float:
    """Where the line search starts: the scale at which Φ's linear model along the direction
    reaches zero (Φ is half a mean square of gaps, so that is 2Φ over the slope). The
    natural direction's length depends on the damping, so a fixed start of 1 can be
    thousands of halvings from the answer, each a scoring pass over the sampled rows."""
    slope = -float(gradient.double() @ direction.double())
    return 2.0 * phi / slope if slope > 0 and phi > 0 else 1.0


def refine_natural(params, factors, objective: SampledObjective, retained: int, budget: float, config: StepConfig,
                   max_steps: int, max_seconds: float, done, progress: Progress = silent) -> Refinement:
    """Natural-gradient steps on Φ + the retained rows' rise, each line-searched, until ``done()`` says the
    verdict passes (module docstring). The model is left at the last accepted step."""
    started = time.perf_counter()
    result = Refinement()
    scale, stalled = 1.0, 0
    progress("refine", 0, max_steps)
    for step in range(max_steps + 1):
        passed, why, settled = done()
        result.passed, result.reason = passed, why
        if passed and settled:
            break
        if step == max_steps or time.perf_counter() - started >= max_seconds:
            if not passed:
                result.reason = f"{'step' if step == max_steps else 'time'} budget exhausted: {why}"
            break
        current = objective.evaluate()
        # The retained sample's gradient, for the projection and the anchor: a backward pass a
        # step (reusing it for 3 steps cost more steps than it saved: bench/results/refine-gradient-reuse.md).
        retain_grad = objective.retain_gradient(range(retained))
        g = objective.gradient()
        # The merit's penalty on the retained rows only while their NLL is above the parent's:
        # it charges nothing below, so pulling further down would only fight Φ.
        if current.rise > 0 and retain_grad is not None and config.anchor_weight > 0:
            g = g + config.anchor_weight * retain_grad
        if not float(g.norm()) > 0:
            if not passed:
                result.reason = f"no gradient left: {why}"
            break
        damping = config.damping_ratio * max(factors.scale_along(g), 1e-12)
        direction = -_project_out(factors.solve(g, damping), retain_grad, factors, damping)
        theta = parameters_to_vector(params).detach().clone()
        start = _gauss_newton_scale(current.phi, g, direction) if stalled == 0 else scale
        ls = line_search(params, theta, direction, objective, current, start, budget, config)
        result.steps.append(Step("natural", ls.scale, ls.trials, ls.point.phi, ls.point.rise, damping))
        progress("refine", step + 1, max_steps, {"phi": ls.point.phi, "scale": ls.scale})
        if ls.scale == 0.0:
            stalled += 1
            if stalled >= 2:
                if not passed:
                    result.reason = f"no admissible step within the utility bound: {why}"
                break
            scale = 1.0  # nothing admissible below the last scale: search again from the top
        else:
            stalled, scale = 0, ls.scale
    result.seconds = time.perf_counter() - started
    for p in params:
        p.grad = None
    return result
