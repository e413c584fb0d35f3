"""Task benchmark: enqueue-to-applied upsert throughput and build wall time, against in-process.

    python benchmarks/tasks.py            # 1k and 10k vectors per upsert job, 200k x 128 build
    python benchmarks/tasks.py --quick    # smaller, about half a minute

One run starts a private redis-server (unix socket) and a real `faissq worker` subprocess on a
temp storage root (fsync on), sends jobs the way an upstream service does (JobClient: inline
frames or .npy references) and prints one markdown table. The in-process baselines run in this
process on the same data: `Engine.upsert` for upserts, faiss train + add_with_ids for builds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker_proc import start_worker  # noqa: E402

from faissq.config import Settings  # noqa: E402
from faissq.index.engine import Engine  # noqa: E402
from faissq.tasks.producer import JobClient  # noqa: E402
from faissq.worker.embedded_redis import EmbeddedRedis  # noqa: E402

INDEX = "bench"
DIM = 128
Row = tuple[str, float, str]  # name, seconds, note


def vectors(n: int, seed: int) -> np.ndarray:
    """Gaussian float32 vectors (n, DIM)."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def upsert_jobs(
    client: JobClient, batches: list[tuple[np.ndarray, np.ndarray]], by_reference: bool
) -> float:
    """Send every batch as one upsert job, wait for all results; seconds from first send."""
    t0 = time.perf_counter()
    results = [client.upsert(INDEX, ids, x, by_reference=by_reference) for ids, x in batches]
    for r in results:
        out = r.get(timeout=600)
        if out["duplicate"]:
            raise SystemExit("a benchmark batch was a duplicate")
    return time.perf_counter() - t0


def engine_upserts(base: np.ndarray, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The same batches through Engine.upsert in this process (same base index)."""
    eng = Engine(DIM, Settings().index, name=INDEX)
    eng.build(base, np.arange(len(base)), family="ivf_flat")
    t0 = time.perf_counter()
    for ids, x in batches:
        eng.upsert(ids, x)
    return time.perf_counter() - t0


def raw_faiss_build(x: np.ndarray, factory: str, train_n: int, seed: int) -> float:
    """train + add_with_ids of the same factory on the same data, cosine (normalised copy)."""
    t0 = time.perf_counter()
    xn = x.copy()
    faiss.normalize_L2(xn)
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(len(xn), size=min(train_n, len(xn)), replace=False)
    index.train(xn[np.sort(sample)])
    index.add_with_ids(xn, np.arange(len(xn), dtype=np.int64))
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> list[Row]:
    """Run every measurement and return the table rows."""
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="faissq-bench-"))
    redis_server = EmbeddedRedis(tmp / "redis", persistent=False)
    redis_server.start()
    settings = Settings(redis={"url": redis_server.url}, storage={"url": str(tmp / "data")})
    proc = start_worker(settings, [INDEX], tmp / "worker.log", "bench@local", timeout_s=60)
    client = JobClient(settings)
    try:
        base = vectors(args.base, 0)
        next_id = 10_000_000
        for per_job, jobs in ((1_000, args.jobs_1k), (10_000, args.jobs_10k)):
            batches = []
            for j in range(jobs):
                batches.append((np.arange(next_id, next_id + per_job), vectors(per_job, 100 + j)))
                next_id += per_job
            total = per_job * jobs
            # interleaved repetitions, best of each: load drift on a shared machine hits all
            # three alike instead of favouring whichever ran in the quiet minute
            times: dict[str, list[float]] = {"raw": [], "ref": [], "inline": []}
            for _ in range(args.repeat):
                times["raw"].append(engine_upserts(base, batches))
                for how in ("ref", "inline"):
                    client.build(INDEX, base, family="ivf_flat").get(timeout=600)  # same base
                    times[how].append(upsert_jobs(client, batches, by_reference=how == "ref"))
                    batches = [(ids + 100_000_000, x) for ids, x in batches]  # new batch ids
            raw = min(times["raw"])
            rows.append(
                (
                    f"Engine.upsert in process, {per_job:,}/batch x {jobs}",
                    raw,
                    f"{total / raw:,.0f} vec/s",
                )
            )
            for how, label in (
                ("ref", "by reference (.npy, incl. writing it)"),
                ("inline", "inline frame"),
            ):
                t = min(times[how])
                rows.append(
                    (
                        f"upsert jobs {label}, {per_job:,}/job x {jobs}",
                        t,
                        f"{total / t:,.0f} vec/s = {raw / t:.2f}x in-process; "
                        f"{1000 * t / jobs:.1f} ms/job",
                    )
                )

        x = vectors(args.build, 1)
        report = client.build(INDEX, x, family="ivf_flat").get(timeout=600)  # warm-up, plan
        factory = str(report["factory"])
        nlist = int(factory.split(",")[0].removeprefix("IVF"))
        train_n = nlist * Settings().index.train_points_per_centroid
        eng = Engine(DIM, Settings().index, name=INDEX)
        raw_runs, eng_runs, task_runs = [], [], []
        for _ in range(args.repeat):
            raw_runs.append(raw_faiss_build(x, factory, train_n, 1))
            t0 = time.perf_counter()
            out = client.build(INDEX, x, family="ivf_flat", by_reference=True).get(timeout=600)
            task_runs.append((time.perf_counter() - t0, float(out["save_seconds"])))
            eng_runs.append(_timed(lambda: eng.build(x, np.arange(len(x)), family="ivf_flat")))
        raw_b, eng_b = min(raw_runs), min(eng_runs)
        task_b, save_b = min(task_runs)
        rows.append((f"raw faiss build {factory}, {args.build:,} x {DIM}", raw_b, "baseline"))
        rows.append(
            (
                f"faissq.build task (by reference), {args.build:,} x {DIM}",
                task_b,
                f"{task_b / raw_b:.2f}x raw; enqueue to result, snapshot included",
            )
        )
        rows.append(
            (
                "  of which the durable snapshot save",
                save_b,
                f"without it: {(task_b - save_b) / raw_b:.2f}x raw",
            )
        )
        rows.append(
            (f"Engine.build in process, {args.build:,} x {DIM}", eng_b, f"{eng_b / raw_b:.2f}x raw")
        )
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        redis_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of fn takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    """Parse arguments, run, print the table."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (best is kept)")
    args = ap.parse_args()
    args.base = 20_000
    args.jobs_1k, args.jobs_10k = (20, 4) if args.quick else (50, 10)
    args.build = 50_000 if args.quick else 200_000
    rows = run(args)
    print(
        f"\nfaiss {faiss.__version__}, {os.cpu_count()} CPUs, dim {DIM}, cosine, base "
        f"{args.base:,} vectors (IVF-Flat), fsync on\n"
    )
    print("| measurement | seconds | note |")
    print("|---|---:|---|")
    for name, seconds, note in rows:
        print(f"| {name} | {seconds:.3f} | {note} |")


if __name__ == "__main__":
    main()
