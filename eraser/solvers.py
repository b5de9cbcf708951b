"""Solvers for (H + λI) x = b behind one interface.

Every solver returns the solution, its iteration count, the relative residual
‖(H+λI)x − b‖ / ‖b‖ measured with one extra true product (never a recurrence estimate),
and whether it met its tolerance. ``direct`` is the dense reference every other solver
is tested against.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Protocol

import torch

from .curvature import Damped, LinearOperator
from .errors import InvalidRequestError, NotConvergedError, ProblemTooLargeError
from .options import SOLVERS

Progress = Callable[[int, int, float | None], None]  # (iteration, max_iterations, residual)


@dataclass(frozen=True)
class SolveResult:
    x: torch.Tensor
    iterations: int
    residual: float
    converged: bool
    tolerance: float
    seconds: float
    note: str = ""

    def summary(self) -> dict:
        return {
            "iterations": self.iterations,
            "residual": self.residual,
            "converged": self.converged,
            "tolerance": self.tolerance,
            "note": self.note,
        }


class Solver(Protocol):
    name: str

    def solve(self, op: Damped, b: torch.Tensor, progress: Progress | None = None) -> SolveResult: ...


def relative_residual(op: LinearOperator, x: torch.Tensor, b: torch.Tensor) -> float:
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(op.matvec(x) - b)) / bnorm


@dataclass(frozen=True)
class DirectSolver:
    """Materialise H + λI column by column and solve it densely in float64."""

    max_params: int = 4096
    tolerance: float = 1e-6
    name: str = "direct"

    def __post_init__(self):
        if self.max_params < 1:
            raise InvalidRequestError("max_params must be positive")

    def solve(self, op, b, progress=None):
        if op.n > self.max_params:
            raise ProblemTooLargeError(
                f"the direct solver materialises the {op.n}x{op.n} curvature matrix; it is limited to "
                f"{self.max_params} parameters (use --solver cg)"
            )
        start = time.perf_counter()
        matrix = dense_matrix(op, progress, dtype=b.dtype, device=b.device)
        x = torch.linalg.solve(matrix, b.to(torch.float64)).to(b.dtype)
        res = relative_residual(op, x, b)
        return SolveResult(x, op.n, res, res <= self.tolerance, self.tolerance, time.perf_counter() - start)


def dense_matrix(op: LinearOperator, progress: Progress | None = None, dtype=torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The operator as a symmetric float64 matrix (n products of unit vectors)."""
    cols = []
    eye = torch.zeros(op.n, dtype=dtype, device=device)
    for j in range(op.n):
        eye.zero_()
        eye[j] = 1.0
        cols.append(op.matvec(eye).to(torch.float64).clone())
        if progress:
            progress(j + 1, op.n, None)
    m = torch.stack(cols, dim=1)
    return 0.5 * (m + m.T)  # products are symmetric up to rounding


@dataclass(frozen=True)
class CGSolver:
    """Conjugate gradient on the damped operator: the precise default.

    It needs a positive definite operator: GGN plus damping always is; the Hessian may
    not be, and a direction of non-positive curvature stops the solve unconverged.
    """

    tolerance: float = 1e-3
    max_iterations: int = 200
    name: str = "cg"

    def __post_init__(self):
        if not (0 < self.tolerance < 1):
            raise InvalidRequestError("cg tolerance must be in (0, 1)")
        if self.max_iterations < 1:
            raise InvalidRequestError("cg max_iterations must be at least 1")

    def solve(self, op, b, progress=None):
        start = time.perf_counter()
        b64 = b.to(torch.float64)
        bnorm = float(torch.linalg.vector_norm(b64))
        x = torch.zeros_like(b64)
        if bnorm == 0.0:
            return SolveResult(x.to(b.dtype), 0, 0.0, True, self.tolerance, 0.0)
        r = b64.clone()
        p = r.clone()
        rr = float(r @ r)
        note, it, restarts, res = "", 0, 0, None
        while it < self.max_iterations:
            it += 1
            ap = op.matvec(p.to(b.dtype)).to(torch.float64)
            pap = float(p @ ap)
            if pap <= 0.0:
                note = "non-positive curvature met: use curvature=ggn or a larger damping"
                it -= 1
                break
            alpha = rr / pap
            x += alpha * p
            r -= alpha * ap
            rr_new = float(r @ r)
            estimate = math.sqrt(rr_new) / bnorm
            if progress:
                progress(it, self.max_iterations, estimate)
            if estimate <= self.tolerance:
                # The recurrence drifts from the true residual when products are float32:
                # stop only on the true one, else restart from it (one product each time).
                true_r = b64 - op.matvec(x.to(b.dtype)).to(torch.float64)
                res = float(torch.linalg.vector_norm(true_r)) / bnorm
                if res <= self.tolerance:
                    break
                res, restarts = None, restarts + 1
                r, p = true_r, true_r.clone()
                rr = float(r @ r)
                continue
            p = r + (rr_new / rr) * p
            rr = rr_new
        x_out = x.to(b.dtype)
        if res is None:
            res = relative_residual(op, x_out, b)
        if restarts:
            note = (note + "; " if note else "") + f"restarted {restarts}x from the true residual"
        return SolveResult(x_out, it, res, res <= self.tolerance, self.tolerance, time.perf_counter() - start, note)


