"""Storage faults met by a real `faissq worker`: a lost CURRENT pointer, a damaged newest log entry.

Each fault leaves the index serving everything it still has, `degraded` with the reason in its
stats, its log and its metrics, until an operator repairs it.
"""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from faissq.config import Settings
from faissq.errors import SnapshotCorrupt
from faissq.rpc.search_client import SearchClient
from faissq.storage import admin
from faissq.storage.log import entry_name
from faissq.tasks.producer import JobClient

DIM = 16
TIMEOUT = 30


def vecs(n: int, seed: int = 0) -> np.ndarray:
    """Random float32 vectors."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def state_gauges(port: int, index: str) -> dict[str, float]:
    """faissq_index_state of `index` by state label, scraped from the worker."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        s.labels["state"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "faissq_index_state" and s.labels.get("index") == index
    }


def metrics_env(port: int) -> dict[str, str]:
    return {"FAISSQ_METRICS__ENABLED": "true", "FAISSQ_METRICS__PORT": str(port),
            "FAISSQ_METRICS__HOST": "127.0.0.1"}  # fmt: skip


def nearest(settings: Settings, index: str, query: np.ndarray) -> int:
    """The id of the nearest neighbour the worker answers (its search path, not a job)."""
    with SearchClient(settings, index=index) as client:
        return int(client.search(query[None, :], 1).ids[0, 0])


def test_a_lost_current_serves_every_vector_degraded_until_repaired(
    worker_factory: Any, storage_root: Path, index_name: str, job_settings: Settings
) -> None:
    port = free_port()
    worker = worker_factory([index_name], env=metrics_env(port)).start()
    jobs = JobClient(job_settings)
    base = vecs(500)
    jobs.build(index_name, base, np.arange(500)).get(timeout=TIMEOUT)
    for k in range(3):  # three more versions: retention (3) trims the log behind the oldest
        ids = np.arange(1000 + 100 * k, 1020 + 100 * k)
        jobs.upsert(index_name, ids, vecs(20, seed=k + 1)).get(timeout=TIMEOUT)
        jobs.save(index_name).get(timeout=TIMEOUT)
    tail = vecs(20, seed=9)
    jobs.upsert(index_name, np.arange(5000, 5020), tail).get(timeout=TIMEOUT)
    assert jobs.stats(index_name).get(timeout=TIMEOUT)["ntotal"] == 580
    worker.stop()
    (storage_root / index_name / "CURRENT").unlink()

    worker.start()
    stats = jobs.stats(index_name).get(timeout=TIMEOUT)
    assert stats["state"] == "degraded" and stats["ntotal"] == 580
    want = "CURRENT missing: loaded the newest verified version v00000004 (seq 4)"
    assert stats["reason"] == want
    assert nearest(job_settings, index_name, base[7]) == 7  # built vectors answer
    assert nearest(job_settings, index_name, tail[3]) == 5003  # and the log's tail
    assert state_gauges(port, index_name)["degraded"] == 1
    assert want in worker.all_logs()

    saved = jobs.save(index_name).get(timeout=TIMEOUT)["snapshot"]
    assert saved["version"] == "v00000005" and saved["seq"] == 5
    assert (storage_root / index_name / "CURRENT").exists()
    reloaded = jobs.reload(index_name).get(timeout=TIMEOUT)
    assert reloaded["ntotal"] == 580
    stats = jobs.stats(index_name).get(timeout=TIMEOUT)
    assert (stats["state"], stats["reason"]) == ("ready", "")
    assert state_gauges(port, index_name) == {
        s: float(s == "ready") for s in ("loading", "empty", "ready", "rebuilding", "degraded",
                                         "failed")
    }  # fmt: skip
    jobs.close()


