"""Metrics and health of a worker process, wired in one place: Celery signals, scrape, endpoints.

`start_telemetry(app, ctx)` is the worker's only call: it builds the metrics (metric_families),
serves /metrics, /healthz and /readyz, and connects task_prerun / task_postrun / task_failure so
every job is counted by task name and outcome without a line in the tasks. Index gauges are
read from the runtime at scrape time (`refresh`, run by the metrics' ScrapeCollector), so they
always show the actual state. The RPC loop reaches
the same metrics through `metric_families.metrics_of(runtime)` and records each turn with
`metric_families.observe_turn` at its single exit point.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any

from celery import Celery, signals

from faissq import keys
from faissq.errors import FaissqError
from faissq.telemetry.metric_families import (
    Metrics,
    MetricsServer,
    attach_metrics,
    index_labels,
    make_metrics,
    observe_job,
    update_index_gauges,
)
from faissq.telemetry.recall_metrics import update_recall_gauges
from faissq.worker.context import WorkerContext
from faissq.worker.recall_live import recall_of
from faissq.worker.slots import SERVING

log = logging.getLogger(__name__)


def code_bytes(index: Any) -> int:
    """Bytes of the encoded vectors a FAISS index holds (ids and centroids not counted)."""
    import faiss

    inner = faiss.downcast_index(index)
    for _ in range(8):  # IDMap / PreTransform / HNSW wrap the index that holds the codes
        if isinstance(inner, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
        elif isinstance(inner, faiss.IndexHNSW):
            inner = faiss.downcast_index(inner.storage)
        else:
            break
    per_vector = getattr(inner, "code_size", None)
    if not isinstance(per_vector, int):
        return 0
    return int(per_vector) * int(index.ntotal)


def job_outcome(state: str | None, exc: BaseException | None) -> str:
    """A job's outcome label: success, retry, the faissq error code, or "error"."""
    if state == "SUCCESS":
        return "success"
    if state == "RETRY":
        return "retry"
    if isinstance(exc, FaissqError):
        return exc.code
    if state in (None, "FAILURE"):
        return "error"
    return state.lower()


