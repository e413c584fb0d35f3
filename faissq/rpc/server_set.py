"""RpcService: one RpcServer per served index of a worker process."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol

from faissq.config import Settings
from faissq.index.engine import Engine
from faissq.rpc.server import RpcServer, new_worker_id
from faissq.telemetry.metric_families import metrics_of

log = logging.getLogger(__name__)


class EngineSource(Protocol):
    """What the worker runtime offers readers: the engine serving an index now."""

    def engine(self, name: str) -> Engine:
        """Return the engine to search; raises IndexNotReady while there is none."""
        ...

    def role_status(self, name: str) -> dict[str, Any]:
        """Return the role (writer or replica) and replication position the heartbeat shows."""
        ...


class RpcService:
    """Starts the RPC loops of the served indexes once the runtime is ready; adds and stops them."""

    def __init__(self, settings: Settings) -> None:
        """settings: the worker's settings (redis.url must be set by then)."""
        self.settings = settings
        self.worker_id = new_worker_id()
        self.servers: dict[str, RpcServer] = {}
        # the live-recall hook: index -> the sampler its loop hands answered searches to
        self.samplers: Callable[[str], Any] | None = None

    def start(self, runtime: EngineSource, indexes: list[str] | None = None) -> None:
        """Start one loop per index (default settings.worker.indexes; the on_ready hook)."""
        names = self.settings.worker.indexes if indexes is None else indexes
        for index in names:
            self.add(runtime, index)
        log.info("rpc: serving %s as %s", ", ".join(names), self.worker_id)

    def add(self, runtime: EngineSource, index: str) -> None:
        """Start the loop of one index (created at runtime); a running one is kept."""
        if index in self.servers:
            return
        engine = functools.partial(runtime.engine, index)
        describe = functools.partial(runtime.role_status, index)
        server = RpcServer(
            self.settings, index, engine, worker_id=self.worker_id, describe=describe
        )
        server.metrics = metrics_of(runtime)  # the metrics hook
        server.sampler = self.samplers(index) if self.samplers is not None else None
        self.servers = {**self.servers, index: server.start()}

    def remove(self, index: str) -> None:
        """Stop one index's loop and remove its heartbeat (its data was purged)."""
        server = self.servers.get(index)
        self.servers = {k: v for k, v in self.servers.items() if k != index}
        if server is not None:
            server.stop()

    def stop(self) -> None:
        """Stop every loop and remove its heartbeat."""
        servers, self.servers = self.servers, {}
        for server in servers.values():
            server.stop()
