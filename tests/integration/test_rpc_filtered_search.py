"""Attribute filters over the RPC on real Redis and FAISS: the worker's RPC loop serving an index
with declared fields, searched, range-searched and fetched through the sync and asyncio clients."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
from conftest import make_settings
from rpc_support import DIM, raw_request, vecs, wait_for

from faissq import AsyncSearchClient, SearchClient
from faissq.config import IndexSettings, Settings
from faissq.errors import InvalidFilter
from faissq.index.engine import Engine
from faissq.rpc.server import RpcServer

N = 3000
FILTER_CAP = 256  # bytes of one filter as msgpack
LANGS = ("en", "de", "fr", None)
FILTERS: list[dict[str, Any]] = [
    {"field": "tenant", "lt": 3},
    {"and": [{"field": "lang", "eq": "de"}, {"not": {"field": "tenant", "in": [1, 2, 3]}}]},
    {"or": [{"field": "tenant", "eq": 9}, {"not": {"field": "lang", "in": ["en", "de", "fr"]}}]},
]


@dataclass
class Served:
    """The RPC loop serving `index` from `engine` (IVF, fields tenant and lang, a delta)."""

    settings: Settings
    index: str
    engine: Engine
    server: RpcServer
    client: SearchClient


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    index = f"attr{uuid.uuid4().hex[:8]}"
    settings = make_settings(redis_url, Path(tmp_path_factory.mktemp("attr-storage")), [index])
    settings.rpc.max_filter_bytes = FILTER_CAP
    eng = Engine(DIM, IndexSettings(family="ivf_flat", attributes={"tenant": "int64",
                                                                   "lang": "keyword"}))  # fmt: skip
    eng.build(vecs(N), np.arange(N, dtype=np.int64),
              attributes={"tenant": [i % 10 for i in range(N)],
                          "lang": [LANGS[i % 4] for i in range(N)]})  # fmt: skip
    eng.upsert(np.arange(N, N + 50), vecs(50, seed=1),
               attributes={"tenant": [9] * 50})  # lang left out: null  # fmt: skip
    server = RpcServer(settings, index, lambda: eng).start()
    client = SearchClient(settings, index)
    wait_for(client.alive, 10, "the loop's heartbeat")
    yield Served(settings, index, eng, server, client)
    client.close()
    server.stop()


def test_filtered_search_matches_the_engine_through_sync_and_async_clients(served: Served) -> None:
    q = vecs(6, seed=5)
    eng = served.engine
    for flt in FILTERS:
        got = served.client.search(q, 10, nprobe=8, filter=flt)
        assert got.ids.tolist() == eng.search(q, 10, nprobe=8, filter=flt).ids.tolist(), flt
    flt = FILTERS[2]
    allow = np.arange(N - 100, N + 50)  # the engine intersects: tenant 9 or lang null, and these
    got = served.client.search(q, 10, nprobe=8, filter=flt, allow_ids=allow)
    want = eng.search(q, 10, nprobe=8, filter=flt, allow_ids=allow).ids
    assert got.ids.tolist() == want.tolist() and np.isin(got.ids, [-1, *allow]).all()
    ranged = served.client.range_search(q[:2], 0.3, nprobe=8, filter=flt)
    want_s, want_i = eng.range_search(q[:2], 0.3, nprobe=8, filter=flt)
    assert ranged.ids.tolist() == np.concatenate(want_i).tolist() and ranged.ids.size
    np.testing.assert_allclose(ranged.scores, np.concatenate(want_s), rtol=1e-5)

    async def run() -> list[Any]:
        async with AsyncSearchClient(served.settings, served.index) as aio:
            # concurrent: merged into shared requests only where the filters are equal
            return list(await asyncio.gather(*(
                aio.search(q[i : i + 1], 10, nprobe=8, filter=FILTERS[i % 3]) for i in range(6)
            )))  # fmt: skip

    for i, one in enumerate(asyncio.run(run())):
        want = eng.search(q[i : i + 1], 10, nprobe=8, filter=FILTERS[i % 3]).ids
        assert one.ids.tolist() == want.tolist(), i
    with pytest.raises(InvalidFilter):
        served.client.search(q, 10, filter={"field": "colour", "eq": "red"})


def test_a_bad_filter_fails_only_its_own_request_of_a_turn(served: Served) -> None:
    q = vecs(4, seed=6)
    too_big = {"field": "lang", "in": ["x" * 60] * 5}
    cases: list[tuple[Any, str | None]] = [
        (FILTERS[0], None),
        ({"field": "tenant", "eq": "seven"}, "invalid_filter"),
        (None, None),
        (too_big, "invalid_filter"),  # refused when decoded: over the cap
        ({"eq": 3, "field": "tenant", "x": 1}, "invalid_filter"),
        (FILTERS[0], None),  # shares its engine call with the first
    ]
    msgs = []
    for i, (flt, _) in enumerate(cases):
        query = {"dtype": "<f4", "shape": [1, DIM], "data": q[i % 4 : i % 4 + 1].tobytes()}
        reply, msg = raw_request(served.index, k=5, nprobe=8, queries=query, filter=flt)
        msgs.append((reply, {k: v for k, v in msg.items() if v is not None}))
    r = redis.Redis.from_url(served.settings.redis.url or "")
    # one LPUSH of every request: the loop pops them together, in one turn
    r.lpush(f"faissq:{{{served.index}}}:rpc",
            *[msgpack.packb(m, use_bin_type=True) for _, m in reversed(msgs)])  # fmt: skip
    for i, ((flt, code), (reply, _)) in enumerate(zip(cases, msgs, strict=True)):
        got = r.brpop([reply], timeout=10)
        assert got is not None, i
        answer = msgpack.unpackb(got[1], raw=False)
        if code is not None:
            assert answer["ok"] is False and answer["error"]["code"] == code, (i, answer)
            continue
        ids = np.frombuffer(answer["ids"]["data"], "<i8").reshape(answer["ids"]["shape"])
        want = served.engine.search(q[i % 4 : i % 4 + 1], 5, nprobe=8, filter=flt).ids
        assert ids.tolist() == want.tolist(), i
        # the two FILTERS[0] searches share an engine call; the plain one, same k, does not
        assert answer["timings"]["batch"] == (1 if flt is None else 2), i
    r.close()


def test_fetch_returns_the_attributes_of_the_found_ids(served: Served) -> None:
    asked = np.array([5, 10**9, N + 7, 6], dtype=np.int64)
    got = served.client.fetch(asked)
    assert got.ids.tolist() == [5, N + 7, 6] and got.missing.tolist() == [10**9]
    assert got.attributes == {"tenant": [5, 9, 6], "lang": ["de", None, "fr"]}
    assert got.attributes == served.engine.attributes_of(got.ids)

    async def run() -> Any:
        async with AsyncSearchClient(served.settings, served.index) as aio:
            return await aio.fetch(asked)

    assert asyncio.run(run()).attributes == got.attributes
    (beat,) = served.client.workers()  # a client learns the fields from the heartbeat
    assert beat["engine"]["attributes"] == {"tenant": "int64", "lang": "keyword"}
