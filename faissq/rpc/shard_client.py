"""ShardedSearchClient: one top-k search over every shard of an index, merged by score.

The requests to all shards and the waits for their replies go out in one write per Redis node
(docs/protocol.md, Sharded indexes); the replies are merged with the engine's own merge.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import redis

from faissq import shards
from faissq.errors import (
    FaissqError,
    InvalidParameter,
    RemoteSearchError,
    RpcError,
    SearchTimeout,
    ShardUnavailable,
    UnknownIndex,
    permission_denied,
)
from faissq.index.results import merge_topk
from faissq.rpc import query_client as qc
from faissq.rpc import resp
from faissq.rpc.nodes import record_client
from faissq.rpc.search_client import (
    CONNECT_TIMEOUT_S,
    READ_GRACE_S,
    Prepared,
    RequestBuilder,
    SearchResponse,
    as_queries,
    read_within,
    readable_now,
    rpc_of,
)

# reply codes that mean "this shard did not answer" (partial_ok may go on without it); any
# other error is the request's own fault and is raised whatever partial_ok says
UNAVAILABLE = frozenset(
    {"timeout", "no_worker", "index_not_ready", "busy", "stale", "unknown_index"}
)


@dataclass(frozen=True)
class ShardedSearchResponse:
    """Merged top-k (nq, k; -1 pads), each answering shard's version and worker, and which
    shards are missing (only with partial_ok: then `partial` is True)."""

    scores: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]
    versions: dict[str, int | None]
    workers: dict[str, str]
    partial: bool = False
    missing: dict[str, str] = field(default_factory=dict)  # shard index -> error code
    timings: dict[str, dict[str, float]] = field(default_factory=dict)


class ShardedSearchClient:
    """Top-k searches of a sharded index (docs/tasks.md); share one instance between threads."""

    def __init__(
        self,
        settings: Any,
        index: str,
        *,
        shard_count: int | None = None,
        metric: str | None = None,
        partial_ok: bool = False,
    ) -> None:
        """Read the index's definition from Redis unless `shard_count` (and `metric`) are given.

        settings: Settings or a Redis URL, as for SearchClient (with rpc.cluster, each shard's
        node is found from its slot); index: the sharded index's name; shard_count, metric:
        its definition, checked against the stored one when there is one; partial_ok: the
        default of search's partial_ok.
        """
        _, rpc, self._socket_timeout = rpc_of(settings, index)
        cluster = not isinstance(settings, str) and settings.rpc.cluster
        try:
            records = redis.Redis.from_url(settings) if isinstance(settings, str) \
                else record_client(settings)  # fmt: skip
            stored = shards.lookup(records, index)
        except redis.exceptions.NoPermissionError as exc:
            raise permission_denied(str(exc), "searcher") from exc
        if shard_count is None:
            if stored is None:
                raise UnknownIndex(f"{index!r} is not a declared sharded index")
            self.map = stored
        else:
            self.map = shards.ShardMap(index, shard_count, metric or "cosine")  # type: ignore[arg-type]
            if stored is not None and stored != self.map:
                raise InvalidParameter(f"{index!r} is declared as {stored}, not {self.map}")
        self.index = index
        self.partial_ok = partial_ok
        self.builders = [RequestBuilder(name, rpc) for name in self.map.names]
        urls = [rpc_of(settings, name)[0] for name in self.map.names]
        # one connection waits on several reply keys only where they may share a BRPOP: a
        # cluster refuses keys of several slots in one command (CROSSSLOT), so there each
        # shard gets a connection of its own, all written before any is read
        self.groups: list[tuple[str, list[int]]] = (
            [(u, [i]) for i, u in enumerate(urls)] if cluster
            else [(u, [i for i, v in enumerate(urls) if v == u]) for u in dict.fromkeys(urls)]
        )  # fmt: skip
        self.pools = {u: self._pool(u) for u in dict.fromkeys(urls)}
        self._idle: dict[str, deque[Any]] = {u: deque() for u in self.pools}
        self._pid = os.getpid()

    def _pool(self, url: str) -> redis.ConnectionPool:
        """A connection pool on one Redis (node)."""
        return redis.ConnectionPool.from_url(
            url, socket_timeout=self._socket_timeout, socket_connect_timeout=CONNECT_TIMEOUT_S
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
        min_seq: Mapping[str, int] | None = None,
        timeout: float | None = None,
        partial_ok: bool | None = None,
    ) -> ShardedSearchResponse:
        """Top-k of each query row over every shard.

        min_seq: per shard index, the seq to wait for (a ShardedResult's `seqs`); offset: each
        shard returns its top offset + k, the merge keeps ranks offset .. offset + k - 1.
        Raises ShardUnavailable when a shard is missing or late, unless partial_ok.
        """
        q = as_queries(queries)
        start = int(qc.scalar(offset) or 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or start < 0:
            raise InvalidParameter(f"k must be >= 1 and offset >= 0, got k={k}, offset={offset}")
        seqs = dict(min_seq or {})
        unknown = set(seqs) - set(self.map.names)
        if unknown:
            raise InvalidParameter(f"min_seq names indexes that are not shards: {sorted(unknown)}")
        timeout_s = self.builders[0].timeout_of(timeout)
        prepared = []
        for builder in self.builders:
            options = {"nprobe": nprobe, "ef_search": ef_search, "k_factor": k_factor,
                       "target_recall": target_recall, "allow_ids": allow_ids,
                       "deny_ids": deny_ids,
                       "min_seq": qc.scalar(seqs.get(builder.index))}  # fmt: skip
            prepared.append(builder.prepare(q, start + k, timeout_s, options))
        answers = self._fan_out(prepared, time.monotonic() + timeout_s)
        return self._merge(prepared, answers, start, k, q.shape[0], partial_ok)

    def _merge(
        self,
        prepared: list[Prepared],
        answers: list[Any],
        start: int,
        k: int,
        nq: int,
        partial_ok: bool | None,
    ) -> ShardedSearchResponse:
        """Decode each shard's answer, set the missing ones aside, merge the rest by score."""
        parts: list[SearchResponse] = []
        missing: dict[str, str] = {}
        for builder, prep, got in zip(self.builders, prepared, answers, strict=True):
            try:
                if isinstance(got, FaissqError):
                    raise got
                parts.append(builder.response(got, prep))
            except FaissqError as exc:  # a typed remote error, or the shard's timeout
                code = getattr(exc, "remote_code", exc.code)
                if code not in UNAVAILABLE:
                    raise
                missing[builder.index] = code
        allowed = self.partial_ok if partial_ok is None else partial_ok
        if missing and (not allowed or not parts):
            raise ShardUnavailable(
                f"{len(missing)} of {len(self.builders)} shards of {self.index!r} did not "
                f"answer: {missing}",
                missing,
            )
        scores, ids = merge_topk([(p.scores, p.ids) for p in parts], start + k,
                                 self.map.higher_is_better)  # fmt: skip
        answered = [b.index for b in self.builders if b.index not in missing]
        return ShardedSearchResponse(
            np.ascontiguousarray(scores[:, start:]),
            np.ascontiguousarray(ids[:, start:]),
            {n: p.version for n, p in zip(answered, parts, strict=True)},
            {n: p.worker for n, p in zip(answered, parts, strict=True)},
            partial=bool(missing),
            missing=missing,
            timings={n: p.timings for n, p in zip(answered, parts, strict=True)},
        )

    def _fan_out(self, prepared: list[Prepared], deadline: float) -> list[Any]:
        """Submit every shard's request and wait for all replies: one write per connection
        (all written before any is read), then reads; an answer per shard, or its error."""
        answers: list[Any] = [None] * len(prepared)
        sent = []
        for url, members in self.groups:
            conn = self._checkout(url)
            sent.append((url, conn, members))
            try:
                conn.send_packed_command(resp.pack(commands_of([prepared[i] for i in members])))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                conn.disconnect()
                for i in members:
                    answers[i] = RpcError(f"Redis unreachable: {exc}")
                sent[-1] = (url, None, members)
        failure: BaseException | None = None
        for url, conn, members in sent:
            if conn is None:
                continue
            try:
                got = self._read(conn, [prepared[i] for i in members], deadline)
                for i, a in zip(members, got, strict=True):
                    answers[i] = a
            except BaseException as exc:  # read the other connections first: they hold answers
                failure = failure or exc
            finally:
                self._idle[url].append(conn)
        if failure is not None:
            raise failure
        return answers

    @staticmethod
    def _read(conn: Any, prepared: list[Prepared], deadline: float) -> list[Any]:
        """Read a connection's submit answers, then its BRPOP answers, in arrival order.

        A nil BRPOP means the deadline passed: the shards not answered yet are late, and the
        connection is dropped, since its other BRPOPs are still pending.
        """
        answers: list[Any] = [None] * len(prepared)
        block = prepared[0].block_s
        clean = False
        try:
            for _ in prepared:
                try:
                    conn.read_response()  # a submit's answer: its reply key tells the rest
                except redis.exceptions.NoPermissionError as exc:
                    raise permission_denied(str(exc), "searcher") from exc
                except redis.ResponseError as exc:  # its reply never comes: no use waiting
                    message = f"submit refused by Redis: {exc}"
                    raise RemoteSearchError(message, "redis_error") from exc
            slot = {p.reply.encode(): i for i, p in enumerate(prepared)}
            for done in range(len(prepared)):
                left = max(0.0, deadline - time.monotonic())
                got = read_within(conn, left + READ_GRACE_S)
                if got is None:  # the deadline passed with replies missing
                    clean = done == len(prepared) - 1
                    break
                if not (isinstance(got, list | tuple) and len(got) == 2 and got[0] in slot):
                    raise RpcError(f"Redis answered out of step: {type(got).__name__}")
                answers[slot[got[0]]] = got
            else:
                clean = True
            return [SearchTimeout(f"no reply within {block}s") if a is None else a for a in answers]
        except redis.TimeoutError as exc:
            raise SearchTimeout(f"Redis did not answer within {block}s: {exc}") from exc
        except redis.ConnectionError as exc:
            raise RpcError(f"Redis unreachable: {exc}") from exc
        finally:
            if not clean:
                conn.disconnect()  # answers may still be on their way: the next use reconnects

    def _checkout(self, url: str) -> Any:
        """A connection of this client to one Redis: a kept one, else a new one from its pool."""
        if self._pid != os.getpid():  # a forked child must not share its parent's sockets
            self._idle, self._pid = {u: deque() for u in self.pools}, os.getpid()
        try:
            conn = self._idle[url].pop()
        except IndexError:
            pass
        else:
            if readable_now(conn):  # end of file (Redis restarted) or stray bytes: start afresh
                conn.disconnect()
            return conn
        try:
            return self.pools[url].get_connection()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RpcError(f"Redis unreachable: {exc}") from exc

    def close(self) -> None:
        """Close every pool's connections."""
        for pool in self.pools.values():
            pool.disconnect()

    def __enter__(self) -> ShardedSearchClient:
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


def commands_of(prepared: list[Prepared]) -> list[tuple[Any, ...]]:
    """The submit scripts of some shards, then as many BRPOPs on all their reply keys: each
    pops whichever reply came next, so the wait is the slowest shard's, not their sum."""
    wait = ("BRPOP", *[p.reply for p in prepared], prepared[0].block_s)
    return [p.commands[0] for p in prepared] + [wait] * len(prepared)
