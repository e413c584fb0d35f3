"""AsyncSearchClient: the same one-round-trip search as SearchClient, for asyncio services."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import redis
import redis.asyncio as aioredis

from faissq import keys
from faissq.config import Settings
from faissq.errors import RemoteSearchError, RpcError, SearchTimeout, permission_denied
from faissq.rpc import query_client as qc
from faissq.rpc import resp
from faissq.rpc.aio_coalesce import AsyncCoalescer
from faissq.rpc.coalesce import Pending, merge_key, mergeable
from faissq.rpc.search_client import (
    CONNECT_TIMEOUT_S,
    READ_GRACE_S,
    Prepared,
    RequestBuilder,
    SearchResponse,
    as_queries,
    brpop_answer,
    rpc_of,
)

# merged round trips in flight per client when rpc.max_in_flight is unset: a waiting round trip
# costs a task, not a thread, and a third keeps a worker with CPUs of its own busier
ASYNC_IN_FLIGHT = 3


class AsyncSearchClient:
    """Asyncio searches of one index; share one instance between tasks of one event loop."""

    def __init__(
        self,
        settings: Settings | str,
        index: str = "default",
        *,
        pool: aioredis.ConnectionPool | None = None,
    ) -> None:
        """Connect lazily.

        settings: Settings (redis.url and the rpc section are read) or a Redis URL (rpc defaults);
        index: the index to search; pool: a redis.asyncio pool to use instead of a new one.
        """
        url, rpc, socket_timeout = rpc_of(settings, index)
        self.builder = RequestBuilder(index, rpc)
        self.index = index
        self.pool = pool or aioredis.ConnectionPool.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=CONNECT_TIMEOUT_S
        )
        self.coalescer = (
            AsyncCoalescer(self._merged, max_in_flight=rpc.max_in_flight or ASYNC_IN_FLIGHT)
            if rpc.coalesce
            else None
        )

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
        min_seq: int | None = None,
        filter: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> SearchResponse:
        """Top-k of each query row among the ids passing `filter`; as SearchClient.search."""
        options = qc.search_options(nprobe=nprobe, ef_search=ef_search, k_factor=k_factor,
                                    target_recall=target_recall, allow_ids=allow_ids,
                                    deny_ids=deny_ids, offset=offset, min_seq=min_seq,
                                    filter=filter)  # fmt: skip
        merging = self.coalescer
        if merging is None or not mergeable(options):
            return await self._once(queries, k, timeout, options)
        if merging.alone():
            try:
                return await self._once(queries, k, timeout, options)
            finally:
                merging.done_alone()
        q = as_queries(queries)
        timeout_s = self.builder.timeout_of(timeout)
        key = merge_key(k, q.shape[1], options)
        return await merging.run(merging.pending(q, k, options, key, timeout_s))

    async def range_search(
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
        return qc.to_range(self.builder.reply(await self._round_trip(prepared), prepared))

    async def fetch(
        self, ids: npt.ArrayLike, *, min_seq: int | None = None, timeout: float | None = None
    ) -> qc.FetchResponse:
        """The stored vectors and attributes of these ids (at most rpc.max_fetch_ids);
        missing: not live."""
        prepared = self.builder.prepare(None, None, timeout, qc.fetch_options(ids, min_seq))
        return qc.to_fetch(self.builder.reply(await self._round_trip(prepared), prepared))

    async def _once(
        self, queries: npt.ArrayLike, k: int, timeout: float | None, options: dict[str, Any]
    ) -> SearchResponse:
        """One request, one round trip."""
        prepared = self.builder.prepare(queries, k, timeout, options)
        return self.builder.response(await self._round_trip(prepared), prepared)

    async def _merged(
        self, first: Pending, queries: npt.NDArray[np.float32], timeout_s: float
    ) -> Any:
        """One round trip for a merged batch (the AsyncCoalescer's search)."""
        return await self._once(queries, first.k, timeout_s, dict(first.options))

    async def _round_trip(self, prepared: Prepared) -> Any:
        """Send submit + BRPOP in one write and read both answers.

        A connection goes back to the pool only when both answers were read and the second is
        this request's: after a timeout, a cancellation or any surprise it is closed, so no
        later search can read an answer meant for this one.
        """
        try:
            conn: Any = await self.pool.get_connection()  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RpcError(f"Redis unreachable: {exc}") from exc
        clean = False
        try:
            await conn.send_packed_command(resp.pack(prepared.commands))
            try:
                await conn.read_response()
            except redis.exceptions.NoPermissionError as exc:
                raise permission_denied(str(exc), "searcher") from exc
            except redis.ResponseError as exc:
                raise RemoteSearchError(f"submit refused by Redis: {exc}", "redis_error") from exc
            got = await conn.read_response(timeout=prepared.block_s + READ_GRACE_S)
            if got is None:  # redis.asyncio's timeout: the BRPOP's answer is still to come
                raise SearchTimeout(f"Redis did not answer within {prepared.block_s}s")
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
                await conn.disconnect()
            await self.pool.release(conn)

    async def alive(self) -> bool:
        """Whether some worker's heartbeat says the index is served."""
        client = aioredis.Redis(connection_pool=self.pool)
        try:
            return bool(await client.exists(keys.alive_key(self.index)))
        except redis.exceptions.NoPermissionError as exc:
            raise permission_denied(str(exc), "searcher") from exc

    async def close(self) -> None:
        """Close the pool's connections."""
        await self.pool.disconnect()

    async def __aenter__(self) -> AsyncSearchClient:
        """Use in an async with block; closed on exit."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the pool."""
        await self.close()
