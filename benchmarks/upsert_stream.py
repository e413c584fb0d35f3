"""Search QPS of a real writer worker with and without a steady upsert stream, interleaved.

    python benchmarks/upsert_stream.py                       # 10 x 30 s of stream, maintenance on
    python benchmarks/upsert_stream.py --seconds 60 --window 20 --quiet 10   # a quick check

Starts a private redis-server and a `faissq worker` subprocess (metrics off, fsync on), builds
--n x --dim vectors (IVF-Flat), then, while --threads client threads search as fast as they can
(one query, k=10, default nprobe; 8 threads keep the worker busy: with 2, the no-write QPS of
one 5 s window to the next swung 3x on 2 cores, as each search waited on the one before it),
alternates no-write windows (--quiet s) and stream windows
(--window s, --seconds in all). In a stream window a producer process sends upsert jobs of
--batch vectors at --rate vectors/s replacing random existing ids (the corpus keeps its size);
after it, every job is answered and a merge job folds the delta, so each no-write window
measures the index as it stands without writes. Each stream window's ratio is taken against the
mean of the no-write windows before and after it, so outside load on a shared machine hits both
sides alike. Target: >= 0.8 x the no-write QPS over the whole run, and in every stream window,
with maintenance on.
--no-maintenance sets FAISSQ_MAINTENANCE__ENABLED=false (nothing merges during the stream).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker_proc import start_worker  # noqa: E402

from faissq.cli.demo_data import clustered  # noqa: E402
from faissq.config import Settings  # noqa: E402
from faissq.rpc.search_client import SearchClient  # noqa: E402
from faissq.tasks.producer import JobClient  # noqa: E402
from faissq.worker.embedded_redis import EmbeddedRedis  # noqa: E402

INDEX = "stream"
TARGET = 0.8
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds a process used so far, all its threads (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def machine_busy_s() -> float:
    """CPU seconds all CPUs of the machine spent busy so far (outside load included)."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return 0.0
    return (sum(vals) - vals[3] - vals[4]) / TICK  # all but idle and iowait


class Window:
    """Searches answered and CPU used by the worker and by the whole machine in one window."""

    def __init__(self, search: Searchers, worker: int, redis: int) -> None:
        self.search, self.worker, self.redis = search, worker, redis

    def measure(self, seconds: float) -> dict[str, float]:
        """QPS; worker CPU ms per search; worker, Redis and this process's CPU ms per second;
        machine busy CPUs; over the next `seconds`."""
        procs = (self.worker, self.redis, os.getpid())
        c0, m0, t0 = self.search.count, machine_busy_s(), time.monotonic()
        cpu0 = [cpu_s(p) for p in procs]
        time.sleep(seconds)  # a measurement window, not a synchronisation
        dt = time.monotonic() - t0
        used = [1e3 * (cpu_s(p) - c) / dt for p, c in zip(procs, cpu0, strict=True)]
        done = max(1, self.search.count - c0)
        return {"qps": done / dt, "worker_ms": used[0] * dt / done, "worker_cpu": used[0],
                "redis_cpu": used[1], "client_cpu": used[2],
                "busy": (machine_busy_s() - m0) / dt}  # fmt: skip


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


def produce(redis_url: str, storage_url: str, n: int, dim: int, batch: int, rate: float,
            seed: int, ready: Any, stop: Any, sent: Any) -> None:  # fmt: skip
    """Producer process: once connected it sets `ready`; then, until `stop`, upsert jobs of
    `batch` vectors at `rate` vectors/s replacing existing ids; then it waits until every job
    is answered; `sent` gets the vectors sent.

    Its own process, as a real producer would be: its Python work does not take the GIL of
    the searching client threads.
    """
    jobs = JobClient(Settings(redis={"url": redis_url}, storage={"url": storage_url}))
    jobs.app.connection_for_write().ensure_connection()
    rng = np.random.default_rng(seed)
    period = batch / rate
    ready.set()
    nxt = time.monotonic()
    pending: list[Any] = []
    count = 0
    while not stop.is_set():
        ids = rng.choice(n, size=batch, replace=False)
        vectors = rng.standard_normal((batch, dim), dtype=np.float32)
        pending.append(jobs.upsert(INDEX, ids, vectors))
        count += batch
        pending = [r for r in pending if not r.ready()]
        nxt += period
        stop.wait(max(0.0, nxt - time.monotonic()))
    for r in pending:
        r.get(timeout=600)
    jobs.close()
    sent.value = count


