"""Every Redis key and Celery queue name faissq uses, in one place."""

from __future__ import annotations

PREFIX = "faissq"  # namespace of every key faissq writes to Redis

# Celery queue of faissq.create_index and faissq.drop_index; dynamic workers consume it
CONTROL_QUEUE = f"{PREFIX}.control"


def index_tag(index: str) -> str:
    """Start of every Redis key of one index: the braces are a Redis Cluster hash tag, so its
    request list, replies, alive key, heartbeats and job keys share one slot (and one node)."""
    return f"{PREFIX}:{{{index}}}"


def index_pattern(index: str) -> str:
    """Glob matching every Redis key of one index (ACL rules; braces are literal in a glob)."""
    return f"{index_tag(index)}:*"


def shard_map(name: str) -> str:
    """String key holding a sharded index's definition (JSON: shards, metric), docs/tasks.md."""
    return f"{PREFIX}:shards:{name}"


def task_queue(index: str) -> str:
    """Celery queue holding the mutation jobs of one index (one writer consumes it)."""
    return f"{PREFIX}.{index}"


def rpc_queue(index: str) -> str:
    """Redis list that search requests are LPUSHed onto; replicas compete for it."""
    return f"{index_tag(index)}:rpc"


def reply_key(index: str, request_id: str) -> str:
    """Redis list a worker LPUSHes one search reply onto (expires after rpc.reply_ttl_s)."""
    return f"{reply_prefix(index)}{request_id}"


def reply_prefix(index: str) -> str:
    """Every reply key of an index starts so; a worker refuses to write anywhere else."""
    return f"{index_tag(index)}:reply:"


def alive_key(index: str) -> str:
    """Key set (with TTL) by every replica serving the index; its value is the queue bound."""
    return f"{index_tag(index)}:alive"


def heartbeat_key(index: str, worker_id: str) -> str:
    """Key with a TTL that says this worker serves the index and is ready."""
    return f"{index_tag(index)}:hb:{worker_id}"


def writer_lease(index: str) -> str:
    """Key naming the index's one writer, with a TTL its writer renews (worker/lease.py)."""
    return f"{index_tag(index)}:writer"


def heartbeat_pattern(index: str) -> str:
    """SCAN pattern matching every live heartbeat of one index."""
    return f"{index_tag(index)}:hb:*"


def delivery_key(task_id: str) -> str:
    """Counter of how many times a task was delivered (dead-letter after N)."""
    return f"{PREFIX}:deliveries:{task_id}"


def inflight_list(queue: str) -> str:
    """Redis list holding jobs a worker fetched and has not yet recorded as unacked."""
    return f"{PREFIX}:inflight:{queue}"


def dead_letter_list(index: str) -> str:
    """Redis list of jobs that crashed the worker too often (JSON records)."""
    return f"{index_tag(index)}:dead"


def maintain_pending(index: str) -> str:
    """Key holding the id of the queued faissq.maintain job of an index (one pending at most)."""
    return f"{index_tag(index)}:maintain"
