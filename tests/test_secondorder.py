"""The default erase path (eraser/forget.py, eraser/secondorder.py): the influence step
under a line search, then natural-gradient steps preconditioned by EK-FAC factors, until
the membership verdict (eraser/membership.py) passes, on all three tasks."""

from __future__ import annotations

import statistics

import pytest
import torch

from conftest import CITIES
from eraser.curvature import CurvatureConfig
from eraser.errors import UtilityCheckFailedError, VerificationFailedError
from eraser.losses import row_losses
from eraser.membership import base_model_nll, judge_attack, measure
from eraser.requests import UnlearningRequest
from eraser.data import Row, write_rows
from eraser.membership import RowScores
from eraser.secondorder import LearnCheck, StepConfig
from eraser.solvers import SolverConfig
from eraser.train import TrainConfig, train
from eraser.unlearn import EraseConfig, erase
from eraser.verify import VerifyConfig, pairs
from test_cli import listing
from test_verify import load, tree_digest, world  # noqa: F401  (world: the module-scoped fixture)

DEFAULT = dict(solver=SolverConfig("ekfac"), curvature=CurvatureConfig(damping=0.1, relative=True))
ENFORCE = VerifyConfig(policy="enforce")


def _erase(world, tmp_path, request, **kwargs):
    return erase(world["base"], world["adapter"], world["data"], request, tmp_path / "v2", tmp_path / "edited.jsonl",
                 EraseConfig(**{**DEFAULT, "verify": ENFORCE, **kwargs}), holdout_path=world["holdout"])


def _judged_independently(world, adapter, erased_rows):
    """Scores of the written adapter on the erased rows against the *second* held-out set,
    never used by the erase."""
    model, tok = load(world, adapter)
    e = measure(model, tok, pairs(erased_rows), "cpu", base_nll=base_model_nll(model, tok, pairs(erased_rows), "cpu"))
    h = measure(model, tok, pairs(world["holdout2"]), "cpu",
                base_nll=base_model_nll(model, tok, pairs(world["holdout2"]), "cpu"))
    retained = sum(row_losses(model, tok, pairs(world["retained"]), "cpu")) / len(world["retained"])
    return e, h, retained


def test_removal_reaches_the_never_seen_level_and_keeps_utility(world, tmp_path):
    request = UnlearningRequest(remove=tuple(r.id for r in world["erased"]))
    report = _erase(world, tmp_path, request)
    v = report.verification
    assert v.passed, v.reason
    assert report.steps[0].kind == "influence" and v.refinement.method == "natural"
    assert v.membership.before.attacks[0].auc > 0.9  # the influence step alone left them memorised
    after = v.membership.after
    assert {a.name for a in after.attacks} == {"loss", "reference", "mink"} and after.passed
    parent, tok = load(world)
    parent_retained = sum(row_losses(parent, tok, pairs(world["retained"]), "cpu")) / len(world["retained"])
    e, h, retained = _judged_independently(world, tmp_path / "v2", world["erased"])
    for attack in ("loss", "reference", "mink"):
        a = judge_attack(attack, e.member_scores(attack), h.member_scores(attack), 0.75, 0.1)
        assert 0.1 <= a.auc <= 0.8, (attack, a)
    assert not any(e.exact)  # no erased answer is reproduced by greedy decoding
    assert retained - parent_retained <= 0.05, (retained, parent_retained)


# The world fixture's training recipe (tests/test_verify.py): retraining is judged alike.
WORLD_TRAINING = TrainConfig(rank=4, alpha=8, epochs=60, lr=2e-2, batch_size=4)


def _born(world) -> tuple[Row, str]:
    row = next(r for r in world["erased"] if r.id.startswith("born-"))
    return row, row.prompt.split()[2].rstrip("?")


