"""Background maintenance of a real `faissq worker`: it merges and saves on its own, as jobs."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from faissq import keys
from faissq.config import Settings
from faissq.rpc.search_client import SearchClient
from faissq.storage import faults
from faissq.storage.fs import Storage
from faissq.storage.log import UpdateLog
from faissq.tasks.producer import JobClient

DIM = 16
TIMEOUT = 60


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str, **labels: str) -> float | None:
    """The sample of the worker's /metrics whose labels include these, None when absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return float(s.value)
    return None


def vecs(n: int, seed: int = 0) -> np.ndarray:
    """Random float32 vectors."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def wait_for(jobs: JobClient, index: str, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Ask for stats until `ok(stats)` holds (the event); fail with the last stats after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        stats: dict[str, Any] = jobs.stats(index).get(timeout=TIMEOUT)
        if ok(stats):
            return stats
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached; last stats: {stats}")


def log_entries(storage_root: Path, index: str) -> list[int]:
    """Seqs of the update-log entry files on storage."""
    return UpdateLog(Storage.from_url(str(storage_root)), index).entry_seqs()


def test_a_delta_past_merge_delta_max_is_merged_by_the_worker_itself(
    worker_factory: Any, index_name: str, job_settings: Settings, redis_client: Any
) -> None:
    """Upserts past merge_delta_max: a faissq.maintain job merges them; stats and metric say so.

    Nobody sends a merge: the delta shrinking to 0 with every vector still found is the event.
    """
    port = free_port()
    env = {
        # only the third upsert (150 delta rows) passes it: an earlier merge would leave 50 behind
        "FAISSQ_INDEX__MERGE_DELTA_MAX": "120",
        "FAISSQ_MAINTENANCE__INTERVAL_S": "0.05",
        "FAISSQ_METRICS__ENABLED": "true",
        "FAISSQ_METRICS__PORT": str(port),
        "FAISSQ_METRICS__HOST": "127.0.0.1",
    }
    worker_factory([index_name], env=env).start()
    jobs = JobClient(job_settings)
    jobs.build(index_name, vecs(400), np.arange(400), family="ivf_flat").get(timeout=TIMEOUT)
    new = vecs(150, seed=1)
    for start in range(0, 150, 50):
        ids = np.arange(1000 + start, 1050 + start)
        jobs.upsert(index_name, ids, new[start : start + 50]).get(timeout=TIMEOUT)

    stats = wait_for(jobs, index_name, lambda s: s["maintenance"]["merges"] >= 1
                     and s["engine"]["delta"] == 0)  # fmt: skip
    assert stats["engine"]["ntotal"] == 550
    assert stats["engine"]["primary"] == 550
    assert stats["maintenance"]["failures"] == 0
    assert redis_client.get(keys.maintain_pending(index_name)) is None  # nothing left pending
    with SearchClient(job_settings, index=index_name) as search:
        got = search.search(new[:5], k=1, nprobe=64)
    np.testing.assert_array_equal(np.asarray(got.ids)[:, 0], np.arange(1000, 1005))

    merged = metric(port, "faissq_maintenance_total", index=index_name, action="merge")
    assert merged is not None and merged >= 1


def test_searches_are_answered_while_a_maintenance_job_is_held_in_its_save(
    worker_factory: Any,
    index_name: str,
    job_settings: Settings,
    storage_root: Path,
    tmp_path: Path,
    redis_client: Any,
) -> None:
    """A maintain job merges, then hangs writing its snapshot (faultfs stall): meanwhile the
    search loop answers from the merged state, upserted vectors included; released, it ends.

    The writer thread is the one held, so a search that waited on it would time out here.
    """
    control = str(tmp_path / "faults.json")
    env = {
        "FAISSQ_STORAGE__URL": f"faultfs://{storage_root}",
        "FAISSQ_STORAGE__OPTIONS": json.dumps({"control": control}),
        # both come due with the third upsert, so one maintain job merges, then saves
        "FAISSQ_INDEX__MERGE_DELTA_MAX": "150",
        "FAISSQ_MAINTENANCE__INTERVAL_S": "0.05",
        "FAISSQ_MAINTENANCE__SAVE_LOG_BYTES": str(3 * 50 * (8 + 4 * DIM)),
        "FAISSQ_MAINTENANCE__SAVE_LOG_AGE_S": "0",
    }
    worker_factory([index_name], env=env).start()
    jobs = JobClient(job_settings)
    jobs.build(index_name, vecs(400), np.arange(400), family="ivf_flat").get(timeout=TIMEOUT)
    faults.set_faults(control, stall=["write"], match="primary_vectors.npy")
    new = vecs(150, seed=1)
    for start in range(0, 150, 50):
        ids = np.arange(1000 + start, 1050 + start)
        jobs.upsert(index_name, ids, new[start : start + 50]).get(timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while faults.stalls(control) < 1:  # the event: the maintenance save hangs in its write
        assert time.monotonic() < deadline, "the maintenance save never started"
        time.sleep(0.005)
    assert redis_client.get(keys.maintain_pending(index_name)) is not None  # still running
    with SearchClient(job_settings, index=index_name) as search:
        for _ in range(20):
            got = search.search(new[:5], k=1, nprobe=64, timeout=10)
            np.testing.assert_array_equal(np.asarray(got.ids)[:, 0], np.arange(1000, 1005))
    faults.set_faults(control, [])
    stats = wait_for(jobs, index_name, lambda s: s["maintenance"]["saves"] >= 1)
    assert stats["maintenance"]["merges"] >= 1 and stats["engine"]["delta"] == 0
    assert stats["engine"]["ntotal"] == 550 and stats["maintenance"]["failures"] == 0
    jobs.close()


def test_a_log_past_its_size_limit_is_saved_and_trimmed(
    worker_factory: Any, index_name: str, job_settings: Settings, storage_root: Path
) -> None:
    """Once the unsaved log passes save_log_bytes the worker snapshots and the log is trimmed."""
    env = {
        "FAISSQ_MAINTENANCE__INTERVAL_S": "0.05",
        # four entries' vectors and ids: only the last upsert's entry (with the headers) crosses it,
        # so no save can start before it and leave a later entry unsaved below the limit
        "FAISSQ_MAINTENANCE__SAVE_LOG_BYTES": str(4 * 50 * (8 + 4 * DIM)),
        "FAISSQ_MAINTENANCE__SAVE_LOG_AGE_S": "0",
        "FAISSQ_STORAGE__RETENTION": "1",
    }
    worker_factory([index_name], env=env).start()
    jobs = JobClient(job_settings)
    jobs.build(index_name, vecs(200), np.arange(200), family="flat").get(timeout=TIMEOUT)
    last = 0
    for i in range(4):
        ids = np.arange(1000 + 50 * i, 1050 + 50 * i)
        last = jobs.upsert(index_name, ids, vecs(50, seed=i)).get(timeout=TIMEOUT)["seq"]
    stats = wait_for(jobs, index_name, lambda s: s["maintenance"]["saves"] >= 1
                     and not log_entries(storage_root, index_name))  # fmt: skip
    assert stats["engine"]["ntotal"] == 400
    assert stats["maintenance"]["log_unsaved_entries"] == 0
    snap = stats["snapshot_version"]
    assert snap is not None
    assert UpdateLog(Storage.from_url(str(storage_root)), index_name).truncation().upto >= last


def test_a_log_past_its_age_limit_is_saved(
    worker_factory: Any, index_name: str, job_settings: Settings, storage_root: Path
) -> None:
    """With no size limit, an unsaved entry older than save_log_age_s makes the worker save."""
    env = {
        "FAISSQ_MAINTENANCE__INTERVAL_S": "0.05",
        "FAISSQ_MAINTENANCE__SAVE_LOG_BYTES": "0",
        "FAISSQ_MAINTENANCE__SAVE_LOG_AGE_S": "0.5",
        "FAISSQ_STORAGE__RETENTION": "1",
    }
    worker_factory([index_name], env=env).start()
    jobs = JobClient(job_settings)
    jobs.build(index_name, vecs(200), np.arange(200), family="flat").get(timeout=TIMEOUT)
    jobs.upsert(index_name, np.arange(1000, 1010), vecs(10, seed=3)).get(timeout=TIMEOUT)
    stats = wait_for(jobs, index_name, lambda s: s["maintenance"]["saves"] >= 1)
    assert stats["engine"]["ntotal"] == 210
    assert not log_entries(storage_root, index_name)


def test_maintenance_off_leaves_the_delta_alone(
    worker_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """maintenance.enabled=false: a delta past merge_delta_max stays until someone merges."""
    env = {
        "FAISSQ_INDEX__MERGE_DELTA_MAX": "10",
        "FAISSQ_MAINTENANCE__ENABLED": "false",
        "FAISSQ_MAINTENANCE__INTERVAL_S": "0.05",
    }
    worker_factory([index_name], env=env).start()
    jobs = JobClient(job_settings)
    jobs.build(index_name, vecs(100), np.arange(100), family="flat").get(timeout=TIMEOUT)
    jobs.upsert(index_name, np.arange(500, 530), vecs(30, seed=4)).get(timeout=TIMEOUT)
    # the explicit merge below queues behind anything maintenance would have sent before it
    jobs.merge(index_name).get(timeout=TIMEOUT)
    stats = jobs.stats(index_name).get(timeout=TIMEOUT)
    assert stats["maintenance"] == {**stats["maintenance"], "merges": 0, "enqueued": 0}
    assert stats["engine"]["delta"] == 0


def test_upsert_churn_in_a_worker_keeps_dead_delta_rows_bounded(
    worker_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """Replacing the same ids again and again: the delta holds them once, plus at most a
    quarter of its rows dead (replaced rows are marked, then compacted), never every copy."""
    env = {"FAISSQ_MAINTENANCE__ENABLED": "false", "FAISSQ_INDEX__MERGE_DELTA_MAX": "100000"}
    worker_factory([index_name], env=env).start()
    jobs = JobClient(job_settings)
    jobs.build(index_name, vecs(300), np.arange(300), family="flat").get(timeout=TIMEOUT)
    ids = np.arange(1000, 1400)
    results = [jobs.upsert(index_name, ids, vecs(400, seed=s)) for s in range(25)]
    results.append(jobs.delete(index_name, ids[:100]))
    for r in results:
        r.get(timeout=TIMEOUT)
    eng = jobs.stats(index_name).get(timeout=TIMEOUT)["engine"]
    assert eng["delta"] == 300 and eng["ntotal"] == 600
    rows = eng["delta"] + eng["delta_dead"]
    assert eng["delta_dead"] <= 0.25 * rows
    assert eng["delta_bytes"] == rows * (8 + 4 * DIM)
    with SearchClient(job_settings, index=index_name) as search:
        got = search.search(vecs(400, seed=24)[100:105], k=1)
    np.testing.assert_array_equal(np.asarray(got.ids)[:, 0], ids[100:105])
