"""Crypto-shredding of the replacement text a request carries until its job ends.

A job store keeps a correction's new response (or a query modification's new prompt) in its
``payloads`` table only while the job runs, and deletes the rows when the job ends. A database
keeps copies that a row deletion does not reach: SQLite's ``-wal`` file until a checkpoint,
PostgreSQL's write-ahead log until its segment is recycled (and a WAL archive or a replica for
ever). So each job's payloads are sealed (Fernet: AES-128-CBC and HMAC-SHA256) with a key of
that job alone, kept outside the database under the store's ``secrets/payload-keys/``; when the
job's payloads are deleted its key file is overwritten and unlinked, and every copy of the
ciphertext the database still holds can no longer be read.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from eraser.keyfile import create_once, fsync_dir

from .errors import FailedPreconditionError

PREFIX = "sealed:"
_JOB_ID = re.compile(r"[0-9a-f]{32}")


class PayloadKeyMissing(FailedPreconditionError):
    """A sealed payload whose job's key is gone (shredded, or the store lost it)."""


class PayloadKeys:
    """One Fernet key per job, a file each under ``root`` (owner-only)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, job_id: str) -> Path:
        if not _JOB_ID.fullmatch(job_id):  # ids are uuid4 hex: nothing else names a file here
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    def seal(self, job_id: str, text: str) -> str:
        """``text`` encrypted with the job's key (created, durably, on first use)."""
        path = self._path(job_id)
        create_once(path, Fernet.generate_key())
        return PREFIX + Fernet(path.read_bytes()).encrypt(text.encode()).decode("ascii")

    def open(self, job_id: str, body: str) -> str:
        """The text of a body ``seal`` made; a body stored before sealing is returned as it is."""
        if not body.startswith(PREFIX):
            return body
        try:
            key = self._path(job_id).read_bytes()
            return Fernet(key).decrypt(body[len(PREFIX):].encode("ascii")).decode()
        except (FileNotFoundError, InvalidToken, ValueError):
            raise PayloadKeyMissing(f"job {job_id}: its request text can no longer be read "
                                    "(the job's payload key is gone)") from None

    def shred(self, job_id: str) -> bool:
        """Overwrite and unlink the job's key; True when there was one."""
        path = self._path(job_id)
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            return False
        try:
            os.write(fd, b"\0" * max(os.fstat(fd).st_size, 64))
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        fsync_dir(self.root)
        return True

    def held(self, older_than: float = 0.0) -> list[str]:
        """Job ids with a key, the key at least ``older_than`` seconds old."""
        now = time.time()
        out = []
        for p in self.root.iterdir():
            if _JOB_ID.fullmatch(p.name):
                try:
                    if now - p.stat().st_mtime >= older_than:
                        out.append(p.name)
                except FileNotFoundError:
                    continue
        return sorted(out)
