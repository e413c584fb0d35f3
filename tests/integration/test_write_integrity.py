"""Acknowledged means applied, in order, with its bytes: a real worker on storage that fails.

Faults come from `faultfs://` (faissq.storage.faults), switched on and off through its control
file while the worker runs; the tests wait for the n-th injected failure, never for a delay.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_metrics_live import free_port, sample, scrape

from faissq.config import Settings
from faissq.rpc.search_client import SearchClient
from faissq.storage import faults
from faissq.tasks.producer import JobClient

DIM = 16
TIMEOUT = 60


def vec(seed: int) -> np.ndarray:
    """One random float32 vector (1, DIM)."""
    return np.random.default_rng(seed).standard_normal((1, DIM)).astype(np.float32)


def wait_for(predicate: Any, what: str, timeout_s: float = TIMEOUT) -> None:
    """Poll an event until it happens; the timeout only bounds a broken run."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def faulty_env(storage_root: Path, control: Path, **extra: str) -> dict[str, str]:
    """Worker environment: storage through faultfs, fast in-place retries."""
    return {
        "FAISSQ_STORAGE__URL": f"faultfs://{storage_root}",
        "FAISSQ_STORAGE__OPTIONS": json.dumps({"control": str(control)}),
        "FAISSQ_WORKER__RETRY_BACKOFF_S": "0.01",
        "FAISSQ_WORKER__RETRY_BACKOFF_MAX_S": "0.05",
        "FAISSQ_WORKER__STORAGE_RETRIES": "10000",
        **extra,
    }


@pytest.mark.parametrize(
    "fault",
    [
        {"errno": "ENOSPC", "truncate_after": 40},  # disk full: torn writes
        {"errno": "EROFS"},  # a read-only remount: nothing can be created
    ],
    ids=["enospc", "read-only"],
)
def test_writes_retried_under_storage_failure_apply_in_the_order_sent(
    worker_factory: Any,
    storage_root: Path,
    tmp_path: Path,
    index_name: str,
    job_settings: Settings,
    fault: dict[str, Any],
) -> None:
    """20 pairs upsert(S, v1), upsert(S, v2) while storage fails: v2 wins 20 times out of 20.

    The jobs wait in their queue while the first one retries in place; the RETRY state and the
    retry counter show the wait.
    """
    control = tmp_path / "faults.json"
    port = free_port()
    env = faulty_env(storage_root, control, FAISSQ_METRICS__ENABLED="true",
                     FAISSQ_METRICS__PORT=str(port), FAISSQ_METRICS__HOST="127.0.0.1")  # fmt: skip
    worker_factory([index_name], env=env).start()
    jobs = JobClient(job_settings)
    assert jobs.upsert(index_name, [0], vec(0), by_reference=False).get(timeout=TIMEOUT)["seq"] == 1

    faults.set_faults(str(control), ["write"], **fault)
    pairs = []
    for i in range(20):
        sid = 100 + i
        first = jobs.upsert(index_name, [sid], vec(1000 + i), by_reference=False)
        second = jobs.upsert(index_name, [sid], vec(2000 + i), by_reference=False)
        pairs.append((sid, first, second))
    head = pairs[0][1]
    wait_for(lambda: faults.hits(str(control)) >= 5, "five injected storage failures")
    wait_for(lambda: head.state == "RETRY", "the first job to show RETRY")
    assert type(head.info).__name__ == "StorageUnavailable"
    assert all(not r.ready() for _, _, r in pairs), "a later job overtook the retrying one"
    faults.set_faults(str(control), [])

    seqs = []
    for _, first, second in pairs:
        seqs += [first.get(timeout=TIMEOUT)["seq"], second.get(timeout=TIMEOUT)["seq"]]
    assert seqs == list(range(2, 42)), "mutations were logged out of the order they were sent"
    searcher = SearchClient(job_settings, index_name)
    try:
        queries = np.concatenate([vec(2000 + i) for i in range(20)])
        out = searcher.search(queries, 1, timeout=10)
        newer_wins = sum(int(out.ids[i, 0] == 100 + i and out.scores[i, 0] > 0.999)
                         for i in range(20))  # fmt: skip
    finally:
        searcher.close()
    assert newer_wins == 20
    retries = sample(scrape(f"http://127.0.0.1:{port}"), "faissq_storage_retries_total",
                     index=index_name, task="faissq.upsert")  # fmt: skip
    assert retries is not None and retries >= 5
    jobs.close()
