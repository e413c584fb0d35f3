"""IndexRuntime without Celery: write-ahead apply, idempotent batches, build swap, recovery."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from faissq.config import Settings
from faissq.errors import IndexNotReady, InvalidAttributes, SnapshotCorrupt, UnknownIndex
from faissq.index.engine import Engine
from faissq.storage.durable import DurableStore
from faissq.worker import publish
from faissq.worker.runtime import IndexRuntime
from faissq.worker.slots import IndexState


def make(tmp_path: Path, **index: Any) -> IndexRuntime:
    """A runtime over a temp storage root serving index 'a' (`index`: its settings)."""
    s = Settings(storage={"url": str(tmp_path)}, gpu={"mode": "off"}, worker={"indexes": ["a"]},
                 index=index)  # fmt: skip
    rt = IndexRuntime(s, DurableStore(s))
    rt.load_all()
    return rt


def vecs(n: int, seed: int = 0) -> np.ndarray:
    """Random float32 vectors of dimension 8."""
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def no_check(engine: object) -> None:
    """Accept every batch."""


def test_empty_index_takes_upserts_and_survives_a_restart(tmp_path: Path) -> None:
    """An upsert creates the engine; a new runtime on the same storage replays the log."""
    rt = make(tmp_path)
    assert rt.slot("a").state is IndexState.EMPTY
    with pytest.raises(IndexNotReady):
        rt.engine("a")
    out = rt.apply("a", "upsert", np.arange(10), vecs(10), "b1", check=no_check)
    assert out["seq"] == 1 and out["applied"] == 10 and out["ntotal"] == 10
    again = rt.apply("a", "upsert", np.arange(10), vecs(10), "b1", check=no_check)
    assert again["duplicate"] is True and again["seq"] == 1 and again["ntotal"] == 10
    rt.apply("a", "delete", np.arange(3), None, "b2", check=no_check)
    rt.close()

    rt2 = make(tmp_path)
    assert rt2.slot("a").state is IndexState.READY and rt2.slot("a").seq == 2
    assert rt2.engine("a").ntotal == 7
    rt2.close()


def test_build_is_snapshotted_before_it_is_swapped_in(tmp_path: Path) -> None:
    """The built engine is on storage when the job returns; recovery starts from it."""
    rt = make(tmp_path)
    rt.apply("a", "upsert", np.arange(5), vecs(5), "b1", check=no_check)
    phases: list[str] = []
    report = rt.build("a", vecs(300, 1), np.arange(100, 400), family=None,
                      progress=lambda p, d, t: phases.append(p))  # fmt: skip
    assert report["ntotal"] == 300 and report["snapshot"]["persisted"] is True
    assert "save" in phases and rt.slot("a").state is IndexState.READY
    rt.close()
    rt2 = make(tmp_path)
    assert rt2.engine("a").ntotal == 300 and rt2.slot("a").version == report["snapshot"]["version"]
    rt2.close()


def test_attributes_are_checked_first_then_logged_snapshotted_and_kept_by_a_rebuild(
    tmp_path: Path,
) -> None:
    """A bad batch leaves nothing behind; good ones come back from the build's snapshot, the
    log, a later snapshot, and survive a gated rebuild (a new engine built beside the old)."""
    schema = {"tenant": "int64", "lang": "keyword"}
    rt = make(tmp_path, attributes=schema)
    with pytest.raises(InvalidAttributes):
        rt.build("a", vecs(4), np.arange(4), family="flat", progress=None,
                 attributes={"tenant": [1, 2]})  # fmt: skip
    built = {"tenant": [1, 2, None, 4], "lang": ["en", "de", "en", None]}
    rt.build("a", vecs(4), np.arange(4), family="flat", progress=None, attributes=built)
    for bad in ({"tenant": ["1", 2, 3, 4]}, {"colour": ["red"] * 4}, ["en"] * 4):
        with pytest.raises(InvalidAttributes):
            rt.apply("a", "upsert", np.arange(2, 6), vecs(4, 1), "bad", check=no_check,
                     attributes=bad)  # fmt: skip
    assert rt.store.log("a").entry_seqs() == []  # type: ignore[attr-defined]
    out = rt.apply("a", "upsert", np.arange(2, 6), vecs(4, 1), "b1", check=no_check,
                   attributes={"tenant": [30, 40, 50, 60]})  # fmt: skip
    assert out["applied"] == 4
    want = {"tenant": [1, 2, 30, 40, 50, 60], "lang": ["en", "de", None, None, None, None]}
    assert rt.engine("a").attributes_of(np.arange(6)) == want
    rt.close()

    rt = make(tmp_path, attributes=schema)  # the build's snapshot + the logged upsert
    assert rt.engine("a").attributes_of(np.arange(6)) == want
    rt.save("a")
    rt.close()
    rt = make(tmp_path, attributes=schema)  # the new snapshot alone: it covers the upsert
    assert rt.store.recover("a").replayed == 0
    assert rt.engine("a").attributes_of(np.arange(6)) == want
    publish.rebuild(rt, "a", None, False, None)
    assert rt.engine("a").attributes_of(np.arange(6)) == want
    hits = rt.engine("a").search(vecs(1, 1), 6, filter={"field": "tenant", "gte": 40}).ids
    assert sorted(int(i) for i in hits[0] if i >= 0) == [3, 4, 5]
    rt.close()


def test_failed_build_keeps_the_old_engine(tmp_path: Path) -> None:
    """A build that raises leaves the previous engine serving, in its previous state."""
    rt = make(tmp_path)
    rt.apply("a", "upsert", np.arange(5), vecs(5), "b1", check=no_check)
    old = rt.engine("a")

    def stop(phase: str, done: int, total: int) -> None:
        raise IndexNotReady("stop")

    with pytest.raises(IndexNotReady):
        rt.build("a", vecs(50), np.arange(50), family=None, progress=stop)
    assert rt.engine("a") is old and rt.slot("a").state is IndexState.READY
    rt.close()


def test_unknown_index_and_a_check_that_refuses(tmp_path: Path) -> None:
    """Jobs for other indexes are UnknownIndex; a failed check logs nothing."""
    rt = make(tmp_path)
    with pytest.raises(UnknownIndex):
        rt.stats("zz")

    def refuse(engine: object) -> None:
        raise IndexNotReady("no")

    with pytest.raises(IndexNotReady):
        rt.apply("a", "upsert", np.arange(2), vecs(2), "b9", check=refuse)
    assert rt.stats("a")["seq"] == 0
    rt.close()


def test_a_corrupt_store_marks_the_index_failed_not_the_process(tmp_path: Path) -> None:
    """Recovery errors leave the index FAILED with the reason; jobs then get IndexNotReady."""
    rt = make(tmp_path)
    rt.apply("a", "upsert", np.arange(2), vecs(2), "b1", check=no_check)
    rt.apply("a", "upsert", np.arange(2, 4), vecs(2), "b2", check=no_check)
    rt.close()
    entry = min((tmp_path / "a" / "log").glob("*.entry"))  # damaged, with a good entry after it
    entry.write_bytes(entry.read_bytes()[:-5])
    rt2 = make(tmp_path)
    assert rt2.slot("a").state is IndexState.FAILED and "log" in rt2.slot("a").reason
    with pytest.raises(IndexNotReady):
        rt2.apply("a", "upsert", np.arange(2), vecs(2), "b2", check=no_check)
    rt2.close()


class Interrupted(BaseException):
    """What `except Exception` lets through (as KeyboardInterrupt or a shutdown's SystemExit)."""


class FailingEngine(Engine):
    """An engine whose next `fail` upserts raise `fault`: MemoryError, as a delta that cannot grow
    does, or an exception that escapes the apply without its in-place recovery."""

    fail = 0
    fault: type[BaseException] = MemoryError

    def upsert(self, ids: Any, vectors: Any, **kw: Any) -> int:
        if FailingEngine.fail:
            FailingEngine.fail -= 1
            raise FailingEngine.fault("injected: the delta cannot grow")
        return super().upsert(ids, vectors, **kw)


@pytest.fixture
def failing_engine() -> Iterator[type[FailingEngine]]:
    """FailingEngine with no fault armed, disarmed again afterwards."""
    FailingEngine.fail, FailingEngine.fault = 0, MemoryError
    yield FailingEngine
    FailingEngine.fail, FailingEngine.fault = 0, MemoryError


@pytest.mark.parametrize(
    ("fault", "logged"),
    [
        (MemoryError, "applying logged seq 2 failed (MemoryError"),
        (Interrupted, "after: seq 2 is logged but was not applied"),
    ],
    ids=["recovered-in-place", "duplicate-while-missing"],
)
def test_a_batch_logged_but_not_applied_is_never_lost(
    tmp_path: Path,
    failing_engine: type[FailingEngine],
    caplog: pytest.LogCaptureFixture,
    fault: type[BaseException],
    logged: str,
) -> None:
    """Apply fails after the append: the index holds the batch before it answers again.

    A redelivery of the batch (same batch_id) must not answer "duplicate" while the batch is
    missing, and the next save must not mark its seq covered. MemoryError is recovered before
    the failed apply returns; an exception that escapes leaves the batch missing until the
    redelivered duplicate recovers it.
    """
    s = Settings(storage={"url": str(tmp_path)}, gpu={"mode": "off"}, worker={"indexes": ["a"]})
    rt = IndexRuntime(s, DurableStore(s), engine_class=failing_engine)
    rt.load_all()
    rt.apply("a", "upsert", np.arange(5), vecs(5), "b1", check=no_check)
    assert rt.slot("a").seq == 1  # the first batch applied: the fault is not armed yet
    failing_engine.fail, failing_engine.fault = 1, fault
    with caplog.at_level("WARNING"):
        with contextlib.suppress(fault):  # answered or failed: either way nothing may be lost
            rt.apply("a", "upsert", np.arange(5, 10), vecs(5, 1), "b2", check=no_check)
        assert failing_engine.fail == 0, "the injected fault never fired"
        if fault is MemoryError:  # recovered before the failed apply answered
            assert rt.engine("a").contains(np.arange(10)).all()
        again = rt.apply("a", "upsert", np.arange(5, 10), vecs(5, 1), "b2", check=no_check)
    assert logged in caplog.text
    assert again["duplicate"] is True and again["seq"] == 2
    assert rt.engine("a").contains(np.arange(10)).all()
    assert rt.save("a")["snapshot"]["seq"] == 2
    rt.close()
    rt2 = make(tmp_path)
    assert rt2.engine("a").contains(np.arange(10)).all() and rt2.engine("a").version == 2
    rt2.close()


def test_version_is_the_log_seq_across_builds_merges_and_restarts(tmp_path: Path) -> None:
    """The version readers see never moves back: mutations take their seq, a build the next."""
    rt = make(tmp_path)
    for i in range(3):
        out = rt.apply("a", "upsert", np.arange(i * 5, i * 5 + 5), vecs(5, i), f"b{i}",
                       check=no_check)  # fmt: skip
        assert out["version"] == out["seq"] == i + 1
    built = rt.build("a", vecs(300, 9), np.arange(100, 400), family=None, progress=None)
    assert built["version"] == built["seq"] == 4
    out = rt.apply("a", "delete", np.arange(100, 110), None, "d1", check=no_check)
    assert out["version"] == out["seq"] == 5
    assert rt.merge("a", None)["version"] == 5  # same vectors, same version
    assert rt.engine("a").search(vecs(1), 1).version == 5
    rt.save("a")
    rt.close()
    rt2 = make(tmp_path)
    assert rt2.engine("a").version == 5
    out = rt2.apply("a", "upsert", np.arange(2), vecs(2), "b9", check=no_check)
    assert out["version"] == out["seq"] == 6
    rt2.close()
    rt3 = make(tmp_path)  # restart from the snapshot + log after it
    assert rt3.engine("a").version == 6
    rt3.close()


def test_no_snapshot_is_written_from_mapped_bytes_that_changed_on_storage(tmp_path: Path) -> None:
    """Flip one byte of the memory-mapped raw vectors after load: rebuild and save refuse."""
    rt = make(tmp_path)
    rt.build("a", vecs(300, 3), np.arange(300), family="flat", progress=None)
    rt.close()
    rt2 = make(tmp_path)  # the raw vectors are memory-mapped from the verified snapshot
    version = rt2.slot("a").version
    raw = tmp_path / "a" / "snapshots" / str(version) / "primary_vectors.npy"
    data = bytearray(raw.read_bytes())
    data[-7] ^= 0x40  # one vector component changes; the file keeps its size
    raw.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt, match="changed on storage"):
        rt2.rebuild("a", None, None)
    with pytest.raises(SnapshotCorrupt, match="changed on storage"):
        rt2.save("a")
    assert rt2.slot("a").state is IndexState.DEGRADED
    assert "changed on storage" in rt2.slot("a").reason
    rt2.close()
    current = (tmp_path / "a" / "CURRENT").read_text()
    assert str(version) in current, "a snapshot was published from unverified bytes"
