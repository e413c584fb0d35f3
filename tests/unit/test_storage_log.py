"""The update log: durable appends, gap-free seqs, idempotent batch ids, one writer, corruption."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import blake3
import fsspec
import numpy as np
import pytest
from storage_support import can_make_read_only, faulty_storage, read_only

from faissq.errors import (
    InvalidIds,
    InvalidParameter,
    InvalidVectors,
    LogCorrupt,
    StorageUnavailable,
    WriterConflict,
)
from faissq.index.attributes import check_batch as check_attrs
from faissq.index.attributes import columns_for, encode_batch
from faissq.storage.fs import Storage
from faissq.storage.log import TRUNCATED, Appended, UpdateLog, entry_name
from faissq.storage.log_entry import MAGIC

DIM = 8


def batch(start: int, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(start, start + n, dtype=np.int64)
    return ids, np.random.default_rng(start).random((n, DIM), dtype=np.float32)


@pytest.fixture
def ulog(tmp_path: Path) -> UpdateLog:
    return UpdateLog(Storage.from_url(str(tmp_path / "data")), "default")


def entry_path(ulog: UpdateLog, seq: int) -> Path:
    return Path(ulog.folder) / entry_name(seq)


def test_append_then_read_round_trips_in_seq_order(ulog: UpdateLog) -> None:
    ids, vecs = batch(0)
    with ulog.open_writer() as w:
        assert w.append("upsert", ids, vecs, "b1").seq == 1
        assert w.append("delete", ids[:2], None, "b2").seq == 2
        assert w.append("upsert", *batch(100), "b3").seq == 3
    entries = list(ulog.read())
    assert [e.seq for e in entries] == [1, 2, 3]
    assert [e.op for e in entries] == ["upsert", "delete", "upsert"]
    np.testing.assert_array_equal(entries[0].ids, ids)
    np.testing.assert_array_equal(entries[0].vectors, vecs)
    assert entries[1].vectors.shape == (2, 0)
    assert [e.seq for e in ulog.read(after_seq=2)] == [3]
    assert ulog.last_seq() == 3


def test_a_format_1_entry_with_a_sha256_trailer_still_replays(ulog: UpdateLog) -> None:
    ids, vecs = batch(0)
    with ulog.open_writer() as w:
        w.append("upsert", ids, vecs, "b1")
    path = entry_path(ulog, 1)
    body = path.read_bytes()[:-32]
    assert body.startswith(MAGIC)
    old = b"FQLOG\x00\x01\x00" + body[len(MAGIC) :]
    path.write_bytes(old + hashlib.sha256(old).digest())
    (entry,) = ulog.read()
    np.testing.assert_array_equal(entry.vectors, vecs)
    path.write_bytes(old + blake3.blake3(old).digest())  # a trailer of the wrong algorithm
    with pytest.raises(LogCorrupt, match="fails its checksum"):
        list(ulog.read())


def test_an_upsert_carries_its_attribute_columns_under_the_same_digest(ulog: UpdateLog) -> None:
    """Attributes ride after the vectors (header attrs_bytes); an entry without them keeps the
    layout entries had before attributes existed; a flipped attribute byte fails the digest."""
    schema: dict[str, Any] = {"tenant": "int64", "lang": "keyword"}
    cols = check_attrs(
        schema, {"tenant": [7, None, -3, 2**62, 0], "lang": ["en", None, "", "é", "de"]}, 5
    )
    with ulog.open_writer() as w:
        w.append("upsert", *batch(0), "b1", attributes=cols)
        w.append("upsert", *batch(10), "b2")
        with pytest.raises(InvalidParameter):
            w.append("delete", batch(0)[0], None, "b3", attributes=cols)
    with_attrs, plain = ulog.read()
    assert set(with_attrs.attributes) == {"tenant", "lang"}
    np.testing.assert_array_equal(with_attrs.attributes["tenant"], cols["tenant"])
    assert with_attrs.attributes["lang"] == ["en", None, "", "é", "de"]
    assert columns_for(schema, with_attrs.attributes) == {
        "tenant": [7, None, -3, 2**62, 0],
        "lang": ["en", None, "", "é", "de"],
    }
    assert plain.attributes == {} and "attrs_bytes" not in ulog.read_header(2)
    size = ulog.read_header(1)["attrs_bytes"]
    assert size == len(encode_batch(cols))
    path = entry_path(ulog, 1)
    data = bytearray(path.read_bytes())
    data[len(data) - 32 - size // 2] ^= 0x01  # inside the attribute section
    path.write_bytes(bytes(data))
    with pytest.raises(LogCorrupt, match="fails its checksum"):
        ulog.read_entry(1)


def test_known_batch_id_returns_original_seq_and_logs_nothing(ulog: UpdateLog) -> None:
    with ulog.open_writer() as w:
        first = w.append("upsert", *batch(0), "same")
        again = w.append("upsert", *batch(50), "same")
    assert (first.seq, first.duplicate) == (1, False)
    assert (again.seq, again.duplicate) == (1, True)
    with ulog.open_writer() as w:  # a restarted writer still knows it
        assert w.append("upsert", *batch(0), "same").seq == 1
    assert ulog.entry_seqs() == [1]


def test_second_writer_is_refused(ulog: UpdateLog) -> None:
    with ulog.open_writer() as w:
        w.append("upsert", *batch(0), "b1")
        with pytest.raises(WriterConflict):
            ulog.open_writer()
    with ulog.open_writer() as w:  # released on close
        assert w.append("upsert", *batch(5), "b2").seq == 2


def test_object_store_second_writer_is_fenced_by_exclusive_entry_creation() -> None:
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    storage = Storage(fs, "/fence-test")
    ulog = UpdateLog(storage, "default")
    a, b = ulog.open_writer(), ulog.open_writer()  # no lock on object stores
    assert a.append("upsert", *batch(0), "from-a").seq == 1
    with pytest.raises(WriterConflict):
        b.append("upsert", *batch(5), "from-b")
    assert [e.batch_id for e in ulog.read()] == ["from-a"]


def test_truncate_keeps_seq_and_idempotency(ulog: UpdateLog) -> None:
    with ulog.open_writer() as w:
        for k in range(4):
            w.append("upsert", *batch(10 * k), f"b{k}")
        assert w.truncate(4) == 4
    assert ulog.entry_seqs() == []
    assert ulog.last_seq() == 4
    assert list(ulog.read(after_seq=4)) == []
    with pytest.raises(LogCorrupt, match="truncated up to seq 4"):
        list(ulog.read(after_seq=2))
    with ulog.open_writer() as w:
        assert w.append("upsert", *batch(0), "b1").seq == 2  # redelivery after truncation
        assert w.append("upsert", *batch(90), "b9").seq == 5
        with pytest.raises(InvalidParameter):
            w.truncate(99)
    assert [e.seq for e in ulog.read(after_seq=4)] == [5]


def test_entries_left_by_a_crashed_truncation_are_ignored_then_removed(ulog: UpdateLog) -> None:
    with ulog.open_writer() as w:
        for k in range(3):
            w.append("upsert", *batch(10 * k), f"b{k}")
    kept = entry_path(ulog, 1).read_bytes()
    with ulog.open_writer() as w:
        w.truncate(2)
    entry_path(ulog, 1).write_bytes(kept)  # as if the crash came before this delete
    assert [e.seq for e in ulog.read(after_seq=2)] == [3]
    with ulog.open_writer():
        pass
    assert ulog.entry_seqs() == [3]


@pytest.mark.parametrize("damage", ["flip", "cut", "empty"])
def test_damaged_entry_stops_replay_at_last_good_one(ulog: UpdateLog, damage: str) -> None:
    with ulog.open_writer() as w:
        for k in range(4):
            w.append("upsert", *batch(10 * k), f"b{k}")
    path = entry_path(ulog, 3)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "cut":
        data = data[: len(data) - 7]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    seen = []
    with pytest.raises(LogCorrupt, match=entry_name(3)):
        for entry in ulog.read():
            seen.append(entry.seq)
    assert seen == [1, 2]


def test_missing_entry_is_a_gap(ulog: UpdateLog) -> None:
    with ulog.open_writer() as w:
        for k in range(3):
            w.append("upsert", *batch(10 * k), f"b{k}")
    entry_path(ulog, 2).unlink()
    with pytest.raises(LogCorrupt, match="entry 2 is missing"):
        list(ulog.read())


def test_bad_batches_are_refused_before_anything_is_written(ulog: UpdateLog) -> None:
    ids, vecs = batch(0)
    with ulog.open_writer() as w:
        with pytest.raises(InvalidIds):
            w.append("upsert", ids.astype(np.int32), vecs, "x")
        with pytest.raises(InvalidVectors):
            w.append("upsert", ids, vecs.astype(np.float64), "x")
        with pytest.raises(InvalidVectors):
            w.append("upsert", ids[:3], vecs, "x")
        with pytest.raises(InvalidVectors):
            w.append("delete", ids, vecs, "x")
        with pytest.raises(InvalidParameter):
            w.append("merge", ids, vecs, "x")  # type: ignore[arg-type]
        with pytest.raises(InvalidParameter):
            w.append("upsert", ids, vecs, "")
        assert w.append("upsert", ids, vecs, "x").seq == 1


def test_reading_a_missing_root_creates_nothing(tmp_path: Path) -> None:
    ulog = UpdateLog(Storage.from_url(str(tmp_path / "nowhere")), "default")
    assert list(ulog.read()) == []
    assert ulog.last_seq() == 0
    assert not (tmp_path / "nowhere").exists()


def test_write_failing_mid_entry_leaves_the_log_intact_and_seq_reusable(tmp_path: Path) -> None:
    storage, fs = faulty_storage(tmp_path / "data")
    ulog = UpdateLog(storage, "default")
    with ulog.open_writer() as w:
        w.append("upsert", *batch(0), "b1")
        fs.budget = 100  # the disk fills up inside the next entry
        with pytest.raises(StorageUnavailable, match="ENOSPC"):
            w.append("upsert", *batch(10, n=50), "b2")
        fs.budget = None
        fs.fail_rename = True  # the entry is complete but cannot be published
        with pytest.raises(StorageUnavailable):
            w.append("upsert", *batch(10, n=50), "b2")
        fs.fail_rename = False
        assert [e.seq for e in ulog.read()] == [1]
        assert w.append("upsert", *batch(10, n=50), "b2").seq == 2  # no gap
    assert sorted(p.name for p in Path(ulog.folder).iterdir()) == [
        entry_name(1),
        entry_name(2),
        "writer.lock",
    ]


def test_read_only_storage_refuses_appends_and_keeps_entries(tmp_path: Path) -> None:
    root = tmp_path / "data"
    storage, fs = faulty_storage(root)
    ulog = UpdateLog(storage, "default")
    with ulog.open_writer() as w:
        w.append("upsert", *batch(0), "b1")
        w.truncate(1)
        w.append("upsert", *batch(10), "b2")
    ctx: Any
    if can_make_read_only(tmp_path):
        ctx = read_only(root)
    else:  # no chattr (root in a container): the filesystem itself refuses
        fs.read_only = True
        ctx = contextlib.nullcontext()
    with ctx:
        with ulog.open_writer() as w:
            with pytest.raises(StorageUnavailable):
                w.append("upsert", *batch(20), "b3")
            with pytest.raises(StorageUnavailable):
                w.truncate(2)
        assert [e.seq for e in ulog.read(after_seq=1)] == [2]
    assert (Path(ulog.folder) / TRUNCATED).exists()


def test_a_quarantined_seq_is_an_explicit_gap_never_reused(ulog: UpdateLog) -> None:
    with ulog.open_writer() as w:
        for k in range(3):
            w.append("upsert", *batch(10 * k), f"b{k}")
    kept = entry_path(ulog, 3).read_bytes()
    ulog.quarantine(3, "checked by hand")
    ulog.quarantine(3, "again")  # repeating a finished move changes nothing
    assert ulog.entry_seqs() == [1, 2] and ulog.last_seq() == 3
    assert (Path(ulog.folder) / "quarantine" / entry_name(3)).read_bytes() == kept
    assert ulog.quarantined()[3].reason == "checked by hand"
    assert ulog.quarantined()[3].batch_id == "b2"
    with ulog.open_writer() as w:
        # its batch was not applied: sent again, it is logged anew, not answered as a duplicate
        assert w.append("upsert", *batch(20), "b2") == Appended(seq=4, duplicate=False)
    assert [e.seq for e in ulog.read()] == [1, 2, 4]


def test_a_move_aside_interrupted_by_a_crash_is_finished_by_the_next_one(ulog: UpdateLog) -> None:
    with ulog.open_writer() as w:
        for k in range(3):
            w.append("upsert", *batch(10 * k), f"b{k}")
    kept = entry_path(ulog, 2).read_bytes()
    ulog.quarantine(2, "damaged")
    entry_path(ulog, 2).write_bytes(kept)  # as if the crash came before the log copy's removal
    assert [e.seq for e in ulog.read()] == [1, 3]  # quarantined: skipped wherever it lies
    with ulog.open_writer() as w:
        assert w.last_seq == 3
        assert w.append("upsert", *batch(10), "b1") == Appended(seq=4, duplicate=False)
    ulog.quarantine(2, "damaged")
    assert ulog.entry_seqs() == [1, 3, 4]
