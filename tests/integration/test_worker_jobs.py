"""Jobs enqueued by task name against a real `faissq worker`, real Redis and real FAISS."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery import Celery, states
from celery.result import AsyncResult

from faissq.config import Settings
from faissq.storage.durable import DurableStore
from faissq.tasks.producer import JobClient, put_vectors

DIM = 16
TIMEOUT = 30
READY = states.READY_STATES


def plain_app(redis_url: str) -> Celery:
    """A Celery app as an upstream service without faissq would configure it."""
    app = Celery("upstream", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="msgpack", result_serializer="msgpack", accept_content=["msgpack", "json"]
    )
    return app


def frame(x: np.ndarray) -> dict[str, Any]:
    """An inline frame written by hand, as a non-Python client would."""
    return {"dtype": x.dtype.str, "shape": list(x.shape), "data": x.tobytes()}


def vecs(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    """Random float32 vectors."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def failure(result: AsyncResult) -> str:
    """Wait for a job that must fail and return its error class name."""
    with pytest.raises(Exception) as info:
        result.get(timeout=TIMEOUT)
    assert result.state == "FAILURE"
    return type(info.value).__name__


def test_jobs_by_name_from_a_plain_celery_client(
    worker_factory: Any, redis_url: str, storage_root: Path, index_name: str, job_settings: Settings
) -> None:
    """A service that never imports faissq builds, upserts (inline and by ref), deletes, saves."""
    worker = worker_factory([index_name]).start()
    app = plain_app(redis_url)
    queue = f"faissq.{index_name}"

    def send(name: str, **kwargs: Any) -> Any:
        r = app.send_task(name, kwargs={"index": index_name, **kwargs}, queue=queue)
        return r.get(timeout=TIMEOUT)

    base = vecs(500)
    built = send("faissq.build", vectors=frame(base), ids=list(range(500)))
    assert built["ntotal"] == 500 and built["family"] == "flat"

    extra = vecs(20, seed=1)
    up = send("faissq.upsert", ids=list(range(1000, 1020)), vectors=frame(extra), batch_id="b-1")
    assert up == {**up, "duplicate": False, "applied": 20, "ntotal": 520}
    again = send("faissq.upsert", ids=list(range(1000, 1020)), vectors=frame(extra), batch_id="b-1")
    assert again["duplicate"] is True and again["seq"] == up["seq"] and again["ntotal"] == 520

    ref = put_vectors(job_settings, vecs(30, seed=2))
    by_ref = send("faissq.upsert", ids=list(range(2000, 2030)), vectors_ref=ref)
    assert by_ref["applied"] == 30 and by_ref["ntotal"] == 550

    gone = send("faissq.delete", ids=list(range(0, 50)))
    assert gone["ntotal"] == 500

    saved = send("faissq.save")
    assert saved["snapshot"]["persisted"] is True
    stats = send("faissq.stats")
    assert stats["state"] == "ready" and stats["ntotal"] == 500 and stats["seq"] == gone["seq"]

    # the snapshot on shared storage holds the same index: search it in process
    worker.stop()
    rec = DurableStore(job_settings).recover(index_name)
    assert rec.engine is not None and rec.engine.ntotal == 500
    found = rec.engine.search(extra[:3], 1)
    assert found.ids[:, 0].tolist() == [1000, 1001, 1002]
    assert not rec.engine.contains(np.arange(50)).any()
    app.close()


