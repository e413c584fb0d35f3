"""How faissq's metrics move: engine gauges at each scrape, and each search, RPC turn and job.

The families themselves are defined in metric_families, which re-exports everything here.
Every observe_* takes `None` for metrics (disabled) and then does nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from faissq.telemetry.metric_families import Metrics

SEARCH_OK = "ok"  # the outcome of a search that was answered
DEADLINE_DROP = "timeout"  # the outcome (wire code) of a request whose deadline had passed
UNREADABLE = "unreadable"  # the outcome of a request dropped unanswered: no usable reply key
DURATION_OPS = ("build", "merge", "rebuild", "save", "load")  # values of the `op` label
# values of the `state` label: those of faissq.worker.runtime.IndexState (a test pins them)
INDEX_STATES = ("loading", "empty", "ready", "rebuilding", "degraded", "failed")


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
    if state is not None:  # one series per state, 1 on the current one: alerts match on the label
        for each in INDEX_STATES:
            m.index_state.labels(name, each).set(1.0 if each == state else 0.0)
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


def observe_storage_retry(metrics: Metrics | None, task: str, index: str | None) -> None:
    """Count one in-place retry of a job that found storage unavailable."""
    if metrics is not None:
        metrics.storage_retries_total.labels(index or "unknown", task).inc()
