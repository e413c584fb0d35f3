"""Searches over the RPC queue against one real `faissq worker`, real Redis and real FAISS."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
from conftest import WorkerProcess, make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpc_support import DIM, TIMEOUT, push_and_wait, raw_request, rpc_stats, vecs, wait_for

from faissq import (
    AsyncSearchClient,
    DimensionMismatch,
    InvalidParameter,
    InvalidVectors,
    NoWorkerAlive,
    SearchClient,
    Settings,
)
from faissq.errors import PayloadTooLarge
from faissq.index.engine import Engine
from faissq.storage.durable import DurableStore
from faissq.tasks.producer import JobClient

N = 4000


@dataclass
class Served:
    """One worker serving `index` (IVF primary + delta + tombstones) and `churn`."""

    worker: WorkerProcess
    settings: Settings
    index: str
    churn: str
    engine: Engine
    client: SearchClient
    jobs: JobClient


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Start a worker, build both indexes through jobs, load the same state in this process."""
    root = tmp_path_factory.mktemp("rpc-storage")
    index, churn = f"r{uuid.uuid4().hex[:8]}", f"c{uuid.uuid4().hex[:8]}"
    env = {"FAISSQ_RPC__HEARTBEAT_TTL_S": "1.5", "FAISSQ_RPC__MAX_ALLOW_IDS": "1000"}
    worker = WorkerProcess(redis_url, root, [index, churn], tmp_path_factory.mktemp("logs"), env)
    worker.start()
    settings = make_settings(redis_url, root, [index, churn])
    jobs = JobClient(settings)
    jobs.build(index, vecs(N), family="ivf_flat").get(timeout=TIMEOUT)
    jobs.upsert(index, np.arange(N, N + 200), vecs(200, seed=1)).get(timeout=TIMEOUT)
    jobs.delete(index, np.arange(0, N, 7)).get(timeout=TIMEOUT)
    jobs.build(churn, vecs(20_000, seed=2), family="ivf_flat").get(timeout=TIMEOUT)
    engine = DurableStore(settings).recover(index).engine  # snapshot + the same log
    assert engine is not None
    client = SearchClient(settings, index)
    yield Served(worker, settings, index, churn, engine, client, jobs)
    client.close()
    jobs.close()
    worker.stop(timeout_s=10)
    worker.app.close()


PARAMS: list[dict[str, Any]] = [
    {},
    {"nprobe": 1},
    {"nprobe": 64},
    {"nprobe": 4, "allow_ids": np.arange(0, N + 200, 5)},
    {"deny_ids": np.arange(0, 1000)},
    {"target_recall": 0.5},
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: ",".join(p) or "defaults")
def test_rpc_results_equal_in_process_engine_results(
    served: Served, params: dict[str, Any]
) -> None:
    queries = vecs(6, seed=11)
    for k, rows in ((10, queries), (1, queries[:1]), (50, queries[:3])):
        got = served.client.search(rows, k, **params)
        want = served.engine.search(rows, k, **params)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
        assert got.ids.shape == (len(rows), k) and got.version is not None


def test_concurrent_clients_are_batched_and_still_exact(served: Served) -> None:
    queries = vecs(160, seed=12)
    want = served.engine.search(queries, 5, nprobe=8)

    def one(i: int) -> tuple[int, Any]:
        return i, served.client.search(queries[i], 5, nprobe=8)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(len(queries))))
    for i, got in results:
        np.testing.assert_array_equal(got.ids[0], want.ids[i])
        np.testing.assert_allclose(got.scores[0], want.scores[i], rtol=1e-5, atol=1e-6)
    assert max(int(got.timings["batch"]) for _, got in results) >= 1


def test_one_clients_concurrent_searches_merge_and_a_bad_one_fails_alone(served: Served) -> None:
    queries = vecs(64, seed=21)
    want = served.engine.search(queries, 5)
    bad = 17

    def one(i: int) -> Any:
        q = np.full((1, DIM), np.nan, np.float32) if i == bad else queries[i : i + 1]
        try:
            return served.client.search(q, 5)
        except InvalidVectors as exc:
            return exc

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(len(queries))))
    assert isinstance(results[bad], InvalidVectors)
    good = [(i, r) for i, r in enumerate(results) if i != bad]
    for i, got in good:
        np.testing.assert_array_equal(got.ids[0], want.ids[i])
    assert max(int(got.timings.get("merged", 1)) for _, got in good) > 1  # shared round trips


def test_async_client_gives_the_same_answers(served: Served) -> None:
    queries = vecs(32, seed=13)
    want = served.engine.search(queries, 4)

    async def run() -> list[Any]:
        async with AsyncSearchClient(served.settings, served.index) as client:
            assert await client.alive()
            return await asyncio.gather(*(client.search(q, 4) for q in queries))

    for i, got in enumerate(asyncio.run(run())):
        np.testing.assert_array_equal(got.ids[0], want.ids[i])


def test_bad_searches_raise_typed_errors(served: Served) -> None:
    c = served.client
    q = vecs(1, seed=3)
    with pytest.raises(DimensionMismatch):
        c.search(np.ones((1, DIM + 1)), 3)
    with pytest.raises(InvalidParameter):
        c.search(q, 0)
    with pytest.raises(InvalidParameter):
        c.search(q, 3, nprobe=-1)
    with pytest.raises(InvalidVectors):
        c.search(np.full((1, DIM), np.nan), 3)
    with pytest.raises(PayloadTooLarge):
        c.search(q, 3, allow_ids=np.arange(1001))
    with pytest.raises(InvalidParameter):
        c.search(q, 3, timeout=0)
    assert c.search(q, 3).ids.shape == (1, 3)  # and the loop still serves


