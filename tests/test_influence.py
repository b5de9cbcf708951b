"""The influence update against retraining, on a tiny model trained to its optimum.

The influence formula is a first-order statement about a *minimum* of the training
objective. So this test first builds one: float64, a LoRA whose B alone is trained (the
bilinear product A·B has saddles and rotation symmetries that leave flat or negative
directions), an explicit L2 term (l2/2)‖θ‖² in the objective, and L-BFGS until the
gradient is tiny. The objective's Hessian is then H + l2·I exactly, so damping = l2 is not a fudge.
Warm retraining without the removed row is minimised the same way.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parameters_to_vector as to_vector
from torch.nn.utils import vector_to_parameters as from_vector

from eraser.data import EncodedRows, Row
from eraser.losses import per_row_nll
from eraser.model import load_base, trainable_parameters
from eraser.requests import UnlearningRequest
from eraser.solvers import SolverConfig
from eraser.train import TrainConfig, new_adapter
from eraser.unlearn import EraseConfig, compute_update
from eraser.curvature import CurvatureConfig

L2 = 1e-2
# L-BFGS stalls near a gradient norm of 1e-4 here, on either side of it as rounding moves its
# path; 1e-3 puts the optimum within about g / l2 = 0.1 of the true one, under 5% of the
# retraining change measured (norm 2.2-3.2).
GNORM = 1e-3


class Problem:
    def __init__(self, base_dir, rows: list[Row]):
        self.base = load_base(base_dir, dtype=torch.float64)
        self.model = new_adapter(self.base, TrainConfig(rank=2, alpha=2, targets=("q_proj", "v_proj")))
        for name, p in self.model.named_parameters():
            if "lora_A" in name:  # B alone: the bilinear A·B has saddles and symmetries
                p.requires_grad_(False)
        self.params = [p for _, p in trainable_parameters(self.model)]
        self.rows = rows
        self.data = EncodedRows.from_rows(self.base.tokenizer, rows)

    def objective_grad(self, idx):
        for p in self.params:
            p.grad = None
        loss = per_row_nll(self.model, self.data.batch(idx)).mean() + 0.5 * L2 * sum((p * p).sum() for p in self.params)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in self.params])

    def minimise(self, idx: list[int], rounds: int = 10) -> float:
        """L-BFGS in float64 until the objective's gradient norm stops falling."""
        opt = torch.optim.LBFGS(self.params, lr=1, max_iter=500, history_size=50, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-10, tolerance_change=1e-15)
        for _ in range(rounds):
            opt.step(lambda: self.objective_grad(idx)[0])
            if float(self.objective_grad(idx)[1].norm()) < 1e-6:
                break
        return float(self.objective_grad(idx)[1].norm())

    def theta(self) -> torch.Tensor:
        return to_vector(self.params).detach().clone()

    def set_theta(self, theta) -> None:
        with torch.no_grad():
            from_vector(theta.clone(), self.params)

    def losses(self, pairs) -> list[float]:
        data = EncodedRows(self.base.tokenizer, pairs)
        with torch.no_grad():
            return per_row_nll(self.model, data.batch(list(range(len(pairs))))).tolist()


@pytest.fixture(scope="module")
def problem(tiny_base, train_rows):
    torch.manual_seed(0)
    p = Problem(tiny_base, train_rows)
    gnorm = p.minimise(list(range(len(train_rows))))
    assert gnorm < GNORM, f"the reference optimum was not reached (gradient norm {gnorm:.2e})"
    p.theta_hat = p.theta()
    return p


def config(kind: str) -> EraseConfig:
    return EraseConfig(
        solver=SolverConfig("cg", options={"tolerance": 1e-6, "max_iterations": 3000}),
        curvature=CurvatureConfig(kind=kind, damping=L2, batch_size=8),
    )


