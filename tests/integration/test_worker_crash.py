"""kill -9 of the worker: no upsert is lost or applied twice; poison jobs are dead-lettered."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery.result import AsyncResult

from faissq import keys
from faissq.config import Settings
from faissq.storage import faults
from faissq.storage.durable import DurableStore
from faissq.storage.snapshot_load import MANIFEST
from faissq.tasks.producer import JobClient

DIM = 8
TIMEOUT = 60
KILLS = 20


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    """Poll `predicate` every 5 ms until it is true, or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    pytest.fail(f"timed out waiting for {what}")


def kill_while_running(
    worker: Any, client: redis.Redis, task_ids: list[str], timeout_s: float = TIMEOUT
) -> bool:
    """SIGKILL the worker the moment one of `task_ids` is executing; False if all finished first.

    A job is executing while its delivery counter exists (set at start, cleared at the end).
    """
    counters = [keys.delivery_key(t) for t in task_ids]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.exists(*counters):
            worker.kill()
            return True
        if all(client.get(f"celery-task-meta-{t}") for t in task_ids):
            return False
    pytest.fail("no job of the round started")


def test_kill9_during_a_stream_of_upserts_loses_and_doubles_nothing(
    worker_factory: Any, index_name: str, job_settings: Settings, redis_client: redis.Redis
) -> None:
    """Rounds of: enqueue upserts, SIGKILL, restart; then every job is there exactly once.

    Even rounds kill while a job runs (it is redelivered from the unacked hash); odd rounds kill
    the moment the round's first jobs are acknowledged, often between jobs, while the worker
    fetches the next one (it is requeued from the in-flight list of faissq.worker.transport).
    """
    rng = np.random.default_rng(7)
    pick = random.Random(7)
    worker = worker_factory([index_name]).start()
    client = JobClient(job_settings)
    jobs: list[tuple[AsyncResult, np.ndarray]] = []
    next_id = 0
    kills = running_kills = 0
    while kills < KILLS:
        assert len(jobs) < 300, "could not kill the worker during a job often enough"
        round_jobs = []
        for _ in range(6):
            ids = np.arange(next_id, next_id + 256, dtype=np.int64)
            next_id += 256
            vectors = rng.standard_normal((256, DIM)).astype(np.float32)
            by_ref = pick.random() < 0.5
            round_jobs.append((client.upsert(index_name, ids, vectors, by_reference=by_ref), ids))
        jobs += round_jobs
        skip = pick.randrange(3)  # kill during the 1st, 2nd or 3rd job of the round
        before = [r for r, _ in round_jobs[:skip]]
        wait_for(lambda b=before: all(r.ready() for r in b), TIMEOUT, "the round's first jobs")
        succeeded = [r for r, _ in jobs if r.ready()]
        if kills % 2:
            worker.kill()
        elif kill_while_running(worker, redis_client, [r.id for r, _ in round_jobs[skip:]]):
            running_kills += 1
        else:
            continue
        kills += 1
        worker.start()
        # every job acknowledged before the kill survived it
        stats = client.stats(index_name).get(timeout=TIMEOUT)
        assert stats["seq"] >= len(succeeded)

    results = [r.get(timeout=TIMEOUT) for r, _ in jobs]
    assert all(r["applied"] == 256 or r["duplicate"] for r in results)
    # each kill during a job left it unacked; the next start put it back at the head of the queue
    requeued = worker.all_logs().count("1 job(s) left unacked by a dead worker were requeued")
    assert requeued >= running_kills >= KILLS // 2
    stats = client.stats(index_name).get(timeout=TIMEOUT)
    assert stats["ntotal"] == next_id and stats["seq"] == len(jobs)

    # the durable log holds each job exactly once, with the ids it was sent with
    worker.stop()
    store = DurableStore(job_settings)
    entries = list(store.log(index_name).read())
    by_batch = {e.batch_id: e for e in entries}
    rec = store.recover(index_name)
    assert rec.engine is not None
    lost = int((~rec.engine.contains(np.arange(next_id))).sum())
    print(f"\nkill -9 during upserts: kills {kills}, during a running job {running_kills} "
          f"(requeued {requeued}), jobs {len(jobs)}, vectors {next_id}, lost {lost}, "
          f"duplicated {len(entries) - len(by_batch)} (log entries of one batch_id)")  # fmt: skip
    assert len(entries) == len(jobs) == len(by_batch)
    for result, ids in jobs:
        np.testing.assert_array_equal(np.sort(by_batch[result.id].ids), ids)
    assert rec.engine.ntotal == next_id
    assert rec.engine.contains(np.arange(next_id)).all()
    client.close()


# where a save is held (a hung storage call) and killed: (operation, path fragment)
SAVE_STEPS = [
    ("write", "primary_vectors.npy"),  # inside the snapshot's data files
    ("rename", MANIFEST),  # publishing the version's manifest
    ("rename", "CURRENT"),  # the CURRENT flip
    ("remove", MANIFEST),  # retention deleting an old version
    ("write", "TRUNCATED"),  # the log truncation marker
    ("remove", ".entry"),  # deleting truncated log entries
]


