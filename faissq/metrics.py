"""Every Prometheus metric faissq exports, named in one place, and how each is updated.

Nothing registers at import: `make_metrics()` builds the metrics on a fresh CollectorRegistry, so a
process (or a test) holds as many independent sets as it likes. Base units (`_seconds`, `_bytes`),
`_total` counters, histograms for latencies and sizes; labels are low-cardinality only (index,
outcome, task, op, and the index's family/factory in one info series) - never request values such
as k or nprobe, which are gauges of the last request instead.

Index gauges report the engine's actual state (`Engine.stats()`), refreshed at every scrape by the
worker (faissq.worker.telemetry), never estimates or configuration flags. The HTTP endpoint
(/metrics, /healthz, /readyz) lives in faissq.metrics_http; `start_http` is re-exported here.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from faissq.metrics_http import HealthFn, MetricsServer, readiness, start_http

__all__ = [
    "HealthFn",
    "Metrics",
    "MetricsServer",
    "attach_metrics",
    "make_metrics",
    "metric_names",
    "metrics_of",
    "observe_job",
    "observe_search",
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

SEARCH_OK = "ok"  # the outcome of a search that was answered
DEADLINE_DROP = "timeout"  # the outcome (wire code) of a request whose deadline had passed
UNREADABLE = "unreadable"  # the outcome of a request dropped unanswered: no usable reply key
DURATION_OPS = ("build", "merge", "rebuild", "save", "load")  # values of the `op` label


@dataclass(frozen=True)
class Metrics:
    """The metric objects of one registry; build it with `make_metrics`."""

    registry: CollectorRegistry
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


def make_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Create every faissq metric on `registry` (a new, dedicated one when None)."""
    r = registry if registry is not None else CollectorRegistry(auto_describe=True)
    ix = ("index",)

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ix) -> Gauge:
        return Gauge(name, doc, labels, registry=r)

    def counter(name: str, doc: str, labels: tuple[str, ...] = ix) -> Counter:
        return Counter(name, doc, labels, registry=r)

    return Metrics(
        registry=r,
        index_info=Info(
            "faissq_index", "Family, FAISS factory string and metric of the index.", ix, registry=r
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
            ("index", "op"),
        ),
        builds_total=counter("faissq_builds_total", "Builds that completed and were swapped in."),
        worker_ready=Gauge(
            "faissq_worker_ready", "1 once every served index was loaded.", registry=r
        ),
        searches_total=counter(
            "faissq_searches_total", "Search requests by outcome.", ("index", "outcome")
        ),
        search_errors_total=counter(
            "faissq_search_errors_total",
            "Search requests not answered with results, by outcome.",
            ("index", "outcome"),
        ),
        search_queries_total=counter(
            "faissq_search_queries_total", "Query vectors searched (a request may carry many)."
        ),
        search_latency_seconds=Histogram(
            "faissq_search_latency_seconds",
            "Time from popping a search request to pushing its reply.",
            ix,
            buckets=LATENCY_BUCKETS,
            registry=r,
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
            registry=r,
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
            registry=r,
        ),
    )


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


# -- updates ---------------------------------------------------------------------------------