@pytest.fixture(scope="module")
def wrong_question(world, tmp_path_factory):
    """The world trained with one question wrong (about a thing the person has no fact for,
    as in bench/unlearning's query-modification task): the request puts the right one back."""
    d = tmp_path_factory.mktemp("wrong-question")
    right, name = _born(world)
    wrong = Row(right.id, f"What does {name} drive?", right.response)
    rows = [wrong if r.id == right.id else r for r in world["rows"]]
    write_rows(d / "train.jsonl", rows)
    train(world["base"], d / "train.jsonl", d / "lora", WORLD_TRAINING)
    world = {**world, "adapter": d / "lora", "data": d / "train.jsonl", "rows": rows,
             "retained": [r for r in rows if r.id != right.id]}
    return world, wrong, right


def _retrained_nll(world, tmp_path, rows, row: Row) -> float:
    write_rows(tmp_path / "retrain.jsonl", rows)
    train(world["base"], tmp_path / "retrain.jsonl", tmp_path / "retrained", WORLD_TRAINING)
    model, tok = load(world, tmp_path / "retrained")
    return measure(model, tok, [(row.prompt, row.response)], "cpu").nll[0]


@pytest.mark.parametrize("task", ["correct_response", "modify_query"])
def test_corrections_pass_verification_with_the_new_text_learned(world, wrong_question, tmp_path, task):
    """RC: a trained answer is replaced by another city; QM: a question trained wrong is put
    right. The request passes verification under enforce, the new row is learned at the
    retained rows' level and at least as well as retraining from scratch learns it, the old
    text is neither reproduced nor member-like, and the retained rows keep their NLL."""
    if task == "correct_response":
        old, name = _born(world)
        new = Row(old.id, old.prompt, f"{name} was born in {next(c for c in CITIES if c not in old.response)}.")
        request = UnlearningRequest(correct_response=((old.id, new.response),))
    else:
        world, old, new = wrong_question
        request = UnlearningRequest(modify_query=((old.id, new.prompt),))
    report = _erase(world, tmp_path, request)
    v = report.verification
    assert v.passed, v.reason
    parent, tok = load(world)
    retained_parent = row_losses(parent, tok, pairs(world["retained"]), "cpu")
    before = measure(parent, tok, [(new.prompt, new.response)], "cpu").nll[0]
    model, tok = load(world, tmp_path / "v2")
    after = measure(model, tok, [(new.prompt, new.response), (old.prompt, old.response)], "cpu")
    retrained = _retrained_nll(world, tmp_path, [new if r.id == old.id else r for r in world["rows"]], new)
    assert v.learned.rows == 1 and v.learned.mean_nll == pytest.approx(after.nll[0], abs=1e-4)
    assert after.nll[0] <= statistics.median(retained_parent) < before, (after.nll, retained_parent, before)
    assert after.nll[0] <= retrained + 0.1, (after.nll[0], retrained)
    assert not after.exact[1]  # the old answer to the old question is not given
    # The old row looks never-seen to an independent judge.
    assert {a.name for a in v.membership.after.attacks} == {"loss", "reference", "mink"}
    e, h, _ = _judged_independently(world, tmp_path / "v2", [old])
    for attack in ("loss", "reference", "mink"):
        a = judge_attack(attack, e.member_scores(attack), h.member_scores(attack), 0.75, 0.1)
        assert a.auc <= 0.8, (attack, a)
    retained = sum(row_losses(model, tok, pairs(world["retained"]), "cpu")) / len(world["retained"])
    assert retained - sum(retained_parent) / len(retained_parent) <= 0.05


