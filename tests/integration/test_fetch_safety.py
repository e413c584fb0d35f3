"""kill -9 between fetch and ack loses no job: a worker serving several indexes, and over TLS.

The worker is frozen (SIGSTOP) while it waits in its fetch; a job is then sent, which Redis
hands to the frozen fetch at once (an event: the queue empties), and the worker is killed
before it can read it. The next start must run that job. A fetch that pops the job (kombu's
BRPOP) loses it; faissq's BLMOVE leaves it in the in-flight list for the next start.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from conftest import WorkerProcess, make_settings
from test_write_integrity import vec, wait_for

from faissq import keys
from faissq.tasks.producer import JobClient
from faissq.worker.embedded_redis import find_redis_server, free_port

TIMEOUT = 30
FETCHES = ("brpop", "blmove")  # the job fetch of kombu and of faissq (the RPC loop: blmpop)


def waiting_fetches(client: redis.Redis) -> int:
    """Clients blocked in a job fetch right now (Redis's own view, so a frozen one counts)."""
    return sum(1 for c in client.client_list() if c["cmd"] in FETCHES and "b" in c["flags"])


def kill_in_the_fetch_window(
    worker: WorkerProcess, client: redis.Redis, jobs: JobClient, indexes: list[str]
) -> list[AsyncResult]:
    """Freeze the worker in its fetch, send one job per index, kill it once Redis handed one
    over; return the jobs. A fetch that timed out before the jobs came lets them run: retry
    (so on a slow host the caught job may be an index's second or later)."""
    assert worker.proc is not None
    for _ in range(20):
        wait_for(lambda: waiting_fetches(client) > 0, "the worker to wait for jobs")
        worker.proc.send_signal(signal.SIGSTOP)
        sent = [jobs.upsert(i, [len(i)], vec(len(i)), by_reference=False) for i in indexes]

        def handed_over() -> bool:
            return sum(client.llen(keys.task_queue(i)) for i in indexes) < len(indexes)

        def fetch_expired() -> bool:
            return waiting_fetches(client) == 0 and not handed_over()

        wait_for(lambda: handed_over() or fetch_expired(), "Redis to answer the frozen fetch")
        if handed_over():
            worker.kill()
            return sent
        worker.proc.send_signal(signal.SIGCONT)
        for r in sent:
            r.get(timeout=TIMEOUT)
    pytest.fail("never caught the worker waiting in its fetch")


def test_a_multi_index_worker_loses_no_job_to_a_kill_during_its_fetch(
    worker_factory: Any, job_settings: Any, redis_client: redis.Redis, index_name: str
) -> None:
    """A worker of two indexes, killed after Redis handed it a job: the job runs after restart."""
    indexes = [index_name, f"{index_name}b"]
    worker = worker_factory(indexes).start()
    jobs = JobClient(job_settings)
    sent = kill_in_the_fetch_window(worker, redis_client, jobs, indexes)
    worker.start()
    for r in sent:
        assert r.get(timeout=TIMEOUT)["seq"] >= 1
    jobs.close()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server that speaks TLS only, with a CA and certificate made here; its URL."""
    d = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
            "/CN=faissq-test-ca", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-days",
            "1", "-CAcreateserial", "-extfile", "san.ext", "-out", "server.pem")  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.pem", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(d)],
        cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={d / 'ca.pem'}"
    client = redis.Redis.from_url(url, socket_timeout=1)
    wait_for(lambda: proc.poll() is None and _pings(client), "the TLS redis-server", 10)
    client.close()
    yield url
    proc.terminate()
    proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    """Whether the server answers PING now."""
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def test_a_worker_on_tls_redis_loses_no_job_to_a_kill_during_its_fetch(
    tls_redis: str, storage_root: Path, tmp_path: Path, index_name: str
) -> None:
    """rediss://: jobs and results over TLS, with the same fetch guarantee."""
    worker = WorkerProcess(tls_redis, storage_root, [index_name], tmp_path).start()
    client = redis.Redis.from_url(tls_redis)
    jobs = JobClient(make_settings(tls_redis, storage_root, [index_name]))
    try:
        sent = kill_in_the_fetch_window(worker, client, jobs, [index_name])
        worker.start()
        caught = sent[0].get(timeout=TIMEOUT)
        # Jobs of earlier rounds ran before the kill; the caught one is applied after them.
        assert caught["seq"] >= 1
        assert caught["applied"] == 1
    finally:
        jobs.close()
        client.close()
        worker.stop()
        worker.app.close()
