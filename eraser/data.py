"""Training rows: loading, validation, rendering through the chat template, batching.

A row is ``{"id": str, "prompt": str, "response": str}``. The loss of a row is the mean
token cross-entropy of its response tokens (the prompt is context only). That one
definition is used by training, evaluation and influence alike, so a row's loss does
not depend on which batch it sits in.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Row:
    id: str
    prompt: str
    response: str

    def to_json(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "response": self.response}

    def sha256(self) -> str:
        """Content hash recorded in place of the text wherever text must not be kept."""
        return text_sha256(self.prompt + "\x00" + self.response)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_row(obj: object, where: str) -> Row:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with id, prompt, response")
    missing = [k for k in ("id", "prompt", "response") if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in ("id", "prompt", "response"):
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string")
    if not obj["id"]:
        raise DataError(f"{where}: empty id")
    if not obj["response"].strip():
        raise DataError(f"{where}: empty response (a row needs response tokens to have a loss)")
    return Row(obj["id"], obj["prompt"], obj["response"])


def load_rows(path: str | os.PathLike) -> list[Row]:
    """Read a JSONL dataset, refusing anything that is not well-formed unique rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset not found: {path}")
    rows: list[Row] = []
    seen: set[str] = set()
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                row = parse_row(obj, where)
                if row.id in seen:
                    raise DataError(f"{where}: duplicate row id {row.id!r}")
                seen.add(row.id)
                rows.append(row)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if not rows:
        raise DataError(f"dataset is empty: {path}")
    return rows


def write_rows(path: str | os.PathLike, rows: Iterable[Row]) -> None:
    """Write JSONL atomically: a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row.to_json(), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Encoded:
    """Token ids of one rendered row and the labels that select its response tokens."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def render(tokenizer, prompt: str, response: str | None = None) -> tuple[str, str]:
    """Return (prompt_text, response_text) whose concatenation is the full rendered row.

    With a chat template: one user turn, then the assistant turn. The response text is
    everything the template adds after the generation prompt (the answer and its
    end-of-turn marker), so the model learns to stop.
    """
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        if response is None:
            return prompt_text, ""
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": response}], tokenize=False
        )
        if not full.startswith(prompt_text):  # a template that rewrites earlier turns
            raise DataError("the tokenizer's chat template does not extend the prompt; cannot split prompt and response")
        return prompt_text, full[len(prompt_text):]
    eos = tokenizer.eos_token or ""
    return prompt, ("" if response is None else response + eos)


def encode(tokenizer, prompt: str, response: str, max_length: int = 512) -> Encoded:
    prompt_text, response_text = render(tokenizer, prompt, response)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    # Without a template the tokenizer adds its own BOS to the prompt; the template text
    # already carries every special token it wants.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not has_template)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if not response_ids:
        raise DataError("a response rendered to no tokens")
    # Truncate the prompt from the left, never the response: the response is what is learnt.
    budget = max_length - len(response_ids)
    if budget < 1:
        response_ids = response_ids[: max_length - 1]
        budget = 1
    prompt_ids = prompt_ids[-budget:]
    return Encoded(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + list(response_ids))


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding carries no loss and is masked out of attention."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


class EncodedRows:
    """Rows encoded once, handed out as padded batches of given row indices."""

    def __init__(self, tokenizer, pairs: Sequence[tuple[str, str]], max_length: int = 512):
        self.pad_id = pad_token_id(tokenizer)
        self.items = [encode(tokenizer, p, r, max_length) for p, r in pairs]

    @classmethod
    def from_rows(cls, tokenizer, rows: Sequence[Row], max_length: int = 512) -> "EncodedRows":
        return cls(tokenizer, [(r.prompt, r.response) for r in rows], max_length)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out = collate([self.items[i] for i in indices], self.pad_id)
        return {k: v.to(device) for k, v in out.items()}

    def batches(
        self, batch_size: int, indices: Sequence[int] | None = None, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        idx = list(range(len(self))) if indices is None else list(indices)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            yield chunk, self.batch(chunk, device)
