"""A/B of each hand-written RPC fast path against the plain redis-py or stdlib way, in one run.

Run as `python benchmarks/rpc.py --fast-paths` (docs/benchmarks.md, "RPC fast paths"). Every
pair runs over faissq's RPC loop on a no-op engine (the machinery alone), the two sides
alternating round by round so that load from other jobs hits both alike; medians over rounds.
Latency pairs time sequential one-row searches; throughput pairs run 16 callers and also report
the client's CPU per search; encoder pairs time the packing of the same commands.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
from rpc_rig import NOOP_INDEX, settings_for

from faissq.rpc import replies, resp
from faissq.rpc.aio_client import AsyncSearchClient
from faissq.rpc.aio_coalesce import AsyncCoalescer, aserve
from faissq.rpc.coalesce import Coalescer, Pending
from faissq.rpc.search_client import RequestBuilder, SearchClient
from faissq.worker.embedded_redis import EmbeddedRedis

K = 10


class PoolClient(SearchClient):
    """SearchClient taking each search's connection from redis-py's pool and giving it back."""

    def _checkout(self) -> Any:
        while self._idle:  # the last search's connection goes back first
            self.pool.release(self._idle.pop())
        return self.pool.get_connection()


class EventCoalescer(Coalescer):
    """Coalescer whose waits are threading.Event instead of the one-shot ThreadFlag."""

    def pending(self, q: Any, k: int, options: dict[str, Any], key: Any,
                timeout_s: float) -> Pending:  # fmt: skip
        return Pending(q, k, options, key, time.monotonic() + timeout_s, threading.Event(),
                       threading.Event())  # fmt: skip


class EventAsyncCoalescer(AsyncCoalescer):
    """AsyncCoalescer with asyncio.Event waits and a wait_for timeout per waiter (no sweep)."""

    async def run(self, p: Pending) -> Any:
        self._waiting.join(p)
        if not p.promoted:
            try:
                await asyncio.wait_for(p.turn.wait(), p.remaining())
            except TimeoutError:
                if self._waiting.give_up(p):
                    raise
            except BaseException:
                self._waiting.abandon(p)
                raise
        if p.promoted:
            batch = self._waiting.take(p)
            if not batch:
                self._waiting.step_down()
            else:
                trip = asyncio.ensure_future(aserve(batch, self.search))
                self._trips.add(trip)
                trip.add_done_callback(self._trip_done)
                await asyncio.shield(trip)
        await p.done.wait()
        return p.answer()

    def pending(self, q: Any, k: int, options: dict[str, Any], key: Any,
                timeout_s: float) -> Pending:  # fmt: skip
        return Pending(q, k, options, key, time.monotonic() + timeout_s, asyncio.Event(),
                       asyncio.Event())  # fmt: skip


def seq_ms(search: Callable[[Any], Any], queries: np.ndarray, n: int) -> float:
    """p50 in ms of n sequential one-row searches."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        search(queries[i % len(queries)][None, :])
        out.append(time.perf_counter() - t0)
    return float(np.percentile(out, 50) * 1e3)


def thread_qps(client: SearchClient, queries: np.ndarray, callers: int,
               seconds: float) -> tuple[float, float]:  # fmt: skip
    """(QPS, client CPU µs per search) of `callers` threads searching for `seconds`."""
    counts = [0] * callers
    stop = time.perf_counter() + seconds

    def loop(c: int) -> None:
        i = c * 997
        while time.perf_counter() < stop:
            client.search(queries[i % len(queries)][None, :], K)
            counts[c] += 1
            i += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=loop, args=(c,)) for c in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = sum(counts)
    return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n * 1e6


def task_qps(client: AsyncSearchClient, queries: np.ndarray, callers: int,
             seconds: float) -> tuple[float, float]:  # fmt: skip
    """(QPS, client CPU µs per search) of `callers` asyncio tasks searching for `seconds`."""
    counts = [0] * callers

    async def loop(c: int, stop: float) -> None:
        i = c * 997
        while time.perf_counter() < stop:
            await client.search(queries[i % len(queries)][None, :], K)
            counts[c] += 1
            i += 1

    async def main() -> tuple[float, float]:
        await client.search(queries[0], K)
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(loop(c, t0 + seconds) for c in range(callers)))
        n = sum(counts)
        return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n * 1e6

    return asyncio.run(main())


def pack_us(pack: Callable[[list[tuple[Any, ...]]], Any], cmds: list[tuple[Any, ...]]) -> float:
    """µs per packing of `cmds` (best of 5 batches of 2,000)."""
    return min(timeit.repeat(lambda: pack(cmds), number=2000, repeat=5)) / 2000 * 1e6


