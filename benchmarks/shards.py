"""Shard benchmark: search p50/p99 over 1, 2 and 4 shards vs one index, and build wall time.

    python benchmarks/shards.py            # 100k x 64, IVF-Flat, 400 searches per row
    python benchmarks/shards.py --quick    # 40k x 64, 200 searches per row, about a minute
    python benchmarks/shards.py --n 200000 --repeat 1   # the acceptance size (a few minutes)

One run starts a private redis-server and one real `faissq worker` serving every index (the
unsharded one and the shards of 1, 2 and 4), builds each from the same vectors through
JobClient (a sharded build is one Celery group; its time is enqueue to the last shard's
result; best of --repeat, interleaved) and times single-query top-10 searches: SearchClient
on the unsharded index, ShardedSearchClient on the sharded ones, interleaved round by round
so load drift on a shared machine hits every row alike. Sharded builds share one coarse
quantizer that JobClient trains on the whole corpus; the row "4 shards, own quantizers" sends
each shard its rows as an ordinary build instead, so each trains its own. Recall@10 against
exact search is measured on RECALL_QUERIES queries at each --recall-nprobe, the same nprobe for
every row. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker_proc import start_worker  # noqa: E402

from faissq import shards  # noqa: E402
from faissq.config import Settings  # noqa: E402
from faissq.rpc.search_client import SearchClient  # noqa: E402
from faissq.rpc.shard_client import ShardedSearchClient  # noqa: E402
from faissq.tasks.producer import JobClient  # noqa: E402
from faissq.worker.embedded_redis import EmbeddedRedis  # noqa: E402

DIM = 64
K = 10
FAMILY = "ivf_flat"
COUNTS = (1, 2, 4)  # shard counts measured beside the unsharded index
HOST = "bench-shards@local"
RECALL_QUERIES = 1000  # enough that two rows' recall differ by sampling noise well under 0.01
OWN = "bench4own"  # 4 shards, each with its own quantizer (trained on its rows)


def vectors(n: int, seed: int) -> np.ndarray:
    """Gaussian float32 vectors (n, DIM)."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def timed_build(jobs: JobClient, name: str, x: np.ndarray) -> tuple[float, dict[str, Any]]:
    """Seconds from sending the build to its (last shard's) result, and the result."""
    t0 = time.perf_counter()
    if name == OWN:  # the shards built one by one as ordinary indexes: each trains its own
        sent = [(n, rows) for n, rows in zip(shards.shard_names(OWN, 4),
                                              shards.split_rows(np.arange(len(x)), 4),
                                              strict=True)]  # fmt: skip
        results = [jobs.build(n, x[r], r, family=FAMILY, by_reference=True) for n, r in sent]
        per = {n: r.get(timeout=1800) for (n, _), r in zip(sent, results, strict=True)}
        return time.perf_counter() - t0, {"shards": per}
    out = jobs.build(name, x, family=FAMILY, by_reference=True).get(timeout=1800)
    return time.perf_counter() - t0, out


def exact_top(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact cosine top-K ids (ids are row numbers: builds default to 0..n-1)."""
    xn, qn = x.copy(), q.copy()
    faiss.normalize_L2(xn)
    faiss.normalize_L2(qn)
    return faiss.knn(qn, xn, K, metric=faiss.METRIC_INNER_PRODUCT)[1]


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    arr = np.asarray(samples) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def run(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """Build every index, time the searches, return the table rows."""
    tmp = Path(tempfile.mkdtemp(prefix="faissq-shards-"))
    server = EmbeddedRedis(tmp / "redis", persistent=False)
    server.start()
    settings = Settings(redis={"url": server.url}, storage={"url": str(tmp / "data")})
    names = {s: f"bench{s}" for s in COUNTS}
    indexes = ["one"] + [n for s in COUNTS for n in shards.shard_names(names[s], s)]
    indexes += shards.shard_names(OWN, 4)
    proc = start_worker(settings, indexes, tmp / "worker.log", HOST)
    jobs = JobClient(settings)
    rows = []
    try:
        for s in COUNTS:
            jobs.declare_sharded(names[s], s)
        jobs.declare_sharded(OWN, 4)
        x = vectors(args.n, 0)
        order = ["one"] + [names[s] for s in COUNTS] + [OWN]
        timed_build(jobs, "one", x[: args.n // 10])  # warm-up: the worker's first build
        builds: dict[str, tuple[float, dict[str, Any]]] = {}
        for _ in range(args.repeat):  # interleaved, best of each: load drift hits all alike
            for name in order:
                seconds, out = timed_build(jobs, name, x)
                if name not in builds or seconds < builds[name][0]:
                    builds[name] = (seconds, out)
        one = SearchClient(settings, "one")
        clients: dict[str, Any] = {"one": one}
        clients.update({n: ShardedSearchClient(settings, n) for n in order[1:]})
        queries = vectors(args.searches + 20, 1)
        lat: dict[str, list[float]] = {n: [] for n in clients}
        for i, q in enumerate(queries):  # round robin: each row sees the same load drift
            for name, client in clients.items():
                t0 = time.perf_counter()
                client.search(q, K)
                if i >= 20:  # warm-up
                    lat[name].append(time.perf_counter() - t0)
        recall_q = vectors(RECALL_QUERIES, 2)
        want = exact_top(x, recall_q)
        for name in clients:
            p50, p99 = percentiles(lat[name])
            seconds, out = builds[name]
            recalls = []
            for p in args.recall_nprobe:
                got = clients[name].search(recall_q, K, nprobe=p, timeout=60).ids
                hits = [len(set(a) & set(b)) / K for a, b in zip(got, want, strict=True)]
                recalls.append(f"{np.mean(hits):.3f} (nprobe {p})")
            count = name.removeprefix("bench")
            label = "unsharded" if name == "one" else f"{count} shard{'s' * (count != '1')}"
            label = "4 shards, own quantizers" if name == OWN else label
            family = out.get("factory") or ",".join(
                sorted({str(r["factory"]) for r in out["shards"].values()})
            )
            rows.append((label, f"{p50:.2f} / {p99:.2f}", f"{seconds:.2f}",
                         f"{family}; recall@{K} {', '.join(recalls)}"))  # fmt: skip
        for c in clients.values():
            c.close()
    finally:
        jobs.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    """Parse arguments, run, print the table."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--repeat", type=int, default=2, help="builds per index (best is kept)")
    ap.add_argument("--n", type=int, help="vectors (default 100,000; 40,000 with --quick)")
    ap.add_argument(
        "--recall-nprobe",
        type=lambda v: [int(p) for p in v.split(",")],
        default=[16, 128],
        help="nprobes recall@10 is measured at (default 16,128)",
    )
    args = ap.parse_args()
    n, args.searches = (40_000, 200) if args.quick else (100_000, 400)
    args.n = args.n or n
    load = os.getloadavg()[0]
    rows = run(args)
    print(f"\nfaiss {faiss.__version__}, {os.cpu_count()} CPUs (load {load:.1f} at start), "
          f"{args.n:,} x {DIM} cosine, {FAMILY}, one worker process serving every index, "
          f"single-query top-{K} at the default nprobe, {args.searches} searches per row; "
          f"recall against exact search on {RECALL_QUERIES} queries; shard builds share the "
          "worker's job thread\n")  # fmt: skip
    print("| index | search p50 / p99 ms | build s (enqueue to result) | note |")
    print("|---|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
