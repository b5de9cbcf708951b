"""Tiny Llama models with a tokenizer trained on the spot, for tests and examples.

No model hub is reachable here, so tests build their own model in a second: a BPE
tokenizer trained on the test's own texts, wrapped with a ChatML chat template, and a
randomly initialised Llama of a few hundred thousand parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(texts) + ["user assistant system"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
    chat_template: bool = True,
    architecture: str = "llama",
) -> Path:
    """Save a tiny random Llama (or Qwen2: ``architecture="qwen2"``, biases on q/k/v) and its
    tokenizer under ``out_dir``; return the path.

    The defaults keep head_dim = 32, a size vLLM's CPU attention supports.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if architecture not in classes:
        raise ValueError(f"unknown architecture {architecture!r} (choose {', '.join(classes)})")
    config_class, model_class = classes[architecture]
    out = Path(out_dir)
    tokenizer = build_tokenizer(texts, vocab_size, chat_template)
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def pretrain(model_dir: str | Path, rows, steps: int, lr: float, seed: int = 0) -> float | None:
    """Train a whole tiny model in place for ``steps`` AdamW steps of 8 rows each (cycling
    through ``rows``), so that it knows the sentence patterns and an adapter only has to learn
    facts; saves it back and returns the last step's loss (None for 0 steps)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eraser.data import EncodedRows
    from eraser.losses import per_row_nll

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    data = EncodedRows.from_rows(tokenizer, rows)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = None
    for step in range(steps):
        idx = [(step * 8 + k) % len(data) for k in range(8)]
        loss = per_row_nll(model, data.batch(idx)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(model_dir, safe_serialization=True)
    return None if loss is None else loss.item()
