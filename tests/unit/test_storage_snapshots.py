"""Snapshots: atomic publication, checksums per file kind, fallback, retention, faults."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from storage_support import can_make_read_only, faulty_storage, read_only

from faissq.errors import ManifestMismatch, SnapshotCorrupt, StorageUnavailable
from faissq.index.attributes import AttrTable
from faissq.storage.fs import Storage
from faissq.storage.snapshots import CURRENT, MANIFEST, SnapshotStore

DIM = 16
SCHEMA: dict[str, Any] = {"tenant": "int64", "lang": "keyword"}


@dataclass(frozen=True)
class Export:
    """Stands in for the engine's EngineExport (same fields)."""

    dim: int
    metric: str
    plan: dict[str, Any]
    index: Any
    primary_ids: np.ndarray
    primary_vectors: np.ndarray
    delta_ids: np.ndarray
    delta_vectors: np.ndarray
    tombstones: np.ndarray
    tuning: dict[str, Any] | None
    attributes: bytes = b""


def table_bytes(ids: np.ndarray) -> bytes:
    """An attribute table of these ids (a keyword field with nulls, an int64 field)."""
    table = AttrTable(SCHEMA).built(
        ids, {"tenant": ids % 7, "lang": ["en", None] * (len(ids) // 2)}
    )
    return table.to_bytes()


def make_export(n: int = 2000, seed: int = 0) -> Export:
    rng = np.random.default_rng(seed)
    vecs = rng.random((n, DIM), dtype=np.float32)
    ids = np.arange(n, dtype=np.int64) * 3 + seed
    index = faiss.index_factory(DIM, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    index.add_with_ids(vecs, ids)
    return Export(
        dim=DIM,
        metric="cosine",
        plan={"family": "ivf_flat", "factory": "IVF8,Flat", "nlist": 8},
        index=index,
        primary_ids=ids,
        primary_vectors=vecs,
        delta_ids=np.array([10**9, 10**9 + 1], np.int64),
        delta_vectors=rng.random((2, DIM), dtype=np.float32),
        tombstones=ids[:3].copy(),
        tuning={"chosen": {"nprobe": 4}, "recall": 0.97},
        attributes=table_bytes(ids),
    )


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(Storage.from_url(str(tmp_path / "data")), "default", retention=2)


def version_dir(store: SnapshotStore, version: str) -> Path:
    return Path(store.folder) / version


def assert_same(snap: Any, exp: Export) -> None:
    for name in ("primary_ids", "primary_vectors", "delta_ids", "delta_vectors", "tombstones"):
        np.testing.assert_array_equal(getattr(snap, name), getattr(exp, name))
    assert snap.tuning == exp.tuning
    assert snap.plan == exp.plan
    assert snap.attributes == exp.attributes
    q = exp.primary_vectors[:5]
    np.testing.assert_array_equal(snap.index.search(q, 3)[1], exp.index.search(q, 3)[1])


def test_save_then_load_round_trips_every_part(store: SnapshotStore) -> None:
    exp = make_export()
    info = store.save(exp, seq=7)
    assert (info.version, info.seq, info.current) == ("v00000001", 7, True)
    snap = store.load(dim=DIM, metric="cosine")
    assert snap is not None and snap.version == "v00000001" and snap.seq == 7
    assert_same(snap, exp)
    m = snap.manifest
    assert m["format"] == 2 and m["faiss_version"] == faiss.__version__
    assert all(set(f) == {"blake3", "bytes"} for f in m["files"].values())
    assert (m["dim"], m["metric"]) == (DIM, "cosine")
    assert (m["family"], m["factory"]) == ("ivf_flat", "IVF8,Flat")
    assert (m["ntotal"], m["delta_count"], m["tombstone_count"]) == (2000, 2, 3)
    assert m["parent"] is None and m["created_at"]
    assert set(m["files"]) == {
        "index.faiss",
        "primary_ids.npy",
        "primary_vectors.npy",
        "delta_ids.npy",
        "delta_vectors.npy",
        "tombstones.npy",
        "tuning.json",
        "attributes.msgpack",
    }
    # raw vectors are memory-mappable .npy files
    mm = np.load(version_dir(store, "v00000001") / "primary_vectors.npy", mmap_mode="r")
    np.testing.assert_array_equal(mm, exp.primary_vectors)


def test_unbuilt_index_saves_delta_only(store: SnapshotStore) -> None:
    exp = replace(
        make_export(),
        index=None,
        plan={},
        primary_ids=np.empty(0, np.int64),
        primary_vectors=np.empty((0, DIM), np.float32),
        tombstones=np.empty(0, np.int64),
        tuning=None,
    )
    store.save(exp, seq=1)
    snap = store.load()
    assert snap is not None and snap.index is None and snap.tuning is None
    np.testing.assert_array_equal(snap.delta_vectors, exp.delta_vectors)


def test_attributes_round_trip_and_snapshots_without_them_still_load(
    store: SnapshotStore,
) -> None:
    """The table is one more checked file; an export without fields writes none and loads as
    before (every snapshot saved before attributes existed)."""
    exp = make_export()
    store.save(exp, seq=1)
    snap = store.load()
    assert snap is not None and snap.export_fields()["attributes"] == exp.attributes
    table = AttrTable.from_bytes(SCHEMA, snap.attributes)
    assert table.values_of(exp.primary_ids[:3]) == {"tenant": [0, 3, 6],
                                                    "lang": ["en", None, "en"]}  # fmt: skip
    store.save(replace(exp, attributes=b""), seq=2)
    assert "attributes.msgpack" not in store.read_manifest("v00000002")["files"]
    snap = store.load()
    assert snap is not None and snap.version == "v00000002" and snap.attributes == b""


def test_versions_chain_and_retention_keeps_the_last_n(store: SnapshotStore) -> None:
    for k in range(4):
        store.save(make_export(seed=k), seq=10 * k)
    infos = store.ls()
    assert [i.version for i in infos] == ["v00000003", "v00000004"]
    assert [i.current for i in infos] == [False, True]
    assert store.read_manifest("v00000004")["parent"] == "v00000003"
    assert store.load() is not None


def test_nothing_saved_loads_as_none_and_creates_nothing(tmp_path: Path) -> None:
    store = SnapshotStore(Storage.from_url(str(tmp_path / "nowhere")), "default")
    assert store.load() is None
    assert store.ls() == []
    assert not (tmp_path / "nowhere").exists()


def test_manifest_disagreeing_with_settings_is_a_named_error(store: SnapshotStore) -> None:
    store.save(make_export(), seq=1)
    with pytest.raises(ManifestMismatch, match="dim 16"):
        store.load(dim=32, metric="cosine")
    with pytest.raises(ManifestMismatch, match="metric"):
        store.load(dim=DIM, metric="l2")


FILE_KINDS = [
    "index.faiss",
    "primary_ids.npy",
    "primary_vectors.npy",
    "delta_ids.npy",
    "delta_vectors.npy",
    "tombstones.npy",
    "tuning.json",
    "attributes.msgpack",
    MANIFEST,
]


@pytest.mark.parametrize("name", FILE_KINDS)
@pytest.mark.parametrize("where", ["head", "middle", "tail"])
def test_a_corrupted_byte_in_any_file_falls_back_to_the_previous_version(
    store: SnapshotStore, name: str, where: str
) -> None:
    old, new = make_export(seed=1), make_export(seed=2)
    store.save(old, seq=1)
    store.save(new, seq=2)
    path = version_dir(store, "v00000002") / name
    data = bytearray(path.read_bytes())
    pos = {"head": 0, "middle": len(data) // 2, "tail": len(data) - 2}[where]
    data[pos] ^= 0x20
    path.write_bytes(bytes(data))
    snap = store.load(dim=DIM, metric="cosine")
    assert snap is not None and snap.version == "v00000001" and snap.seq == 1
    assert len(snap.fallbacks) == 1 and snap.fallbacks[0].startswith("v00000002")
    assert_same(snap, old)
    with pytest.raises((SnapshotCorrupt, ManifestMismatch)):
        store.verify("v00000002")


def test_missing_file_falls_back(store: SnapshotStore) -> None:
    store.save(make_export(seed=1), seq=1)
    store.save(make_export(seed=2), seq=2)
    (version_dir(store, "v00000002") / "primary_vectors.npy").unlink()
    snap = store.load()
    assert snap is not None and snap.version == "v00000001"


def test_corrupted_current_pointer_loads_the_newest_good_version(store: SnapshotStore) -> None:
    store.save(make_export(seed=1), seq=1)
    store.save(make_export(seed=2), seq=2)
    (Path(store.current_path)).write_bytes(b'{"version": "v0000\x00')
    snap = store.load()
    assert snap is not None and snap.version == "v00000002"
    assert len(snap.notes) == 1 and snap.notes[0].startswith("CURRENT unreadable")
    assert snap.notes[0].endswith("loaded the newest verified version v00000002 (seq 2)")


def test_an_unreadable_current_without_any_complete_version_is_not_an_empty_index(
    store: SnapshotStore,
) -> None:
    store.save(make_export(seed=1), seq=1)
    (version_dir(store, "v00000001") / MANIFEST).unlink()
    Path(store.current_path).write_text("{}")
    with pytest.raises(SnapshotCorrupt, match="CURRENT unreadable"):
        store.load()


def test_no_good_version_at_all_is_snapshot_corrupt(store: SnapshotStore) -> None:
    store.save(make_export(), seq=1)
    (version_dir(store, "v00000001") / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(SnapshotCorrupt, match="no loadable snapshot"):
        store.load()


def test_unpublished_version_is_ignored_and_cleaned_by_the_next_save(store: SnapshotStore) -> None:
    store.save(make_export(seed=1), seq=1)
    store.save(make_export(seed=2), seq=2)
    (version_dir(store, "v00000002") / MANIFEST).unlink()  # as if killed before the manifest
    Path(store.current_path).write_text(json.dumps({"version": "v00000001"}))
    snap = store.load()
    assert snap is not None and snap.version == "v00000001" and snap.fallbacks == []
    store.save(make_export(seed=3), seq=3)
    assert not version_dir(store, "v00000002").exists()
    assert [i.version for i in store.ls()] == ["v00000001", "v00000003"]


def test_restore_points_current_at_an_older_version(store: SnapshotStore) -> None:
    store.save(make_export(seed=1), seq=1)
    store.save(make_export(seed=2), seq=2)
    store.set_current("v00000001")
    snap = store.load()
    assert snap is not None and snap.version == "v00000001"
    (version_dir(store, "v00000002") / "tombstones.npy").write_bytes(b"x")
    with pytest.raises(SnapshotCorrupt):
        store.set_current("v00000002")


@pytest.mark.parametrize("budget", [10, 5000, 40_000, 200_000])
def test_disk_full_mid_save_keeps_the_previous_version(tmp_path: Path, budget: int) -> None:
    storage, fs = faulty_storage(tmp_path / "data")
    store = SnapshotStore(storage, "default")
    store.save(make_export(seed=1), seq=1)
    fs.budget = budget
    with pytest.raises(StorageUnavailable):
        store.save(make_export(seed=2), seq=2)
    fs.budget = None
    snap = store.load()
    assert snap is not None and snap.version == "v00000001"
    assert store.save(make_export(seed=3), seq=3).version == "v00000003"
    assert [i.version for i in store.ls()] == ["v00000001", "v00000003"]


def test_read_only_storage_refuses_save_and_still_loads(tmp_path: Path) -> None:
    root = tmp_path / "data"
    storage, fs = faulty_storage(root)
    store = SnapshotStore(storage, "default")
    store.save(make_export(seed=1), seq=1)
    ctx: Any = contextlib.nullcontext()
    if can_make_read_only(tmp_path):
        ctx = read_only(root)
    else:
        fs.read_only = True
    with ctx:
        with pytest.raises(StorageUnavailable):
            store.save(make_export(seed=2), seq=2)
        snap = store.load(dim=DIM)  # loading never writes
        assert snap is not None and snap.version == "v00000001"
    assert (root / "default" / CURRENT).exists()
