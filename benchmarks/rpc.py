"""Search latency: in-process engine vs bare Redis request/reply vs faissq RPC vs a Celery task.

One command, one index (built by a real `faissq worker` through a job, loaded in-process from
its snapshot for the in-process and Celery rows):

    python benchmarks/rpc.py                    # 100k x 128 IVF-Flat, TCP loopback
    python benchmarks/rpc.py --transport unix   # same over a unix socket
    python benchmarks/rpc.py --quick            # 20k vectors, fewer rounds
    python benchmarks/rpc.py --worker-cpus 1    # workers on CPU 1; clients and Redis on the rest
    python benchmarks/rpc.py --fast-paths       # each hand-written fast path vs the plain way

Rows: (a) engine.search batch 1; (b) bare redis-py LPUSH then BRPOP with the same request
bytes, answered by a no-op worker with a reply of the same size; (c) faissq SearchClient;
(d) the same search as a Celery task, delay().get(); (e) faissq RPC under 16 concurrent
clients (threads and asyncio tasks of one client, merging on and off; 16 client processes) vs
in-process batch-16 QPS; (f1)/(f16) the worker alone, draining a list filled at once with
one-row or 16-row requests. Variants measure each optimisation (pipelining, hiredis), and (a'')
runs the in-process search with a Redis PING between calls, the cache state a served search has.
Scenarios are interleaved round by round so that load from other jobs hits all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis._parsers import _RESP2Parser
from rpc_rig import ECHO, INDEX, NOOP_INDEX, Rig, bench_app, settings_for

from faissq import codec, keys
from faissq.config import RpcSettings, Settings
from faissq.rpc import protocol, replies
from faissq.rpc.aio_client import AsyncSearchClient
from faissq.rpc.search_client import RequestBuilder, SearchClient
from faissq.storage.durable import DurableStore
from faissq.tasks.producer import JobClient

PAUSE_S = 0.0005  # (a'): about the idle gap the worker sees between sequential RPC searches


def stats(lat_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean in milliseconds."""
    a = np.asarray(lat_s) * 1e3
    p50, p90, p99 = (float(np.percentile(a, p)) for p in (50, 90, 99))
    return {"n": float(a.size), "p50": p50, "p90": p90, "p99": p99, "mean": float(a.mean())}


