"""The search path against hostile input and stalls: real `faissq worker`, Redis and FAISS.

Malformed shapes in a busy turn, work caps, parameter fallbacks, oversized requests, a Redis
stall under the asyncio and threaded clients.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
from conftest import WorkerProcess, make_settings
from rpc_fuzz import DOCUMENTED, Case, Fuzzer
from rpc_support import DIM, TIMEOUT, push_and_wait, raw_request, rpc_stats, vecs, wait_for

from faissq import AsyncSearchClient, InvalidParameter, SearchClient, SearchTimeout, Settings, keys
from faissq.config import IndexSettings
from faissq.errors import PayloadTooLarge
from faissq.index.engine import Engine
from faissq.rpc import replies
from faissq.rpc.server import RpcServer
from faissq.storage.durable import DurableStore
from faissq.tasks.producer import JobClient
from faissq.worker.embedded_redis import EmbeddedRedis

N = 4000


@dataclass
class Served:
    """One worker serving `index` (IVF-Flat), the same state loaded in this process."""

    worker: WorkerProcess
    settings: Settings
    index: str
    engine: Engine
    client: SearchClient
    redis: redis.Redis


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Start a worker, build the index through a job, load the same state in this process."""
    root = tmp_path_factory.mktemp("hardening-storage")
    index = f"h{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(redis_url, root, [index], tmp_path_factory.mktemp("logs"))
    worker.start()
    settings = make_settings(redis_url, root, [index])
    jobs = JobClient(settings)
    jobs.build(index, vecs(N), family="ivf_flat").get(timeout=TIMEOUT)
    jobs.close()
    engine = DurableStore(settings).recover(index).engine
    assert engine is not None
    client = SearchClient(settings, index)
    r = redis.Redis.from_url(redis_url)
    yield Served(worker, settings, index, engine, client, r)
    client.close()
    r.close()
    worker.stop(timeout_s=10)
    worker.app.close()


def frame(shape: list[int], data: bytes = b"") -> dict[str, Any]:
    """A queries frame with any shape and data."""
    return {"dtype": "<f4", "shape": shape, "data": data}


def push_all(r: redis.Redis, index: str, msgs: list[bytes]) -> None:
    """One LPUSH of every message, oldest first: a worker blocked on the list pops them at once."""
    r.lpush(f"faissq:{{{index}}}:rpc", *msgs)


def replies_of(r: redis.Redis, keys: list[str], timeout_s: float = 10) -> list[dict[str, Any]]:
    """BRPOP each reply key in turn and decode its reply."""
    out = []
    for key in keys:
        got = r.brpop([key], timeout=timeout_s)
        assert got is not None, f"no reply on {key}"
        out.append(msgpack.unpackb(got[1], raw=False))
    return out


# -- 1. one malformed message costs only its own answer -----------------------------------------


@pytest.mark.parametrize("shape", [[2**62, 0], [0, 2**62], [2**64 - 1, 0]])
def test_an_unbuildable_shape_in_a_busy_turn_spares_the_others(
    served: Served, shape: list[int]
) -> None:
    r, index = served.redis, served.index
    queries = vecs(4, seed=40)
    want = served.engine.search(queries, 5)
    keys_, msgs = [], []
    for i in range(4):
        key, msg = raw_request(index, k=5, queries=frame([1, DIM], queries[i].tobytes()))
        keys_.append(key)
        msgs.append(msgpack.packb(msg))
        if i == 1:  # the bad one sits between valid ones of the same turn
            key, msg = raw_request(index, queries=frame(shape))
            keys_.append(key)
            msgs.append(msgpack.packb(msg))
    answered_before = sum(s["answered"] for s in rpc_stats(r, index))
    push_all(r, index, msgs)
    got = replies_of(r, keys_)
    bad = got.pop(2)
    assert bad["ok"] is False and bad["error"]["code"] == "invalid_vectors", bad
    for i, reply in enumerate(got):
        assert reply["ok"], reply
        ids = np.frombuffer(reply["ids"]["data"], "<i8")
        np.testing.assert_array_equal(ids, want.ids[i])
    wait_for(
        lambda: sum(s["answered"] for s in rpc_stats(r, index)) >= answered_before + 4,
        10,
        "the turn's answers in the heartbeat counters",
    )


