"""/metrics, /healthz, /readyz and the healthcheck of a real `faissq worker` at work."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from faissq.config import Settings
from faissq.rpc.search_client import SearchClient
from faissq.tasks.producer import JobClient
from faissq.telemetry.healthcheck import check

DIM = 16
TIMEOUT = 30


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    """Status and body of a GET (error statuses included)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, text = get(f"{base}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    """The value of the one sample whose labels include these, None when there is none."""
    want = set(labels.items())
    hits = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert len(hits) <= 1, f"{name} {labels} matches {len(hits)} series"
    return hits[0] if hits else None


def vecs(n: int, seed: int = 0) -> np.ndarray:
    """Random float32 vectors."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def test_metrics_of_a_live_worker_match_the_index_state(
    worker_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """Gauges equal what faissq.stats reports; jobs, searches and readiness are all visible."""
    port = free_port()
    env = {"FAISSQ_METRICS__ENABLED": "true", "FAISSQ_METRICS__PORT": str(port),
           "FAISSQ_METRICS__HOST": "127.0.0.1"}  # fmt: skip
    worker = worker_factory([index_name], env=env).start()
    base = f"http://127.0.0.1:{port}"
    assert get(f"{base}/healthz")[0] == 200
    status, body = get(f"{base}/readyz?index={index_name}")
    assert status == 503 and json.loads(body)["indexes"][index_name]["state"] == "empty"

    jobs = JobClient(job_settings)
    jobs.build(index_name, vecs(500), np.arange(500)).get(timeout=TIMEOUT)
    jobs.upsert(index_name, np.arange(1000, 1020), vecs(20, seed=1)).get(timeout=TIMEOUT)
    jobs.delete(index_name, np.arange(5)).get(timeout=TIMEOUT)
    bad = jobs.upsert(index_name, [7], np.ones((1, DIM + 1), np.float32))
    assert bad.get(timeout=TIMEOUT, propagate=False) is not None and bad.failed()
    stats = jobs.stats(index_name).get(timeout=TIMEOUT)
    assert stats["ntotal"] == 515

    with SearchClient(job_settings, index=index_name) as client:
        for row in vecs(5, seed=2):
            client.search(row[None, :], 4)

    assert get(f"{base}/readyz")[0] == 200
    # jobs and searches are counted after their reply is sent: poll briefly for the last ones
    deadline = time.monotonic() + 5
    while True:
        m = scrape(base)
        searched = sample(m, "faissq_searches_total", index=index_name, outcome="ok") or 0
        stats_jobs = sample(m, "faissq_jobs_total", task="faissq.stats", outcome="success") or 0
        if (searched >= 5 and stats_jobs >= 1) or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    ix = {"index": index_name}
    assert sample(m, "faissq_index_vectors", **ix) == stats["ntotal"]
    assert sample(m, "faissq_index_delta_vectors", **ix) == stats["engine"]["delta"] == 20
    assert sample(m, "faissq_index_tombstones", **ix) == stats["engine"]["tombstones"] == 5
    assert sample(m, "faissq_index_dim", **ix) == DIM
    assert sample(m, "faissq_index_seq", **ix) == stats["seq"]
    assert sample(m, "faissq_log_seq_lag", **ix) == 0
    assert sample(m, "faissq_index_ready", **ix) == 1
    assert sample(m, "faissq_worker_ready") == 1
    assert (sample(m, "faissq_index_code_bytes", **ix) or 0) >= 500 * DIM * 4
    age = sample(m, "faissq_snapshot_age_seconds", **ix)  # the build wrote a snapshot
    assert age is not None and 0 <= age < 60
    assert sample(m, "faissq_builds_total", **ix) == 1
    assert sample(m, "faissq_jobs_total", task="faissq.upsert", outcome="success") == 1
    assert sample(m, "faissq_jobs_total", task="faissq.upsert", outcome="dimension_mismatch") == 1
    assert (sample(m, "faissq_job_duration_seconds_count", task="faissq.build") or 0) >= 1
    assert sample(m, "faissq_rpc_queue_depth", **ix) == 0
    assert sample(m, "faissq_searches_total", index=index_name, outcome="ok") == 5
    assert sample(m, "faissq_search_latency_seconds_count", **ix) == 5
    assert sample(m, "faissq_search_last_k", **ix) == 4
    info = [k for k in m if k[0] == "faissq_index_info" and ("index", index_name) in k[1]]
    assert len(info) == 1 and ("family", stats["engine"]["family"]) in info[0][1]
    local = job_settings.model_copy(update={"metrics": job_settings.metrics.model_copy(
        update={"enabled": True, "port": port, "host": "127.0.0.1"})})  # fmt: skip
    assert check(local) == (True, f"loaded: {index_name} ready")
    jobs.close()
    assert worker.stop() == 0
    assert check(local)[0] is False  # nothing answers on the stopped worker's port
