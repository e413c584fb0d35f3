"""kill -9 of one shard's writer during a stream of sharded upserts: nothing lost or doubled."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import redis

from faissq import keys, shards
from faissq.config import Settings
from faissq.rpc.search_client import SearchClient
from faissq.storage.durable import DurableStore
from faissq.tasks.producer import JobClient
from faissq.tasks.sharded_jobs import ShardedResult

DIM = 16
S = 4
BATCH = 200
ROUND = 6  # group upserts per round
KILLS = 3
TIMEOUT = 60


def acked(result: ShardedResult, shard: str) -> bool:
    """Whether the batch's job on `shard` has finished (its result is stored)."""
    pairs = zip(result.names, result.group.results, strict=True)
    return any(n == shard and r.ready() for n, r in pairs)


def shard_task_ids(results: list[ShardedResult], shard: str) -> list[str]:
    """The Celery task ids of the jobs these batches sent to `shard`."""
    pairs = [p for g in results for p in zip(g.names, g.group.results, strict=True)]
    return [str(r.id) for n, r in pairs if n == shard]


def wait_then_kill(
    worker: Any, client: redis.Redis, results: list[ShardedResult], shard: str, nth: int,
    while_running: bool,
) -> bool:  # fmt: skip
    """SIGKILL the shard's worker once `nth` of these batches' jobs on it are acknowledged;
    while_running: then also wait until its next job is executing (its delivery counter is
    set at start and cleared at the end), so the kill leaves that job unacked; False when
    every job finished first (no kill)."""
    deadline = time.monotonic() + TIMEOUT
    while sum(acked(r, shard) for r in results) < nth:
        assert time.monotonic() < deadline, f"{nth} jobs on {shard} were never acknowledged"
        time.sleep(0.002)
    if while_running:
        counters = [keys.delivery_key(t) for t in shard_task_ids(results, shard)]
        while not client.exists(*counters):
            if all(acked(r, shard) for r in results):
                return False
            assert time.monotonic() < deadline, f"no further job of {shard} started"
    worker.kill()
    return True


def test_kill9_of_one_shards_writer_loses_no_acknowledged_batch(
    worker_factory: Any, index_name: str, job_settings: Settings, redis_client: redis.Redis
) -> None:
    """4 shards on two workers (shard 0 alone, shards 1-3 on the other); rounds of group
    upserts, killing shard 0's writer after its n-th acknowledgement; after each restart every
    acknowledged batch is there, and at the end each shard holds every batch exactly once."""
    names = shards.shard_names(index_name, S)
    victim = worker_factory(names[:1]).start()
    worker_factory(names[1:]).start()
    jobs = JobClient(job_settings)
    jobs.declare_sharded(index_name, S)
    rng = np.random.default_rng(5)
    sent: list[tuple[ShardedResult, np.ndarray, np.ndarray]] = []
    kills = running_kills = 0
    while kills < KILLS:
        assert len(sent) < 10 * ROUND * KILLS, "could not catch a shard job running"
        round_results = []
        for _ in range(ROUND):
            # ids spread over a wide range so every batch touches every shard
            ids = np.arange(len(sent), len(sent) + BATCH * 1000, 1000, dtype=np.int64) * 7919
            vectors = rng.standard_normal((BATCH, DIM)).astype(np.float32)
            result = jobs.upsert(index_name, ids, vectors, batch_id=f"b{len(sent)}")
            assert isinstance(result, ShardedResult)
            sent.append((result, ids, vectors))
            round_results.append(result)
        nth = 1 + kills  # the 1st, 2nd, 3rd acknowledgement of the round on shard 0
        running = kills % 2 == 1  # and on odd kills, while its next job runs
        if not wait_then_kill(victim, redis_client, round_results, names[0], nth, running):
            continue
        kills += 1
        running_kills += running
        before = [r for r, _, _ in sent if acked(r, names[0])]
        victim.start()
        stats = jobs.stats(names[0]).get(timeout=TIMEOUT)
        assert stats["seq"] >= len(before), "an acknowledged batch was lost by the kill"

    # every group completes after the restarts; each shard job applied its rows or had
    done = [r.get(timeout=TIMEOUT) for r, _, _ in sent]
    expected = {n: 0 for n in names}
    batches = {n: 0 for n in names}
    for (result, ids, _), summary in zip(sent, done, strict=True):
        per_shard = np.bincount(shards.shard_of(ids, S), minlength=S)
        assert sorted(result.names) == names  # every batch touched every shard
        for s, name in enumerate(names):
            r = summary["shards"][name]
            assert r["applied"] == per_shard[s] or r["duplicate"], (name, r)
            expected[name] += int(per_shard[s])
            batches[name] += 1
    for name in names:
        stats = jobs.stats(name).get(timeout=TIMEOUT)
        assert (stats["seq"], stats["ntotal"]) == (batches[name], expected[name]), name

    # every id sent is found on its shard, with the vector it was sent with
    every_id = np.concatenate([ids for _, ids, _ in sent])
    every_vec = np.vstack([v for _, _, v in sent])
    owner = shards.shard_of(every_id, S)
    for s, name in enumerate(names):
        mine = np.flatnonzero(owner == s)
        with SearchClient(job_settings, name) as client:
            for start in range(0, mine.size, 1000):
                rows = mine[start : start + 1000]
                got = client.fetch(every_id[rows])
                assert got.missing.size == 0, f"{name} lost {got.missing[:5]}"
                want = every_vec[rows] / np.linalg.norm(every_vec[rows], axis=1, keepdims=True)
                order = np.argsort(every_id[rows])
                assert np.array_equal(np.sort(got.ids), every_id[rows][order])
                by_id = dict(zip(got.ids.tolist(), got.vectors, strict=True))
                assert np.allclose(np.vstack([by_id[i] for i in every_id[rows]]), want,
                                   atol=1e-5)  # fmt: skip
    requeued = victim.all_logs().count("left unacked by a dead worker were requeued")
    assert requeued >= running_kills >= 1, "no kill caught a shard job running"

    # the killed shard's durable log holds each of its batches exactly once
    victim.stop()
    log = list(DurableStore(job_settings).log(names[0]).read())
    assert sorted(e.batch_id for e in log) == sorted(
        shards.shard_batch_id(f"b{i}", 0, S) for i in range(len(sent))
    )
    jobs.close()