def timed(
    fn: Callable[[int], Any], n: int, offset: int, between: Callable[[], Any] | None = None
) -> list[float]:
    """Latency of n sequential calls fn(i), running `between()` between calls (not timed)."""
    out = []
    for i in range(offset, offset + n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
        if between is not None:
            between()
    return out


def concurrent_qps(
    fn: Callable[[int], Any], clients: int, seconds: float
) -> tuple[float, list[float]]:
    """QPS and latencies of `clients` threads calling fn in a loop for `seconds`."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def loop(c: int) -> None:
        i = c * 100_000
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            fn(i)
            lat[c].append(time.perf_counter() - t0)
            i += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [x for c in lat for x in c]
    return len(flat) / (time.perf_counter() - t0), flat


def drain_qps(r: redis.Redis, queries: np.ndarray, k: int, nprobe: int, requests: int,
              rows: int) -> tuple[float, list[float]]:  # fmt: skip
    """Query rows per second the worker answers from a full request list (raw LPUSH, no client
    in the loop): from the first push to the reply of the last request."""
    msgs, last = [], ""
    for i in range(requests):
        rid = uuid.uuid4().hex
        last = keys.reply_key(INDEX, rid)
        at = (i * rows) % (len(queries) - rows)
        msgs.append(protocol.encode_request(rid, last, time.time() + 600, k,
                                            queries[at : at + rows], nprobe=nprobe))  # fmt: skip
    t0 = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for msg in msgs:
        pipe.lpush(keys.rpc_queue(INDEX), msg)
    pipe.execute()
    if r.brpop([last], timeout=600) is None:
        raise SystemExit("the worker did not drain its request list")
    return requests * rows / (time.perf_counter() - t0), []


def async_qps(settings: Settings, queries: np.ndarray, k: int, nprobe: int, clients: int,
              seconds: float) -> tuple[float, list[float]]:  # fmt: skip
    """QPS and latencies of `clients` asyncio tasks searching in a loop for `seconds`."""
    lat: list[float] = []

    async def loop(client: AsyncSearchClient, c: int, stop: float) -> None:
        i = c * 100_000
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await client.search(queries[i % len(queries)], k, nprobe=nprobe)
            lat.append(time.perf_counter() - t0)
            i += 1

    async def main() -> float:
        async with AsyncSearchClient(settings, INDEX) as client:
            await client.search(queries[0], k, nprobe=nprobe)
            t0 = time.perf_counter()
            await asyncio.gather(*(loop(client, c, t0 + seconds) for c in range(clients)))
            return time.perf_counter() - t0

    took = asyncio.run(main())
    return len(lat) / took, lat


ROWS = {
    "a": "(a) in-process engine.search, batch 1",
    "a2": "(a') in-process engine.search, batch 1, 0.5 ms idle between calls",
    "a3": "(a'') in-process engine.search, batch 1, a bare Redis PING between calls",
    "b": "(b) bare redis-py LPUSH, then BRPOP; no-op worker",
    "b1": "(b') bare, LPUSH + BRPOP pipelined in one write",
    "c": "(c) faissq SearchClient (script + BRPOP in one write, hiredis)",
    "c2": "(c') faissq protocol, script then BRPOP: two round trips",
    "cpy": "(c'') faissq SearchClient, pure-Python RESP parser",
    "c0": "(c0) faissq SearchClient, worker loop over a no-op engine",
    "d": "(d) Celery task, delay().get()",
}


QPS_ROWS = {
    "rpc16": "(e) faissq RPC, 16 client threads, one SearchClient (merging)",
    "async16": "(e') faissq RPC, 16 asyncio tasks, one AsyncSearchClient (merging)",
    "rpc16_single": "(e2) faissq RPC, 16 client threads, one SearchClient, merging off",
    "async16_single": "(e3) faissq RPC, 16 asyncio tasks, merging off",
    "procs16": "(e4) faissq RPC, 16 client processes, one search at a time each",
    "drain1": "(f1) the worker alone: one-row requests queued at once, no client waiting",
    "drain16": "(f16) the worker alone: 16-row requests queued at once, no client waiting",
}


def run(args: argparse.Namespace, rig: Rig) -> None:
    """Build the index, start the workers, measure every row, print the tables, draw the PNG."""
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    queries = rng.standard_normal((4096, args.dim)).astype(np.float32)
    nq, k, nprobe = len(queries), args.k, args.nprobe
    sample = replies.encode_result(uuid.uuid4().hex, np.zeros((1, k), np.float32),
                                    np.zeros((1, k), np.int64), 1, "host:123456:abcdef",
                                    {"search_ms": 0.1, "server_ms": 0.1, "batch": 1,
                                     "queue_ms": 0.1})  # fmt: skip
    rig.start_all(len(sample))
    client = SearchClient(rig.settings, INDEX)
    deadline = time.monotonic() + 120
    while not client.alive():
        if time.monotonic() > deadline:
            raise SystemExit("the faissq worker did not start: see its log")
        time.sleep(0.1)
    t0 = time.perf_counter()
    JobClient(rig.settings).build(INDEX, xb, family=args.family).get(timeout=1800)
    build_s = time.perf_counter() - t0
    engine = DurableStore(rig.settings).recover(INDEX).engine
    assert engine is not None
    check = client.search(queries[:8], k, nprobe=nprobe)
    if not np.array_equal(check.ids, engine.search(queries[:8], k, nprobe=nprobe).ids):
        raise SystemExit("RPC and in-process results differ")
    celery_search = bench_app(rig.settings).bench_search
    noop = SearchClient(rig.settings, NOOP_INDEX)
    r = redis.Redis.from_url(rig.url)
    args.redis_version = r.info("server")["redis_version"]
    builder = RequestBuilder(INDEX, rig.settings.rpc)
    pure_pool = redis.ConnectionPool.from_url(rig.url, parser_class=_RESP2Parser)
    pure = SearchClient(rig.settings, INDEX, pool=pure_pool)

    def q(i: int) -> np.ndarray:
        return queries[i % nq : i % nq + 1]

    def bare_msg(i: int) -> tuple[str, bytes]:
        rid = uuid.uuid4().hex
        reply = f"{ECHO}:reply:{rid}"
        now = time.time()
        return reply, protocol.encode_request(rid, reply, now + 2, k, q(i), nprobe=nprobe, sent=now)

    def bare(i: int) -> None:
        reply, msg = bare_msg(i)
        r.lpush(ECHO, msg)
        if r.brpop([reply], timeout=2) is None:
            raise SystemExit("the no-op worker did not answer")

    def bare_pipe(i: int) -> None:
        reply, msg = bare_msg(i)
        pipe = r.pipeline(transaction=False)
        pipe.lpush(ECHO, msg)
        pipe.brpop([reply], timeout=2)
        if pipe.execute()[1] is None:
            raise SystemExit("the no-op worker did not answer")

    def two_trips(i: int) -> None:
        prepared = builder.prepare(q(i), k, None, {"nprobe": nprobe})
        r.execute_command(*prepared.commands[0])
        builder.response(r.brpop([prepared.reply], timeout=prepared.block_s), prepared)

    fns: dict[str, Callable[[int], Any]] = {
        "a": lambda i: engine.search(q(i), k, nprobe=nprobe),
        "a2": lambda i: engine.search(q(i), k, nprobe=nprobe),
        "a3": lambda i: engine.search(q(i), k, nprobe=nprobe),
        "b": bare,
        "b1": bare_pipe,
        "c": lambda i: client.search(q(i), k, nprobe=nprobe),
        "c2": two_trips,
        "cpy": lambda i: pure.search(q(i), k, nprobe=nprobe),
        "c0": lambda i: noop.search(q(i), k, nprobe=nprobe),
        "d": lambda i: celery_search.delay(codec.pack_array(q(i)), k, nprobe).get(timeout=120),
    }
    for fn in fns.values():  # warm-up: connections, the Celery worker's engine load
        timed(fn, 30, 0)
    lat: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for rnd in range(args.rounds):
        for name in order[rnd % len(order) :] + order[: rnd % len(order)]:
            between = {"a2": lambda: time.sleep(PAUSE_S), "a3": r.ping}.get(name)
            lat[name] += timed(fns[name], args.per_round, rnd * args.per_round, between)
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)

    single = SearchClient(settings_for(rig.url, rig.storage, coalesce=False), INDEX)
    qps: dict[str, list[float]] = {name: [] for name in ("inproc16", "inproc1", *QPS_ROWS)}
    conc: dict[str, list[float]] = {name: [] for name in QPS_ROWS}
    cores: dict[str, list[float]] = {name: [] for name in QPS_ROWS}  # worker CPU / run length
    drained = {"drain1": int(5000 * args.seconds), "drain16": int(9600 * args.seconds)}  # rows
    for _ in range(min(3, args.rounds)):
        qps["inproc16"].append(_inproc_qps(engine, queries, 16, k, nprobe, args.seconds))
        qps["inproc1"].append(_inproc_qps(engine, queries, 1, k, nprobe, args.seconds))
        runs = {
            "rpc16": lambda: concurrent_qps(
                lambda i: client.search(q(i), k, nprobe=nprobe), 16, args.seconds
            ),
            "async16": lambda: async_qps(rig.settings, queries, k, nprobe, 16, args.seconds),
            "rpc16_single": lambda: concurrent_qps(
                lambda i: single.search(q(i), k, nprobe=nprobe), 16, args.seconds
            ),
            "async16_single": lambda: async_qps(
                settings_for(rig.url, rig.storage, coalesce=False), queries, k, nprobe, 16,
                args.seconds,
            ),
            "procs16": lambda: rig.client_processes(16, args.seconds, k, nprobe),
            "drain1": lambda: drain_qps(r, queries, k, nprobe, drained["drain1"], 1),
            "drain16": lambda: drain_qps(r, queries, k, nprobe, drained["drain16"] // 16, 16),
        }  # fmt: skip
        for name, run_one in runs.items():
            cpu0 = rig.worker_cpu_s()
            got, lats = run_one()
            span = drained[name] / got if name in drained else args.seconds
            cores[name].append((rig.worker_cpu_s() - cpu0) / span)
            qps[name].append(got)
            conc[name] += lats
    workers = client.workers()
    report(args, rig, lat, (qps, conc, cores), build_s, workers)


def _inproc_qps(engine: Any, queries: np.ndarray, batch: int, k: int, nprobe: int,
                seconds: float) -> float:  # fmt: skip
    """Queries per second of engine.search at a given batch size, one caller."""
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.search(queries[i : i + batch], k, nprobe=nprobe)
        i = (i + batch) % (len(queries) - batch)
        n += batch
    return n / (time.perf_counter() - t0)


def report(args: argparse.Namespace, rig: Rig, lat: dict[str, list[float]],
           load: tuple[dict[str, list[float]], ...], build_s: float,
           workers: list[dict[str, Any]]) -> None:  # fmt: skip
    """Print the Markdown tables and the targets; write the histogram PNG.

    load: per QPS row, the QPS of each run, the latencies, and the worker's CPU in cores."""
    qps, conc, cores = load
    s = {name: stats(v) for name, v in lat.items()}
    print(f"\nindex: {args.n:,} x {args.dim} {args.family}, nprobe {args.nprobe}, k {args.k}; "
          f"built by the worker in {build_s:.1f}s; transport {args.transport}; "
          f"{args.rounds} interleaved rounds x {args.per_round} searches per row; "
          f"{machine(args)}; Redis {args.redis_version}; "
          f"rpc.batch_window_ms {args.batch_window_ms:g}\n")  # fmt: skip
    print("| row | p50 ms | p90 ms | p99 ms | mean ms |")
    print("|---|---:|---:|---:|---:|")
    for name, label in ROWS.items():
        if name not in s:
            continue
        x = s[name]
        print(f"| {label} | {x['p50']:.3f} | {x['p90']:.3f} | {x['p99']:.3f} | {x['mean']:.3f} |")
    med = {name: float(np.median(v)) for name, v in qps.items()}
    print("\n| throughput | QPS (median of runs) | p50 ms | p99 ms | worker CPU, cores |")
    print("|---|---:|---:|---:|---:|")
    print(f"| in-process engine.search, batch 16, one caller | {med['inproc16']:,.0f} | | | |")
    print(f"| in-process engine.search, batch 1, one caller | {med['inproc1']:,.0f} | | | |")
    for name, label in QPS_ROWS.items():
        busy = float(np.median(cores[name]))
        x = stats(conc[name]) if conc[name] else None
        pct = f"{x['p50']:.3f} | {x['p99']:.3f}" if x else " | "
        print(f"| {label} | {med[name]:,.0f} | {pct} | {busy:.2f} |")
    for w in workers:
        st = w["stats"]
        per_call = st["answered"] / max(1, st["batches"])
        print(f"\nworker {w['worker']}: {st['answered']} answered, {per_call:.2f} requests "
              f"per engine call, {st['dropped']} dropped, {st['expired']} expired")  # fmt: skip
    a, b, c, d = s["a"], s["b"], s["c"], s["d"]
    print("\ntargets:")
    print(f"- (c)-(a) p50 {c['p50'] - a['p50']:.3f} ms vs 1.2 x (b) {1.2 * b['p50']:.3f} ms: "
          f"{'met' if c['p50'] - a['p50'] <= 1.2 * b['p50'] else 'NOT met'}")  # fmt: skip
    print(f"- (c)-(a) p99 {c['p99'] - a['p99']:.3f} ms vs 1.5 x (b) {1.5 * b['p99']:.3f} ms: "
          f"{'met' if c['p99'] - a['p99'] <= 1.5 * b['p99'] else 'NOT met'}")  # fmt: skip
    a3 = s["a3"]
    print(f"- (c)-(a'') p50 {c['p50'] - a3['p50']:.3f} ms vs 1.2 x (b) {1.2 * b['p50']:.3f} ms, "
          f"p99 {c['p99'] - a3['p99']:.3f} ms vs 1.5 x (b) {1.5 * b['p99']:.3f} ms "
          "(the search with the cache state a served search has)")  # fmt: skip
    c0 = s["c0"]
    print(f"- machinery alone: (c0) p50 {c0['p50']:.3f} ms vs 1.2 x (b) {1.2 * b['p50']:.3f} ms, "
          f"p99 {c0['p99']:.3f} ms vs 1.5 x (b) {1.5 * b['p99']:.3f} ms")  # fmt: skip
    ratio = d["p50"] / c["p50"]
    print(f"- (d)/(c) p50 {ratio:.1f}x vs 5x: {'met' if ratio >= 5 else 'NOT met'}")
    for name, label in QPS_ROWS.items():
        frac = med[name] / med["inproc16"]
        print(f"- {label.split(' faissq')[0]} {med[name]:,.0f} QPS = {frac:.2f} x in-process "
              f"batch-16 vs 0.5x: {'met' if frac >= 0.5 else 'NOT met'}")  # fmt: skip
    title = machine(args)
    draw(args.png, lat, conc, title)


def machine(args: argparse.Namespace) -> str:
    """The machine and CPU split of this run, for the table header and the plot title."""
    text = f"{os.cpu_count()}-CPU Linux machine"
    if args.worker_cpus:
        text += (f", workers on CPUs {','.join(map(str, sorted(args.worker_cpus)))}, "
                 f"clients and Redis on {len(args.other_cpus)} others")  # fmt: skip
    return text


def draw(path: str, lat: dict[str, list[float]], conc: dict[str, list[float]], title: str) -> None:
    """Latency histograms on a log axis, one step line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    bins = np.logspace(np.log10(0.01), np.log10(50), 120)
    short = {"a": "(a) in-process engine.search", "b": "(b) bare LPUSH + BRPOP, no-op worker",
             "c": "(c) faissq RPC", "c0": "(c0) faissq RPC over a no-op engine",
             "d": "(d) Celery delay().get()"}  # fmt: skip
    rows = {label: lat[name] for name, label in short.items()}
    rows["(e') faissq RPC, 16 asyncio tasks, merging"] = conc["async16"]
    rows["(e4) faissq RPC, 16 client processes"] = conc["procs16"]
    for label, values in rows.items():
        ms = np.asarray(values) * 1e3
        weights = np.full(ms.size, 1 / max(1, ms.size))
        ax.hist(ms, bins=bins, weights=weights, histtype="step", linewidth=1.5, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency per search (ms, log scale)")
    ax.set_ylabel("fraction of searches")
    ax.set_title(f"faissq search latency, {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nhistogram: {path}")


def parse_cpus(text: str) -> set[int]:
    """'0,1' or '0-3' (the kernel's CPU list format) -> a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def cpu_list(text: str) -> set[int]:
    """--worker-cpus: a CPU list that leaves this machine other CPUs for the rest of the run."""
    cpus = parse_cpus(text)
    if not cpus or not cpus < os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError(f"{text}: not a strict subset of the usable CPUs")
    return cpus


def pin_apart(worker_cpus: set[int]) -> set[int]:
    """Keep this process (clients, Redis, in-process rows) off the workers' CPUs and their
    hyperthread siblings; in-process FAISS gets as many threads as the worker has CPUs.
    Returns the rest."""
    import faiss

    near = set(worker_cpus)
    for cpu in worker_cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        if siblings.exists():
            near |= parse_cpus(siblings.read_text())
    rest = os.sched_getaffinity(0) - near or os.sched_getaffinity(0) - worker_cpus
    os.sched_setaffinity(0, rest)
    faiss.omp_set_num_threads(len(worker_cpus))
    return rest


def main() -> None:
    """Parse arguments, run the whole benchmark."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--family", default="ivf_flat")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--per-round", type=int, default=400, help="sequential searches per row/round")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each QPS run")
    ap.add_argument("--transport", choices=["tcp", "unix"], default="tcp")
    ap.add_argument("--batch-window-ms", type=float, default=RpcSettings().batch_window_ms,
                    help="the worker's rpc.batch_window_ms")  # fmt: skip
    ap.add_argument("--png", default="docs/img/rpc-latency.png")
    ap.add_argument("--quick", action="store_true", help="20k vectors, 2 rounds of 200")
    pin_help = (
        "pin the workers (faissq's and the baselines' no-op, echo and Celery workers) to these "
        "CPUs, the clients, Redis and the in-process rows to the others; in-process rows then "
        "use as many FAISS threads as the worker has CPUs"
    )
    ap.add_argument("--worker-cpus", type=cpu_list, metavar="0,1", help=pin_help)
    ap.add_argument("--fast-paths", action="store_true",
                    help="instead of the rows above: each hand-written fast path of the client "
                         "and worker against the plain redis-py or stdlib way, A/B interleaved "
                         "over a no-op engine (benchmarks/rpc_paths.py; uses --rounds, "
                         "--per-round, --seconds, --transport)")  # fmt: skip
    args = ap.parse_args()
    if args.fast_paths:
        import rpc_paths

        rpc_paths.main(args)
        return
    args.other_cpus = pin_apart(args.worker_cpus) if args.worker_cpus else None
    if args.quick:
        args.n, args.rounds, args.per_round, args.seconds = 20_000, 2, 200, 1.0
    with tempfile.TemporaryDirectory(prefix="faissq-rpc-bench-") as tmp:
        rig = Rig(args, Path(tmp))
        try:
            run(args, rig)
        except BaseException:
            for log in sorted(Path(tmp).glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            raise
        finally:
            rig.stop()


if __name__ == "__main__":
    main()
