"""The store's writes reach the disk before they count: every published file and directory
is fsynced (files before their directory, a directory before the rename that publishes it),
and registration files are sealed read-only like the versions."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from sidecar.store import AdapterRecord, AdapterStore


@pytest.fixture
def fsynced(monkeypatch):
    """The inodes passed to os.fsync (inodes survive the renames that publish)."""
    seen: set[int] = set()
    real = os.fsync

    def spy(fd):
        seen.add(os.fstat(fd).st_ino)
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def _stage(store: AdapterStore, number: int) -> Path:
    staged = store.new_staging(f"v{number}")
    (staged / "adapter").mkdir()
    (staged / "adapter" / "adapter_config.json").write_text("{}")
    (staged / "adapter" / "nested").mkdir()
    (staged / "adapter" / "nested" / "w.bin").write_bytes(b"\0" * 16)
    (staged / "train.jsonl").write_text("")
    (staged / "manifest.json").write_text(json.dumps({"version": number, "rows": 0}))
    return staged


def _unsynced(root: Path, paths, fsynced: set[int]) -> list[str]:
    return [str(p.relative_to(root)) for p in paths if p.stat().st_ino not in fsynced]


def test_register_and_publish_fsync_everything(tmp_path, fsynced):
    store = AdapterStore(tmp_path / "store")
    adapters = tmp_path / "store" / "adapters"
    root = adapters / "dur"
    store.register(AdapterRecord("dur", "base", str(tmp_path), "f" * 64, 0.0), _stage(store, 1))
    assert not _unsynced(root, [root, *root.rglob("*")], fsynced) and adapters.stat().st_ino in fsynced
    assert not (root / "adapter.json").stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), "writable"
    fsynced.clear()
    store.publish("dur", 2, _stage(store, 2))
    v2 = root / "versions" / "2"
    assert not _unsynced(root, [root / "versions", root / "current", v2, *v2.rglob("*")], fsynced)


def _read_key_at(args) -> bytes:
    from eraser.rowhash import RowHasher

    path, start = args
    while time.time() < start:  # every process at once
        pass
    return RowHasher.load_or_create(path).key


def test_a_key_created_by_processes_starting_together_is_one_key(tmp_path):
    """Sidecars of a pool start together on one store: each either creates the row-hash key or
    reads the one another created, never a created but still empty file."""
    import multiprocessing

    paths = [tmp_path / f"store-{i}" / "secrets" / "row-hash.key" for i in range(12)]
    with multiprocessing.get_context("fork").Pool(6) as pool:
        for path in paths:
            keys = pool.map(_read_key_at, [(path, time.time() + 0.2)] * 6)
            assert len(set(keys)) == 1 and len(keys[0]) >= 16
            assert path.read_bytes() == keys[0] and oct(path.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in tmp_path.rglob(".row-hash.key.*")], "no temporary file left"
