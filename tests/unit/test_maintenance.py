"""What maintenance finds due, measured on a real runtime and store (no Celery, no Redis)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faissq.config import Settings
from faissq.storage.durable import DurableStore
from faissq.worker.maintenance import Backlog, LogBacklog, due
from faissq.worker.runtime import IndexRuntime

DIM = 8
ENTRY_MIN = 16 * (8 + 4 * DIM)  # payload bytes of one 16-vector upsert entry, header not counted


def make(tmp_path: Path, **maintenance: float) -> IndexRuntime:
    """A runtime over a temp storage root serving index 'a'."""
    s = Settings(storage={"url": str(tmp_path), "retention": 1}, gpu={"mode": "off"},
                 worker={"indexes": ["a"]}, index={"merge_delta_max": 40},
                 maintenance=maintenance)  # fmt: skip
    rt = IndexRuntime(s, DurableStore(s))
    rt.load_all()
    return rt


def upsert(rt: IndexRuntime, start: int, batch: str) -> None:
    """Log and apply 16 vectors with ids start..start+15."""
    ids = np.arange(start, start + 16, dtype=np.int64)
    x = np.random.default_rng(start).standard_normal((16, DIM)).astype(np.float32)
    rt.apply("a", "upsert", ids, x, batch, check=lambda _: None)


def test_the_backlog_counts_only_what_a_restart_would_replay(tmp_path: Path) -> None:
    """Entries after the snapshot's seq count; after a save the backlog is empty."""
    rt = make(tmp_path)
    backlog = LogBacklog(rt.store)
    assert backlog.measure("a", rt.slot("a").seq) == Backlog()
    for i in range(3):
        upsert(rt, 100 * i, f"b{i}")
    seen = backlog.measure("a", rt.slot("a").seq)
    assert seen.entries == 3 and seen.bytes >= 3 * ENTRY_MIN and seen.age_s >= 0
    # an entry the engine has not applied (seq past the slot's) is not counted yet
    assert backlog.measure("a", rt.slot("a").seq - 1).entries == 2
    rt.save("a")
    assert backlog.measure("a", rt.slot("a").seq) == Backlog()
    upsert(rt, 900, "b9")
    assert backlog.measure("a", rt.slot("a").seq).entries == 1


def test_what_is_due_follows_the_limits(tmp_path: Path) -> None:
    """A merge past merge_delta_max; a save past the size limit, or the age limit; 0 is off."""
    rt = make(tmp_path, save_log_bytes=3 * ENTRY_MIN, save_log_age_s=0)
    eng_stats = lambda: rt.engine("a").stats()  # noqa: E731
    backlog = LogBacklog(rt.store)
    upsert(rt, 0, "b0")
    assert due(eng_stats(), backlog.measure("a", rt.slot("a").seq), rt.settings) == []
    for i in range(1, 3):
        upsert(rt, 100 * i, f"b{i}")
    now = backlog.measure("a", rt.slot("a").seq)
    assert due(eng_stats(), now, rt.settings) == ["merge", "save"]  # 48 rows >= 40; 3 entries
    aged = Backlog(entries=1, bytes=1, age_s=10.0)
    by_age = rt.settings.model_copy(update={"maintenance": rt.settings.maintenance.model_copy(
        update={"save_log_bytes": 0, "save_log_age_s": 5.0})})  # fmt: skip
    assert "save" in due({}, aged, by_age)
    assert due({}, Backlog(entries=1, bytes=1, age_s=1.0), by_age) == []
    assert due({}, Backlog(), by_age) == []