def test_no_worker_alive_fails_fast(served: Served) -> None:
    client = SearchClient(served.settings, "nobody-serves-this")
    t0 = time.perf_counter()
    with pytest.raises(NoWorkerAlive):
        client.search(vecs(1), 3, timeout=5)
    assert time.perf_counter() - t0 < 1.0
    assert not client.alive() and client.workers() == []
    client.close()


def test_expired_requests_are_answered_with_timeout_and_counted(served: Served) -> None:
    r = redis.Redis.from_url(served.settings.redis.url or "")
    before = sum(s["expired"] for s in rpc_stats(r, served.index))
    reply, msg = raw_request(served.index, deadline=time.time() - 1)
    got = push_and_wait(r, served.index, msgpack.packb(msg), reply)
    assert got["ok"] is False and got["error"]["code"] == "timeout" and got["id"] == msg["id"]
    wait_for(lambda: sum(s["expired"] for s in rpc_stats(r, served.index)) > before, 5,
             "the expired request in the heartbeat counters")  # fmt: skip
    r.close()


SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
ANY = st.recursive(
    SCALARS | st.text(max_size=6) | st.binary(max_size=24),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELD = st.sampled_from(["v", "id", "deadline", "k", "queries", "nprobe", "ef_search", "k_factor",
                         "target_recall", "allow_ids", "deny_ids", "sent", "junk"])  # fmt: skip
CODES = {"invalid_parameter", "invalid_vectors", "dimension_mismatch", "invalid_ids",
         "payload_too_large", "timeout"}  # fmt: skip


def test_malformed_requests_get_error_replies_or_counted_drops(served: Served) -> None:
    """Raw hypothesis-made messages: garbage is dropped and counted, the rest answered typed."""
    r = redis.Redis.from_url(served.settings.redis.url or "")
    index = served.index
    dropped_before = sum(s["dropped"] for s in rpc_stats(r, index))
    unreadable = [0]

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.one_of(
            st.binary(max_size=48).map(lambda b: ("garbage", b)),
            st.dictionaries(st.text(max_size=6), ANY, max_size=5).map(lambda d: ("no-reply", d)),
            st.tuples(FIELD, ANY).map(lambda kv: ("field", kv)),
            st.tuples(FIELD).map(lambda f: ("missing", f[0])),
        )
    )
    def check(case: tuple[str, Any]) -> None:
        kind, value = case
        if kind == "garbage":
            value = b"\xc1" + value  # 0xc1 is never valid msgpack
            unreadable[0] += 1
            push_and_wait(r, index, value, None)
            return
        if kind == "no-reply":
            unreadable[0] += 1
            push_and_wait(r, index, msgpack.packb(value), None)
            return
        reply, msg = raw_request(index)
        if kind == "field":
            msg[value[0]] = value[1]
        else:
            msg.pop(value, None)
        got = push_and_wait(r, index, msgpack.packb(msg), reply)
        if not got["ok"]:
            assert got["error"]["code"] in CODES, got
            assert isinstance(got["error"]["message"], str)

    check()
    assert served.client.search(vecs(1), 3).ids.shape == (1, 3)  # the loop survived all of it
    wait_for(
        lambda: sum(s["dropped"] for s in rpc_stats(r, index)) >= dropped_before + unreadable[0],
        5,
        "every unreadable message counted as dropped",
    )
    assert sum(s["loop_errors"] for s in rpc_stats(r, index)) == 0
    r.close()


def test_searches_keep_flowing_during_build_merge_rebuild_reload(served: Served) -> None:
    """A client searching in a loop sees no error and no empty result while the index churns."""
    client = SearchClient(served.settings, served.churn)
    stop = threading.Event()
    seen: dict[str, Any] = {"n": 0, "errors": [], "versions": set()}
    q = vecs(2, seed=5)

    def search_loop() -> None:
        while not stop.is_set():
            try:
                got = client.search(q, 10, timeout=5)
            except Exception as exc:
                seen["errors"].append(repr(exc))
                continue
            if (got.ids < 0).any():
                seen["errors"].append(f"empty slots in {got.ids.tolist()}")
            seen["n"] += 1
            seen["versions"].add(got.version)

    thread = threading.Thread(target=search_loop)
    thread.start()
    jobs, churn = served.jobs, served.churn
    try:
        jobs.upsert(churn, np.arange(30_000, 31_000), vecs(1000, seed=6)).get(timeout=TIMEOUT)
        jobs.merge(churn).get(timeout=TIMEOUT)
        jobs.delete(churn, np.arange(0, 500)).get(timeout=TIMEOUT)
        jobs.rebuild(churn).get(timeout=TIMEOUT)
        jobs.build(churn, vecs(20_000, seed=7), family="ivf_flat").get(timeout=TIMEOUT)
        jobs.save(churn).get(timeout=TIMEOUT)
        jobs.reload(churn).get(timeout=TIMEOUT)
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join(10)
        client.close()
    assert seen["errors"] == []
    assert seen["n"] > 20 and len(seen["versions"]) >= 3
