"""Scoring an adapter on probe rows: response NLL, greedy exact match, membership inference.

Exact match is computed teacher-forced: greedy decoding reproduces a response exactly iff,
at every response token up to and including the end-of-turn token, that token is the
argmax given the tokens before it. One forward pass therefore gives both the NLL and the
greedy exact match of a row; the benchmark checks the equivalence against real greedy
generation (``eraser.evaluate.evaluate_rows``) on the original adapters and records the
agreement. (Generation compares normalised text, so a different tokenisation of the same
words would count there and not here; the recorded agreement shows whether that happens.)
"""

from __future__ import annotations

from typing import Sequence

import torch

from eraser.data import EncodedRows, Row
from eraser.losses import response_logits, token_nll


@torch.no_grad()
def score_rows(model, tokenizer, rows: Sequence[Row], device, batch_size: int = 16,
               max_length: int = 512) -> tuple[list[float], list[bool]]:
    """Per row: mean response NLL and greedy exact match (teacher-forced, see the module doc)."""
    if not rows:
        return [], []
    data = EncodedRows.from_rows(tokenizer, rows, max_length)
    eos = tokenizer.eos_token_id
    nll: list[float] = []
    em: list[bool] = []
    for _, batch in data.batches(batch_size, device=device):
        logits, targets, weights = response_logits(model, batch)
        nll.extend((token_nll(logits, targets) * weights).sum(dim=1).tolist())
        counted = weights > 0
        if eos is not None:
            # Greedy decoding stops at the end-of-turn token: what the template puts after
            # it (a newline) is never generated, so it does not count.
            is_eos = (targets == eos) & counted
            counted &= (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0
        hit = (logits.argmax(dim=-1) == targets) | ~counted
        em.extend(hit.all(dim=1).tolist())
    return nll, em


def summarise(nll: Sequence[float], em: Sequence[bool]) -> dict:
    n = len(nll)
    return {
        "n": n,
        "nll": sum(nll) / n if n else None,
        "exact_match": sum(em) / n if n else None,
    }


def mia_auc(members: Sequence[float], non_members: Sequence[float]) -> float | None:
    """Loss-based membership inference: the attack calls a row a member when its loss is low.

    The AUC is P(loss of a non-member > loss of a member), ties counting one half (the
    Mann-Whitney statistic). 0.5: the two sets are indistinguishable by loss; 1.0: every
    member row has a lower loss than every non-member row.
    """
    if not members or not non_members:
        return None
    wins = 0.0
    for m in members:
        for x in non_members:
            wins += 1.0 if x > m else 0.5 if x == m else 0.0
    return wins / (len(members) * len(non_members))

