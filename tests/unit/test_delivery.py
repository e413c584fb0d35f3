"""Delivery counters and the dead-letter list, on a real Redis."""

from __future__ import annotations

import json
import uuid

import redis

from faissq import keys
from faissq.worker import delivery


def test_counter_counts_and_is_forgotten(redis_client: redis.Redis) -> None:
    """Each delivery increments; a finished run clears the counter; the key expires anyway."""
    tid = uuid.uuid4().hex
    assert [delivery.count_delivery(redis_client, tid) for _ in range(3)] == [1, 2, 3]
    assert 0 < redis_client.ttl(keys.delivery_key(tid)) <= delivery.COUNTER_TTL_S
    delivery.forget_delivery(redis_client, tid)
    assert redis_client.get(keys.delivery_key(tid)) is None


def test_dead_letter_record_has_no_payload(redis_client: redis.Redis) -> None:
    """The record keeps ids of the job and references, and drops inline bytes."""
    index = f"dl{uuid.uuid4().hex[:6]}"
    kwargs = {
        "index": index,
        "vectors": {"dtype": "<f4", "shape": [2, 3], "data": b"\0" * 24},
        "vectors_ref": {"path": "incoming/a.npy", "shape": [2, 3], "sha256": "0" * 64},
        "ids": [1, 2],
    }
    delivery.dead_letter(redis_client, index, task_id="t1", name="faissq.upsert",
                         deliveries=3, kwargs=kwargs)  # fmt: skip
    (raw,) = redis_client.lrange(keys.dead_letter_list(index), 0, -1)
    record = json.loads(raw)
    assert record["task_id"] == "t1" and record["deliveries"] == 3
    assert record["kwargs"]["vectors"] == {"shape": [2, 3]}
    assert record["kwargs"]["vectors_ref"]["path"] == "incoming/a.npy"
    assert record["kwargs"]["ids"] == "<list of 2>"
