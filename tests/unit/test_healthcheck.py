"""The container healthcheck: the worker's own /readyz says every served index is loaded."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from faissq.config import Settings
from faissq.telemetry.healthcheck import check, readyz_url


@pytest.fixture
def readyz() -> Iterator[tuple[int, dict[str, Any]]]:
    """A /readyz answering whatever the test puts in `answer` (status, per-index health)."""
    answer: dict[str, Any] = {"status": 503, "indexes": {}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"ready": False, "indexes": answer["indexes"]}).encode()
            self.send_response(answer["status"] if self.path == "/readyz" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1]), answer
    server.shutdown()
    server.server_close()


def settings(port: int, indexes: list[str]) -> Settings:
    """Settings of a worker serving `indexes` with its metrics port at `port`."""
    return Settings(metrics={"port": port}, worker={"indexes": indexes},
                    redis={"socket_timeout_s": 2.0})  # fmt: skip


def test_healthy_only_when_every_served_index_is_loaded(
    readyz: tuple[int, dict[str, Any]],
) -> None:
    port, answer = readyz
    cfg = settings(port, ["a", "b"])
    answer["indexes"] = {"a": {"state": "loading"}, "b": {"state": "empty"}}
    assert check(cfg) == (False, "not loaded: a loading")
    answer["indexes"] = {"a": {"state": "failed"}, "b": {"state": "ready"}}
    assert check(cfg) == (False, "not loaded: a failed")
    answer["status"] = 200
    answer["indexes"] = {"a": {"state": "degraded"}, "b": {"state": "empty"}}
    assert check(cfg) == (True, "loaded: a degraded, b empty")
    answer["indexes"] = {"a": {"state": "ready"}}  # an answer without a served index
    assert check(cfg)[0] is False


def test_no_endpoint_is_unhealthy_and_wildcard_binds_are_asked_on_loopback() -> None:
    ok, reason = check(settings(1, ["x"]))
    assert not ok and reason.startswith("no answer from http://127.0.0.1:1/readyz")
    assert check(Settings(metrics={"enabled": False}))[0] is False
    assert check(Settings(metrics={"port": 0}))[0] is False
    assert readyz_url(Settings(metrics={"host": "::1", "port": 9})) == "http://[::1]:9/readyz"