# -- 2. work caps, checked before anything is allocated ---------------------------------------


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"k_factor": 2**62}, InvalidParameter),
        ({"k_factor": 2000}, InvalidParameter),
        ({"k_factor": 33}, InvalidParameter),
        ({"ef_search": 4097}, InvalidParameter),
        ({"ef_search": 2**63 - 1}, InvalidParameter),
        ({"nprobe": 2049}, InvalidParameter),
    ],
    ids=lambda p: str(p),
)
def test_parameters_over_their_caps_are_refused(
    served: Served, params: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error, match=r"must be in \[1, "):
        served.client.search(vecs(1, seed=41), 1024, **params)


def test_rows_times_k_times_k_factor_over_the_cap_is_payload_too_large(served: Served) -> None:
    q = vecs(2000, seed=42)
    with pytest.raises(PayloadTooLarge, match="candidates"):
        served.client.search(q, 1024, k_factor=8)  # the 7.8 GiB request of the report
    with pytest.raises(PayloadTooLarge, match="k_factor 4 ="):  # the index's k_factor counts
        served.client.search(q[:65], 1024)
    got = served.client.search(q[:64], 1024, k_factor=4)  # exactly at the cap: served
    assert got.ids.shape == (64, 1024)


def test_a_turn_of_requests_each_within_the_cap_is_answered_in_bounded_calls(
    served: Served,
) -> None:
    r, index = served.redis, served.index
    queries = vecs(48, seed=43)
    want = served.engine.search(queries, 1024, k_factor=4)
    keys_, msgs = [], []
    for i in range(0, 48, 16):  # 3 x 16 rows x 1024 x 4: 3/4 of the cap together, merged
        key, msg = raw_request(
            index, k=1024, k_factor=4, queries=frame([16, DIM], queries[i : i + 16].tobytes())
        )
        keys_.append(key)
        msgs.append(msgpack.packb(msg))
    for i in range(8):  # 8 more of 64 rows: each at the cap alone
        key, msg = raw_request(
            index, k=1024, k_factor=4, queries=frame([64, DIM], vecs(64, seed=i).tobytes())
        )
        keys_.append(key)
        msgs.append(msgpack.packb(msg))
    push_all(r, index, msgs)
    got = replies_of(r, keys_, timeout_s=60)
    assert all(g["ok"] for g in got), [g.get("error") for g in got if not g["ok"]]
    for j, g in enumerate(got[:3]):
        ids = np.frombuffer(g["ids"]["data"], "<i8").reshape(16, 1024)
        np.testing.assert_array_equal(ids, want.ids[16 * j : 16 * (j + 1)])
    assert max(g["timings"]["batch"] for g in got) <= 3  # never more than the cap in one call


def _install_profile(jobs: JobClient, index: str, k_factor: int) -> None:
    """Install, through the autotune job, a profile whose one row is nprobe 16 (the default)
    and `k_factor`: IVF-Flat reads no k_factor, so only the candidates counted change."""
    row = {"nprobe": 16, "k_factor": k_factor, "recall": 0.99, "recall_lo": 0.98,
           "ms_per_query": 0.01}  # fmt: skip
    profile = {"chosen": row, "table": [row], "target_recall": 0.95, "k": 10, "param": "nprobe"}
    jobs.send("faissq.autotune", index, profile=profile).get(timeout=TIMEOUT)


def test_the_autotuned_k_factor_counts_against_the_candidates_cap(served: Served) -> None:
    q = vecs(64, seed=45)
    jobs = JobClient(served.settings)
    try:
        _install_profile(jobs, served.index, 8)
        with pytest.raises(PayloadTooLarge, match="k_factor 8 ="):  # x 4 passed the decoder
            served.client.search(q, 1024)
        assert served.client.search(q[:32], 1024).ids.shape == (32, 1024)
    finally:
        _install_profile(jobs, served.index, 1)  # the index's 4 counts again, as before
        jobs.close()
    assert served.client.search(q, 1024).ids.shape == (64, 1024)  # exactly the cap at 4


# -- 3. every parameter not given falls back on its own ---------------------------------------