def stream_window(args: argparse.Namespace, settings: Settings, window: Window,
                  seed: int) -> dict[str, float]:  # fmt: skip
    """One stream window: its figures plus the upserted vectors/s achieved."""
    ctx = mp.get_context("spawn")
    ready, stop, sent = ctx.Event(), ctx.Event(), ctx.Value("q", 0)
    proc = ctx.Process(target=produce, args=(str(settings.redis.url), settings.storage.url,
                                             args.n, args.dim, args.batch, args.rate, seed,
                                             ready, stop, sent))  # fmt: skip
    proc.start()
    if not ready.wait(120):  # the window opens once the producer runs (its imports take seconds)
        raise SystemExit("the producer did not start")
    p0 = cpu_s(proc.pid)
    t0 = time.monotonic()
    out = window.measure(args.window)
    elapsed = time.monotonic() - t0
    out["producer_cpu"] = 1e3 * (cpu_s(proc.pid) - p0) / elapsed
    stop.set()
    proc.join()
    return {**out, "rate": sent.value / elapsed}


def quiet_window(args: argparse.Namespace, jobs: JobClient, window: Window) -> dict[str, float]:
    """Fold the delta (a merge job, FIFO after every upsert), then measure without writes."""
    jobs.merge(INDEX).get(timeout=600)
    return window.measure(args.quiet)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, then interleave no-write and stream windows; returns the figures."""
    tmp = Path(tempfile.mkdtemp(prefix="faissq-stream-"))
    server = EmbeddedRedis(tmp / "redis", persistent=False)
    server.start()
    settings = Settings(redis={"url": server.url}, storage={"url": str(tmp / "data")})
    env = {"FAISSQ_MAINTENANCE__ENABLED": "false"} if args.no_maintenance else {}
    if args.merge_delta_max:
        env["FAISSQ_INDEX__MERGE_DELTA_MAX"] = str(args.merge_delta_max)
    env.update(kv.split("=", 1) for kv in args.worker_env)
    proc = start_worker(settings, [INDEX], tmp / "worker.log", "stream@local", env, 90)
    jobs = JobClient(settings)
    quiet: list[dict[str, float]] = []
    stream: list[dict[str, float]] = []
    try:
        x = clustered(args.n, args.dim, seed=1)
        jobs.build(INDEX, x, np.arange(args.n), family="ivf_flat",
                   by_reference=True).get(timeout=1200)  # fmt: skip
        search = Searchers(settings, x[:: max(1, args.n // 1000)].copy(), args.threads)
        search.start()
        window = Window(search, proc.pid, server.process.pid)
        window.measure(5)  # warm-up
        load0 = os.getloadavg()
        quiet.append(quiet_window(args, jobs, window))
        for i in range(math.ceil(args.seconds / args.window)):
            stream.append(stream_window(args, settings, window, 11 + i))
            quiet.append(quiet_window(args, jobs, window))
            print(f"# window {i}: stream {stream[-1]}, no-write {quiet[-2]} / {quiet[-1]}",
                  file=sys.stderr, flush=True)  # fmt: skip
        load1 = os.getloadavg()
        search.stop()
        stats = jobs.stats(INDEX).get(timeout=600)
    finally:
        jobs.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"quiet": quiet, "stream": stream, "stats": stats, "errors": search.errors,
            "load": (load0, load1)}  # fmt: skip


def main() -> None:
    """Run and print one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rate", type=float, default=1000.0, help="upserted vectors per second")
    ap.add_argument("--batch", type=int, default=100, help="vectors per upsert job")
    ap.add_argument("--threads", type=int, default=8, help="search client threads")
    ap.add_argument("--seconds", type=float, default=300.0, help="stream time in all")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per stream window")
    ap.add_argument("--quiet", type=float, default=15.0, help="seconds per no-write window")
    ap.add_argument("--merge-delta-max", type=int, default=0, help="0: the setting's default")
    ap.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the worker (repeatable)",
    )
    ap.add_argument("--no-maintenance", action="store_true", help="no merges during the stream")
    args = ap.parse_args()
    r = run(args)
    (l0, l1) = r["load"]
    maint = "off" if args.no_maintenance else "on"
    print(f"# n={args.n} dim={args.dim} IVF-Flat, {args.threads} search threads, upserts "
          f"{args.batch}/job at {args.rate:.0f} vectors/s, maintenance {maint}; "
          f"{platform.node()} {os.cpu_count()} CPUs; load average {l0[0]:.1f} at the start, "
          f"{l1[0]:.1f} at the end")  # fmt: skip
    print("| stream window | no-write QPS (before / after) | stream QPS | x no-write | target | "
          "worker CPU ms per search (no-write / stream) | upserts/s |")  # fmt: skip
    print("|---|---:|---:|---:|---|---:|---:|")
    ratios = []
    for i, w in enumerate(r["stream"]):
        before, after = r["quiet"][i], r["quiet"][i + 1]
        ratio = w["qps"] / ((before["qps"] + after["qps"]) / 2)
        ratios.append(ratio)
        ok = "met" if ratio >= TARGET else "MISSED"
        span = f"{i * args.window:.0f}-{(i + 1) * args.window:.0f} s"
        q_ms = (before["worker_ms"] + after["worker_ms"]) / 2
        print(f"| {span} | {before['qps']:.0f} / {after['qps']:.0f} | {w['qps']:.0f} | "
              f"{ratio:.2f} | >= {TARGET} ({ok}) | {q_ms:.2f} / {w['worker_ms']:.2f} | "
              f"{w['rate']:.0f} |")  # fmt: skip
    busy = np.mean([w["busy"] for w in r["quiet"] + r["stream"]])
    cpu = {k: (np.mean([w[k] for w in r["quiet"]]), np.mean([w[k] for w in r["stream"]]))
           for k in ("worker_cpu", "redis_cpu", "client_cpu")}  # fmt: skip
    producer = np.mean([w["producer_cpu"] for w in r["stream"]])
    st = r["stats"]
    eng, mt = st.get("engine", {}), st.get("maintenance", {})
    whole = np.mean([w["qps"] for w in r["stream"]]) / np.mean([w["qps"] for w in r["quiet"]])
    print(f"# stream windows meeting the target: {sum(x >= TARGET for x in ratios)}/{len(ratios)}"
          f"; min ratio {min(ratios):.2f}; all stream time over all no-write time: {whole:.2f} "
          f"x no-write QPS; search errors {r['errors']}; maintenance merges "
          f"{mt.get('merges')}, saves {mt.get('saves')}; end: delta {eng.get('delta')}, "
          f"tombstones {eng.get('tombstones')}; the machine's CPUs were busy {busy:.2f} of "
          f"{os.cpu_count()} on average (outside load included)")  # fmt: skip
    print("# CPU ms per second, no-write -> stream: worker {:.0f} -> {:.0f}, Redis {:.0f} -> "
          "{:.0f}, search clients {:.0f} -> {:.0f}, upsert producer {:.0f}".format(
              *cpu["worker_cpu"], *cpu["redis_cpu"], *cpu["client_cpu"], producer))  # fmt: skip


if __name__ == "__main__":
    main()