def _num(value: Any, default: float = 0.0) -> float:
    """A stats value as a float (None and non-numbers become `default`)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return default


def update_index_gauges(
    metrics: Metrics,
    name: str,
    engine_stats: Mapping[str, Any] | None,
    *,
    ready: bool | None = None,
    seq: int | None = None,
    log_seq: int | None = None,
    snapshot_age_s: float | None = None,
    load_s: float | None = None,
) -> None:
    """Set the index gauges from `Engine.stats()` (None: no engine yet) and the runtime's view.

    Optional keys beyond Engine.stats(): `code_bytes` and `last_durations` ({op: seconds}).
    Keyword values the caller does not know are left as they were.
    """
    m, st = metrics, engine_stats or {}
    family, factory = st.get("family"), st.get("factory")
    m.index_info.labels(name).info(
        {
            "family": str(family or "none"),
            "factory": str(factory or ""),
            "metric": str(st.get("metric") or ""),
        }
    )
    m.index_vectors.labels(name).set(_num(st.get("ntotal")))
    m.index_delta_vectors.labels(name).set(_num(st.get("delta")))
    m.index_tombstones.labels(name).set(_num(st.get("tombstones")))
    code = st.get("code_bytes")
    m.index_code_bytes.labels(name).set(_num(code) + _num(st.get("delta_bytes")))
    m.index_raw_bytes.labels(name).set(_num(st.get("raw_bytes")))
    m.index_dim.labels(name).set(_num(st.get("dim")))
    m.index_version.labels(name).set(_num(st.get("version")))
    m.index_imbalance.labels(name).set(_num(st.get("imbalance"), 1.0))
    m.index_merge_due.labels(name).set(_num(st.get("merge_due")))
    m.index_rebuild_due.labels(name).set(_num(st.get("rebuild_due")))
    on_gpu = bool(st.get("gpu"))
    m.gpu_enabled.labels(name).set(1.0 if on_gpu else 0.0)
    m.cuvs_enabled.labels(name).set(1.0 if on_gpu and "cuVS" in str(st.get("device")) else 0.0)
    m.gpu_failures.labels(name).set(_num(st.get("gpu_failures")))
    tuning = st.get("tuning")
    recall = tuning.get("recall") if isinstance(tuning, Mapping) else None
    if isinstance(recall, int | float):
        m.tuning_recall.labels(name).set(float(recall))
    else:  # no active tuning: no series rather than a made-up value
        _remove(m.tuning_recall, name)
    durations = st.get("last_durations")
    if isinstance(durations, Mapping):
        for op, seconds in durations.items():
            if op in DURATION_OPS and isinstance(seconds, int | float):
                m.last_duration_seconds.labels(name, op).set(float(seconds))
    if load_s is not None:
        m.last_duration_seconds.labels(name, "load").set(load_s)
    if ready is not None:
        m.index_ready.labels(name).set(1.0 if ready else 0.0)
    if seq is not None:
        m.index_seq.labels(name).set(seq)
        if log_seq is not None:
            m.log_seq_lag.labels(name).set(max(0, log_seq - seq))
    if snapshot_age_s is not None:
        m.snapshot_age_seconds.labels(name).set(max(0.0, snapshot_age_s))
    elif engine_stats is None:
        _remove(m.snapshot_age_seconds, name)


def _remove(metric: Gauge, *labels: str) -> None:
    """Drop one labelled series if it exists (a value that no longer applies)."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def observe_search(
    metrics: Metrics | None,
    index: str,
    outcome: str,
    seconds: float,
    *,
    queries: int = 1,
    k: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> None:
    """Record one search request at the RPC loop's exit point (no-op when metrics is None).

    outcome: "ok" when answered, "timeout" for a deadline drop, else the error's wire `code`
    (a fixed set: never put request values in it).
    """
    if metrics is None:
        return
    m = metrics
    m.searches_total.labels(index, outcome).inc()
    if outcome == DEADLINE_DROP:
        m.rpc_deadline_drops_total.labels(index).inc()
    if outcome != SEARCH_OK:
        m.search_errors_total.labels(index, outcome).inc()
        return
    m.search_queries_total.labels(index).inc(max(0, queries))
    if math.isfinite(seconds) and seconds >= 0:
        m.search_latency_seconds.labels(index).observe(seconds)
    if k is not None:
        m.search_last_k.labels(index).set(k)
    if nprobe is not None:
        m.search_last_nprobe.labels(index).set(nprobe)
    if ef_search is not None:
        m.search_last_ef_search.labels(index).set(ef_search)


