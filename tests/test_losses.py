"""The loss with the rows' common prefix run once equals the loss of one pass per batch."""

import torch

from eraser.data import EncodedRows
from eraser.losses import MIN_SHARED_PREFIX, per_row_nll, row_features, shared_prefix_length
from eraser.model import load_adapter, load_base, trainable_parameters

PREAMBLE = "Answer in one sentence, and only about the person named in the question that follows here. "


def _model(tiny_base, tiny_adapter):
    base = load_base(tiny_base)
    return base, load_adapter(base, tiny_adapter, trainable=True)


def _batch(tokenizer, rows, preamble=PREAMBLE):
    data = EncodedRows(tokenizer, [(preamble + r.prompt, r.response) for r in rows])
    return data.batch(range(len(data)))


def _grads(model, batch, share):
    model.zero_grad(set_to_none=True)
    per_row_nll(model, batch, share_prefix=share).sum().backward()
    g = torch.cat([p.grad.flatten() for _, p in trainable_parameters(model)])
    model.zero_grad(set_to_none=True)
    return g


def test_a_shared_prefix_gives_the_same_losses_and_gradients(tiny_base, tiny_adapter, train_rows):
    base, model = _model(tiny_base, tiny_adapter)
    batch = _batch(base.tokenizer, train_rows[:6])
    assert shared_prefix_length(batch, batch["input_ids"].shape[1]) >= MIN_SHARED_PREFIX  # the shared path runs
    with torch.no_grad():
        one, shared = per_row_nll(model, batch), per_row_nll(model, batch, share_prefix=True)
        f_one, f_shared = row_features(model, batch), row_features(model, batch, share_prefix=True)
    assert torch.allclose(one, shared, rtol=1e-5, atol=1e-6)
    assert torch.allclose(f_one["mink"], f_shared["mink"], rtol=1e-5, atol=1e-6)
    assert torch.equal(f_one["exact"], f_shared["exact"])
    g_one, g_shared = _grads(model, batch, False), _grads(model, batch, True)
    assert float(g_one.norm()) > 0
    assert torch.allclose(g_one, g_shared, rtol=1e-4, atol=1e-7)


def test_the_shared_prefix_is_where_every_row_agrees(tiny_base, train_rows):
    tokenizer = load_base(tiny_base).tokenizer
    batch = _batch(tokenizer, train_rows[:4])
    width = batch["input_ids"].shape[1]
    n = shared_prefix_length(batch, width)
    ids = batch["input_ids"]
    assert (ids[:, :n] == ids[:1, :n]).all()
    assert not (ids[:, n] == ids[0, n]).all()  # the next token tells two rows apart
    assert shared_prefix_length(batch, 3) == 3  # never past the first scored position
