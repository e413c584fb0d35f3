"""A search-only replica (`faissq worker --replica`) beside the writer, both real processes."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from conftest import WorkerProcess
from rpc_support import TIMEOUT, vecs, wait_for

from faissq import SearchClient, Settings, StaleRead
from faissq.errors import FaissqError
from faissq.rpc.search_client import SearchResponse
from faissq.storage.log import entry_name
from faissq.tasks.producer import JobClient

FAST = {"FAISSQ_RPC__HEARTBEAT_TTL_S": "1", "FAISSQ_WORKER__REPLICA_POLL_S": "0.2"}
VISIBLE_S = 5.0  # a job's effect must reach the replica's answers within this


class ReplicaProcess(WorkerProcess):
    """`faissq worker --replica`: ready when its search loop beats with role=replica."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As WorkerProcess, with FAISSQ_WORKER__REPLICA=true."""
        super().__init__(*args, **kwargs)
        self.extra_env = {**self.extra_env, "FAISSQ_WORKER__REPLICA": "true"}
        self.worker_id = ""

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait for this process's heartbeat (a replica answers no Celery ping)."""
        client = SearchClient(make_client_settings(self), self.indexes[0])
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if not self.alive():
                    pytest.fail(f"replica exited during start-up:\n{self.log_tail()}")
                assert self.proc is not None
                for hb in client.workers():
                    if hb.get("pid") == self.proc.pid and hb["engine"]["ready"]:
                        assert hb["role"] == "replica"
                        self.worker_id = hb["worker"]
                        return
                time.sleep(0.05)
        finally:
            client.close()
        pytest.fail(f"replica not ready after {timeout_s}s:\n{self.log_tail()}")


def make_client_settings(w: WorkerProcess) -> Settings:
    """Client settings for the worker's Redis and storage."""
    return Settings(redis={"url": w.redis_url}, storage={"url": str(w.storage_root)})


@pytest.fixture
def replica_factory(redis_url: str, storage_root: Path, tmp_path: Path) -> Iterator[Any]:
    """make(indexes) -> ReplicaProcess (not started); all are stopped at the end."""
    made: list[ReplicaProcess] = []

    def make(indexes: list[str]) -> ReplicaProcess:
        r = ReplicaProcess(redis_url, storage_root, indexes, tmp_path, FAST)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop(timeout_s=5)
        r.app.close()


def top1(reply: SearchResponse) -> list[int]:
    """The first id of each query's answer."""
    return [int(i) for i in reply.ids[:, 0]]


def answered_by(
    client: SearchClient, worker: str, q: np.ndarray, k: int, ok: Callable[[SearchResponse], bool]
) -> tuple[SearchResponse, float]:
    """Search until `worker` answers and `ok(reply)` holds; the reply and seconds it took."""
    t0 = time.monotonic()

    def attempt() -> SearchResponse | None:
        try:
            got = client.search(q, k, timeout=0.5)
        except FaissqError:
            return None  # e.g. a request taken by a stopped writer
        return got if got.worker == worker and ok(got) else None

    got = wait_for(attempt, VISIBLE_S, f"an answer from {worker} that passes the check")
    return got, time.monotonic() - t0


