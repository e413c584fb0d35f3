"""Client-side merging of concurrent searches: right rows to the right caller, errors isolated."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from faissq import AsyncSearchClient, SearchClient
from faissq.config import RpcSettings, Settings
from faissq.errors import IndexBusy, InvalidVectors, SearchTimeout
from faissq.rpc.aio_coalesce import AsyncCoalescer, Flag
from faissq.rpc.coalesce import Coalescer, Pending, ThreadFlag, merge_key
from faissq.rpc.search_client import SearchResponse

DIM = 4


class Server:
    """A search function standing in for one round trip: answers row r with id = r's tag."""

    def __init__(self, delay_s: float = 0.002) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []  # rows per call
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()
        self.fail_with: BaseException | None = None

    def answer(self, first: Pending, queries: np.ndarray) -> SearchResponse:
        if self.fail_with is not None:
            raise self.fail_with
        if not np.isfinite(queries).all():
            raise InvalidVectors("queries hold NaN or Inf")
        tags = queries[:, :1].astype(np.int64)  # each caller's row carries its tag
        ids = np.repeat(tags, first.k, axis=1)
        return SearchResponse(ids.astype(np.float32), ids, 7, "w", {"batch": 1})

    def __call__(self, first: Pending, queries: np.ndarray, timeout_s: float) -> SearchResponse:
        with self.lock:
            self.calls.append(len(queries))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            return self.answer(first, queries)
        finally:
            with self.lock:
                self.in_flight -= 1

    async def call_async(self, first: Pending, queries: np.ndarray, timeout_s: float) -> Any:
        self.calls.append(len(queries))
        await asyncio.sleep(self.delay_s)
        return self.answer(first, queries)


def query(tag: int) -> np.ndarray:
    return np.full((1, DIM), tag, np.float32)


def search(c: Coalescer, tag: int, k: int = 3, timeout_s: float = 5.0, q: Any = None) -> Any:
    q = query(tag) if q is None else q
    opts = {"nprobe": 4}
    return c.run(c.pending(q, k, opts, merge_key(k, DIM, opts), timeout_s))


async def asearch(c: AsyncCoalescer, tag: int, timeout_s: float = 5.0) -> Any:
    """One asyncio search of `tag`'s row through the coalescer."""
    opts = {"nprobe": 4}
    return await c.run(c.pending(query(tag), 3, opts, merge_key(3, DIM, opts), timeout_s))


def test_concurrent_callers_share_requests_and_each_gets_its_own_rows() -> None:
    server = Server()
    c = Coalescer(server, max_in_flight=2)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda t: (t, search(c, t)), range(200)))
    for tag, res in results:
        assert res.ids.tolist() == [[tag] * 3] and res.version == 7
    assert sum(server.calls) == 200
    assert len(server.calls) < 200 and max(server.calls) > 1  # merged
    assert server.most_in_flight <= 2
    assert max(int(res.timings["merged"]) for _, res in results) > 1


def test_a_lone_caller_is_sent_alone_at_once() -> None:
    server = Server(delay_s=0)
    c = Coalescer(server, max_in_flight=2)
    assert search(c, 5).ids.tolist() == [[5, 5, 5]]
    assert server.calls == [1]


def test_a_bad_query_fails_only_its_own_caller() -> None:
    server = Server()
    c = Coalescer(server, max_in_flight=1)
    nan = np.full((1, DIM), np.nan, np.float32)

    def one(tag: int) -> Any:
        try:
            return search(c, tag, q=nan if tag == 13 else None)
        except InvalidVectors as exc:
            return exc

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    assert isinstance(results[13], InvalidVectors)
    for tag, res in enumerate(results):
        if tag != 13:
            assert res.ids.tolist() == [[tag] * 3]


def test_a_transport_error_reaches_every_member() -> None:
    server = Server()
    server.fail_with = IndexBusy("queue full")
    c = Coalescer(server, max_in_flight=1)

    def one(tag: int) -> Any:
        try:
            return search(c, tag)
        except IndexBusy as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        assert all(isinstance(r, IndexBusy) for r in pool.map(one, range(32)))


