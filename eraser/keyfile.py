"""Secret key files: created once, owner-only, durable, never overwritten (what was signed
or hashed with a key must stay checkable with it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def create_once(path: str | os.PathLike, content: bytes) -> None:
    """Write ``content`` to ``path`` unless the file exists. The content is written to a
    temporary file first and hard-linked into place (atomic, fails if the name exists): a
    process starting at the same moment never reads a created but still empty key, and
    whichever link lands first is the key both use."""
    path = Path(path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # owner-only (0600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
        fsync_dir(path.parent)
    finally:
        os.unlink(tmp)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a file created, linked or unlinked in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
