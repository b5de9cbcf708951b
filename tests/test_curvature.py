"""Curvature products against dense autograd matrices, on a tiny model in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jvp

from eraser.curvature import Curvature, Damped, flatten, gradient
from eraser.data import EncodedRows
from eraser.losses import per_row_nll, response_logits
from eraser.model import load_base, trainable_parameters
from eraser.train import TrainConfig, fit, new_adapter


@pytest.fixture(scope="module")
def setup(tiny_base, train_rows):
    base = load_base(tiny_base, dtype=torch.float64)
    model = new_adapter(base, TrainConfig(rank=2, alpha=4))
    rows = train_rows[:6]
    # Move away from B = 0, where LoRA's Hessian has special structure.
    fit(model, base.tokenizer, rows, TrainConfig(rank=2, alpha=4, epochs=5, lr=1e-2, batch_size=3))
    named = [(n, p) for n, p in trainable_parameters(model)]
    data = EncodedRows.from_rows(base.tokenizer, rows)
    return model, named, data


def _functional(model, named, theta):
    out, offset = {}, 0
    for name, p in named:
        out[name] = theta[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return lambda **kw: functional_call(model, out, (), kw)


def dense_hessian(model, named, batch):
    theta = flatten([p.detach() for _, p in named])
    return torch.autograd.functional.hessian(lambda t: per_row_nll(_functional(model, named, t), batch).mean(), theta)


def dense_ggn(model, named, batch):
    """Jᵀ H_out J with J built column by column in forward mode (independent of the
    double-backward trick the operator uses)."""
    theta = flatten([p.detach() for _, p in named])
    logits_of = lambda t: response_logits(_functional(model, named, t), batch)[0]
    cols = [jvp(logits_of, (theta,), (torch.eye(theta.numel(), dtype=theta.dtype)[j],))[1] for j in range(theta.numel())]
    jac = torch.stack(cols, dim=-1)  # B, T, V, n
    logits, _, weights = response_logits(model, batch)
    p = torch.softmax(logits.detach(), dim=-1)
    b, t, v, n = jac.shape
    jac, p, w = jac.reshape(b * t, v, n), p.reshape(b * t, v, 1), weights.reshape(b * t)
    h_jac = p * jac - p * (p * jac).sum(dim=1, keepdim=True)
    return torch.einsum("kvn,kvm,k->nm", jac, h_jac, w) / b


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_products_equal_the_dense_matrix(setup, kind):
    model, named, data = setup
    params = [p for _, p in named]
    rows = list(range(len(data)))
    dense = (dense_hessian if kind == "hessian" else dense_ggn)(model, named, data.batch(rows))
    # Batches of 4 over 6 rows: the operator must weight uneven batches correctly.
    op = Curvature(model, params, data, rows, kind, batch_size=4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(op.n, generator=gen, dtype=torch.float64)
        got, want = op.matvec(v), dense @ v
        # 1e-6, not 1e-12: Llama's eager attention runs its softmax in float32 even in a
        # float64 model. A wrong product (a missing 1/T weight, a dropped batch) is off by
        # far more.
        assert float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)) < 1e-6
    damped = Damped(op, 0.5)
    want = dense @ v + 0.5 * v
    assert float(torch.linalg.vector_norm(damped.matvec(v) - want) / torch.linalg.vector_norm(want)) < 1e-6


def test_ggn_is_positive_semidefinite_and_the_hessian_is_not_required_to_be(setup):
    model, named, data = setup
    batch = data.batch(list(range(len(data))))
    assert float(torch.linalg.eigvalsh(dense_ggn(model, named, batch)).min()) > -1e-9


def test_gradient_is_the_signed_sum_of_row_gradients(setup):
    model, named, data = setup
    params = [p for _, p in named]
    g = gradient(model, params, data, [0, 3, 5], [1.0, -1.0, 1.0], batch_size=2)
    want = torch.zeros_like(g)
    for row, sign in ((0, 1.0), (3, -1.0), (5, 1.0)):
        loss = per_row_nll(model, data.batch([row])).sum()
        want += sign * flatten(torch.autograd.grad(loss, params))
    assert torch.allclose(g, want, rtol=1e-6, atol=1e-9)
