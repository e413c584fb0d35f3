"""Streamed, hashed snapshot files: the background hasher sees every byte, in order."""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path

import numpy as np
import pytest

from faissq.errors import SnapshotCorrupt
from faissq.storage import files
from faissq.storage.fs import Storage


def test_background_sha256_matches_hashlib_over_many_chunks() -> None:
    chunks = [bytes([i]) * (i * 100_003 % 3_000_000 + 1) for i in range(40)]
    bg = files.BackgroundSha256(depth=2)
    for c in chunks:
        bg.update(memoryview(c))
    assert bg.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert bg.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()  # idempotent


def test_npy_digest_covers_every_byte_and_verifies(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    arr = np.random.default_rng(0).random((50_000, 128), dtype=np.float32)  # several chunks
    digest = files.write_npy(storage, f"{tmp_path}/a.npy", arr)
    data = (tmp_path / "a.npy").read_bytes()
    assert digest == files.FileDigest(hashlib.sha256(data).hexdigest(), len(data))
    assert files.hash_file(storage, f"{tmp_path}/a.npy") == digest
    opened = files.verify_files(
        storage, str(tmp_path), {"a.npy": digest.as_json()}, files.open_file
    )
    np.testing.assert_array_equal(opened["a.npy"], arr)


def test_a_failed_write_stops_the_hashing_thread() -> None:
    class Broken(io.BytesIO):
        def write(self, data: object) -> int:
            raise OSError("disk full")

    before = threading.active_count()
    out = files.HashingWriter(Broken())
    with pytest.raises(OSError):
        out.write(b"x" * 10_000)
    out.close()
    assert threading.active_count() == before


def test_a_mismatch_is_reported_and_the_file_is_not_opened(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    digest = files.write_bytes(storage, f"{tmp_path}/t.json", b"{}")
    opened: list[str] = []

    def parse(_: Storage, path: str) -> None:
        opened.append(path)

    want = {"t.json": {"sha256": "0" * 64, "bytes": digest.bytes}}
    with pytest.raises(SnapshotCorrupt, match="fails its checksum"):
        files.verify_files(storage, str(tmp_path), want, parse)
    assert opened == []
