"""SearchClient: one-write synchronous searches over the RPC queue (figures: docs/benchmarks.md)."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import select
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import redis
from redis.connection import Connection

from faissq import keys
from faissq.config import RpcSettings, Settings
from faissq.errors import (
    FaissqError,
    InvalidParameter,
    InvalidVectors,
    RemoteSearchError,
    RpcError,
    SearchTimeout,
    error_for_code,
    permission_denied,
)
from faissq.rpc import protocol, replies, resp
from faissq.rpc import query_client as qc
from faissq.rpc.coalesce import Coalescer, Pending, merge_key, mergeable
from faissq.rpc.nodes import search_url

READ_TAKES_TIMEOUT = "timeout" in inspect.signature(Connection.read_response).parameters
READ_GRACE_S = 1.0  # socket read slack past the BRPOP timeout: a hung Redis still ends in time
CONNECT_TIMEOUT_S = 2.0
# merged round trips in flight per client when rpc.max_in_flight is unset: threads' wake-ups
# share one interpreter, so a third round trip adds no throughput (docs/benchmarks.md, RPC)
THREAD_IN_FLIGHT = 2


@dataclass(frozen=True)
class SearchResponse:
    """Top-k scores and ids (nq, k; -1 pads), the engine version that answered, and by whom."""

    scores: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]
    version: int | None
    worker: str
    timings: dict[str, float] = field(default_factory=dict)
    target_met: bool | None = None  # target_recall given: whether autotune's curve reaches it


@dataclass(frozen=True)
class Prepared:
    """One encoded request and the commands that submit it and wait for its reply."""

    request_id: str
    reply: str
    block_s: float
    commands: list[tuple[Any, ...]]


class RequestBuilder:
    """Encodes requests of one index; shared by the sync and asyncio clients."""

    def __init__(self, index: str, rpc: RpcSettings) -> None:
        """index: the searched index; rpc: timeout_s and reply_ttl_s are read."""
        self.index = index
        self.rpc = rpc
        self.queue = keys.rpc_queue(index)
        self.alive = keys.alive_key(index)
        self._ids = itertools.count()
        self._pid = 0
        self._prefix = ""

    def prepare(
        self,
        queries: npt.ArrayLike | None,
        k: int | None,
        timeout: float | None,
        options: dict[str, Any],
    ) -> Prepared:
        """Check the arguments and encode the request (deadline = now + timeout; queries and k
        None: a fetch; k None: a range search)."""
        timeout_s = self.timeout_of(timeout)
        q = None if queries is None else as_queries(queries)
        for name in ("allow_ids", "deny_ids", "ids"):
            if options.get(name) is not None:
                options[name] = np.ascontiguousarray(options[name], dtype="<i8").reshape(-1)
        rid = self.request_id()
        reply = keys.reply_key(self.index, rid)
        now = time.time()
        msg = protocol.encode_request(rid, reply, now + timeout_s, k, q, sent=now, **options)
        block = max(0.001, int(timeout_s * 1000 + 0.5) / 1000)  # BRPOP 0 would mean forever
        submit = ("EVAL", protocol.SUBMIT_SCRIPT, 3, self.queue, self.alive, reply, msg,
                  self.rpc.reply_ttl_s, rid)  # fmt: skip
        return Prepared(rid, reply, block, [submit, ("BRPOP", reply, block)])

    def request_id(self) -> str:
        """A fresh request id: a random prefix per builder and process, then a count (no uuid4)."""
        pid = os.getpid()
        if pid != self._pid:  # a forked child must not repeat its parent's ids
            self._pid, self._prefix = pid, uuid.uuid4().hex[:20]
        return f"{self._prefix}{next(self._ids):x}"

    def timeout_of(self, timeout: float | None) -> float:
        """The timeout in seconds (the settings' default for None); InvalidParameter unless > 0."""
        timeout_s = self.rpc.timeout_s if timeout is None else float(timeout)
        if not timeout_s > 0:
            raise InvalidParameter(f"timeout must be > 0 seconds, got {timeout}")
        return timeout_s

    @staticmethod
    def reply(got: Any, prepared: Prepared) -> replies.Reply:
        """The decoded reply of a BRPOP result, or the typed error it carries."""
        if not got:
            raise SearchTimeout(f"no reply within {prepared.block_s}s")
        reply = replies.decode_reply(bytes(got[1]))
        if reply.id != prepared.request_id:  # never hand a caller an answer to someone else
            raise RemoteSearchError(f"reply {reply.id!r} answers another request", "mismatch")
        if not reply.ok or reply.ids is None:
            raise remote_error(reply.code, reply.message)
        return reply

    @classmethod
    def response(cls, got: Any, prepared: Prepared) -> SearchResponse:
        """Turn the BRPOP result into a SearchResponse or raise the typed error it carries."""
        reply = cls.reply(got, prepared)
        if reply.scores is None or reply.ids is None or reply.scores.ndim != 2:
            raise RemoteSearchError("reply to a top-k search holds no [n, k] results", "mismatch")
        return SearchResponse(reply.scores, reply.ids, reply.version, reply.worker, reply.timings,
                              reply.target_met)  # fmt: skip


def read_within(conn: Any, timeout_s: float) -> Any:
    """Read one answer, or raise SearchTimeout after timeout_s (the connection must be dropped).

    redis-py 8 takes the timeout in read_response; earlier ones have none, and their
    can_read(timeout) waits in one recv (redis-py 8's can_read adds two polls per read).
    """
    if READ_TAKES_TIMEOUT:
        return conn.read_response(timeout=timeout_s)
    if not conn.can_read(timeout=timeout_s):
        raise SearchTimeout(f"Redis did not answer within {timeout_s:.3f}s")
    return conn.read_response()


def readable_now(conn: Any) -> bool:
    """Whether conn's socket holds something to read right now (an answer, or end of file)."""
    sock = getattr(conn, "_sock", None)
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def brpop_answer(got: Any, prepared: Prepared) -> bool:
    """Whether a read answer is this round trip's BRPOP answer: nil, or [its reply key, bytes].

    Anything else means the connection is out of step with its commands: it must be dropped.
    """
    if got is None:
        return True
    return (
        isinstance(got, list | tuple)
        and len(got) == 2
        and isinstance(got[0], bytes)
        and got[0] == prepared.reply.encode()
        and isinstance(got[1], bytes)
    )


def as_queries(queries: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Queries as a C-contiguous little-endian float32 (n, d) array (a 1-D vector is one row)."""
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if q.ndim != 2 or q.dtype.kind not in "fiu":
        raise InvalidVectors(f"queries must be a 2-D numeric array, got {q.dtype} {q.shape}")
    return np.ascontiguousarray(q, dtype="<f4")


def remote_error(code: str, message: str) -> FaissqError:
    """The typed error of a wire code: the tree's class when known, else RemoteSearchError."""
    cls = error_for_code(code)
    if cls is FaissqError or cls is RemoteSearchError:
        return RemoteSearchError(message or code, code)
    return cls(message or code)


def rpc_of(settings: Settings | str, index: str) -> tuple[str, RpcSettings, float]:
    """URL (the node holding the index's search keys), rpc section and socket timeout from
    settings, or a bare URL with rpc defaults (no env read)."""
    if isinstance(settings, str):
        return settings, RpcSettings(), 5.0
    if not (settings.rpc.url or settings.redis.url):
        raise InvalidParameter("settings.redis.url is unset: SearchClient needs the worker's Redis")
    return search_url(settings, index), settings.rpc, settings.redis.socket_timeout_s


class SearchClient:
    """Synchronous searches of one index; share one instance between threads."""

    def __init__(
        self,
        settings: Settings | str,
        index: str = "default",
        *,
        pool: redis.ConnectionPool | None = None,
    ) -> None:
        """Connect lazily.

        settings: Settings (redis.url and the rpc section are read) or a Redis URL (rpc defaults);
        index: the index to search; pool: a redis-py connection pool to use instead of a new one.
        """
        url, rpc, socket_timeout = rpc_of(settings, index)
        self.builder = RequestBuilder(index, rpc)
        self.index = index
        self.pool = pool or redis.ConnectionPool.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=CONNECT_TIMEOUT_S
        )
        self._redis = redis.Redis(connection_pool=self.pool)
        # connections taken from the pool once and kept: redis-py's checkout and release run a
        # socket probe, a lock and bookkeeping hooks per search (see _checkout)
        self._idle: deque[Any] = deque()
        self._pid = os.getpid()
        self.coalescer = (
            Coalescer(self._merged, max_in_flight=rpc.max_in_flight or THREAD_IN_FLIGHT)
            if rpc.coalesce
            else None
        )

    def search(
        self,
        queries: npt.ArrayLike,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        k_factor: int | None = None,
        target_recall: float | None = None,
        allow_ids: npt.ArrayLike | None = None,
        deny_ids: npt.ArrayLike | None = None,
        offset: int | None = None,
        min_seq: int | None = None,
        filter: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> SearchResponse:
        """Top-k of each query row among the ids passing `filter` (attribute conditions,
        docs/protocol.md#filters); raises NoWorkerAlive, IndexBusy, SearchTimeout or the
        worker's typed error (InvalidParameter, InvalidFilter, DimensionMismatch, ...)."""
        options = qc.search_options(nprobe=nprobe, ef_search=ef_search, k_factor=k_factor,
                                    target_recall=target_recall, allow_ids=allow_ids,
                                    deny_ids=deny_ids, offset=offset, min_seq=min_seq,
                                    filter=filter)  # fmt: skip
        merging = self.coalescer
        if merging is None or not mergeable(options):
            return self._once(queries, k, timeout, options)
        if merging.alone():
            try:
                return self._once(queries, k, timeout, options)
            finally:
                merging.done_alone()
        q = as_queries(queries)
        timeout_s = self.builder.timeout_of(timeout)
        key = merge_key(k, q.shape[1], options)
        return merging.run(merging.pending(q, k, options, key, timeout_s))

    def range_search(
        self,
        queries: npt.ArrayLike,
        radius: float,
        *,
        nprobe: int | None = None,
        min_seq: int | None = None,
        filter: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> qc.RangeResponse:
        """Every live vector within radius of each query row (cosine: score > radius; L2:
        squared distance < radius) passing `filter`, best first; the same typed errors as
        search."""
        options = qc.range_options(radius, nprobe, min_seq, filter)
        prepared = self.builder.prepare(queries, None, timeout, options)
        return qc.to_range(self.builder.reply(self._round_trip(prepared), prepared))

    def fetch(
        self, ids: npt.ArrayLike, *, min_seq: int | None = None, timeout: float | None = None
    ) -> qc.FetchResponse:
        """The stored vectors and attributes of these ids (at most rpc.max_fetch_ids);
        missing: not live."""
        prepared = self.builder.prepare(None, None, timeout, qc.fetch_options(ids, min_seq))
        return qc.to_fetch(self.builder.reply(self._round_trip(prepared), prepared))

    def _once(
        self,
        queries: npt.ArrayLike,
        k: int,
        timeout: float | None,
        options: dict[str, Any],
    ) -> SearchResponse:
        """One request, one round trip."""
        prepared = self.builder.prepare(queries, k, timeout, options)
        return self.builder.response(self._round_trip(prepared), prepared)

    def _merged(self, first: Pending, queries: npt.NDArray[np.float32], timeout_s: float) -> Any:
        """One round trip for a merged batch (the Coalescer's search)."""
        return self._once(queries, first.k, timeout_s, dict(first.options))

    def _round_trip(self, prepared: Prepared) -> Any:
        """Send submit + BRPOP in one write, read both answers; the connection goes back after."""
        conn = self._checkout()
        clean = False  # both answers read: the connection holds nothing for the next search
        try:
            conn.send_packed_command(resp.pack(prepared.commands))
            try:
                conn.read_response()  # the script's answer: the reply key tells the rest
            except (
                redis.exceptions.NoPermissionError
            ) as exc:  # its BRPOP is still pending: dropped below
                raise permission_denied(str(exc), "searcher") from exc
            except redis.ResponseError as exc:
                raise RemoteSearchError(f"submit refused by Redis: {exc}", "redis_error") from exc
            got = read_within(conn, prepared.block_s + READ_GRACE_S)
            if not brpop_answer(got, prepared):
                raise RpcError(f"Redis answered out of step: {type(got).__name__}")
            clean = True
            return got
        except redis.TimeoutError as exc:
            raise SearchTimeout(f"Redis did not answer within {prepared.block_s}s: {exc}") from exc
        except redis.ConnectionError as exc:
            raise RpcError(f"Redis unreachable: {exc}") from exc
        finally:
            if not clean:
                conn.disconnect()  # an answer may still be on its way: the next use reconnects
            self._idle.append(conn)

    def _checkout(self) -> Any:
        """A connection of this client: a kept one, else a new one from the pool.

        Measured: 0.518 vs 0.561 ms p50 with a pool checkout per search,
        docs/benchmarks.md#rpc-fast-paths.
        """
        if self._pid != os.getpid():  # a forked child must not share its parent's sockets
            self._idle, self._pid = deque(), os.getpid()
        try:
            conn = self._idle.pop()
        except IndexError:
            pass
        else:
            if readable_now(conn):  # end of file (Redis restarted) or stray bytes: start afresh
                conn.disconnect()  # the next send reconnects
            return conn
        try:
            return self.pool.get_connection()  # connected and checked
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RpcError(f"Redis unreachable: {exc}") from exc

    def alive(self) -> bool:
        """Whether some worker's heartbeat says the index is served."""
        try:
            return bool(self._redis.exists(keys.alive_key(self.index)))
        except redis.exceptions.NoPermissionError as exc:
            raise permission_denied(str(exc), "searcher") from exc

    def workers(self) -> list[dict[str, Any]]:
        """The heartbeat of every worker serving the index (who, limits, engine, counters)."""
        pattern = keys.heartbeat_pattern(self.index)
        try:
            found = list(self._redis.scan_iter(match=pattern, count=100))
            values = self._redis.mget(found) if found else []
        except redis.exceptions.NoPermissionError as exc:
            raise permission_denied(str(exc), "searcher") from exc
        return [json.loads(v) for v in values if v]

    def close(self) -> None:
        """Close the pool's connections."""
        self.pool.disconnect()

    def __enter__(self) -> SearchClient:
        """Use in a with block; closed on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the pool."""
        self.close()
