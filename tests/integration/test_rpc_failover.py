"""The RPC path when workers die, stall or lose Redis: replicas, timeouts, busy, reconnects."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from conftest import WorkerProcess, make_settings
from rpc_support import TIMEOUT, all_stopped, rpc_stats, vecs, wait_for
from test_replica import replica_factory  # noqa: F401 - a fixture

from faissq import IndexBusy, NoWorkerAlive, SearchClient, SearchTimeout, Settings
from faissq.errors import FaissqError
from faissq.tasks.producer import JobClient
from faissq.worker.embedded_redis import EmbeddedRedis, free_port

FAST_BEAT = {"FAISSQ_RPC__HEARTBEAT_TTL_S": "1"}


def build(settings: Settings, index: str, n: int = 2000) -> None:
    """Build a small flat index through a job (it is snapshotted, so a replica can load it)."""
    jobs = JobClient(settings)
    jobs.build(index, vecs(n), family="flat").get(timeout=TIMEOUT)
    jobs.close()


def test_replicas_share_the_queue_and_one_survives_the_other(
    worker_factory: Any,
    replica_factory: Any,  # noqa: F811 - the fixture imported above
    index_name: str,
    job_settings: Settings,
) -> None:
    first = worker_factory([index_name], env=FAST_BEAT).start()
    build(job_settings, index_name)
    second = replica_factory([index_name]).start()  # loads the snapshot (a second writer
    # of the index would refuse to start)
    client = SearchClient(job_settings, index_name)
    wait_for(lambda: len(client.workers()) == 2, 5, "two heartbeats")
    q = vecs(1, seed=4)
    want = client.search(q, 5).ids
    answered_by: set[str] = set()
    for _ in range(60):
        got = client.search(q, 5)
        np.testing.assert_array_equal(got.ids, want)
        answered_by.add(got.worker)
    assert len(answered_by) == 2, "both replicas compete for the request list"

    first.kill()
    for _ in range(50):
        got = client.search(q, 5, timeout=2)
        np.testing.assert_array_equal(got.ids, want)
        answered_by.add(got.worker)
    survivors = {got.worker}
    assert len(answered_by - survivors) == 1 and second.alive()
    client.close()


def test_stalled_worker_times_out_then_is_busy_then_not_alive(
    worker_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """SIGSTOP: searches time out (never hang), the bounded list answers busy, the heartbeat
    lapses into NoWorkerAlive; SIGCONT: the stale requests are answered expired, service resumes."""
    env = {**FAST_BEAT, "FAISSQ_RPC__HEARTBEAT_TTL_S": "2", "FAISSQ_RPC__QUEUE_MAX": "3"}
    worker = worker_factory([index_name], env=env).start()
    build(job_settings, index_name)
    client = SearchClient(job_settings, index_name)
    q = vecs(1, seed=5)
    assert client.search(q, 3).ids.shape == (1, 3)
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGSTOP)
    wait_for(lambda: all_stopped(worker.proc.pid), 5, "every thread of the worker stopped")
    try:
        # a stopped worker blocked in BLMPOP may still take one request into its socket buffer,
        # so the list fills after 3 or 4 searches; each of them times out, never hangs
        timeouts = 0
        while True:
            t0 = time.perf_counter()
            try:
                client.search(q, 3, timeout=0.2)
            except SearchTimeout:
                timeouts += 1
                assert time.perf_counter() - t0 < 1.0 and timeouts <= 4
                continue
            except IndexBusy:
                assert time.perf_counter() - t0 < 0.5, "busy is immediate"
                break
            pytest.fail("a stopped worker answered")
        assert timeouts >= 3
        time.sleep(2.1)  # the heartbeat lapses
        with pytest.raises(NoWorkerAlive):
            client.search(q, 3, timeout=2)
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    got = wait_for(lambda: _try(client, q), 10, "service after SIGCONT")
    assert got.ids.shape == (1, 3)
    r = redis.Redis.from_url(job_settings.redis.url or "")
    wait_for(lambda: sum(s["expired"] for s in rpc_stats(r, index_name)) >= timeouts, 5,
             "the stale requests counted as expired")  # fmt: skip
    r.close()
    client.close()


def _try(client: SearchClient, q: np.ndarray) -> Any:
    """A search, or None while it fails with a faissq error."""
    try:
        return client.search(q, 3, timeout=0.5)
    except FaissqError:
        return None


def test_loop_reconnects_after_a_redis_restart(
    index_name: str, storage_root: Path, tmp_path: Path
) -> None:
    port = free_port()
    server = EmbeddedRedis(tmp_path / "redis", unix_socket=False, port=port, persistent=False)
    url = server.start()
    worker = WorkerProcess(url, storage_root, [index_name], tmp_path, FAST_BEAT)
    try:
        settings = make_settings(url, storage_root, [index_name])
        worker.start()
        build(settings, index_name)
        client = SearchClient(settings, index_name)
        q = vecs(1, seed=6)
        want = client.search(q, 3).ids
        server.stop()
        with pytest.raises(FaissqError):
            client.search(q, 3, timeout=0.5)
        server = EmbeddedRedis(tmp_path / "redis2", unix_socket=False, port=port, persistent=False)
        server.start()  # an empty Redis: the loop must beat again for clients to see it
        got = wait_for(lambda: _try(client, q), 15, "searches after the Redis restart")
        np.testing.assert_array_equal(got.ids, want)
        assert worker.alive()
        r = redis.Redis.from_url(url)
        wait_for(lambda: sum(s["reconnects"] for s in rpc_stats(r, index_name)) >= 1, 5,
                 "the reconnect counted")  # fmt: skip
        r.close()
        client.close()
    finally:
        worker.stop(timeout_s=5)
        worker.app.close()
        server.stop()
