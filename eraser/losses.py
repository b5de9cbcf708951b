"""The one loss definition: mean response-token cross-entropy per row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def response_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict each next token, the targets, and per-token loss weights.

    Weights are 1/T_i on the T_i response tokens of row i and 0 elsewhere, so
    ``(weights * token_ce).sum(1)`` is each row's mean response NLL.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :]
    if logits.dtype in (torch.float16, torch.bfloat16):  # the loss needs full precision
        logits = logits.float()
    targets = batch["labels"][:, 1:]
    mask = (targets != IGNORE_INDEX).to(logits.dtype)
    weights = mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return logits, targets, weights


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.transpose(1, 2), targets.clamp(min=0), reduction="none"
    )  # clamp: ignored positions carry weight 0 anyway


def per_row_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean response NLL of each row in the batch, shape [B]."""
    logits, targets, weights = response_logits(model, batch)
    return (token_nll(logits, targets) * weights).sum(dim=1)
