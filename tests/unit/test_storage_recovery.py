"""Recovery with the real engine: snapshot + log replay, fallback, truncation, operator actions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from faissq.config import IndexSettings, Settings, StorageSettings
from faissq.errors import InvalidParameter, LogCorrupt, ManifestMismatch, SnapshotCorrupt
from faissq.index.engine import Engine
from faissq.storage import admin
from faissq.storage.durable import DurableStore
from faissq.storage.log import entry_name

DIM = 16
RNG = np.random.default_rng(7)


def vectors(n: int) -> np.ndarray:
    return RNG.random((n, DIM), dtype=np.float32)


def make_settings(root: Path, retention: int = 3, metric: str = "cosine") -> Settings:
    return Settings(
        storage=StorageSettings(url=str(root), retention=retention),
        index=IndexSettings(metric=metric),  # type: ignore[arg-type]
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture
def durable(settings: Settings) -> Iterator[DurableStore]:
    store = DurableStore(settings)
    yield store
    store.close()


def built_engine(settings: Settings, n: int = 6000) -> Engine:
    eng = Engine(DIM, settings.index, "default")
    eng.build(vectors(n), np.arange(n, dtype=np.int64))
    return eng


def mutate(durable: DurableStore, eng: Engine, start: int, tag: str) -> None:
    """Log then apply an upsert of 50 new ids, an overwrite of 5 old ones and a delete."""
    ids = np.concatenate([np.arange(start, start + 50), np.arange(5)]).astype(np.int64)
    vecs = vectors(len(ids))
    durable.append("default", "upsert", ids, vecs, f"{tag}-up")
    eng.upsert(ids, vecs)
    gone = np.array([start + 1, 10, 11], np.int64)
    durable.append("default", "delete", gone, None, f"{tag}-del")
    eng.delete(gone)


def assert_same_engine(a: Engine, b: Engine) -> None:
    assert a.ntotal == b.ntotal
    probe = np.arange(0, 20_000, dtype=np.int64)
    np.testing.assert_array_equal(a.contains(probe), b.contains(probe))
    q = vectors(10)
    ra, rb = a.search(q, 10), b.search(q, 10)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_allclose(ra.scores, rb.scores, rtol=1e-5)


def test_snapshot_plus_log_replay_restores_the_engine(settings: Settings) -> None:
    durable = DurableStore(settings)
    eng = built_engine(settings)
    mutate(durable, eng, 10_000, "a")
    summary = durable.save("default", eng, durable.next_seq("default") - 1)
    assert summary["seq"] == 2 and summary["version"] == "v00000001"
    mutate(durable, eng, 11_000, "b")
    durable.close()

    rec = DurableStore(settings).recover("default", dim=DIM)
    assert (rec.version, rec.seq, rec.replayed, rec.fallbacks) == ("v00000001", 4, 2, 0)
    assert rec.engine is not None
    assert_same_engine(rec.engine, eng)


def test_recovered_raw_vectors_stay_memory_mapped(settings: Settings) -> None:
    """A restart maps the snapshot's raw store instead of copying it into memory."""
    durable = DurableStore(settings)
    durable.save("default", built_engine(settings), durable.next_seq("default") - 1)
    durable.close()
    rec = DurableStore(settings).recover("default", dim=DIM)
    assert rec.engine is not None
    exp = rec.engine.export()
    for arr in (exp.primary_vectors, exp.primary_ids):
        assert isinstance(arr, np.memmap) or isinstance(arr.base, np.memmap)
        assert not arr.flags.writeable


def test_log_only_recovery_builds_the_engine_from_entries(durable: DurableStore) -> None:
    durable.append("default", "delete", np.array([1], np.int64), None, "d0")
    durable.append("default", "upsert", np.arange(30, dtype=np.int64), vectors(30), "u1")
    durable.append("default", "delete", np.array([3, 4], np.int64), None, "d1")
    rec = durable.recover("default")
    assert rec.engine is not None and rec.version is None
    assert (rec.seq, rec.replayed, rec.engine.ntotal) == (3, 3, 28)


def test_nothing_stored_recovers_to_no_engine(durable: DurableStore) -> None:
    rec = durable.recover("default")
    assert rec.engine is None and rec.seq == 0


