"""How faissq's metrics move: engine gauges at each scrape, and each search, RPC turn and job.

The families themselves are defined in metric_families, which re-exports everything here.
Every observe_* takes `None` for metrics (disabled) and then does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from faissq.shards import parse_shard

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from faissq.telemetry.metric_families import Metrics

SEARCH_OK = "ok"  # the outcome of a search that was answered
DEADLINE_DROP = "timeout"  # the outcome (wire code) of a request whose deadline had passed
UNREADABLE = "unreadable"  # the outcome of a request dropped unanswered: no usable reply key
DURATION_OPS = ("build", "merge", "rebuild", "save", "load")  # values of the `op` label
# values of the `state` label: those of faissq.worker.runtime.IndexState (a test pins them)
INDEX_STATES = ("loading", "empty", "ready", "rebuilding", "degraded", "failed")
# the labels of every per-index family: the serving name, its shard ("2of4"; "" when unsharded)
# and the index it is part of (the sharded index's name; an unsharded index's own), so
# `sum by (parent)` adds a sharded index's shards up and `index` queries keep working
INDEX_LABELS = ("index", "shard", "parent")


@functools.lru_cache(maxsize=4096)
def index_labels(index: str) -> tuple[str, str, str]:
    """The INDEX_LABELS values of an index: docs.s2of4 -> ("docs.s2of4", "2of4", "docs")."""
    parsed = parse_shard(index)
    if parsed is None:
        return index, "", index
    parent, shard, shards = parsed
    return index, f"{shard}of{shards}", parent


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
    state: str | None = None,
    seq: int | None = None,
    log_seq: int | None = None,
    snapshot_age_s: float | None = None,
    load_s: float | None = None,
) -> None:
    """Set the index gauges from `Engine.stats()` (None: no engine yet) and the runtime's view.

    Optional keys beyond Engine.stats(): `code_bytes` and `last_durations` ({op: seconds}).
    Keyword values the caller does not know are left as they were.
    """
    m, st, ix = metrics, engine_stats or {}, index_labels(name)
    family, factory = st.get("family"), st.get("factory")
    m.index_info.labels(*ix).info(
        {
            "family": str(family or "none"),
            "factory": str(factory or ""),
            "metric": str(st.get("metric") or ""),
        }
    )
    m.index_vectors.labels(*ix).set(_num(st.get("ntotal")))
    m.index_delta_vectors.labels(*ix).set(_num(st.get("delta")))
    m.index_tombstones.labels(*ix).set(_num(st.get("tombstones")))
    code = st.get("code_bytes")
    m.index_code_bytes.labels(*ix).set(_num(code) + _num(st.get("delta_bytes")))
    m.index_raw_bytes.labels(*ix).set(_num(st.get("raw_bytes")))
    m.index_dim.labels(*ix).set(_num(st.get("dim")))
    m.index_version.labels(*ix).set(_num(st.get("version")))
    m.index_imbalance.labels(*ix).set(_num(st.get("imbalance"), 1.0))
    m.index_merge_due.labels(*ix).set(_num(st.get("merge_due")))
    m.index_rebuild_due.labels(*ix).set(_num(st.get("rebuild_due")))
    on_gpu = bool(st.get("gpu"))
    m.gpu_enabled.labels(*ix).set(1.0 if on_gpu else 0.0)
    m.cuvs_enabled.labels(*ix).set(1.0 if on_gpu and "cuVS" in str(st.get("device")) else 0.0)
    m.gpu_failures.labels(*ix).set(_num(st.get("gpu_failures")))
    tuning = st.get("tuning")
    recall = tuning.get("recall") if isinstance(tuning, Mapping) else None
    if isinstance(recall, int | float):
        m.tuning_recall.labels(*ix).set(float(recall))
    else:  # no active tuning: no series rather than a made-up value
        _remove(m.tuning_recall, *ix)
    durations = st.get("last_durations")
    if isinstance(durations, Mapping):
        for op, seconds in durations.items():
            if op in DURATION_OPS and isinstance(seconds, int | float):
                m.last_duration_seconds.labels(*ix, op).set(float(seconds))
    if load_s is not None:
        m.last_duration_seconds.labels(*ix, "load").set(load_s)
    if ready is not None:
        m.index_ready.labels(*ix).set(1.0 if ready else 0.0)
    if state is not None:  # one series per state, 1 on the current one: alerts match on the label
        for each in INDEX_STATES:
            m.index_state.labels(*ix, each).set(1.0 if each == state else 0.0)
    if seq is not None:
        m.index_seq.labels(*ix).set(seq)
        if log_seq is not None:
            m.log_seq_lag.labels(*ix).set(max(0, log_seq - seq))
    if snapshot_age_s is not None:
        m.snapshot_age_seconds.labels(*ix).set(max(0.0, snapshot_age_s))
    elif engine_stats is None:
        _remove(m.snapshot_age_seconds, *ix)


def _remove(metric: Gauge, *labels: str) -> None:
    """Drop one labelled series if it exists (a value that no longer applies)."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


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

    Mirrors Engine.search: each parameter the request leaves unnamed comes from the autotuned
    row for its target_recall, else from the configured default.
    """
    nprobe, ef = getattr(request, "nprobe", None), getattr(request, "ef_search", None)
    if nprobe is None or ef is None:
        from faissq.index.tuning import pick

        profile = getattr(engine, "tuning_profile", None)
        chosen = pick(profile, getattr(request, "target_recall", None)) if profile else {}
        cfg = engine.cfg
        nprobe = nprobe if nprobe is not None else chosen.get("nprobe") or cfg.default_nprobe
        ef = ef if ef is not None else chosen.get("ef_search") or cfg.default_ef_search
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
    m, ix = metrics, index_labels(index)
    if turn.popped:
        m.rpc_batch_size.labels(*ix).observe(turn.popped)
    if turn.answered:
        m.searches_total.labels(*ix, SEARCH_OK).inc(turn.answered)
    for seconds in turn.latencies_s:
        m.search_latency_seconds.labels(*ix).observe(seconds)
    for code, n in turn.errors.items():
        m.searches_total.labels(*ix, code).inc(n)
        m.search_errors_total.labels(*ix, code).inc(n)
    if turn.expired:
        m.rpc_deadline_drops_total.labels(*ix).inc(turn.expired)
    if turn.dropped:
        m.searches_total.labels(*ix, UNREADABLE).inc(turn.dropped)
        m.search_errors_total.labels(*ix, UNREADABLE).inc(turn.dropped)
    queries = sum(int(getattr(getattr(r, "queries", None), "shape", (1,))[0]) for r in requests)
    if queries:
        m.search_queries_total.labels(*ix).inc(queries)
    if requests:
        last = requests[-1]
        m.search_last_k.labels(*ix).set(int(last.k))
        if callable(engine):  # the loop's engine source: the engine serving now
            try:
                engine = engine()
            except Exception:  # no engine (not ready): no parameters to report
                engine = None
        if engine is not None:
            nprobe, ef = search_params(engine, last)
            family = str(_family(engine))
            if nprobe is not None and family.startswith("ivf"):
                m.search_last_nprobe.labels(*ix).set(nprobe)
            if ef is not None and family == "hnsw":
                m.search_last_ef_search.labels(*ix).set(ef)


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
        ix = index_labels(index)
        if task.endswith(".build"):
            metrics.builds_total.labels(*ix).inc()
        if seconds is not None and task.endswith(".save"):
            metrics.last_duration_seconds.labels(*ix, "save").set(seconds)


def observe_storage_retry(metrics: Metrics | None, task: str, index: str | None) -> None:
    """Count one in-place retry of a job that found storage unavailable."""
    if metrics is not None:
        metrics.storage_retries_total.labels(*index_labels(index or "unknown"), task).inc()