def run(args: argparse.Namespace, url: str, storage: str) -> None:
    """Measure every pair, alternating sides round by round; print one table."""
    queries = np.random.default_rng(0).standard_normal((1024, args.dim)).astype(np.float32)
    plain = settings_for(url, storage)
    off = settings_for(url, storage, coalesce=False)
    fast_c, pool_c = SearchClient(plain, NOOP_INDEX), PoolClient(plain, NOOP_INDEX)
    event_c = SearchClient(plain, NOOP_INDEX)
    event_c.coalescer = EventCoalescer(event_c._merged, max_in_flight=2)
    single_c = SearchClient(off, NOOP_INDEX)

    def one(c: SearchClient) -> Callable[[Any], Any]:
        return lambda q: c.search(q, K)

    def aio(settings: Any, events: bool = False) -> Callable[[], tuple[float, float]]:
        def go() -> tuple[float, float]:
            c = AsyncSearchClient(settings, NOOP_INDEX)
            if events and c.coalescer is not None:
                c.coalescer = EventAsyncCoalescer(c._merged, max_in_flight=3)
            return task_qps(c, queries, 16, args.seconds)

        return go

    seq = {  # name: (fast path, plain way)
        "connections kept, not checked out of the pool per search": (one(fast_c), one(pool_c)),
    }
    conc = {
        "merging, 16 threads (merging off)": (
            lambda: thread_qps(fast_c, queries, 16, args.seconds),
            lambda: thread_qps(single_c, queries, 16, args.seconds),
        ),
        "merging, 16 asyncio tasks (merging off)": (aio(plain), aio(off)),
        "ThreadFlag (threading.Event), 16 threads merging": (
            lambda: thread_qps(fast_c, queries, 16, args.seconds),
            lambda: thread_qps(event_c, queries, 16, args.seconds),
        ),
        "Flag + one deadline timer (asyncio.Event + wait_for), 16 tasks": (
            aio(plain), aio(plain, events=True)),
    }  # fmt: skip
    builder = RequestBuilder(NOOP_INDEX, plain.rpc)
    submit = builder.prepare(queries[:1], K, None, {}).commands
    reply = replies.encode_result("x" * 24, np.zeros((1, K), np.float32),
                                   np.zeros((1, K), np.int64), 1, "host:1:abcdef",
                                   {"search_ms": 0.1})  # fmt: skip
    pushes = [c for i in range(16) for c in (("LPUSH", f"r:{i}", reply), ("EXPIRE", f"r:{i}", 30))]
    conn = redis.Connection()  # never connected: only its packer is used
    packs = {
        "client: script + BRPOP packed by hiredis (redis-py's pack_commands)": submit,
        "worker: 16 replies' LPUSH + EXPIRE packed by hiredis (pack_commands)": pushes,
    }
    for c in (fast_c, pool_c, event_c, single_c):
        seq_ms(one(c), queries, 50)  # warm-up: connections
    lat: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in seq}
    thr: dict[str, tuple[list[tuple[float, float]], ...]] = {n: ([], []) for n in conc}
    enc: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in packs}
    load = [os.getloadavg()[0]]
    for rnd in range(args.rounds):
        sides = (0, 1) if rnd % 2 == 0 else (1, 0)
        for name, pair in seq.items():
            for side in sides:
                lat[name][side].append(seq_ms(pair[side], queries, args.per_round))
        for name, runs in conc.items():
            for side in sides:
                thr[name][side].append(runs[side]())
        for name, cmds in packs.items():
            ways = (resp.pack, conn.pack_commands)
            for side in sides:
                enc[name][side].append(pack_us(ways[side], cmds))
        load.append(os.getloadavg()[0])
        print(f"round {rnd + 1}/{args.rounds} done (load {load[-1]:.1f})", file=sys.stderr)
    med = statistics.median
    print(f"\n{os.cpu_count()}-CPU machine, load average (1 min) {min(load):.1f}-{max(load):.1f} "
          f"during the run; {args.rounds} rounds alternating sides; {args.per_round} sequential "
          f"searches per side and round; {args.seconds:g} s per throughput run; redis-py "
          f"{redis.__version__}\n")  # fmt: skip
    print("| fast path (plain way) | fast path | plain way | unit | rounds the fast path won |")
    print("|---|---:|---:|---|---:|")

    def row(name: str, a: list[float], b: list[float], unit: str, fmt: str, more: bool) -> None:
        won = sum((x > y) if more else (x < y) for x, y in zip(a, b, strict=True))
        print(f"| {name} | {med(a):{fmt}} | {med(b):{fmt}} | {unit} | {won}/{len(a)} |")

    for name, (a, b) in lat.items():
        row(name, a, b, "ms p50", ".3f", False)
    for name, (a2, b2) in thr.items():
        row(name, [x[0] for x in a2], [x[0] for x in b2], "QPS", ",.0f", True)
        row(name, [x[1] for x in a2], [x[1] for x in b2], "client CPU µs per search", ".0f",
            False)  # fmt: skip
    for name, (a, b) in enc.items():
        row(name, a, b, "µs per packing", ".2f", False)


def main(args: argparse.Namespace) -> None:
    """Start Redis and faissq's RPC loop over a no-op engine, measure, stop everything."""
    here = Path(__file__).with_name("rpc_rig.py")
    with tempfile.TemporaryDirectory(prefix="faissq-rpc-paths-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", unix_socket=args.transport == "unix",
                               persistent=False)  # fmt: skip
        url = server.start()
        storage = str(Path(tmp) / "storage")
        argv = [sys.executable, str(here), "--role", "noop-rpc", "--url", url,
                "--storage", storage, "--dim", str(args.dim)]  # fmt: skip
        loop = subprocess.Popen(argv)
        try:
            probe = SearchClient(settings_for(url, storage), NOOP_INDEX)
            deadline = time.monotonic() + 60
            while not probe.alive():
                if time.monotonic() > deadline:
                    raise SystemExit("the no-op RPC loop did not start")
                time.sleep(0.05)
            probe.close()
            run(args, url, storage)
        finally:
            loop.terminate()
            loop.wait(10)
            server.stop()
