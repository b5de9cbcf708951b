"""DataInf (Kwon et al., ICLR 2024): a closed-form inverse for LoRA, block by block.

Per parameter block l the curvature is taken as the empirical Fisher of the per-row
gradients g_il, and its damped inverse is replaced by the mean of rank-one inverses
(Sherman-Morrison on each row's term, then the order of inversion and averaging swapped):

    (1/n Σ g gᵀ + λI)⁻¹ v  ≈  (1/(nλ)) Σ_i [ v − (g_iᵀ v)/(λ + ‖g_i‖²) g_i ]

It needs one gradient per training row and no curvature product, and it is exact only as
λ grows (the swap's error shrinks with λ); the paper presents it as a cheap estimate of
influence, which is how the engine offers it: a comparison beside EK-FAC and CG.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .curvature import flatten, unflatten
from .data import EncodedRows
from .errors import InvalidRequestError
from .losses import per_row_nll
from .progress import Progress, silent


def datainf_solve(model, params: Sequence[torch.nn.Parameter], data: EncodedRows, rows: Sequence[int],
                  b: torch.Tensor, damping: float, device="cpu", progress: Progress = silent) -> torch.Tensor:
    if not damping > 0:
        raise InvalidRequestError("DataInf needs damping > 0")
    if not rows:
        raise InvalidRequestError("DataInf needs at least one training row")
    vs = [v.to(torch.float64) for v in unflatten(b.to(device), params)]
    acc = [torch.zeros_like(v) for v in vs]
    for k, row in enumerate(rows):
        loss = per_row_nll(model, data.batch([row], device)).sum()
        grads = torch.autograd.grad(loss, params)
        for l, (g, v) in enumerate(zip(grads, vs)):
            g = g.to(torch.float64)
            acc[l] += (torch.sum(g * v) / (damping + torch.sum(g * g))) * g
        progress("solve (datainf)", k + 1, len(rows))
    n = len(rows)
    out = [(v - a / n) / damping for v, a in zip(vs, acc)]
    return flatten(out).to(b.dtype)
