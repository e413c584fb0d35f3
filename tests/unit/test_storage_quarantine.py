"""A damaged log entry: the newest is quarantined and the rest served; one between good entries
stops recovery; operators inspect, quarantine and resolve entries by hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from faissq.cli.main import main
from faissq.config import Settings, StorageSettings
from faissq.errors import InvalidParameter, LogCorrupt
from faissq.storage import admin
from faissq.storage.durable import DurableStore
from faissq.storage.log import entry_name
from faissq.worker.replica import ReadOnlyStore

DIM = 8


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(storage=StorageSettings(url=str(tmp_path / "data")))


@pytest.fixture
def logged(settings: Settings) -> Iterator[DurableStore]:
    """Four upserts of 10 vectors each (seqs 1..4, batch ids b0..b3), writer closed."""
    durable = DurableStore(settings)
    for k in range(4):
        ids = np.arange(10 * k, 10 * k + 10, dtype=np.int64)
        vecs = np.random.default_rng(k).random((10, DIM), dtype=np.float32)
        durable.append("default", "upsert", ids, vecs, f"b{k}")
    durable.close()
    yield durable
    durable.close()


def entry(durable: DurableStore, seq: int, *, quarantined: bool = False) -> Path:
    folder = Path(durable.log("default").folder)
    return (folder / "quarantine" if quarantined else folder) / entry_name(seq)


def damage(path: Path, how: str = "flip") -> bytes:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "cut":
        data = data[: len(data) - 7]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("how", ["flip", "cut", "empty"])
def test_a_damaged_newest_entry_is_quarantined_and_the_rest_served(
    settings: Settings, logged: DurableStore, how: str
) -> None:
    bad = damage(entry(logged, 4), how)
    writer = DurableStore(settings)
    rec = writer.recover("default")
    assert rec.engine is not None and (rec.seq, rec.engine.ntotal) == (3, 30)
    assert rec.quarantined == [4] and len(rec.notes) == 1
    assert rec.notes[0].startswith("newest log entry 4 is damaged") and "quarantine" in rec.notes[0]
    assert not entry(logged, 4).exists()
    assert entry(logged, 4, quarantined=True).read_bytes() == bad  # kept exactly as found
    # the seq is never reused, and the lost batch can be sent again and is applied
    again = writer.append("default", "upsert", np.arange(30, 40), np.ones((10, DIM), "f4"), "b3")
    assert (again.seq, again.duplicate) == (5, False)
    writer.close()

    later = DurableStore(settings).recover("default")
    assert later.engine is not None and (later.seq, later.engine.ntotal) == (5, 40)
    assert len(later.notes) == 1 and later.notes[0].startswith("log entry 4 is quarantined")
    admin.log_resolve(settings, "default", 4, "b3 re-sent as seq 5")
    resolved = DurableStore(settings).recover("default")
    assert resolved.notes == [] and resolved.seq == 5
    assert entry(logged, 4, quarantined=True).exists()  # resolved, still kept


def test_a_replica_stops_before_a_damaged_newest_entry_and_moves_nothing(
    settings: Settings, logged: DurableStore
) -> None:
    damage(entry(logged, 4))
    rec = ReadOnlyStore(DurableStore(settings)).recover("default")
    assert rec.engine is not None and (rec.seq, rec.engine.ntotal) == (3, 30)
    assert rec.quarantined == [] and "newest log entry 4 is damaged" in rec.notes[0]
    assert entry(logged, 4).exists() and not entry(logged, 4, quarantined=True).exists()


def test_a_reload_by_the_writer_keeps_its_open_log_from_reusing_the_seq(
    settings: Settings, logged: DurableStore
) -> None:
    writer = DurableStore(settings)
    writer.writer("default")  # opened before the damage, as in a running worker
    damage(entry(logged, 4))
    writer.recover("default")
    again = writer.append("default", "upsert", np.arange(3), np.ones((3, DIM), "f4"), "b3")
    assert (again.seq, again.duplicate) == (5, False)
    writer.close()


def test_a_damaged_entry_between_good_ones_fails_recovery_and_names_the_repair(
    settings: Settings, logged: DurableStore
) -> None:
    damage(entry(logged, 2))
    with pytest.raises(LogCorrupt) as info:
        DurableStore(settings).recover("default")
    msg = str(info.value)
    assert "stopped after seq 1" in msg and entry_name(2) in msg and "up to seq 4" in msg
    assert "faissq log quarantine --index default --seq 2" in msg
    assert entry(logged, 2).exists()  # never moved without an operator

    report = admin.log_verify(settings, "default")
    assert [(r["seq"], r["verdict"][:7]) for r in report["entries"]] == [
        (1, "ok"), (2, "damaged"), (3, "ok"), (4, "ok")
    ]  # fmt: skip
    assert report["entries"][0]["batch_id"] == "b0" and report["problems"] == 1

    admin.log_quarantine(settings, "default", 2)  # the operator accepts the loss of b1
    rec = DurableStore(settings).recover("default")
    assert rec.engine is not None and (rec.seq, rec.engine.ntotal) == (4, 30)
    assert len(rec.notes) == 1 and rec.notes[0].startswith("log entry 2 is quarantined")
    report = admin.log_verify(settings, "default")
    assert [r["seq"] for r in report["entries"]] == [1, 3, 4]
    assert [q["seq"] for q in report["quarantined"]] == [2] and report["problems"] == 1


def test_a_missing_entry_between_good_ones_fails_recovery(
    settings: Settings, logged: DurableStore
) -> None:
    entry(logged, 3).unlink()
    with pytest.raises(LogCorrupt, match=r"entry 3 is missing.*cannot be skipped silently"):
        DurableStore(settings).recover("default")
    assert admin.log_verify(settings, "default")["entries"][2] == {
        "seq": 3, "batch_id": None, "op": None, "n": None, "verdict": "missing"
    }  # fmt: skip


def test_quarantine_refuses_a_good_entry_unless_forced(
    settings: Settings, logged: DurableStore
) -> None:
    with pytest.raises(InvalidParameter, match="verifies"):
        admin.log_quarantine(settings, "default", 3)
    assert entry(logged, 3).exists()
    done = admin.log_quarantine(settings, "default", 3, force=True)
    assert done["seq"] == 3 and done["batch_id"] == "b2" and "--force" in done["reason"]
    with pytest.raises(InvalidParameter, match="already quarantined"):
        admin.log_quarantine(settings, "default", 3)
    with pytest.raises(InvalidParameter, match="not in"):
        admin.log_resolve(settings, "default", 9, "nothing there")


def test_cli_log_verify_quarantine_resolve(
    settings: Settings,
    logged: DurableStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FAISSQ_STORAGE__URL", settings.storage.url)
    assert main(["log", "verify", "--index", "default"]) == 0
    assert "b3" in capsys.readouterr().out
    damage(entry(logged, 2))
    assert main(["log", "verify", "--index", "default"]) == 1
    out = capsys.readouterr().out
    assert "damaged" in out and "1 problem(s)" in out
    assert main(["log", "quarantine", "--index", "default", "--seq", "3"]) == 1  # a good one
    assert "verifies" in capsys.readouterr().err
    assert main(["log", "quarantine", "--index", "default", "--seq", "2"]) == 0
    assert "moved to log/quarantine/" in capsys.readouterr().out
    assert main(["log", "verify", "--index", "default"]) == 1  # quarantined, not yet resolved
    assert main(["log", "resolve", "--index", "default", "--seq", "2", "--note", "re-sent"]) == 0
    capsys.readouterr()
    assert main(["log", "verify", "--index", "default"]) == 0
    assert "resolved" in capsys.readouterr().out
