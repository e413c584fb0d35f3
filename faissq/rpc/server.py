"""The RPC loop: a thread of the worker process that answers searches of one index.

Each turn pops up to `max_batch` requests in one command (BLMPOP; BRPOP + RPOP before Redis 7),
answers expired and malformed ones with typed errors (or drops, counted, what has no reply key),
searches the rest in batches and pipelines the replies (LPUSH + EXPIRE). The heartbeat keys are
refreshed between turns. A lost connection is reconnected by redis-py's `Retry` (jittered
exponential backoff); when that gives up, the loop waits on the same backoff, stop-aware, and
tries again: nothing ends the loop but `stop()`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from faissq import keys
from faissq.config import Settings
from faissq.errors import FaissqError
from faissq.index.engine import Engine
from faissq.rpc import protocol, queries, resp
from faissq.rpc.batch import Outcome
from faissq.rpc.nodes import forget, search_url
from faissq.rpc.replies import encode_error, encode_result
from faissq.rpc.stats import RpcStats, Turn
from faissq.telemetry.metric_families import Metrics, observe_turn

log = logging.getLogger(__name__)

MAX_BLOCK_S = 1.0  # longest BLMPOP wait: bounds how late stop() and the heartbeat can be
BACKOFF_S = (0.05, 2.0)  # first and longest wait between reconnect attempts (before jitter)
# connect attempts redis-py retries within one turn (jittered waits, 0.7 s at most in all): a
# Redis back that soon is reached at once; a longer outage returns to the loop's stop-aware wait
CONNECT_RETRIES = 3
MIN_REQUEST_BYTES = 1 << 20  # a message cap below this would refuse ordinary requests


def new_worker_id() -> str:
    """host:pid:random, unique per RPC loop even across restarts of the same pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class RpcServer:
    """Serves searches of one index from its Redis request list, in a daemon thread."""

    def __init__(
        self,
        settings: Settings,
        index: str,
        engine: Callable[[], Engine],
        *,
        worker_id: str | None = None,
        describe: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Prepare a loop (nothing connects until `start` or `run`).

        settings: redis.url, rpc, index.max_k and worker.inline_max_bytes are read;
        index: the served index; engine: returns the engine to search now (hot swaps are seen
        on the next turn; it raises IndexNotReady while there is none);
        worker_id: names this loop in replies and its heartbeat key (default: host:pid:random);
        describe: extra heartbeat fields (the runtime's role and replication position).
        """
        if not (settings.rpc.url or settings.redis.url):
            raise FaissqError("settings.redis.url must be set to serve searches")
        self.settings = settings
        self.cfg = settings.rpc
        self.index = index
        self.engine = engine
        self.worker_id = worker_id or new_worker_id()
        self.describe = describe
        self.queue = keys.rpc_queue(index)
        self.limits = protocol.Limits(
            reply_prefix=keys.reply_prefix(index),
            max_bytes=max(settings.worker.inline_max_bytes, MIN_REQUEST_BYTES),
            max_k=settings.index.max_k,
            max_filter_ids=self.cfg.max_allow_ids,
            max_nprobe=self.cfg.max_nprobe,
            max_ef_search=self.cfg.max_ef_search,
            max_k_factor=self.cfg.max_k_factor,
            max_candidates=self.cfg.max_candidates,
            default_k_factor=settings.index.k_factor,
            max_fetch_ids=self.cfg.max_fetch_ids,
            max_filter_bytes=self.cfg.max_filter_bytes,
        )
        self.held = queries.Held()  # requests waiting for their min_seq
        self.stats = RpcStats()
        self.metrics: Metrics | None = None  # metrics hook: set by RpcService when enabled
        self.sampler: Any = None  # live-recall hook (worker.recall_live.IndexSampler)
        self._beat_every = self.cfg.heartbeat_ttl_s / 3
        self._block_s = min(MAX_BLOCK_S, self._beat_every)
        self._stop = threading.Event()
        self.beating = threading.Event()  # set by the first heartbeat: clients find it from then
        self._thread: threading.Thread | None = None
        self._redis: redis.Redis | None = None
        self._lmpop = True
        self._next_beat = 0.0
        self._started = time.time()
        self._acks = 0  # reply commands sent whose answers are still to be read
        # jitter: replicas that lost the same Redis do not all reconnect in the same instant
        self._backoff = ExponentialWithJitterBackoff(cap=BACKOFF_S[1], base=BACKOFF_S[0])

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> RpcServer:
        """Run the loop in a daemon thread."""
        self._thread = threading.Thread(
            target=self.run, name=f"faissq-rpc-{self.index}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop, then remove this worker's heartbeat (and the alive key if it was last)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            self._unregister()
        except (redis.RedisError, OSError) as exc:
            log.warning("rpc %s: heartbeat not removed: %s", self.index, exc)
        if self._redis is not None:
            self._redis.close()

    def run(self) -> None:
        """The loop: one turn at a time until `stop()`; every failure is caught and counted."""
        failures = 0
        log.info("rpc %s: serving %s as %s", self.index, self.queue, self.worker_id)
        while not self._stop.is_set():
            try:
                self._turn()
                failures = 0
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                wait = self._backoff.compute(failures)
                failures += 1
                self.stats.fault(f"{type(exc).__name__}: {exc}", reconnect=True)
                log.warning("rpc %s: redis unavailable (%s); retry in %.2fs", self.index, exc,
                            wait)  # fmt: skip
                self._reset()
                self._stop.wait(wait)
            except Exception as exc:
                self.stats.fault(f"{type(exc).__name__}: {exc}", reconnect=False)
                log.exception("rpc %s: loop turn failed; going on", self.index)
                self._stop.wait(BACKOFF_S[0])

    # -- one turn ----------------------------------------------------------------------------

    def _turn(self) -> None:
        """Heartbeat when due, wait for requests, answer them."""
        r = self._client()
        if time.monotonic() >= self._next_beat:
            self._beat(r)
        raws = self._pop(r)
        if raws or self.held:
            self.handle(r, raws)

    def _client(self) -> redis.Redis:
        """The loop's connection, made on first use and after a failure."""
        if self._redis is None:
            url = search_url(self.settings, self.index)  # a cluster: the slot's node, now
            sock_timeout = max(self.settings.redis.socket_timeout_s, self._block_s + 1.0)
            # one connection, no pool: each command skips the pool's checkout and bookkeeping
            client = redis.Redis.from_url(
                url,
                socket_timeout=sock_timeout,
                single_connection_client=True,
                retry=Retry(self._backoff, CONNECT_RETRIES),
            )
            version = str(client.info("server").get("redis_version", "0"))
            self._lmpop = int(version.split(".")[0]) >= 7
            self._redis, self._next_beat = client, 0.0
        return self._redis

    def _reset(self) -> None:
        """Drop the connection so the next turn reconnects (and re-beats at once)."""
        if self._redis is not None:
            self._redis.close()
        if self.settings.rpc.cluster:
            forget(self.settings)  # the slot may have moved: read the cluster's map again
        self._redis, self._acks = None, 0

    def _pop(self, r: redis.Redis) -> list[bytes]:
        """Block for the first request, take what else waits (up to max_batch), maybe a bit more.

        With one request there is no wait (latency first); when several arrived together the
        list is busy, and a short window lets more join the same batched search.
        """
        n = self.cfg.max_batch
        if self.held:  # poll here: Redis times out a blocked pop only at its cron's pace
            items = self._take(r, n, block=False)
            if not items:
                self._stop.wait(queries.POLL_S)
            return items
        items = self._take(r, n, block=True)
        window = self.cfg.batch_window_ms / 1000
        if 1 < len(items) < n and window > 0:
            time.sleep(window)
            items += self._take(r, n - len(items), block=False)
        return items

    def _take(self, r: redis.Redis, n: int, *, block: bool) -> list[bytes]:
        """Pop up to n requests from the right end (oldest first), in one round trip.

        Redis 7: one BLMPOP (LMPOP). Before 7: BRPOP and RPOP written together; Redis holds the
        RPOP behind the blocked BRPOP, so the rest of the list comes back with the first item.
        """
        conn: Any = r.connection
        if self._lmpop:
            args = ("BLMPOP", self._block_s) if block else ("LMPOP",)
            conn.send_command(*args, 1, self.queue, "RIGHT", "COUNT", n)
        elif block:
            cmds: list[tuple[Any, ...]] = [("BRPOP", self.queue, self._block_s)]
            if n > 1:
                cmds.append(("RPOP", self.queue, n - 1))
            conn.send_packed_command(resp.pack(cmds))
        else:
            conn.send_command("RPOP", self.queue, n)
        self._read_acks(conn)  # answers to the last replies, queued ahead of this pop's
        got = conn.read_response()
        if self._lmpop:
            return list(got[1]) if got else []
        if not block:
            return list(got or [])
        rest = conn.read_response() if n > 1 else None  # may hold items even after a timeout
        return [got[1], *(rest or [])] if got else list(rest or [])

    def handle(self, r: redis.Redis, raws: list[bytes]) -> Turn:
        """Answer a list of raw requests; the one place a turn's outcome is recorded."""
        t0 = time.perf_counter()
        now = time.time()
        turn = Turn(popped=len(raws))
        replies: list[tuple[str, bytes]] = []
        live: list[protocol.Request] = []
        for raw in raws:
            try:
                req = protocol.decode_request(raw, self.limits)
            except protocol.Unreadable as exc:
                turn.dropped += 1
                log.debug("rpc %s: dropped an unreadable request: %s", self.index, exc)
                continue
            except protocol.BadRequest as bad:
                replies.append((bad.reply, self._error(bad.request_id, bad.error.code,
                                                       str(bad.error), turn)))  # fmt: skip
                continue
            except Exception:  # decode_request promises its two outcomes; a bug costs one message
                turn.dropped += 1
                log.exception("rpc %s: dropped a request its decoder failed on", self.index)
                continue
            if req.deadline <= now:
                turn.expired += 1
                late = f"deadline passed {now - req.deadline:.3f}s before the search could run"
                replies.append((req.reply, self._error(req.id, "timeout", late, turn)))
                continue
            live.append(req)
        live, stale = self.held.turn(live, self.engine, now)
        for req in stale:
            why = queries.stale_message(req, self.engine)
            replies.append((req.reply, self._error(req.id, queries.STALE, why, turn)))
        outcomes = self._search(live, turn) if live else []
        for out in outcomes:
            replies.append((out.request.reply, self._encode(out, t0, now, turn)))
        if replies:
            self._send(r, replies)
        if self.sampler is not None and outcomes:  # after the replies left: off the answer path
            self.sampler.offer(outcomes)
        turn.seconds = time.perf_counter() - t0
        self.stats.record(turn)
        if self.metrics is not None:  # metrics hook
            observe_turn(self.metrics, self.index, turn, live, self.engine)
        return turn

    def _search(self, live: list[protocol.Request], turn: Turn) -> list[Outcome]:
        """Search the live requests on the engine serving now."""
        try:
            eng = self.engine()
        except FaissqError as exc:
            return [Outcome(req, error=(exc.code, str(exc))) for req in live]
        outcomes = queries.search_kinds(eng, live, turn.batch_sizes, self.limits)
        turn.batches = len(turn.batch_sizes)
        return outcomes

    def _encode(self, out: Outcome, t0: float, now: float, turn: Turn) -> bytes:
        """The reply bytes of one outcome."""
        req = out.request
        if out.error is not None or out.ids is None:
            code, message = out.error or ("internal", "no result")
            return self._error(req.id, code, message, turn)
        server_s = time.perf_counter() - t0
        # unrounded: msgpack sends every float in 9 bytes anyway, and round() formats a string
        timings = {"search_ms": out.search_s * 1e3, "server_ms": server_s * 1e3, "batch": out.batch}
        if req.sent is not None:
            timings["queue_ms"] = max(0.0, now - req.sent) * 1e3
        turn.answered += 1
        turn.latencies_s.append(server_s)
        return encode_result(req.id, out.scores, out.ids, out.version, self.worker_id,
                             timings, out.target_met, out.extra)  # fmt: skip

    def _error(self, request_id: str, code: str, message: str, turn: Turn) -> bytes:
        """An error reply, counted by code."""
        turn.errors[code] = turn.errors.get(code, 0) + 1
        return encode_error(request_id, code, message, self.worker_id)

    def _send(self, r: redis.Redis, replies: list[tuple[str, bytes]]) -> None:
        """LPUSH + EXPIRE every reply in one write; their answers are read behind the next pop.

        Written straight to the connection: a redis-py Pipeline object costs tens of
        microseconds before the first byte leaves, on every request's critical path. Not
        waiting for the answers here saves a Redis round trip per turn: the next BLMPOP goes out
        at once, and Redis answers in order.
        """
        conn: Any = r.connection
        ttl = self.cfg.reply_ttl_s
        cmds = [c for key, data in replies for c in (("LPUSH", key, data), ("EXPIRE", key, ttl))]
        conn.send_packed_command(resp.pack(cmds))
        self._acks += len(cmds)

    def _read_acks(self, conn: Any) -> None:
        """Read the answers to the reply commands sent last; count and log refusals."""
        refused = 0
        while self._acks:
            self._acks -= 1
            try:
                conn.read_response()
            except redis.ResponseError:  # e.g. a reply key that a client made a hash: skip it
                refused += 1
        if refused:
            log.warning("rpc %s: Redis refused %d reply command(s)", self.index, refused)

    # -- heartbeat ---------------------------------------------------------------------------

    def _beat(self, r: redis.Redis) -> None:
        """Refresh the index's alive key (value: the queue bound) and this worker's own key."""
        ttl_ms = max(1, int(self.cfg.heartbeat_ttl_s * 1000))
        pipe = r.pipeline(transaction=False)
        pipe.set(keys.alive_key(self.index), self.cfg.queue_max, px=ttl_ms)
        pipe.set(keys.heartbeat_key(self.index, self.worker_id), self._status(), px=ttl_ms)
        pipe.execute()
        self._next_beat = time.monotonic() + self._beat_every
        self.beating.set()

    def _status(self) -> str:
        """This worker's heartbeat value: who, limits, engine state and counters (JSON)."""
        engine: dict[str, object]
        try:
            eng = self.engine()
            engine = {"ready": True, "version": eng.version, "ntotal": eng.ntotal, "dim": eng.dim,
                      "attributes": eng.schema}  # fmt: skip
        except FaissqError as exc:
            engine = {"ready": False, "code": exc.code, "reason": str(exc)}
        return json.dumps(
            {
                **(self.describe() if self.describe is not None else {}),
                "worker": self.worker_id,
                "index": self.index,
                "pid": os.getpid(),
                "protocol": protocol.VERSION,
                "queue_max": self.cfg.queue_max,
                "max_batch": self.cfg.max_batch,
                "started": round(self._started, 3),
                "beat": round(time.time(), 3),
                "engine": engine,
                "stats": self.stats.snapshot(),
            }
        )

    def _unregister(self) -> None:
        """Delete this worker's heartbeat; delete the alive key too when no other replica beats."""
        if self._redis is None:
            return
        r = self._redis
        self._read_acks(r.connection)
        r.delete(keys.heartbeat_key(self.index, self.worker_id))
        others = next(iter(r.scan_iter(match=keys.heartbeat_pattern(self.index), count=100)), None)
        if others is None:
            r.delete(keys.alive_key(self.index))
