"""Search QPS of a real worker under a steady upsert stream, with and without its maintenance.

    python benchmarks/upsert_stream.py                        # 5 min with maintenance, 1 min off
    python benchmarks/upsert_stream.py --seconds 60 --off-seconds 30   # a quick check

Each variant starts a private redis-server and a `faissq worker` subprocess (metrics off, fsync
on), builds --n x --dim vectors (IVF-Flat), then measures search QPS (--threads client threads,
one query of k=10 per search, default nprobe) for --baseline-seconds without writes, and then for
--seconds while a producer sends upsert jobs of --batch vectors at --rate vectors/s, replacing
random existing ids (the corpus keeps its size, so the no-write QPS stays the reference). QPS is
counted per minute. Variant "maintenance on" runs the defaults; "maintenance off" sets
FAISSQ_MAINTENANCE__ENABLED=false (nothing merges the delta). Target: every minute of the
stream >= 0.8 x the no-write QPS, with maintenance on.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from faissq.cli.demo_data import clustered  # noqa: E402
from faissq.config import Settings  # noqa: E402
from faissq.rpc.search_client import SearchClient  # noqa: E402
from faissq.tasks.producer import JobClient  # noqa: E402
from faissq.worker.embedded_redis import EmbeddedRedis  # noqa: E402

INDEX = "stream"
TARGET = 0.8


def start_worker(settings: Settings, log: Path, env_extra: dict[str, str]) -> Any:
    """Start `faissq worker --index stream` and wait until it answers a ping."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAISSQ_")}
    env.update(
        FAISSQ_REDIS__URL=str(settings.redis.url),
        FAISSQ_STORAGE__URL=settings.storage.url,
        FAISSQ_METRICS__ENABLED="false",
        FAISSQ_GPU__MODE="off",
        PYTHONPATH=str(REPO),
        **env_extra,
    )
    argv = [sys.executable, "-m", "faissq", "worker", "--index", INDEX, "-n", "stream@local",
            "-l", "WARNING"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = JobClient(settings)
    deadline = time.monotonic() + 90
    while not client.app.control.ping(destination=["stream@local"], timeout=0.5, limit=1):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start:\n{log.read_text()[-3000:]}")
    client.close()
    return proc


class Searchers:
    """Client threads searching as fast as they can; counts answered searches."""

    def __init__(self, settings: Settings, queries: np.ndarray, threads: int) -> None:
        self.client = SearchClient(settings, index=INDEX)
        self.queries = queries
        self.count = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            q = self.queries[rng.integers(len(self.queries)) : None][:1]
            try:
                self.client.search(q, 10)
            except Exception:
                with self._lock:
                    self.errors += 1
                continue
            with self._lock:
                self.count += 1

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self.client.close()

    def qps_per_window(self, seconds: float, window: float) -> list[float]:
        """QPS in consecutive windows over `seconds`."""
        out = []
        end = time.monotonic() + seconds
        while time.monotonic() < end - 1e-3:
            w = min(window, end - time.monotonic())
            c0, t0 = self.count, time.monotonic()
            time.sleep(w)  # a measurement window, not a synchronisation
            out.append((self.count - c0) / (time.monotonic() - t0))
        return out


def producer(jobs: JobClient, n: int, dim: int, args: argparse.Namespace, out: dict[str, Any],
             stop: threading.Event) -> None:  # fmt: skip
    """Upsert jobs of args.batch vectors at args.rate vectors/s, replacing existing ids."""
    rng = np.random.default_rng(11)
    period = args.batch / args.rate
    nxt = time.monotonic()
    pending: list[Any] = []
    sent = 0
    while not stop.is_set():
        ids = rng.choice(n, size=args.batch, replace=False)
        pending.append(jobs.upsert(INDEX, ids, rng.standard_normal((args.batch, dim),
                                                                   dtype=np.float32)))  # fmt: skip
        sent += args.batch
        pending = [r for r in pending if not r.ready()]
        nxt += period
        stop.wait(max(0.0, nxt - time.monotonic()))
    for r in pending:
        r.get(timeout=600)
    out["sent"] = sent


def variant(args: argparse.Namespace, maintenance: bool, seconds: float) -> dict[str, Any]:
    """One worker: build, no-write QPS, QPS under the stream; returns the figures."""
    tmp = Path(tempfile.mkdtemp(prefix="faissq-stream-"))
    server = EmbeddedRedis(tmp / "redis", persistent=False)
    server.start()
    settings = Settings(redis={"url": server.url}, storage={"url": str(tmp / "data")})
    env = {} if maintenance else {"FAISSQ_MAINTENANCE__ENABLED": "false"}
    if args.merge_delta_max:
        env["FAISSQ_INDEX__MERGE_DELTA_MAX"] = str(args.merge_delta_max)
    proc = start_worker(settings, tmp / "worker.log", env)
    jobs = JobClient(settings)
    try:
        x = clustered(args.n, args.dim, seed=1)
        jobs.build(INDEX, x, np.arange(args.n), family="ivf_flat",
                   by_reference=True).get(timeout=1200)  # fmt: skip
        search = Searchers(settings, x[:: max(1, args.n // 1000)].copy(), args.threads)
        search.start()
        search.qps_per_window(5, 5)  # warm-up
        base = search.qps_per_window(args.baseline_seconds, args.baseline_seconds)[0]
        stop, out = threading.Event(), {}
        prod = threading.Thread(target=producer, args=(jobs, args.n, args.dim, args, out, stop))
        t0 = time.monotonic()
        prod.start()
        windows = search.qps_per_window(seconds, args.window)
        stop.set()
        prod.join()
        elapsed = time.monotonic() - t0
        search.stop()
        stats = jobs.stats(INDEX).get(timeout=600)
    finally:
        jobs.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"base": base, "windows": windows, "rate": out["sent"] / elapsed, "stats": stats,
            "errors": search.errors}  # fmt: skip


def main() -> None:
    """Run both variants and print one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rate", type=float, default=1000.0, help="upserted vectors per second")
    ap.add_argument("--batch", type=int, default=100, help="vectors per upsert job")
    ap.add_argument("--threads", type=int, default=2, help="search client threads")
    ap.add_argument("--seconds", type=float, default=300.0, help="stream, maintenance on")
    ap.add_argument("--off-seconds", type=float, default=60.0, help="stream, maintenance off")
    ap.add_argument("--baseline-seconds", type=float, default=30.0)
    ap.add_argument("--merge-delta-max", type=int, default=0, help="0: the setting's default")
    ap.add_argument("--window", type=float, default=60.0, help="QPS window of the table")
    args = ap.parse_args()
    runs = [("maintenance on", True, args.seconds)]
    if args.off_seconds > 0:
        runs.append(("maintenance off", False, args.off_seconds))
    print(f"# n={args.n} dim={args.dim} IVF-Flat, {args.threads} search threads, upserts "
          f"{args.batch}/job at {args.rate:.0f} vectors/s; {platform.node()} "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("| variant | window | QPS | x no-write | target |")
    print("|---|---|---:|---:|---|")
    for name, on, seconds in runs:
        r = variant(args, on, seconds)
        base = r["base"]
        print(f"| {name} | no writes ({args.baseline_seconds:.0f} s) | {base:.0f} | 1.00 | |")
        for i, q in enumerate(r["windows"]):
            ok = "met" if q >= TARGET * base else "MISSED"
            target = f">= {TARGET} ({ok})" if on else ""
            lo, hi = i * args.window, min((i + 1) * args.window, seconds)
            print(f"| {name} | stream {lo:.0f}-{hi:.0f} s | {q:.0f} | {q / base:.2f} | {target} |")
        st = r["stats"]
        eng, maint = st.get("engine", {}), st.get("maintenance", {})
        print(f"# {name}: upserts {r['rate']:.0f} vectors/s achieved; search errors "
              f"{r['errors']}; end: delta {eng.get('delta')}, tombstones {eng.get('tombstones')}, "
              f"maintenance merges {maint.get('merges')}, saves {maint.get('saves')}")  # fmt: skip


if __name__ == "__main__":
    main()
