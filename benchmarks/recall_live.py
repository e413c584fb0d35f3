"""What live recall costs the search path: worker throughput with sampling off and on, same run.

    python benchmarks/recall_live.py                 # 100k x 128 IVF-Flat, 21 rounds
    python benchmarks/recall_live.py --n 200000 --dim 384 --requests 5000

One process: a real redis-server, faissq's RPC loop (RpcServer) over an IVF-Flat engine, and
live recall (faissq.worker.recall_live) attached exactly as a worker attaches it. Each round
fills the request list with single-query searches (raw LPUSH, no client in the loop) and times
the loop draining it, from the first push to the last reply. Configurations alternate round by
round (order rotated), so a busy host slows all of them alike; the cost is the median over
rounds of each configuration's throughput against the off run of the same round. "on" uses the
default settings (sample rate, CPU share, nice 19); "on, nice 0" keeps the check thread at the
search's priority, so it spends its whole CPU share even when the CPU is contended.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
import redis

from faissq import keys
from faissq.cli.demo_data import clustered, queries_between
from faissq.config import RecallSettings, Settings
from faissq.index.engine import Engine
from faissq.rpc import protocol
from faissq.rpc.server import RpcServer
from faissq.worker.embedded_redis import EmbeddedRedis
from faissq.worker.recall_live import LiveRecall

INDEX = "bench"


@dataclass
class Round:
    """One drained request list."""

    qps: float
    loop_us: float  # the RPC loop thread's CPU time per search (what sampling adds to the path)
    sampled: int = 0
    checked: int = 0
    check_cpu_s: float = 0.0
    wall_s: float = 0.0


def drain(
    r: redis.Redis, server: RpcServer, queries: np.ndarray, requests: int
) -> tuple[float, float]:
    """Searches per second the loop answers from a full request list, and the loop thread's CPU
    microseconds per search."""
    msgs, last = [], ""
    for i in range(requests):
        rid = uuid.uuid4().hex
        last = keys.reply_key(INDEX, rid)
        q = queries[i % len(queries)][None]
        msgs.append(protocol.encode_request(rid, last, time.time() + 600, 10, q))
    pipe = r.pipeline(transaction=False)
    assert server._thread is not None and server._thread.ident is not None
    clock = time.pthread_getcpuclockid(server._thread.ident)
    t0, cpu0 = time.perf_counter(), time.clock_gettime(clock)
    for start in range(0, requests, 1000):
        for msg in msgs[start : start + 1000]:
            pipe.lpush(keys.rpc_queue(INDEX), msg)
        pipe.execute()
    if r.brpop([last], timeout=600) is None:
        raise SystemExit("the loop did not drain its request list")
    cpu = time.clock_gettime(clock) - cpu0
    return requests / (time.perf_counter() - t0), cpu * 1e6 / requests


def one_round(
    r: redis.Redis, server: RpcServer, eng: Engine, queries: np.ndarray, requests: int,
    recall: RecallSettings | None,
) -> Round:  # fmt: skip
    """Drain one list with live recall off (None) or on with these settings."""
    live = None
    if recall is not None:
        live = LiveRecall(recall, lambda name: eng, [INDEX]).start()
        server.sampler = live.samplers[INDEX]
    t0 = time.perf_counter()
    qps, loop_us = drain(r, server, queries, requests)
    wall = time.perf_counter() - t0
    server.sampler = None
    if live is None:
        return Round(qps, loop_us, wall_s=wall)
    live.stop()
    s = live.samplers[INDEX].summary()
    return Round(qps, loop_us, s["sampled"], s["evaluated"], s["cpu_seconds"], wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--n", type=int, default=100_000, help="stored vectors")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--requests", type=int, default=3_000, help="single-query searches a round")
    ap.add_argument("--rounds", type=int, default=21, help="rounds (each runs every configuration)")
    args = ap.parse_args()
    clusters = max(8, int(np.sqrt(args.n)))
    xb = clustered(args.n, args.dim, clusters=clusters, seed=1)
    queries = queries_between(args.n, args.dim, clusters=clusters, seed=1, nq=4096)
    t0 = time.perf_counter()
    eng = Engine(args.dim, Settings().index.model_copy(update={"family": "ivf_flat"}))
    eng.build(xb, np.arange(args.n))
    built = time.perf_counter() - t0
    del xb
    default = RecallSettings()
    configs: dict[str, RecallSettings | None] = {
        "off": None,
        f"on (rate {default.sample_rate:g}, nice {default.nice})": default,
        "on, nice 0": default.model_copy(update={"nice": 0}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        server_proc = EmbeddedRedis(tmp, unix_socket=False, persistent=False)
        server_proc.start()
        settings = Settings(redis={"url": server_proc.url}, metrics={"enabled": False},
                            worker={"indexes": [INDEX]})  # fmt: skip
        r = redis.Redis.from_url(server_proc.url, socket_timeout=None)  # a drain may take long
        server = RpcServer(settings, INDEX, lambda: eng).start()
        try:
            one_round(r, server, eng, queries, 2_000, None)  # warm-up
            results: dict[str, list[Round]] = {name: [] for name in configs}
            names = list(configs)
            for i in range(args.rounds):  # each round runs every configuration, order rotated
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    got = one_round(r, server, eng, queries, args.requests, configs[name])
                    results[name].append(got)
        finally:
            server.stop()
            r.close()
            server_proc.stop()
    report(args, built, results)


def report(args: argparse.Namespace, built: float, results: dict[str, list[Round]]) -> None:
    """One table: median QPS per configuration, its cost against off, what the checks did."""
    print(f"\nlive recall cost: IVF-Flat {args.n} x {args.dim} (built in {built:.1f} s), "
          f"{args.requests} single-query searches per round, {args.rounds} rounds each, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    off = results["off"]
    head = ("configuration".ljust(26), "QPS (median)", "QPS range".ljust(11), "  cost",
            "loop CPU us/search", "sampled", "checked", "check CPU")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print(f"|{'-' * 28}|{'-' * 14}|{'-' * 13}|{'-' * 8}|{'-' * 20}|{'-' * 9}|{'-' * 9}|{'-' * 11}|")
    for name, rounds in results.items():
        qps = statistics.median(x.qps for x in rounds)
        loop_us = statistics.median(x.loop_us for x in rounds)
        each = f"{min(x.qps for x in rounds):.0f}-{max(x.qps for x in rounds):.0f}"
        sampled = sum(x.sampled for x in rounds)
        checked = sum(x.checked for x in rounds)
        wall = sum(x.wall_s for x in rounds)
        share = f"{100 * sum(x.check_cpu_s for x in rounds) / wall:.1f}%" if sampled else "-"
        # paired: each round against the off run of the same round, so host load cancels out
        paired = statistics.median(1 - x.qps / o.qps for x, o in zip(rounds, off, strict=True))
        cost = f"{100 * paired:+.1f}%" if name != "off" else "-"
        print(f"| {name:<26} | {qps:>12.0f} | {each:<11} | {cost:>6} | {loop_us:>18.1f} | "
              f"{sampled:>7} | {checked:>7} | {share:>9} |")  # fmt: skip
    print(
        "\ncost: throughput lost against the off run of the same round, median over rounds; "
        "loop CPU us/search: the search loop thread's CPU time per "
        "search, median round; check CPU: the check "
        "thread's CPU time over the rounds' wall time (at most recall.cpu_fraction of a core)"
    )


if __name__ == "__main__":
    main()
