"""The one loss definition: mean response-token cross-entropy per row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


# A shared prefix shorter than this is run with the rest: its own forward pass would cost more
# than the rows' repeats of it (batch sizes: docs/defaults.md).
MIN_SHARED_PREFIX = 8


def shared_prefix_length(batch: dict[str, torch.Tensor], limit: int) -> int:
    """How many leading tokens every row of the batch has in common (none of them padding),
    at most ``limit``: a chat template's system turn, which is the same in every row."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    same = ((ids == ids[:1]).all(dim=0) & (mask == 1).all(dim=0))[:limit]
    return int(same.long().cumprod(dim=0).sum())


def _forward(model, batch: dict[str, torch.Tensor], keep: int, shared: int):
    """The model's output over the last ``keep`` positions. With ``shared`` > 0 the common
    prefix is run once and its key/value cache repeated for every row (causal attention: the
    prefix sees only itself, so each row's result is the same as in one pass)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not shared:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:1, :shared], attention_mask=mask[:1, :shared], past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    cache.batch_repeat_interleave(ids.shape[0])
    return model(input_ids=ids[:, shared:], attention_mask=mask, past_key_values=cache, use_cache=True,
                 logits_to_keep=keep)


def response_logits(model, batch: dict[str, torch.Tensor],
                    share_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict each next token, the targets, and per-token loss weights.

    Weights are 1/T_i on the T_i response tokens of row i and 0 elsewhere, so
    ``(weights * token_ce).sum(1)`` is each row's mean response NLL. ``share_prefix`` runs
    the rows' common prefix once (not where forward hooks must see every row's tokens, as
    K-FAC's statistics do).
    """
    # Only from the first position that predicts a response token on: the output layer over
    # the prompt's positions (a large vocabulary times every token) would be thrown away.
    targets = batch["labels"][:, 1:]
    scored = (targets != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(scored[0]) if len(scored) else 0
    width = batch["input_ids"].shape[1] - first
    shared = shared_prefix_length(batch, first) if share_prefix and len(batch["input_ids"]) > 1 else 0
    out = _forward(model, batch, width, shared if shared >= MIN_SHARED_PREFIX else 0)
    logits = out.logits[:, -width:-1, :]
    if logits.dtype in (torch.float16, torch.bfloat16):  # the loss needs full precision
        logits = logits.float()
    targets = targets[:, first:]
    mask = (targets != IGNORE_INDEX).to(logits.dtype)
    weights = mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return logits, targets, weights


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.transpose(1, 2), targets.clamp(min=0), reduction="none"
    )  # clamp: ignored positions carry weight 0 anyway


def per_row_nll(model, batch: dict[str, torch.Tensor], share_prefix: bool = False) -> torch.Tensor:
    """Mean response NLL of each row in the batch, shape [B]."""
    logits, targets, weights = response_logits(model, batch, share_prefix)
    return (token_nll(logits, targets) * weights).sum(dim=1)


def _mean_lowest(values: torch.Tensor, mask: torch.Tensor, share: float) -> torch.Tensor:
    """Per row, the mean of the lowest ``share`` of the masked values (at least one)."""
    big = torch.finfo(values.dtype).max
    filled = torch.where(mask, values, torch.full_like(values, big))
    ordered, _ = filled.sort(dim=1)
    counts = mask.sum(dim=1)
    take = torch.clamp(torch.ceil(counts * share), min=1).to(torch.long)
    keep = torch.arange(values.shape[1], device=values.device)[None, :] < take[:, None]
    return torch.where(keep, ordered, torch.zeros_like(ordered)).sum(dim=1) / take


def row_features(model, batch: dict[str, torch.Tensor], mink_share: float = 0.2,
                 share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """Per row: mean response NLL (with grad when the model has it), Min-K%++ and whether
    teacher-forced argmax reproduces the response exactly (= greedy decoding does).

    Min-K%++ (Zhang et al. 2024): each response token's log-probability standardised by
    the mean and spread of log p under the model's own next-token distribution; a row's
    score is the mean of its lowest ``mink_share`` tokens (higher: more member-like).
    """
    logits, targets, weights = response_logits(model, batch, share_prefix)
    nll = (token_nll(logits, targets) * weights).sum(dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(logits.detach().double(), dim=-1)
        mask = weights > 0
        token_lp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        p = logp.exp()
        mu = (p * logp).sum(-1)
        sigma = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=1e-12).sqrt()
        mink = _mean_lowest((token_lp - mu) / sigma, mask, mink_share)
        hits = (logp.argmax(-1) == targets) | ~mask
        exact = hits.all(dim=1)
    return {"nll": nll, "mink": mink.to(nll.dtype), "exact": exact}


@torch.no_grad()
def row_losses(model, tokenizer, pairs, device, batch_size: int = 8, max_length: int = 512) -> list[float]:
    """Mean response NLL of each (prompt, response) pair, no gradients (no hooks either: the
    rows' common prefix is run once)."""
    from .data import EncodedRows

    if not pairs:
        return []
    data = EncodedRows(tokenizer, pairs, max_length)
    out: list[float] = []
    for _, batch in data.batches(batch_size, device=device):
        out.extend(per_row_nll(model, batch, share_prefix=True).tolist())
    return out


def mean(xs) -> float | None:
    """The mean of a list of losses, None for none."""
    return float(sum(xs) / len(xs)) if len(xs) else None