@pytest.mark.parametrize("named", [{"k_factor": 4}, {"k_factor": 1}, {"ef_search": 64}])
def test_naming_one_parameter_keeps_the_default_nprobe(
    served: Served, named: dict[str, Any]
) -> None:
    queries = vecs(20, seed=44)
    default = served.engine.search(queries, 10)  # nprobe = index.default_nprobe (16)
    got = served.client.search(queries, 10, **named)
    np.testing.assert_array_equal(got.ids, default.ids)
    probe_1 = served.engine.search(queries, 10, nprobe=1)
    assert not np.array_equal(probe_1.ids, default.ids)  # so the test tells the two apart


# -- 4. an oversized request with a readable reply key is answered --------------------------


@pytest.mark.parametrize("reply_first", [True, False])
def test_an_oversized_request_gets_payload_too_large(served: Served, reply_first: bool) -> None:
    r, index = served.redis, served.index
    dropped_before = sum(s["dropped"] for s in rpc_stats(r, index))
    key, msg = raw_request(index)
    pad = {"junk": b"\0" * (9 << 20)}  # past worker.inline_max_bytes (8 MiB)
    msg = {**msg, **pad} if reply_first else {**pad, **msg}
    got = push_and_wait(r, index, msgpack.packb(msg), key)
    assert got["ok"] is False and got["error"]["code"] == "payload_too_large", got["error"]
    assert got["id"] == msg["id"]
    no_key = {k: v for k, v in msg.items() if k != "reply"}  # nothing to answer on: counted
    r.lpush(f"faissq:{{{index}}}:rpc", msgpack.packb(no_key))
    wait_for(
        lambda: sum(s["dropped"] for s in rpc_stats(r, index)) > dropped_before,
        10,
        "the oversized message without a reply key counted as dropped",
    )
    assert served.client.search(vecs(1), 3).ids.shape == (1, 3)


# -- 5. a Redis stall longer than a search's timeout + 1 s -----------------------------------


# Redis runs nothing else while a script runs: this one keeps it busy for ARGV[1] milliseconds
BUSY_SCRIPT = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > ARGV[1] * 1000
return 1
"""
STALL_MS = 3000  # longer than the search's timeout (0.5 s) + the client's read grace (1 s)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test alone: its stalls harm no other test's worker."""
    server = EmbeddedRedis(tmp_path / "redis", unix_socket=False, persistent=False)
    server.start()
    yield server
    server.stop()


def stall_once_submitted(url: str, index: str) -> threading.Thread:
    """Stall Redis as soon as a request reaches the list: its submit is answered, its BRPOP is not.

    The request is taken off the list (no worker runs yet), so the answer the client's BRPOP
    still owes is a late nil.
    """

    def run() -> None:
        r = redis.Redis.from_url(url)
        assert r.brpop([keys.rpc_queue(index)], timeout=30) is not None
        r.eval(BUSY_SCRIPT, 0, STALL_MS)
        r.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def small_engine() -> Engine:
    """A small IVF-Flat index in this process."""
    eng = Engine(DIM, IndexSettings(family="ivf_flat"), "stall")
    eng.build(vecs(2000, seed=45), np.arange(2000, dtype=np.int64))
    return eng


@pytest.mark.parametrize("kind", ["asyncio", "threads"])
def test_after_a_stall_no_client_reads_an_answer_meant_for_another_search(
    own_redis: EmbeddedRedis, storage_root: Path, kind: str
) -> None:
    index = f"stall{uuid.uuid4().hex[:6]}"
    settings = make_settings(own_redis.url, storage_root, [index])
    eng = small_engine()
    queries = vecs(30, seed=46)
    want = eng.search(queries, 5)
    r = redis.Redis.from_url(own_redis.url)
    r.set(keys.alive_key(index), 100, px=60_000)  # a worker seems alive: the submit goes through
    server = RpcServer(settings, index, lambda: eng)

    def then_serve() -> None:
        server.start()
        wait_for(lambda: r.exists(keys.heartbeat_pattern(index).replace("*", server.worker_id)),
                 10, "the loop's heartbeat")  # fmt: skip

    async def run_async() -> list[Any]:
        async with AsyncSearchClient(settings, index) as client:
            stall = stall_once_submitted(own_redis.url, index)
            with pytest.raises(SearchTimeout):
                await client.search(queries[0], 5, timeout=0.5)
            stall.join()
            then_serve()
            return [await client.search(q, 5, timeout=5) for q in queries]

    def run_threads() -> list[Any]:
        with SearchClient(settings, index) as client:
            stall = stall_once_submitted(own_redis.url, index)
            with pytest.raises(SearchTimeout):
                client.search(queries[0], 5, timeout=0.5)
            stall.join()
            then_serve()
            return [client.search(q, 5, timeout=5) for q in queries]

    try:
        got_all = asyncio.run(run_async()) if kind == "asyncio" else run_threads()
        for i, got in enumerate(got_all):
            np.testing.assert_array_equal(got.ids[0], want.ids[i])
    finally:
        server.stop()
        r.close()


