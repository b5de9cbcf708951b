"""Every solver against the dense direct solve, on a real tiny damped problem."""

from __future__ import annotations

import pytest
import torch

from eraser.curvature import Curvature, Damped, DenseOperator, gradient
from eraser.data import EncodedRows
from eraser.errors import InvalidRequestError, NotConvergedError, ProblemTooLargeError
from eraser.model import load_base, trainable_parameters
from eraser.solvers import CGSolver, DirectSolver, SolverConfig, SQMSolver, dense_matrix, require_converged
from eraser.train import TrainConfig, fit, new_adapter


@pytest.fixture(scope="module")
def problem(tiny_base, train_rows):
    base = load_base(tiny_base, dtype=torch.float64)
    model = new_adapter(base, TrainConfig(rank=1, alpha=2))
    rows = train_rows[:8]
    fit(model, base.tokenizer, rows, TrainConfig(rank=1, alpha=2, epochs=10, lr=1e-2, batch_size=4))
    params = [p for _, p in trainable_parameters(model)]
    data = EncodedRows.from_rows(base.tokenizer, rows)
    op = Damped(Curvature(model, params, data, list(range(len(rows))), "ggn", batch_size=4), 0.05)
    b = gradient(model, params, data, [0, 1]) / len(rows)
    reference = DirectSolver().solve(op, b)
    return op, b, reference


def _close(x, ref):
    cosine = float(torch.nn.functional.cosine_similarity(x, ref, dim=0))
    rel = float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))
    return cosine, rel


def test_direct_is_exact(problem):
    op, b, reference = problem
    # 1e-6: the model's attention softmax runs in float32 even in float64.
    assert reference.converged and reference.residual < 1e-6
    assert reference.iterations == op.n


@pytest.mark.parametrize("solver", [CGSolver(tolerance=1e-6, max_iterations=500), SQMSolver(tolerance=1e-6, iterations=3000)],
                         ids=["cg", "sqm"])
def test_iterative_solvers_agree_with_direct(problem, solver):
    op, b, reference = problem
    result = solver.solve(op, b)
    assert result.converged, result.summary()
    assert result.residual <= 1e-6
    cosine, rel = _close(result.x, reference.x)
    assert cosine > 0.99999 and rel < 1e-4, (cosine, rel)


def test_paper_preset_reports_its_residual_as_it_is(problem):
    op, b, reference = problem
    solver = SolverConfig("sqm", "paper").build()
    assert (solver.lr, solver.iterations, solver.batch_size, solver.x0, solver.weight_decay) == (1e-5, 20, 1, 1e-5, 1e-5)
    # The paper's damping is Adam's weight decay: its residual is measured against H + 1e-5 I.
    result = solver.solve(Damped(op.op, solver.effective_damping(0.05)), b)
    assert result.iterations == 20
    assert not result.converged
    assert 0.1 < result.residual < 10  # reported, not hidden: far from a solution
    # Every coordinate moves at most ~lr per Adam step: 20 steps from 1e-5.
    assert float((result.x - 1e-5).abs().max()) <= 20 * 1e-5 * 1.05
    with pytest.raises(NotConvergedError, match="did not converge"):
        require_converged(result, "sqm", allow_unconverged=False)
    require_converged(result, "sqm", allow_unconverged=True)


def test_cg_stops_on_negative_curvature_and_says_so():
    matrix = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    result = CGSolver(tolerance=1e-8, max_iterations=50).solve(DenseOperator(matrix), torch.ones(3, dtype=torch.float64))
    assert not result.converged
    assert "non-positive curvature" in result.note


def test_direct_refuses_large_problems_with_a_clear_message():
    op = DenseOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(ProblemTooLargeError, match="limited to 5 parameters"):
        DirectSolver(max_params=5).solve(op, torch.ones(10, dtype=torch.float64))


def test_zero_right_hand_side_is_solved_exactly():
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    result = CGSolver().solve(op, torch.zeros(4, dtype=torch.float64))
    assert result.converged and result.iterations == 0 and float(result.x.abs().sum()) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "lbfgs"}, "unknown solver"),
    ({"name": "cg", "preset": "paper"}, "belongs to the sqm solver"),
    ({"name": "sqm", "preset": "fast"}, "unknown preset"),
    ({"name": "cg", "options": {"tolerance": 2.0}}, "tolerance"),
    ({"name": "cg", "options": {"bogus": 1}}, "bad options"),
])
def test_solver_config_is_validated_on_creation(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SolverConfig(**kwargs)


def test_dense_matrix_is_symmetric(problem):
    op, _, _ = problem
    small = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
    m = dense_matrix(small)
    assert torch.equal(m, m.T)


class _DriftingOperator:
    """A dense SPD matrix whose first products are off by a relative 1e-3: the fault that
    float32 products inject into CG's float64 recurrence, made large enough to see."""

    def __init__(self, matrix: torch.Tensor, drifting: int):
        self.matrix, self.n, self.left = matrix, matrix.shape[0], drifting

    def matvec(self, v):
        out = self.matrix @ v
        if self.left > 0:
            self.left -= 1
            out = out * (1 + 1e-3)
        return out


def test_cg_checks_the_true_residual_before_it_stops():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    matrix = q @ torch.diag(torch.linspace(1.0, 50.0, 20, dtype=torch.float64)) @ q.T
    b = torch.randn(20, generator=gen, dtype=torch.float64)
    op = _DriftingOperator(matrix, drifting=10)
    result = CGSolver(tolerance=1e-8, max_iterations=200).solve(op, b)
    true = float(torch.linalg.vector_norm(matrix @ result.x - b) / torch.linalg.vector_norm(b))
    assert result.converged and true <= 1e-8, (result.summary(), true)
    assert abs(result.residual - true) <= 1e-10
    assert "restarted" in result.note
