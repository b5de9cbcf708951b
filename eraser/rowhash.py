"""Keyed hashes of row text: what the eraser records in place of text it must not keep.

An unkeyed SHA-256 of an erased row lets anyone who holds a guess of the text confirm it
from the record. An HMAC with a secret key does not, and still lets the key's holder match
a row against the record (a compliance check, a repeated request). The sidecar keeps one
key per store; the CLI one per user (``default_key_path``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .data import Row
from .keyfile import create_once
from .errors import InvalidRequestError

ALGORITHM = "hmac-sha256"
KEY_BYTES = 32
KEY_ENV = "ERASER_ROW_HASH_KEY"


@dataclass(frozen=True)
class RowHasher:
    key: bytes = field(repr=False)
    ephemeral: bool = False  # drawn for one run and not kept: its hashes match nothing later

    def __post_init__(self):
        if len(self.key) < 16:
            raise InvalidRequestError(f"a row-hash key needs at least 16 bytes, not {len(self.key)}")

    @property
    def key_id(self) -> str:
        """Names the key in records (which key to check with) without revealing it."""
        return hashlib.sha256(b"eraser.row-hash.key-id\x00" + self.key).hexdigest()[:16]

    def text(self, text: str) -> str:
        return hmac.new(self.key, text.encode("utf-8"), hashlib.sha256).hexdigest()

    def row(self, row: Row) -> str:
        return self.text(row.prompt + "\x00" + row.response)

    def describe(self) -> dict:
        out = {"algorithm": ALGORITHM, "key_id": self.key_id}
        if self.ephemeral:
            out["key"] = "ephemeral (not kept)"
        return out

    @classmethod
    def draw(cls) -> "RowHasher":
        return cls(secrets.token_bytes(KEY_BYTES), ephemeral=True)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "RowHasher":
        """The key in ``path``, created (owner-only, never overwritten) when absent."""
        path = Path(path)
        create_once(path, secrets.token_bytes(KEY_BYTES))
        try:
            return cls(path.read_bytes())
        except OSError as e:
            raise InvalidRequestError(f"cannot read the row-hash key {path}: {e.strerror}") from None


def default_key_path() -> Path:
    """``$ERASER_ROW_HASH_KEY``, else the user's config directory."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "eraser" / "row-hash.key"