def test_a_reply_for_another_request_on_the_reply_key_is_refused(served: Served) -> None:
    """The reply's id is checked against the request's, not only its key."""
    prepared = served.client.builder.prepare(vecs(1), 3, 5.0, {})
    stranger = replies.encode_error("someone-else", "timeout", "not yours")
    with pytest.raises(Exception, match="answers another request"):
        served.client.builder.response([prepared.reply.encode(), stranger], prepared)


# -- the fuzz run: malformed messages interleaved with valid searches ------------------------

FUZZ_MESSAGES = 10_000
VALID_EVERY = 40  # one valid search among this many messages


def test_ten_thousand_malformed_messages_interleaved_with_valid_searches(served: Served) -> None:
    r, index = served.redis, served.index
    pid = served.worker.proc.pid if served.worker.proc else None
    fuzz = Fuzzer(index, DIM, seed=20261207)
    queries = vecs(FUZZ_MESSAGES // VALID_EVERY + 1, seed=47)
    want = served.engine.search(queries, 5, nprobe=8)
    cases: list[Case] = []
    valid: dict[str, int] = {}  # reply key -> query row
    for i in range(FUZZ_MESSAGES):
        cases.append(fuzz.next())
        if i % VALID_EVERY == 0:
            row = len(valid)
            reply, msg = fuzz.request(
                nprobe=8,
                queries={"dtype": "<f4", "shape": [1, DIM], "data": queries[row].tobytes()},
            )
            valid[reply] = row
            cases.append(Case(msgpack.packb(msg), reply, None))
    queue = f"faissq:{{{index}}}:rpc"
    for start in range(0, len(cases), 500):
        r.lpush(queue, *(c.raw for c in cases[start : start + 500]))
    sentinel, msg = fuzz.request()  # answered after every message pushed before it
    r.lpush(queue, msgpack.packb(msg))
    done = r.brpop([sentinel], timeout=120)  # the event; the bound only ends a broken run
    assert done is not None and msgpack.unpackb(done[1], raw=False)["ok"], done

    answered = [c for c in cases if c.reply is not None]
    counts: dict[str, int] = {}
    pipe = r.pipeline(transaction=False)
    for c in answered:
        pipe.lrange(c.reply, 0, -1)
        pipe.delete(c.reply)
    lists = pipe.execute()[::2]
    for c, items in zip(answered, lists, strict=True):
        assert len(items) == 1, (c.reply, len(items))  # exactly once
        reply = msgpack.unpackb(items[0], raw=False)
        if c.reply in valid:
            assert reply["ok"], reply
            ids = np.frombuffer(reply["ids"]["data"], "<i8")
            np.testing.assert_array_equal(ids, want.ids[valid[c.reply]])
            continue
        assert reply["ok"] is False, (c.code, reply)
        code = reply["error"]["code"]
        assert code in DOCUMENTED, reply
        assert c.code is None or code == c.code, (c.code, reply["error"])
        counts[code] = counts.get(code, 0) + 1
    assert len(answered) - len(valid) + sum(1 for c in cases if c.reply is None) >= FUZZ_MESSAGES
    assert "internal" not in counts
    assert served.worker.alive() and served.worker.proc is not None
    assert served.worker.proc.pid == pid and served.worker.starts == 1  # same process throughout
    stats = rpc_stats(r, index)
    assert stats and sum(s["loop_errors"] for s in stats) == 0
    assert [k for k in r.scan_iter(match=f"faissq:{{{index}}}:reply:*")] == []
    print(
        f"fuzz: {len(cases)} messages ({len(valid)} valid), codes {sorted(counts.items())}, "
        f"dropped {sum(1 for c in cases if c.reply is None)}"
    )
