"""Every Prometheus metric faissq exports, named in one place (updates: metric_updates).

How each metric moves lives in metric_updates; its functions are re-exported here.

Nothing registers at import: `make_metrics()` builds the metrics on a fresh CollectorRegistry, so a
process (or a test) holds as many independent sets as it likes. Base units (`_seconds`, `_bytes`),
`_total` counters, histograms for latencies and sizes; labels are low-cardinality only (index,
outcome, task, op, lifecycle state, and the index's family/factory in one info series) - never
request values such as k or nprobe, which are gauges of the last request instead. Every
per-index family carries INDEX_LABELS: `index` (the serving name), `shard` and `parent`.

Every metric is collected through one `ScrapeCollector`: at each collection it first runs its
`refresh` (set by worker/process_telemetry.py), so the index gauges report the engine's actual state
(`Engine.stats()`) at scrape time, never estimates or configuration flags. The HTTP endpoint
(/metrics, /healthz, /readyz) lives in http_endpoint; `start_http` is re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from faissq.telemetry.http_endpoint import HealthFn, MetricsServer, readiness, start_http
from faissq.telemetry.metric_updates import (
    INDEX_LABELS,
    index_labels,
    observe_job,
    observe_storage_retry,
    observe_turn,
    update_index_gauges,
)
from faissq.telemetry.recall_metrics import RecallMetrics, make_recall_metrics

__all__ = [
    "INDEX_LABELS",
    "HealthFn",
    "Metrics",
    "MetricsServer",
    "ScrapeCollector",
    "attach_metrics",
    "index_labels",
    "make_metrics",
    "metric_names",
    "metrics_of",
    "observe_job",
    "observe_storage_retry",
    "observe_turn",
    "readiness",
    "start_http",
    "update_index_gauges",
]

# search service time in the worker: 100 us (a cached flat search) up to 5 s (a deadline)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0)  # fmt: skip
# a job: a save of a small index (10 ms) up to the 4 h default job time limit
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
# requests per RPC batch: powers of two up to well above rpc.max_batch's default of 64
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


log = logging.getLogger(__name__)


class ScrapeCollector(Collector):
    """faissq's metrics as one collector: each collection first runs `refresh`, which sets the
    index gauges from the worker's state, so a scrape shows them as they are then."""

    def __init__(self) -> None:
        """No metrics and no refresh yet (`make_metrics` fills it, the worker sets refresh)."""
        self.metrics: list[MetricWrapperBase] = []
        self.refresh: Callable[[], None] | None = None
        self._lock = threading.Lock()  # two concurrent scrapes: one refresh, then its values

    def describe(self) -> list[Metric]:
        """The families without values: registering never runs `refresh`."""
        return [family for metric in self.metrics for family in metric.describe()]

    def collect(self) -> list[Metric]:
        """Refresh (a failure is logged and the last values served), then every family."""
        with self._lock:
            if self.refresh is not None:
                try:
                    self.refresh()
                except Exception:  # a broken refresh must not hide the other metrics
                    log.exception("refreshing the index gauges before a scrape failed")
            return [family for metric in self.metrics for family in metric.collect()]


