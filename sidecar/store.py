"""The versioned adapter store (embedded default: a directory).

    STORE/adapters/NAME/adapter.json          registration: name, base model, held-out set (immutable)
    STORE/adapters/NAME/holdout.jsonl         its held-out set, if it has one (read-only)
    STORE/adapters/NAME/current               the current version number
    STORE/adapters/NAME/versions/N/adapter/   the PEFT adapter of version N
    STORE/adapters/NAME/versions/N/train.jsonl  its training set (erased rows gone)
    STORE/adapters/NAME/versions/N/manifest.json  base model, parent, job, content hashes
    STORE/staging/                            versions being assembled (cleared at start)
    STORE/compute.lock                        flock of the one computing sidecar (StoreLock)
    STORE/factors/NAME/N/METHOD/              EK-FAC/K-FAC factors of version N (eraser.factors)
    STORE/secrets/row-hash.key                HMAC key of the recorded row hashes (owner-only)
    STORE/secrets/receipt-signing.key         Ed25519 key that signs erasure receipts (owner-only)
    STORE/secrets/payload-keys/JOB            the key sealing a job's request text until it ends (owner-only)

A version is assembled under staging/ and published by one ``rename`` into versions/, then
``current`` is replaced atomically: a reader, or a restart after kill -9, sees a version
whole or not at all. Published files are read-only and never rewritten, so a serving
engine that caches by path (vLLM's prefix cache) can never mix two versions' weights.

Only the newest ``keep_versions`` versions are kept. Every older version still holds what
later erases removed, so retention is a privacy setting as much as a disk one. ``purge`` deletes the versions older
than a given one at once, whatever the retention.

Factor caches live outside the sealed version directories, because they are written
after a version is published (a background fit, or a job's downdated factors moved in
place); each is written whole under a temporary name and renamed (``eraser.factors.save``),
and it is deleted with its version. Factors are sums over the training rows: those of a
version from before an erase hold the erased rows' contributions like its weights do.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from eraser.data import Row, load_rows
from eraser.keyfile import fsync_dir
from eraser.model import adapter_fingerprint
from eraser.rowhash import RowHasher

from .config import ADAPTER_NAME
from .errors import AlreadyExistsError, FailedPreconditionError, NotFoundError
from .payload_keys import PayloadKeys
from .receipts import ReceiptSigner
from eraser.errors import InvalidRequestError
from eraser.options import FACTOR_SOLVERS

ADAPTER_DIR = "adapter"
DATASET = "train.jsonl"
MANIFEST = "manifest.json"
HOLDOUT = "holdout.jsonl"
FACTOR_MANIFEST = "manifest.json"  # eraser.factors.MANIFEST (not imported: no torch here)


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


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _seal(directory: Path) -> None:
    """Make every file read-only (published versions are immutable) and durable: files,
    then their directories deepest first, all before the rename that publishes them (a
    crash after the rename must not find a directory whose entries never reached the disk)."""
    dirs = [directory]
    for p in directory.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        elif p.is_dir():
            dirs.append(p)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


def _seal_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())
    path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


COMPUTE_LOCK = "compute.lock"


class StoreLock:
    """The exclusive ``flock`` of the one computing sidecar of a store, held for the
    process's life (the kernel drops it when the process dies, kill -9 included). Two
    computing sidecars would both claim jobs and publish versions of the same adapters."""

    def __init__(self, root: Path):
        import fcntl

        self.path = Path(root) / COMPUTE_LOCK
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise FailedPreconditionError(
                f"another compute sidecar is running on the store {root} (it holds {self.path}); run one compute "
                "sidecar per store and the others with --role reconcile") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())  # for an operator; the lock, not the pid, decides

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


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
    # The held-out set (rows of the same kind never trained on) kept beside the versions:
    # SHA-256 of the stored file and its row count; None / 0 when the adapter has none.
    holdout_sha256: str | None = None
    holdout_rows: int = 0
    # The verification policy given at registration ("" : the sidecar's default).
    verify: str = ""


class AdapterStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.adapters_dir = self.root / "adapters"
        self.staging_dir = self.root / "staging"
        self.factors_root = self.root / "factors"
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self._rows_cache: dict[tuple[str, int], list[Row]] = {}
        self._ids_cache: dict[tuple[str, int], frozenset[str]] = {}
        self._lock = threading.RLock()

    @functools.cached_property
    def row_hasher(self) -> RowHasher:
        """The store's key for the hashes recorded in place of erased or replaced text
        (job records, manifests, eraser.json); created with the store, never rotated."""
        return RowHasher.load_or_create(self.root / "secrets" / "row-hash.key")

    # ---- serving reports (reconcilers -> the computing sidecar) ------------------------
    def report_serving(self, instance: str, every: float, replicas: dict[str, dict[str, dict]]) -> None:
        """What one reconciling sidecar's replicas serve (replica -> adapter -> state),
        with a heartbeat: a computing sidecar without replicas of its own waits on these."""
        d = self.root / "serving"
        d.mkdir(exist_ok=True)
        body = {"instance": instance, "heartbeat": time.time(), "every": every, "replicas": replicas}
        _write_atomically(self._serving_file(instance), json.dumps(body, sort_keys=True))

    def withdraw_serving(self, instance: str) -> None:
        self._serving_file(instance).unlink(missing_ok=True)

    def _serving_file(self, instance: str) -> Path:
        return self.root / "serving" / (re.sub(r"[^A-Za-z0-9._-]", "_", instance) + ".json")

    def serving_reports(self) -> list[dict]:
        """The reports of reconcilers alive now: a heartbeat within three of their passes."""
        now, live = time.time(), []
        for path in sorted((self.root / "serving").glob("*.json")):
            try:
                report = json.loads(path.read_text())
                if now - float(report["heartbeat"]) <= 3 * float(report["every"]) + 5:
                    live.append(report)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being replaced, or not a report: the next pass writes it anew
        return live

    @functools.cached_property
    def payload_keys(self) -> PayloadKeys:
        """The per-job keys that seal a request's replacement text in the job database, shredded
        when the job ends (sidecar/payload_keys.py)."""
        return PayloadKeys(self.root / "secrets" / "payload-keys")

    @functools.cached_property
    def receipt_signer(self) -> ReceiptSigner:
        """The store's Ed25519 key that signs erasure receipts; created with the store, never
        overwritten (receipts already issued must keep verifying)."""
        return ReceiptSigner.load_or_create(self.root / "secrets" / "receipt-signing.key")

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

    def holdout_path(self, name: str) -> Path | None:
        """The stored held-out set of an adapter, or None when it was registered without one."""
        return self._dir(name) / HOLDOUT if self.record(name).holdout_sha256 else None

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

    def factors_dir(self, name: str, number: int, method: str) -> Path:
        """Where the factor cache of version ``number`` for ``method`` (ekfac, kfac) lives;
        it may not exist. Not inside the version: published versions are sealed."""
        if method not in FACTOR_SOLVERS:
            raise InvalidRequestError(f"no factor cache for solver {method!r}")
        return self.factors_root / check_adapter_name(name) / str(int(number)) / method

    # ---- writing -------------------------------------------------------------------
    def install_factors(self, staged: Path, name: str, number: int, method: str) -> Path:
        """Move a complete factor cache (written under staging/) into place for a version."""
        target = self.factors_dir(name, number, method)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # left by an earlier attempt: replace it whole
            self.discard_factors(name, number, method)
        os.rename(staged, target)
        fsync_dir(target.parent)
        return target

    def copy_factors(self, name: str, source: int, target: int, method: str) -> Path | None:
        """Give version ``target`` the factor cache of version ``source`` (a rollback: the
        same adapter and rows, so the same key); None when ``source`` has none. Hard
        links: a cache's files are never rewritten, only replaced whole."""
        src = self.factors_dir(name, source, method)
        if not (src / FACTOR_MANIFEST).is_file():
            return None
        staged = self.new_staging(f"factors-{name}-v{target}")
        try:
            shutil.copytree(src, staged / method, copy_function=_link_or_copy)
            return self.install_factors(staged / method, name, target, method)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def discard_factors(self, name: str, number: int, method: str | None = None) -> bool:
        """Delete a version's factor cache (one method, or all); True if there was one."""
        path = self.factors_dir(name, number, method) if method else self.factors_root / check_adapter_name(name) / str(number)
        if not path.exists():
            return False
        # Renamed first, like a pruned version, so no reader sees a half-deleted cache.
        trash = self.staging_dir / f"deleted-factors-{name}-{number}-{method or 'all'}.{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def sweep_factors(self) -> int:
        """Delete factor caches of versions that no longer exist (a stop between a prune and
        its factors' deletion) and temporaries of interrupted writes; returns how many."""
        n = 0
        if not self.factors_root.is_dir():
            return 0
        for adapter in self.factors_root.iterdir():
            if not self.exists(adapter.name):
                shutil.rmtree(adapter, ignore_errors=True)
                n += 1
                continue
            kept = set(self.version_numbers(adapter.name))
            for version in adapter.iterdir():
                if not (version.name.isdigit() and int(version.name) in kept):
                    shutil.rmtree(version, ignore_errors=True) if version.is_dir() else version.unlink(missing_ok=True)
                    n += 1
                    continue
                for entry in version.iterdir():
                    if entry.name.startswith("."):  # eraser.factors.save's temporary or old copy
                        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                        n += 1
        return n

    def new_staging(self, label: str) -> Path:
        path = self.staging_dir / f"{label}.{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def clear_staging(self, prefix: str = "", keep: Callable[[str], bool] = lambda name: False) -> int:
        """Remove versions whose assembly was interrupted (called before serving): those whose
        label starts with ``prefix`` (a job's: ``job-<id>``), except those ``keep`` names."""
        n = 0
        for p in self.staging_dir.iterdir():
            if not p.name.startswith(prefix) or keep(p.name):
                continue
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

    def register(self, record: AdapterRecord, staged_version: Path, holdout: Path | None = None) -> Version:
        """Publish a new adapter whose version 1 was assembled in ``staged_version``, with
        its held-out set (a staged file, moved in) when it has one."""
        check_adapter_name(record.name)
        if (holdout is None) != (record.holdout_sha256 is None):
            raise ValueError("a held-out set and its record go together")
        target = self.adapters_dir / record.name
        if target.exists():
            raise AlreadyExistsError(f"an adapter named {record.name!r} is already registered")
        shell = self.new_staging(f"register-{record.name}")
        try:
            (shell / "versions").mkdir()
            _seal(staged_version)
            os.rename(staged_version, shell / "versions" / "1")
            if holdout is not None:
                os.rename(holdout, shell / HOLDOUT)
                _seal_file(shell / HOLDOUT)
            (shell / "adapter.json").write_text(json.dumps(record.__dict__, indent=2, sort_keys=True) + "\n")
            (shell / "current").write_text("1\n")
            _seal_file(shell / "adapter.json")  # immutable, like the versions
            with (shell / "current").open("rb") as f:  # replaced whole later (set_current), so not sealed
                os.fsync(f.fileno())
            fsync_dir(shell / "versions")
            fsync_dir(shell)
            try:
                os.rename(shell, target)  # atomic; fails if the name appeared meanwhile
            except OSError:
                raise AlreadyExistsError(f"an adapter named {record.name!r} is already registered") from None
            fsync_dir(self.adapters_dir)
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
        fsync_dir(target.parent)
        self.set_current(name, number)
        return self.version(name, number)

    def unpublish(self, name: str, number: int) -> None:
        """Undo ``publish`` of the latest version (its commit elsewhere failed): the previous
        one is current again and the directory goes."""
        self.set_current(name, number - 1)
        target = self._dir(name) / "versions" / str(number)
        trash = self.new_staging(f"unpublished-{name}-v{number}")
        os.rename(target, trash / "version")
        fsync_dir(target.parent)
        shutil.rmtree(trash, ignore_errors=True)

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

    def prune_plan(self, name: str, keep: int) -> "Deleted":
        """What retention would delete: all but the newest ``keep`` versions (never the
        current one), with their factor caches. Nothing is deleted (``delete`` does)."""
        numbers = self.version_numbers(name)
        current = self.current_number(name)
        doomed = [n for n in numbers[:-keep] if n != current] if keep < len(numbers) else []
        return self._with_caches(name, doomed, [])

    def purge_plan(self, name: str, before: int) -> "Deleted":
        """What a purge would delete: the versions numbered below ``before``, whatever the
        retention, with their factor caches and those left without a version; never the
        current version. Nothing is deleted (``delete`` does)."""
        if before > self.current_number(name):
            raise ValueError(f"purge of {name!r} before version {before}: past the current version")
        doomed = [n for n in self.version_numbers(name) if n < before]
        orphans = [(n, m) for n, m in self.factor_caches(name) if n < before and n not in doomed]
        return self._with_caches(name, doomed, orphans)

    def factor_caches(self, name: str) -> list[tuple[int, str]]:
        """(version, method) of every factor cache of an adapter on disk, complete or not."""
        root = self.factors_root / check_adapter_name(name)
        if not root.is_dir():
            return []
        return sorted((int(v.name), m.name) for v in root.iterdir() if v.name.isdigit() and v.is_dir()
                      for m in v.iterdir() if m.is_dir() and not m.name.startswith("."))

    def _with_caches(self, name: str, numbers: list[int], orphan_caches: list[tuple[int, str]]) -> "Deleted":
        caches = [(n, m) for n, m in self.factor_caches(name) if n in numbers] + orphan_caches
        return Deleted(numbers, sorted(caches))

    def delete(self, name: str, planned: "Deleted") -> "Deleted":
        """Delete the versions and factor caches of ``planned`` that are still there, never
        the current version (a plan recorded before a crash is completed by running it
        again); returns ``planned``."""
        current = self.current_number(name)
        for n in planned.versions:
            path = self._dir(name) / "versions" / str(n)
            if n == current or not path.exists():
                continue
            # Rename first so a crash mid-delete never leaves a half version that looks whole.
            trash = self.staging_dir / f"deleted-{name}-{n}.{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            with self._lock:
                self._rows_cache.pop((name, n), None)
                self._ids_cache.pop((name, n), None)
        for n in sorted({n for n, _ in planned.factor_caches}):
            if n != current:
                self.discard_factors(name, n)
        return planned


@dataclass(frozen=True)
class Deleted:
    """What a prune or purge deleted: version numbers and (version, method) factor caches."""

    versions: list[int]
    factor_caches: list[tuple[int, str]]

    def __bool__(self) -> bool:
        return bool(self.versions or self.factor_caches)
