"""What live recall costs the search path: worker throughput with sampling off and on, same run.

    python benchmarks/recall_live.py                 # 100k x 128 IVF-Flat, 3 rounds each
    python benchmarks/recall_live.py --n 200000 --dim 384 --requests 20000

One process: a real redis-server, faissq's RPC loop (RpcServer) over an IVF-Flat engine, and
live recall (faissq.worker.recall_live) attached exactly as a worker attaches it. Each round
fills the request list with single-query searches (raw LPUSH, no client in the loop) and times
the loop draining it, from the first push to the last reply. Configurations alternate round by
round, so a busy host slows all of them alike; each row is the median round. "on" uses the
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
from faissq.config import RecallSettings, Settings
from faissq.datasets import clustered, queries_between
from faissq.embedded_redis import EmbeddedRedis
from faissq.index.engine import Engine
from faissq.rpc import protocol
from faissq.rpc.server import RpcServer
from faissq.worker.recall_live import LiveRecall

INDEX = "bench"


@dataclass
class Round:
    """One drained request list."""

    qps: float
    cpu_us: float  # this process's CPU time per search while draining (loop + check thread)
    sampled: int = 0
    checked: int = 0
    check_cpu_s: float = 0.0
    wall_s: float = 0.0


def drain(
    r: redis.Redis, server: RpcServer, queries: np.ndarray, requests: int
) -> tuple[float, float]:
    """Searches per second the loop answers from a full request list, and CPU us per search."""
    msgs, last = [], ""
    for i in range(requests):
        rid = uuid.uuid4().hex
        last = keys.reply_key(INDEX, rid)
        q = queries[i % len(queries)][None]
        msgs.append(protocol.encode_request(rid, last, time.time() + 600, 10, q))
    pipe = r.pipeline(transaction=False)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for start in range(0, requests, 1000):
        for msg in msgs[start : start + 1000]:
            pipe.lpush(keys.rpc_queue(INDEX), msg)
        pipe.execute()
    if r.brpop([last], timeout=600) is None:
        raise SystemExit("the loop did not drain its request list")
    cpu = time.process_time() - cpu0
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
    qps, cpu_us = drain(r, server, queries, requests)
    wall = time.perf_counter() - t0
    server.sampler = None
    if live is None:
        return Round(qps, cpu_us, wall_s=wall)
    live.stop()
    s = live.samplers[INDEX].summary()
    return Round(qps, cpu_us, s["sampled"], s["evaluated"], s["cpu_seconds"], wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--n", type=int, default=100_000, help="stored vectors")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--requests", type=int, default=5_000, help="single-query searches a round")
    ap.add_argument("--rounds", type=int, default=9, help="rounds per configuration")
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
            for _ in range(args.rounds):
                for name, cfg in configs.items():
                    results[name].append(one_round(r, server, eng, queries, args.requests, cfg))
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
    base = statistics.median(x.qps for x in results["off"])
    head = ("configuration".ljust(26), "QPS (median)", "QPS range".ljust(11), "  cost",
            "CPU us/search", "sampled", "checked", "check CPU")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print(f"|{'-' * 28}|{'-' * 14}|{'-' * 13}|{'-' * 8}|{'-' * 15}|{'-' * 9}|{'-' * 9}|{'-' * 11}|")
    for name, rounds in results.items():
        qps = statistics.median(x.qps for x in rounds)
        cpu_us = statistics.median(x.cpu_us for x in rounds)
        each = f"{min(x.qps for x in rounds):.0f}-{max(x.qps for x in rounds):.0f}"
        sampled = sum(x.sampled for x in rounds)
        checked = sum(x.checked for x in rounds)
        wall = sum(x.wall_s for x in rounds)
        share = f"{100 * sum(x.check_cpu_s for x in rounds) / wall:.1f}%" if sampled else "-"
        cost = f"{100 * (1 - qps / base):+.1f}%" if name != "off" else "-"
        print(f"| {name:<26} | {qps:>12.0f} | {each:<11} | {cost:>6} | {cpu_us:>13.1f} | "
              f"{sampled:>7} | {checked:>7} | {share:>9} |")  # fmt: skip
    print(
        "\ncost: median throughput lost against off; CPU us/search: this process's CPU time per "
        "search (the loop, the check thread, the pushes), median round; check CPU: the check "
        "thread's CPU time over the rounds' wall time (at most recall.cpu_fraction of a core)"
    )


if __name__ == "__main__":
    main()
