"""Metrics named in one place: values from a real engine, RPC turns, jobs, HTTP endpoints."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import numpy as np
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from faissq.config import IndexSettings, Settings
from faissq.errors import IndexNotReady
from faissq.index.engine import Engine
from faissq.rpc.protocol import Request
from faissq.rpc.stats import Turn
from faissq.telemetry.metric_families import (
    Metrics,
    make_metrics,
    metric_names,
    observe_job,
    observe_turn,
    start_http,
    update_index_gauges,
)
from faissq.worker.process_telemetry import code_bytes, job_outcome

# le: histogram buckets; shard and parent: derived from index (faissq.shards' name rule)
LABELS_ALLOWED = {"index", "shard", "parent", "outcome", "task", "op", "state", "le"}


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry's exposition text: (name, sorted labels) -> value."""
    text = prometheus_client.generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The value of the one sample whose labels include these, None when there is none."""
    want = set(labels.items())
    hits = [v for (n, ls), v in scrape(metrics).items() if n == name and want <= set(ls)]
    assert len(hits) <= 1, f"{name} {labels} matches {len(hits)} series"
    return hits[0] if hits else None


def engine(n: int = 400, dim: int = 8, family: str = "flat") -> Engine:
    """A small real engine."""
    eng = Engine(dim, IndexSettings(metric="l2"), name="t")
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    eng.build(x, np.arange(n), family=family)
    return eng


def test_each_call_builds_an_independent_registry_and_import_registers_nothing() -> None:
    a, b = make_metrics(), make_metrics()
    observe_job(a, "faissq.save", "success", 0.1, index="i")
    assert value(a, "faissq_jobs_total", task="faissq.save", outcome="success") == 1
    assert value(b, "faissq_jobs_total", task="faissq.save", outcome="success") is None
    default = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("faissq") for name in default)


def test_names_use_base_units_and_only_low_cardinality_labels() -> None:
    m = make_metrics()
    eng = engine()
    update_index_gauges(m, "i", eng.stats(), ready=True, seq=3, log_seq=3, snapshot_age_s=1.0)
    observe_turn(m, "i", Turn(popped=1, answered=1, latencies_s=[0.001]), [request(10)], eng)
    observe_job(m, "faissq.build", "success", 2.0, index="i")
    for family in m.registry.collect():
        assert family.name.startswith("faissq_")
        assert not family.name.endswith(("_ms", "_milliseconds", "_kb")), family.name
        if family.type == "counter" and family.samples:
            assert family.samples[0].name.endswith("_total"), family.name
        for s in family.samples:
            extra = set(s.labels) - LABELS_ALLOWED
            if family.name == "faissq_index":  # the one info series carries the family string
                extra -= {"family", "factory", "metric"}
            assert not extra, (family.name, s.labels)


def test_index_gauges_report_the_engines_actual_state() -> None:
    m = make_metrics()
    eng = engine(400)
    eng.upsert(np.arange(1000, 1010), np.ones((10, 8), np.float32))
    eng.delete(np.arange(5))
    st = {**eng.stats(), "code_bytes": code_bytes(eng.state.primary.index)}
    st["last_durations"] = dict(eng.last_durations)
    update_index_gauges(m, "i", st, ready=True, seq=7, log_seq=9, snapshot_age_s=12.5, load_s=0.2)
    assert value(m, "faissq_index_vectors", index="i") == eng.ntotal == 405
    assert value(m, "faissq_index_delta_vectors", index="i") == 10
    assert value(m, "faissq_index_tombstones", index="i") == 5
    assert value(m, "faissq_index_dim", index="i") == 8
    assert value(m, "faissq_index_code_bytes", index="i") == 400 * 8 * 4 + st["delta_bytes"]
    assert value(m, "faissq_index_ready", index="i") == 1
    assert value(m, "faissq_log_seq_lag", index="i") == 2
    assert value(m, "faissq_snapshot_age_seconds", index="i") == 12.5
    assert value(m, "faissq_index_last_duration_seconds", index="i", op="load") == 0.2
    built = value(m, "faissq_index_last_duration_seconds", index="i", op="build")
    assert built is not None and built == eng.last_durations["build"]
    assert value(m, "faissq_gpu_enabled", index="i") == 0
    assert value(m, "faissq_cuvs_enabled", index="i") == 0
    info = ("faissq_index_info", (("factory", "IDMap,Flat"), ("family", "flat"), ("index", "i"),
                                  ("metric", "l2"), ("parent", "i"), ("shard", "")))  # fmt: skip
    assert scrape(m)[info] == 1
    assert value(m, "faissq_tuning_recall", index="i") is None  # no autotune yet: no series


def test_a_shards_series_carry_its_shard_and_parent_beside_the_full_index_name() -> None:
    """Every per-index family labels docs.s1of2 with shard "1of2" and parent "docs"; an
    unsharded index gets shard "" and itself as parent, so `sum by (parent)` adds up shards."""
    from faissq.telemetry.recall_metrics import update_recall_gauges

    m = make_metrics()
    eng = engine()
    shard_names = ["docs.s0of2", "docs.s1of2"]
    for name in [*shard_names, "solo", "odd.s2of2"]:  # odd.s2of2: no valid shard (2 >= 2)
        update_index_gauges(m, name, eng.stats(), ready=True, state="ready", seq=1, log_seq=1,
                            snapshot_age_s=1.0, load_s=0.1)  # fmt: skip
        observe_turn(m, name, Turn(popped=1, answered=1, latencies_s=[0.001]), [request(4)], eng)
        observe_job(m, "faissq.build", "success", 1.0, index=name)
        update_recall_gauges(m.recall, name, {"params": {"k=4": {"recall": 1.0, "recall_lo": 0.9,
                             "samples": 3}}, "sampled": 3, "backlog": 0})  # fmt: skip
    want = {"docs.s0of2": ("0of2", "docs"), "docs.s1of2": ("1of2", "docs"),
            "solo": ("", "solo"), "odd.s2of2": ("", "odd.s2of2")}  # fmt: skip
    families = set()
    for (name, labels), _ in scrape(m).items():
        got = dict(labels)
        if "index" in got:
            families.add(name)
            assert (got["shard"], got["parent"]) == want[got["index"]], (name, got)
    assert {
        "faissq_index_vectors",
        "faissq_searches_total",
        "faissq_builds_total",
        "faissq_recall_live",
        "faissq_index_state",
        "faissq_index_info",
    } <= families
    vectors = [value(m, "faissq_index_vectors", parent="docs", shard=s) for s in ("0of2", "1of2")]
    assert vectors == [eng.ntotal, eng.ntotal]


def test_ivf_imbalance_tuning_recall_and_a_rebuilt_family_replace_the_old_values() -> None:
    m = make_metrics()
    eng = engine(3000, 16, "ivf_flat")
    eng.autotune(target_recall=0.5)
    update_index_gauges(m, "i", eng.stats())
    imb = value(m, "faissq_index_imbalance", index="i")
    assert imb is not None and imb == eng.stats()["imbalance"] and imb >= 1.0
    recall = value(m, "faissq_tuning_recall", index="i")
    assert recall is not None and recall == eng.stats()["tuning"]["recall"]
    flat = engine(100, 16, "flat")
    update_index_gauges(m, "i", flat.stats())
    infos = [k for k in scrape(m) if k[0] == "faissq_index_info"]
    assert len(infos) == 1 and ("family", "flat") in infos[0][1]
    assert value(m, "faissq_tuning_recall", index="i") is None


def test_code_bytes_counts_the_encoded_vectors_of_each_family() -> None:
    assert code_bytes(engine(300, 8, "flat").state.primary.index) == 300 * 8 * 4
    hnsw = engine(300, 8, "hnsw").state.primary.index
    assert code_bytes(hnsw) == 300 * 8 * 4
    pq = Engine(8, IndexSettings(pq_bytes=2, opq=False), name="t")
    pq.build(np.random.default_rng(1).standard_normal((1000, 8)).astype(np.float32),
             np.arange(1000), family="ivf_pq")  # fmt: skip
    assert 0 < code_bytes(pq.state.primary.index) <= 1000 * 2


def request(k: int, nprobe: int | None = None, k_factor: int | None = None) -> Request:
    """A decoded search request of two 16-d queries."""
    q = np.zeros((2, 16), np.float32)
    return Request(id="r", reply="faissq:i:reply:r", deadline=0.0, k=k, queries=q, nprobe=nprobe,
                   k_factor=k_factor)  # fmt: skip


def test_an_rpc_turn_records_batch_outcomes_and_the_parameters_actually_used() -> None:
    m = make_metrics()
    eng = engine(3000, 16, "ivf_flat")
    errors = Counter({"timeout": 1, "dimension_mismatch": 1})
    turn = Turn(popped=6, answered=3, errors=errors, expired=1, dropped=1, batch_sizes=[3],
                latencies_s=[0.001, 0.001, 0.002])  # fmt: skip
    observe_turn(m, "i", turn, [request(5), request(7)], lambda: eng)
    assert value(m, "faissq_rpc_batch_size_count", index="i") == 1
    assert value(m, "faissq_rpc_batch_size_sum", index="i") == 6
    assert value(m, "faissq_searches_total", index="i", outcome="ok") == 3
    assert value(m, "faissq_searches_total", index="i", outcome="timeout") == 1
    assert value(m, "faissq_search_errors_total", index="i", outcome="unreadable") == 1
    assert value(m, "faissq_rpc_deadline_drops_total", index="i") == 1
    assert value(m, "faissq_search_latency_seconds_count", index="i") == 3
    assert value(m, "faissq_search_queries_total", index="i") == 4
    assert value(m, "faissq_search_last_k", index="i") == 7
    # the request left nprobe to the index: the configured default was used
    assert value(m, "faissq_search_last_nprobe", index="i") == IndexSettings().default_nprobe
    assert value(m, "faissq_search_last_ef_search", index="i") is None  # not an HNSW index
    eng.autotune(target_recall=0.5)
    observe_turn(m, "i", Turn(popped=1, answered=1), [request(5)], eng)
    tuned = eng.stats()["tuning"]["nprobe"]
    assert value(m, "faissq_search_last_nprobe", index="i") == tuned
    observe_turn(m, "i", Turn(popped=1, answered=1), [request(5, nprobe=3)], eng)
    assert value(m, "faissq_search_last_nprobe", index="i") == 3
    observe_turn(m, "i", Turn(popped=1, answered=1), [request(5, nprobe=tuned + 7)], eng)
    observe_turn(m, "i", Turn(popped=1, answered=1), [request(5, k_factor=1)], eng)
    assert value(m, "faissq_search_last_nprobe", index="i") == tuned  # each parameter on its own

    def not_ready() -> Engine:
        raise IndexNotReady("loading")

    observe_turn(m, "i", Turn(popped=1, answered=1), [request(9)], not_ready)
    assert value(m, "faissq_search_last_k", index="i") == 9


def test_jobs_by_task_and_outcome_count_builds_and_save_durations() -> None:
    m = make_metrics()
    observe_job(m, "faissq.build", "success", 1.5, index="i")
    observe_job(m, "faissq.build", "empty_build", 0.01, index="i")
    observe_job(m, "faissq.save", "success", 0.25, index="i")
    assert value(m, "faissq_builds_total", index="i") == 1
    assert value(m, "faissq_jobs_total", task="faissq.build", outcome="empty_build") == 1
    assert value(m, "faissq_job_duration_seconds_count", task="faissq.build") == 2
    assert value(m, "faissq_index_last_duration_seconds", index="i", op="save") == 0.25


def test_job_outcome_labels() -> None:
    from faissq.errors import DeadLettered, StorageUnavailable

    assert job_outcome("SUCCESS", None) == "success"
    assert job_outcome("RETRY", StorageUnavailable("x")) == "retry"
    assert job_outcome("FAILURE", DeadLettered("x")) == "dead_lettered"
    assert job_outcome("FAILURE", ValueError("x")) == "error"


def get(url: str) -> tuple[int, str, str]:
    """Status, content type and body of a GET (error statuses included)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_http_serves_metrics_liveness_and_readiness_per_index_on_a_free_port() -> None:
    m = make_metrics()
    health = {"a": {"ready": True, "state": "ready"}, "b": {"ready": False, "state": "loading"}}
    scrapes: list[int] = []

    def refresh() -> None:
        scrapes.append(1)
        m.worker_ready.set(len(scrapes))

    m.scrape.refresh = refresh
    settings = Settings(metrics={"port": 0, "host": "127.0.0.1"})
    server = start_http(settings, m.registry, lambda: health)
    try:
        assert server.port > 0
        status, ctype, body = get(f"{server.url}/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert "faissq_worker_ready 1.0" in body and scrapes == [1]
        assert get(f"{server.url}/healthz")[0] == 200
        status, _, body = get(f"{server.url}/readyz")
        assert status == 503 and json.loads(body)["indexes"]["b"]["state"] == "loading"
        assert get(f"{server.url}/readyz?index=a")[0] == 200
        assert get(f"{server.url}/readyz?index=b")[0] == 503
        assert get(f"{server.url}/readyz?index=zzz")[0] == 404
        health["b"]["ready"] = True
        assert get(f"{server.url}/readyz")[0] == 200
        assert get(f"{server.url}/nothing")[0] == 404
    finally:
        server.close()


def test_a_failing_refresh_or_health_check_never_breaks_the_endpoint() -> None:
    m = make_metrics()

    def broken() -> Any:
        raise RuntimeError("storage away")

    m.scrape.refresh = broken
    settings = Settings(metrics={"port": 0, "host": "127.0.0.1"})
    server = start_http(settings, m.registry, broken)
    try:
        assert get(f"{server.url}/metrics")[0] == 200
        status, _, body = get(f"{server.url}/readyz")
        assert status == 503 and "storage away" in body
        assert get(f"{server.url}/healthz")[0] == 200
    finally:
        server.close()


def test_metric_names_lists_every_exposed_sample_name() -> None:
    names = metric_names(make_metrics())
    for name in ("faissq_search_latency_seconds_bucket", "faissq_searches_total",
                 "faissq_index_vectors", "faissq_rpc_queue_depth", "faissq_index_info",
                 "faissq_jobs_total"):  # fmt: skip
        assert name in names


def test_the_operations_doc_lists_every_metric_and_no_other() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    rows = re.findall(r"^\| `(faissq_[a-z_]+)` \|", doc, re.M)
    defined = set()
    for family in make_metrics().registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        defined.add(family.name + suffix)
    assert set(rows) == defined and len(rows) == len(defined)


def test_index_state_is_one_series_per_state_with_1_on_the_current_one() -> None:
    from faissq.telemetry.metric_updates import INDEX_STATES
    from faissq.worker.runtime import IndexState

    assert tuple(s.value for s in IndexState) == INDEX_STATES
    m = make_metrics()
    update_index_gauges(m, "i", None, ready=True, state="degraded")
    assert {s: value(m, "faissq_index_state", index="i", state=s) for s in INDEX_STATES} == {
        s: (1.0 if s == "degraded" else 0.0) for s in INDEX_STATES
    }
    update_index_gauges(m, "i", None, ready=True, state="ready")
    assert value(m, "faissq_index_state", index="i", state="degraded") == 0
    assert value(m, "faissq_index_state", index="i", state="ready") == 1
