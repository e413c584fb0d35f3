"""The worker's HTTP endpoint: /metrics (Prometheus), /healthz (liveness), /readyz (readiness).

Liveness answers as long as the process serves HTTP; readiness is per served index (loaded, log
replayed, serving searches) and answers 503 until then, so an orchestrator can tell a slow start
from a dead process. `faissq.telemetry.metric_families.start_http` is this module's `start_http`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from faissq.config import Settings

log = logging.getLogger(__name__)

HealthFn = Callable[[], Mapping[str, Mapping[str, Any]]]
"""Returns {index: {"ready": bool, "state": str, "reason": str}} for every served index."""


class MetricsServer:
    """/metrics, /healthz (liveness) and /readyz (readiness per index) on a daemon thread."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread) -> None:
        """Wrap a started server; `port` is the bound port (useful when 0 was asked for)."""
        self._server = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the endpoints (loopback when bound to every interface)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def readiness(
    health: Mapping[str, Mapping[str, Any]], index: str | None
) -> tuple[int, dict[str, Any]]:
    """HTTP status and body of /readyz: 200 when every (or the named) index is ready, else 503."""
    chosen = {k: dict(v) for k, v in health.items() if index is None or k == index}
    if index is not None and not chosen:
        return 404, {"ready": False, "error": f"index {index!r} is not served here"}
    ready = bool(chosen) and all(bool(v.get("ready")) for v in chosen.values())
    return (200 if ready else 503), {"ready": ready, "indexes": chosen}


def start_http(
    settings: Settings,
    registry: CollectorRegistry,
    health_fn: HealthFn,
    *,
    before_scrape: Callable[[], None] | None = None,
) -> MetricsServer:
    """Serve the registry and the health endpoints on settings.metrics.host/port (0: any free).

    before_scrape runs at each /metrics request, so gauges read the state at scrape time; its
    errors are logged and the last values served.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/metrics":
                if before_scrape is not None:
                    try:
                        before_scrape()
                    except Exception:  # a broken refresh must not hide the other metrics
                        log.exception("refreshing metrics before a scrape failed")
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif url.path == "/healthz":
                self._json(200, {"alive": True})
            elif url.path == "/readyz":
                index = parse_qs(url.query).get("index", [None])[0]
                try:
                    self._json(*readiness(health_fn(), index))
                except Exception as exc:  # readiness unknown is not ready
                    self._json(503, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
            else:
                self._json(404, {"error": "not found: try /metrics, /healthz or /readyz"})

        def _json(self, status: int, body: Mapping[str, Any]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Keep scrapes out of the worker log (one line per scrape every few seconds)."""

    server = ThreadingHTTPServer((settings.metrics.host, settings.metrics.port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="faissq-metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread)
