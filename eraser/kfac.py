"""K-FAC and EK-FAC curvature over the adapter's linear maps (LoRA's A and B).

The mean Gauss-Newton matrix of the training loss is approximated block-diagonally, one
block per linear map W (out × in), each a Kronecker product A ⊗ G of the input second
moment A = E[a aᵀ] and the output-gradient second moment G (George et al. 2018, EK-FAC;
Grosse et al. 2023 for LLM influence). EK-FAC keeps the Kronecker eigenbasis
Q_G ⊗ Q_A but refits the eigenvalues to the per-row gradients,
Λ*_ij = mean_n (Q_Gᵀ ∇W_n Q_A)_ij², the exact diagonal of the curvature in that basis.
A solve is then two small matrix products per map: (F + λI)⁻¹ V = Q_G [(Q_Gᵀ V Q_A) / (Λ + λ)] Q_Aᵀ.

Gradients come from labels sampled from the model's own predictive distribution (the
"true" Fisher, an unbiased estimate of the Gauss-Newton matrix of the NLL), with each
row's token weights w_t entering as √w_t so that E[g gᵀ] equals the row's GGN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .curvature import flatten, unflatten
from .data import EncodedRows
from .errors import InvalidRequestError
from .losses import response_logits


@dataclass(frozen=True)
class KFACConfig:
    eigen_correction: bool = True  # EK-FAC; False gives plain K-FAC
    samples: int = 1  # sampled label sets per row
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.samples < 1 or self.batch_size < 1:
            raise InvalidRequestError("samples and batch_size must be at least 1")


@dataclass
class _Block:
    name: str
    module: nn.Linear
    A: torch.Tensor  # in × in
    G: torch.Tensor  # out × out
    tokens: float = 0.0
    rows: float = 0.0
    QA: torch.Tensor | None = None
    QG: torch.Tensor | None = None
    eigen: torch.Tensor | None = None  # out × in
    correction: torch.Tensor | None = None


def linear_maps(model: nn.Module, params: Sequence[nn.Parameter]) -> list[tuple[str, nn.Linear]]:
    """The bias-free linear modules owning each trainable parameter, in parameter order."""
    owner = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            owner[id(module.weight)] = (name, module)
    out = []
    for p in params:
        if id(p) not in owner or owner[id(p)][1].bias is not None and owner[id(p)][1].bias.requires_grad:
            raise InvalidRequestError("K-FAC/EK-FAC support adapters made only of linear maps (LoRA), not this one")
        out.append(owner[id(p)])
    return out


class KFAC:
    """Factors fitted over rows; ``solve(b, damping)`` applies (F + λI)⁻¹ to a flat vector."""

    def __init__(self, blocks: list[_Block], params: Sequence[nn.Parameter], config: KFACConfig):
        self.blocks, self.params, self.config = blocks, list(params), config
        self.n = sum(p.numel() for p in params)

    @classmethod
    def fit(cls, model, params: Sequence[nn.Parameter], data: EncodedRows, rows: Sequence[int],
            config: KFACConfig = KFACConfig(), device: torch.device | str = "cpu") -> "KFAC":
        maps = linear_maps(model, params)
        blocks = [_Block(name, m, torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device),
                         torch.zeros(m.out_features, m.out_features, dtype=torch.float64, device=device))
                  for name, m in maps]
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
        # Pass 1: Kronecker factors. Pass 2 (EK-FAC): eigenvalues refitted to per-row gradients.
        cls._accumulate(model, blocks, data, rows, config, device, generator, stage="factors")
        for b in blocks:
            b.A /= max(b.tokens, 1.0)
            b.G /= max(b.rows, 1.0)
            ea, b.QA = torch.linalg.eigh(b.A)
            eg, b.QG = torch.linalg.eigh(b.G)
            b.eigen = eg.clamp(min=0)[:, None] * ea.clamp(min=0)[None, :]
        if config.eigen_correction:
            for b in blocks:
                b.correction = torch.zeros_like(b.eigen)
            generator = torch.Generator(device="cpu").manual_seed(config.seed + 1)
            cls._accumulate(model, blocks, data, rows, config, device, generator, stage="correction")
            for b in blocks:
                b.eigen = b.correction / (len(rows) * config.samples)
                b.correction = None
        return cls(blocks, params, config)

    @staticmethod
    def _accumulate(model, blocks, data, rows, config, device, generator, stage: str) -> None:
        inputs: dict[int, torch.Tensor] = {}
        handles = []
        for i, b in enumerate(blocks):
            def keep_input(module, args, out, i=i):
                inputs[i] = args[0].detach()

            handles.append(b.module.register_forward_hook(keep_input))
        try:
            for _, batch in data.batches(config.batch_size, rows, device):
                mask = batch["attention_mask"].to(torch.float64)
                for _ in range(config.samples):
                    inputs.clear()
                    outputs = {}
                    def keep_output(i):
                        def hook(module, args, out):  # returns None: a value would replace the output
                            out.retain_grad()
                            outputs[i] = out
                        return hook

                    out_handles = [b.module.register_forward_hook(keep_output(i)) for i, b in enumerate(blocks)]
                    try:
                        logits, _, weights = response_logits(model, batch)
                    finally:
                        for h in out_handles:
                            h.remove()
                    with torch.no_grad():
                        probs = torch.softmax(logits.detach().double(), dim=-1)
                        flat = probs.reshape(-1, probs.shape[-1]).cpu()
                        sampled = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1]).to(logits.device)
                    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), sampled, reduction="none")
                    (token_loss * weights.sqrt()).sum().backward()
                    for i, b in enumerate(blocks):
                        a = inputs[i].to(torch.float64)  # B × T × in
                        g = outputs[i].grad.to(torch.float64)  # B × T × out
                        if stage == "factors":
                            m = mask[:, :, None]
                            b.A += torch.einsum("bti,btj->ij", a * m, a)
                            b.G += torch.einsum("bto,btp->op", g, g)
                            b.tokens += float(mask.sum())
                            b.rows += a.shape[0]
                        else:
                            per_row = torch.einsum("bto,bti->boi", g, a)
                            rotated = b.QG.T @ per_row @ b.QA
                            b.correction += (rotated ** 2).sum(0)
                    model.zero_grad(set_to_none=True)
        finally:
            for h in handles:
                h.remove()
        for b in blocks:
            if stage == "factors":
                b.rows /= config.samples
                b.tokens /= config.samples
                b.A /= config.samples
                b.G /= config.samples

    def solve(self, b: torch.Tensor, damping: float) -> torch.Tensor:
        if not damping > 0:
            raise InvalidRequestError("K-FAC/EK-FAC need damping > 0 (the factored curvature can be singular)")
        parts = unflatten(b.to(torch.float64), self.params)
        out = []
        for blk, v in zip(self.blocks, parts):
            rotated = blk.QG.T @ v.to(blk.QG.device) @ blk.QA
            out.append(blk.QG @ (rotated / (blk.eigen + damping)) @ blk.QA.T)
        return flatten(out).to(b.dtype)
