"""Least privilege on a real redis-server with ACLs: each role does its whole job and no more.

One server, one user per role created from `faissq acl`'s rules, a real writer started as the
worker user. Each refusal is asserted on the exact command, and ACL LOG shows that a role's
clients sent nothing their role refuses while doing their job.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from conftest import REPO, WorkerProcess, make_settings
from test_write_integrity import wait_for

from faissq import keys, shards
from faissq.cli import acl_roles as acl
from faissq.errors import PermissionDenied
from faissq.rpc.aio_client import AsyncSearchClient
from faissq.rpc.search_client import SearchClient
from faissq.rpc.shard_client import ShardedSearchClient
from faissq.tasks.producer import JobClient
from faissq.worker.embedded_redis import EmbeddedRedis, free_port

TIMEOUT = 60
INDEX = f"products{uuid.uuid4().hex[:6]}"
OTHER = f"other{uuid.uuid4().hex[:6]}"
DIM = 8


class AclServer:
    """A redis-server whose default user is off; an admin user and one user per role."""

    def __init__(self, server: EmbeddedRedis) -> None:
        """Create the users on the started server."""
        self.server = server
        base = server.url
        admin = redis.Redis.from_url(base)
        admin.execute_command("ACL", "SETUSER", "admin", "on", ">admin-pw", "~*", "&*", "+@all")
        for role in acl.Role:
            admin.execute_command("ACL", "SETUSER", *acl.setuser(role, role, INDEX, f"{role}-pw"))
        admin.execute_command("ACL", "SETUSER", "default", "off")
        admin.close()
        self.admin = redis.Redis.from_url(self.url("admin"))

    def url(self, user: str) -> str:
        """The redis:// URL of one user (its password is <user>-pw)."""
        return self.server.url.replace("redis://", f"redis://{user}:{user}-pw@", 1)

    def client(self, user: str) -> redis.Redis:
        """A plain redis-py client logged in as one user."""
        return redis.Redis.from_url(self.url(user))

    def refusals(self, user: str) -> list[tuple[str, str]]:
        """(reason, object) of every ACL LOG entry of one user."""
        return [(e["reason"], e["object"]) for e in self.admin.acl_log(count=500)
                if e["username"] == user]  # fmt: skip


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    """A dedicated redis-server with ACL users, for this module only."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("acl-redis"), unix_socket=False,
                           persistent=False)  # fmt: skip
    server.start()
    try:
        yield AclServer(server)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared storage of the module's writer."""
    return tmp_path_factory.mktemp("acl-storage")