def test_kill9_during_saves_loses_and_doubles_nothing(
    worker_factory: Any,
    index_name: str,
    job_settings: Settings,
    redis_client: redis.Redis,
    storage_root: Path,
    tmp_path: Path,
) -> None:
    """Rounds of: upserts, then a save killed while it runs; every acknowledged vector stays.

    The save is held at one step of SAVE_STEPS through faultfs (a hung storage call) and the
    worker is killed there: inside the snapshot write, the manifest, the CURRENT flip,
    retention and log truncation. The next start recovers from whatever the dead save left and
    the redelivered save completes.
    """
    rng = np.random.default_rng(11)
    control = str(tmp_path / "faults.json")
    env = {
        "FAISSQ_STORAGE__URL": f"faultfs://{storage_root}",
        "FAISSQ_STORAGE__OPTIONS": json.dumps({"control": control}),
    }
    worker = worker_factory([index_name], env=env).start()
    client = JobClient(job_settings)
    upserts: list[AsyncResult] = []
    next_id = kills = rounds = 0
    killed_at: list[tuple[str, str]] = []
    while kills < KILLS:
        rounds += 1
        assert rounds <= 2 * KILLS, f"saves were held at too few steps: {killed_at}"
        step = SAVE_STEPS[kills % len(SAVE_STEPS)]
        faults.set_faults(control, stall=[step[0]], match=step[1])
        held = faults.stalls(control)
        for _ in range(2):
            ids = np.arange(next_id, next_id + 512, dtype=np.int64)
            next_id += 512
            vectors = rng.standard_normal((512, DIM)).astype(np.float32)
            upserts.append(client.upsert(index_name, ids, vectors, by_reference=False))
        save = client.save(index_name)
        saved_or_held = lambda h=held, s=save: faults.stalls(control) > h or s.ready()  # noqa: E731
        wait_for(saved_or_held, TIMEOUT, "the save to be held or done")
        if faults.stalls(control) == held:
            continue  # this save had nothing to do at that step (no old version to delete)
        worker.kill()
        faults.set_faults(control, [])
        kills += 1
        killed_at.append(step)
        acknowledged = sum(1 for r in upserts if r.ready())
        worker.start()
        stats = client.stats(index_name).get(timeout=TIMEOUT)
        assert stats["seq"] >= acknowledged
        save.get(timeout=TIMEOUT)  # redelivered after the kill, then completed

    assert set(killed_at) == set(SAVE_STEPS)
    results = [r.get(timeout=TIMEOUT) for r in upserts]
    assert all(r["applied"] == 512 or r["duplicate"] for r in results)
    stats = client.stats(index_name).get(timeout=TIMEOUT)
    assert stats["ntotal"] == next_id and stats["seq"] == len(upserts)
    worker.stop()
    store = DurableStore(job_settings)
    rec = store.recover(index_name)
    assert rec.engine is not None
    lost = int((~rec.engine.contains(np.arange(next_id))).sum())
    print(f"\nkill -9 during saves: kills {kills}, each during a running save, at "
          f"{len(set(killed_at))} save steps, "
          f"jobs {len(upserts)} upserts + {rounds} saves, vectors {next_id}, lost {lost}, "
          f"duplicated {rec.seq - len(upserts)} (seqs beyond one per upsert)")  # fmt: skip
    assert rec.engine.ntotal == next_id and rec.seq == len(upserts)
    assert rec.engine.contains(np.arange(next_id)).all()
    assert rec.version is not None, "no snapshot was ever completed"
    client.close()


def test_a_job_that_keeps_killing_the_worker_is_dead_lettered(
    worker_factory: Any, index_name: str, job_settings: Settings, redis_client: redis.Redis
) -> None:
    """After dead_letter_after deliveries that never finished, the next one fails by name."""
    worker = worker_factory([index_name], env={"FAISSQ_WORKER__DEAD_LETTER_AFTER": "2"}).start()
    client = JobClient(job_settings)
    # an HNSW build of this size runs for seconds: long enough to be caught running
    vectors = np.random.default_rng(1).standard_normal((60_000, 32)).astype(np.float32)
    poison = client.build(index_name, vectors, family="hnsw", by_reference=True)
    counter = keys.delivery_key(poison.id)
    for delivery in (1, 2):
        wait_for(lambda d=delivery: redis_client.get(counter) == str(d).encode(), TIMEOUT,
                 f"delivery {delivery}")  # fmt: skip
        worker.kill()  # the job "crashes" the worker while it runs
        worker.start()
    with pytest.raises(Exception) as info:
        poison.get(timeout=TIMEOUT)
    assert type(info.value).__name__ == "DeadLettered"
    dead = [json.loads(x) for x in redis_client.lrange(keys.dead_letter_list(index_name), 0, -1)]
    assert [(d["task_id"], d["task"], d["deliveries"]) for d in dead] == [
        (poison.id, "faissq.build", 2)
    ]
    assert dead[0]["kwargs"]["vectors_ref"]["shape"] == [60_000, 32]
    assert redis_client.get(counter) is None
    # the worker is healthy and applies the next job
    assert client.upsert(index_name, [1], vectors[:1]).get(timeout=TIMEOUT)["ntotal"] == 1
    assert worker.alive()
    client.close()
