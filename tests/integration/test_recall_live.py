"""Live recall, autotune on sampled queries and the recall gate, on a real `faissq worker`.

The corpus is clustered and the queries fall between two clusters: autotune's synthetic queries
(stored vectors moved off their point) then overstate the recall the real traffic gets, which
is what live recall must show and what autotune on sampled queries must correct.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import WorkerProcess, make_settings
from prometheus_client.parser import text_string_to_metric_families
from rpc_support import wait_for

from faissq.cli.demo_data import clustered, queries_between
from faissq.config import Settings
from faissq.errors import RecallRegression
from faissq.index import tuning
from faissq.rpc.search_client import SearchClient
from faissq.tasks.producer import JobClient

N, DIM, CLUSTERS, SPREAD = 10_000, 32, 100, 1.0
SERVED = 600  # real queries served (all sampled: rate 1)
TARGET = 0.95
TIMEOUT = 60


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exact_ids(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows under cosine, by numpy alone (independent of FAISS and of faissq)."""
    xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    return np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall@k."""
    return float(np.mean([np.intersect1d(f, t).size / t.size
                          for f, t in zip(found, truth, strict=True)]))  # fmt: skip


@dataclass
class Live:
    """A worker serving an IVF index tuned on synthetic queries, after SERVED real searches."""

    worker: WorkerProcess
    settings: Settings
    index: str
    metrics: str
    xb: np.ndarray
    served: np.ndarray  # the queries sent
    found: np.ndarray  # the ids the worker answered
    tuned: dict[str, object]  # the synthetic autotune's profile
    jobs: JobClient
    search: SearchClient


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def live(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Build, autotune (synthetic: nothing sampled yet), then serve real queries in batches."""
    root: Path = tmp_path_factory.mktemp("recall-storage")
    index = f"q{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {"FAISSQ_METRICS__ENABLED": "true", "FAISSQ_METRICS__PORT": str(port),
           "FAISSQ_METRICS__HOST": "127.0.0.1", "FAISSQ_RECALL__SAMPLE_RATE": "1",
           "FAISSQ_RECALL__MIN_QUERIES": "300", "FAISSQ_RECALL__CPU_FRACTION": "0.5",
           "FAISSQ_MAINTENANCE__ENABLED": "false"}  # fmt: skip
    worker = WorkerProcess(redis_url, root, [index], tmp_path_factory.mktemp("logs"), env)
    worker.start()
    settings = make_settings(redis_url, root, [index])
    jobs = JobClient(settings)
    xb = clustered(N, DIM, clusters=CLUSTERS, spread=SPREAD, seed=1)
    jobs.build(index, xb, family="ivf_flat").get(timeout=TIMEOUT)
    tuned = jobs.autotune(index, target_recall=TARGET).get(timeout=TIMEOUT)
    served = queries_between(N, DIM, clusters=CLUSTERS, spread=SPREAD, seed=1, nq=SERVED)
    search = SearchClient(settings, index)
    found = np.concatenate([search.search(served[i : i + 20], 10).ids
                            for i in range(0, SERVED, 20)])  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"

    def checked() -> bool:
        total = sum(v for (name, _), v in scrape(url).items()
                    if name == "faissq_recall_live_samples")  # fmt: skip
        return total >= SERVED

    wait_for(checked, TIMEOUT, "every sampled query checked by exact search")
    yield Live(worker, settings, index, url, xb, served, found, tuned, jobs, search)
    search.close()
    jobs.close()
    worker.stop(timeout_s=10)
    worker.app.close()


def test_live_recall_shows_what_synthetic_calibration_overstates(live: Live) -> None:
    """The metric equals an offline exact check of the same queries; autotune claimed more."""
    chosen = live.tuned["chosen"]
    assert isinstance(chosen, dict)
    assert live.tuned["source"] == "synthetic" and chosen["recall_lo"] >= TARGET
    param = f"k=10 nprobe={chosen['nprobe']}"
    samples = scrape(live.metrics)
    ix = (("index", live.index), ("param", param), ("parent", live.index), ("shard", ""))
    shown = samples[("faissq_recall_live", ix)]
    count = samples[("faissq_recall_live_samples", ix)]
    offline = recall(live.found, exact_ids(live.xb, live.served, 10))
    assert count == SERVED
    assert abs(shown - offline) <= 0.01, (shown, offline)
    assert shown < chosen["recall_lo"] - 0.02, (shown, chosen)  # synthetic overstated it
    ix = (("index", live.index), ("parent", live.index), ("shard", ""))
    assert samples[("faissq_recall_sampled_total", ix)] == SERVED
    stats = live.jobs.stats(live.index).get(timeout=TIMEOUT)
    assert stats["recall_live"]["params"][param]["samples"] == SERVED
    argv = [sys.executable, "-m", "faissq", "status", "--index", live.index]
    out = subprocess.run(argv, env=live.worker.env(), capture_output=True, text=True, timeout=60)
    row = stats["recall_live"]["params"][param]
    line = f"{param}: {row['recall']:.4f} (lower bound {row['recall_lo']:.4f}, {SERVED} queries)"
    assert line in out.stdout, out.stdout


