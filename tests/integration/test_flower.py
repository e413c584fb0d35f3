"""Flower (a real `celery flower` process on the same Redis) sees every job and the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from faissq.config import Settings
from faissq.tasks.producer import JobClient
from faissq.worker.embedded_redis import free_port

TIMEOUT = 60
REPO = Path(__file__).resolve().parents[2]


def get_json(url: str) -> Any:
    """GET a Flower API URL and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A `celery flower` subprocess with its API open; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "FLOWER_UNAUTHENTICATED_API": "true",
        "FAISSQ_REDIS__URL": redis_url,
        "PYTHONPATH": str(REPO),
    }
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "faissq.worker.monitor", "flower",
         f"--port={port}", "--address=127.0.0.1", "--persistent=False",
         # a worker busy building on a loaded host may answer an inspect after Flower's 1 s
         "--inspect_timeout=15000"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            pytest.fail("flower did not start: " + (tmp_path / "flower.log").read_text()[-2000:])
        try:
            urllib.request.urlopen(base + "/healthcheck", timeout=1).close()
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    yield base
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_flower_lists_jobs_and_the_worker_stays_online_during_a_long_build(
    flower: str, worker_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """During a multi-second build Flower reaches the worker; afterwards it lists every job."""
    worker = worker_factory([index_name], env={"FAISSQ_WORKER__PROGRESS_INTERVAL_S": "0.2"})
    worker.start()
    deadline = time.monotonic() + 15
    while not get_json(f"{flower}/api/workers?status=1").get(worker.hostname):
        assert time.monotonic() < deadline, "Flower never saw the worker's heartbeat"
        time.sleep(0.1)
    client = JobClient(job_settings)
    rng = np.random.default_rng(3)
    small = client.build(index_name, rng.standard_normal((200, 16)).astype(np.float32))
    small.get(timeout=TIMEOUT)
    bad = client.delete(index_name, [-1])
    # HNSW on this many vectors builds for seconds on two cores
    big = client.build(
        index_name, rng.standard_normal((60_000, 32)).astype(np.float32), family="hnsw"
    )

    online_checks, progress = 0, []
    while not big.ready():
        # heartbeat events say it is alive; a refresh makes Flower inspect it over the broker
        assert get_json(f"{flower}/api/workers?status=1").get(worker.hostname) is True
        inspected = get_json(f"{flower}/api/workers?refresh=1&workername={worker.hostname}")
        assert inspected[worker.hostname]["active_queues"][0]["name"] == f"faissq.{index_name}"
        online_checks += 1
        info = get_json(f"{flower}/api/task/info/{big.id}")
        if info.get("state") == "PROGRESS":
            progress.append(json.loads(info["result"]))
    assert big.get(timeout=TIMEOUT)["ntotal"] == 60_000
    assert online_checks >= 2, "the build ended before Flower was asked twice"
    assert progress, "Flower never showed the build's progress"
    assert {"phase", "done", "total"} <= progress[-1].keys()

    def listed() -> dict[str, Any]:
        tasks: dict[str, Any] = get_json(f"{flower}/api/tasks")
        return tasks

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tasks = listed()
        if all(
            tasks.get(r.id, {}).get("state") in ("SUCCESS", "FAILURE") for r in (small, bad, big)
        ):
            break
        time.sleep(0.2)
    assert tasks[small.id]["name"] == "faissq.build" and tasks[small.id]["state"] == "SUCCESS"
    assert tasks[big.id]["state"] == "SUCCESS" and tasks[big.id]["worker"] == worker.hostname
    assert tasks[bad.id]["name"] == "faissq.delete" and tasks[bad.id]["state"] == "FAILURE"
    assert "InvalidIds" in tasks[bad.id]["exception"]
    assert worker.alive()
    client.close()