@dataclass(frozen=True)
class Metrics:
    """The metric objects of one registry; build it with `make_metrics`."""

    registry: CollectorRegistry
    scrape: ScrapeCollector  # collects every metric below, after its refresh
    # index state, from Engine.stats() and the runtime slot
    index_info: Info
    index_vectors: Gauge
    index_delta_vectors: Gauge
    index_tombstones: Gauge
    index_code_bytes: Gauge
    index_raw_bytes: Gauge
    index_dim: Gauge
    index_version: Gauge
    index_ready: Gauge
    index_state: Gauge
    index_imbalance: Gauge
    index_merge_due: Gauge
    index_rebuild_due: Gauge
    gpu_enabled: Gauge
    cuvs_enabled: Gauge
    gpu_failures: Gauge
    tuning_recall: Gauge
    index_seq: Gauge
    log_seq_lag: Gauge
    snapshot_age_seconds: Gauge
    last_duration_seconds: Gauge
    builds_total: Counter
    worker_ready: Gauge
    # searches (the RPC loop)
    searches_total: Counter
    search_errors_total: Counter
    search_queries_total: Counter
    search_latency_seconds: Histogram
    search_last_k: Gauge
    search_last_nprobe: Gauge
    search_last_ef_search: Gauge
    rpc_queue_depth: Gauge
    rpc_batch_size: Histogram
    rpc_deadline_drops_total: Counter
    # jobs (Celery signals)
    jobs_total: Counter
    job_duration_seconds: Histogram
    storage_retries_total: Counter
    # background maintenance (faissq.worker.maintenance)
    maintenance_total: Counter
    log_unsaved_bytes: Gauge
    # live recall of sampled searches, IVF drift (recall_metrics)
    recall: RecallMetrics


