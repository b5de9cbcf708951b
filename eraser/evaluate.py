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
def token_logprobs(model, sequences: Sequence[Sequence[int]], device="cpu") -> list[list[float]]:
    """Teacher-forced log p(token i | tokens < i) for i >= 1 of each sequence, in float64.

    This is what a serving engine reports as prompt log-probs for the same token ids, so
    comparing the two tells whether the engine serves these weights.
    """
    out = []
    for ids in sequences:
        x = torch.tensor([list(ids)], device=device)
        logp = model(input_ids=x).logits[0].double().log_softmax(-1)
        out.append(logp[:-1].gather(1, x[0, 1:, None]).squeeze(1).tolist())
    return out


@torch.no_grad()
def greedy_continuation(model, prompt_ids: Sequence[int], max_tokens: int, device="cpu") -> tuple[list[int], list[float]]:
    """Greedy decoding of ``max_tokens`` tokens (end-of-sequence ignored): the token ids
    and the log-probability of each, as a serving engine reports them at temperature 0."""
    ids = list(prompt_ids)
    out_ids, out_lp = [], []
    for _ in range(max_tokens):
        logp = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].double().log_softmax(-1)
        token = int(logp.argmax())
        out_ids.append(token)
        out_lp.append(float(logp[token]))
        ids.append(token)
    return out_ids, out_lp