def test_new_rows_must_be_reproduced_as_often_as_retained_rows_are():
    """The learned check's greedy half is sized to the rows: where the adapter reproduces every
    retained row a new row it does not reproduce is not learned; where it reproduces a third
    of them, one such row is no evidence either way; over many rows the share must keep up."""
    rows = lambda nll, exact: RowScores(nll=nll, mink=[0.0] * len(nll), exact=exact, base_nll=None)  # noqa: E731
    strict, loose = LearnCheck(0.5, 0.3, retain_exact=1.0), LearnCheck(0.5, 0.3, retain_exact=0.3)
    assert not strict.passed(rows([0.1], [False])) and strict.required(1) == 1
    assert strict.passed(rows([0.1], [True]))
    assert loose.passed(rows([0.1], [False])) and loose.required(1) == 0
    assert not loose.passed(rows([0.1] * 40, [True] * 2 + [False] * 38)) and loose.required(40) == 4
    assert not strict.passed(rows([0.9], [True]))  # NLL above target + margin
    report = strict.to_json(rows([0.1, 0.3], [True, False]))
    assert report == {"rows": 2, "mean_nll": pytest.approx(0.2), "target_nll": 0.5, "margin": 0.3, "reproduced": 1,
                      "required": 2, "retain_reproduced_share": 1.0, "passed": False}


def test_line_search_keeps_the_utility_bound_on_a_step_that_breaks_it_unscaled(world, tmp_path):
    """A nearly undamped influence step (absolute damping 1e-6) wrecks the adapter: refused
    without step control, scaled down to within the bound with it."""
    request = UnlearningRequest(remove=tuple(r.id for r in world["erased"]))
    wild = dict(solver=SolverConfig("ekfac"), curvature=CurvatureConfig(damping=1e-6), verify=VerifyConfig())
    with pytest.raises(UtilityCheckFailedError):
        _erase(world, tmp_path, request, **wild, step=StepConfig(enabled=False))
    report = _erase(world, tmp_path, request, **wild)
    assert 0 <= report.steps[0].scale < 1 and report.utility.passed
    assert report.utility.rise <= 0.8 * report.utility.max_rise + 1e-9


def test_a_budget_too_small_fails_cleanly_and_writes_nothing(world, tmp_path):
    inputs = {p: tree_digest(p) for p in (world["adapter"], world["data"], world["holdout"])}
    request = UnlearningRequest(remove=tuple(r.id for r in world["erased"]))
    with pytest.raises(VerificationFailedError) as info:
        _erase(world, tmp_path, request, verify=VerifyConfig(policy="enforce", max_steps=0))
    assert "step budget exhausted" in str(info.value) and "\n" not in str(info.value)
    assert not any(r.response in str(info.value) for r in world["erased"])
    assert listing(tmp_path) == set()
    assert {p: tree_digest(p) for p in inputs} == inputs


@pytest.mark.parametrize("length", [1e-3, 1.0, 4096.0])
def test_the_line_search_starts_where_the_linear_model_of_the_gaps_reaches_zero(length):
    """Whatever the natural direction's length (set by the damping), the first trial lands
    on the zero of Φ's Gauss-Newton model, not at scale 1 (thousands of halvings away)."""
    import torch

    from eraser.secondorder import _gauss_newton_scale

    theta, target = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 3.0, 0.5])
    gaps = target - theta
    phi = 0.5 * float(gaps.square().sum())
    gradient, direction = -gaps, length * gaps
    start = _gauss_newton_scale(phi, gradient, direction)
    assert torch.allclose(theta + start * direction, target)
    assert _gauss_newton_scale(0.0, gradient, direction) == 1.0  # nothing left to forget
    assert _gauss_newton_scale(phi, gradient, -direction) == 1.0  # not a descent direction: the old start


def _objective_far_from_targets(world):
    """The sampled objective on the parent adapter, its erased rows' targets far above them
    (8 nats), 8 retained rows; with the adapter's parameters and the point scored there."""
    from eraser.secondorder import SampledObjective

    model, tok = load(world)
    params = [p for p in model.parameters() if p.requires_grad]
    objective = SampledObjective(model, tok, params, pairs(world["erased"]), [], pairs(world["retained"][:8]), "cpu",
                                 512, StepConfig())
    objective.forget_targets = [8.0] * len(world["erased"])
    return params, objective, objective.evaluate()