def test_a_damaged_newest_log_entry_is_quarantined_and_the_rest_served(
    worker_factory: Any, storage_root: Path, index_name: str, job_settings: Settings
) -> None:
    port = free_port()
    worker = worker_factory([index_name], env=metrics_env(port)).start()
    jobs = JobClient(job_settings)
    jobs.build(index_name, vecs(300), np.arange(300)).get(timeout=TIMEOUT)
    first, lost = vecs(20, seed=1), vecs(20, seed=2)
    jobs.upsert(index_name, np.arange(1000, 1020), first, batch_id="a").get(timeout=TIMEOUT)
    assert (
        jobs.upsert(index_name, np.arange(2000, 2020), lost, batch_id="b").get(timeout=TIMEOUT)[
            "seq"
        ]
        == 3
    )  # fmt: skip (seq 1 is the build)
    worker.stop()
    log_dir = storage_root / index_name / "log"
    data = bytearray((log_dir / entry_name(3)).read_bytes())
    data[len(data) // 2] ^= 0x40  # a flipped bit in the newest entry
    (log_dir / entry_name(3)).write_bytes(bytes(data))

    worker.start()
    stats = jobs.stats(index_name).get(timeout=TIMEOUT)
    assert stats["state"] == "degraded" and (stats["seq"], stats["ntotal"]) == (2, 320)
    assert stats["reason"].startswith("newest log entry 3 is damaged")
    assert "served up to seq 2; moved to log/quarantine/" in stats["reason"]
    assert state_gauges(port, index_name)["degraded"] == 1
    assert not (log_dir / entry_name(3)).exists()
    assert (log_dir / "quarantine" / entry_name(3)).read_bytes() == bytes(data)
    assert "quarantined to" in worker.all_logs()
    assert nearest(job_settings, index_name, first[4]) == 1004

    # the batch is sent again under its id: applied under a new seq, never the quarantined one
    again = jobs.upsert(index_name, np.arange(2000, 2020), lost, batch_id="b").get(timeout=TIMEOUT)
    assert (again["seq"], again["duplicate"], again["ntotal"]) == (4, False, 340)
    assert nearest(job_settings, index_name, lost[5]) == 2005
    report = admin.log_verify(job_settings, index_name)
    assert [q["seq"] for q in report["quarantined"]] == [3] and report["problems"] == 1

    admin.log_resolve(job_settings, index_name, 3, "b re-sent as seq 4")
    jobs.reload(index_name).get(timeout=TIMEOUT)
    stats = jobs.stats(index_name).get(timeout=TIMEOUT)
    assert (stats["state"], stats["seq"], stats["ntotal"]) == ("ready", 4, 340)
    gauges = state_gauges(port, index_name)
    assert (gauges["ready"], gauges["degraded"]) == (1, 0)
    jobs.close()


def test_mapped_vectors_changed_on_storage_are_never_saved(
    worker_factory: Any, storage_root: Path, index_name: str, job_settings: Settings
) -> None:
    """A byte flipped in the memory-mapped raw vectors: rebuild and save refuse, CURRENT stays."""
    port = free_port()
    worker = worker_factory([index_name], env=metrics_env(port)).start()
    jobs = JobClient(job_settings)
    built = jobs.build(index_name, vecs(300), np.arange(300), family="flat").get(timeout=TIMEOUT)
    version = built["snapshot"]["version"]
    worker.stop()
    worker.start()  # the raw vectors are now memory-mapped from the verified snapshot
    assert jobs.stats(index_name).get(timeout=TIMEOUT)["state"] == "ready"
    raw = storage_root / index_name / "snapshots" / version / "primary_vectors.npy"
    with raw.open("r+b") as f:  # in place, as a bad disk or a stray writer would change it
        f.seek(-7, 2)
        byte = f.read(1)[0]
        f.seek(-7, 2)
        f.write(bytes([byte ^ 0x40]))
    current = (storage_root / index_name / "CURRENT").read_text()

    jobs.upsert(index_name, np.arange(1000, 1010), vecs(10, seed=5)).get(timeout=TIMEOUT)
    with pytest.raises(SnapshotCorrupt, match="changed on storage"):
        jobs.rebuild(index_name).get(timeout=TIMEOUT)
    with pytest.raises(SnapshotCorrupt, match="changed on storage"):
        jobs.save(index_name).get(timeout=TIMEOUT)
    stats = jobs.stats(index_name).get(timeout=TIMEOUT)
    assert stats["state"] == "degraded" and "changed on storage" in stats["reason"]
    assert state_gauges(port, index_name)["degraded"] == 1
    assert (storage_root / index_name / "CURRENT").read_text() == current
    assert nearest(job_settings, index_name, vecs(10, seed=5)[3]) == 1003  # it still serves
    jobs.close()
