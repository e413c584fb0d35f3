"""The RPC loop on real Redis and FAISS: sequential, merged and asyncio clients, kept sockets."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import redis
from conftest import make_settings
from rpc_support import DIM, vecs, wait_for

from faissq import AsyncSearchClient, SearchClient
from faissq.config import IndexSettings
from faissq.index.engine import Engine
from faissq.rpc.server import RpcServer


def engine() -> Engine:
    """A small IVF-Flat index in this process."""
    eng = Engine(DIM, IndexSettings(family="ivf_flat"), "loop")
    eng.build(vecs(3000, seed=5), np.arange(3000, dtype=np.int64))
    return eng


def test_the_loop_answers_sequential_merged_and_asyncio_searches_exactly(
    redis_url: str, storage_root: Path
) -> None:
    index = f"loop{uuid.uuid4().hex[:8]}"
    settings = make_settings(redis_url, storage_root, [index])
    eng = engine()
    server = RpcServer(settings, index, lambda: eng).start()
    queries = vecs(40, seed=6)
    want = eng.search(queries, 5, nprobe=8)
    try:
        with SearchClient(settings, index) as client:
            wait_for(client.alive, 10, "the loop's heartbeat")
            for i in range(len(queries)):  # sequential: each reply's ack is read behind a pop
                got = client.search(queries[i], 5, nprobe=8)
                np.testing.assert_array_equal(got.ids[0], want.ids[i])

            def one(i: int) -> Any:
                return client.search(queries[i], 5, nprobe=8)

            with ThreadPoolExecutor(8) as pool:
                merged = list(pool.map(one, range(len(queries))))
            for i, got in enumerate(merged):
                np.testing.assert_array_equal(got.ids[0], want.ids[i])

            async def run() -> list[Any]:
                async with AsyncSearchClient(settings, index) as aclient:
                    return await asyncio.gather(*(aclient.search(q, 5, nprobe=8) for q in queries))

            for i, got in enumerate(asyncio.run(run())):
                np.testing.assert_array_equal(got.ids[0], want.ids[i])
        stats = server.stats.snapshot()
        assert stats["answered"] >= len(queries) and stats["loop_errors"] == 0
    finally:
        server.stop()


def test_a_kept_connection_that_redis_closed_is_replaced_before_the_next_search(
    redis_url: str, storage_root: Path
) -> None:
    index = f"kept{uuid.uuid4().hex[:8]}"
    settings = make_settings(redis_url, storage_root, [index])
    eng = engine()
    server = RpcServer(settings, index, lambda: eng).start()
    q = vecs(1, seed=7)
    try:
        with SearchClient(settings, index) as client:
            wait_for(client.alive, 10, "the loop's heartbeat")
            want = client.search(q, 5, nprobe=8).ids
            (conn,) = client._idle  # the client keeps the connection of its last search
            conn.send_command("CLIENT", "ID")
            killed = conn.read_response()
            redis.Redis.from_url(redis_url).execute_command("CLIENT", "KILL", "ID", killed)
            got = client.search(q, 5, nprobe=8)  # no error: the dead socket is seen and replaced
            np.testing.assert_array_equal(got.ids, want)
            (again,) = client._idle
            again.send_command("CLIENT", "ID")
            assert again.read_response() != killed
    finally:
        server.stop()
