"""A sharded index on a real worker: group jobs, fan-out search, the same top-k as one index."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from rpc_support import all_stopped, wait_for

from faissq import shards
from faissq.config import Settings
from faissq.errors import ShardUnavailable
from faissq.rpc.aio_shard_client import AsyncShardedSearchClient
from faissq.rpc.search_client import SearchClient
from faissq.rpc.shard_client import ShardedSearchClient
from faissq.storage.durable import DurableStore
from faissq.tasks.producer import JobClient
from faissq.tasks.sharded_jobs import ShardedResult

DIM = 32
N = 20_000
TIMEOUT = 120


def vecs(n: int, seed: int) -> np.ndarray:
    """Random float32 vectors."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


async def async_search(settings: Settings, name: str, queries: np.ndarray) -> np.ndarray:
    """The same search from asyncio: concurrent tasks, each merged over the shards."""
    async with AsyncShardedSearchClient(settings, name) as client:
        rows = await asyncio.gather(*(client.search(q, 10) for q in queries))
    return np.vstack([r.ids for r in rows])


def test_four_shards_answer_like_one_exact_index_and_take_batches_per_shard(
    worker_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """20k vectors: 4 Flat shards give one Flat index's top-10; a batch is one group."""
    one = f"{index_name}-one"
    names = shards.shard_names(index_name, 4)
    worker_factory([one, *names], env={"FAISSQ_INDEX__ATTRIBUTES": '{"tenant": "int64"}'}).start()
    jobs = JobClient(job_settings)
    jobs.declare_sharded(index_name, 4)
    base, ids = vecs(N, 0), np.arange(N, dtype=np.int64) * 3 + 7
    built = jobs.build(index_name, base, ids, family="flat")
    assert isinstance(built, ShardedResult) and built.names == names
    report = built.get(timeout=TIMEOUT)
    assert built.state == "SUCCESS" and built.successful()
    assert report["ntotal"] == N and set(report["seqs"]) == set(names)
    assert jobs.build(one, base, ids, family="flat").get(timeout=TIMEOUT)["ntotal"] == N

    queries = vecs(64, 1)
    with ShardedSearchClient(job_settings, index_name) as sharded, \
            SearchClient(job_settings, one) as single:  # fmt: skip
        got = sharded.search(queries, 10)
        want = single.search(queries, 10)
        assert np.array_equal(got.ids, want.ids)
        assert np.allclose(got.scores, want.scores, atol=1e-5)
        assert got.versions == report["seqs"] and not got.partial
        paged = sharded.search(queries, 5, offset=5)
        assert np.array_equal(paged.ids, want.ids[:, 5:])
        assert np.array_equal(asyncio.run(async_search(job_settings, index_name, queries)),
                              want.ids)  # fmt: skip

        # one batch, one group: a job per shard it touches, each with a derived batch_id
        new_ids = np.arange(10**9, 10**9 + 200, dtype=np.int64)
        new = vecs(200, 2)
        up = jobs.upsert(index_name, new_ids, new, batch_id="ingest-1",
                         attributes={"tenant": new_ids % 5})  # fmt: skip
        assert isinstance(up, ShardedResult)
        done = up.get(timeout=TIMEOUT)
        assert done["applied"] == 200 and done["duplicate"] is False
        for name in names:  # each shard logged the attribute values of its own ids
            (entry,) = DurableStore(job_settings).log(name).read(after_seq=report["seqs"][name])
            np.testing.assert_array_equal(entry.attributes["tenant"], entry.ids % 5)
        again = jobs.upsert(index_name, new_ids, new, batch_id="ingest-1").get(timeout=TIMEOUT)
        assert again["duplicate"] is True and again["seqs"] == done["seqs"]
        hit = sharded.search(new[:20], 1, min_seq=done["seqs"])
        assert hit.ids[:, 0].tolist() == new_ids[:20].tolist()
        assert all(hit.versions[n] >= s for n, s in done["seqs"].items())

        gone = jobs.delete(index_name, new_ids[:20]).get(timeout=TIMEOUT)
        assert gone["applied"] == 20
        after = sharded.search(new[:20], 1, min_seq=gone["seqs"])
        assert not np.isin(after.ids, new_ids[:20]).any()
        # a shard that cannot reach a seq in time answers stale: late, so partial when allowed
        late = {names[0]: 10**12}
        with pytest.raises(ShardUnavailable) as info:
            sharded.search(queries[:2], 10, min_seq=late, timeout=0.5)
        assert info.value.missing == {names[0]: "stale"}
        part = sharded.search(queries[:2], 10, min_seq=late, timeout=0.5, partial_ok=True)
        assert part.partial and set(part.versions) == set(names[1:])
        assert not np.isin(part.ids, ids[shards.shard_of(ids, 4) == 0]).any()
        stats = jobs.stats(index_name).get(timeout=TIMEOUT)
        assert stats["ntotal"] == N + 180 and set(stats["shards"]) == set(names)
    jobs.close()


def test_a_missing_shard_is_a_typed_error_or_a_flagged_partial_answer(
    worker_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """Shard 1 of 2 is served by nobody: ShardUnavailable, or partial results when allowed."""
    s0, s1 = shards.shard_names(index_name, 2)
    l2 = {"FAISSQ_INDEX__METRIC": "l2"}  # the shards' own metric: the declaration names it
    first = worker_factory([s0], env=l2).start()
    jobs = JobClient(job_settings)
    jobs.declare_sharded(index_name, 2, metric="l2")
    rows = shards.split_rows(np.arange(400), 2)[0]
    jobs.build(s0, vecs(400, 3)[rows], rows, family="flat").get(timeout=TIMEOUT)
    with ShardedSearchClient(job_settings, index_name) as client:
        with pytest.raises(ShardUnavailable) as info:
            client.search(vecs(2, 4), 3)
        assert info.value.missing == {s1: "no_worker"}
        part = client.search(vecs(2, 4), 3, partial_ok=True)
        assert part.partial and part.missing == {s1: "no_worker"} and list(part.versions) == [s0]
        x, q = vecs(400, 3), vecs(2, 4)
        dist = ((q[:, None, :] - x[None, rows, :]) ** 2).sum(-1)
        assert np.array_equal(part.ids, rows[np.argsort(dist, axis=1)[:, :3]])
        assert (np.diff(part.scores, axis=1) >= 0).all()  # l2: nearest first

        # `faissq status` of the sharded name shows both shards and which one is not ready,
        # once the shard's heartbeat tells its build (beats come every third of their TTL)
        with SearchClient(job_settings, s0) as one:
            deadline = time.monotonic() + 10  # a beat is due within a third of the 5 s TTL
            while not one.workers()[0]["engine"].get("ready"):
                assert time.monotonic() < deadline, "the shard's heartbeat never said ready"
                time.sleep(0.05)
        done = subprocess.run([sys.executable, "-m", "faissq", "status", "--index", index_name,
                               "--json"], env=first.env(), capture_output=True, text=True,
                              timeout=TIMEOUT)  # fmt: skip
        assert done.returncode == 1, done.stderr
        status = json.loads(done.stdout)
        assert [e["index"] for e in status["indexes"]] == [s0, s1]
        want = {"name": index_name, "shards": 2, "metric": "l2", "ready": [s0],
                "not_ready": [s1], "ntotal": None}  # fmt: skip
        assert status["sharded"] == [want]

        # shard 1 served by a worker that stops answering (SIGSTOP): its alive key still
        # stands, so its request waits in the list and the reply is late (nil BRPOP)
        other = worker_factory([s1], env=l2).start()
        rows1 = shards.split_rows(np.arange(400), 2)[1]
        jobs.build(s1, vecs(400, 3)[rows1], rows1, family="flat").get(timeout=TIMEOUT)
        assert client.search(vecs(2, 4), 3).versions.keys() == {s0, s1}
        assert other.proc is not None
        other.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: all_stopped(other.proc.pid), 5, "every thread of the shard's worker")
        try:
            with pytest.raises(ShardUnavailable) as info:
                client.search(vecs(2, 4), 3, timeout=0.3)
            assert info.value.missing == {s1: "timeout"}
            part = client.search(vecs(2, 4), 3, timeout=0.3, partial_ok=True)
            assert part.missing == {s1: "timeout"} and np.isin(part.ids, rows).all()
        finally:
            other.proc.send_signal(signal.SIGCONT)
        assert client.search(vecs(2, 4), 3, timeout=5).versions.keys() == {s0, s1}
    jobs.close()
