"""The processes of benchmarks/rpc.py: Redis, a faissq worker and the baselines' stand-ins.

Roles run as `python benchmarks/rpc_rig.py --role ...`, started by `Rig`: a no-op echo worker
(row b), faissq's RPC loop over a no-op engine (c0), a Celery worker (d) and client processes
(e4). Not a command of its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis

from faissq import codec
from faissq.config import Settings
from faissq.index.engine import SearchResult
from faissq.rpc.search_client import SearchClient
from faissq.rpc.server import RpcServer
from faissq.storage.durable import DurableStore
from faissq.worker.app import make_celery_app
from faissq.worker.embedded_redis import EmbeddedRedis

INDEX = "bench"
ECHO = "bench:echo"  # the no-op worker's request list
CELERY_QUEUE = "bench.celery"
NOOP_INDEX = "bench-noop"  # served by faissq's RPC loop over an engine that does nothing


def settings_for(url: str, storage: str, *, coalesce: bool = True) -> Settings:
    """Settings of every process of the run (coalesce: clients merge concurrent searches)."""
    return Settings(redis={"url": url}, storage={"url": storage}, metrics={"enabled": False},
                    gpu={"mode": "off"}, worker={"indexes": [INDEX]},
                    rpc={"coalesce": coalesce})  # fmt: skip


def bench_app(settings: Settings) -> Any:
    """A Celery app configured like faissq's, with one search task over the loaded engine."""
    app = make_celery_app(settings, main="bench")
    engine: list[Any] = []

    @app.task(name="bench.search", queue=CELERY_QUEUE)  # type: ignore[misc]
    def search(queries: dict[str, Any], k: int, nprobe: int) -> dict[str, Any]:
        if not engine:
            engine.append(DurableStore(settings).recover(INDEX).engine)
        res = engine[0].search(codec.unpack_array(queries), k, nprobe=nprobe)
        return {"scores": codec.pack_array(res.scores), "ids": codec.pack_array(res.ids),
                "version": res.version}  # fmt: skip

    app.bench_search = search
    return app


def run_celery_worker(url: str, storage: str) -> None:
    """Role: a Celery worker (threads pool, one thread, like faissq's) serving bench.search."""
    app = bench_app(settings_for(url, storage))
    app.worker_main(["worker", "--pool=threads", "--concurrency=1", f"--queues={CELERY_QUEUE}",
                     "--without-mingle", "--without-gossip", "--loglevel=WARNING"])  # fmt: skip


def run_echo(url: str, reply_bytes: int) -> None:
    """Role: the no-op worker of row (b): BRPOP, read the reply key, LPUSH a same-size reply."""
    r = redis.Redis.from_url(url)
    payload = b"x" * reply_bytes
    while True:
        got = r.brpop([ECHO], timeout=1)
        if got is None:
            continue
        msg = msgpack.unpackb(got[1], raw=False)
        r.lpush(msg["reply"], payload)


def run_client(args: argparse.Namespace) -> None:
    """Role: one client process of row (e4): search one query at a time from `start` on."""
    client = SearchClient(settings_for(args.url, args.storage), INDEX)
    queries = np.random.default_rng(args.seed).standard_normal((1024, args.dim), np.float32)
    client.search(queries[:1], args.k, nprobe=args.nprobe)  # connect before the clock starts
    time.sleep(max(0.0, args.start - time.time()))
    lat, i, stop = [], 0, time.perf_counter() + args.seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        client.search(queries[i % 1024 : i % 1024 + 1], args.k, nprobe=args.nprobe)
        lat.append(time.perf_counter() - t0)
        i += 1
    np.save(args.out, np.asarray(lat))


class NoopEngine:
    """An engine that answers at once: isolates the RPC machinery from the search itself."""

    def __init__(self, dim: int) -> None:
        self.dim, self.version, self.ntotal = dim, 1, 0
        self.schema: dict[str, str] = {}  # no attribute fields, as the heartbeat reports

    def search(self, queries: Any, k: int, **_: Any) -> Any:
        """Zeros of the right shape."""
        n = len(queries)
        return SearchResult(np.zeros((n, k), np.float32), np.zeros((n, k), np.int64), 1)