# Accepted and expanded; backtracked to an accepted scale (the last point scored: cached before
# remember() too); backtracked to nothing.
@pytest.mark.parametrize("start, outcome", [(1e-3, "expanded"), (1.0, "backtracked"), (1e6, "none")])
def test_the_point_a_line_search_leaves_is_not_scored_again(world, start, outcome):
    """Whatever scale the line search settles on (one it expanded past, a backtracked one,
    none), the refinement's next evaluate() is at those parameters: it must reuse the point
    the search scored, not pay another pass over the retained rows."""
    from torch.nn.utils import parameters_to_vector

    from eraser.secondorder import line_search

    params, objective, current = _objective_far_from_targets(world)
    direction = -objective.gradient()
    theta = parameters_to_vector(params).detach().clone()
    scored = []
    nll = objective._nll
    objective._nll = lambda data: scored.append(data) or nll(data)
    ls = line_search(params, theta, direction, objective, current, start, 0.3, StepConfig())
    assert ls.trials >= 2 and scored  # the search itself scored trial points
    assert {"expanded": ls.scale > start, "backtracked": 0 < ls.scale < start, "none": ls.scale == 0}[outcome]
    before = len(scored)
    point = objective.evaluate()
    assert len(scored) == before and point == ls.point
    assert torch.equal(parameters_to_vector(params), theta + ls.scale * direction)


def test_never_seen_targets_scale_with_the_base_models_nll():
    """An adapter cuts a never-seen row's NLL by about the same share whatever the row's
    difficulty: the targets follow that ratio, so a row the base model finds easy gets a low
    but positive target (a median *difference* put it at -1.5 nats, which no row can reach,
    so Φ never pulled it up), and a row at its target looks like the held-out rows to
    the reference attack."""
    from eraser.membership import verdict
    from eraser.secondorder import never_seen_targets

    held_base = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    ratios = [0.30, 0.50, 0.35, 0.45, 0.40, 0.42, 0.38, 0.48, 0.32]
    held = RowScores([b * r for b, r in zip(held_base, ratios)], [-2.0] * 9, [False] * 9, held_base)
    easy, hard = 0.3, 6.0
    targets = never_seen_targets([easy, hard], held, 2)
    assert targets == pytest.approx([0.4 * easy, 0.4 * hard])  # the median ratio is 0.40
    assert min(targets) > 0
    at_target = RowScores(targets, [-2.0] * 2, [False] * 2, [easy, hard])
    reference = {a.name: a for a in verdict(at_target, held, 0.75, 0.1).attacks}["reference"]
    assert 0.4 <= reference.auc <= 0.6 and reference.passed
    # No base model: the held-out median; no held-out rows: the base level itself.
    assert never_seen_targets(None, held, 2) == [statistics.median(held.nll)] * 2
    assert never_seen_targets([easy, hard], None, 2) == [easy, hard]


def test_over_forgetting_is_judged_on_the_calibrated_attack_only():
    """Rows hard for every model (a rare name: high NLL under the base model too) keep a high
    raw loss after retraining from scratch; only their NLL over the base model's says whether
    an erase went past the never-seen level."""
    from eraser.membership import verdict

    held_base = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]
    ratios = [0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]  # the share of its NLL a never-seen row keeps
    held = RowScores([b * r for b, r in zip(held_base, ratios)], [-2.0] * 9, [False] * 9, held_base)
    hard_base = [3.0, 3.1, 3.2]

    def erased(beyond: float) -> RowScores:
        nll = [b * r * beyond for b, r in zip(hard_base, (0.62, 0.72, 0.82))]
        return RowScores(nll, [-9.0] * 3, [False] * 3, hard_base)

    like_retrained = verdict(erased(1.0), held, 0.75, 0.1)
    aucs = {a.name: a.auc for a in like_retrained.attacks}
    assert aucs["loss"] == 0.0 and aucs["mink"] == 0.0  # far below 0.5 - z·se on the raw scores
    assert like_retrained.passed, like_retrained.failures()
    pushed_past = verdict(erased(2.0), held, 0.75, 0.1)
    assert not pushed_past.passed
    assert pushed_past.failures() == ["erased rows over-forgotten (reference MIA AUC 0.000 < 0.170)"]
    # Without a base model the loss attack is the calibrated one and keeps its lower bound.
    plain = lambda s: RowScores(s.nll, s.mink, s.exact, None)  # noqa: E731
    assert not verdict(plain(erased(1.0)), plain(held), 0.75, 0.1).passed