def test_bad_payloads_fail_with_named_errors_and_the_worker_keeps_serving(
    worker_factory: Any, redis_url: str, storage_root: Path, index_name: str, job_settings: Settings
) -> None:
    """Every invalid payload is a named permanent error; nothing is applied; no retry storm."""
    worker = worker_factory([index_name], env={"FAISSQ_WORKER__INLINE_MAX_BYTES": "4096"}).start()
    client = JobClient(job_settings)
    client.build(index_name, vecs(100), by_reference=True).get(timeout=TIMEOUT)

    good = vecs(2, seed=3)
    nan = good.copy()
    nan[1, 3] = np.nan
    outside = storage_root.parent / "outside.npy"
    np.save(outside, good)
    ref = put_vectors(job_settings, good)
    ids = [7000, 7001]
    up, bld = "faissq.upsert", "faissq.build"
    f64 = good.astype(np.float64)
    short = {**frame(good), "shape": [3, DIM]}
    cases: list[tuple[str, dict[str, Any], str]] = [
        (up, {"ids": ids}, "InvalidVectors"),
        (up, {"vectors": frame(good)}, "InvalidIds"),
        (up, {"ids": ids, "vectors": frame(good), "colour": 1}, "InvalidParameter"),
        (up, {"ids": "7000", "vectors": frame(good)}, "InvalidIds"),
        (up, {"ids": ids, "vectors": [[1.0] * DIM] * 2}, "InvalidVectors"),
        (up, {"ids": ids, "vectors": frame(vecs(2, dim=DIM + 1))}, "DimensionMismatch"),
        (up, {"ids": ids, "vectors": frame(nan)}, "InvalidVectors"),
        (up, {"ids": ids, "vectors": frame(f64)}, "InvalidVectors"),
        (up, {"ids": ids, "vectors": short}, "InvalidVectors"),
        (up, {"ids": [1, 1], "vectors": frame(good)}, "InvalidIds"),
        (up, {"ids": list(range(100)), "vectors": frame(vecs(100))}, "PayloadTooLarge"),
        (up, {"ids": ids, "vectors_ref": {**ref, "path": str(outside)}}, "InvalidParameter"),
        (up, {"ids": ids, "vectors_ref": {**ref, "path": "../outside.npy"}}, "InvalidParameter"),
        (up, {"ids": ids, "vectors_ref": {**ref, "sha256": "0" * 64}}, "ChecksumMismatch"),
        (up, {"ids": ids, "vectors_ref": {**ref, "shape": [3, DIM]}}, "InvalidVectors"),
        (up, {"ids": ids, "vectors_ref": {**ref, "path": "incoming/x.npy"}}, "InvalidParameter"),
        (bld, {"vectors": frame(vecs(0))}, "EmptyBuild"),
        (bld, {"vectors": frame(vecs(10)), "family": "NoSuchFamily"}, "UnknownFamily"),
        ("faissq.autotune", {"target_recall": 2.0}, "InvalidParameter"),
        ("faissq.autotune", {"profile": {"chosen": {}, "table": []}}, "InvalidParameter"),
        (
            "faissq.autotune",
            {"profile": {"chosen": {"recall": 1.0, "nprobe": 0}, "table": [{"recall": 1.0}]}},
            "InvalidParameter",
        ),
        ("faissq.sweep", {"k": 0}, "InvalidParameter"),
        ("faissq.sweep", {"num_queries": "1000"}, "InvalidParameter"),
        ("faissq.sweep", {"queries": frame(vecs(2, dim=DIM + 1))}, "DimensionMismatch"),
    ]
    queue = f"faissq.{index_name}"
    results = [
        (name, client.app.send_task(name, kwargs={"index": index_name, **kw}, queue=queue), want)
        for name, kw, want in cases
    ]
    unknown = client.app.send_task(
        "faissq.upsert",
        kwargs={"index": "no-such-index", "ids": ids, "vectors": frame(good)},
        queue=queue,
    )
    results.append(("faissq.upsert", unknown, "UnknownIndex"))
    for name, result, want in results:
        assert failure(result) == want, (name, result.result)
        assert result.traceback is None or "Retry" not in result.traceback

    assert worker.alive()
    stats = client.stats(index_name).get(timeout=TIMEOUT)
    # seq 1 is the build: nothing after it was applied or even logged
    assert stats["ntotal"] == 100 and stats["seq"] == 1
    client.close()


