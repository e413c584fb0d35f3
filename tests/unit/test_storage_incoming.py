"""incoming/ (vectors by reference) is swept by age after a snapshot, never sooner."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from storage_support import can_make_read_only, read_only

from faissq.config import Settings, StorageSettings
from faissq.index.engine import Engine
from faissq.storage import incoming
from faissq.storage.durable import DurableStore
from faissq.storage.fs import Storage
from faissq.tasks.producer import put_vectors

DAY = 86_400.0


def age(path: Path, seconds: float) -> None:
    """Backdate a file's modification time."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_snapshot_sweeps_old_references_and_keeps_recent_ones(tmp_path: Path) -> None:
    root = tmp_path / "data"
    settings = Settings(storage=StorageSettings(url=str(root), incoming_ttl_s=DAY))
    vecs = np.random.default_rng(1).random((300, 8), dtype=np.float32)
    old, fresh = put_vectors(settings, vecs), put_vectors(settings, vecs)
    folder = root / "incoming"
    (folder / ".tmp-crashed-writer").write_bytes(b"half a file")
    (folder / "producer-subfolder").mkdir()
    for name in (old["path"].split("/")[-1], ".tmp-crashed-writer", "producer-subfolder"):
        age(folder / name, 2 * DAY)
    age(folder / fresh["path"].split("/")[-1], DAY / 2)

    durable = DurableStore(settings)
    eng = Engine(8, settings.index, "default")
    eng.build(vecs, np.arange(300, dtype=np.int64))
    try:
        report = durable.save("default", eng, durable.next_seq("default") - 1)
    finally:
        durable.close()

    assert report["persisted"] is True and report["incoming_removed"] == 2
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([fresh["path"].split("/")[-1], "producer-subfolder"])


def test_a_zero_ttl_keeps_every_file(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "a.npy").write_bytes(b"x")
    age(tmp_path / "incoming" / "a.npy", 400 * DAY)
    assert incoming.sweep(storage, 0) == 0
    assert incoming.sweep(storage, DAY, now=time.time() - 500 * DAY) == 0  # written "later"
    assert (tmp_path / "incoming" / "a.npy").exists()
    assert incoming.sweep(storage, DAY) == 1
    assert not (tmp_path / "incoming" / "a.npy").exists()


def test_no_incoming_folder_is_nothing_to_sweep(tmp_path: Path) -> None:
    assert incoming.sweep(Storage.from_url(str(tmp_path)), DAY) == 0


def test_a_sweep_that_cannot_delete_does_not_fail_the_snapshot(tmp_path: Path) -> None:
    root = tmp_path / "data"
    if not can_make_read_only(tmp_path):
        pytest.skip("this filesystem cannot be made read-only here")
    settings = Settings(storage=StorageSettings(url=str(root), incoming_ttl_s=DAY))
    vecs = np.random.default_rng(2).random((200, 8), dtype=np.float32)
    old = root / put_vectors(settings, vecs)["path"]
    age(old, 2 * DAY)
    durable = DurableStore(settings)
    eng = Engine(8, settings.index, "default")
    eng.build(vecs, np.arange(200, dtype=np.int64))
    try:
        with read_only(root / "incoming"):
            report = durable.save("default", eng, durable.next_seq("default") - 1)
    finally:
        durable.close()
    assert report["persisted"] is True and report["incoming_removed"] == 0 and old.exists()