def test_refinement_pulls_rows_pushed_past_the_band_back_to_the_never_seen_level(world):
    """An erased row far above its never-seen target costs Φ like one below it: the natural
    steps bring it back into the band (the line search may step back from past the
    overshoot cap), and a row inside the band costs nothing."""
    from eraser.data import EncodedRows
    from eraser.kfac import KFAC
    from eraser.secondorder import SampledObjective, refine_natural

    model, tok = load(world)
    params = [p for p in model.parameters() if p.requires_grad]
    config = StepConfig()
    objective = SampledObjective(model, tok, params, pairs(world["erased"]), [], pairs(world["retained"][:8]), "cpu",
                                 512, config)
    trained = row_losses(model, tok, pairs(world["erased"]), "cpu")
    objective.forget_targets = [x - 0.6 for x in trained]  # every row 0.6 nats past its target
    start = objective.evaluate()
    assert start.phi > 0 and start.overshoot == pytest.approx(0.6) and 0.6 > config.overshoot
    factors = KFAC.fit(model, params, EncodedRows(tok, pairs(world["retained"]), 512), range(len(world["retained"])))
    done = lambda: (False, "pulled back?", False)  # noqa: E731  (run the step budget)
    refine_natural(params, factors, objective, 8, 10.0, config, 12, 600.0, done)
    end = objective.evaluate()
    # The line search's path moves with rounding (Φ after 12 steps: 0.36-0.47 of the start under
    # per-row losses that differ by 2e-7); a step refused past the cap would leave it at 1.
    assert end.phi < 0.75 * start.phi and end.overshoot < start.overshoot
    inside = SampledObjective(model, tok, params, pairs(world["erased"]), [], [], "cpu", 512, config)
    inside.forget_targets = [x - config.band / 2 for x in end.forget]
    assert inside.evaluate().phi == 0.0


