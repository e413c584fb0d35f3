"""The `faissq` command: help, the worker's celery arguments, the embedded Redis default."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from faissq.cli.main import COMMANDS, build_parser
from faissq.cli.worker_command import redis_for, worker_argv
from faissq.config import Settings

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_every_command() -> None:
    """`python -m faissq --help` runs and names each subcommand."""
    out = subprocess.run([sys.executable, "-m", "faissq", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    for name in COMMANDS:
        assert name in out


def test_worker_arguments() -> None:
    """Threads pool, one thread, the index queues, task events, mingle off by default."""
    argv = worker_argv(["a", "b"], "n@h", "INFO", mingle=False)
    assert "--pool=threads" in argv and "--concurrency=1" in argv and "--task-events" in argv
    assert "--queues=faissq.a,faissq.b" in argv and "--without-mingle" in argv
    args = build_parser().parse_args(["worker", "--index", "x", "--index", "y"])
    assert args.index == ["x", "y"]


def test_no_redis_url_starts_an_embedded_server_under_the_storage_root(tmp_path: Path) -> None:
    """Unset FAISSQ_REDIS__URL: a private redis-server on a socket in <storage>/.redis."""
    settings = Settings(storage={"url": str(tmp_path)})
    with redis_for(settings) as running:
        assert running.redis.url == f"unix://{(tmp_path / '.redis' / 'redis.sock').resolve()}"
        assert redis.Redis.from_url(running.redis.url).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(running.redis.url).ping()


def test_a_configured_url_is_used_as_is() -> None:
    """With a URL nothing is started."""
    settings = Settings(redis={"url": "redis://example:6379/0"})
    with redis_for(settings) as running:
        assert running is settings


def test_urls_are_printed_without_their_passwords() -> None:
    """masked_url: the password (and only it) becomes ***; URLs without one are unchanged."""
    from faissq.config import masked_url

    assert masked_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert masked_url("rediss://faissq:s3cret@h:6380/0?ssl_cert_reqs=required") == (
        "rediss://faissq:***@h:6380/0?ssl_cert_reqs=required"
    )
    assert masked_url("redis://tok3n@h/0") == "redis://***@h/0"  # a lone token is a secret
    assert masked_url("redis://h:6379/0") == "redis://h:6379/0"
    assert masked_url("unix:///run/redis.sock?db=0") == "unix:///run/redis.sock?db=0"
    assert masked_url("s3://key:secret@bucket/x") == "s3://key:***@bucket/x"
    assert masked_url(None) == "None"


def test_the_demo_hands_flower_its_broker_password_through_the_environment(
    tmp_path: Path,
) -> None:
    """Flower started as the demo starts it reaches a Redis that needs a password, while its
    command line (what `ps` shows) and its log carry no password; the demo prints it masked."""
    from faissq.cli.demo import flower_command
    from faissq.config import masked_url
    from faissq.worker.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis", unix_socket=False, persistent=False)
    server.start()
    try:
        redis.Redis.from_url(server.url).config_set("requirepass", "s3cret")
        url = server.url.replace("redis://", "redis://:s3cret@", 1)
        assert masked_url(url) == server.url.replace("redis://", "redis://:***@", 1)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv, env = flower_command({**os.environ, "FAISSQ_REDIS__URL": url}, port)
        log = tmp_path / "flower.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            shown = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            deadline = time.monotonic() + 60
            while "Broker:" not in log.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        finally:  # Flower hit by SIGTERM mid start-up may not stop: its log is all we read
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        server.stop()
    text = log.read_text()
    assert f"Broker: {server.url.replace('redis://', 'redis://:**@', 1)}" in text
    assert b"s3cret" not in shown and "s3cret" not in text
