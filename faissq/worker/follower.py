"""The replica's follower: a thread that keeps each served index in step with its writer.

Every `worker.replica_poll_s` it looks at the index's snapshot CURRENT pointer and update log on
shared storage. A CURRENT that moved (a build, rebuild, merge + save or autotune by the writer)
is loaded on a new Engine and swapped in (recovery replays the log after it); otherwise the log
entries after the applied seq are applied in order. Entries the writer truncated after a snapshot
are not needed: the follower then reloads from the newest snapshot, which covers them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from faissq.errors import FaissqError, LogCorrupt
from faissq.storage.log import UpdateLog
from faissq.storage.snapshots import SnapshotStore
from faissq.worker.runtime import IndexRuntime
from faissq.worker.slots import IndexState

log = logging.getLogger(__name__)


class SharedStorage(Protocol):
    """The read side of the writer's storage that the follower polls."""

    def log(self, index: str) -> UpdateLog:
        """The update log of one index."""
        ...

    def snapshots(self, index: str) -> SnapshotStore:
        """The snapshot store of one index."""
        ...


class Follower:
    """Polls the writer's log and snapshots and applies them to a replica's runtime."""

    def __init__(self, runtime: IndexRuntime, storage: SharedStorage, poll_s: float) -> None:
        """runtime: the replica's loaded runtime; storage: where the writer persists; poll_s:
        seconds between two polls of each index."""
        self.runtime = runtime
        self.storage = storage
        self.poll_s = poll_s
        self._seen: dict[str, str | None] = {}  # index -> the CURRENT version last loaded
        self._errors: dict[str, str] = {}  # index -> last error logged (logged once, not per poll)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start polling in a daemon thread, from the versions the runtime loaded."""
        for name, slot in self.runtime.slots.items():
            self._seen.setdefault(name, slot.version)
        self._thread = threading.Thread(target=self.run, name="faissq-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling; a reload in progress is waited for up to `timeout_s`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run(self) -> None:
        """Poll every index until `stop()`; a failed poll is logged and retried, never fatal."""
        while not self._stop.is_set():
            for name in self.runtime.slots:
                self._poll_logged(name)
            self._stop.wait(self.poll_s)

    def _poll_logged(self, name: str) -> None:
        """One poll of one index; storage trouble is logged once per distinct message."""
        try:
            self.poll_once(name)
        except (FaissqError, OSError) as exc:
            msg = f"{type(exc).__name__}: {exc}"
            if self._errors.get(name) != msg:
                log.warning("replica %s: follow failed, retrying every %.2fs: %s", name,
                            self.poll_s, msg)  # fmt: skip
            self._errors[name] = msg
            return
        if self._errors.pop(name, None) is not None:
            log.info("replica %s: following again at seq %d", name, self.runtime.slot(name).seq)

    # -- one poll ----------------------------------------------------------------------------

    def poll_once(self, name: str) -> int:
        """Catch up one index: reload a new snapshot, else apply new log entries; return count."""
        slot = self.runtime.slot(name)
        current = self.storage.snapshots(name).current_version()
        moved = current is not None and current != self._seen.get(name)
        if moved or slot.state is IndexState.FAILED:
            self.reload(name, current)
            return 0
        return self.replay(name)

    def replay(self, name: str) -> int:
        """Apply the log entries after the applied seq; reload when the writer trimmed them."""
        slot = self.runtime.slot(name)
        ulog = self.storage.log(name)
        applied = 0
        try:
            for entry in ulog.read(after_seq=slot.seq):
                self.runtime.apply_logged(name, entry)
                slot.lag_s = max(0.0, time.time() - entry.created_at)
                applied += 1
        except LogCorrupt:
            if slot.seq >= ulog.truncation().upto:
                raise  # a damaged or missing entry: retried at the next poll
            # the writer snapshotted and trimmed past us: the newest snapshot covers those entries
            self.reload(name, self.storage.snapshots(name).current_version())
            return applied
        slot.log_seq = ulog.last_seq()
        if applied:
            log.debug("replica %s: applied %d entries, now at seq %d", name, applied, slot.seq)
        return applied

    def reload(self, name: str, current: str | None) -> None:
        """Load the newest good snapshot (+ log after it) on a new Engine and swap it in."""
        t0 = time.perf_counter()
        self.runtime.reload(name)
        slot = self.runtime.slot(name)
        self._seen[name] = current
        slot.reloads += 1
        slot.log_seq = max(slot.log_seq, slot.seq)
        log.info("replica %s: reloaded snapshot %s at seq %d in %.3fs", name, slot.version,
                 slot.seq, time.perf_counter() - t0)  # fmt: skip