def test_time_limit_stops_a_build_cleanly_and_progress_is_reported(
    worker_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """A build past its cooperative limit fails by name; the old index keeps serving."""
    worker = worker_factory([index_name], env={"FAISSQ_WORKER__PROGRESS_INTERVAL_S": "0"}).start()
    client = JobClient(job_settings)
    client.build(index_name, vecs(300)).get(timeout=TIMEOUT)
    slow = client.build(index_name, vecs(60_000, seed=5), family="ivf_flat", time_limit_s=0.05)
    assert failure(slow) == "JobTimeLimitExceeded"

    big = client.build(index_name, vecs(60_000, seed=5), family="ivf_flat")
    states = set()
    while not big.ready():
        states.add(big.state)
        time.sleep(0.005)
    assert big.get()["ntotal"] == 60_000
    assert "PROGRESS" in states or "STARTED" in states
    stats = client.stats(index_name).get(timeout=TIMEOUT)
    assert stats["ntotal"] == 60_000 and stats["engine"]["family"] == "ivf_flat"
    assert worker.alive()
    client.close()


def test_storage_unavailable_is_retried_with_backoff_until_it_clears(
    worker_factory: Any, storage_root: Path, index_name: str, job_settings: Settings
) -> None:
    """A write that storage refuses is retried (state RETRY), then applied once it clears."""
    worker = worker_factory([index_name]).start()
    client = JobClient(job_settings)
    log_dir = storage_root / index_name / "log"  # made at start, with the writer lock
    aside = storage_root / f"{index_name}-log-aside"
    log_dir.rename(aside)
    log_dir.write_bytes(b"")  # a file where the log folder must be
    job = client.upsert(index_name, [1, 2], vecs(2), by_reference=False)
    deadline = time.monotonic() + TIMEOUT
    while True:  # state and info from one read: the retry may start between two reads
        meta = job.backend.get_task_meta(job.id, cache=False)
        if meta["status"] == "RETRY":
            break
        assert time.monotonic() < deadline and meta["status"] not in READY, meta["status"]
        time.sleep(0.01)
    assert type(meta["result"]).__name__ == "StorageUnavailable"
    log_dir.unlink()
    aside.rename(log_dir)
    out = job.get(timeout=TIMEOUT)
    assert out["applied"] == 2 and out["seq"] == 1
    assert worker.alive()
    client.close()


def test_maintenance_jobs_merge_rebuild_autotune_save_reload(
    worker_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """Merge empties the delta, rebuild re-tiers, autotune's profile survives a kill -9."""
    worker = worker_factory([index_name]).start()
    client = JobClient(job_settings)
    client.build(index_name, vecs(6000), family="ivf_flat").get(timeout=TIMEOUT)
    client.upsert(index_name, np.arange(10_000, 10_500), vecs(500, seed=1)).get(timeout=TIMEOUT)
    client.delete(index_name, np.arange(100)).get(timeout=TIMEOUT)
    before = client.stats(index_name).get(timeout=TIMEOUT)["engine"]
    assert before["delta"] == 500 and before["tombstones"] == 100

    merged = client.merge(index_name).get(timeout=TIMEOUT)
    assert merged["ntotal"] == 6400
    after = client.stats(index_name).get(timeout=TIMEOUT)["engine"]
    assert after["delta"] == 0 and after["tombstones"] == 0 and after["family"] == "ivf_flat"

    rebuilt = client.rebuild(index_name, family="flat").get(timeout=TIMEOUT)
    assert rebuilt["ntotal"] == 6400
    assert client.stats(index_name).get(timeout=TIMEOUT)["engine"]["family"] == "flat"

    tuned = client.autotune(index_name, target_recall=0.9).get(timeout=TIMEOUT)
    assert tuned["snapshot"]["persisted"] is True

    worker.kill()  # the result is stored just before the ack: autotune may run once more
    worker.start()
    stats = client.stats(index_name).get(timeout=TIMEOUT)
    assert stats["ntotal"] == 6400 and stats["snapshot_version"] >= tuned["snapshot"]["version"]
    assert stats["engine"]["tuning"] is not None and stats["engine"]["family"] == "flat"
    reloaded = client.reload(index_name).get(timeout=TIMEOUT)
    assert reloaded["ntotal"] == 6400 and reloaded["seq"] == stats["seq"]
    client.close()