class WorkerTelemetry:
    """The metrics of one worker process, its HTTP endpoints, and the job signal handlers."""

    def __init__(self, app: Celery, ctx: WorkerContext, metrics: Metrics) -> None:
        """Observe `ctx.runtime` and the jobs of `app`; nothing is served until `start`."""
        self.app = app
        self.ctx = ctx
        self.metrics = metrics
        self.server: MetricsServer | None = None
        self._started: dict[str, float] = {}  # task id -> monotonic start
        self._failed: dict[str, BaseException] = {}  # task id -> exception of a failed run
        self._lock = threading.Lock()
        self._created: dict[tuple[str, str], float] = {}  # (index, version) -> created_at

    # -- scrape ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Set every index gauge from the runtime, storage and Redis as they are now."""
        runtime = self.ctx.runtime
        self.metrics.worker_ready.set(1.0 if runtime.wait_ready(0) else 0.0)
        for name, slot in list(runtime.slots.items()):
            eng = slot.engine
            stats: dict[str, Any] | None = None
            if eng is not None:
                stats = dict(eng.stats())
                primary = eng.state.primary
                stats["code_bytes"] = code_bytes(primary.index) if primary is not None else 0
                stats["last_durations"] = dict(eng.last_durations)
            update_index_gauges(
                self.metrics,
                name,
                stats,
                ready=eng is not None and slot.state in SERVING,
                state=slot.state.value,
                seq=slot.seq,
                log_seq=self._log_seq(name),
                snapshot_age_s=self._snapshot_age(name),
                load_s=slot.loaded_s if slot.loaded_s > 0 else None,
            )
            self._queue_depth(name)
            live = recall_of(runtime)
            if live is not None and name in live.samplers:
                update_recall_gauges(self.metrics.recall, name, live.samplers[name].summary())

    def _log_seq(self, index: str) -> int | None:
        """Highest seq in the index's update log on shared storage (None when unreadable)."""
        log_of = getattr(self.ctx.runtime.store, "log", None)
        if log_of is None:
            return None
        try:
            return int(log_of(index).last_seq())
        except Exception as exc:  # storage trouble shows as a missing value, not a failed scrape
            log.debug("metrics: log seq of %s unavailable: %s", index, exc)
            return None

    def _snapshot_age(self, index: str) -> float | None:
        """Seconds since the CURRENT snapshot was written (None when there is none)."""
        snapshots = getattr(self.ctx.runtime.store, "snapshots", None)
        if snapshots is None:
            return None
        try:
            store = snapshots(index)
            version = store.current_version()
            if version is None:
                return None
            created = self._created.get((index, version))
            if created is None:
                stamp = str(store.read_manifest(version)["created_at"])
                created = dt.datetime.fromisoformat(stamp).timestamp()
                self._created[(index, version)] = created
        except Exception as exc:
            log.debug("metrics: snapshot age of %s unavailable: %s", index, exc)
            return None
        return time.time() - created

    def _queue_depth(self, index: str) -> None:
        """Length of the index's search request list in Redis."""
        try:
            depth = int(self.ctx.redis.llen(keys.rpc_queue(index)))
        except Exception as exc:
            log.debug("metrics: queue depth of %s unavailable: %s", index, exc)
            return
        self.metrics.rpc_queue_depth.labels(*index_labels(index)).set(depth)

    def health(self) -> dict[str, dict[str, Any]]:
        """Readiness of each served index: loaded (and replayed) and serving searches."""
        runtime = self.ctx.runtime
        loaded = runtime.wait_ready(0)
        return {
            name: {
                "ready": loaded and slot.engine is not None and slot.state in SERVING,
                "state": slot.state.value,
                "reason": slot.reason,
                "seq": slot.seq,
            }
            for name, slot in list(runtime.slots.items())
        }

    # -- Celery signals ----------------------------------------------------------------------

    def _ours(self, task: Any) -> bool:
        """Whether a signal's task belongs to this worker's app."""
        return getattr(task, "app", None) is self.app

    def on_prerun(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        """Note when a job starts."""
        if self._ours(sender) and task_id:
            with self._lock:
                self._started[task_id] = time.monotonic()

    def on_failure(
        self, sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any
    ) -> None:
        """Keep a failed job's exception for its outcome label (task_postrun follows)."""
        if self._ours(sender) and task_id and isinstance(exception, BaseException):
            with self._lock:
                self._failed[task_id] = exception

    def on_postrun(
        self,
        sender: Any = None,
        task_id: str | None = None,
        kwargs: Any = None,
        state: str | None = None,
        **_: Any,
    ) -> None:
        """Count the finished job by task name and outcome, with its duration."""
        if not self._ours(sender) or not task_id:
            return
        with self._lock:
            t0 = self._started.pop(task_id, None)
            exc = self._failed.pop(task_id, None)
        seconds = time.monotonic() - t0 if t0 is not None else None
        index = kwargs.get("index") if isinstance(kwargs, dict) else None
        name = str(getattr(sender, "name", "unknown"))
        observe_job(self.metrics, name, job_outcome(state, exc), seconds,
                    index=index if isinstance(index, str) else None)  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect the signal handlers (strong references: they live as long as the worker)."""
        signals.task_prerun.connect(self.on_prerun, weak=False)
        signals.task_failure.connect(self.on_failure, weak=False)
        signals.task_postrun.connect(self.on_postrun, weak=False)

    def disconnect(self) -> None:
        """Undo `connect` (in-process workers in tests)."""
        signals.task_prerun.disconnect(self.on_prerun)
        signals.task_failure.disconnect(self.on_failure)
        signals.task_postrun.disconnect(self.on_postrun)

    def serve(self) -> None:
        """Start /metrics, /healthz and /readyz; a busy port is logged, never fatal."""
        from faissq.telemetry.metric_families import start_http

        settings = self.ctx.settings
        self.metrics.scrape.refresh = self.refresh
        try:
            self.server = start_http(settings, self.metrics.registry, self.health)
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s:%d (%s); set FAISSQ_METRICS__PORT to a free port "
                "(0: any) for each worker on this host",
                settings.metrics.host, settings.metrics.port, exc,
            )  # fmt: skip
            return
        log.info("metrics and health at %s/metrics (/healthz, /readyz)", self.server.url)

    def close(self) -> None:
        """Stop the HTTP endpoints and disconnect the signals."""
        self.disconnect()
        self.metrics.scrape.refresh = None
        if self.server is not None:
            self.server.close()
            self.server = None


def start_telemetry(app: Celery, ctx: WorkerContext) -> WorkerTelemetry | None:
    """Start metrics and health for a worker (None when settings.metrics.enabled is false)."""
    if not ctx.settings.metrics.enabled:
        return None
    tel = WorkerTelemetry(app, ctx, make_metrics())
    tel.connect()
    tel.serve()
    attach_metrics(ctx.runtime, tel.metrics)
    return tel
