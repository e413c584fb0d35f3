"""Helpers of the RPC integration tests: data, waiting, raw requests, a worker's RPC counters."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis

from faissq import keys

DIM = 16
TIMEOUT = 30


def vecs(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    """Random float32 vectors."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def raw_request(index: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    """A request map written by hand (as another language would) and its reply key."""
    rid = uuid.uuid4().hex
    q = np.ones((1, DIM), "<f4")
    msg: dict[str, Any] = {
        "v": 1,
        "id": rid,
        "reply": keys.reply_key(index, rid),
        "deadline": time.time() + 10,
        "k": 3,
        "queries": {"dtype": "<f4", "shape": [1, DIM], "data": q.tobytes()},
    }
    msg.update(fields)
    return keys.reply_key(index, rid), msg


def push_and_wait(r: redis.Redis, index: str, raw: bytes, reply: str | None) -> Any:
    """LPUSH a raw message; when it has a reply key, BRPOP and decode the reply."""
    r.lpush(keys.rpc_queue(index), raw)
    if reply is None:
        return None
    got = r.brpop([reply], timeout=5)
    assert got is not None, "no reply to a request with a good reply key"
    return msgpack.unpackb(got[1], raw=False)


def rpc_stats(r: redis.Redis, index: str) -> list[dict[str, Any]]:
    """The counters each live worker of the index published with its last heartbeat."""
    found = list(r.scan_iter(match=keys.heartbeat_pattern(index)))
    return [json.loads(v)["stats"] for v in r.mget(found) if v] if found else []


def all_stopped(pid: int) -> bool:
    """Whether every thread of a process is stopped: SIGSTOP returns before they all are."""
    tasks = Path(f"/proc/{pid}/task")
    states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()]
    return all(state in "Tt" for state in states)
