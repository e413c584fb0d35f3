"""The main job end to end: embedded Redis, a worker, Flower, build, autotune, RPC searches."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq.cli.demo_data import clustered, queries_like
from faissq.cli.progress_view import print_profile, wait_with_progress
from faissq.config import Settings, masked_url

DEMO_INDEX = "demo"


def _free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a child process with output to a log file; stop it (TERM, then KILL) on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def flower_command(env: dict[str, str], port: int) -> tuple[list[str], dict[str, str]]:
    """Flower's argv and environment: the broker URL, which may hold a password, goes through
    the environment (Celery reads CELERY_BROKER_URL), never on the command line `ps` shows."""
    argv = [sys.executable, "-m", "celery", "flower", f"--port={port}"]
    return argv, {**env, "CELERY_BROKER_URL": env["FAISSQ_REDIS__URL"]}


F32 = npt.NDArray[np.float32]


def _load_vectors(args: argparse.Namespace) -> tuple[F32, F32]:
    """The corpus and held-out queries: generated clustered data, or a user .npy file."""
    if args.vectors is not None:
        xb = np.load(args.vectors, mmap_mode="r", allow_pickle=False).astype(np.float32)
        rng = np.random.default_rng(0)
        rows = rng.choice(xb.shape[0], size=min(args.queries, xb.shape[0]), replace=False)
        noise = rng.standard_normal((rows.size, xb.shape[1])).astype(np.float32) * 0.01
        return xb, xb[rows] + noise * np.abs(xb).mean()
    clusters = max(8, int(np.sqrt(args.n)))
    xb = clustered(args.n, args.dim, clusters=clusters, spread=1.4, seed=1)
    xq = queries_like(args.n, args.dim, clusters=clusters, spread=1.4, seed=1, nq=args.queries)
    return xb, xq


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Start everything, build, autotune, search through the RPC, print the figures."""
    from faissq.cli.worker_command import redis_for
    from faissq.rpc.search_client import SearchClient
    from faissq.tasks.producer import JobClient

    root = Path(settings.storage.url).resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(
        update={"storage": settings.storage.model_copy(update={"url": str(root)})}
    )
    xb, xq = _load_vectors(args)
    print(f"faissq demo: {xb.shape[0]} x {xb.shape[1]} vectors, storage at {root}")
    with contextlib.ExitStack() as stack:
        settings = stack.enter_context(redis_for(settings))
        url = str(settings.redis.url)
        metrics_port = settings.metrics.port
        env = {
            **os.environ,
            "FAISSQ_REDIS__URL": url,
            "FAISSQ_STORAGE__URL": str(root),
            "FAISSQ_METRICS__PORT": str(metrics_port),
        }
        print(f"  redis      {masked_url(url)}")
        stack.enter_context(
            _process(
                [sys.executable, "-m", "faissq", "worker", "--index", DEMO_INDEX],
                env,
                root / "worker.log",
            )
        )
        flower_url = None
        if not args.no_flower:
            port = _free_port()
            stack.enter_context(_process(*flower_command(env, port), root / "flower.log"))
            flower_url = f"http://127.0.0.1:{port}"
        jobs = JobClient(settings)
        stack.callback(jobs.close)
        t0 = time.perf_counter()
        report = wait_with_progress(jobs.build(DEMO_INDEX, xb, np.arange(xb.shape[0])))
        build_s = time.perf_counter() - t0
        print(f"  family     {report.get('family')} ({report.get('factory')})")
        print(f"  why        {report.get('reason')}")
        inner = float(report.get("seconds", 0))
        print(f"  build      {build_s:.2f} s end to end ({inner:.2f} s in the engine)")
        profile = wait_with_progress(jobs.autotune(DEMO_INDEX, target_recall=args.target_recall))
        print_profile(profile.get("profile", profile))
        client = SearchClient(settings, index=DEMO_INDEX)
        stack.callback(client.close)
        lat = _time_searches(client, xq, args.k)
        print(
            f"  RPC search p50 {np.percentile(lat, 50):.3f} ms, p99 {np.percentile(lat, 99):.3f} ms"
            f" over {lat.size} single-query searches"
        )
        if flower_url:
            print(f"  Flower     {flower_url}")
        if settings.metrics.enabled:
            print(f"  metrics    http://127.0.0.1:{metrics_port}/metrics")
        print(f"  logs       {root / 'worker.log'}")
        if args.serve:
            print("serving; Ctrl-C stops everything")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
    return 0


def _time_searches(client: Any, xq: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.float64]:
    """Latency in ms of one RPC search per query row (after a short warm-up)."""
    for row in xq[: min(20, len(xq))]:
        client.search(row[None, :], k)
    out = []
    for row in xq:
        t = time.perf_counter()
        client.search(row[None, :], k)
        out.append((time.perf_counter() - t) * 1000)
    return np.asarray(out)