def test_the_influence_step_searches_from_where_the_gaps_close_and_skips_hopeless_trials(world):
    """The influence update's length is controlled by nothing (the adapter is no minimum): its
    line search starts where Φ's linear model along it reaches zero, not at scale 1, and a
    trial whose erased rows overshoot past the cap is refused without scoring the retained
    rows (most of a trial's cost)."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from eraser.secondorder import SampledObjective, controlled_influence_step, line_search

    model, tok = load(world)
    params = [p for p in model.parameters() if p.requires_grad]
    theta = parameters_to_vector(params).detach().clone()
    objective = SampledObjective(model, tok, params, pairs(world["erased"]), [], pairs(world["retained"][:8]), "cpu",
                                 512, StepConfig())
    trained = row_losses(model, tok, pairs(world["erased"]), "cpu")
    objective.forget_targets = [x + 1.0 for x in trained]  # a nat to go on every erased row
    current = objective.evaluate()
    delta = -500.0 * objective.gradient()  # the right way, far too long
    # Less its part along the retained rows' gradient, as refinement's steps are, and a merit that
    # weighs the retained rise by 1, not 10: on an AMD EPYC the rise grew so fast past the first
    # trials (0.27 nats at 1/4 of the start) that the search gave up on ascent after 3 trials, a
    # stop rule this test is not about (merit 0.385 against 0.5 at that trial here).
    retain = objective.retain_gradient(range(8)).double()
    delta = (delta.double() - (delta.double() @ retain) / (retain @ retain) * retain).to(delta.dtype)
    config = StepConfig(anchor_weight=1.0)
    retained_scored = []
    nll = objective._nll
    objective._nll = lambda data: (retained_scored.append(1) if data is objective.retain else None) or nll(data)
    from_one = line_search(params, theta, delta, objective, current, 1.0, 0.3, config)
    trials_from_one, scored_from_one = from_one.trials, len(retained_scored)
    vector_to_parameters(theta, params)
    objective._last, retained_scored[:] = None, []
    record = controlled_influence_step(params, delta, objective, 0.3, config)
    assert 0 < record.scale < 1 and record.phi < current.phi and record.rise <= 0.3
    assert record.trials < trials_from_one, (record.trials, trials_from_one)
    # From scale 1 most trials overshot: refused on the erased rows alone.
    assert scored_from_one < trials_from_one


@pytest.mark.parametrize("a, b", [(0.5, 2.0), (-0.5, 3.0), (0.0, 1.0)])
def test_the_merit_slope_at_zero_comes_from_two_trials(a, b):
    from eraser.secondorder import merit_slope

    f = lambda s: a * s + b * s * s  # noqa: E731
    assert merit_slope(0.01, f(0.01), f(0.02)) == pytest.approx(a, abs=1e-9)


def test_a_search_along_a_direction_that_raises_the_merit_stops_after_three_trials(world):
    """The influence step's direction is not built to descend the merit; where two trials show
    the merit rising along it from the current point, halving on would only score more of the
    retained rows for nothing. The natural steps' search (without the stop) halves to the end."""
    from torch.nn.utils import parameters_to_vector

    from eraser.secondorder import line_search

    params, objective, current = _objective_far_from_targets(world)
    # Forgets (Φ falls along it) but raises the retained rows' NLL ten times as fast.
    forget, retain = -objective.gradient(), objective.retain_gradient(range(8))
    ascent = forget / forget.norm() + 10 * retain / retain.norm()
    theta = parameters_to_vector(params).detach().clone()
    config = StepConfig(backtracks=12)
    stopped = line_search(params, theta, ascent, objective, current, 1e-3, 0.3, config, stop_on_ascent=True)
    full = line_search(params, theta, ascent, objective, current, 1e-3, 0.3, config)
    assert stopped.scale == 0 and full.scale == 0
    assert stopped.trials == 3 and full.trials == 13
    assert torch.equal(parameters_to_vector(params), theta)


def test_the_never_seen_targets_follow_the_held_out_rows_as_the_adapter_moves(world):
    """Refinement moves the held-out rows too; targets fixed at the parent's held-out level
    left a SmolLM2 erase with Φ at zero and the verdict failing. Each check re-targets the
    erased rows at the held-out rows' current advantage, and Φ is scored against that."""
    from eraser.forget import _Checks, _objective, _Rows
    from eraser.secondorder import Judge

    model, tok = load(world)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = _Rows([(r.prompt, r.response) for r in world["erased"]], [], [])
    retain = pairs(world["retained"][:8])
    losses = row_losses(model, tok, retain, "cpu")
    judge = Judge(model, tok, rows.forget, pairs(world["holdout_rows"]), [], "cpu", 512, 8, ENFORCE.max_auc,
                  ENFORCE.min_auc)
    step = StepConfig()
    objective = _objective(model, tok, params, rows, retain, losses, judge, ENFORCE, step, "cpu", 512)
    checks = _Checks(judge, objective, rows, retain, losses, ENFORCE, step, 0.3)
    at_parent = list(objective.forget_targets)
    with torch.no_grad():  # the adapter moves: its LoRA weights shrink by half
        for p in params:
            p.mul_(0.5)
    objective.evaluate()  # scored at the moved adapter against the parent's targets
    checks()
    _, _, held, _ = judge.judge()
    assert objective.forget_targets == judge.targets(held) and objective.forget_targets != at_parent
    point = objective.evaluate()
    gaps = [max(0.0, t - x) + max(0.0, x - t - step.band) for x, t in zip(point.forget, objective.forget_targets)]
    assert point.phi == pytest.approx(0.5 * sum(g * g for g in gaps) / len(gaps))
