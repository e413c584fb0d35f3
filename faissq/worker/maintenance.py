"""Background maintenance of an index writer: merge a grown delta, snapshot a grown log, and
(with `recall.drift_rebuild`) rebuild an IVF index whose new vectors drifted from its centroids.

A thread looks at every served index each `maintenance.interval_s`. When a merge is due (the
delta passed `index.merge_delta_max`) or a save is due (the log entries a restart would replay
passed `maintenance.save_log_bytes`, or the oldest of them `maintenance.save_log_age_s`), it
enqueues one `faissq.maintain` job on the index's own queue. The job runs on the Celery task
thread, the index's only writer, in FIFO order with its upserts and deletes, so maintenance never
mutates an index beside a job, and operators see it in Flower like any other job. Searches never
wait for it: the engine builds the merged state aside and swaps it in with one assignment.

The job decides again what is due when it runs, so a duplicate is a no-op. A Redis key
(`keys.maintain_pending`) holds the id of the queued job: at most one is pending per index, also
across a restart of the worker; it expires after `maintenance.pending_ttl_s` in case the job was
lost (purged queue), since a second job costs nothing.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, signals

from faissq import keys
from faissq.config import Settings
from faissq.errors import FaissqError, InvalidParameter, RecallRegression
from faissq.index.heap import mmap_large_blocks, release_freed
from faissq.storage.log import entry_name
from faissq.telemetry.metric_families import index_labels, metrics_of
from faissq.worker import publish
from faissq.worker.context import context_of
from faissq.worker.runtime import IndexRuntime
from faissq.worker.slots import SERVING

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
TASK = "faissq.maintain"
# jobs after which a whole previous index is freed
SWAPPING = frozenset({"faissq.build", "faissq.merge", "faissq.rebuild", "faissq.reload", TASK})


@dataclass(frozen=True)
class Backlog:
    """The log entries a restart would replay on top of the newest snapshot."""

    entries: int = 0
    bytes: int = 0
    age_s: float = 0.0  # since the oldest of them was written; 0 when there is none


@dataclass
class Record:
    """What maintenance did to one index in this process (stats and the job's result)."""

    merges: int = 0
    saves: int = 0
    rebuilds: int = 0
    refused: int = 0  # drift rebuilds the recall gate refused
    held_until: float = 0.0  # monotonic time until which drift rebuilds wait after a refusal
    enqueued: int = 0
    failures: int = 0
    last_error: str = ""
    failed_at: float = 0.0  # monotonic time of the last failed job
    backlog: Backlog = field(default_factory=Backlog)


class LogBacklog:
    """Measures `Backlog` from shared storage without listing the log folder: the seqs after the
    snapshot's are known, and each entry is looked at once (entries never change), so a check
    costs one stat per new entry however long the log grew since the last save."""

    def __init__(self, store: Any) -> None:
        """store: the runtime's store (DurableStore: `log(index)`, `snapshots(index)`)."""
        self.store = store
        # (index, seq) -> (bytes, modified) of the entry; None where no entry holds the seq
        # (a build took it, or it was quarantined)
        self._entries: dict[tuple[str, int], tuple[int, float | None] | None] = {}
        self._snapshot_seq: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # the checking thread and the job thread both measure

    def measure(self, index: str, applied: int) -> Backlog:
        """Entries after the newest snapshot's seq, up to the seq the engine applied."""
        if not hasattr(self.store, "log") or not hasattr(self.store, "snapshots"):
            return Backlog()
        with self._lock:
            saved = self._saved_seq(index)
            ulog = self.store.log(index)
            now = time.time()
            count, size, oldest = 0, 0, now
            for seq in range(saved + 1, applied + 1):
                key = (index, seq)
                if key not in self._entries:
                    self._entries[key] = _stat(ulog.storage, f"{ulog.folder}/{entry_name(seq)}")
                found = self._entries[key]
                if found is not None:
                    count, size = count + 1, size + found[0]
                    oldest = min(oldest, found[1] if found[1] is not None else now)
            for key in [k for k in self._entries if k[0] == index and k[1] <= saved]:
                del self._entries[key]
        return Backlog(count, size, max(0.0, now - oldest) if count else 0.0)

    def _saved_seq(self, index: str) -> int:
        """The seq the CURRENT snapshot covers (0 without one); manifests read once per version."""
        snaps = self.store.snapshots(index)
        version = snaps.current_version()
        if version is None:
            return 0
        key = (index, version)
        if key not in self._snapshot_seq:
            self._snapshot_seq[key] = int(snaps.read_manifest(version)["seq"])
        return self._snapshot_seq[key]


def due(
    engine_stats: dict[str, Any], backlog: Backlog, settings: Settings, drifted: bool = False
) -> list[str]:
    """What is due now for one index: "rebuild" (drifted: IVF drift advises it and
    recall.drift_rebuild is on), else "merge"; and/or "save"."""
    cfg = settings.maintenance
    out = []
    if drifted:
        out.append("rebuild")  # folds the delta in too: no merge before it
    elif engine_stats.get("merge_due"):
        out.append("merge")
    by_size = cfg.save_log_bytes > 0 and backlog.bytes >= cfg.save_log_bytes
    by_age = cfg.save_log_age_s > 0 and backlog.age_s >= cfg.save_log_age_s
    if backlog.entries and (by_size or by_age):
        out.append("save")
    return out


class Maintenance:
    """The maintenance of one worker app: the checking thread and the job's body."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        """Attach to `app` (its faissq.maintain jobs find this object); nothing runs yet."""
        self.app = app
        self.settings = settings
        self.records: dict[str, Record] = {}
        self._runtime: IndexRuntime | None = None
        self._backlog: LogBacklog | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        _BY_APP[app] = self
        # before the indexes load, so that their large blocks go back to the kernel when freed
        mmap_large_blocks(settings.maintenance.mmap_threshold_bytes)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, runtime: IndexRuntime) -> None:
        """Start checking (a writer's runtime only; settings.maintenance.enabled)."""
        self._runtime = runtime
        self._backlog = LogBacklog(runtime.store)
        signals.task_postrun.connect(self._after_job, weak=False)
        if not self.settings.maintenance.enabled or runtime.role != "writer":
            return
        self._thread = threading.Thread(target=self._loop, name="faissq-maintenance", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop checking; a queued job stays queued for the next writer."""
        signals.task_postrun.disconnect(self._after_job)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _after_job(self, sender: Any = None, **_: Any) -> None:
        """After a job that swapped out a whole index, give its freed heap back to the kernel."""
        if getattr(sender, "app", None) is self.app and getattr(sender, "name", "") in SWAPPING:
            release_freed()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.maintenance.interval_s):
            try:
                self.check()
            except Exception as exc:  # Redis or storage trouble: try again next turn
                log.warning("maintenance check failed: %s", exc)

    # -- the checking side -------------------------------------------------------------------

    def check(self) -> list[str]:
        """One look at every index: enqueue a maintain job where something is due; the indexes."""
        runtime = self._runtime
        if runtime is None:
            return []
        sent = []
        for name, slot in list(runtime.slots.items()):
            eng = slot.engine
            if eng is None or slot.state not in SERVING:
                continue
            rec = self.records.setdefault(name, Record())
            rec.backlog = self._measure(name, slot.seq)
            self._gauge(name, rec.backlog)
            if not due(eng.stats(), rec.backlog, self.settings, self._drifted(runtime, name)):
                continue
            waited = time.monotonic() - rec.failed_at
            if rec.failed_at and waited < self.settings.maintenance.retry_after_s:
                continue
            if self._enqueue(name):
                rec.enqueued += 1
                sent.append(name)
        return sent

    def _measure(self, index: str, applied: int) -> Backlog:
        if self._backlog is None:
            return Backlog()
        try:
            return self._backlog.measure(index, applied)
        except (FaissqError, OSError) as exc:
            log.debug("maintenance: log backlog of %s unavailable: %s", index, exc)
            return Backlog()

    def _enqueue(self, index: str) -> bool:
        """Queue one faissq.maintain job unless one is pending; whether one was queued."""
        ctx = context_of(self.app)
        if ctx is None:
            return False
        task_id = f"maintain-{index}-{uuid.uuid4().hex[:12]}"
        ttl = max(1, int(self.settings.maintenance.pending_ttl_s))
        if not ctx.redis.set(keys.maintain_pending(index), task_id, nx=True, ex=ttl):
            return False
        try:
            self.app.send_task(TASK, kwargs={"index": index}, queue=keys.task_queue(index),
                               task_id=task_id)  # fmt: skip
        except BaseException:
            ctx.redis.delete(keys.maintain_pending(index))
            raise
        log.info("index %s: maintenance due, %s queued", index, task_id)
        return True

    # -- the job (Celery task thread) --------------------------------------------------------

    def run(self, index: str, task_id: str | None, progress: Progress | None) -> dict[str, Any]:
        """Rebuild, merge and/or save, whichever is due now; clears this job's pending mark."""
        runtime = self._runtime or _runtime_of(self.app)
        rec = self.records.setdefault(index, Record())
        out: dict[str, Any] = {"index": index, "rebuilt": None, "merged": None, "saved": None}
        try:
            eng = runtime.engine(index)
            backlog = self._backlog or LogBacklog(runtime.store)
            todo = due(eng.stats(), backlog.measure(index, runtime.slot(index).seq), self.settings,
                       self._drifted(runtime, index))  # fmt: skip
            if "rebuild" in todo:
                out["rebuilt"] = self._rebuild(runtime, index, rec, progress)
                if out["rebuilt"] is None:  # refused: the merge it would have folded in is due
                    todo = due(eng.stats(), backlog.measure(index, runtime.slot(index).seq),
                               self.settings)  # fmt: skip
            if "merge" in todo:
                out["merged"] = runtime.merge(index, progress)
                rec.merges += 1
                self._count(index, "merge")
            if "save" in todo and not (out["rebuilt"] or {}).get("snapshot"):  # it saved
                out["saved"] = runtime.save(index)
                rec.saves += 1
                self._count(index, "save")
            rec.backlog = backlog.measure(index, runtime.slot(index).seq)
        except BaseException as exc:
            rec.failures, rec.failed_at = rec.failures + 1, time.monotonic()
            rec.last_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._clear_pending(index, task_id)
        return out

    def _drifted(self, runtime: IndexRuntime, index: str) -> bool:
        """Drift advises a rebuild (recall.drift_rebuild on) and no refused one holds it back."""
        rec = self.records.get(index)
        if rec is not None and time.monotonic() < rec.held_until:
            return False
        return publish.drift_due(runtime, index)

    def _rebuild(
        self, runtime: IndexRuntime, index: str, rec: Record, progress: Progress | None
    ) -> dict[str, Any] | None:
        """A drift rebuild, gated on recall like any rebuild; None when the gate refused it.

        A refusal holds drift rebuilds for recall.drift_hold_s: the same data would be refused
        again, and each try costs a whole build. Merges and saves go on meanwhile.
        """
        try:
            report = runtime.rebuild(index, None, progress)
        except RecallRegression as exc:
            hold = self.settings.recall.drift_hold_s
            rec.refused, rec.held_until = rec.refused + 1, time.monotonic() + hold
            rec.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("index %s: drift rebuild refused by the recall gate (%s); the next in "
                        "%.0f s at the earliest", index, exc, hold)  # fmt: skip
            self._count(index, "rebuild_refused")
            return None
        finally:  # a measure taken meanwhile saw the old centroids: measure again
            publish.drift_measured_again(runtime, index)
        rec.rebuilds += 1
        self._count(index, "rebuild")
        return report

    def _count(self, index: str, action: str) -> None:
        metrics = metrics_of(self._runtime) if self._runtime is not None else None
        if metrics is not None:
            metrics.maintenance_total.labels(*index_labels(index), action).inc()

    def _gauge(self, index: str, backlog: Backlog) -> None:
        metrics = metrics_of(self._runtime) if self._runtime is not None else None
        if metrics is not None:
            metrics.log_unsaved_bytes.labels(*index_labels(index)).set(backlog.bytes)

    def _clear_pending(self, index: str, task_id: str | None) -> None:
        """Drop the pending mark if it is this job's (an operator's own job leaves it alone)."""
        ctx = context_of(self.app)
        if ctx is None or task_id is None:
            return
        key = keys.maintain_pending(index)
        raw = ctx.redis.get(key)
        if raw is not None and (raw.decode() if isinstance(raw, bytes) else str(raw)) == task_id:
            ctx.redis.delete(key)

    def stats(self, index: str) -> dict[str, Any]:
        """Counters and the log backlog last measured, for the stats job and status."""
        rec = self.records.get(index, Record())
        return {
            "enabled": self.settings.maintenance.enabled,
            "merges": rec.merges,
            "saves": rec.saves,
            "rebuilds": rec.rebuilds,
            "rebuilds_refused": rec.refused,
            "enqueued": rec.enqueued,
            "failures": rec.failures,
            "last_error": rec.last_error,
            "log_unsaved_entries": rec.backlog.entries,
            "log_unsaved_bytes": rec.backlog.bytes,
            "log_unsaved_age_s": round(rec.backlog.age_s, 3),
        }


def _stat(storage: Any, path: str) -> tuple[int, float | None] | None:
    """(bytes, modified) of one log entry; None when there is none."""
    try:
        return storage.size(path), storage.modified(path)
    except FileNotFoundError:
        return None


_BY_APP: weakref.WeakKeyDictionary[Celery, Maintenance] = weakref.WeakKeyDictionary()


def maintenance_of(app: Celery) -> Maintenance | None:
    """The maintenance attached to a worker app (None outside a faissq index worker)."""
    return _BY_APP.get(app)


def _runtime_of(app: Celery) -> IndexRuntime:
    ctx = context_of(app)
    if ctx is None:
        raise InvalidParameter("faissq.maintain runs inside a faissq index worker only")
    return ctx.runtime
