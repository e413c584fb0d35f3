"""The per-process IndexRuntime: pins each served index in memory; one writer, many readers.

The Celery task thread is the only writer. Readers (the search RPC) take `engine(name)`, a plain
reference: builds and reloads happen on a new Engine that is swapped in with one assignment, so a
reader never waits for them. In a search replica (settings.worker.replica) jobs are refused and
the follower thread is the only writer: it applies what the writer logged (`apply_logged`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from faissq.config import IndexSettings, Settings
from faissq.errors import (
    DimensionMismatch,
    FaissqError,
    IndexNotReady,
    InvalidVectors,
    SnapshotCorrupt,
    UnknownIndex,
    WriterConflict,
)
from faissq.worker import publish, write_ahead
from faissq.worker.backoff import wait_out_storage
from faissq.worker.persistence import IndexStore, Op
from faissq.worker.slots import (
    SERVING,
    IndexSlot,
    IndexState,
    counts,
    describe,
    install,
    role_status,
    small,
    swap,
)

if TYPE_CHECKING:
    from faissq.index.engine import Engine
    from faissq.storage.log import LogEntry

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
T = TypeVar("T")


class IndexRuntime:
    """Holds every served index of this worker process and applies jobs to them."""

    def __init__(
        self,
        settings: Settings,
        store: IndexStore,
        *,
        engine_class: Callable[..., Engine] | None = None,
    ) -> None:
        """Prepare slots for settings.worker.indexes; nothing is loaded until `load_all`.

        engine_class: what new engines are made with (default faissq.index.engine.Engine).
        """
        self.settings = settings
        self.store = store
        self._engine_class = engine_class
        self.role = "replica" if settings.worker.replica else "writer"
        self.slots = {name: IndexSlot(name) for name in settings.worker.indexes}
        self._ready = threading.Event()
        self._ready_hooks: list[Callable[[IndexRuntime], None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def load_all(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Load every served index (snapshot + log replay), then mark the runtime ready; storage
        trouble is waited out, LOADING, until it passes or `stopping()` (then never ready)."""
        for slot in self.slots.values():
            if not self._load(slot, stopping):
                return
        self._ready.set()
        for hook in self._ready_hooks:
            hook(self)

    def _load(self, slot: IndexSlot, stopping: Callable[[], bool] = lambda: False) -> bool:
        """Recover one index; a permanent failure leaves it FAILED with the reason, never kills
        the worker. False when the worker began to stop while storage was unavailable."""
        slot.state = IndexState.LOADING
        t0 = time.perf_counter()
        try:
            rec = wait_out_storage(lambda: self.store.recover(slot.name), self.settings.worker,
                                   f"loading index {slot.name}", stopping,
                                   lambda why: setattr(slot, "reason", why))  # fmt: skip
        except FaissqError as exc:
            slot.state, slot.reason = IndexState.FAILED, f"{exc.code}: {exc}"
            log.error("index %s failed to load: %s", slot.name, slot.reason)
            return True
        if rec is None:
            return False
        slot.reason = ""
        slot.engine = rec.engine
        slot.seq, slot.version, slot.notes = rec.seq, rec.version, list(rec.notes)
        slot.loaded_s = time.perf_counter() - t0
        slot.state = IndexState.READY if slot.engine is not None else IndexState.EMPTY
        if rec.notes:
            slot.state, slot.reason = IndexState.DEGRADED, "; ".join(rec.notes)
        log.info("index %s %s at seq %d in %.3fs", slot.name, slot.state.value, slot.seq,
                 slot.loaded_s)  # fmt: skip
        return True

    def add(self, name: str, cfg: IndexSettings, dim: int, *, load: bool = False) -> None:
        """Serve one more index (created at runtime) with its own settings; `load`: now."""
        self.store.define(name, cfg, dim)
        slot = IndexSlot(name, cfg=cfg, dim=dim)
        self.slots = {**self.slots, name: slot}  # readers iterate a dict that never changes
        if load:
            self._load(slot)

    def remove(self, name: str) -> None:
        """Stop serving an index (dropped): searches and jobs get UnknownIndex; lock released."""
        self.slots = {k: v for k, v in self.slots.items() if k != self.slot(name).name}
        self.store.release(name)

    def on_ready(self, hook: Callable[[IndexRuntime], None]) -> None:
        """Run `hook(runtime)` once every index is loaded (the RPC loop starts here)."""
        self._ready_hooks.append(hook)
        if self._ready.is_set():
            hook(self)

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until `load_all` finished; False on timeout."""
        return self._ready.wait(timeout_s)

    def close(self) -> None:
        """Release the store (writer locks)."""
        self.store.close()

    # -- readers -----------------------------------------------------------------------------

    def slot(self, name: str) -> IndexSlot:
        """Return the slot of a served index, or raise UnknownIndex."""
        try:
            return self.slots[name]
        except KeyError:
            served = ", ".join(sorted(self.slots))
            raise UnknownIndex(f"index {name!r} is not served here (serving: {served})") from None

    def engine(self, name: str) -> Engine:
        """Return the engine readers search now; raises IndexNotReady before it exists."""
        slot = self.slot(name)
        eng = slot.engine
        if eng is None or slot.state not in SERVING:
            detail = f": {slot.reason}" if slot.reason else ""
            raise IndexNotReady(f"index {name!r} is {slot.state.value}{detail}")
        return eng

    # -- writers (the Celery task thread only) -----------------------------------------------

    def _writable(self, name: str) -> IndexSlot:
        """Return a slot that accepts mutations."""
        slot = self.slot(name)
        if self.role == "replica":
            raise WriterConflict(f"this worker is a search-only replica of {name!r}: jobs go to "
                                 "the index's writer")  # fmt: skip
        if slot.state in (IndexState.LOADING, IndexState.FAILED):
            detail = f": {slot.reason}" if slot.reason else ""
            raise IndexNotReady(f"index {name!r} is {slot.state.value}{detail}")
        return slot

    def build(
        self,
        name: str,
        vectors: npt.NDArray[np.float32],
        ids: npt.NDArray[np.int64],
        *,
        family: str | None,
        progress: Progress | None,
        force: bool = False,
        centroids: npt.NDArray[np.float32] | None = None,
        attributes: Any = None,
    ) -> dict[str, Any]:
        """Build, gate on recall (publish.check), snapshot, swap in; the old one serves till then.

        The build takes the next log seq as its version and its snapshot covers that seq, so
        versions keep growing and no logged batch before it is replayed on top of it. Its
        attribute columns are checked before the build starts and persisted by that snapshot.
        """
        slot = self._writable(name)
        if slot.dim is not None and vectors.shape[1] != slot.dim:  # created with a dimension
            raise DimensionMismatch(f"vectors have dimension {vectors.shape[1]}, not {slot.dim}")
        before = slot.state
        slot.state = IndexState.REBUILDING
        try:
            seq = self.store.next_seq(name)
            eng = self._new_engine(name, int(vectors.shape[1]))
            report = eng.build(vectors, ids, family=family, progress=progress, version=seq,
                               centroids=centroids, attributes=attributes)  # fmt: skip
            report["recall_gate"] = publish.check(self, name, slot.engine, eng, force, progress)
            if progress:
                progress("save", 0, 1)
            t0 = time.perf_counter()
            saved = self.store.save(name, eng, seq)
            save_s = time.perf_counter() - t0
        except BaseException:
            slot.state = before
            raise
        swap(slot, eng, saved)
        return {**small(report), "seq": slot.seq, "version": eng.version, "snapshot": saved,
                "save_seconds": round(save_s, 6)}  # fmt: skip

    def apply(
        self,
        name: str,
        op: Op,
        ids: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32] | None,
        batch_id: str,
        *,
        check: Callable[[Engine | None], None],
        attributes: Any = None,
    ) -> dict[str, Any]:
        """Log a batch (write-ahead), then apply it; a logged batch_id is not applied twice.

        A batch that is logged is in the engine before any answer: when applying it fails, the
        index recovers from storage (snapshot + log, which holds the batch) before answering.
        attributes: an upsert's attribute columns ({field: values}), checked against the
        declared fields before anything is logged, then logged and applied with the vectors.
        """
        slot = self._writable(name)
        if op == "upsert" and vectors is None:
            raise InvalidVectors("an upsert needs vectors")
        check(slot.engine)  # validate against the live index before anything is logged
        attrs = write_ahead.checked_attributes(self, slot, op, attributes, len(ids))
        t0 = time.perf_counter()
        logged = self.store.append(name, op, ids, vectors, batch_id, attrs)
        if logged.duplicate:
            write_ahead.ensure_applied(self, slot, logged.seq)
            return {"seq": logged.seq, "duplicate": True, "applied": 0, **counts(slot)}
        try:
            applied = write_ahead.apply_batch(self, slot, ids, vectors, logged.seq, attrs)
        except Exception as exc:
            log.error("index %s: applying logged seq %d failed (%s: %s); recovering from storage",
                      name, logged.seq, type(exc).__name__, exc)  # fmt: skip
            why = f"applying seq {logged.seq} failed: {exc!r}"
            write_ahead.recover_after(self, slot, logged.seq, why)
            applied = len(ids)
        if vectors is not None:  # a few rows for the IVF drift measure
            publish.note_added(self, name, vectors)
        return {
            "seq": logged.seq,
            "duplicate": False,
            "applied": int(applied),
            "seconds": round(time.perf_counter() - t0, 6),
            **counts(slot),
        }

    def apply_logged(self, name: str, entry: LogEntry) -> None:
        """Apply an entry the writer already logged (a replica follows the log this way)."""
        slot = self.slot(name)
        if entry.seq <= slot.seq:
            return  # already in the loaded snapshot or applied before
        vectors = entry.vectors if entry.op == "upsert" else None
        write_ahead.apply_batch(self, slot, entry.ids, vectors, entry.seq, entry.attributes)

    def merge(self, name: str, progress: Progress | None) -> dict[str, Any]:
        """Fold delta and tombstones into the primary (the engine swaps its own internals)."""
        return self._maintain(name, lambda eng: eng.merge(progress=progress))

    def rebuild(
        self, name: str, family: str | None, progress: Progress | None, force: bool = False
    ) -> dict[str, Any]:
        """Retrain from the raw vectors (another family when given; gated: publish.rebuild),
        then snapshot: the log holds no trace of a rebuild, so only a snapshot keeps it."""
        if self.settings.recall.gate and publish.enough(self, name):
            report = publish.rebuild(self, name, family, force, progress)
        else:
            report = self._maintain(name, lambda e: e.rebuild(progress=progress, family=family))
        if progress:
            progress("save", 0, 1)
        slot = self.slot(name)
        saved = self._save(slot, self.engine(name))
        if isinstance(saved.get("version"), str):
            slot.version = saved["version"]  # stats and status report the snapshot just written
        return {**report, "snapshot": saved}

    def _maintain(self, name: str, run: Callable[[Engine], Any]) -> dict[str, Any]:
        """Run a merge or rebuild on the live engine; searches keep using the old primary."""
        slot = self._writable(name)
        eng = self.engine(name)
        self._check_mapped(slot, eng)
        before = slot.state
        slot.state = IndexState.REBUILDING
        try:
            report = run(eng)
        finally:
            slot.state = before
        return {**small(report), **counts(slot)}

    def autotune(self, name: str, target_recall: float | None, progress: Progress | None,
                 given: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """Tune search parameters (publish.autotune; `given`: install that profile), then
        snapshot: the profile survives."""
        slot = self._writable(name)
        eng = self.engine(name)
        profile = small(publish.autotune(self, name, eng, target_recall, progress, given))
        if progress:
            progress("save", 0, 1)
        saved = self._save(slot, eng)
        slot.version = saved.get("version") if isinstance(saved.get("version"), str) else None
        return {**profile, "snapshot": saved}

    def save(self, name: str) -> dict[str, Any]:
        """Snapshot the live engine; the log up to its seq becomes redundant."""
        slot = self._writable(name)
        eng = self.engine(name)
        saved = self._save(slot, eng)
        if isinstance(saved.get("version"), str):
            slot.version = saved["version"]  # stats and status report the snapshot just written
        return {"seq": slot.seq, "version": eng.version, "snapshot": saved}

    def reload(self, name: str) -> dict[str, Any]:
        """Reload from storage (snapshot + log) and swap; the old engine serves meanwhile."""
        slot = self.slot(name)
        rec = self.store.recover(name)
        if rec.engine is None:
            raise IndexNotReady(f"index {name!r} has no snapshot or log to reload from")
        install(slot, rec)
        return {"seq": rec.seq, "snapshot_version": rec.version, **counts(slot)}

    def stats(self, name: str) -> dict[str, Any]:
        """Describe one index: state, seq, sizes and the engine's own stats."""
        out = describe(self.slot(name), self.role)
        if "engine" in out:
            out["recall_live"] = small(publish.summary(self, name))
        return out

    def role_status(self, name: str) -> dict[str, Any]:
        """Role and replication position of one index (heartbeats and stats carry it)."""
        return role_status(self.slots.get(name), self.role)  # None once dropped

    # -- helpers -----------------------------------------------------------------------------

    def _save(self, slot: IndexSlot, eng: Engine) -> dict[str, Any]:
        """Snapshot the live engine at the seq it applied (DEGRADED when its bytes changed)."""
        return self._guarded(slot, lambda: self.store.save(slot.name, eng, slot.seq))

    def _check_mapped(self, slot: IndexSlot, eng: Engine) -> None:
        """Refuse to build from raw vectors that changed on storage since they were verified."""
        self._guarded(slot, lambda: self.store.check_mapped(slot.name, eng))

    @staticmethod
    def _guarded(slot: IndexSlot, step: Callable[[], T]) -> T:
        """Run a storage step; changed bytes leave the index up but DEGRADED until reloaded."""
        try:
            return step()
        except SnapshotCorrupt as exc:
            slot.state, slot.reason = IndexState.DEGRADED, str(exc)
            log.error("index %s DEGRADED: %s", slot.name, exc)
            raise

    def _new_engine(self, name: str, dim: int) -> Engine:
        """An empty engine of this dimension (it clones to the GPU itself when configured)."""
        from faissq.index.engine import Engine

        gpu = self.settings.gpu if self.settings.gpu.mode != "off" else None
        cfg = self.slot(name).cfg or self.settings.index  # its own when created at runtime
        return (self._engine_class or Engine)(dim, cfg, name=name, gpu=gpu)
