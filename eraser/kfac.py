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

Every factor is kept as a *sum over rows* (A, G and the eigenvalue refit), and each row's
labels are sampled from a generator keyed by the row's content hash. So a row's
contribution can be recomputed exactly at the same parameters and subtracted: after an
erase the factors are *downdated* (removed rows out, edited rows in) in one
forward/backward pass over the affected rows, instead of refitted over the whole set.
Being sums, they also shard: processes fit disjoint rows and add their sums after each
pass (``KFAC.fit``'s ``reduce``; ``eraser.distributed`` runs it over torch.distributed).
EK-FAC keeps its eigenbasis through downdates (the refitted diagonal stays exact for the
new row set in that basis); the basis and the parameters grow stale, which is why a full
refit follows once enough rows have changed (``eraser.factors``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import nn

from .curvature import flatten, unflatten
from .data import EncodedRows
from .errors import InvalidRequestError
from .losses import response_logits
from .progress import Progress, silent


@dataclass(frozen=True)
class KFACConfig:
    eigen_correction: bool = True  # EK-FAC; False gives plain K-FAC
    samples: int = 1  # sampled label sets per row
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.samples < 1 or self.batch_size < 1:
            raise InvalidRequestError("samples and batch_size must be at least 1")

    @property
    def method(self) -> str:
        return "ekfac" if self.eigen_correction else "kfac"

    def identity(self) -> dict:
        """What changes the factors (batch size only regroups the same sums)."""
        return {"method": self.method, "samples": self.samples, "seed": self.seed}


@dataclass
class _Block:
    name: str
    module: nn.Linear | None
    A: torch.Tensor  # Σ over response-or-prompt tokens of a aᵀ (in × in)
    G: torch.Tensor  # Σ over rows and samples of g gᵀ (out × out)
    tokens: float = 0.0
    rows: float = 0.0
    QA: torch.Tensor | None = None
    QG: torch.Tensor | None = None
    eigen_sum: torch.Tensor | None = None  # EK-FAC: Σ over rows and samples of (Q_Gᵀ ∇W Q_A)², out × in
    eigen: torch.Tensor | None = None  # the curvature's eigenvalues in the basis (a mean)

    def rebase(self) -> None:
        """Kronecker eigenbasis and eigenvalues from the current sums (plain K-FAC)."""
        ea, self.QA = torch.linalg.eigh(self.A / max(self.tokens, 1.0))
        eg, self.QG = torch.linalg.eigh(self.G / max(self.rows, 1.0))
        self.eigen = eg.clamp(min=0)[:, None] * ea.clamp(min=0)[None, :]


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


class Reducer(Protocol):
    """How processes that each fitted a shard of the rows combine them (``eraser.distributed``).

    Both act in place on a tensor that every process passes in the same order and shape."""

    def sum_(self, t: torch.Tensor) -> None: ...  # the sum over all processes

    def broadcast_(self, t: torch.Tensor) -> None: ...  # the first process's value


def _sum_blocks(blocks: Sequence["_Block"], reduce: Reducer, kronecker: bool) -> None:
    """All blocks' sums of one pass in one reduction: A, G, tokens and rows, or the eigenvalue sums."""
    if kronecker:
        parts = [t for b in blocks for t in (b.A, b.G, torch.tensor([b.tokens, b.rows], dtype=torch.float64,
                                                                        device=b.A.device))]
    else:
        parts = [b.eigen_sum for b in blocks]
    flat = torch.cat([t.reshape(-1) for t in parts]) if parts else torch.zeros(0, dtype=torch.float64)
    reduce.sum_(flat)
    _unpack(flat, parts)
    if kronecker:
        for b, counts in zip(blocks, parts[2::3]):
            b.tokens, b.rows = float(counts[0]), float(counts[1])


def _same_basis(blocks: Sequence["_Block"], reduce: Reducer) -> None:
    """The first process's eigenbasis everywhere, so that every shard's eigenvalue refit is in
    one basis even where eigh could rotate (near-)equal eigenvalues differently."""
    parts = [t for b in blocks for t in (b.QA, b.QG, b.eigen)]
    if parts:
        flat = torch.cat([t.reshape(-1) for t in parts])
        reduce.broadcast_(flat)
        _unpack(flat, parts)


def _unpack(flat: torch.Tensor, parts: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in parts:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _row_generator(seed: int, key: str, sample: int) -> torch.Generator:
    digest = hashlib.sha256(f"eraser.kfac:{seed}:{sample}:{key}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class KFAC:
    """Factors fitted over rows; ``solve(b, damping)`` applies (F + λI)⁻¹ to a flat vector."""

    def __init__(self, blocks: list[_Block], params: Sequence[nn.Parameter] | None, config: KFACConfig,
                 shapes: Sequence[tuple[int, ...]] | None = None):
        self.blocks, self.config = blocks, config
        self.params = list(params) if params is not None else None
        self.shapes = [tuple(p.shape) for p in params] if params is not None else [tuple(s) for s in shapes]
        self.n = sum(int(torch.Size(s).numel()) for s in self.shapes)

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(cls, model, params: Sequence[nn.Parameter], data: EncodedRows, rows: Sequence[int],
            config: KFACConfig = KFACConfig(), device: torch.device | str = "cpu",
            keys: Sequence[str] | None = None, progress: Progress = silent,
            reduce: Reducer | None = None) -> "KFAC":
        """Two streaming passes over ``rows``: the Kronecker sums, then (EK-FAC) the
        eigenvalues refitted in their eigenbasis. ``keys`` (default: the row's position)
        seed each row's sampled labels, so its contribution can later be recomputed.

        ``reduce``: this process fits one shard of the rows (``rows`` and ``keys`` are its
        own, possibly none) and the sums of every pass are added over all processes
        before the eigendecomposition and before the eigenvalue mean, so each process
        ends with the factors of all the rows (``eraser.distributed``)."""
        if not rows and reduce is None:
            raise InvalidRequestError("K-FAC needs at least one row")
        keys = [str(i) for i in range(len(rows))] if keys is None else list(keys)
        if len(keys) != len(rows):
            raise InvalidRequestError("one key per row is needed")
        maps = linear_maps(model, params)
        blocks = [_Block(name, m, torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device),
                         torch.zeros(m.out_features, m.out_features, dtype=torch.float64, device=device))
                  for name, m in maps]
        passes = 2 if config.eigen_correction else 1
        total = passes * -(-len(rows) // config.batch_size)
        done = [0]

        def step():
            done[0] += 1
            progress("factor fit", done[0], total)

        progress("factor fit", 0, total)
        cls._accumulate(model, blocks, data, rows, keys, config, device, sign=1.0, kronecker=True, eigen=False, step=step)
        if reduce is not None:
            _sum_blocks(blocks, reduce, kronecker=True)
        for b in blocks:
            b.rebase()
        if reduce is not None:
            _same_basis(blocks, reduce)
        if config.eigen_correction:
            for b in blocks:
                b.eigen_sum = torch.zeros_like(b.eigen)
            cls._accumulate(model, blocks, data, rows, keys, config, device, sign=1.0, kronecker=False, eigen=True, step=step)
            if reduce is not None:
                _sum_blocks(blocks, reduce, kronecker=False)
            for b in blocks:
                b.eigen = b.eigen_sum / max(b.rows, 1.0)
        return cls(blocks, params, config)

    def downdate(self, model, params: Sequence[nn.Parameter], removed: EncodedRows | None, removed_keys: Sequence[str],
                 added: EncodedRows | None, added_keys: Sequence[str], device: torch.device | str = "cpu") -> None:
        """Subtract the removed rows' contributions and add the added rows', in place.

        Exact when ``model`` is at the parameters the factors were fitted at (each row's
        sampled labels are keyed by ``removed_keys``/``added_keys``, its content hash)."""
        maps = linear_maps(model, params)
        if [n for n, _ in maps] != [b.name for b in self.blocks]:
            raise InvalidRequestError("these factors belong to another adapter layout")
        for b, (_, m) in zip(self.blocks, maps):
            b.module = m
        self.params = list(params)
        for data, keys, sign in ((removed, removed_keys, -1.0), (added, added_keys, 1.0)):
            if data is not None and len(keys):
                self._accumulate(model, self.blocks, data, list(range(len(keys))), list(keys), self.config, device,
                                 sign=sign, kronecker=True, eigen=self.config.eigen_correction, step=lambda: None)
        for b in self.blocks:
            if self.config.eigen_correction:
                # Keep the basis: the refitted diagonal is exact for the new rows in it.
                b.eigen = (b.eigen_sum / max(b.rows, 1.0)).clamp(min=0)
            else:
                b.rebase()

    @property
    def rows(self) -> float:
        return self.blocks[0].rows / self.config.samples if self.blocks else 0.0

    @staticmethod
    def _accumulate(model, blocks, data, rows, keys, config, device, sign: float, kronecker: bool, eigen: bool, step) -> None:
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}

        def keep(i):
            def hook(module, args, out):  # returns None: a value would replace the output
                inputs[i] = args[0].detach()
                out.retain_grad()
                outputs[i] = out
            return hook

        handles = [b.module.register_forward_hook(keep(i)) for i, b in enumerate(blocks)]
        key_of = dict(zip(rows, keys))
        try:
            for chunk, batch in data.batches(config.batch_size, rows, device):
                mask = batch["attention_mask"].to(torch.float64)
                for s in range(config.samples):
                    inputs.clear()
                    outputs.clear()
                    logits, _, weights = response_logits(model, batch)
                    with torch.no_grad():
                        # Labels only where the loss has weight, each row from its own keyed
                        # generator: independent of batching and padding, reproducible per row.
                        sampled = torch.zeros(weights.shape, dtype=torch.long, device=logits.device)
                        for r, row in enumerate(chunk):
                            where = weights[r] > 0
                            probs = torch.softmax(logits[r][where].detach().double(), dim=-1).cpu()
                            draw = torch.multinomial(probs, 1, generator=_row_generator(config.seed, key_of[row], s))
                            sampled[r][where] = draw.view(-1).to(logits.device)
                    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), sampled, reduction="none")
                    (token_loss * weights.sqrt()).sum().backward()
                    for i, b in enumerate(blocks):
                        a = inputs[i].to(torch.float64)  # B × T × in
                        g = outputs[i].grad.to(torch.float64)  # B × T × out
                        if kronecker:
                            m = mask[:, :, None]
                            b.A += sign * torch.einsum("bti,btj->ij", a * m, a) / config.samples
                            b.G += sign * torch.einsum("bto,btp->op", g, g)
                            b.tokens += sign * float(mask.sum()) / config.samples
                            b.rows += sign * a.shape[0]
                        if eigen:
                            per_row = torch.einsum("bto,bti->boi", g, a)
                            b.eigen_sum += sign * ((b.QG.T @ per_row @ b.QA) ** 2).sum(0)
                    model.zero_grad(set_to_none=True)
                step()
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ solving

    def solve(self, b: torch.Tensor, damping: float) -> torch.Tensor:
        if not damping > 0:
            raise InvalidRequestError("K-FAC/EK-FAC need damping > 0 (the factored curvature can be singular)")
        if b.numel() != self.n:
            raise InvalidRequestError(f"these factors cover {self.n} parameters, the adapter has {b.numel()}")
        parts = unflatten(b.to(torch.float64), [torch.empty(s, device="meta") for s in self.shapes])
        out = []
        for blk, v in zip(self.blocks, parts):
            rotated = blk.QG.T @ v.to(blk.QG.device) @ blk.QA
            out.append(blk.QG @ (rotated / (blk.eigen + damping)) @ blk.QA.T)
        return flatten(out).to(b.device, b.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The factored curvature times a flat vector (no damping)."""
        parts = unflatten(v.to(torch.float64), [torch.empty(s, device="meta") for s in self.shapes])
        out = []
        for blk, x in zip(self.blocks, parts):
            rotated = blk.QG.T @ x.to(blk.QG.device) @ blk.QA
            out.append(blk.QG @ (rotated * blk.eigen) @ blk.QA.T)
        return flatten(out).to(v.device, v.dtype)

    def scale_along(self, v: torch.Tensor) -> float:
        """The curvature's Rayleigh quotient along v: what a relative damping is relative to."""
        norm2 = float(v.double() @ v.double())
        return float(v.double() @ self.matvec(v).double()) / norm2 if norm2 > 0 else 0.0

    # ------------------------------------------------------------------ storage

    _TENSORS = ("A", "G", "QA", "QG", "eigen_sum", "eigen")

    def save(self, directory: Path) -> None:
        """Tensors as safetensors plus a JSON header; the caller makes it atomic."""
        from safetensors.torch import save_file

        tensors, header = {}, []
        for i, b in enumerate(self.blocks):
            for name in self._TENSORS:
                t = getattr(b, name)
                if t is not None:
                    tensors[f"{i}.{name}"] = t.detach().cpu().contiguous()
            header.append({"name": b.name, "tokens": b.tokens, "rows": b.rows})
        save_file(tensors, str(directory / "factors.safetensors"))
        (directory / "blocks.json").write_text(json.dumps(
            {"config": asdict(self.config), "shapes": [list(s) for s in self.shapes], "blocks": header}))

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "KFAC":
        from safetensors.torch import load_file

        meta = json.loads((directory / "blocks.json").read_text())
        tensors = load_file(str(directory / "factors.safetensors"), device=str(device))
        blocks = []
        for i, h in enumerate(meta["blocks"]):
            parts = {n: tensors.get(f"{i}.{n}") for n in cls._TENSORS}
            blocks.append(_Block(h["name"], None, tokens=h["tokens"], rows=h["rows"], **parts))
        return cls(blocks, None, KFACConfig(**meta["config"]), shapes=meta["shapes"])
