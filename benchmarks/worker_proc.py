"""Start a real `faissq worker` subprocess for a benchmark and wait until it answers a ping."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from faissq.config import Settings
from faissq.tasks.producer import JobClient

REPO = Path(__file__).resolve().parents[1]


def start_worker(
    settings: Settings,
    indexes: list[str],
    log: Path,
    node: str,
    env_extra: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> subprocess.Popen[bytes]:
    """One worker serving `indexes` (metrics and GPU off), its output in `log`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAISSQ_")}
    env.update(FAISSQ_REDIS__URL=str(settings.redis.url),
               FAISSQ_STORAGE__URL=settings.storage.url, FAISSQ_METRICS__ENABLED="false",
               FAISSQ_GPU__MODE="off", PYTHONPATH=str(REPO), **(env_extra or {}))  # fmt: skip
    argv = [sys.executable, "-m", "faissq", "worker", "-n", node, "-l", "WARNING"]
    for name in indexes:
        argv += ["--index", name]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = JobClient(settings)
    deadline = time.monotonic() + timeout_s
    while not client.app.control.ping(destination=[node], timeout=0.5, limit=1):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start:\n{log.read_text()[-3000:]}")
    client.close()
    return proc
