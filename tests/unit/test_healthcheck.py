"""The container healthcheck: this host's heartbeat key for every served index, on a real Redis."""

from __future__ import annotations

import redis

from faissq import keys
from faissq.config import Settings
from faissq.healthcheck import check


def settings(url: str, indexes: list[str]) -> Settings:
    """Settings of a worker serving `indexes` on the Redis at `url`."""
    return Settings(redis={"url": url, "socket_timeout_s": 1.0}, worker={"indexes": indexes})


def test_healthy_only_when_this_host_beats_for_every_served_index(
    redis_url: str, redis_client: redis.Redis, index_name: str
) -> None:
    other = f"{index_name}-b"
    cfg = settings(redis_url, [index_name, other])
    none = f"no heartbeat from box-1 for: {index_name}, {other}"
    assert check(cfg, host="box-1") == (False, none)
    redis_client.set(keys.heartbeat_key(index_name, "box-1:42:abc"), "{}", px=5000)
    redis_client.set(keys.heartbeat_key(other, "box-2:7:def"), "{}", px=5000)
    ok, reason = check(cfg, host="box-1")
    assert not ok and reason.endswith(f"for: {other}")  # another host's beat does not count
    redis_client.set(keys.heartbeat_key(other, "box-1:42:abc"), "{}", px=5000)
    assert check(cfg, host="box-1")[0]


def test_unreachable_or_unset_redis_is_unhealthy() -> None:
    ok, reason = check(settings("redis://127.0.0.1:1/0", ["x"]), host="h")
    assert not ok and reason.startswith("redis unreachable")
    assert check(Settings(redis={"url": None}), host="h")[0] is False
