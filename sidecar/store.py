"""The versioned adapter store (embedded default: a directory).

    STORE/adapters/NAME/adapter.json          registration: name, base model (immutable)
    STORE/adapters/NAME/current               the current version number
    STORE/adapters/NAME/versions/N/adapter/   the PEFT adapter of version N
    STORE/adapters/NAME/versions/N/train.jsonl  its training set (erased rows gone)
    STORE/adapters/NAME/versions/N/manifest.json  base model, parent, job, content hashes
    STORE/staging/                            versions being assembled (cleared at start)

A version is assembled under staging/ and published by one ``rename`` into versions/, then
``current`` is replaced atomically: a reader, or a restart after kill -9, sees a version
whole or not at all. Published files are read-only and never rewritten, so a serving
engine that caches by path (vLLM's prefix cache) can never mix two versions' weights.

Only the newest ``keep_versions`` versions are kept. Every older version still holds what
later erases removed, so retention is a privacy setting as much as a disk one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from eraser.data import Row, load_rows
from eraser.model import adapter_fingerprint

from .config import ADAPTER_NAME
from .errors import AlreadyExistsError, FailedPreconditionError, NotFoundError
from eraser.errors import InvalidRequestError

ADAPTER_DIR = "adapter"
DATASET = "train.jsonl"
MANIFEST = "manifest.json"


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise InvalidRequestError(
            f"bad adapter name {name[:80]!r}: use 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )
    return name


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _seal(directory: Path) -> None:
    """Make every file read-only: published versions are immutable."""
    for p in directory.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


@dataclass(frozen=True)
class Version:
    adapter: str
    number: int
    path: Path
    manifest: dict

    @property
    def adapter_path(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def dataset_path(self) -> Path:
        return self.path / DATASET

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    base_model: str  # as registered: a configured name or a directory
    base_model_dir: str
    base_model_fingerprint: str
    created_at: float


class AdapterStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.adapters_dir = self.root / "adapters"
        self.staging_dir = self.root / "staging"
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self._rows_cache: dict[tuple[str, int], list[Row]] = {}
        self._ids_cache: dict[tuple[str, int], frozenset[str]] = {}
        self._lock = threading.RLock()

    # ---- reading -------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.adapters_dir / check_adapter_name(name)

    def exists(self, name: str) -> bool:
        return ADAPTER_NAME.fullmatch(name or "") is not None and (self.adapters_dir / name / "adapter.json").is_file()

    def record(self, name: str) -> AdapterRecord:
        path = self._dir(name) / "adapter.json"
        if not path.is_file():
            raise NotFoundError(f"no adapter named {name!r}")
        return AdapterRecord(**json.loads(path.read_text()))

    def names(self) -> list[str]:
        return sorted(p.name for p in self.adapters_dir.iterdir() if (p / "adapter.json").is_file())

    def current_number(self, name: str) -> int:
        self.record(name)
        return int((self._dir(name) / "current").read_text().strip())

    def version_numbers(self, name: str) -> list[int]:
        d = self._dir(name) / "versions"
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file())

    def version(self, name: str, number: int | None = None) -> Version:
        number = self.current_number(name) if number is None else number
        path = self._dir(name) / "versions" / str(number)
        if not (path / MANIFEST).is_file():
            raise NotFoundError(f"adapter {name!r} has no version {number} (retained: {self.version_numbers(name)})")
        return Version(name, number, path, json.loads((path / MANIFEST).read_text()))

    def current(self, name: str) -> Version:
        return self.version(name, None)

    def row_ids(self, version: Version) -> frozenset[str]:
        key = (version.adapter, version.number)
        with self._lock:
            if key not in self._ids_cache:
                self._ids_cache[key] = frozenset(r.id for r in self.rows(version))
            return self._ids_cache[key]

    def rows(self, version: Version) -> list[Row]:
        """The version's training rows; cached, since a published version never changes."""
        key = (version.adapter, version.number)
        with self._lock:
            if key not in self._rows_cache:
                self._rows_cache[key] = load_rows(version.dataset_path)
            return self._rows_cache[key]

    # ---- writing -------------------------------------------------------------------
    def new_staging(self, label: str) -> Path:
        path = self.staging_dir / f"{label}.{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def clear_staging(self) -> int:
        """Remove versions whose assembly was interrupted (called before serving)."""
        n = 0
        for p in self.staging_dir.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
        return n

    @staticmethod
    def write_manifest(staged: Path, manifest: dict) -> dict:
        """Complete ``manifest`` with the content hashes of the staged files and write it."""
        files = {
            p.relative_to(staged).as_posix(): file_sha256(p)
            for p in sorted(staged.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        manifest = {**manifest, "files": files, "adapter_sha256": adapter_fingerprint(staged / ADAPTER_DIR)}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return manifest

    def register(self, record: AdapterRecord, staged_version: Path) -> Version:
        """Publish a new adapter whose version 1 was assembled in ``staged_version``."""
        check_adapter_name(record.name)
        target = self.adapters_dir / record.name
        if target.exists():
            raise AlreadyExistsError(f"an adapter named {record.name!r} is already registered")
        shell = self.new_staging(f"register-{record.name}")
        try:
            (shell / "versions").mkdir()
            _seal(staged_version)
            os.rename(staged_version, shell / "versions" / "1")
            (shell / "adapter.json").write_text(json.dumps(record.__dict__, indent=2, sort_keys=True) + "\n")
            (shell / "current").write_text("1\n")
            _seal(shell / "adapter.json")
            try:
                os.rename(shell, target)  # atomic; fails if the name appeared meanwhile
            except OSError:
                raise AlreadyExistsError(f"an adapter named {record.name!r} is already registered") from None
            _fsync_dir(self.adapters_dir)
        finally:
            shutil.rmtree(shell, ignore_errors=True)
        return self.version(record.name, 1)

    def publish(self, name: str, number: int, staged: Path) -> Version:
        """Move a staged version into place and make it current.

        The caller guarantees one publisher per adapter at a time; ``number`` must be the
        next version. The rename is the commit point: after a crash, a version directory
        either exists whole (and recovery makes it current) or not at all.
        """
        current = self.current_number(name)
        if number != current + 1:
            raise FailedPreconditionError(f"adapter {name!r} is at version {current}; cannot publish version {number}")
        _seal(staged)
        target = self._dir(name) / "versions" / str(number)
        os.rename(staged, target)
        _fsync_dir(target.parent)
        self.set_current(name, number)
        return self.version(name, number)

    def set_current(self, name: str, number: int) -> None:
        _write_atomically(self._dir(name) / "current", f"{number}\n")

    def copy_version(self, source: Version, staged: Path) -> None:
        """Stage the content of ``source`` (hard links: published files never change)."""
        for p in sorted(source.path.rglob("*")):
            rel = p.relative_to(source.path)
            if rel.as_posix() == MANIFEST:
                continue
            dest = staged / rel
            if p.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, dest)
            except OSError:
                shutil.copy2(p, dest)

    def prune(self, name: str, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions; return the deleted numbers."""
        numbers = self.version_numbers(name)
        current = self.current_number(name)
        doomed = [n for n in numbers[:-keep] if n != current] if keep < len(numbers) else []
        for n in doomed:
            path = self._dir(name) / "versions" / str(n)
            # Rename first so a crash mid-delete never leaves a half version that looks whole.
            trash = self.staging_dir / f"deleted-{name}-{n}.{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            with self._lock:
                self._rows_cache.pop((name, n), None)
                self._ids_cache.pop((name, n), None)
        return doomed


def now() -> float:
    return time.time()
