"""Where an index's search keys live: one Redis, or the Redis Cluster node owning their slot.

Every key of an index carries the hash tag ``{<index>}`` (keys.py), so one index's request list,
replies, alive key and heartbeats share a slot; its loop and its clients talk to that node
directly, with the same one-write round trips as on a single Redis.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.cluster import RedisCluster

from faissq import keys
from faissq.config import Settings
from faissq.errors import InvalidParameter, RpcError

_clusters: dict[str, RedisCluster] = {}
_lock = threading.Lock()


def base_url(settings: Settings) -> str:
    """The search path's Redis URL: rpc.url, else redis.url."""
    url = settings.rpc.url or settings.redis.url
    if not url:
        raise InvalidParameter("neither rpc.url nor redis.url is set: searches need a Redis")
    return url


def search_url(settings: Settings, index: str) -> str:
    """The URL of the Redis holding this index's search keys (the owning node in a cluster)."""
    url = base_url(settings)
    if not settings.rpc.cluster:
        return url
    try:
        client = cluster_of(url, settings)
        node = client.get_node_from_key(keys.rpc_queue(index))  # type: ignore[no-untyped-call]
    except redis.RedisError as exc:
        raise RpcError(f"Redis Cluster at {masked(url)} has no node for {index!r}: {exc}") from exc
    return node_url(url, str(node.host), int(node.port))


def record_client(settings: Settings) -> Any:
    """A client for the shard definition records (a cluster client follows its slots)."""
    url = base_url(settings)
    if settings.rpc.cluster:
        return cluster_of(url, settings)
    return redis.Redis.from_url(url, socket_timeout=settings.redis.socket_timeout_s)


def cluster_of(url: str, settings: Settings) -> RedisCluster:
    """One cluster client per seed URL and process; it learns and refreshes the slot map."""
    with _lock:
        client = _clusters.get(url)
        if client is None:
            client = RedisCluster.from_url(url, socket_timeout=settings.redis.socket_timeout_s)
            _clusters[url] = client
        return client


def forget(settings: Settings) -> None:
    """Drop the cached cluster client, so the next lookup reads the slot map afresh."""
    with _lock:
        client = _clusters.pop(base_url(settings), None)
    if client is not None:
        client.close()


def node_url(url: str, host: str, port: int) -> str:
    """The seed URL with another host and port (scheme, credentials and query kept; db 0)."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, "/0", parts.query, ""))


def masked(url: str) -> str:
    """The URL with its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