@dataclass(frozen=True)
class SQMSolver:
    """Stochastic minimisation of ½ xᵀ(H+λI)x − bᵀx, as the LLMEraser paper does.

    Each step takes one curvature product on a mini-batch of rows and one optimiser step
    on the quadratic. The ``paper`` preset copies the official code: Adam, lr 1e-5, 20
    steps, batch 1, x₀ = 1e-5, and damping only through Adam's weight decay 1e-5. Those
    settings move each coordinate by at most about 2e-4, so the solve is far from
    converged; the reported residual says so.

    The default settings converge instead: full batches and heavy-ball momentum with the
    optimal step for a quadratic whose spectrum lies in [λ, L], where λ is the damping
    (the GGN is positive semi-definite) and L is estimated by power iteration. That takes
    about √(L/λ)·log(1/tol) products, the same order as CG.
    """

    optimizer: Literal["heavyball", "adam", "sgd"] = "heavyball"
    lr: float | None = None  # None: from the spectrum estimate (heavyball) or 1e-3
    iterations: int = 1000
    batch_size: int | None = None  # None: every row each step (deterministic)
    x0: float = 0.0
    weight_decay: float = 0.0  # Adam's L2 term; the paper's only damping
    check_every: int = 10  # true residual every so many steps, to stop early (0: never)
    tolerance: float = 1e-3
    power_iterations: int = 20
    seed: int = 0
    preset: str | None = None
    name: str = "sqm"

    def __post_init__(self):
        if self.optimizer not in ("heavyball", "adam", "sgd"):
            raise InvalidRequestError(f"unknown sqm optimizer {self.optimizer!r} (heavyball, adam or sgd)")
        if (self.lr is not None and self.lr <= 0) or self.iterations < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise InvalidRequestError("sqm needs lr > 0, iterations >= 1, batch_size >= 1")

    @classmethod
    def paper(cls) -> "SQMSolver":
        return cls(optimizer="adam", lr=1e-5, iterations=20, batch_size=1, x0=1e-5, weight_decay=1e-5,
                   check_every=0, preset="paper")

    @property
    def max_iterations(self) -> int:
        return self.iterations

    def effective_damping(self, requested: float) -> float:
        """The paper's damping is Adam's weight decay; otherwise the operator's λ."""
        return self.weight_decay if self.preset == "paper" else requested

    def solve(self, op, b, progress=None):
        start = time.perf_counter()
        rng = random.Random(self.seed)
        rows = getattr(op, "rows", None)
        # With the paper preset λ lives in Adam's weight decay, not in the product.
        product_op = op.op if self.preset == "paper" and isinstance(op, Damped) else op

        def product(x: torch.Tensor) -> torch.Tensor:
            if self.batch_size is None or rows is None:
                return product_op.matvec(x)
            return product_op.matvec_rows(x, rng.sample(list(rows), min(self.batch_size, len(rows))))

        x = torch.full_like(b, self.x0)
        if self.optimizer == "heavyball":
            mu = getattr(op, "damping", 0.0)
            big = 1.1 * _largest_eigenvalue(op, b, self.power_iterations, self.seed)
            if self.lr is not None:
                step, momentum = self.lr, 0.9
            elif mu > 0:
                step = 4.0 / (math.sqrt(big) + math.sqrt(mu)) ** 2
                momentum = ((math.sqrt(big) - math.sqrt(mu)) / (math.sqrt(big) + math.sqrt(mu))) ** 2
            else:
                step, momentum = 1.0 / big, 0.0
            opt = torch.optim.SGD([x.requires_grad_()], lr=step, momentum=momentum, dampening=momentum)
        elif self.optimizer == "adam":
            opt = torch.optim.Adam([x.requires_grad_()], lr=self.lr or 1e-3, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD([x.requires_grad_()], lr=self.lr or 1e-3, weight_decay=self.weight_decay)
        residual, it = None, 0
        for it in range(1, self.iterations + 1):
            hx = product(x.detach())
            opt.zero_grad()
            x.grad = hx - b  # the gradient of ½xᵀAx − bᵀx
            opt.step()
            if self.check_every and it % self.check_every == 0:
                residual = relative_residual(op, x.detach(), b)
                if residual <= self.tolerance:
                    break
            if progress:
                progress(it, self.iterations, residual)
        x_out = x.detach()
        res = relative_residual(op, x_out, b)
        return SolveResult(x_out, it, res, res <= self.tolerance, self.tolerance, time.perf_counter() - start,
                           "paper preset: unconverged by design" if self.preset == "paper" else "")


def _largest_eigenvalue(op: LinearOperator, like: torch.Tensor, iterations: int, seed: int) -> float:
    """Power iteration: the step size of a first-order method must stay below 2/L."""
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same start on any device
    v = torch.randn(op.n, generator=gen, dtype=like.dtype).to(like.device)
    v /= torch.linalg.vector_norm(v)
    value = 0.0
    for _ in range(max(1, iterations)):
        w = op.matvec(v)
        value = float(v @ w)
        norm = torch.linalg.vector_norm(w)
        if norm == 0:
            return max(value, 1e-12)
        v = w / norm
    return max(value, float(torch.linalg.vector_norm(op.matvec(v))), 1e-12)


FACTORED = ("ekfac", "kfac", "datainf")


@dataclass(frozen=True)
class FactoredSolver:
    """A closed-form solve against an approximated curvature instead of iterating on H.

    ``ekfac``/``kfac``: Kronecker factors over LoRA's linear maps (``eraser.kfac``), fitted
    once per adapter version and cached (``eraser.factors``); ``datainf``: DataInf's
    rank-one closed form per parameter block (``eraser.datainf``), one gradient pass over
    the training rows per solve. ``residual_rows`` > 0 measures the relative residual
    against the exact damped curvature on that many training rows (one product); 0 skips
    it, since that product would cost more than the whole fast solve.
    """

    name: str = "ekfac"
    samples: int = 1
    batch_size: int = 4
    seed: int = 0
    residual_rows: int = 0

    def __post_init__(self):
        if self.name not in FACTORED:
            raise InvalidRequestError(f"unknown factored solver {self.name!r}")
        if self.samples < 1 or self.batch_size < 1 or self.residual_rows < 0:
            raise InvalidRequestError("samples and batch_size must be >= 1, residual_rows >= 0")

    def kfac_config(self):
        from .kfac import KFACConfig

        return KFACConfig(eigen_correction=self.name == "ekfac", samples=self.samples,
                          batch_size=self.batch_size, seed=self.seed)


@dataclass(frozen=True)
class SolverConfig:
    """What the CLI and the sidecar pass in: a solver name, a preset, and overrides."""

    name: Literal["direct", "cg", "sqm", "ekfac", "kfac", "datainf"] = "cg"
    preset: str | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in SOLVERS:
            raise InvalidRequestError(f"unknown solver {self.name!r} (choose {', '.join(SOLVERS)})")
        if self.preset not in (None, "paper"):
            raise InvalidRequestError(f"unknown preset {self.preset!r} (the only preset is 'paper')")
        if self.preset == "paper" and self.name != "sqm":
            raise InvalidRequestError("the 'paper' preset belongs to the sqm solver (use --solver sqm --preset paper)")
        self.build()  # validate options now, not halfway through an erase

    def build(self) -> Solver:
        try:
            if self.name == "direct":
                return DirectSolver(**self.options)
            if self.name == "cg":
                return CGSolver(**self.options)
            if self.name in FACTORED:
                return FactoredSolver(self.name, **self.options)
            base = SQMSolver.paper() if self.preset == "paper" else SQMSolver()
            return replace(base, **self.options)
        except TypeError as e:
            raise InvalidRequestError(f"bad options for solver {self.name}: {e}") from None


def require_converged(result: SolveResult, solver: str, allow_unconverged: bool) -> None:
    if not result.converged and not allow_unconverged:
        extra = f" ({result.note})" if result.note else ""
        raise NotConvergedError(
            f"{solver} solve did not converge: relative residual {result.residual:.3g} > tolerance "
            f"{result.tolerance:.3g} after {result.iterations} iterations{extra}; raise the damping or the "
            f"iteration limit, or allow unconverged solves explicitly",
            result,
        )
