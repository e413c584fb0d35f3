"""A sharded index whose shards' search keys sit on different nodes of a real Redis Cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import redis
from conftest import make_settings
from redis.cluster import RedisCluster
from redis.crc import key_slot

from faissq import keys, shards
from faissq.config import Settings
from faissq.rpc.aio_shard_client import AsyncShardedSearchClient
from faissq.rpc.nodes import search_url
from faissq.rpc.search_client import SearchClient
from faissq.rpc.shard_client import ShardedSearchClient
from faissq.tasks.producer import JobClient

DIM = 16
TIMEOUT = 60
SLOT_ENDS = (5460, 10922, 16383)  # redis-cli --cluster create's split over three masters


def node_of(index: str) -> int:
    """Which of the three masters holds an index's search keys."""
    slot = key_slot(keys.rpc_queue(index).encode())
    return next(i for i, end in enumerate(SLOT_ENDS) if slot <= end)


def spread_name(base: str, count: int) -> str:
    """A name whose shards' keys lie on all three masters (chosen by slot, deterministically)."""
    for j in range(1000):
        name = f"{base}{j}"
        if len({node_of(n) for n in shards.shard_names(name, count)}) == 3:
            return name
    raise AssertionError("no name spreads over the three masters")


async def async_ids(settings: Settings, name: str, q: np.ndarray) -> np.ndarray:
    """The asyncio client's answer: one connection per shard, on its node."""
    async with AsyncShardedSearchClient(settings, name) as client:
        return (await client.search(q, 10)).ids


def test_searches_fan_out_over_cluster_nodes(
    worker_factory: Any, redis_url: str, redis_cluster: list[str], storage_root: Path,
    index_name: str,
) -> None:  # fmt: skip
    """Celery on a plain Redis, searches on a 3-master cluster: 4 shards = one Flat index."""
    name = spread_name(index_name, 4)
    one = f"{name}-one"
    names = shards.shard_names(name, 4)
    env = {"FAISSQ_RPC__URL": redis_cluster[0], "FAISSQ_RPC__CLUSTER": "true"}
    worker_factory([one, *names], env=env).start()
    settings: Settings = make_settings(redis_url, storage_root, [one, *names])
    settings = settings.model_copy(update={"rpc": settings.rpc.model_copy(
        update={"url": redis_cluster[0], "cluster": True})})  # fmt: skip
    assert len({search_url(settings, n) for n in names}) == 3  # one connection per node
    broker, cluster = redis.Redis.from_url(redis_url), RedisCluster.from_url(redis_cluster[0])
    assert all(cluster.exists(keys.alive_key(n)) for n in names)  # the loops beat on the cluster
    assert not any(broker.exists(keys.alive_key(n)) for n in names)
    cluster.close()
    broker.close()

    jobs = JobClient(settings)
    jobs.declare_sharded(name, 4)
    x = np.random.default_rng(0).standard_normal((3000, DIM)).astype(np.float32)
    assert jobs.build(name, x, family="flat").get(timeout=TIMEOUT)["ntotal"] == 3000
    jobs.build(one, x, family="flat").get(timeout=TIMEOUT)
    q = np.random.default_rng(1).standard_normal((8, DIM)).astype(np.float32)
    with ShardedSearchClient(settings, name) as sharded, SearchClient(settings, one) as single:
        got, want = sharded.search(q, 10), single.search(q, 10)
        assert np.array_equal(got.ids, want.ids)
        assert sorted(got.versions) == sorted(names) and not got.partial
        assert np.array_equal(asyncio.run(async_ids(settings, name, q)), want.ids)
        up = jobs.upsert(name, [10**6], x[:1] * -1, batch_id="c1").get(timeout=TIMEOUT)
        hit = sharded.search(x[:1] * -1, 1, min_seq=up["seqs"])
        assert hit.ids[0, 0] == 10**6
    jobs.close()
