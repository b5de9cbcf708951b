"""The loss with the rows' common prefix run once equals the loss of one pass per batch."""

import pytest
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


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_the_shared_prefix_holds_on_other_architectures(arch):
    """A user's base need not be a Llama: the cache the shared prefix fills is the model's own."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        model, targets = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=2,
                                                    bos_token_id=0, eos_token_id=0)), ["c_attn"]
    else:
        model, targets = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      num_key_value_heads=1)), ["q_proj", "v_proj"]
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(model, lora).eval()  # no dropout: both passes see the same network
    prefix, width = torch.randint(5, 300, (12,)), 25
    ids, labels, mask = [], [], []
    for n in (10, 13, 8, 11):  # right-padded rows of different lengths after a common prefix
        row = torch.cat([prefix, torch.randint(5, 300, (n,))])
        pad = width - len(row)
        ids.append(torch.cat([row, torch.zeros(pad, dtype=torch.long)]))
        label = torch.full((width,), -100)
        label[16:len(row)] = row[16:]
        labels.append(label)
        mask.append(torch.cat([torch.ones(len(row), dtype=torch.long), torch.zeros(pad, dtype=torch.long)]))
    batch = {"input_ids": torch.stack(ids), "labels": torch.stack(labels), "attention_mask": torch.stack(mask)}
    assert shared_prefix_length(batch, width) == 12
    with torch.no_grad():
        one, shared = per_row_nll(model, batch), per_row_nll(model, batch, share_prefix=True)
    assert torch.allclose(one, shared, rtol=1e-5, atol=1e-6)