def make_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Create every faissq metric on `registry` (a new, dedicated one when None)."""
    r = registry if registry is not None else CollectorRegistry(auto_describe=True)
    ix = INDEX_LABELS
    scrape = ScrapeCollector()
    unregistered = None  # every metric is collected through `scrape`, which is registered

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ix) -> Gauge:
        return Gauge(name, doc, labels, registry=unregistered)

    def counter(name: str, doc: str, labels: tuple[str, ...] = ix) -> Counter:
        return Counter(name, doc, labels, registry=unregistered)

    metrics = Metrics(
        registry=r,
        scrape=scrape,
        index_info=Info(
            "faissq_index",
            "Family, FAISS factory string and metric of the index.",
            ix,
            registry=unregistered,
        ),
        index_vectors=gauge("faissq_index_vectors", "Live vectors (primary - tombstones + delta)."),
        index_delta_vectors=gauge(
            "faissq_index_delta_vectors", "Vectors in the delta, not yet merged into the primary."
        ),
        index_tombstones=gauge(
            "faissq_index_tombstones", "Deleted primary ids masked at search time until a merge."
        ),
        index_code_bytes=gauge(
            "faissq_index_code_bytes", "Bytes of encoded vectors held by the FAISS index and delta."
        ),
        index_raw_bytes=gauge(
            "faissq_index_raw_bytes", "Bytes of raw vectors + ids kept for refine and rebuild."
        ),
        index_dim=gauge("faissq_index_dim", "Vector dimension."),
        index_version=gauge(
            "faissq_index_version", "Engine state version (grows with every applied mutation)."
        ),
        index_ready=gauge("faissq_index_ready", "1 when the index is loaded and serves searches."),
        index_state=gauge(
            "faissq_index_state",
            "1 for the index's lifecycle state (loading/empty/ready/rebuilding/degraded/failed).",
            (*ix, "state"),
        ),
        index_imbalance=gauge(
            "faissq_index_imbalance", "IVF list-size imbalance factor (1 = even; 1 for non-IVF)."
        ),
        index_merge_due=gauge("faissq_index_merge_due", "1 when the delta calls for a merge."),
        index_rebuild_due=gauge(
            "faissq_index_rebuild_due", "1 when imbalance or corpus size calls for a rebuild."
        ),
        gpu_enabled=gauge("faissq_gpu_enabled", "1 when the index answers from a GPU copy."),
        cuvs_enabled=gauge("faissq_cuvs_enabled", "1 when that GPU copy was cloned with cuVS."),
        gpu_failures=gauge(
            "faissq_index_gpu_failures", "GPU searches that fell back to the CPU copy (this copy)."
        ),
        tuning_recall=gauge(
            "faissq_tuning_recall", "Recall@k measured by autotune for the active parameters."
        ),
        index_seq=gauge("faissq_index_seq", "Last update-log seq applied to the in-memory index."),
        log_seq_lag=gauge(
            "faissq_log_seq_lag", "Log entries written but not applied here (head seq - applied)."
        ),
        snapshot_age_seconds=gauge(
            "faissq_snapshot_age_seconds", "Age of the CURRENT snapshot on shared storage."
        ),
        last_duration_seconds=gauge(
            "faissq_index_last_duration_seconds",
            "Duration of the last build, merge, rebuild, save or load of the index (op label).",
            (*ix, "op"),
        ),
        builds_total=counter("faissq_builds_total", "Builds that completed and were swapped in."),
        worker_ready=Gauge(
            "faissq_worker_ready", "1 once every served index was loaded.", registry=unregistered
        ),
        searches_total=counter(
            "faissq_searches_total", "Search requests by outcome.", (*ix, "outcome")
        ),
        search_errors_total=counter(
            "faissq_search_errors_total",
            "Search requests not answered with results, by outcome.",
            (*ix, "outcome"),
        ),
        search_queries_total=counter(
            "faissq_search_queries_total", "Query vectors searched (a request may carry many)."
        ),
        search_latency_seconds=Histogram(
            "faissq_search_latency_seconds",
            "Time from popping a search request to pushing its reply.",
            ix,
            buckets=LATENCY_BUCKETS,
            registry=unregistered,
        ),
        search_last_k=gauge("faissq_search_last_k", "k of the last answered search."),
        search_last_nprobe=gauge(
            "faissq_search_last_nprobe", "nprobe used by the last answered IVF search."
        ),
        search_last_ef_search=gauge(
            "faissq_search_last_ef_search", "efSearch used by the last answered HNSW search."
        ),
        rpc_queue_depth=gauge(
            "faissq_rpc_queue_depth", "Search requests waiting in the index's Redis list."
        ),
        rpc_batch_size=Histogram(
            "faissq_rpc_batch_size",
            "Requests popped per RPC loop turn.",
            ix,
            buckets=BATCH_BUCKETS,
            registry=unregistered,
        ),
        rpc_deadline_drops_total=counter(
            "faissq_rpc_deadline_drops_total", "Requests dropped unanswered: deadline passed."
        ),
        jobs_total=counter(
            "faissq_jobs_total",
            "Celery jobs finished, by task name and outcome.",
            ("task", "outcome"),
        ),
        job_duration_seconds=Histogram(
            "faissq_job_duration_seconds",
            "Wall time of Celery jobs by task name (build, merge, rebuild, save, ...).",
            ("task",),
            buckets=JOB_BUCKETS,
            registry=unregistered,
        ),
        storage_retries_total=counter(
            "faissq_storage_retries_total",
            "In-place retries of jobs while storage was unavailable (the index's queue waited).",
            (*ix, "task"),
        ),
        maintenance_total=counter(
            "faissq_maintenance_total",
            "Merges and saves run by the background maintenance, by action (merge, save).",
            (*ix, "action"),
        ),
        log_unsaved_bytes=gauge(
            "faissq_log_unsaved_bytes",
            "Bytes of update-log entries newer than the CURRENT snapshot (replayed on restart).",
        ),
        recall=make_recall_metrics(),
    )
    skip = {"registry", "scrape", "recall"}
    scrape.metrics = [getattr(metrics, f.name) for f in dataclasses.fields(Metrics)
                      if f.name not in skip] + metrics.recall.families()  # fmt: skip
    r.register(scrape)
    return metrics


_ATTACHED: weakref.WeakKeyDictionary[Any, Metrics] = weakref.WeakKeyDictionary()


def attach_metrics(owner: Any, metrics: Metrics) -> None:
    """Make `metrics` the ones of `owner` (the worker's IndexRuntime) for as long as it lives."""
    _ATTACHED[owner] = metrics


def metrics_of(owner: Any) -> Metrics | None:
    """The metrics attached to `owner`, None when metrics are disabled (every observe_* no-ops)."""
    return _ATTACHED.get(owner)


def metric_names(metrics: Metrics) -> set[str]:
    """Every sample name the registry can expose (histogram _bucket/_sum/_count included)."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        for suffix in ("_total", "_info", "_bucket", "_sum", "_count", "_created"):
            names.add(family.name + suffix)
    return names
