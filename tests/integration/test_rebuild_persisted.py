"""A rebuild on a real `faissq worker` is snapshotted once swapped in: a restart keeps it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from faissq.config import Settings
from faissq.tasks.producer import JobClient

DIM = 16
TIMEOUT = 60


def vecs(n: int, seed: int = 0) -> np.ndarray:
    """Random float32 vectors."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def test_a_rebuild_into_another_family_survives_a_restart_before_any_save(
    worker_factory: Any, storage_root: Path, index_name: str, job_settings: Settings
) -> None:
    worker = worker_factory([index_name]).start()
    jobs = JobClient(job_settings)
    built = jobs.build(index_name, vecs(3000), family="ivf_flat").get(timeout=TIMEOUT)
    jobs.upsert(index_name, np.arange(5000, 5100), vecs(100, seed=1)).get(timeout=TIMEOUT)

    rebuilt = jobs.rebuild(index_name, family="flat").get(timeout=TIMEOUT)
    snap = rebuilt["snapshot"]
    assert snap["persisted"] is True and snap["version"] > built["snapshot"]["version"]
    assert (snap["seq"], rebuilt["version"]) == (2, 2)  # no new content: the same seq
    before = jobs.stats(index_name).get(timeout=TIMEOUT)
    assert before["engine"]["family"] == "flat" and before["snapshot_version"] == snap["version"]
    worker.stop()  # a clean stop: the rebuild job is acknowledged, never run again
    current = json.loads((storage_root / index_name / "CURRENT").read_text())
    assert current["version"] == snap["version"]

    worker.start()
    after = jobs.stats(index_name).get(timeout=TIMEOUT)
    assert after["engine"]["family"] == "flat" and after["state"] == "ready"
    assert (after["seq"], after["ntotal"], after["snapshot_version"]) == (2, 3100, snap["version"])
    jobs.close()
