"""IVF drift on a real `faissq worker`: vectors from another corpus advise a rebuild, and with
recall.drift_rebuild the worker's maintenance rebuilds by itself."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from faissq.cli.demo_data import clustered
from faissq.config import Settings
from faissq.tasks.producer import JobClient

N, DIM, CLUSTERS = 2000, 16, 40
TIMEOUT = 60


def stats_until(jobs: JobClient, index: str, ok: Any) -> dict[str, Any]:
    """Ask for stats until ok(stats) holds (the event); fail with the last stats after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        stats: dict[str, Any] = jobs.stats(index).get(timeout=TIMEOUT)
        if ok(stats):
            return stats
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached; last stats: {stats}")


def test_vectors_from_another_corpus_make_maintenance_rebuild_the_ivf_index(
    worker_factory: Any, index_name: str, job_settings: Settings
) -> None:
    env = {"FAISSQ_MAINTENANCE__INTERVAL_S": "0.05", "FAISSQ_RECALL__DRIFT_REBUILD": "true",
           "FAISSQ_RECALL__DRIFT_INTERVAL_S": "0.1",
           "FAISSQ_INDEX__MERGE_DELTA_MAX": "100000"}  # fmt: skip
    worker_factory([index_name], env=env).start()
    jobs = JobClient(job_settings)
    jobs.build(index_name, clustered(N, DIM, clusters=CLUSTERS, seed=1), family="ivf_flat").get(
        timeout=TIMEOUT
    )
    same = stats_until(jobs, index_name, lambda s: (s["recall_live"] or {}).get("drift"))
    assert same["recall_live"]["drift"]["advised"] is False
    other = clustered(1000, DIM, clusters=CLUSTERS, seed=9)  # another corpus's clusters
    for start in range(0, 1000, 100):
        ids = np.arange(10_000 + start, 10_100 + start)
        jobs.upsert(index_name, ids, other[start : start + 100]).get(timeout=TIMEOUT)
    done = stats_until(jobs, index_name, lambda s: s["maintenance"]["rebuilds"] >= 1)
    assert done["maintenance"]["failures"] == 0
    assert done["engine"]["ntotal"] == N + 1000 and done["engine"]["delta"] == 0  # folded in
    after = stats_until(jobs, index_name, lambda s: (s["recall_live"] or {}).get("drift"))
    assert after["recall_live"]["drift"]["ratio"] < 1.25  # against the retrained centroids
    assert after["maintenance"]["rebuilds"] == 1
    jobs.close()
