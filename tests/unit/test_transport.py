"""The in-flight list: what a killed worker had fetched goes back to its queue exactly once."""

from __future__ import annotations

import json
import uuid

import redis

from faissq import keys
from faissq.worker.transport import restore_inflight


def message(tag: str) -> bytes:
    """A kombu message envelope as it sits in a Redis list."""
    return json.dumps({"body": "", "properties": {"delivery_tag": tag}}).encode()


def test_restore_requeues_only_jobs_not_recorded_as_unacked(redis_client: redis.Redis) -> None:
    """Fetched-but-unrecorded jobs are requeued; recorded ones are left to the unacked restore."""
    queue = f"faissq.q{uuid.uuid4().hex[:8]}"
    unacked = f"unacked-{uuid.uuid4().hex[:8]}"
    lost, recorded = message("tag-lost"), message("tag-recorded")
    redis_client.rpush(keys.inflight_list(queue), lost, recorded, b"not json")
    redis_client.hset(unacked, "tag-recorded", "[...]")
    assert restore_inflight(redis_client, queue, unacked_key=unacked) == 2
    assert redis_client.lrange(queue, 0, -1) == [lost, b"not json"]
    assert redis_client.llen(keys.inflight_list(queue)) == 0
    assert restore_inflight(redis_client, queue, unacked_key=unacked) == 0
