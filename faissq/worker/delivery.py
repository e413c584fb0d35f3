"""Delivery counting: a job that keeps crashing the worker is dead-lettered instead of looping.

acks_late + reject_on_worker_lost redeliver a job whose worker died; a counter per task id that
only a finished run clears tells a redelivery apart from a first delivery. The counter's
commands wait for Redis through a restart (`WAIT_FOR_REDIS`), as the job's result does: a job
that did its work must not fail because Redis was away when it ended.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from faissq import keys

COUNTER_TTL_S = 7 * 24 * 3600  # a job not seen again for a week is forgotten
# waits between reconnects: at most 1 s (as Celery's result store), jittered so that the workers
# of one Redis do not all come back to it in the same instant
REDIS_BACKOFF = ExponentialWithJitterBackoff(cap=1.0, base=0.01)
# the counter commands retry connection errors until Redis answers
WAIT_FOR_REDIS = Retry(REDIS_BACKOFF, retries=-1)


def count_delivery(client: redis.Redis, task_id: str) -> int:
    """Count one more delivery of a task and return the total so far."""

    def count() -> int:
        pipe = client.pipeline()
        pipe.incr(keys.delivery_key(task_id))
        pipe.expire(keys.delivery_key(task_id), COUNTER_TTL_S)
        n, _ = pipe.execute()
        return int(n)

    return int(WAIT_FOR_REDIS.call_with_retry(count, _ignore))


def forget_delivery(client: redis.Redis, task_id: str) -> None:
    """Clear the counter once a run finished (success, failure or retry scheduled)."""
    WAIT_FOR_REDIS.call_with_retry(lambda: client.delete(keys.delivery_key(task_id)), _ignore)


def _ignore(error: Exception) -> None:
    """Nothing to undo between two tries of a counter command."""


def dead_letter(
    client: redis.Redis, index: str, *, task_id: str, name: str, deliveries: int, kwargs: Any
) -> dict[str, Any]:
    """Record a dead-lettered job on its index's dead list (without vector payloads)."""
    record = {
        "task_id": task_id,
        "task": name,
        "index": index,
        "deliveries": deliveries,
        "kwargs": summarize_kwargs(kwargs),
        "at": time.time(),
    }
    client.rpush(keys.dead_letter_list(index), json.dumps(record))
    return record


def summarize_kwargs(kwargs: Any) -> dict[str, Any]:
    """Keep scalars and references; replace inline payloads by their size."""
    if not isinstance(kwargs, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if isinstance(v, str | int | float | bool) or v is None:
            out[str(k)] = v
        elif isinstance(v, dict) and "path" in v:
            out[str(k)] = {
                f: v.get(f) for f in ("path", "shape", "sha256") if isinstance(v.get(f), str | list)
            }
        elif isinstance(v, dict) and "shape" in v:
            out[str(k)] = {"shape": v.get("shape") if isinstance(v.get("shape"), list) else None}
        elif isinstance(v, list):
            out[str(k)] = f"<list of {len(v)}>"
        else:
            out[str(k)] = f"<{type(v).__name__}>"
    return out
