"""DurableStore: the served indexes' log, snapshots and recovery behind one small object.

It has the shape of the runtime's ``IndexStore`` seam (recover / append / save / close): the
runtime logs a batch here before applying it, snapshots between jobs, and recovers at start.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq.config import IndexSettings, Settings
from faissq.errors import InvalidParameter, StorageUnavailable
from faissq.index.engine import Engine
from faissq.storage import files, incoming
from faissq.storage.fs import Storage
from faissq.storage.log import Appended, LogWriter, Op, UpdateLog
from faissq.storage.recovery import Recovered, recover
from faissq.storage.snapshots import SnapshotStore

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # index names become folder names


def check_index_name(index: str) -> str:
    """Refuse index names that are not safe as a folder name on every backend."""
    if not _NAME.match(index):
        raise InvalidParameter(f"index name {index!r} must match {_NAME.pattern}")
    return index


class DurableStore:
    """Update logs and snapshots of every index under `settings.storage.url`."""

    def __init__(self, settings: Settings, *, engine_options: dict[str, Any] | None = None) -> None:
        """settings: the whole configuration (storage and index sections are read);
        engine_options: extra Engine keyword arguments used at recovery (gpu, cloner)."""
        self.settings = settings
        self.storage = Storage.from_url(
            settings.storage.url, fsync=settings.storage.fsync, **settings.storage.options
        )
        self.engine_options = engine_options or {}
        self._writers: dict[str, LogWriter] = {}
        # indexes created at runtime: their own index section (metric, family) and dimension
        self._defined: dict[str, tuple[IndexSettings, int]] = {}

    def define(self, index: str, cfg: IndexSettings, dim: int) -> None:
        """Recover `index` with its own settings and dimension (an index created at runtime)."""
        self._defined[check_index_name(index)] = (cfg, dim)

    def snapshots(self, index: str) -> SnapshotStore:
        """The snapshot store of one index."""
        retention = self.settings.storage.retention
        return SnapshotStore(self.storage, check_index_name(index), retention=retention)

    def log(self, index: str) -> UpdateLog:
        """The update log of one index (read side)."""
        return UpdateLog(self.storage, check_index_name(index))

    def writer(self, index: str) -> LogWriter:
        """This process's writer of an index's log, opened (and locked) on first use."""
        w = self._writers.get(index)
        if w is None:
            w = self.log(index).open_writer()
            # a build's snapshot takes a seq that no log entry holds: never hand it out again
            newest = max((i.seq for i in self.snapshots(index).ls()), default=0)
            w.advance(newest)
            self._writers[index] = w
        return w

    def lock(self, index: str) -> None:
        """Take the index's writer lock now (a writer's start), not at its first append."""
        self.writer(index)

    def next_seq(self, index: str) -> int:
        """The seq the next logged batch or build of `index` takes."""
        return self.writer(index).last_seq + 1

    def recover(self, index: str, *, dim: int | None = None, quarantine: bool = True) -> Recovered:
        """Load the newest good snapshot and replay the log after it.

        quarantine: this is the index's writer, which moves a damaged newest log entry aside
        (replicas pass False and only read).
        """
        cfg, dim = self._defined.get(index, (self.settings.index, dim))
        rec = recover(
            self.storage,
            check_index_name(index),
            cfg,
            dim=dim,
            retention=self.settings.storage.retention,
            quarantine=quarantine,
            engine_options=self.engine_options,
        )
        if index in self._writers:  # a reload: the open writer must not reuse a moved-aside seq
            self._writers[index].forget_quarantined()
        return rec

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
        applied; a known batch_id returns its first seq."""
        return self.writer(index).append(op, ids, vectors, batch_id, attributes)

    def save(self, index: str, engine: Engine, seq: int) -> dict[str, Any]:
        """Snapshot `engine`, which holds every logged batch up to `seq`; then trim the log.

        `seq` is what the engine applied, never merely what was logged: a batch logged but not
        applied stays in the log after the snapshot and is replayed. A build passes `next_seq`
        (its own version), which the writer then skips. The log keeps everything after the
        oldest retained snapshot, so falling back to any retained version at load time can
        still replay to the latest acknowledged batch.
        """
        w = self.writer(index)
        if seq > w.last_seq + 1:
            raise InvalidParameter(f"snapshot seq {seq} is beyond the log's next seq")
        self.check_mapped(index, engine)  # never write bytes not verified since last read
        export = engine.export()
        store = self.snapshots(index)
        info = store.save(export, seq)
        w.advance(seq)
        oldest = min((i.seq for i in store.ls()), default=seq)
        removed = w.truncate(oldest)
        try:
            swept = incoming.sweep(self.storage, self.settings.storage.incoming_ttl_s)
        except StorageUnavailable as exc:  # the snapshot is safe; sweeping waits for the next
            log.warning("incoming/ not swept: %s", exc)
            swept = 0
        return {
            "version": info.version,
            "seq": info.seq,
            "bytes": info.bytes,
            "ntotal": info.ntotal,
            "log_truncated_upto": w.log.truncation().upto,
            "log_entries_removed": removed,
            "incoming_removed": swept,
            "persisted": True,
        }

    def check_mapped(self, index: str, engine: Engine) -> None:
        """Re-verify the memory-mapped snapshot files the engine reads (rebuild, merge, save)."""
        st = engine.state  # not export(): that merges live lists first (Engine.export)
        p = st.primary
        primary = (p.ids, p.vectors) if p is not None else ()
        files.reverify_mapped((*primary, st.delta.ids, st.delta.vectors, st.tombstones))

    def release(self, index: str) -> None:
        """Release one index's writer lock (a dropped index); another writer may take it."""
        w = self._writers.pop(index, None)
        if w is not None:
            w.close()
        self._defined.pop(index, None)

    def close(self) -> None:
        """Release every writer lock held by this process."""
        for w in self._writers.values():
            w.close()
        self._writers.clear()
