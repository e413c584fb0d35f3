"""kombu's Redis transport with an at-least-once fetch: a job is never only in a dying process.

kombu takes a job with BRPOP and records it in its ``unacked`` hash a moment later; a worker
killed in between (SIGKILL, OOM) loses that job. Here a worker consuming one queue fetches with
BLMOVE into an in-flight list (`keys.inflight_list`) instead, and drops the copy there once kombu
has recorded the job as unacked. A starting writer requeues what it finds in the list
(`restore_inflight`). Workers that consume several queues fall back to BRPOP.
"""

from __future__ import annotations

import json
from queue import Empty
from time import monotonic
from typing import Any

import redis
from kombu.transport import redis as kredis
from kombu.utils import json as kombu_json

from faissq import keys

# kombu's Redis classes are untyped; subclass them through Any
_RedisChannel: Any = kredis.Channel
_RedisTransport: Any = kredis.Transport
_kombu_loads: Any = kombu_json.loads  # what kombu itself decodes messages with


class Channel(_RedisChannel):  # type: ignore[misc]
    """A Redis channel whose single-queue fetch moves the job to an in-flight list atomically."""

    _inflight_from: str | None = None  # the queue key of the outstanding BLMOVE, if any

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Issue BLMOVE queue -> in-flight when exactly one key is consumed, else BRPOP."""
        sources = [self._q_for_pri(q, p) for p in self.priority_steps for q in self.active_queues]
        if len(sources) != 1 or self.global_keyprefix:
            self._inflight_from = None
            super()._brpop_start(timeout)
            return
        if timeout is None:
            timeout = self.brpop_timeout
        source = sources[0]
        self._inflight_from = source
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(
            "BLMOVE", source, keys.inflight_list(source), "RIGHT", "LEFT", timeout or 0
        )

    def _brpop_read(self, **options: Any) -> bool:
        """Deliver the moved job, then forget the in-flight copy (it is in `unacked` now)."""
        source = self._inflight_from
        if source is None:
            return bool(super()._brpop_read(**options))
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if item is None:
                raise Empty()
            self._queue_cycle.rotate(source)
            self.connection._deliver(_kombu_loads(item.decode()), source)
            self.client.lrem(keys.inflight_list(source), 1, item)
            return True
        finally:
            self._inflight_from = None
            self._in_poll = None
            self._flush_brpop_reauth()


class Transport(_RedisTransport):  # type: ignore[misc]
    """The Redis transport with the in-flight fetch (TCP URLs, parsed by kombu)."""

    Channel = Channel


class SocketTransport(Transport):
    """The same over a unix socket: kombu gets ``socket:///path`` unparsed."""

    can_parse_url = True


def restore_inflight(client: redis.Redis, queue: str, unacked_key: str = "unacked") -> int:
    """Requeue jobs a killed worker had fetched but not yet recorded as unacked; return how many.

    A job that did reach the unacked hash is only dropped from the list: `restore_orphans`
    requeues it from there, so it is not delivered twice.
    """
    src = keys.inflight_list(queue)
    restored = 0
    items: list[Any] = client.lrange(src, 0, -1)
    for item in items:
        try:
            tag = json.loads(item)["properties"]["delivery_tag"]
        except (ValueError, KeyError, TypeError):
            tag = None
        pipe = client.pipeline(transaction=True)
        if tag is None or not client.hexists(unacked_key, tag):
            pipe.rpush(queue, item)  # the consuming end: the next job fetched
            restored += 1
        pipe.lrem(src, 1, item)
        pipe.execute()
    return restored
