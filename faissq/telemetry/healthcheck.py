"""Container healthcheck: exit 0 when this container's worker has loaded every served index.

`python -m faissq.telemetry.healthcheck` is what docker-compose runs inside a worker container.
It asks the worker's own readiness endpoint (`/readyz` on the metrics port, on this host), so a
worker whose indexes are still loading, or failed to load, is unhealthy even while its process
runs.
An index that is loaded but has nothing built yet (`empty`) counts as healthy: a new
deployment waits for its first build, not for an operator. It reads the same FAISSQ_* settings
as the worker and touches nothing but that endpoint (no Redis).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from faissq.config import Settings

LOADED = frozenset({"empty", "ready", "rebuilding", "degraded"})  # states of a loaded index
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def readyz_url(settings: Settings) -> str:
    """The worker's /readyz on this host, as its metrics settings place it."""
    host = settings.metrics.host
    host = "127.0.0.1" if host in WILDCARD_HOSTS else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.metrics.port}/readyz"


def check(settings: Settings) -> tuple[bool, str]:
    """Whether this host's worker has loaded every served index, and a one-line reason."""
    if not settings.metrics.enabled or settings.metrics.port == 0:
        return False, (
            "readiness is served on the metrics port: set FAISSQ_METRICS__ENABLED=true and a "
            "fixed FAISSQ_METRICS__PORT for the healthcheck"
        )
    url = readyz_url(settings)
    try:
        with urllib.request.urlopen(url, timeout=settings.redis.socket_timeout_s) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:  # 503 while not every index serves searches
        body = err.read()
    except (urllib.error.URLError, OSError) as exc:
        return False, f"no answer from {url}: {exc}"
    try:
        indexes = json.loads(body)["indexes"]
        states = {name: str(indexes[name]["state"]) for name in settings.worker.indexes}
    except (ValueError, KeyError, TypeError) as exc:
        return False, f"{url} answered without the served indexes' states ({exc!r})"
    waiting = [f"{name} {state}" for name, state in states.items() if state not in LOADED]
    if waiting:
        return False, "not loaded: " + ", ".join(waiting)
    return True, "loaded: " + ", ".join(f"{name} {state}" for name, state in states.items())


def main() -> int:
    """Print the verdict; exit status 0 when healthy, 1 otherwise (Docker's convention)."""
    ok, reason = check(Settings())
    print(("healthy: " if ok else "unhealthy: ") + reason)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