@pytest.fixture(scope="module")
def writer(
    acl_server: AclServer, storage: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """`faissq worker` logged in as the worker user, with a built index."""
    w = WorkerProcess(acl_server.url("worker"), storage, [INDEX], tmp_path_factory.mktemp("w"))
    w.start()
    jobs = JobClient(make_settings(acl_server.url("producer"), storage, [INDEX]))
    try:
        jobs.build(INDEX, vectors(200)).get(timeout=TIMEOUT)
    finally:
        jobs.close()
    # the heartbeat reports the built index at its next beat: status must not read an older one
    wait_for(lambda: _beats_ready(acl_server.admin), "the heartbeat of the built index")
    yield w
    w.stop(timeout_s=10)
    w.app.close()
    assert acl_server.refusals("worker") == [], w.all_logs()[-3000:]


def _beats_ready(admin: redis.Redis) -> bool:
    """Whether every heartbeat of INDEX reports a ready engine."""
    beats = [admin.get(k) for k in admin.scan_iter(match=keys.heartbeat_pattern(INDEX))]
    return bool(beats) and all(b and json.loads(b)["engine"]["ready"] for b in beats)


def vectors(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    """n random float32 vectors of the test dimension."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def refused(call: Any, *args: Any) -> str:
    """Run a raw Redis call that must be refused by ACL; return Redis's message."""
    with pytest.raises(redis.exceptions.NoPermissionError) as info:
        call(*args)
    return str(info.value)


def cli(
    acl_server: AclServer, user: str, storage: Path, *argv: str
) -> subprocess.CompletedProcess[str]:
    """Run `faissq ...` logged in as one user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAISSQ_")}
    env.update({"FAISSQ_REDIS__URL": acl_server.url(user), "FAISSQ_STORAGE__URL": str(storage),
                "FAISSQ_METRICS__ENABLED": "false", "PYTHONPATH": str(REPO)})  # fmt: skip
    return subprocess.run([sys.executable, "-m", "faissq", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip


# -- searcher --------------------------------------------------------------------------------


def test_searcher_searches_and_reads_heartbeats_and_nothing_else(
    acl_server: AclServer, writer: WorkerProcess
) -> None:
    acl_server.admin.acl_log_reset()
    with SearchClient(acl_server.url("searcher"), INDEX) as client:
        res = client.search(vectors(3, seed=1), 4, timeout=TIMEOUT)
        assert res.ids.shape == (3, 4) and (res.ids >= 0).all()
        assert client.alive()
        assert [w["worker"] for w in client.workers()]

    async def search_async() -> Any:
        async with AsyncSearchClient(acl_server.url("searcher"), INDEX) as aclient:
            return await aclient.search(vectors(2, seed=2), 3, timeout=TIMEOUT)

    assert asyncio.run(search_async()).ids.shape == (2, 3)
    assert acl_server.refusals("searcher") == []


def test_searcher_cannot_touch_another_index_jobs_or_the_server(
    acl_server: AclServer, writer: WorkerProcess, storage: Path
) -> None:
    r = acl_server.client("searcher")
    other_reply = keys.reply_key(OTHER, "x" * 32)
    acl_server.admin.lpush(other_reply, b"secret")
    assert "keys" in refused(r.brpop, [other_reply], 1)
    assert "keys" in refused(r.get, other_reply)
    assert "keys" in refused(r.lpush, keys.task_queue(INDEX), b"{}")  # a Celery queue
    assert "keys" in refused(r.lpush, keys.rpc_queue(OTHER), b"{}")
    assert "'rpop'" in refused(r.rpop, keys.rpc_queue(INDEX))  # only workers take requests
    refused(r.expire, keys.alive_key(INDEX), 1)  # cannot make the index look dead
    assert "'flushall'" in refused(r.flushall)
    assert "'keys'" in refused(r.keys, "*")
    assert "'config|get'" in refused(r.config_get, "*")
    assert acl_server.admin.lrange(other_reply, 0, -1) == [b"secret"]
    # through faissq's own clients, a refusal is a typed error naming what was refused
    with (
        SearchClient(acl_server.url("searcher"), OTHER) as other,
        pytest.raises(PermissionDenied, match=r"searcher client: .*no permissions"),
    ):
        other.search(vectors(1), 1, timeout=5)

    async def search_other() -> None:
        async with AsyncSearchClient(acl_server.url("searcher"), OTHER) as aclient:
            await aclient.search(vectors(1), 1, timeout=5)

    with pytest.raises(PermissionDenied, match=r"searcher client: .*no permissions"):
        asyncio.run(search_other())
    jobs = JobClient(make_settings(acl_server.url("searcher"), storage, [INDEX]))
    try:
        with pytest.raises(PermissionDenied, match="producer"):
            jobs.build(INDEX, vectors(10))
    finally:
        jobs.close()
    assert acl_server.admin.llen(keys.task_queue(INDEX)) == 0  # nothing was enqueued
    r.close()


def test_cli_search_works_and_a_refused_job_is_one_line(
    acl_server: AclServer, writer: WorkerProcess, storage: Path, tmp_path: Path
) -> None:
    query = tmp_path / "q.npy"
    np.save(query, vectors(1, seed=5))
    ok = cli(acl_server, "searcher", storage, "search", "--index", INDEX, "--vector", str(query))
    assert ok.returncode == 0, ok.stderr
    assert f"index {INDEX} version" in ok.stdout
    denied = cli(acl_server, "searcher", storage, "save", "--index", INDEX)
    assert denied.returncode == 1
    assert "faissq: permission_denied:" in denied.stderr
    assert "Traceback" not in denied.stderr


# -- producer --------------------------------------------------------------------------------


def test_producer_runs_jobs_and_reads_their_results(
    acl_server: AclServer, writer: WorkerProcess, storage: Path
) -> None:
    acl_server.admin.acl_log_reset()
    jobs = JobClient(make_settings(acl_server.url("producer"), storage, [INDEX]))
    try:
        ids = np.arange(1000, 1010, dtype=np.int64)
        jobs.upsert(INDEX, ids, vectors(10, seed=3)).get(timeout=TIMEOUT)
        stats = jobs.stats(INDEX).get(timeout=TIMEOUT)
        assert stats["ntotal"] == 210
        jobs.delete(INDEX, ids[:5]).get(timeout=TIMEOUT)
    finally:
        jobs.close()
    assert acl_server.refusals("producer") == []


def test_producer_cannot_search_take_jobs_or_clear_dead_letters(
    acl_server: AclServer, writer: WorkerProcess
) -> None:
    r = acl_server.client("producer")
    acl_server.admin.lpush(keys.dead_letter_list(INDEX), b'{"task": "x"}')
    assert "keys" in refused(r.lpush, keys.rpc_queue(INDEX), b"{}")
    assert "'del'" in refused(r.delete, keys.dead_letter_list(INDEX))
    assert "rpop" in refused(r.rpop, keys.task_queue(INDEX))  # only the writer takes jobs
    assert "keys" in refused(r.lpush, keys.task_queue(OTHER), b"{}")
    assert "flushall" in refused(r.flushall)
    assert acl_server.admin.llen(keys.dead_letter_list(INDEX)) == 1
    # a result notification is the result to Celery's waiting clients: only workers send them
    assert "channel" in refused(r.publish, "celery-task-meta-" + "0" * 36, b"forged")
    assert "channel" in refused(r.publish, "/0.celery.pidbox", b"{}")  # no control commands
    # another index's routing, and its own queue turned into a set the worker cannot read
    assert "keys" in refused(r.sadd, f"_kombu.binding.{keys.task_queue(OTHER)}", b"x")
    assert "keys" in refused(r.sadd, keys.task_queue(INDEX), b"x")
    with (
        SearchClient(acl_server.url("producer"), INDEX) as client,
        pytest.raises(PermissionDenied, match="'eval' command"),
    ):
        client.search(vectors(1), 1, timeout=5)
    acl_server.admin.delete(keys.dead_letter_list(INDEX))
    r.close()


# -- monitor ---------------------------------------------------------------------------------


def test_monitor_reads_status_and_changes_nothing(
    acl_server: AclServer, writer: WorkerProcess, storage: Path
) -> None:
    acl_server.admin.acl_log_reset()
    out = cli(acl_server, "monitor", storage, "status", "--index", INDEX, "--json", "--no-stats")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)["indexes"][0]
    assert report["index"] == INDEX and report["alive"] and report["ready"], report
    assert report["stats"] is None and "--no-stats" in report["stats_error"]
    text = cli(acl_server, "monitor", storage, "status", "--index", INDEX, "--no-stats")
    assert text.returncode == 0 and f"index {INDEX}" in text.stdout, text.stderr
    assert "monitor-pw" not in text.stdout + text.stderr
    assert acl_server.refusals("monitor") == []  # the monitor's own command stays in its role
    # the stats job is a producer's right: without --no-stats, status says so and goes on
    full = cli(acl_server, "monitor", storage, "status", "--index", INDEX)
    assert full.returncode == 0, full.stderr
    assert "stats       permission_denied: the stats job needs the producer role" in full.stdout
    assert "--no-stats" in full.stdout
    r = acl_server.client("monitor")
    assert r.llen(keys.task_queue(INDEX)) == 0
    assert "lpush" in refused(r.lpush, keys.task_queue(INDEX), b"{}")
    refused(r.delete, keys.dead_letter_list(INDEX))
    assert "set" in refused(r.set, keys.alive_key(INDEX), 1)
    assert "publish" in refused(r.publish, "/0.celery.pidbox", b"{}")  # no control commands
    assert "flushall" in refused(r.flushall)
    assert "keys" in refused(r.keys, "*")
    r.close()


def test_status_as_searcher_is_one_permission_denied_line(
    acl_server: AclServer, writer: WorkerProcess, storage: Path
) -> None:
    out = cli(acl_server, "searcher", storage, "status", "--index", INDEX)
    assert out.returncode == 1
    assert out.stderr.startswith("faissq: permission_denied: Redis ACL refused this monitor client")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


# -- worker: the writer is the module's fixture; a replica beside it --------------------------


@pytest.mark.parametrize("user", ["searcher", "producer", "monitor"])
@pytest.mark.parametrize("replica", [False, True], ids=["writer", "replica"])
def test_a_worker_without_the_worker_role_fails_with_one_line(
    acl_server: AclServer, writer: WorkerProcess, tmp_path: Path, user: str, replica: bool
) -> None:
    argv = ["worker", "--index", INDEX] + (["--replica"] if replica else [])
    out = cli(acl_server, user, tmp_path, *argv)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("faissq: permission_denied: Redis ACL refused this worker client")
    assert "Traceback" not in out.stderr and "CRITICAL" not in out.stderr, out.stderr


def test_replica_serves_searches_as_the_worker_user(
    acl_server: AclServer, writer: WorkerProcess, storage: Path, tmp_path: Path
) -> None:
    acl_server.admin.acl_log_reset()
    replica = WorkerProcess(acl_server.url("worker"), storage, [INDEX], tmp_path,
                            {"FAISSQ_WORKER__REPLICA": "true"})  # fmt: skip
    replica.start(wait=False)
    try:
        with SearchClient(acl_server.url("searcher"), INDEX) as client:
            deadline = time.monotonic() + TIMEOUT
            while not any(w.get("role") == "replica" and w["engine"]["ready"]
                          for w in client.workers()):  # fmt: skip
                assert replica.alive(), replica.log_tail()
                assert time.monotonic() < deadline, replica.log_tail()
                time.sleep(0.05)
            writer.stop(timeout_s=10)  # now only the replica can answer
            res = client.search(vectors(2, seed=4), 3, timeout=TIMEOUT)
            assert res.ids.shape == (2, 3) and (res.ids >= 0).all()
    finally:
        replica.stop(timeout_s=10)
        writer.start()
    assert acl_server.refusals("worker") == [], replica.all_logs()[-3000:]


# -- a sharded index: one user per role covers every shard ----------------------------------


def test_sharded_search_and_upsert_under_role_users(acl_server: AclServer, tmp_path: Path) -> None:
    name = f"sharded{uuid.uuid4().hex[:6]}"
    names = shards.shard_names(name, 2)
    for role in (acl.Role.searcher, acl.Role.producer, acl.Role.worker):
        user = f"sharded-{role}"
        acl_server.admin.execute_command(
            "ACL", "SETUSER", *acl.setuser(user, role, [], f"{user}-pw", sharded={name: 2})
        )
    shards.declare(acl_server.admin, shards.ShardMap(name, 2, "l2"))  # an admin declares it
    acl_server.admin.acl_log_reset()
    storage = tmp_path / "storage"
    w = WorkerProcess(acl_server.url("sharded-worker"), storage, names, tmp_path,
                      {"FAISSQ_INDEX__METRIC": "l2"})  # fmt: skip
    w.start()
    try:
        jobs = JobClient(make_settings(acl_server.url("sharded-producer"), storage, names))
        try:
            assert (
                jobs.build(name, vectors(100), family="flat").get(timeout=TIMEOUT)["ntotal"] == 100
            )
            more = np.arange(1000, 1010, dtype=np.int64)
            assert (
                jobs.upsert(name, more, vectors(10, seed=7)).get(timeout=TIMEOUT)["applied"] == 10
            )
        finally:
            jobs.close()
        with ShardedSearchClient(acl_server.url("sharded-searcher"), name) as client:
            res = client.search(vectors(3, seed=8), 5, timeout=TIMEOUT)
            assert res.ids.shape == (3, 5) and (res.ids >= 0).all() and not res.partial
    finally:
        w.stop(timeout_s=10)
        w.app.close()
    for role in ("searcher", "producer", "worker"):
        assert acl_server.refusals(f"sharded-{role}") == [], (role, w.all_logs()[-3000:])
    with (
        SearchClient(acl_server.url("sharded-searcher"), INDEX) as other,
        pytest.raises(PermissionDenied, match="searcher client"),
    ):
        other.search(vectors(1), 1, timeout=5)  # the shards of its index, nothing else


# -- flower: its task list ---------------------------------------------------------------


def test_flower_lists_jobs_as_the_flower_user(
    acl_server: AclServer, writer: WorkerProcess, storage: Path, tmp_path: Path
) -> None:
    acl_server.admin.acl_log_reset()
    port = free_port()
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true", "PYTHONPATH": str(REPO),
           "FAISSQ_REDIS__URL": acl_server.url("flower")}  # fmt: skip
    log_path = tmp_path / "flower.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "faissq.worker.monitor", "flower",
             f"--port={port}", "--address=127.0.0.1", "--persistent=False"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, base + "/healthcheck", log_path)
        # Flower's event receiver is listening once it has seen the writer's heartbeat
        deadline = time.monotonic() + TIMEOUT
        while writer.hostname not in get_json(f"{base}/api/workers?status=1"):
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        jobs = JobClient(make_settings(acl_server.url("producer"), storage, [INDEX]))
        try:
            done = jobs.stats(INDEX)
            done.get(timeout=TIMEOUT)
        finally:
            jobs.close()
        deadline = time.monotonic() + TIMEOUT
        while get_json(f"{base}/api/tasks").get(done.id, {}).get("state") != "SUCCESS":
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        assert get_json(f"{base}/api/tasks")[done.id]["name"] == "faissq.stats"
        # the worker pages: Flower's inspect broadcast, its reply queue and the replies
        inspected = get_json(f"{base}/api/workers?refresh=1")
        assert "stats" in inspected.get(writer.hostname, {}), log_path.read_text()[-3000:]
    finally:
        proc.terminate()
        proc.wait(10)
    # kombu's bookkeeping of Flower's own queues included, up to its exit
    assert acl_server.refusals("flower") == [], log_path.read_text()[-3000:]
    fl = acl_server.client("flower")
    binding = f"_kombu.binding.{keys.task_queue(INDEX)}"  # where producers' jobs are routed
    refused(fl.set, binding, "x")  # a string there would stop every send
    assert "keys" in refused(fl.sadd, binding, "x")
    assert "keys" in refused(fl.delete, binding)
    assert "keys" in refused(fl.lpop, f"{writer.hostname}.celery.pidbox")  # a worker's inbox
    refused(fl.set, "unacked_mutex", "x")  # cannot hold up the restore of unacked jobs
    assert acl_server.admin.type(binding) == b"set"
    fl.close()


def get_json(url: str) -> Any:
    """GET a Flower API URL and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def wait_http(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    """Wait until the process answers url, failing with its log if it exits or never does."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("flower did not start: " + log_path.read_text()[-3000:])
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
