"""Fine-tuning PEFT adapters: from scratch, or warm-started from an existing adapter.

Used to make the adapters that get erased, and to retrain without the erased rows,
which is the reference that erasure is judged against (brief, section 3).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .data import EncodedRows, Row, load_rows, text_sha256
from .errors import InvalidRequestError
from .losses import per_row_nll
from .model import LoadedBase, check_adapter_dir, load_adapter, load_base, resolve_device, save_adapter_atomically, trainable_parameters
from .progress import Progress, silent

PEFT_TYPES = ("lora", "dora", "ia3", "loha", "lokr")


@dataclass(frozen=True)
class TrainConfig:
    peft: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    weight_decay: float = 0.0
    max_length: int = 512

    def __post_init__(self):
        if self.peft not in PEFT_TYPES:
            raise InvalidRequestError(f"unknown PEFT type {self.peft!r} (choose {', '.join(PEFT_TYPES)})")
        if self.rank < 1 or self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise InvalidRequestError("rank, batch size must be >= 1, epochs >= 0, lr > 0, weight decay >= 0")
        if not self.targets or not all(self.targets):
            raise InvalidRequestError("targets must name at least one module")


def peft_config(cfg: TrainConfig):
    import peft

    targets = list(cfg.targets)
    # Dropout stays 0: influence needs the loss to be a deterministic function of θ.
    if cfg.peft in ("lora", "dora"):
        return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=0.0,
                               use_dora=cfg.peft == "dora", task_type="CAUSAL_LM")
    if cfg.peft == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=[], task_type="CAUSAL_LM")
    if cfg.peft == "loha":
        return peft.LoHaConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=targets, task_type="CAUSAL_LM")
    return peft.LoKrConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=targets, task_type="CAUSAL_LM")


def new_adapter(base: LoadedBase, cfg: TrainConfig):
    import peft

    torch.manual_seed(cfg.seed)  # the adapter's random init (LoRA's A) is part of "same init"
    try:
        model = peft.get_peft_model(base.model, peft_config(cfg))
    except ValueError as e:
        raise InvalidRequestError(f"cannot attach a {cfg.peft} adapter: {str(e).splitlines()[0]}") from None
    model.eval()
    return model


def fit(
    model,
    tokenizer,
    rows: Sequence[Row],
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    progress: Progress = silent,
) -> list[float]:
    """AdamW on the mean response NLL; returns the mean loss of each epoch."""
    params = [p for _, p in trainable_parameters(model)]
    data = EncodedRows.from_rows(tokenizer, rows, cfg.max_length)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    steps_per_epoch = -(-len(data) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    history, step = [], 0
    for _ in range(cfg.epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        losses = []
        for _, batch in data.batches(cfg.batch_size, order, device):
            loss = per_row_nll(model, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            progress("train", step, total, {"loss": losses[-1]})
        history.append(sum(losses) / len(losses))
    return history


def train(
    base_dir: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig = TrainConfig(),
    init_adapter: str | Path | None = None,
    device: str | None = "cpu",
    progress: Progress = silent,
) -> dict:
    """Train an adapter on a JSONL dataset and write it to ``out_dir`` (atomically)."""
    started = time.perf_counter()
    rows = load_rows(data_path)
    if init_adapter is not None:
        check_adapter_dir(init_adapter)
    out = Path(out_dir)
    if out.exists():
        from .errors import OutputExistsError

        raise OutputExistsError(f"output already exists: {out}")
    dev = resolve_device(device)
    base = load_base(base_dir, dev)
    model = load_adapter(base, init_adapter, trainable=True) if init_adapter else new_adapter(base, cfg)
    history = fit(model, base.tokenizer, rows, cfg, dev, progress)
    meta = {
        "base_model_fingerprint": base.fingerprint,
        "produced_by": "eraser train",
        "train_config": {**asdict(cfg), "targets": list(cfg.targets)},
        "warm_start": bool(init_adapter),
        "dataset_sha256": text_sha256("\n".join(r.id + "\x00" + r.sha256() for r in rows)),
    }
    save_adapter_atomically(model, out, meta)
    return {
        "adapter_out": str(out),
        "rows": len(rows),
        "epochs": cfg.epochs,
        "loss_per_epoch": history,
        "parameters": sum(p.numel() for _, p in trainable_parameters(model)),
        "seconds": round(time.perf_counter() - started, 3),
    }
