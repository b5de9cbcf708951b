"""Evaluation: per-row response NLL, and exact-match recall under greedy decoding."""

from __future__ import annotations

from typing import Sequence

import torch

from .data import Row, render
from .losses import row_losses


def normalise(text: str) -> str:
    return " ".join(text.split()).strip().lower()


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 48, device="cpu") -> str:
    prompt_text, _ = render(tokenizer, prompt, None)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    ids = tokenizer(prompt_text, add_special_tokens=not has_template, return_tensors="pt")["input_ids"].to(device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def evaluate_rows(
    model, tokenizer, rows: Sequence[Row], device="cpu", generate: bool = False, progress=None
) -> dict:
    """``{"mean_nll", "rows": [{"id", "nll"[, "exact_match"]}][, "exact_match_rate"]}``.

    Generated text is compared but never returned: evaluation output may be logged, and
    for erased rows it would carry the very text that was erased.
    """
    nlls = row_losses(model, tokenizer, [(r.prompt, r.response) for r in rows], device)
    out_rows = [{"id": r.id, "nll": nll} for r, nll in zip(rows, nlls)]
    result = {"mean_nll": sum(nlls) / len(nlls), "rows": out_rows}
    if generate:
        hits = 0
        for i, (r, item) in enumerate(zip(rows, out_rows)):
            budget = len(tokenizer(r.response, add_special_tokens=False)["input_ids"]) + 8
            match = normalise(greedy_answer(model, tokenizer, r.prompt, budget, device)) == normalise(r.response)
            item["exact_match"] = match
            hits += match
            if progress:
                progress("generate", i + 1, len(rows))
        result["exact_match_rate"] = hits / len(rows)
    return result


@torch.no_grad()
def token_logprobs(model, sequences: Sequence[Sequence[int]], device="cpu", batch: int = 1) -> list[list[float]]:
    """Teacher-forced log p(token i | tokens < i) for i >= 1 of each sequence, in float64.

    This is what a serving engine reports as prompt log-probs for the same token ids, so
    comparing the two tells whether the engine serves these weights. ``batch`` > 1 scores
    that many sequences per forward pass, right-padded (a causal model's real positions do
    not see the padding): faster, equal to one at a time up to rounding.
    """
    out = []
    for start in range(0, len(sequences), max(1, batch)):
        chunk = [list(ids) for ids in sequences[start:start + max(1, batch)]]
        width = max(len(ids) for ids in chunk)
        x = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(x)
        for i, ids in enumerate(chunk):
            x[i, :len(ids)] = torch.tensor(ids, device=device)
            mask[i, :len(ids)] = 1
        logp = model(input_ids=x, attention_mask=mask).logits.double().log_softmax(-1)
        for i, ids in enumerate(chunk):
            n = len(ids)
            out.append(logp[i, :n - 1].gather(1, x[i, 1:n, None]).squeeze(1).tolist())
    return out


@torch.no_grad()
def greedy_continuation(model, prompt_ids: Sequence[int], max_tokens: int, device="cpu") -> tuple[list[int], list[float]]:
    """Greedy decoding of ``max_tokens`` tokens (end-of-sequence ignored): the token ids
    and the log-probability of each, as a serving engine reports them at temperature 0.
    The prompt is run once and each new token against the cached keys and values."""
    x = torch.tensor([list(prompt_ids)], device=device)
    out_ids, out_lp, past = [], [], None
    for _ in range(max_tokens):
        result = model(input_ids=x, past_key_values=past, use_cache=True)
        past = result.past_key_values
        logp = result.logits[0, -1].double().log_softmax(-1)
        token = int(logp.argmax())
        out_ids.append(token)
        out_lp.append(float(logp[token]))
        x = torch.tensor([[token]], device=device)
    return out_ids, out_lp
