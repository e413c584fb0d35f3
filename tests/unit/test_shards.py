"""Shard names, the id-to-shard hash (the documented worked example) and Redis Cluster slots."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from redis.crc import key_slot

from faissq import keys, shards
from faissq.errors import IndexExists, InvalidAttributes, InvalidIds, InvalidParameter
from faissq.storage.durable import check_index_name
from faissq.tasks.sharded_jobs import split_batch

MASK = (1 << 64) - 1


def reference_splitmix64(x: int) -> int:
    """Vigna's splitmix64 in plain integers, as a producer in another language writes it."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_the_worked_example_of_docs_tasks() -> None:
    """The table in docs/tasks.md: ids 0, 1, 2, 3, 42, 123456789 over 4 shards."""
    ids = np.array([0, 1, 2, 3, 42, 123456789], dtype=np.int64)
    assert int(shards.splitmix64(ids)[0]) == 0xE220A8397B1DCDAF
    assert shards.shard_of(ids, 4).tolist() == [3, 1, 2, 1, 1, 1]


def test_the_vectorised_hash_is_splitmix64_for_large_ids() -> None:
    """numpy's wrapping uint64 arithmetic equals the integer reference up to 2^63 - 1."""
    ids = np.array([0, 7, 2**31, 2**40 + 5, 2**63 - 1], dtype=np.int64)
    got = [int(v) for v in shards.splitmix64(ids)]
    assert got == [reference_splitmix64(int(i)) for i in ids]


def test_shards_are_balanced_even_for_strided_ids() -> None:
    """ids that are all multiples of S (id % S would send them to one shard) spread evenly."""
    counts = np.bincount(shards.shard_of(np.arange(0, 40000, 4), 4), minlength=4)
    assert counts.min() > 2300 and counts.max() < 2700


def test_split_rows_covers_the_batch_once_in_batch_order() -> None:
    """Each row goes to exactly one shard, keeping the batch's order within a shard."""
    ids = np.array([5, 9, 1, 42, 77, 3, 8], dtype=np.int64)
    parts = shards.split_rows(ids, 3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(7))
    for s, rows in enumerate(parts):
        assert rows.tolist() == sorted(rows.tolist())
        assert (shards.shard_of(ids[rows], 3) == s).all()


def test_a_sharded_batch_cuts_its_attribute_columns_by_the_same_rows() -> None:
    """Each shard's job gets the attribute values of exactly its own ids."""
    shard_map = shards.ShardMap("docs", 3, "cosine")
    ids = np.array([5, 9, 1, 42, 77, 3, 8], dtype=np.int64)
    cols = {"tenant": [int(i) * 10 for i in ids], "lang": [None, "en"] * 3 + ["de"]}
    parts = split_batch(shard_map, ids, None, "b", attributes=cols)
    assert sum(len(p[1]) for p in parts) == 7
    for _, part_ids, _, part_cols, _ in parts:
        assert part_cols is not None
        assert part_cols["tenant"] == [int(i) * 10 for i in part_ids]
        assert part_cols["lang"] == [cols["lang"][ids.tolist().index(i)] for i in part_ids]
    with pytest.raises(InvalidAttributes):
        split_batch(shard_map, ids, None, "b", attributes={"tenant": [1, 2]})


def test_bad_ids_and_counts_are_refused() -> None:
    """Negative ids, float ids and shard counts out of range are typed errors."""
    with pytest.raises(InvalidIds):
        shards.shard_of(np.array([1, -2]), 4)
    with pytest.raises(InvalidIds):
        shards.shard_of(np.array([1.0]), 4)
    for bad in (0, shards.MAX_SHARDS + 1, True, 2.0):
        with pytest.raises(InvalidParameter):
            shards.check_shards(bad)  # type: ignore[arg-type]


def test_shard_names_pass_the_index_name_rule_and_parse_back() -> None:
    """<name>.s<s>of<S> is a valid index (folder, queue) name; too long a name is refused."""
    names = shards.shard_names("docs-v2", 4)
    assert names == ["docs-v2.s0of4", "docs-v2.s1of4", "docs-v2.s2of4", "docs-v2.s3of4"]
    for s, n in enumerate(names):
        assert check_index_name(n) == n
        assert shards.parse_shard(n) == ("docs-v2", s, 4)
    assert shards.parse_shard("docs") is None and shards.parse_shard("x.s4of4") is None
    with pytest.raises(InvalidParameter):
        shards.shard_names("a" * 125, 4)
    with pytest.raises(InvalidParameter):
        shards.shard_names("-bad", 2)


def test_shard_batch_ids_are_derived_deterministically() -> None:
    """A re-sent batch gives each shard job the same batch_id, and different shards differ."""
    assert shards.shard_batch_id("ingest-7", 2, 4) == "ingest-7.s2of4"
    assert len({shards.shard_batch_id("b", s, 4) for s in range(4)}) == 4


def test_the_keys_of_one_index_share_one_cluster_slot() -> None:
    """Request list, replies, alive, heartbeats, dead letters, maintenance: one hash tag."""
    for index in shards.shard_names("products", 4):
        names = [
            keys.rpc_queue(index),
            keys.alive_key(index),
            keys.reply_key(index, "abc123"),
            keys.heartbeat_key(index, "host:1:x"),
            keys.dead_letter_list(index),
            keys.maintain_pending(index),
        ]
        assert len({key_slot(n.encode()) for n in names}) == 1, names
    slots = {key_slot(keys.rpc_queue(n).encode()) for n in shards.shard_names("products", 4)}
    assert len(slots) == 4  # so shards spread over a cluster's nodes


def test_a_declaration_is_fixed_once_made(redis_client: redis.Redis, index_name: str) -> None:
    """Declaring again with the same count is fine; another count is IndexExists (real Redis)."""
    m = shards.ShardMap(index_name, 4, "l2")
    assert shards.declare(redis_client, m) == m and shards.declare(redis_client, m) == m
    assert shards.lookup(redis_client, index_name) == m
    assert shards.lookup(redis_client, index_name + "x") is None
    with pytest.raises(IndexExists):
        shards.declare(redis_client, shards.ShardMap(index_name, 8, "l2"))
    redis_client.delete(keys.shard_map(index_name))
