"""What maintenance finds due and does, on a real runtime and store (no Celery worker, no Redis)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from celery import Celery

from faissq.cli.demo_data import clustered, queries_between
from faissq.config import Settings
from faissq.index.engine import Engine
from faissq.rpc.protocol import Request
from faissq.storage.durable import DurableStore
from faissq.worker.maintenance import Backlog, LogBacklog, Maintenance, due
from faissq.worker.recall_live import LiveRecall, attach_recall
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


class LossyBuilds(Engine):
    """An engine whose builds use one-byte PQ codes while `lossy` is set: a bad rebuild."""

    lossy = False

    def build(self, vectors: Any, ids: Any, *, family: str | None = None, **kw: Any) -> Any:
        """Build, with the lossy family when `lossy` is set."""
        return super().build(vectors, ids, family="IVF16,PQ2x4" if self.lossy else family, **kw)


@dataclass
class Served:
    """The part of an RPC outcome the sampler reads."""

    request: Request
    ids: np.ndarray
    version: int


def test_a_refused_drift_rebuild_lets_merge_and_save_go_on_and_holds_further_rebuilds(
    tmp_path: Path,
) -> None:
    """The recall gate refuses the drift rebuild: the job still merges and saves, the old index
    serves on, the refusal is counted, and drift asks for no rebuild while it is held."""
    dim, clusters = 16, 30
    s = Settings(storage={"url": str(tmp_path), "retention": 1}, gpu={"mode": "off"},
                 worker={"indexes": ["a"]}, index={"merge_delta_max": 40, "metric": "l2"},
                 maintenance={"enabled": False, "save_log_bytes": 1},
                 recall={"drift_rebuild": True, "sample_rate": 1.0, "min_queries": 50})  # fmt: skip
    rt = IndexRuntime(s, DurableStore(s), engine_class=LossyBuilds)
    rt.load_all()
    rt.build("a", clustered(3_000, dim, clusters=clusters, seed=1), np.arange(3_000),
             family="ivf_flat", progress=None)  # fmt: skip
    serving = rt.engine("a")
    live = LiveRecall(s.recall, rt.engine, ("a",))
    attach_recall(rt, live)
    sampler = live.samplers["a"]
    xq = queries_between(3_000, dim, clusters=clusters, seed=1, nq=100)
    res = serving.search(xq, 10)
    sampler.offer([Served(Request(id="r", reply="x", deadline=0.0, k=10, queries=xq), res.ids,
                          res.version)])  # fmt: skip
    other = clustered(200, dim, clusters=clusters, seed=9)  # another corpus: drift
    for start in range(0, 200, 50):
        rt.apply("a", "upsert", np.arange(10_000 + start, 10_050 + start),
                 other[start : start + 50], f"b{start}", check=lambda _: None)  # fmt: skip
    sampler.check_drift()
    assert sampler.drift is not None and sampler.drift["advised"]
    m = Maintenance(Celery(), s)
    m.start(rt)
    LossyBuilds.lossy = True
    try:
        out = m.run("a", None, None)
    finally:
        LossyBuilds.lossy = False
        m.stop()
    assert out["rebuilt"] is None and out["merged"] is not None and out["saved"] is not None
    plan = rt.engine("a").state.primary.plan  # type: ignore[union-attr]
    assert rt.engine("a") is serving and plan.family == "ivf_flat"  # the old index serves on
    assert rt.engine("a").state.delta.ids.size == 0  # the merge went on
    stats = m.stats("a")
    assert stats["rebuilds_refused"] == 1 and stats["rebuilds"] == 0 and stats["failures"] == 0
    assert stats["last_error"].startswith("RecallRegression")
    sampler.check_drift()  # still drifted against the old centroids, but the rebuild is held
    assert sampler.drift is not None and sampler.drift["advised"]
    assert due(rt.engine("a").stats(), Backlog(), s, m._drifted(rt, "a")) == []
    rt.close()
