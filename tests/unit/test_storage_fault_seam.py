"""The faultfs seam: failures and hangs start and stop on the control file's word, and the
durable log append and recovery driven through it keep every acknowledged batch whole."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest

from faissq.config import Settings, StorageSettings
from faissq.errors import StorageUnavailable, WriterConflict
from faissq.storage import faults
from faissq.storage.durable import DurableStore
from faissq.storage.fs import TMP_PREFIX
from faissq.storage.log import LOCK, Appended, entry_name
from faissq.storage.log_entry import HEAD

DIM = 8


def make_fs(tmp_path: Path) -> tuple[faults.FaultFS, str]:
    control = str(tmp_path / "faults.json")
    return fsspec.filesystem(faults.PROTOCOL, control=control), control


def test_a_failure_is_counted_and_stops_after_times(tmp_path: Path) -> None:
    """`times` bounds the injected failures; each one is counted in the hits file."""
    fs, control = make_fs(tmp_path)
    faults.set_faults(control, ["rename"], errno="ENOSPC", times=1)
    fs.pipe_file(str(tmp_path / "a"), b"x")
    with pytest.raises(OSError, match="injected on rename"):
        fs.mv(str(tmp_path / "a"), str(tmp_path / "b"))
    fs.mv(str(tmp_path / "a"), str(tmp_path / "b"))
    assert faults.hits(control) == 1


def test_a_stall_holds_only_matching_paths_until_cleared(tmp_path: Path) -> None:
    """A hung rename of CURRENT blocks until the control file lets go; others pass meanwhile."""
    fs, control = make_fs(tmp_path)
    for name in ("a", "CURRENT.tmp"):
        fs.pipe_file(str(tmp_path / name), b"x")
    faults.set_faults(control, stall=["rename"], match="CURRENT")
    fs.mv(str(tmp_path / "a"), str(tmp_path / "b"))  # no match: not held
    done = threading.Event()

    def flip() -> None:
        fs.mv(str(tmp_path / "CURRENT.tmp"), str(tmp_path / "CURRENT"))
        done.set()

    thread = threading.Thread(target=flip)
    thread.start()
    while faults.stalls(control) < 1:  # the event: the rename has started hanging
        assert thread.is_alive()
    assert not done.is_set() and not (tmp_path / "CURRENT").exists()
    faults.set_faults(control, [])
    thread.join(timeout=30)
    assert done.is_set() and (tmp_path / "CURRENT").read_bytes() == b"x"


def test_unknown_operations_are_refused(tmp_path: Path) -> None:
    """A typo in a drill must not silently inject nothing."""
    with pytest.raises(ValueError, match="unknown fault operations"):
        faults.set_faults(str(tmp_path / "c.json"), stall=["renmae"])


def open_store(tmp_path: Path, *, in_place: bool = False) -> tuple[DurableStore, str]:
    """A DurableStore on faultfs:// as a worker opens it; in_place: write entries straight under
    their name (the discipline of every backend without an atomic link, object stores)."""
    control = str(tmp_path / "faults.json")
    url = f"{faults.PROTOCOL}://{tmp_path / 'data'}"
    store = DurableStore(Settings(storage=StorageSettings(url=url, options={"control": control})))
    store.storage.is_local = not in_place
    return store, control


def append(store: DurableStore, k: int, batch_id: str) -> Appended:
    ids = np.arange(10 * k, 10 * k + 10, dtype=np.int64)
    vecs = np.random.default_rng(k).random((10, DIM), dtype=np.float32)
    return store.append("default", "upsert", ids, vecs, batch_id)


def log_files(store: DurableStore) -> list[str]:
    """Every name in the log folder, unfinished temp files included."""
    return sorted(os.listdir(store.log("default").folder))


def test_an_fsync_failure_fails_the_append_and_publishes_nothing(tmp_path: Path) -> None:
    """A failed fsync is a failed append: typed error, no entry, the same seq for the next one."""
    store, control = open_store(tmp_path)
    assert append(store, 0, "b0") == Appended(1, duplicate=False)
    faults.set_faults(control, ["fsync"], times=1)
    with pytest.raises(StorageUnavailable, match="injected on fsync"):
        append(store, 1, "b1")
    assert faults.hits(control) == 1
    assert log_files(store) == [entry_name(1), LOCK]  # its temp file is gone too
    assert [e.seq for e in store.log("default").read()] == [1]
    # not remembered as logged: sent again it is logged anew, at the seq the failure left free
    assert append(store, 1, "b1") == Appended(2, duplicate=False)
    assert append(store, 2, "b2") == Appended(3, duplicate=False)
    store.close()

    rec = open_store(tmp_path)[0].recover("default")
    assert rec.engine is not None and (rec.seq, rec.replayed, rec.engine.ntotal) == (3, 3, 30)
    assert rec.notes == [] and rec.quarantined == []


@pytest.mark.parametrize("discard_fails", [False, True])
def test_a_torn_write_is_never_published(tmp_path: Path, discard_fails: bool) -> None:
    """Locally an entry is linked only once whole: a torn one stays an unfinished temp file,
    which no reader lists, and its seq goes to the next append."""
    store, control = open_store(tmp_path)
    append(store, 0, "b0")
    fail, times = (["write", "remove"], 2) if discard_fails else (["write"], 1)
    faults.set_faults(control, fail, errno="ENOSPC", truncate_after=HEAD.size + 200, times=times)
    with pytest.raises(StorageUnavailable, match="ENOSPC"):
        append(store, 1, "b1")
    assert faults.hits(control) == times
    left = [n for n in log_files(store) if n.startswith(TMP_PREFIX)]
    assert len(left) == int(discard_fails)  # a temp file kept only when removing it failed
    assert store.log("default").entry_seqs() == [1]
    assert append(store, 1, "b1") == Appended(2, duplicate=False)
    store.close()

    rec = open_store(tmp_path)[0].recover("default")
    assert rec.engine is not None and (rec.seq, rec.engine.ntotal) == (2, 20)
    assert rec.notes == [] and rec.quarantined == []


def test_a_torn_entry_written_in_place_is_never_acknowledged(tmp_path: Path) -> None:
    """Where a torn write stays under the entry's name, its retry is refused, not answered as
    logged; the next writer locks, recovery quarantines the entry and says so, the batch is
    logged anew."""
    store, control = open_store(tmp_path, in_place=True)
    append(store, 0, "b0")
    faults.set_faults(control, ["write"], errno="ENOSPC", truncate_after=HEAD.size + 200, times=1)
    with pytest.raises(StorageUnavailable, match="ENOSPC"):
        append(store, 1, "b1")
    assert store.log("default").entry_seqs() == [1, 2]  # torn, under its final name
    with pytest.raises(WriterConflict, match="log verify"):
        append(store, 1, "b1")  # its header is intact, its checksum is not
    store.close()

    writer, _ = open_store(tmp_path, in_place=True)
    writer.lock("default")  # a worker locks before it recovers
    rec = writer.recover("default")
    assert rec.engine is not None and (rec.seq, rec.engine.ntotal) == (1, 10)
    assert rec.quarantined == [2] and rec.notes[0].startswith("newest log entry 2 is damaged")
    assert append(writer, 1, "b1") == Appended(3, duplicate=False)
    writer.close()

    later = open_store(tmp_path)[0].recover("default")
    assert later.engine is not None and (later.seq, later.engine.ntotal) == (3, 20)
    assert any("log entry 2 is quarantined" in n for n in later.notes)  # until resolved


def test_a_writer_locks_past_an_entry_torn_inside_its_header(tmp_path: Path) -> None:
    """A newest entry cut inside its header does not stop the writer's lock, which comes
    before recovery: recovery, not the lock, quarantines it."""
    store, control = open_store(tmp_path, in_place=True)
    append(store, 0, "b0")
    faults.set_faults(control, ["write"], truncate_after=HEAD.size + 10, times=1)
    with pytest.raises(StorageUnavailable):
        append(store, 1, "b1")
    store.close()

    writer, _ = open_store(tmp_path)
    writer.lock("default")
    rec = writer.recover("default")
    assert (rec.seq, rec.quarantined) == (1, [2])
    assert append(writer, 1, "b1") == Appended(3, duplicate=False)
    writer.close()
