"""`faissq worker` on a bare machine: no Redis URL, an embedded redis-server, soft shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from faissq.config import Settings
from faissq.tasks.producer import JobClient

REPO = Path(__file__).resolve().parents[2]


def test_embedded_redis_worker_finishes_its_job_on_sigterm_and_stops_redis(tmp_path: Path) -> None:
    """Jobs flow through the embedded Redis; SIGTERM lets the running build finish, then exits."""
    storage = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAISSQ_")}
    env.update(FAISSQ_STORAGE__URL=str(storage), FAISSQ_METRICS__ENABLED="false",
               FAISSQ_GPU__MODE="off", PYTHONPATH=str(REPO))  # fmt: skip
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    argv = [sys.executable, "-m", "faissq", "worker", "--index", "emb"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    sock = storage / ".redis" / "redis.sock"
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no embedded Redis"
            time.sleep(0.05)
        settings = Settings(
            redis={"url": f"unix://{sock.resolve()}"}, storage={"url": str(storage)}
        )
        client = JobClient(settings)
        x = np.random.default_rng(0).standard_normal((60_000, 32)).astype(np.float32)
        build = client.build("emb", x, family="hnsw")  # seconds long: SIGTERM lands mid-build
        while build.state not in ("STARTED", "PROGRESS"):
            assert time.monotonic() < deadline + 30, "the build never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # warm shutdown: the running job completes first
        assert build.get(timeout=60)["ntotal"] == 60_000
        assert proc.wait(60) == 0
        assert not sock.exists() or not _answers(sock)
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "worker.log").read_text()
    assert "embedded Redis at unix://" in text, text[-2000:]


def _answers(sock: Path) -> bool:
    """Say whether a Redis answers on the socket."""
    import redis

    try:
        return bool(redis.Redis(unix_socket_path=str(sock), socket_timeout=1).ping())
    except redis.ConnectionError:
        return False
