"""Counters of one RPC loop, updated once per loop turn (the loop's single exit point).

The metrics exporter reads `RpcStats.snapshot()` (or wraps `record`); the heartbeat carries the
same snapshot so `redis-cli GET faissq:{<index>}:hb:<worker>` shows it too.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Turn:
    """What one loop turn did."""

    popped: int = 0  # messages taken off the request list
    answered: int = 0  # result replies sent
    errors: dict[str, int] = field(default_factory=dict)  # error replies sent, by code
    expired: int = 0  # requests already past their deadline (answered with "timeout")
    dropped: int = 0  # unreadable requests (no usable reply key): nothing can be answered
    batches: int = 0  # engine.search calls
    batch_sizes: list[int] = field(default_factory=list)  # requests per engine call
    latencies_s: list[float] = field(default_factory=list)  # pop to reply, per answered request
    seconds: float = 0.0  # the whole turn


@dataclass
class RpcStats:
    """Running totals of an RPC loop; thread-safe reads through `snapshot`."""

    popped: int = 0
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    expired: int = 0
    dropped: int = 0
    batches: int = 0
    turns: int = 0
    reconnects: int = 0  # Redis connection lost and retried
    loop_errors: int = 0  # unexpected exceptions caught by the loop (it keeps going)
    busy_seconds: float = 0.0  # time spent handling requests (not waiting for them)
    last_error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, turn: Turn) -> None:
        """Add one turn's counts (called once per turn, after its replies went out)."""
        with self._lock:
            self.turns += 1
            self.popped += turn.popped
            self.answered += turn.answered
            if turn.errors:
                self.errors.update(turn.errors)
            self.expired += turn.expired
            self.dropped += turn.dropped
            self.batches += turn.batches
            self.busy_seconds += turn.seconds

    def fault(self, message: str, *, reconnect: bool) -> None:
        """Count a loop-level failure (lost connection or unexpected exception)."""
        with self._lock:
            if reconnect:
                self.reconnects += 1
            else:
                self.loop_errors += 1
            self.last_error = message[:500]

    def snapshot(self) -> dict[str, Any]:
        """A JSON-friendly copy of every counter."""
        with self._lock:
            return {
                "popped": self.popped,
                "answered": self.answered,
                "errors": dict(self.errors),
                "expired": self.expired,
                "dropped": self.dropped,
                "batches": self.batches,
                "turns": self.turns,
                "reconnects": self.reconnects,
                "loop_errors": self.loop_errors,
                "busy_seconds": round(self.busy_seconds, 6),
                "last_error": self.last_error,
            }
