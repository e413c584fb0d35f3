"""A lost CURRENT pointer never hides built vectors; a reduced index is never published."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from faissq.config import IndexSettings, Settings, StorageSettings
from faissq.errors import SnapshotCorrupt, WriterConflict
from faissq.index.engine import Engine
from faissq.storage.durable import DurableStore

DIM = 16
RNG = np.random.default_rng(11)


def vectors(n: int) -> np.ndarray:
    return RNG.random((n, DIM), dtype=np.float32)


def make_settings(root: Path) -> Settings:
    return Settings(storage=StorageSettings(url=str(root), retention=3), index=IndexSettings())


def built(settings: Settings, n: int = 3000) -> Engine:
    eng = Engine(DIM, settings.index, "default")
    eng.build(vectors(n), np.arange(n, dtype=np.int64))
    return eng


def upsert(durable: DurableStore, eng: Engine, start: int, tag: str, n: int = 40) -> None:
    """Log then apply `n` new ids from `start` (as the writer does)."""
    ids, vecs = np.arange(start, start + n, dtype=np.int64), vectors(n)
    durable.append("default", "upsert", ids, vecs, tag)
    eng.upsert(ids, vecs)


def current(durable: DurableStore) -> Path:
    return Path(durable.snapshots("default").current_path)


def history(settings: Settings, saves: int = 3) -> tuple[DurableStore, Engine]:
    """A build, then `saves` rounds of upsert + save, then one more upsert (the log's tail)."""
    durable = DurableStore(settings)
    eng = built(settings)
    durable.save("default", eng, durable.next_seq("default") - 1)
    for k in range(saves):
        upsert(durable, eng, 10_000 + 1000 * k, f"s{k}")
        durable.save("default", eng, durable.next_seq("default") - 1)
    upsert(durable, eng, 50_000, "tail")
    return durable, eng


def test_missing_current_with_a_trimmed_log_loads_the_newest_verified_version(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path / "data")
    durable, eng = history(settings)
    assert durable.log("default").truncation().upto > 0  # retention trimmed the log
    durable.close()
    current(durable).unlink()

    rec = DurableStore(settings).recover("default")
    assert rec.engine is not None and rec.engine.ntotal == eng.ntotal == 3000 + 4 * 40
    assert (rec.version, rec.seq, rec.replayed) == ("v00000004", 4, 1)
    assert rec.notes == ["CURRENT missing: loaded the newest verified version v00000004 (seq 3)"]


def test_missing_current_keeps_built_vectors_and_the_next_save_publishes_them(
    tmp_path: Path,
) -> None:
    """The log holds only mutations after the build: losing CURRENT must not drop the build."""
    settings = make_settings(tmp_path / "data")
    durable = DurableStore(settings)
    eng = built(settings)
    durable.save("default", eng, durable.next_seq("default") - 1)
    upsert(durable, eng, 10_000, "a")
    upsert(durable, eng, 11_000, "b")
    durable.close()
    current(durable).unlink()

    writer = DurableStore(settings)
    rec = writer.recover("default")
    assert rec.engine is not None and rec.engine.ntotal == 3000 + 80
    assert rec.notes and "CURRENT missing" in rec.notes[0] and "v00000001" in rec.notes[0]
    saved = writer.save("default", rec.engine, writer.next_seq("default") - 1)
    writer.close()
    assert saved["ntotal"] == 3000 and saved["version"] == "v00000002"  # primary + delta kept
    again = DurableStore(settings).recover("default")
    assert again.notes == [] and again.version == "v00000002"
    assert again.engine is not None and again.engine.ntotal == 3000 + 80


def test_missing_current_falls_back_past_a_damaged_newest_version(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    durable, eng = history(settings, saves=2)
    durable.close()
    current(durable).unlink()
    victim = Path(durable.snapshots("default").folder) / "v00000003" / "primary_vectors.npy"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))

    rec = DurableStore(settings).recover("default")
    assert rec.version == "v00000002" and rec.fallbacks == 1
    assert rec.engine is not None and rec.engine.ntotal == eng.ntotal
    assert "CURRENT missing" in rec.notes[0] and "v00000002" in rec.notes[0]
    assert any("v00000003" in n for n in rec.notes[1:])


def test_missing_current_and_every_version_damaged_fails_loudly(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    durable = DurableStore(settings)
    durable.save("default", built(settings), durable.next_seq("default") - 1)
    durable.close()
    current(durable).unlink()
    (Path(durable.snapshots("default").folder) / "v00000001" / "index.faiss").write_bytes(b"x")
    with pytest.raises(SnapshotCorrupt, match=r"CURRENT missing; v00000001: .*checksum"):
        DurableStore(settings).recover("default")


def test_no_complete_version_and_no_current_is_never_published(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    durable = DurableStore(settings)
    durable.save("default", built(settings), durable.next_seq("default") - 1)
    durable.close()
    current(durable).unlink()
    (Path(durable.snapshots("default").folder) / "v00000001" / "manifest.json").unlink()
    rec = DurableStore(settings).recover("default")  # a first save that crashed mid-way
    assert rec.engine is None and rec.notes == []


def test_a_truncated_log_without_any_snapshot_names_the_missing_snapshots(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    durable, _ = history(settings)
    durable.close()
    current(durable).unlink()
    for version in Path(durable.snapshots("default").folder).iterdir():
        (version / "manifest.json").unlink()
    with pytest.raises(SnapshotCorrupt, match=r"no complete snapshot version is stored"):
        DurableStore(settings).recover("default")


def test_a_save_covering_an_older_seq_than_a_stored_version_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    durable, eng = history(settings, saves=1)  # v2 covers seq 1
    store = durable.snapshots("default")
    before = (store.versions(), store.current_version())
    with pytest.raises(WriterConflict, match=r"covers seq 0 but v00000002 already covers seq 1"):
        store.save(built(settings, n=500).export(), seq=0)
    assert (store.versions(), store.current_version()) == before
    assert store.save(eng.export(), seq=1).version == "v00000003"  # the same seq is fine
    durable.close()