def beat_of(
    client: SearchClient, worker: str, ok: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Wait for a heartbeat of `worker` for which `ok(beat)` holds, and return it."""

    def find() -> dict[str, Any] | None:
        return next((h for h in client.workers() if h["worker"] == worker and ok(h)), None)

    beat: dict[str, Any] = wait_for(find, VISIBLE_S, f"a heartbeat of {worker} passing the check")
    return beat


def test_replica_serves_follows_the_writer_and_outlives_it(
    worker_factory: Any, replica_factory: Any, index_name: str, job_settings: Settings
) -> None:
    jobs = JobClient(job_settings)
    writer = worker_factory([index_name], env=FAST).start()
    base = vecs(2000)
    jobs.build(index_name, base, family="flat").get(timeout=TIMEOUT)
    replica = replica_factory([index_name]).start()
    client = SearchClient(job_settings, index_name)
    wait_for(lambda: len(client.workers()) == 2, 5, "two heartbeats")
    roles = sorted(hb["role"] for hb in client.workers())
    assert roles == ["replica", "writer"]
    rid = replica.worker_id
    lags: list[float] = []

    # upserts through a job reach the replica's answers
    new = vecs(5, seed=9)
    up = jobs.upsert(index_name, np.arange(90_000, 90_005), new).get(timeout=TIMEOUT)
    got, lag = answered_by(client, rid, new, 1, lambda r: top1(r) == list(range(90_000, 90_005)))
    lags.append(lag)

    # so do deletes
    jobs.delete(index_name, np.arange(90_000, 90_003)).get(timeout=TIMEOUT)
    gone = np.arange(90_000, 90_003)
    got, lag = answered_by(client, rid, new, 1, lambda r: not np.isin(r.ids, gone).any())
    lags.append(lag)
    assert got.ids[3:, 0].tolist() == [90_003, 90_004]

    # a job sent while the writer is stopped waits for it: the replica takes no job
    assert writer.proc is not None
    writer.proc.send_signal(signal.SIGSTOP)
    try:
        pending = jobs.stats(index_name)
        q = base[:3]
        got, _ = answered_by(client, rid, q, 1, lambda r: top1(r) == [0, 1, 2])
        time.sleep(0.5)
        assert pending.state == "PENDING"
    finally:
        writer.proc.send_signal(signal.SIGCONT)
    stats = pending.get(timeout=TIMEOUT)
    assert stats["role"] == "writer" and stats["seq"] == up["seq"] + 1

    # a build replaces the index: the replica reloads the new snapshot
    fresh = vecs(1000, seed=11)
    built = jobs.build(index_name, fresh, np.arange(50_000, 51_000), family="flat").get(
        timeout=TIMEOUT
    )
    want = list(range(50_000, 50_004))
    got, lag = answered_by(client, rid, fresh[:4], 1, lambda r: top1(r) == want)
    lags.append(lag)
    hb = beat_of(client, rid, lambda h: h["reloads"] >= 1)
    assert hb["seq"] == built["seq"] and hb["behind"] == 0 and hb["lag_seconds"] < VISIBLE_S

    # killing the writer leaves the replica serving
    writer.kill()
    for _ in range(20):
        got = client.search(fresh[:4], 1, timeout=2)
        assert got.worker == rid and top1(got) == want
    assert replica.alive()
    logs = replica.all_logs()
    assert "Task faissq" not in logs and "requeued" not in logs and "writer_conflict" not in logs
    print(f"replica lag after job success (upsert, delete, build): {lags}")
    client.close()
    jobs.close()


def test_replica_start_leaves_the_writer_sole_owner_of_its_jobs(
    worker_factory: Any, replica_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """A replica started mid-stream never re-queues or fails the writer's jobs."""
    jobs = JobClient(job_settings)
    writer = worker_factory([index_name], env=FAST).start()
    results = [jobs.upsert(index_name, [i], vecs(1, seed=i)) for i in range(20)]
    replica = replica_factory([index_name]).start()
    results += [jobs.upsert(index_name, [100 + i], vecs(1, seed=100 + i)) for i in range(20)]
    seqs = sorted(r.get(timeout=TIMEOUT)["seq"] for r in results)
    assert seqs == list(range(1, 41)), "every job ran once, on the writer"
    client = SearchClient(job_settings, index_name)
    hb = beat_of(client, replica.worker_id, lambda h: h["seq"] == 40)
    assert hb["engine"]["ntotal"] == 40
    r = redis.Redis.from_url(job_settings.redis.url or "")
    assert r.llen(f"faissq.{index_name}") == 0
    r.close()
    assert writer.alive()
    client.close()
    jobs.close()


def test_a_replica_stops_before_a_damaged_newest_entry_and_follows_past_its_quarantine(
    worker_factory: Any, replica_factory: Any, storage_root: Path, index_name: str,
    job_settings: Settings
) -> None:  # fmt: skip
    """The replica never moves the entry; once the writer quarantines it, the gap is skipped."""
    jobs = JobClient(job_settings)
    writer = worker_factory([index_name], env=FAST).start()
    jobs.build(index_name, vecs(300), family="flat").get(timeout=TIMEOUT)
    jobs.upsert(index_name, np.arange(1000, 1010), vecs(10, seed=1)).get(timeout=TIMEOUT)
    jobs.upsert(index_name, np.arange(2000, 2010), vecs(10, seed=2)).get(timeout=TIMEOUT)
    writer.stop()
    entry = storage_root / index_name / "log" / entry_name(3)  # seq 1 is the build
    data = bytearray(entry.read_bytes())
    data[-40] ^= 0x01
    entry.write_bytes(bytes(data))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    replica = replica_factory([index_name])
    metrics = {"ENABLED": "true", "HOST": "127.0.0.1", "PORT": str(port)}
    replica.extra_env.update({f"FAISSQ_METRICS__{k}": v for k, v in metrics.items()})
    replica.start()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
        seen = json.loads(resp.read())["indexes"][index_name]
    assert seen["state"] == "degraded" and seen["seq"] == 2
    assert seen["reason"].startswith("newest log entry 3 is damaged")
    assert entry.exists()  # a replica only reads

    writer.start()  # the writer moves the entry aside and takes new batches after it
    assert (entry.parent / "quarantine" / entry_name(3)).exists() and not entry.exists()
    new = vecs(3, seed=7)
    up = jobs.upsert(index_name, np.arange(3000, 3003), new).get(timeout=TIMEOUT)
    assert up["seq"] == 4
    client = SearchClient(job_settings, index_name)
    answered_by(client, replica.worker_id, new, 1, lambda r: top1(r) == [3000, 3001, 3002])
    client.close()
    jobs.close()


def test_a_replica_answers_min_seq_once_it_has_applied_it(
    worker_factory: Any, replica_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """Read your writes on a replica: a search with the job's seq sees the job's vectors."""
    jobs = JobClient(job_settings)
    writer = worker_factory([index_name], env=FAST).start()
    jobs.build(index_name, vecs(500), family="flat").get(timeout=TIMEOUT)
    replica = replica_factory([index_name]).start()
    client = SearchClient(job_settings, index_name)
    new = vecs(3, seed=21)
    up = jobs.upsert(index_name, np.arange(70_000, 70_003), new).get(timeout=TIMEOUT)
    writer.kill()  # from here only the replica pops, likely before its next log poll
    got = client.search(new, 1, min_seq=up["seq"], timeout=VISIBLE_S)
    assert got.worker == replica.worker_id and got.version is not None
    assert got.version >= up["seq"] and top1(got) == [70_000, 70_001, 70_002]
    fetched = client.fetch([70_001, 1], min_seq=up["seq"])
    assert fetched.ids.tolist() == [70_001, 1] and fetched.worker == replica.worker_id
    with pytest.raises(StaleRead):
        client.search(new, 1, min_seq=up["seq"] + 1, timeout=0.5)
    client.close()
    jobs.close()
