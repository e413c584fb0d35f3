"""ShardedSearchClient: one top-k search over every shard of an index, merged by score.

The requests to all shards and the waits for their replies go out in one write per Redis
connection (docs/protocol.md, Sharded indexes); the replies merge with the engine's own merge.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import numpy.typing as npt
import redis

from faissq import shards
from faissq.config import Settings
from faissq.errors import RemoteSearchError, RpcError, SearchTimeout, permission_denied
from faissq.rpc import query_client as qc
from faissq.rpc import resp
from faissq.rpc.nodes import record_client
from faissq.rpc.search_client import CONNECT_TIMEOUT_S, READ_GRACE_S, read_within, readable_now
from faissq.rpc.shard_plan import FanOut, ShardedSearchResponse, ShardPlan, arrived, resolve_map

__all__ = ["ShardedSearchClient", "ShardedSearchResponse"]


class ShardedSearchClient:
    """Top-k searches of a sharded index (docs/tasks.md); share one instance between threads."""

    def __init__(
        self,
        settings: Settings | str,
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
        try:
            records = redis.Redis.from_url(settings) if isinstance(settings, str) \
                else record_client(settings)  # fmt: skip
            stored = shards.lookup(records, index)
        except redis.exceptions.NoPermissionError as exc:
            raise permission_denied(str(exc), "searcher") from exc
        self.plan = ShardPlan(settings, resolve_map(index, stored, shard_count, metric),
                              partial_ok)  # fmt: skip
        self.index = index
        self.pools = {
            u: redis.ConnectionPool.from_url(u, socket_timeout=self.plan.socket_timeout,
                                             socket_connect_timeout=CONNECT_TIMEOUT_S)
            for u in self.plan.urls
        }  # fmt: skip
        self._idle: dict[str, deque[Any]] = {u: deque() for u in self.pools}
        self._pid = os.getpid()

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
        filter: dict[str, Any] | None = None,
        timeout: float | None = None,
        partial_ok: bool | None = None,
    ) -> ShardedSearchResponse:
        """Top-k of each query row over every shard.

        min_seq: per shard index, the seq to wait for (a ShardedResult's `seqs`); offset: each
        shard returns its top offset + k, the merge keeps ranks offset .. offset + k - 1;
        filter: an attribute condition (docs/protocol.md#filters), the same for every shard.
        Raises ShardUnavailable when a shard is missing or late, unless partial_ok.
        """
        options = qc.search_options(nprobe=nprobe, ef_search=ef_search, k_factor=k_factor,
                                    target_recall=target_recall, allow_ids=allow_ids,
                                    deny_ids=deny_ids, filter=filter)  # fmt: skip
        fan = self.plan.prepare(queries, k, offset, min_seq, timeout, options)
        return self.plan.merge(fan, self._fan_out(fan), partial_ok)

    def _fan_out(self, fan: FanOut) -> list[Any]:
        """Submit every shard's request and wait for all replies: one write per connection
        (all written before any is read), then reads; an answer per shard, or its error."""
        answers: list[Any] = [None] * len(fan.prepared)
        sent = []
        for url, members in self.plan.groups:
            conn = None
            try:
                conn = self._checkout(url)
                conn.send_packed_command(resp.pack(self.plan.commands(fan, members)))
            except (redis.ConnectionError, redis.TimeoutError, RpcError) as exc:
                if conn is not None:
                    conn.disconnect()  # the next use reconnects
                    self._idle[url].append(conn)
                for i in members:
                    answers[i] = self.plan.unreachable(exc)
                continue
            sent.append((url, conn, members))
        failure: BaseException | None = None
        for url, conn, members in sent:
            try:
                for i, got in zip(members, self._read(conn, fan, members), strict=True):
                    answers[i] = got
            except (redis.ConnectionError, OSError) as exc:  # this node: its shards are missing
                for i in members:
                    answers[i] = self.plan.unreachable(exc)
            except BaseException as exc:  # read the other connections first: they hold answers
                failure = failure or exc
            finally:
                self._idle[url].append(conn)
        if failure is not None:
            raise failure
        return answers

    @staticmethod
    def _read(conn: Any, fan: FanOut, members: list[int]) -> list[Any]:
        """Read a connection's submit answers, then its BRPOP answers, in arrival order.

        A nil BRPOP means the deadline passed: the shards not answered yet are late, and the
        connection is dropped, since its other BRPOPs are still pending.
        """
        answers: list[Any] = [None] * len(members)
        block = fan.prepared[members[0]].block_s
        clean = False
        try:
            for _ in members:
                try:
                    conn.read_response()  # a submit's answer: its reply key tells the rest
                except redis.exceptions.NoPermissionError as exc:
                    raise permission_denied(str(exc), "searcher") from exc
                except redis.ResponseError as exc:  # its reply never comes: no use waiting
                    message = f"submit refused by Redis: {exc}"
                    raise RemoteSearchError(message, "redis_error") from exc
            slot = {fan.prepared[i].reply.encode(): j for j, i in enumerate(members)}
            for done in range(len(members)):
                left = max(0.0, fan.deadline - time.monotonic())
                got = read_within(conn, left + READ_GRACE_S)
                if got is None:  # the deadline passed with replies missing
                    clean = done == len(members) - 1
                    break
                answers[arrived(got, slot)] = got
            else:
                clean = True
            return [SearchTimeout(f"no reply within {block}s") if a is None else a for a in answers]
        except redis.TimeoutError as exc:
            raise SearchTimeout(f"Redis did not answer within {block}s: {exc}") from exc
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
