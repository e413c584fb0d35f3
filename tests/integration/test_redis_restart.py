"""A Redis crash while the writer runs a job: once Redis answers again the job's result arrives.

The Redis here is this test's own persistent redis-server, SIGKILLed and started again on the
same port and data folder, as a supervisor restarts a crashed Redis.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from conftest import WorkerProcess, make_settings
from test_write_integrity import faulty_env, vec, wait_for

from faissq import keys
from faissq.storage import faults
from faissq.tasks.producer import JobClient
from faissq.worker.embedded_redis import EmbeddedRedis

TIMEOUT = 60


@pytest.fixture
def own_redis(tmp_path: Path) -> Any:
    """A persistent redis-server of this test alone (it gets killed)."""
    server = EmbeddedRedis(tmp_path / "redis", unix_socket=False, persistent=True)
    server.start()
    yield server
    server.stop()


def crash(server: EmbeddedRedis) -> None:
    """SIGKILL the server (its append-only file keeps what it acknowledged)."""
    assert server.process is not None
    server.process.kill()
    server.process.wait(10)
    server.process = None


def test_a_job_running_across_a_redis_crash_gets_its_result_within_seconds(
    own_redis: EmbeddedRedis, storage_root: Path, tmp_path: Path, index_name: str
) -> None:
    """Kill -9 Redis while an upsert runs (held by storage faults), restart it: the job
    completes, its result reaches the producer and its unacked record is gone, in seconds."""
    control = tmp_path / "faults.json"
    env = faulty_env(storage_root, control)
    worker = WorkerProcess(own_redis.url, storage_root, [index_name], tmp_path, env).start()
    settings = make_settings(own_redis.url, storage_root, [index_name])
    jobs = JobClient(settings)
    assert jobs.upsert(index_name, [0], vec(0), by_reference=False).get(timeout=TIMEOUT)["seq"] == 1

    faults.set_faults(str(control), ["write"], errno="EIO")
    job = jobs.upsert(index_name, [1], vec(1), by_reference=False)
    client = redis.Redis.from_url(own_redis.url)
    wait_for(lambda: client.exists(keys.delivery_key(job.id)), "the job to start")
    start_hits = faults.hits(str(control))
    wait_for(lambda: faults.hits(str(control)) > start_hits, "a storage failure of the job")
    client.close()

    crash(own_redis)
    faults.set_faults(str(control), [])
    # an outage longer than the clients' own quick retries: the worker's second failed reconnect
    wait_for(lambda: "(2/100)" in worker.log_tail(20000), "two failed reconnects")
    own_redis.start()  # same port and data folder; returns once PING answers
    back = time.monotonic()

    fresh = JobClient(settings)  # a producer that connects after the restart
    try:
        result = AsyncResult(job.id, app=fresh.app).get(timeout=TIMEOUT)
        seconds = time.monotonic() - back
        assert result["seq"] == 2 and not result["duplicate"]
        client = redis.Redis.from_url(own_redis.url)
        wait_for(lambda: not client.hlen("unacked"), "the job's unacked record to go")
        assert client.llen(keys.task_queue(index_name)) == 0
        print(f"redis back -> stranded job's result: {seconds:.2f}s")
        assert seconds < 15
        # the worker still takes jobs on the restarted Redis
        after = fresh.upsert(index_name, [2], vec(2), by_reference=False).get(timeout=TIMEOUT)
        assert after["seq"] == 3
    finally:
        fresh.close()
        jobs.close()
        worker.stop(timeout_s=5)
        worker.app.close()
