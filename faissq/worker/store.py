"""The runtime's seam to persistence: recover an index, log a batch before applying it, snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from faissq.index.engine import Engine

Op = Literal["upsert", "delete"]


@dataclass(frozen=True)
class Logged:
    """Where a batch sits in the update log, and whether it was already there (a redelivery)."""

    seq: int
    duplicate: bool


@dataclass
class Recovered:
    """What start-up recovery found: the engine (None when nothing was ever built) and its seq."""

    engine: Engine | None
    seq: int = 0
    version: str | None = None
    notes: list[str] = field(default_factory=list)


class IndexStore(Protocol):
    """Durable state of the served indexes; the runtime's only way to storage."""

    def recover(self, index: str) -> Recovered:
        """Load the newest good snapshot and replay the log after it."""

    def append(
        self,
        index: str,
        op: Op,
        ids: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32] | None,
        batch_id: str,
    ) -> Logged:
        """Durably log a batch before it is applied; a known batch_id is a no-op."""

    def save(self, index: str, engine: Engine) -> dict[str, Any]:
        """Write a snapshot of `engine` covering every logged seq so far; return its summary."""

    def close(self) -> None:
        """Release writer locks and handles."""


class EphemeralStore:
    """An in-memory store: batch ids dedup within the process, nothing survives a restart."""

    def __init__(self) -> None:
        """Start with empty logs."""
        self._batches: dict[str, dict[str, int]] = {}
        self._seq: dict[str, int] = {}

    def recover(self, index: str) -> Recovered:
        """Nothing to recover in memory."""
        return Recovered(engine=None, seq=self._seq.get(index, 0))

    def append(
        self,
        index: str,
        op: Op,
        ids: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32] | None,
        batch_id: str,
    ) -> Logged:
        """Assign the next seq unless the batch id was seen."""
        seen = self._batches.setdefault(index, {})
        if batch_id in seen:
            return Logged(seen[batch_id], duplicate=True)
        seq = self._seq.get(index, 0) + 1
        self._seq[index] = seq
        seen[batch_id] = seq
        return Logged(seq, duplicate=False)

    def save(self, index: str, engine: Engine) -> dict[str, Any]:
        """Nothing is written; report the seq a real snapshot would cover."""
        return {"version": None, "seq": self._seq.get(index, 0), "persisted": False}

    def close(self) -> None:
        """Nothing to release."""
