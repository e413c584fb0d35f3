"""The runtime's seam to persistence: recover an index, log a batch before applying it, snapshot.

`faissq.storage.durable.DurableStore` is the implementation; the runtime only sees this Protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from faissq.config import IndexSettings
    from faissq.index.engine import Engine
    from faissq.storage.log import Appended
    from faissq.storage.recovery import Recovered

Op = Literal["upsert", "delete"]


class IndexStore(Protocol):
    """Durable state of the served indexes; the runtime's only way to storage."""

    def lock(self, index: str) -> None:
        """Become the index's single writer; WriterConflict while another process is."""

    def define(self, index: str, cfg: IndexSettings, dim: int) -> None:
        """Recover `index` with its own index settings and dimension (created at runtime)."""

    def release(self, index: str) -> None:
        """Give up one index's writer lock (it was dropped)."""

    def recover(self, index: str) -> Recovered:
        """Load the newest good snapshot and replay the log after it."""

    def append(
        self,
        index: str,
        op: Op,
        ids: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32] | None,
        batch_id: str,
        attributes: Mapping[str, Any] | None = None,
    ) -> Appended:
        """Durably log a batch (an upsert with its checked attribute columns) before it is
        applied; a known batch_id is a no-op."""

    def next_seq(self, index: str) -> int:
        """The seq the next logged batch or build of `index` will take."""

    def save(self, index: str, engine: Engine, seq: int) -> dict[str, Any]:
        """Write a snapshot of `engine`, which holds every logged seq up to `seq`; its summary."""

    def check_mapped(self, index: str, engine: Engine) -> None:
        """SnapshotCorrupt when memory-mapped files the engine reads changed since verified."""

    def close(self) -> None:
        """Release writer locks and handles."""
