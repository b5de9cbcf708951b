"""Secret key files: created once, owner-only, durable, never overwritten (what was signed
or hashed with a key must stay checkable with it)."""

from __future__ import annotations

import os
from pathlib import Path


def create_once(path: str | os.PathLike, content: bytes) -> None:
    """Write ``content`` to ``path`` unless the file exists (another process may create it
    at the same moment: its key wins, and both read the same one afterwards)."""
    path = Path(path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
