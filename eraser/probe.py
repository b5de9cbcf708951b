"""A probe that tells a new version of an adapter from its parent.

A serving engine is confirmed to run the new weights when its greedy answer to the probe
prompt, and that answer's log-probs, match the ones computed here. That proves something
only where the parent's log-probs on the same answer differ by more than the comparison's
tolerance: the probe is the retained row (never erased text) whose answer moves most. The
erase computes it while both parameter sets are at hand, so serving needs no model of its own.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .data import Row, encode, render
from .evaluate import greedy_continuation, token_logprobs

CANDIDATES = 32  # retained rows scored on their full text
SHORTLIST = 4  # of those, the rows whose greedy answers are generated and compared
ANSWER_TOKENS = 8
MAX_TOKENS = 256
SCORE_BATCH = 16  # candidates per forward pass when ranking them


@dataclass(frozen=True)
class VersionProbe:
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # the new version's greedy answer
    answer_logprobs: tuple[float, ...]
    # max |log p_new - log p_parent| over the answer tokens (0 without a parent): a server
    # still on the parent's weights fails a comparison whose tolerance is below it.
    margin: float

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "VersionProbe":
        return cls(tuple(obj["prompt_ids"]), tuple(obj["answer_ids"]), tuple(obj["answer_logprobs"]),
                   float(obj["margin"]))


@contextlib.contextmanager
def holding(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    """Evaluate with ``values`` in place of the parameters' data, then restore them."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    text, _ = render(tokenizer, prompt, None)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(text, add_special_tokens=not has_template)["input_ids"][:MAX_TOKENS]


@torch.no_grad()
def distinguishing_probe(model, tokenizer, rows: Sequence[Row], params: Sequence[torch.Tensor],
                         parent: Sequence[torch.Tensor] | None, device="cpu") -> VersionProbe:
    """The probe among ``rows`` whose greedy answer (under the model's current weights)
    the parent's weights (``parent``, for ``params``) score most differently."""
    rows = list(rows[:CANDIDATES])
    if not rows:
        raise ValueError("a probe needs at least one row")
    shortlist = [0]
    if parent is not None:
        sequences = [encode(tokenizer, r.prompt, r.response, MAX_TOKENS).input_ids for r in rows]
        new = token_logprobs(model, sequences, device, batch=SCORE_BATCH)
        with holding(params, parent):
            old = token_logprobs(model, sequences, device, batch=SCORE_BATCH)
        moved = [max(abs(a - b) for a, b in zip(n, o)) for n, o in zip(new, old)]
        shortlist = sorted(range(len(rows)), key=lambda i: -moved[i])[:SHORTLIST]
    probes = [probe_at(model, prompt_ids(tokenizer, rows[i].prompt), params, parent, device) for i in shortlist]
    return max(probes, key=lambda p: p.margin)  # the first of equals: the most-moved candidate


@torch.no_grad()
def probe_at(model, ids: Sequence[int], params: Sequence[torch.Tensor], parent: Sequence[torch.Tensor] | None,
             device="cpu") -> VersionProbe:
    """The probe at prompt ``ids``: the model's greedy answer, its log-probs, and how far the
    parent's weights score that answer from them."""
    ids = list(ids)
    answer, logprobs = greedy_continuation(model, ids, ANSWER_TOKENS, device)
    margin = 0.0
    if parent is not None:
        with holding(params, parent):
            old = token_logprobs(model, [ids + answer], device)[0][-len(answer):]
        margin = max(abs(a - b) for a, b in zip(logprobs, old))
    return VersionProbe(tuple(ids), tuple(answer), tuple(logprobs), margin)
