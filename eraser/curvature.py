"""Curvature operators over the adapter's trainable parameters.

One small interface, in the spirit of pyDVL's influence operators: an operator knows its
size and multiplies a flat vector. ``Curvature`` is the mean Hessian or Gauss-Newton
matrix of the training loss over a fixed set of rows; ``Damped`` adds λI. Damping is a
property of a view, so changing it never recomputes anything.

All products use plain autograd (double backward), which works for any PEFT module; the
model must use eager attention (see ``model.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence

import torch

from .data import EncodedRows
from .errors import InvalidRequestError
from .losses import per_row_nll, response_logits

CurvatureKind = Literal["hessian", "ggn"]


class LinearOperator(Protocol):
    """A symmetric n×n matrix known only through products."""

    n: int

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


class StochasticOperator(LinearOperator, Protocol):
    """An operator that is a mean over rows and can be sampled one mini-batch at a time."""

    rows: Sequence[int]

    def matvec_rows(self, v: torch.Tensor, rows: Sequence[int]) -> torch.Tensor: ...


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(vec[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


@dataclass(frozen=True)
class CurvatureConfig:
    """Which curvature, over which rows, in what batches, with what damping."""

    kind: CurvatureKind = "ggn"
    damping: float = 0.01
    sample_rows: int | None = None  # None: every training row
    batch_size: int = 4
    seed: int = 0
    # relative: λ = damping × the curvature's Rayleigh quotient along the request's
    # gradient, so that one setting means the same on any model; absolute: λ = damping.
    relative: bool = False

    def __post_init__(self):
        if self.kind not in ("hessian", "ggn"):
            raise InvalidRequestError(f"unknown curvature {self.kind!r} (choose hessian or ggn)")
        if not (self.damping >= 0.0):
            raise InvalidRequestError(f"damping must be >= 0, got {self.damping}")
        if self.sample_rows is not None and self.sample_rows < 1:
            raise InvalidRequestError("sample_rows must be at least 1")
        if self.batch_size < 1:
            raise InvalidRequestError("batch_size must be at least 1")


class Curvature:
    """Mean Hessian or GGN of the per-row loss over ``rows`` of ``data``, at the model's
    current parameters, restricted to ``params``.
    """

    def __init__(
        self,
        model,
        params: Sequence[torch.nn.Parameter],
        data: EncodedRows,
        rows: Sequence[int],
        kind: CurvatureKind = "ggn",
        batch_size: int = 4,
        device: torch.device | str = "cpu",
        on_product: Callable[[], None] | None = None,
    ):
        if not rows:
            raise InvalidRequestError("curvature needs at least one row")
        self.model, self.params, self.data = model, list(params), data
        self.rows = list(rows)
        self.kind, self.batch_size, self.device = kind, batch_size, device
        self.n = sum(p.numel() for p in self.params)
        self.products = 0  # full-operator products, for cost reporting
        self._on_product = on_product

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        out = self.matvec_rows(v, self.rows)
        if self._on_product:
            self._on_product()
        return out

    def matvec_rows(self, v: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Mean curvature of the given rows times v."""
        vs = unflatten(v.to(self.params[0].device, self.params[0].dtype), self.params)
        total = torch.zeros(self.n, dtype=torch.float64, device=self.params[0].device)
        for chunk, batch in self.data.batches(self.batch_size, rows, self.device):
            product = self._hvp(batch, vs) if self.kind == "hessian" else self._ggnvp(batch, vs)
            total += flatten(product).to(torch.float64)
        return (total / len(rows)).to(v.device, v.dtype)

    def _hvp(self, batch, vs):
        loss = per_row_nll(self.model, batch).sum()
        grads = torch.autograd.grad(loss, self.params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        return torch.autograd.grad(dot, self.params)

    def _ggnvp(self, batch, vs):
        # G = Jᵀ H_out J with J = ∂logits/∂θ and H_out the softmax cross-entropy Hessian
        # diag(p) − ppᵀ per token, weighted like the loss. Jv comes from the
        # double-backward trick: Jᵀu is linear in u, so ∂(Jᵀu·v)/∂u = Jv.
        logits, _, weights = response_logits(self.model, batch)
        u = torch.zeros_like(logits, requires_grad=True)
        jt_u = torch.autograd.grad(logits, self.params, grad_outputs=u, create_graph=True)
        (jv,) = torch.autograd.grad(jt_u, u, grad_outputs=vs)
        p = torch.softmax(logits.detach(), dim=-1)
        h_jv = p * (jv - (p * jv).sum(dim=-1, keepdim=True)) * weights.unsqueeze(-1)
        return torch.autograd.grad(logits, self.params, grad_outputs=h_jv)


class Damped:
    """A view of an operator plus λI; the solvers' residuals are measured against it."""

    def __init__(self, op: LinearOperator, damping: float):
        self.op, self.damping, self.n = op, float(damping), op.n

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.op.matvec(v) + self.damping * v

    def matvec_rows(self, v: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        return self.op.matvec_rows(v, rows) + self.damping * v

    @property
    def rows(self) -> Sequence[int] | None:
        return getattr(self.op, "rows", None)


class DenseOperator:
    """A matrix held in memory: used by tests and as the direct solver's reference."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix, self.n = matrix, matrix.shape[0]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return (self.matrix @ v.to(self.matrix.dtype)).to(v.dtype)


def gradient(
    model,
    params: Sequence[torch.nn.Parameter],
    data: EncodedRows,
    rows: Sequence[int],
    signs: Sequence[float] | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Σ_i s_i ∇L_i over the given rows (a sum, not a mean), as one flat vector."""
    signs = [1.0] * len(rows) if signs is None else list(signs)
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)
    position = 0
    for chunk, batch in data.batches(batch_size, rows, device):
        s = torch.tensor(signs[position : position + len(chunk)], device=device, dtype=params[0].dtype)
        position += len(chunk)
        loss = (per_row_nll(model, batch) * s).sum()
        total += flatten(torch.autograd.grad(loss, params)).to(torch.float64)
    return total.to(params[0].dtype)
