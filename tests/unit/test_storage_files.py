"""Streamed, hashed snapshot files: the digest sees every byte, in order; old records verify."""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3
import numpy as np
import pytest

from faissq.errors import SnapshotCorrupt
from faissq.storage import files
from faissq.storage.fs import Storage


def test_npy_digest_covers_every_byte_and_verifies(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    arr = np.random.default_rng(0).random((50_000, 128), dtype=np.float32)  # several chunks
    digest = files.write_npy(storage, f"{tmp_path}/a.npy", arr)
    data = (tmp_path / "a.npy").read_bytes()
    assert digest == files.FileDigest(blake3.blake3(data).hexdigest(), len(data), "blake3")
    assert digest.as_json() == {"blake3": digest.hexdigest, "bytes": len(data)}
    assert files.hash_file(storage, f"{tmp_path}/a.npy") == digest
    opened = files.verify_files(
        storage, str(tmp_path), {"a.npy": digest.as_json()}, files.open_file
    )
    np.testing.assert_array_equal(opened["a.npy"], arr)


def test_a_format_1_sha256_record_still_verifies(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    data = b'{"a": 1}'
    (tmp_path / "t.json").write_bytes(data)
    want = {"t.json": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    assert files.verify_files(storage, str(tmp_path), want, files.open_file) == {"t.json": {"a": 1}}
    with pytest.raises(SnapshotCorrupt, match="names no known digest"):
        files.verify_files(storage, str(tmp_path), {"t.json": {"md5": "0", "bytes": len(data)}})


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
