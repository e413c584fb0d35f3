"""Range search, paging, fetch by id and min_seq over the RPC, against one real worker."""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
from conftest import WorkerProcess, make_settings
from rpc_support import DIM, TIMEOUT, push_and_wait, raw_request, vecs

from faissq import AsyncSearchClient, SearchClient, Settings, StaleRead
from faissq.errors import (
    DimensionMismatch,
    InvalidIds,
    InvalidParameter,
    InvalidVectors,
    PayloadTooLarge,
)
from faissq.index.engine import Engine
from faissq.storage.durable import DurableStore
from faissq.tasks.producer import JobClient

N = 3000
MAX_CANDIDATES = 4096  # small, so a range search over everything is truncated
MAX_FETCH = 50


@dataclass
class Served:
    """One worker serving `index` (IVF primary + delta + tombstones) and the same state here."""

    worker: WorkerProcess
    settings: Settings
    index: str
    engine: Engine
    client: SearchClient
    jobs: JobClient
    redis: redis.Redis


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Start a worker, build through jobs (build, upsert, delete), recover the state here."""
    root = tmp_path_factory.mktemp("query-storage")
    index = f"q{uuid.uuid4().hex[:8]}"
    env = {
        "FAISSQ_RPC__MAX_CANDIDATES": str(MAX_CANDIDATES),
        "FAISSQ_RPC__MAX_FETCH_IDS": str(MAX_FETCH),
    }
    worker = WorkerProcess(redis_url, root, [index], tmp_path_factory.mktemp("logs"), env)
    worker.start()
    settings = make_settings(redis_url, root, [index])
    jobs = JobClient(settings)
    jobs.build(index, vecs(N), family="ivf_flat").get(timeout=TIMEOUT)
    jobs.upsert(index, np.arange(N, N + 100), vecs(100, seed=1)).get(timeout=TIMEOUT)
    jobs.delete(index, np.arange(0, N, 7)).get(timeout=TIMEOUT)
    engine = DurableStore(settings).recover(index).engine
    assert engine is not None
    client = SearchClient(settings, index)
    r = redis.Redis.from_url(redis_url)
    yield Served(worker, settings, index, engine, client, jobs, r)
    r.close()
    client.close()
    jobs.close()
    worker.stop(timeout_s=10)
    worker.app.close()


def raw_error(s: Served, **fields: Any) -> str:
    """The error code a hand-written request gets (fields override or, as None, drop)."""
    reply, msg = raw_request(s.index, **fields)
    msg = {name: value for name, value in msg.items() if value is not None}
    got = push_and_wait(s.redis, s.index, msgpack.packb(msg, use_bin_type=True), reply)
    assert got["ok"] is False, got
    code: str = got["error"]["code"]
    return code


# -- 1. range search ---------------------------------------------------------------------


def test_range_search_matches_the_engine_sync_and_async(served: Served) -> None:
    q = vecs(3, seed=5)
    radius = 0.5
    want_s, want_i = served.engine.range_search(q, radius, nprobe=64)
    got = served.client.range_search(q, radius, nprobe=64)
    assert not got.truncated and got.lims.tolist() == [0, *np.cumsum([len(w) for w in want_i])]
    assert sum(len(w) for w in want_i) > 0, "the radius must catch something"
    for row in range(3):
        scores, ids = got.row(row)
        assert ids.tolist() == want_i[row].tolist()
        np.testing.assert_allclose(scores, want_s[row], rtol=1e-5)
        assert (scores > radius).all() and not np.isin(ids, np.arange(0, N, 7)).any()
    assert got.version == served.engine.version

    async def run() -> Any:
        async with AsyncSearchClient(served.settings, served.index) as aio:
            return await aio.range_search(q, radius, nprobe=64)

    assert_same = asyncio.run(run())
    assert assert_same.ids.tolist() == got.ids.tolist()
    assert assert_same.lims.tolist() == got.lims.tolist()


def test_range_search_keeps_each_querys_best_up_to_the_cap(served: Served) -> None:
    q = vecs(2, seed=6)
    got = served.client.range_search(q, -2.0, nprobe=64)  # cosine: every live vector is > -2
    per_query = MAX_CANDIDATES // 2
    assert got.truncated and got.lims.tolist() == [0, per_query, 2 * per_query]
    want = served.engine.search(q, 1024, nprobe=64)
    for row in range(2):
        scores, ids = got.row(row)
        # the best 1024 are the top-k (equal scores may swap places between the two paths)
        np.testing.assert_allclose(scores[:1024], want.scores[row], atol=1e-5)
        assert len(set(ids[:1024].tolist()) ^ set(want.ids[row].tolist())) <= 4
        assert (np.diff(scores) <= 1e-6).all()


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"k": None, "radius": math.nan}, "invalid_parameter"),
        ({"k": None, "radius": math.inf}, "invalid_parameter"),
        ({"k": None, "radius": "0.5"}, "invalid_parameter"),
        ({"k": None, "radius": True}, "invalid_parameter"),
        ({"radius": 0.5}, "invalid_parameter"),  # k and radius
        ({"k": None, "radius": 0.5, "ef_search": 16}, "invalid_parameter"),
        ({"k": None, "radius": 0.5, "nprobe": 1 << 40}, "invalid_parameter"),
        ({"k": None, "radius": 0.5, "offset": 2}, "invalid_parameter"),
        ({"k": None, "radius": 0.5, "op": "scan"}, "invalid_parameter"),
        (
            {
                "k": None,
                "radius": 0.5,
                "queries": {
                    "dtype": "<f4",
                    "shape": [1, DIM],
                    "data": np.full(DIM, np.nan, "<f4").tobytes(),
                },
            },
            "invalid_vectors",
        ),
        (
            {
                "k": None,
                "radius": 0.5,
                "queries": {"dtype": "<f4", "shape": [1, 3], "data": np.ones(3, "<f4").tobytes()},
            },
            "dimension_mismatch",
        ),
        (
            {
                "k": None,
                "radius": 0.5,
                "queries": {
                    "dtype": "<f4",
                    "shape": [MAX_CANDIDATES + 1, 1],
                    "data": np.ones(MAX_CANDIDATES + 1, "<f4").tobytes(),
                },
            },
            "payload_too_large",
        ),
    ],
)
def test_bad_range_requests_get_typed_codes(
    served: Served, fields: dict[str, Any], code: str
) -> None:
    assert raw_error(served, **fields) == code


def test_bad_range_arguments_raise_typed_errors(served: Served) -> None:
    with pytest.raises(InvalidParameter):
        served.client.range_search(vecs(1), float("nan"))
    with pytest.raises(DimensionMismatch):
        served.client.range_search(vecs(1, dim=DIM + 1), 0.5)
    with pytest.raises(InvalidVectors):
        served.client.range_search(np.full((1, DIM), np.inf, np.float32), 0.5)


# -- 2. paging ---------------------------------------------------------------------------


def test_offset_pages_through_the_ranking_sync_and_async(served: Served) -> None:
    q = vecs(4, seed=7)
    full = served.client.search(q, 30, nprobe=64)
    page = served.client.search(q, 10, nprobe=64, offset=10)
    assert page.ids.shape == (4, 10)
    assert page.ids.tolist() == full.ids[:, 10:20].tolist()
    np.testing.assert_allclose(page.scores, full.scores[:, 10:20], rtol=1e-6)

    async def run() -> list[Any]:
        async with AsyncSearchClient(served.settings, served.index) as aio:
            # concurrent: merged only with equal offsets, split back by rows
            return list(await asyncio.gather(*(
                aio.search(q[i : i + 1], 10, nprobe=64, offset=10 * (i % 3)) for i in range(4)
            )))  # fmt: skip

    for i, got in enumerate(asyncio.run(run())):
        o = 10 * (i % 3)
        assert got.ids[0].tolist() == full.ids[i, o : o + 10].tolist()


@pytest.mark.parametrize("offset", [-1, 1 << 63, (1 << 64) - 1, 1015, "3", 1.5, True, [1]])
def test_bad_offsets_are_invalid_parameter(served: Served, offset: Any) -> None:
    assert raw_error(served, k=10, offset=offset) == "invalid_parameter"


def test_offset_counts_in_the_candidates_cap(served: Served) -> None:
    # 1 row x (offset 1000 + k 24) x k_factor 5 > 4096; without the offset it fits
    assert raw_error(served, k=24, offset=1000, k_factor=5) == "payload_too_large"
    with pytest.raises(InvalidParameter):
        served.client.search(vecs(1), 10, offset=1015)


# -- 3. fetch by id ----------------------------------------------------------------------


def test_fetch_returns_live_vectors_and_names_the_missing(served: Served) -> None:
    asked = np.array([1, 7, N + 3, 14, 10**12, 2, N + 99], dtype=np.int64)  # 7, 14: deleted
    got = served.client.fetch(asked)
    live = asked[served.engine.contains(asked)]
    assert got.ids.tolist() == live.tolist() == [1, N + 3, 2, N + 99]
    assert got.missing.tolist() == [7, 14, 10**12]
    _, want = served.engine.state.vectors_of(live)
    np.testing.assert_array_equal(got.vectors, want)
    assert got.vectors.shape == (4, DIM) and got.version == served.engine.version
    assert got.attributes == {}  # the index declares no attribute fields

    async def run() -> Any:
        async with AsyncSearchClient(served.settings, served.index) as aio:
            return await aio.fetch(asked)

    again = asyncio.run(run())
    np.testing.assert_array_equal(again.vectors, got.vectors)


def fetch_frame(ids: Any, dtype: str = "<i8") -> dict[str, Any]:
    """An ids frame written by hand."""
    arr = np.asarray(ids, dtype=dtype)
    return {"dtype": dtype, "shape": list(arr.shape), "data": arr.tobytes()}


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"ids": fetch_frame(range(MAX_FETCH + 1))}, "payload_too_large"),
        ({"ids": fetch_frame([1, -1])}, "invalid_ids"),
        ({"ids": fetch_frame([])}, "invalid_ids"),
        ({"ids": fetch_frame([1.0], "<f4")}, "invalid_ids"),
        ({"ids": fetch_frame([[1]])}, "invalid_ids"),
        ({"ids": [1, 2]}, "invalid_ids"),
        ({"ids": {"dtype": "<i8", "shape": [1 << 40], "data": b""}}, "payload_too_large"),
        ({}, "invalid_parameter"),  # no ids
        ({"ids": fetch_frame([1]), "k": 3}, "invalid_parameter"),
        ({"ids": fetch_frame([1]), "deadline": "soon"}, "invalid_parameter"),
    ],
)
def test_bad_fetch_requests_get_typed_codes(
    served: Served, fields: dict[str, Any], code: str
) -> None:
    base: dict[str, Any] = {"op": "fetch", "k": None, "queries": None}
    assert raw_error(served, **{**base, **fields}) == code


def test_bad_fetch_arguments_raise_typed_errors(served: Served) -> None:
    with pytest.raises(PayloadTooLarge):
        served.client.fetch(np.arange(MAX_FETCH + 1))
    with pytest.raises(InvalidIds):
        served.client.fetch([-5])


# -- 4. read your writes -----------------------------------------------------------------


def test_min_seq_waits_for_the_write_and_others_are_not_held_up(served: Served) -> None:
    fresh = vecs(1, seed=99)
    now = served.client.search(fresh, 1)
    assert now.version is not None
    got: dict[str, Any] = {}

    def waiting() -> None:
        got["reply"] = served.client.search(fresh, 1, min_seq=now.version + 1, timeout=20)

    t = threading.Thread(target=waiting)
    t.start()
    # the held request leaves the loop free: another search and a fetch are answered meanwhile
    assert served.client.search(fresh, 1).version == now.version
    assert served.client.fetch([1]).ids.tolist() == [1]
    assert t.is_alive(), "the min_seq search answered before its seq existed"
    up = served.jobs.upsert(served.index, [10**9], fresh).get(timeout=TIMEOUT)
    t.join(TIMEOUT)
    reply = got["reply"]
    assert up["seq"] == now.version + 1
    assert reply.version >= up["seq"] and reply.ids[0, 0] == 10**9
    assert served.client.fetch([10**9], min_seq=up["seq"]).ids.tolist() == [10**9]


def test_min_seq_not_reached_is_stale(served: Served) -> None:
    ahead = (served.client.search(vecs(1), 1).version or 0) + 1000
    t0 = time.monotonic()
    with pytest.raises(StaleRead):
        served.client.search(vecs(1), 1, min_seq=ahead, timeout=0.6)
    assert time.monotonic() - t0 >= 0.5, "stale must come at the deadline, not before"
    with pytest.raises(StaleRead):
        served.client.range_search(vecs(1), 0.5, min_seq=ahead, timeout=0.3)
    with pytest.raises(StaleRead):
        served.client.fetch([1], min_seq=ahead, timeout=0.3)


@pytest.mark.parametrize("min_seq", [-1, 1 << 63, (1 << 64) - 1, "1", 1.0, True])
def test_bad_min_seq_is_invalid_parameter(served: Served, min_seq: Any) -> None:
    assert raw_error(served, min_seq=min_seq) == "invalid_parameter"
