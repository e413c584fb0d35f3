"""Container healthcheck: exit 0 when this host's worker heartbeats for every served index.

`python -m faissq.healthcheck` is what docker-compose runs inside the worker container. The RPC
loop of each served index refreshes `faissq:<index>:hb:<host>:<pid>:<id>` every
rpc.heartbeat_ttl_s / 3 once the index is loaded, so a key for this host means the process is up,
its indexes are loaded and its search loops turn. It reads the same FAISSQ_* settings as the
worker; nothing else.
"""

from __future__ import annotations

import socket
import sys

import redis

from faissq import keys
from faissq.config import Settings


def missing_heartbeats(client: redis.Redis, indexes: list[str], host: str) -> list[str]:
    """The served indexes with no live heartbeat key from a worker on `host`."""
    missing = []
    for index in indexes:
        pattern = keys.heartbeat_key(index, f"{host}:*")  # worker ids are host:pid:random
        if next(iter(client.scan_iter(match=pattern, count=1000)), None) is None:
            missing.append(index)
    return missing


def check(settings: Settings, host: str | None = None) -> tuple[bool, str]:
    """Whether this host's worker is healthy, and a one-line reason."""
    if not settings.redis.url:
        return False, "FAISSQ_REDIS__URL is unset: the healthcheck needs the worker's Redis"
    host = host or socket.gethostname()
    timeout = settings.redis.socket_timeout_s
    client = redis.Redis.from_url(settings.redis.url, socket_timeout=timeout)
    try:
        missing = missing_heartbeats(client, settings.worker.indexes, host)
    except (redis.RedisError, OSError) as exc:
        return False, f"redis unreachable: {exc}"
    finally:
        client.close()
    if missing:
        return False, f"no heartbeat from {host} for: {', '.join(missing)}"
    return True, f"{host} serves {', '.join(settings.worker.indexes)}"


def main() -> int:
    """Print the verdict; exit status 0 when healthy, 1 otherwise (Docker's convention)."""
    ok, reason = check(Settings())
    print(("healthy: " if ok else "unhealthy: ") + reason)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