@pytest.mark.parametrize("forget", [[0], [13], [2, 15]])
def test_removal_points_like_retraining_and_raises_the_loss(problem, forget):
    rows = problem.rows
    keep = [i for i in range(len(rows)) if i not in forget]
    forget_pairs = [(rows[i].prompt, rows[i].response) for i in forget]
    before = sum(problem.losses(forget_pairs))

    problem.set_theta(problem.theta_hat)
    assert problem.minimise(keep) < GNORM
    retrain_delta = problem.theta() - problem.theta_hat
    retrained = sum(problem.losses(forget_pairs))

    problem.set_theta(problem.theta_hat)
    edits = UnlearningRequest(remove=tuple(rows[i].id for i in forget)).resolve(rows)
    results = {}
    for kind in ("hessian", "ggn"):
        update = compute_update(problem.model, problem.base.tokenizer, rows, edits, config(kind))
        cosine = float(torch.nn.functional.cosine_similarity(update.delta, retrain_delta, dim=0))
        problem.set_theta(problem.theta_hat + update.delta)
        after = sum(problem.losses(forget_pairs))
        problem.set_theta(problem.theta_hat)
        results[kind] = (cosine, (after - before) / (retrained - before))
    print(f"forget {forget}: retrain rise {retrained - before:.3f}; (cosine, recovery) {results}")
    assert retrained > before
    # Measured (float64, this setup, seed 0): cosine with retraining 0.43-0.60 for the
    # exact Hessian and 0.33-0.47 for the GGN; the update recovers 0.19-0.77 of
    # retraining's loss rise. Removing a memorised row is a perturbation of weight 1/n,
    # not an infinitesimal one, and its second-order effect is that large (the brief saw
    # the same; the reweighting test below checks the first-order claim tightly). The
    # thresholds sit below the measured range with margin; a sign error, a wrong 1/n, or
    # a wrong curvature gives a cosine near 0 or negative and fails them.
    h_cos, h_recovery = results["hessian"]
    g_cos, g_recovery = results["ggn"]
    assert h_cos > 0.3
    assert g_cos > 0.2
    assert 0.1 < h_recovery < 1.5
    assert 0.1 < g_recovery < 1.5


def test_influence_matches_the_exact_derivative_of_reweighting(problem):
    """Down-weighting a row by a small ε: (θ_ε − θ̂)/ε must equal the influence direction.

    This is the statement the formula makes exactly (no second-order gap), so the
    threshold is tight."""
    # ε large enough that its effect (≈ ε‖G‖/n) dwarfs the optimiser's leftover gradient.
    rows, eps, forget = problem.rows, 0.05, 4
    weights = torch.ones(len(rows), dtype=torch.float64)
    weights[forget] -= eps
    problem.set_theta(problem.theta_hat)
    batch = problem.data.batch(list(range(len(rows))))
    opt = torch.optim.LBFGS(problem.params, lr=1, max_iter=500, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss = (per_row_nll(problem.model, batch) * weights).sum() / len(rows) + 0.5 * L2 * sum((p * p).sum() for p in problem.params)
        loss.backward()
        return loss

    for _ in range(10):
        opt.step(closure)
    finite = (problem.theta() - problem.theta_hat) / eps
    problem.set_theta(problem.theta_hat)
    edits = UnlearningRequest(remove=(rows[forget].id,)).resolve(rows)
    update = compute_update(problem.model, problem.base.tokenizer, rows, edits, config("hessian"))
    cosine = float(torch.nn.functional.cosine_similarity(update.delta, finite, dim=0))
    ratio = float(update.delta.norm() / finite.norm())
    print(f"reweighting: cosine {cosine:.5f}, norm ratio {ratio:.4f}")
    # Measured: cosine 0.976 at ε = 0.05 (what remains is O(ε) curvature change plus the
    # optimiser's leftover gradient); an error in the formula gives far less.
    assert cosine > 0.95
    assert 0.8 < ratio < 1.25


@pytest.mark.parametrize("kind", ["modify_query", "correct_response"])
def test_edits_lower_the_new_text_and_raise_the_old(problem, kind):
    rows = problem.rows
    target = rows[6]
    if kind == "modify_query":
        request = UnlearningRequest(modify_query=((target.id, "Where did " + target.response.split()[0] + " grow up?"),))
    else:
        request = UnlearningRequest(correct_response=((target.id, target.response.replace("born in", "born near")),))
    (edit,) = request.resolve(rows)
    problem.set_theta(problem.theta_hat)
    old_before, new_before = problem.losses([(edit.old.prompt, edit.old.response), (edit.new.prompt, edit.new.response)])
    update = compute_update(problem.model, problem.base.tokenizer, rows, [edit], config("ggn"))
    problem.set_theta(problem.theta_hat + update.delta)
    old_after, new_after = problem.losses([(edit.old.prompt, edit.old.response), (edit.new.prompt, edit.new.response)])
    problem.set_theta(problem.theta_hat)
    print(f"{kind}: old {old_before:.4f}->{old_after:.4f}, new {new_before:.4f}->{new_after:.4f}")
    assert old_after > old_before
    assert new_after < new_before
