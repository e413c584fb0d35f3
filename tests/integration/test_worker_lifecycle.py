"""A writer's start on real parts: one writer per index, storage trouble at start, no secrets.

Workers are `faissq worker` subprocesses on the session's redis-server; storage faults come
from `faultfs://` and its control file; every wait is for an event.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import REPO, WorkerProcess
from test_metrics_live import free_port, get
from test_write_integrity import faulty_env, vec, wait_for

from faissq import keys
from faissq.config import Settings
from faissq.storage import faults
from faissq.tasks.producer import JobClient
from faissq.telemetry.healthcheck import check
from faissq.worker.embedded_redis import EmbeddedRedis

TIMEOUT = 60


def hold_a_job(jobs: JobClient, index: str, control: Path, redis_client: redis.Redis) -> Any:
    """An upsert the running writer has started and holds, retrying a failing storage write."""
    faults.set_faults(str(control), ["write"], errno="EIO")
    job = jobs.upsert(index, [1], vec(1), by_reference=False)
    wait_for(lambda: redis_client.exists(keys.delivery_key(job.id)), "the job to start")
    wait_for(lambda: faults.hits(str(control)) >= 1, "the job to meet the storage fault")
    return job


def test_a_second_writer_refuses_to_start_and_leaves_the_running_job_alone(
    worker_factory: Any, storage_root: Path, tmp_path: Path, index_name: str,
    job_settings: Settings, redis_client: redis.Redis,
) -> None:  # fmt: skip
    """A second `faissq worker` of an index (a rolling deploy) exits with a clear error while
    the first runs a job; the job is not re-queued, and completes on the first writer."""
    control = tmp_path / "faults.json"
    env = faulty_env(storage_root, control)
    first = worker_factory([index_name], env=env).start()
    jobs = JobClient(job_settings)
    job = hold_a_job(jobs, index_name, control, redis_client)

    second = worker_factory([index_name], env=env).start(wait=False)
    assert second.proc is not None
    try:
        code = second.proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the second writer kept running:\n{second.log_tail()}")
    out = second.log_tail(20_000)
    assert code != 0
    assert f"index '{index_name}' already has a writer" in out
    assert "requeued" not in out
    assert redis_client.llen(keys.task_queue(index_name)) == 0  # nothing put back

    faults.set_faults(str(control), [])
    result = job.get(timeout=TIMEOUT)
    assert result["seq"] == 1 and not result["duplicate"]
    assert first.alive()
    jobs.close()


def lockless_env(storage_root: Path, control: Path, **extra: str) -> dict[str, str]:
    """faulty_env through fsspec's dir:: wrapper: storage that is not a local folder (no
    flock), as on an object store, still failing on command."""
    return {
        **faulty_env(storage_root, control, **extra),
        "FAISSQ_STORAGE__URL": f"dir::faultfs://{storage_root}",
        "FAISSQ_STORAGE__OPTIONS": json.dumps({"faultfs": {"control": str(control)}}),
    }


def test_a_second_writer_on_a_lockless_store_refuses_to_start_and_leaves_the_running_job_alone(
    worker_factory: Any, storage_root: Path, tmp_path: Path, index_name: str,
    job_settings: Settings, redis_client: redis.Redis,
) -> None:  # fmt: skip
    """Where storage has no lock, the writer's Redis lease fences a second writer: it watches
    the lease being renewed, exits naming the holder, and re-queues nothing."""
    control = tmp_path / "faults.json"
    env = lockless_env(storage_root, control, FAISSQ_WORKER__WRITER_LEASE_S="6")
    first = worker_factory([index_name], env=env).start()
    holder = redis_client.get(keys.writer_lease(index_name))
    assert holder is not None and first.hostname in holder.decode()
    jobs = JobClient(job_settings)
    job = hold_a_job(jobs, index_name, control, redis_client)

    second = worker_factory([index_name], env=env).start(wait=False)
    assert second.proc is not None
    wait_for(lambda: not second.alive() or " ready." in second.log_tail(20_000),
             "the second writer to exit or start", TIMEOUT)  # fmt: skip
    out = second.log_tail(20_000)
    assert not second.alive(), f"the second writer started:\n{out}"
    assert second.proc.returncode != 0
    assert f"index '{index_name}' already has a writer" in out
    assert f"writer {holder.decode()} holds the lease" in out
    assert "requeued" not in out
    assert redis_client.llen(keys.task_queue(index_name)) == 0  # nothing put back

    faults.set_faults(str(control), [])
    result = job.get(timeout=TIMEOUT)
    assert result["seq"] == 1 and not result["duplicate"]
    assert first.alive() and redis_client.get(keys.writer_lease(index_name)) == holder
    jobs.close()


@pytest.mark.parametrize("lockless", [True, False], ids=["lockless", "local"])
def test_a_writer_killed_by_sigkill_is_succeeded_once_its_lease_is_free(
    worker_factory: Any, storage_root: Path, tmp_path: Path, index_name: str,
    job_settings: Settings, redis_client: redis.Redis, lockless: bool,
) -> None:  # fmt: skip
    """kill -9 leaves the lease behind. A lockless store's next writer takes it once it
    expires unrenewed; on a local folder the log's lock proves the holder dead, so the next
    writer takes it over at once (a lease of 10 minutes would outlast the start timeout)."""
    control = tmp_path / "faults.json"
    make_env = lockless_env if lockless else faulty_env
    env = make_env(storage_root, control, FAISSQ_WORKER__WRITER_LEASE_S="6" if lockless else "600")
    first = worker_factory([index_name], env=env).start()
    jobs = JobClient(job_settings)
    assert jobs.upsert(index_name, [0], vec(0), by_reference=False).get(timeout=TIMEOUT)["seq"] == 1
    dead = redis_client.get(keys.writer_lease(index_name))
    assert dead is not None
    first.kill()

    second = worker_factory([index_name], env=env).start()
    out = second.log_tail(20_000)
    if lockless:
        assert f"the writer lease of {dead.decode()} expired unrenewed: taken" in out
    else:
        assert f"took over the writer lease of {dead.decode()}" in out
    now = redis_client.get(keys.writer_lease(index_name))
    assert now is not None and second.hostname in now.decode()
    result = jobs.upsert(index_name, [1], vec(1), by_reference=False).get(timeout=TIMEOUT)
    assert result["seq"] == 2 and result["ntotal"] == 2
    assert second.stop() == 0
    assert redis_client.get(keys.writer_lease(index_name)) is None  # released on a clean stop
    jobs.close()


def test_a_storage_blip_at_start_delays_the_writer_and_its_jobs_wait(
    worker_factory: Any, storage_root: Path, tmp_path: Path, index_name: str,
    job_settings: Settings,
) -> None:  # fmt: skip
    """Storage fails while the writer loads: it retries, is not ready (readyz, healthcheck),
    a job sent meanwhile waits; once storage answers the index loads and the job succeeds."""
    control = tmp_path / "faults.json"
    port = free_port()
    metrics = {"FAISSQ_METRICS__ENABLED": "true", "FAISSQ_METRICS__PORT": str(port),
               "FAISSQ_METRICS__HOST": "127.0.0.1"}  # fmt: skip
    worker = worker_factory([index_name], env=faulty_env(storage_root, control, **metrics))
    worker.start()
    jobs = JobClient(job_settings)
    assert jobs.upsert(index_name, [0], vec(0), by_reference=False).get(timeout=TIMEOUT)["seq"] == 1
    assert worker.stop() == 0

    faults.set_faults(str(control), ["read"], errno="EIO")
    worker.start(wait=False)
    wait_for(lambda: faults.hits(str(control)) >= 3, "three failed reads at start")
    wait_for(lambda: "storage unavailable" in worker.log_tail(20_000), "a retry at start")
    local = job_settings.model_copy(update={"metrics": job_settings.metrics.model_copy(
        update={"enabled": True, "port": port, "host": "127.0.0.1"})})  # fmt: skip
    status, body = get(f"http://127.0.0.1:{port}/readyz")
    assert status == 503 and json.loads(body)["indexes"][index_name]["state"] == "loading"
    assert check(local) == (False, f"not loaded: {index_name} loading")
    job = jobs.upsert(index_name, [1], vec(1), by_reference=False)
    assert worker.alive() and job.state == "PENDING"  # waits in its queue, nothing failed

    faults.set_faults(str(control), [])
    result = job.get(timeout=TIMEOUT)
    assert result["seq"] == 2 and result["ntotal"] == 2
    assert get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    assert check(local) == (True, f"loaded: {index_name} ready")
    jobs.close()


@pytest.fixture
def password_redis(tmp_path: Path) -> Any:
    """A redis-server of this test that requires the password s3cret."""
    server = EmbeddedRedis(tmp_path / "redis-auth", unix_socket=False, persistent=False)
    server.start()
    redis.Redis.from_url(server.url).config_set("requirepass", "s3cret")
    yield server
    server.stop()


def faissq_cli(*argv: str, url: str) -> subprocess.CompletedProcess[str]:
    """Run the `faissq` command with FAISSQ_REDIS__URL=url."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAISSQ_")}
    env.update(FAISSQ_REDIS__URL=url, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "faissq", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip


def test_redis_passwords_are_never_printed(
    password_redis: EmbeddedRedis, storage_root: Path, tmp_path: Path, index_name: str
) -> None:
    """CLI errors and a worker's log show the Redis URL with *** for its password."""
    host = f"127.0.0.1:{password_redis.port}/0"
    wrong = faissq_cli("status", "--index", index_name, url=f"redis://:wrongpass@{host}")
    assert wrong.returncode == 1
    assert f"cannot reach Redis at redis://:***@{host}" in wrong.stderr
    user = faissq_cli("delete", "--index", index_name, "--ids", "1", "--no-wait",
                      url=f"redis://faissq:wrongpass@{host}")  # fmt: skip
    assert user.returncode == 1 and "redis://faissq:***@" in user.stderr
    assert "wrongpass" not in user.stdout + user.stderr

    good = f"redis://:s3cret@{host}"
    worker = WorkerProcess(good, storage_root, [index_name], tmp_path).start()
    try:
        status = faissq_cli("status", "--index", index_name, url=good)
        assert f"redis redis://:***@{host}" in status.stdout
        assert "s3cret" not in status.stdout + status.stderr
    finally:
        worker.stop()
        worker.app.close()
    assert "s3cret" not in worker.all_logs()


def test_the_demo_never_shows_the_redis_password(
    password_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    """`faissq demo` on a Redis with a password prints it masked; neither its output nor the
    logs of the worker and Flower it starts hold the password (Flower gets it by environment)."""
    host = f"127.0.0.1:{password_redis.port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAISSQ_")}
    env.update(FAISSQ_REDIS__URL=f"redis://:s3cret@{host}", PYTHONPATH=str(REPO),
               FAISSQ_STORAGE__URL=str(tmp_path / "demo"), FAISSQ_METRICS__PORT="0",
               FAISSQ_GPU__MODE="off")  # fmt: skip
    argv = [sys.executable, "-m", "faissq", "demo", "--n", "2000", "--dim", "16", "--queries", "20"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"  redis      redis://:***@{host}" in done.stdout
    logs = [(tmp_path / "demo" / name).read_text() for name in ("worker.log", "flower.log")]
    assert "s3cret" not in "".join([done.stdout, done.stderr, *logs])
