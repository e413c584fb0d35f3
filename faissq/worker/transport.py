"""kombu's Redis transport with an at-least-once fetch: a job is never only in a dying process.

kombu takes a job with BRPOP and records it in its ``unacked`` hash a moment later; a worker
killed in between (SIGKILL, OOM) loses that job. Here the worker fetches with BLMOVE into an
in-flight list (`keys.inflight_list`) instead, and drops the copy there once kombu has recorded
the job as unacked. A starting writer requeues what it finds in the list (`restore_inflight`).
BLMOVE has one source: a worker consuming several queues blocks on each in turn for at most
`MULTI_QUEUE_WAIT_S`. Every Redis URL faissq accepts fetches this way (TLS included); kombu's
own fetch is never used by an index worker.
"""

from __future__ import annotations

import json
from queue import Empty
from time import monotonic
from typing import Any

import redis
from celery import Celery
from kombu.transport import redis as kredis
from kombu.utils import json as kombu_json

from faissq import keys
from faissq.config import masked_url
from faissq.errors import InvalidParameter

# With several queues, how long one BLMOVE blocks on one of them (Redis takes fractions): a job
# in another queue waits at most this much per other queue; an idle worker sends 10 BLMOVE/s.
MULTI_QUEUE_WAIT_S = 0.1

# kombu's Redis classes are untyped; subclass them through Any
_RedisChannel: Any = kredis.Channel
_RedisTransport: Any = kredis.Transport
_kombu_loads: Any = kombu_json.loads  # what kombu itself decodes messages with


class Channel(_RedisChannel):  # type: ignore[misc]
    """A Redis channel whose single-queue fetch moves the job to an in-flight list atomically."""

    _inflight_from: str | None = None  # the queue key of the outstanding BLMOVE, if any
    _turn = 0  # which of several consumed queues the next BLMOVE waits on

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Issue BLMOVE queue -> in-flight, on one consumed queue after the other."""
        sources = [self._q_for_pri(q, p) for p in self.priority_steps for q in self.active_queues]
        if not sources or self.global_keyprefix:  # faissq sets no key prefix
            self._inflight_from = None
            super()._brpop_start(timeout)
            return
        if timeout is None:
            timeout = self.brpop_timeout
        if len(sources) > 1:
            self._turn += 1
            source = sources[self._turn % len(sources)]
            timeout = MULTI_QUEUE_WAIT_S
        else:
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


def use_inflight_fetch(app: Celery, url: str) -> None:
    """Make `app`'s workers fetch through this module; refuse a URL it cannot serve.

    redis:// and rediss:// (kombu reads the TLS options from the URL's query) use `Transport`,
    unix:// `SocketTransport`; any other scheme could lose a job to a kill and is refused.
    """
    if url.startswith(("redis://", "rediss://")):
        app.conf.broker_transport = "faissq.worker.transport:Transport"
    elif url.startswith("unix://"):
        app.conf.broker_url = "socket://" + url[len("unix://") :]
        app.conf.broker_transport = "faissq.worker.transport:SocketTransport"
    else:
        raise InvalidParameter(
            f"an index worker needs a redis://, rediss:// or unix:// URL, not {masked_url(url)}"
        )


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
