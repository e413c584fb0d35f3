"""The writer lease: a Redis key naming each index's writer, the fence where storage has no lock.

On an object store (any fsspec backend but a local folder) nothing on storage stops a second
`faissq worker` of an index before it takes the jobs the live writer is running for a dead
predecessor's and re-queues them. So each writer holds `faissq:{<index>}:writer`: its id, with a
TTL (worker.writer_lease_s) that a thread of the writer renews every third of it. A start
finds the lease

* free: takes it (SET NX PX);
* held and renewed while it watches (at most a third of the TTL): another writer is alive, the
  start ends with WriterConflict naming it;
* held and not renewed until it expires: its holder died (kill -9, a lost host): taken then.

On local storage the log's flock (storage/log.py) is taken first. Holding it proves that the
previous holder is dead, so the lease is taken over at once and a restart after a crash does
not wait for the TTL. A clean stop deletes the lease (only while it still names this writer).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from faissq import keys
from faissq.errors import WriterConflict

log = logging.getLogger(__name__)

NAP_S = 0.05  # between two looks at a held lease: a renewal or the expiry is seen this soon

# extend / delete the lease only while it names this writer (a taken-over lease is left alone)
RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def holder_id(node: str = "") -> str:
    """node (the Celery node name, else the host name), pid and a random part: unique per start."""
    return f"{node or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _text(raw: Any) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


class WriterLease:
    """The writer leases of one worker process: taken at start, renewed, released at stop."""

    def __init__(self, client: redis.Redis, ttl_s: float, holder: str) -> None:
        """client: the worker's Redis client; ttl_s: worker.writer_lease_s; holder: holder_id()."""
        self.client = client
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.holder = holder
        self.held: set[str] = set()
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(
        self, index: str, *, holder_gone: bool = False, stopping: Callable[[], bool] = bool
    ) -> bool:
        """Hold the lease of `index`; False when `stopping()` turns true while it waits.

        holder_gone: this process holds the index's storage lock, so whoever the lease names
        is dead and it is taken over at once. Otherwise a held lease is watched until it is
        renewed (WriterConflict names its holder) or expires (taken).
        """
        key = keys.writer_lease(index)
        if holder_gone:
            prev = _text(self.client.get(key))
            self.client.set(key, self.holder, px=self.ttl_ms)
            if prev is not None and prev != self.holder:
                log.warning("index %s: took over the writer lease of %s (this worker holds the "
                            "log's lock, so that writer is gone)", index, prev)  # fmt: skip
            return self._hold(index)
        seen: tuple[str, int] | None = None
        while True:
            if self.client.set(key, self.holder, nx=True, px=self.ttl_ms):
                if seen is not None:
                    log.warning("index %s: the writer lease of %s expired unrenewed: taken",
                                index, seen[0])  # fmt: skip
                return self._hold(index)
            pipe = self.client.pipeline(transaction=True)
            pipe.get(key)
            pipe.pttl(key)
            raw, ttl = pipe.execute()
            holder = _text(raw)
            if holder is None:
                continue  # expired between the SET and the GET
            if holder == self.holder:
                self._renew(keys=[key], args=[self.holder, self.ttl_ms])
                return self._hold(index)
            if ttl < 0 or (seen is not None and seen[0] == holder and ttl > seen[1]):
                why = "it renews its lease" if ttl >= 0 else "its lease has no TTL"
                raise WriterConflict(
                    f"writer {holder} holds the lease {key} ({why}); if that writer is gone, "
                    f"its lease expires within worker.writer_lease_s ({self.ttl_ms / 1000:g} s)"
                )
            if seen is None or seen[0] != holder:
                log.warning("index %s: writer %s holds the lease (%d ms left): waiting to see "
                            "it renewed (a live writer) or expire", index, holder, ttl)  # fmt: skip
            seen = (holder, int(ttl))
            if stopping():
                return False
            time.sleep(NAP_S)

    def _hold(self, index: str) -> bool:
        with self._mutex:
            self.held.add(index)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="faissq-writer-lease",
                                                daemon=True)  # fmt: skip
                self._thread.start()
        return True

    def _loop(self) -> None:
        """Renew every held lease every third of the TTL until stopped."""
        while not self._stop.wait(self.ttl_ms / 3000):
            with self._mutex:
                held = sorted(self.held)
            for index in held:
                try:
                    self.renew(index)
                except redis.RedisError as exc:  # Redis away: the next round tries again
                    log.warning("index %s: cannot renew the writer lease: %s", index, exc)

    def renew(self, index: str) -> None:
        """Extend the lease; take it again when it expired (Redis was away longer than the TTL)."""
        key = keys.writer_lease(index)
        if self._renew(keys=[key], args=[self.holder, self.ttl_ms]):
            return
        if self.client.set(key, self.holder, nx=True, px=self.ttl_ms):
            log.warning("index %s: the writer lease had expired (Redis away?): taken again", index)
            return
        log.error("index %s: writer %s holds the lease of this writer: two writers may run; "
                  "stop one of them", index, _text(self.client.get(key)))  # fmt: skip

    def release(self, index: str) -> None:
        """Delete one index's lease while it names this writer (a dropped index)."""
        with self._mutex:
            if index not in self.held:
                return
            self.held.discard(index)
        self._release(keys=[keys.writer_lease(index)], args=[self.holder])

    def close(self) -> None:
        """Stop renewing and release every lease (a clean stop: the next writer starts at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        with self._mutex:
            held = sorted(self.held)
        for index in held:
            try:
                self.release(index)
            except redis.RedisError as exc:  # expires on its own within the TTL
                log.warning("index %s: cannot release the writer lease: %s", index, exc)


def fenced_by_storage(store: Any) -> bool:
    """Whether the store's writer lock is an OS lock (local storage) that dies with its holder."""
    return bool(getattr(getattr(store, "storage", None), "is_local", False))


def take_writer(
    store: Any, lease: WriterLease | None, index: str, stopping: Callable[[], bool] = bool
) -> bool:
    """Become the index's one writer: its storage lock and lease, in the order that fences.

    Local storage: the flock first (a live writer refuses there), then the lease taken over.
    Elsewhere: the lease first, then the log writer (which may tidy the log) under it.
    False when `stopping()` turned true while a held lease was watched.
    """
    local = fenced_by_storage(store)
    if local or lease is None:
        store.lock(index)
    if lease is not None and not lease.take(index, holder_gone=local, stopping=stopping):
        return False
    if not local and lease is not None:
        store.lock(index)
    return True
