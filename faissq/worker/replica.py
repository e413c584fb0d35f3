"""A search-only replica's storage: read-only, never locked; its lifecycle is worker.lifecycle.

The replica is a plain process, not a Celery worker: with no consumer it can never take a job,
re-queue the writer's in-flight jobs or show up as a second writer, and it needs no broker
connection beyond the search path. Its threads are the RPC loops (faissq.rpc), the follower
(faissq.worker.follower) and the metrics endpoints; the main thread waits for SIGTERM / SIGINT.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq.config import IndexSettings, Settings
from faissq.errors import WriterConflict
from faissq.index.engine import Engine
from faissq.storage.durable import DurableStore
from faissq.storage.log import Appended, UpdateLog
from faissq.storage.recovery import Recovered
from faissq.storage.snapshots import SnapshotStore
from faissq.worker.follower import Follower
from faissq.worker.persistence import Op
from faissq.worker.runtime import IndexRuntime

log = logging.getLogger(__name__)


class ReadOnlyStore:
    """The runtime's IndexStore over shared storage that never writes and never takes a lock."""

    def __init__(self, durable: DurableStore) -> None:
        """durable: the store whose read side (recover, log, snapshots) is used."""
        self.durable = durable

    def recover(self, index: str) -> Recovered:
        """Load the newest good snapshot and replay the log after it (reads only)."""
        return self.durable.recover(index, quarantine=False)

    def log(self, index: str) -> UpdateLog:
        """The update log of one index (read side)."""
        return self.durable.log(index)

    def snapshots(self, index: str) -> SnapshotStore:
        """The snapshot store of one index."""
        return self.durable.snapshots(index)

    def append(
        self,
        index: str,
        op: Op,
        ids: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32] | None,
        batch_id: str,
        attributes: Mapping[str, Any] | None = None,
    ) -> Appended:
        """Refuse: only the index's writer appends to its log."""
        raise WriterConflict(f"a replica never appends to the log of {index!r}")

    def lock(self, index: str) -> None:
        """Refuse: a replica never becomes the writer."""
        raise WriterConflict(f"a search replica does not write the log of {index!r}")

    def next_seq(self, index: str) -> int:
        """Replicas never write."""
        raise WriterConflict(f"a search replica does not write the log of {index!r}")

    def save(self, index: str, engine: Engine, seq: int) -> dict[str, Any]:
        """Refuse: only the index's writer writes snapshots."""
        raise WriterConflict(f"a replica never writes snapshots of {index!r}")

    def check_mapped(self, index: str, engine: Engine) -> None:
        """Replicas never rebuild nor save: nothing to check."""

    def define(self, index: str, cfg: IndexSettings, dim: int) -> None:
        """Read `index` with its own settings, as its writer does."""
        self.durable.define(index, cfg, dim)

    def release(self, index: str) -> None:
        """Nothing to release: no writer lock was taken."""

    def close(self) -> None:
        """Nothing to release: no writer lock was taken."""


def make_replica(settings: Settings) -> tuple[IndexRuntime, Follower]:
    """A replica runtime over read-only storage and its (not yet started) follower."""
    gpu = settings.gpu if settings.gpu.mode != "off" else None
    store = ReadOnlyStore(DurableStore(settings, engine_options={"gpu": gpu}))
    runtime = IndexRuntime(settings, store)
    return runtime, Follower(runtime, store, settings.worker.replica_poll_s)