def test_different_k_or_filters_never_merge() -> None:
    assert merge_key(3, DIM, {"nprobe": 4}) != merge_key(4, DIM, {"nprobe": 4})
    assert merge_key(3, DIM, {"nprobe": 4}) != merge_key(3, DIM, {"nprobe": 8})
    assert merge_key(3, DIM, {"allow_ids": np.arange(3)}) is None
    assert merge_key(3, DIM, {"deny_ids": np.arange(3)}) is None
    server = Server()
    c = Coalescer(server, max_in_flight=1)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: search(c, t, k=1 + t % 2), range(40)))
    assert [r.ids.shape[1] for r in results] == [1 + t % 2 for t in range(40)]


def test_a_waiting_caller_times_out_and_is_never_sent() -> None:
    gate = threading.Event()
    server = Server(delay_s=0)
    blocking = server.__call__

    def stuck(first: Pending, queries: np.ndarray, timeout_s: float) -> SearchResponse:
        gate.wait(5)
        return blocking(first, queries, timeout_s)

    c = Coalescer(stuck, max_in_flight=1)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(search, c, 1)
        while not c._waiting.leaders:
            time.sleep(0.001)
        with pytest.raises(SearchTimeout):
            search(c, 2, timeout_s=0.05)
        gate.set()
        assert first.result().ids.tolist() == [[1, 1, 1]]
    assert server.calls == [1]  # the timed-out caller's query never went out


def test_asyncio_callers_waiting_past_their_deadlines_time_out_in_deadline_order() -> None:
    server = Server(delay_s=0.5)

    async def run() -> Any:
        c = AsyncCoalescer(server.call_async, max_in_flight=1)
        leader = asyncio.create_task(asearch(c, 1))
        await asyncio.sleep(0.01)  # the only round trip is in flight for 0.5 s
        patient = asyncio.create_task(asearch(c, 2, timeout_s=0.3))
        await asyncio.sleep(0.01)
        hasty = asyncio.create_task(asearch(c, 3, timeout_s=0.05))  # later, but due first
        with pytest.raises(SearchTimeout):
            await hasty
        still_waiting = not patient.done()
        with pytest.raises(SearchTimeout):
            await patient
        return still_waiting, await leader, c._waiting

    still_waiting, first, waiting = asyncio.run(run())
    assert still_waiting  # the short deadline did not end the longer wait
    assert first.ids[0, 0] == 1
    assert waiting.leaders == 0 and not waiting.pending
    assert server.calls == [1]  # the timed-out callers' queries never went out


def test_a_client_used_again_from_a_new_event_loop_still_times_out() -> None:
    server = Server(delay_s=0.3)
    c = AsyncCoalescer(server.call_async, max_in_flight=1)

    async def behind_a_leader(timeout_s: float) -> Any:
        leader = asyncio.create_task(asearch(c, 1))
        await asyncio.sleep(0.01)
        try:
            return await asearch(c, 2, timeout_s=timeout_s)
        finally:
            await leader

    # served before its deadline: the loop ends with the deadline timer still set
    assert asyncio.run(behind_a_leader(1.0)).ids[0, 0] == 2
    server.delay_s = 1.0
    with pytest.raises(SearchTimeout):  # a later deadline than that timer's, in a new loop
        asyncio.run(behind_a_leader(0.6))
    assert server.calls == [1, 1, 1]


def test_flags_wake_once_stay_set_and_time_out() -> None:
    flag = ThreadFlag()
    assert not flag.wait(0.01)
    threading.Timer(0.02, flag.set).start()
    assert flag.wait(5)
    flag.set()  # a second set changes nothing
    assert flag.wait(0) and flag.wait()

    async def run() -> list[str]:
        seen = []
        for fire in ("set", "expire"):
            f = Flag(asyncio.get_running_loop())
            asyncio.get_running_loop().call_later(0.01, getattr(f, fire))
            try:
                await f.future
                seen.append("woken")
            except TimeoutError:
                seen.append("expired")
            f.set()  # after either: nothing happens
            f.expire()
        return seen

    assert asyncio.run(run()) == ["woken", "expired"]