def test_a_worse_rebuild_is_refused_and_the_old_index_serves_on(live: Live) -> None:
    """A rebuild into a lossy IVF-PQ fails with RecallRegression (its report); nothing changes."""
    before = live.search.search(live.served[:50], 10).ids
    with pytest.raises(RecallRegression) as info:
        live.jobs.rebuild(live.index, family="IVF64,PQ2").get(timeout=TIMEOUT)
    report = info.value.report
    assert report["samples"] >= 300 and report["passed"] is False
    assert report["candidate"]["recall"] < report["serving"]["recall"] - report["margin"]
    stats = live.jobs.stats(live.index).get(timeout=TIMEOUT)
    assert stats["state"] == "ready" and stats["engine"]["family"] == "ivf_flat"
    assert np.array_equal(live.search.search(live.served[:50], 10).ids, before)


def test_a_worse_build_job_is_refused_and_the_old_index_serves_on(live: Live) -> None:
    """A build job of the same rows into a lossy IVF-PQ is gated like a rebuild: refused, and
    neither swapped in nor saved (a restart would load it otherwise)."""
    before = live.search.search(live.served[:50], 10).ids
    snapshot = live.jobs.stats(live.index).get(timeout=TIMEOUT)["snapshot_version"]
    with pytest.raises(RecallRegression) as info:
        live.jobs.build(live.index, live.xb, family="IVF64,PQ2").get(timeout=TIMEOUT)
    report = info.value.report
    assert report["samples"] >= 300 and report["passed"] is False
    assert report["candidate"]["recall"] < report["serving"]["recall"] - report["margin"]
    stats = live.jobs.stats(live.index).get(timeout=TIMEOUT)
    assert stats["state"] == "ready" and stats["engine"]["family"] == "ivf_flat"
    assert stats["snapshot_version"] == snapshot and stats["ntotal"] == N
    assert np.array_equal(live.search.search(live.served[:50], 10).ids, before)


def test_autotune_on_sampled_queries_meets_the_target_on_new_queries(live: Live) -> None:
    """With enough sampled queries autotune uses them; unseen real queries then meet the target."""
    profile = live.jobs.autotune(live.index, target_recall=TARGET).get(timeout=TIMEOUT)
    assert profile["source"] == "live" and profile["num_queries"] >= 300
    assert profile["chosen"]["recall_lo"] >= TARGET
    fresh = queries_between(N, DIM, clusters=CLUSTERS, spread=SPREAD, seed=1, nq=1000,
                            query_seed=99)  # fmt: skip
    truth = exact_ids(live.xb, fresh, 10)
    per = tuning.recall_per_query(live.search.search(fresh, 10).ids, truth)
    assert tuning.lower_bound(per) >= TARGET  # the target met with confidence on unseen queries
    # the whole curve was measured: a lower per-request target maps to a cheaper measured row
    cheaper = live.search.search(fresh, 10, target_recall=0.9)
    assert cheaper.target_met is True and recall(cheaper.ids, truth) >= 0.9
    assert any(0.9 <= row["recall_lo"] < TARGET for row in profile["table"])


def test_force_publishes_a_refused_rebuild_and_says_so(live: Live) -> None:
    """force=True swaps in what the gate refused, logged; a good rebuild then passes the gate."""
    forced = live.jobs.rebuild(live.index, family="IVF64,PQ2", force=True).get(timeout=TIMEOUT)
    gate = forced["recall_gate"]
    assert gate["passed"] is False and gate["forced"] is True and forced["family"] != "ivf_flat"
    assert "published anyway (force)" in live.worker.log_tail(20_000)
    back = live.jobs.rebuild(live.index, family="ivf_flat").get(timeout=TIMEOUT)
    assert back["recall_gate"]["passed"] is True and back["family"] == "ivf_flat"
    # each gated rebuild is snapshotted once swapped in, so a restart keeps it
    assert back["snapshot"]["version"] > forced["snapshot"]["version"]
    stats = live.jobs.stats(live.index).get(timeout=TIMEOUT)
    assert stats["snapshot_version"] == back["snapshot"]["version"]
