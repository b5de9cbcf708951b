"""Where ``RegisterAdapter`` may read from: the configured import roots, never the store.

A client names server paths, so registration is confined: every path (and every file
inside an adapter directory, symlinks resolved) must lie under one of
``config.import_roots`` and outside the store. Without the store rule, a retained
pre-erasure version (``adapters/A/versions/1/``) could be registered under a new name and
bring erased rows back. Every refusal, missing or forbidden, gives one message, so that
errors do not tell a client which server paths exist.

Files are copied from their resolved paths with ``O_NOFOLLOW``: a link swapped in after
the check is not followed, and the store never holds a link.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from eraser.errors import InvalidRequestError

_CHUNK = 1 << 20


class ImportRoots:
    def __init__(self, roots: tuple[Path, ...], store: Path):
        self.roots = tuple(Path(os.path.realpath(r)) for r in roots)
        self.store = Path(os.path.realpath(store))

    def refusal(self, field: str) -> InvalidRequestError:
        where = ("under the sidecar's import roots (import_roots) and outside its store" if self.roots
                 else "outside the sidecar's store")
        return InvalidRequestError(f"{field} is not allowed or does not exist: it must be a path {where}")

    def allowed(self, real: Path) -> bool:
        if real == self.store or self.store in real.parents:
            return False
        return not self.roots or any(real == r or r in real.parents for r in self.roots)

    def confine(self, path: str, field: str, kind: str) -> Path:
        """The real path of ``path``, a ``kind`` ("dir" or "file") it is allowed to read;
        else the one refusal of ``field``."""
        if not path or "\x00" in path:
            raise self.refusal(field)
        real = Path(os.path.realpath(path))
        try:
            mode = os.stat(real, follow_symlinks=False).st_mode
        except OSError:
            raise self.refusal(field) from None
        if not self.allowed(real) or not (stat.S_ISDIR(mode) if kind == "dir" else stat.S_ISREG(mode)):
            raise self.refusal(field)
        return real

    def copy_file(self, real: Path, dest: Path, field: str) -> None:
        """Copy a confined regular file without following a link at its last component."""
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            raise self.refusal(field) from None
        with os.fdopen(fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):  # a FIFO or device swapped in
                raise self.refusal(field)
            with dest.open("xb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)

    def copy_tree(self, real: Path, dest: Path, field: str) -> None:
        """Copy a confined directory: directories and regular files only; a symlink is
        resolved and its target, a regular file that must itself be allowed, copied."""
        dest.mkdir()
        with os.scandir(real) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                target = dest / entry.name
                if entry.is_symlink():
                    self.copy_file(self.confine(entry.path, field, "file"), target, field)
                elif entry.is_dir(follow_symlinks=False):
                    self.copy_tree(Path(entry.path), target, field)
                elif entry.is_file(follow_symlinks=False):
                    self.copy_file(Path(entry.path), target, field)
                else:
                    raise self.refusal(field)
