"""The worker's HTTP endpoint: /metrics (Prometheus), /healthz (liveness), /readyz (readiness).

/metrics is prometheus_client's own WSGI app; wsgiref serves it and the two health routes from a
daemon thread, one thread per request. Liveness answers as long as the process serves HTTP;
readiness is per served index (loaded, log replayed, serving searches) and answers 503 until
then, so an orchestrator can tell a slow start from a dead process.
`faissq.telemetry.metric_families.start_http` is this module's `start_http`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, make_wsgi_app

from faissq.config import Settings

HealthFn = Callable[[], Mapping[str, Mapping[str, Any]]]
"""Returns {index: {"ready": bool, "state": str, "reason": str}} for every served index."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One daemon thread per request: a slow scrape never holds up /healthz or shutdown."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """Keeps scrapes out of the worker log (one line per scrape every few seconds)."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""


class MetricsServer:
    """/metrics, /healthz (liveness) and /readyz (readiness per index) on a daemon thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
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


def endpoint_app(registry: CollectorRegistry, health_fn: HealthFn) -> WSGIApplication:
    """The WSGI app of the three routes; anything else answers 404."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        body: Mapping[str, Any]
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            status, body = 200, {"alive": True}
        elif path == "/readyz":
            index = parse_qs(environ.get("QUERY_STRING", "")).get("index", [None])[0]
            try:
                status, body = readiness(health_fn(), index)
            except Exception as exc:  # readiness unknown is not ready
                status, body = 503, {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            status, body = 404, {"error": "not found: try /metrics, /healthz or /readyz"}
        data = json.dumps(body).encode()
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(data)))])  # fmt: skip
        return [data]

    return app


def start_http(
    settings: Settings, registry: CollectorRegistry, health_fn: HealthFn
) -> MetricsServer:
    """Serve the registry and the health endpoints on settings.metrics.host/port (0: any free)."""
    server = make_server(settings.metrics.host, settings.metrics.port,
                         endpoint_app(registry, health_fn), _ThreadingServer,
                         handler_class=_QuietHandler)  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, name="faissq-metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread)