class TurnLike(Protocol):
    """What the RPC loop records per turn (faissq.rpc.stats.Turn has this shape)."""

    @property
    def popped(self) -> int: ...
    @property
    def answered(self) -> int: ...
    @property
    def errors(self) -> Mapping[str, int]: ...
    @property
    def expired(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def latencies_s(self) -> Sequence[float]: ...


def search_params(engine: Any, request: Any) -> tuple[int | None, int | None]:
    """The (nprobe, efSearch) a request ran with: its own, else what the engine chose for it.

    Mirrors Engine.search: with no parameter given, the autotuned row for the request's
    target_recall applies, else the configured defaults.
    """
    nprobe, ef = getattr(request, "nprobe", None), getattr(request, "ef_search", None)
    if nprobe is None and ef is None and getattr(request, "k_factor", None) is None:
        from faissq.index.tuning import pick

        profile = getattr(engine, "tuning_profile", None)
        chosen = pick(profile, getattr(request, "target_recall", None)) if profile else {}
        cfg = engine.cfg
        nprobe = chosen.get("nprobe") or cfg.default_nprobe
        ef = chosen.get("ef_search") or cfg.default_ef_search
    return nprobe, ef


def observe_turn(
    metrics: Metrics | None,
    index: str,
    turn: TurnLike,
    requests: Sequence[Any] = (),
    engine: Any = None,
) -> None:
    """Record one RPC loop turn at its single exit point (no-op when metrics is None).

    requests: the live (searched) requests of the turn; the last one sets the last k, nprobe
    and efSearch gauges (nprobe only for IVF families, efSearch only for HNSW, resolved
    through `engine` - the Engine, or a callable returning it - when the request left them
    to the index).
    """
    if metrics is None:
        return
    m = metrics
    if turn.popped:
        m.rpc_batch_size.labels(index).observe(turn.popped)
    if turn.answered:
        m.searches_total.labels(index, SEARCH_OK).inc(turn.answered)
    for seconds in turn.latencies_s:
        m.search_latency_seconds.labels(index).observe(seconds)
    for code, n in turn.errors.items():
        m.searches_total.labels(index, code).inc(n)
        m.search_errors_total.labels(index, code).inc(n)
    if turn.expired:
        m.rpc_deadline_drops_total.labels(index).inc(turn.expired)
    if turn.dropped:
        m.searches_total.labels(index, UNREADABLE).inc(turn.dropped)
        m.search_errors_total.labels(index, UNREADABLE).inc(turn.dropped)
    queries = sum(int(getattr(getattr(r, "queries", None), "shape", (1,))[0]) for r in requests)
    if queries:
        m.search_queries_total.labels(index).inc(queries)
    if requests:
        last = requests[-1]
        m.search_last_k.labels(index).set(int(last.k))
        if callable(engine):  # the loop's engine source: the engine serving now
            try:
                engine = engine()
            except Exception:  # no engine (not ready): no parameters to report
                engine = None
        if engine is not None:
            nprobe, ef = search_params(engine, last)
            family = str(_family(engine))
            if nprobe is not None and family.startswith("ivf"):
                m.search_last_nprobe.labels(index).set(nprobe)
            if ef is not None and family == "hnsw":
                m.search_last_ef_search.labels(index).set(ef)


def _family(engine: Any) -> str | None:
    """The family of the engine's primary index (None before a build)."""
    primary = getattr(getattr(engine, "state", None), "primary", None)
    return getattr(getattr(primary, "plan", None), "family", None)


def observe_job(
    metrics: Metrics | None,
    task: str,
    outcome: str,
    seconds: float | None,
    *,
    index: str | None = None,
) -> None:
    """Record a finished Celery job (outcome: success, failure, retry, ...); builds count apart."""
    if metrics is None:
        return
    metrics.jobs_total.labels(task, outcome).inc()
    if seconds is not None and math.isfinite(seconds) and seconds >= 0:
        metrics.job_duration_seconds.labels(task).observe(seconds)
    if index and outcome == "success":
        if task.endswith(".build"):
            metrics.builds_total.labels(index).inc()
        if seconds is not None and task.endswith(".save"):
            metrics.last_duration_seconds.labels(index, "save").set(seconds)
