"""AsyncShardedSearchClient: ShardedSearchClient for asyncio (the same writes, reads and merge)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import numpy.typing as npt
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from faissq import keys, shards
from faissq.config import Settings
from faissq.errors import RemoteSearchError, SearchTimeout, permission_denied
from faissq.rpc import query_client as qc
from faissq.rpc import resp
from faissq.rpc.nodes import base_url
from faissq.rpc.search_client import CONNECT_TIMEOUT_S, READ_GRACE_S
from faissq.rpc.shard_plan import FanOut, ShardedSearchResponse, ShardPlan, arrived, resolve_map


class AsyncShardedSearchClient:
    """Top-k searches of a sharded index from asyncio; share one instance between tasks."""

    def __init__(
        self,
        settings: Settings | str,
        index: str,
        *,
        shard_count: int | None = None,
        metric: str | None = None,
        partial_ok: bool = False,
    ) -> None:
        """Connect lazily: the definition is read on the first search (arguments as for
        ShardedSearchClient; under rpc.cluster the first search also learns the slot map)."""
        self.settings = settings
        self.index = index
        self._given = (shard_count, metric, partial_ok)
        self.plan: ShardPlan | None = None
        self.pools: dict[str, aioredis.ConnectionPool] = {}

    async def _ready(self) -> ShardPlan:
        """The plan, made on first use from the stored (or given) definition."""
        if self.plan is not None:
            return self.plan
        shard_count, metric, partial_ok = self._given
        settings = self.settings
        url = settings if isinstance(settings, str) else base_url(settings)
        records: Any = (
            AsyncRedisCluster.from_url(url)
            if not isinstance(settings, str) and settings.rpc.cluster
            else aioredis.Redis.from_url(url)
        )
        try:
            raw = await records.get(keys.shard_map(self.index))
        except redis.exceptions.NoPermissionError as exc:
            raise permission_denied(str(exc), "searcher") from exc
        finally:
            await records.aclose()
        stored = None if raw is None else shards.ShardMap.from_json(raw)
        plan = ShardPlan(settings, resolve_map(self.index, stored, shard_count, metric), partial_ok)
        if self.plan is None:  # another task may have got here first: keep one plan
            self.pools = {
                u: aioredis.ConnectionPool.from_url(u, socket_timeout=plan.socket_timeout,
                                                    socket_connect_timeout=CONNECT_TIMEOUT_S)
                for u in plan.urls
            }  # fmt: skip
            self.plan = plan
        return self.plan

    async def search(
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
        """Top-k of each query row over every shard; as ShardedSearchClient.search."""
        plan = await self._ready()
        options = qc.search_options(nprobe=nprobe, ef_search=ef_search, k_factor=k_factor,
                                    target_recall=target_recall, allow_ids=allow_ids,
                                    deny_ids=deny_ids, filter=filter)  # fmt: skip
        fan = plan.prepare(queries, k, offset, min_seq, timeout, options)
        return plan.merge(fan, await self._fan_out(plan, fan), partial_ok)

    async def _fan_out(self, plan: ShardPlan, fan: FanOut) -> list[Any]:
        """Write every connection's commands, then read them all concurrently."""
        answers: list[Any] = [None] * len(fan.prepared)
        sent = []
        for url, members in plan.groups:
            conn: Any = None
            try:
                conn = await self.pools[url].get_connection()  # type: ignore[no-untyped-call]
                await conn.send_packed_command(resp.pack(plan.commands(fan, members)))
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if conn is not None:
                    await conn.disconnect()
                    await self.pools[url].release(conn)
                for i in members:
                    answers[i] = plan.unreachable(exc)
                continue
            sent.append((url, conn, members))
        reads = [self._read(self.pools[u], conn, fan, members) for u, conn, members in sent]
        results = await asyncio.gather(*reads, return_exceptions=True)
        for (_, _, members), got in zip(sent, results, strict=True):
            if isinstance(got, redis.ConnectionError | OSError):
                got = [plan.unreachable(got)] * len(members)
            elif isinstance(got, BaseException):
                raise got
            for i, answer in zip(members, got, strict=True):
                answers[i] = answer
        return answers

    @staticmethod
    async def _read(
        pool: aioredis.ConnectionPool, conn: Any, fan: FanOut, members: list[int]
    ) -> list[Any]:
        """A connection's submit answers, then its BRPOP answers in arrival order; the
        connection goes back to its pool, closed unless every answer was read."""
        answers: list[Any] = [None] * len(members)
        block = fan.prepared[members[0]].block_s
        clean = False
        try:
            for _ in members:
                try:
                    await conn.read_response()
                except redis.exceptions.NoPermissionError as exc:
                    raise permission_denied(str(exc), "searcher") from exc
                except redis.ResponseError as exc:
                    message = f"submit refused by Redis: {exc}"
                    raise RemoteSearchError(message, "redis_error") from exc
            slot = {fan.prepared[i].reply.encode(): j for j, i in enumerate(members)}
            for _ in members:
                left = max(0.0, fan.deadline - time.monotonic())
                got = await conn.read_response(timeout=left + READ_GRACE_S)
                if got is None:  # a nil BRPOP, or redis.asyncio's read timeout: late either way
                    break
                answers[arrived(got, slot)] = got
            else:
                clean = True
            return [SearchTimeout(f"no reply within {block}s") if a is None else a for a in answers]
        except redis.TimeoutError as exc:
            raise SearchTimeout(f"Redis did not answer within {block}s: {exc}") from exc
        finally:
            if not clean:
                await conn.disconnect()  # answers may still be on their way
            await pool.release(conn)

    async def close(self) -> None:
        """Close every pool's connections."""
        for pool in self.pools.values():
            await pool.disconnect()

    async def __aenter__(self) -> AsyncShardedSearchClient:
        """Use in an async with block; closed on exit."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the pools."""
        await self.close()