def run_noop_rpc(url: str, storage: str, dim: int) -> None:
    """Role: faissq's RPC loop for index NOOP_INDEX over an engine that does nothing."""
    settings = settings_for(url, storage)
    noop: Any = NoopEngine(dim)
    RpcServer(settings, NOOP_INDEX, lambda: noop).run()


class Rig:
    """The processes of one run: Redis, a faissq worker, the no-op worker, a Celery worker."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        """Start Redis; nothing else yet."""
        self.args = args
        self.tmp = tmp
        self.redis = EmbeddedRedis(tmp / "redis", unix_socket=args.transport == "unix",
                                   persistent=False)  # fmt: skip
        self.url = self.redis.start()
        self.storage = str(tmp / "storage")
        self.settings = settings_for(self.url, self.storage)
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], name: str, env: dict[str, str] | None = None,
              cpus: set[int] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start a child process logging to tmp/<name>.log (pinned to `cpus` when given)."""
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        full_env = {**os.environ, **(env or {})}
        pin = None if cpus is None else lambda: os.sched_setaffinity(0, cpus)
        proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=pin)  # fmt: skip
        self.procs.append(proc)
        return proc

    def start_all(self, reply_bytes: int) -> None:
        """The faissq worker, the echo worker and the Celery worker."""
        env = {"FAISSQ_REDIS__URL": self.url, "FAISSQ_STORAGE__URL": self.storage,
               "FAISSQ_METRICS__ENABLED": "false", "FAISSQ_GPU__MODE": "off",
               "FAISSQ_RPC__BATCH_WINDOW_MS": str(self.args.batch_window_ms)}  # fmt: skip
        cpus = self.args.worker_cpus
        if cpus:
            env["OMP_NUM_THREADS"] = str(len(cpus))
        argv = [sys.executable, "-m", "faissq", "worker", "--index", INDEX, "-l", "WARNING"]
        self.worker = self.spawn(argv, "faissq-worker", env, cpus)
        me = [sys.executable, __file__, "--url", self.url, "--storage", self.storage]
        # the baselines' workers answer where faissq's does: (b), (c0) and (d) then compare
        # like with like, and none of them takes CPU from the clients and Redis
        self.spawn([*me, "--role", "echo", "--reply-bytes", str(reply_bytes)], "echo", env, cpus)
        self.spawn([*me, "--role", "celery"], "celery", env, cpus)
        self.spawn([*me, "--role", "noop-rpc", "--dim", str(self.args.dim)], "noop-rpc", env,
                   cpus)  # fmt: skip

    def worker_cpu_s(self) -> float:
        """CPU seconds (user + system) the faissq worker process has used so far."""
        fields = Path(f"/proc/{self.worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def client_processes(
        self, n: int, seconds: float, k: int, nprobe: int
    ) -> tuple[float, list[float]]:
        """QPS and latencies of n client processes searching in a loop for `seconds` together."""
        start = time.time() + 3.0  # time for every process to import and connect
        me = [sys.executable, __file__, "--url", self.url, "--storage", self.storage,
              "--role", "client", "--dim", str(self.args.dim), "--k", str(k),
              "--nprobe", str(nprobe), "--seconds", str(seconds),
              "--start", str(start)]  # fmt: skip
        outs = [self.tmp / f"client-{uuid.uuid4().hex[:8]}.npy" for _ in range(n)]
        procs = [subprocess.Popen([*me, "--seed", str(c), "--out", str(out)])
                 for c, out in enumerate(outs)]  # fmt: skip
        for proc in procs:
            if proc.wait(timeout=seconds + 120) != 0:
                raise SystemExit("a client process failed")
        lat = [float(x) for out in outs for x in np.load(out)]
        return len(lat) / seconds, lat

    def stop(self) -> None:
        """Terminate the children and Redis."""
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.stop()


def main() -> None:
    """Run one role (started by Rig)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["echo", "celery", "noop-rpc", "client"], required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--reply-bytes", type=int, default=0)
    ap.add_argument("--start", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.role == "echo":
        run_echo(args.url, args.reply_bytes)
    elif args.role == "noop-rpc":
        run_noop_rpc(args.url, args.storage, args.dim)
    elif args.role == "celery":
        run_celery_worker(args.url, args.storage)
    else:
        run_client(args)


if __name__ == "__main__":
    main()