def test_damaged_newest_snapshot_falls_back_and_replays_further(settings: Settings) -> None:
    durable = DurableStore(settings)
    eng = built_engine(settings)
    mutate(durable, eng, 10_000, "a")
    durable.save("default", eng, durable.next_seq("default") - 1)
    mutate(durable, eng, 11_000, "b")
    durable.save("default", eng, durable.next_seq("default") - 1)
    mutate(durable, eng, 12_000, "c")
    durable.close()
    victim = Path(durable.snapshots("default").folder) / "v00000002" / "primary_vectors.npy"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))

    rec = DurableStore(settings).recover("default", dim=DIM)
    assert (rec.version, rec.fallbacks, rec.seq, rec.replayed) == ("v00000001", 1, 6, 4)
    assert any("v00000002" in n for n in rec.notes)
    assert rec.engine is not None
    assert_same_engine(rec.engine, eng)


def test_fallback_older_than_the_truncated_log_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", retention=2)
    durable = DurableStore(settings)
    eng = built_engine(settings)
    mutate(durable, eng, 10_000, "a")
    durable.save("default", eng, durable.next_seq("default") - 1)
    mutate(durable, eng, 11_000, "b")
    durable.save("default", eng, durable.next_seq("default") - 1)
    durable.writer("default").truncate(4)  # as if retention had dropped v1's entries
    durable.close()
    (Path(durable.snapshots("default").folder) / "v00000002" / "index.faiss").write_bytes(b"x")
    with pytest.raises(SnapshotCorrupt, match=r"truncated up to seq 4"):
        DurableStore(settings).recover("default")


def test_save_trims_the_log_to_the_oldest_retained_snapshot(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", retention=2)
    durable = DurableStore(settings)
    eng = built_engine(settings)
    for k in range(3):
        mutate(durable, eng, 10_000 + 1000 * k, f"m{k}")
        durable.save("default", eng, durable.next_seq("default") - 1)
    # retained versions cover seqs 4 and 6: entries after 4 stay for a fallback to v2
    assert durable.log("default").truncation().upto == 4
    assert durable.log("default").entry_seqs() == [5, 6]
    # a redelivered batch that was truncated away is still recognised
    again = durable.append("default", "upsert", np.arange(3, dtype=np.int64), vectors(3), "m0-up")
    assert (again.seq, again.duplicate) == (1, True)
    durable.close()


def test_damaged_log_entry_between_good_ones_stops_recovery(settings: Settings) -> None:
    durable = DurableStore(settings)
    for k in range(4):
        ids = np.arange(10 * k, 10 * k + 10, dtype=np.int64)
        durable.append("default", "upsert", ids, vectors(10), f"b{k}")
    durable.close()
    path = Path(durable.log("default").folder) / entry_name(3)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(LogCorrupt, match=r"stopped after seq 2.*" + entry_name(3)):
        durable.recover("default")
    assert path.exists()  # an entry with good ones after it is never moved aside by itself


def test_settings_disagreeing_with_the_snapshot_are_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    durable = DurableStore(settings)
    durable.save("default", built_engine(settings), durable.next_seq("default") - 1)
    durable.close()
    with pytest.raises(ManifestMismatch, match="dim"):
        DurableStore(settings).recover("default", dim=DIM * 2)
    l2 = make_settings(tmp_path / "data", metric="l2")
    with pytest.raises(ManifestMismatch, match="metric"):
        DurableStore(l2).recover("default")


def test_bad_index_names_are_refused(durable: DurableStore) -> None:
    with pytest.raises(InvalidParameter):
        durable.recover("../etc")


def test_operator_ls_verify_restore(settings: Settings) -> None:
    durable = DurableStore(settings)
    eng = built_engine(settings)
    mutate(durable, eng, 10_000, "a")
    durable.save("default", eng, durable.next_seq("default") - 1)
    eng2 = built_engine(settings, n=7000)  # a rebuild the operator wants to roll back
    durable.save("default", eng2, durable.next_seq("default") - 1)
    durable.close()
    listed = admin.ls(settings, "default")
    assert [(i["version"], i["current"]) for i in listed] == [
        ("v00000001", False),
        ("v00000002", True),
    ]
    assert admin.verify(settings, "default") == {"v00000001": "ok", "v00000002": "ok"}
    out = admin.restore(settings, "default", "v00000001")
    assert (out["current"], out["previous"]) == ("v00000001", "v00000002")
    rec = DurableStore(settings).recover("default")
    assert rec.engine is not None and rec.version == "v00000001"
    assert_same_engine(rec.engine, eng)
    (Path(durable.snapshots("default").folder) / "v00000002" / "tuning.json").write_text("{}")
    assert admin.verify(settings, "default", "v00000002")["v00000002"].startswith(
        "snapshot_corrupt"
    )