def test_asyncio_callers_share_requests() -> None:
    server = Server()

    async def run() -> list[Any]:
        c = AsyncCoalescer(server.call_async, max_in_flight=2)
        return await asyncio.gather(*(asearch(c, t) for t in range(100)))

    results = asyncio.run(run())
    assert [r.ids[0, 0] for r in results] == list(range(100))
    assert sum(server.calls) == 100 and len(server.calls) < 100


def test_a_caller_goes_alone_only_while_nothing_waits_and_a_round_trip_is_free() -> None:
    c = Coalescer(Server(delay_s=0), max_in_flight=1)
    assert c.alone()
    assert not c.alone()  # the one round trip is taken: the next caller must queue
    c.done_alone()
    assert c.alone()
    c.done_alone()


def test_a_cancelled_waiting_task_leaks_no_round_trip() -> None:
    server = Server(delay_s=0.05)

    async def run() -> Any:
        c = AsyncCoalescer(server.call_async, max_in_flight=1)
        leader = asyncio.create_task(asearch(c, 1))
        await asyncio.sleep(0.01)  # the leader's round trip is in flight
        waiter = asyncio.create_task(asearch(c, 2))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (await leader).ids[0, 0] == 1
        # the cancelled search is gone and no round trip is held: the next one runs at once
        later = await asyncio.wait_for(asearch(c, 3), 1.0)
        return later, c._waiting

    later, waiting = asyncio.run(run())
    assert later.ids[0, 0] == 3
    assert waiting.leaders == 0 and not waiting.pending
    assert server.calls == [1, 1]  # the cancelled query never went out


def test_cancelling_a_leading_task_still_answers_the_rest_of_its_request() -> None:
    server = Server(delay_s=0.05)

    async def run() -> Any:
        c = AsyncCoalescer(server.call_async, max_in_flight=1)
        first = asyncio.create_task(asearch(c, 1))
        await asyncio.sleep(0.01)  # in flight alone; the next two wait and will be merged
        lead = asyncio.create_task(asearch(c, 2))
        other = asyncio.create_task(asearch(c, 3))
        await first
        await asyncio.sleep(0.01)  # lead now sends [2, 3]
        lead.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lead
        got = await asyncio.wait_for(other, 1.0)
        later = await asyncio.wait_for(asearch(c, 4), 1.0)
        return got, later, c._waiting

    got, later, waiting = asyncio.run(run())
    assert got.ids[0, 0] == 3 and later.ids[0, 0] == 4
    assert waiting.leaders == 0 and not waiting.pending
    assert server.calls == [1, 2, 1]


def test_round_trips_in_flight_default_per_client_kind_and_follow_the_setting() -> None:
    url = "redis://127.0.0.1:1/0"  # clients connect lazily: nothing is dialled here
    threads, tasks = SearchClient(url), AsyncSearchClient(url)
    assert threads.coalescer is not None and tasks.coalescer is not None
    assert threads.coalescer._waiting.max_in_flight == 2
    assert tasks.coalescer._waiting.max_in_flight == 3
    four = Settings(redis={"url": url}, rpc=RpcSettings(max_in_flight=4))
    assert SearchClient(four).coalescer._waiting.max_in_flight == 4  # type: ignore[union-attr]
    assert AsyncSearchClient(four).coalescer._waiting.max_in_flight == 4  # type: ignore[union-attr]


def test_a_returning_batch_searches_again_as_one_request_not_one_then_the_rest() -> None:
    # threads: the round trip of a merged request is handed on only when all its members have
    # left, so members that search again at once share the next request; freed at once, the
    # first of them back would lead alone with one row and the rest wait for the trip after
    server = Server(delay_s=0.002)
    c = Coalescer(server, max_in_flight=1)

    def loop(tag: int) -> None:
        for _ in range(30):
            assert search(c, tag).ids.tolist() == [[tag] * 3]

    threads = [threading.Thread(target=loop, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(server.calls) == 8 * 30
    steady = server.calls[4:-4]
    assert sum(steady) / len(steady) >= 6, server.calls
    assert c._waiting.leaders == 0 and not c._waiting.pending
