"""Indexes created and dropped at runtime by a dynamic worker (`faissq worker --dynamic`).

The worker consumes `faissq.control`. A create records the definition in the storage catalog
(`storage/catalog.py`), takes the index's writer lock, adds it to the runtime (empty), starts
its search loop and consumes `faissq.<name>`. A drop marks the record dropped, removes the
index from the runtime and releases its lock; its search loop and queue keep answering
`unknown_index` / UnknownIndex until the data is purged, `worker.drop_grace_s` later. A
restarting dynamic worker serves what the catalog says, so storage stays the one truth.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery

from faissq import keys
from faissq.config import Settings
from faissq.errors import (
    IndexExists,
    InvalidParameter,
    UnknownIndex,
    WriterConflict,
)
from faissq.rpc.server_set import RpcService
from faissq.storage.catalog import Catalog, IndexDef, check_definition
from faissq.storage.durable import check_index_name
from faissq.storage.fs import Storage
from faissq.worker.app import index_queue
from faissq.worker.backoff import wait_out_storage
from faissq.worker.lease import WriterLease, take_writer
from faissq.worker.runtime import IndexRuntime

log = logging.getLogger(__name__)

CONTROL_REPLY_S = 10.0  # how long a control task waits for its own consumer to (un)subscribe
SWEEP_MAX_S = 60.0  # the purge check runs at least this often


class DynamicIndexes:
    """The created indexes of one dynamic worker: start, create, drop, purge when due."""

    def __init__(
        self, app: Celery, settings: Settings, runtime: IndexRuntime, rpc: RpcService
    ) -> None:
        """app: the worker app (its consumer is (un)subscribed); rpc: the search loops."""
        self.app = app
        self.settings = settings
        self.runtime = runtime
        self.rpc = rpc
        self.hostname = ""  # the Celery node name, set before the consumer starts
        self.lease: WriterLease | None = None  # the writer's Redis leases, set before prepare
        self.catalog = Catalog(
            Storage.from_url(
                settings.storage.url, fsync=settings.storage.fsync, **settings.storage.options
            )
        )
        self.grace_s = settings.worker.drop_grace_s
        self.tombstones: set[str] = set()  # dropped here or found dropped: answered until purged
        self._lock = threading.Lock()  # create/drop (task thread) against the sweeper
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- start: before the runtime loads and before Celery's consumer starts ---------------

    def prepare(self, should_stop: Callable[[], bool]) -> list[str] | None:
        """Add every created index this worker can lock to the runtime; purge due drops.

        Returns the created indexes added (None when asked to stop while storage was away).
        Their queues and those of dropped, not yet purged indexes are consumed from the start.
        """
        recs = wait_out_storage(self.catalog.all, self.settings.worker, "reading the catalog",
                                should_stop, lambda why: None)  # fmt: skip
        if recs is None:
            return None
        added = []
        for rec in recs:
            if rec.name in self.runtime.slots:
                log.warning("index %s is configured (--index) and in the catalog", rec.name)
            elif rec.state == "dropped":
                if not self._purge_if_due(rec):
                    self.tombstones.add(rec.name)
                    self.app.amqp.queues.select_add(index_queue(rec.name))
            elif self._lock_or_skip(rec.name):
                self.runtime.add(rec.name, self._cfg(rec), rec.dim)
                self.app.amqp.queues.select_add(index_queue(rec.name))
                added.append(rec.name)
        return added

    def start(self) -> None:
        """Answer for dropped indexes until purged; start the purge sweeper."""
        for name in sorted(self.tombstones):
            self.rpc.add(self.runtime, name)
        self._thread = threading.Thread(target=self._sweep_loop, name="faissq-dynamic",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def stop(self) -> None:
        """Stop the sweeper."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    # -- the control tasks (the task thread) ------------------------------------------------

    def create(
        self, name: Any, dim: Any, metric: Any, family: Any, attributes: Any
    ) -> dict[str, Any]:
        """Create and serve an empty index; the same definition again is a no-op."""
        new = check_definition(name, dim, metric, family, attributes)
        with self._lock:
            if new.name in self.runtime.slots and self.runtime.slot(new.name).cfg is None:
                raise IndexExists(f"index {new.name!r} is configured on this worker (--index)")
            rec = self.catalog.get(new.name)
            if rec is not None and rec.state == "dropped":
                raise IndexExists(
                    f"index {new.name!r} was dropped; its data is kept until "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(rec.purge_after or 0))} "
                    "(worker.drop_grace_s): create it again after that"
                )
            if rec is not None and rec.definition() != new.definition():
                raise IndexExists(f"index {new.name!r} exists with another definition: "
                                  f"{rec.definition()}")  # fmt: skip
            if rec is not None and new.name in self.runtime.slots:
                return self._result(rec, created=False)
            if rec is None and self.catalog.has_data(new.name):
                raise IndexExists(f"storage already holds data of index {new.name!r} (a "
                                  "configured index): it is not created again")  # fmt: skip
            self._lock_index(new.name)
            try:
                if rec is None:
                    rec = IndexDef(**{**new.describe(), "created_at": time.time()})
                    self.catalog.put(rec)
            except BaseException:
                self._release(new.name)
                raise
            self.runtime.add(rec.name, self._cfg(rec), rec.dim, load=True)
            self.rpc.add(self.runtime, rec.name)
            self._consume(rec.name, True)
            self.rpc.servers[rec.name].beating.wait(CONTROL_REPLY_S)  # searchable on return
            log.info("index %s created (dim %d, %s, %s)", rec.name, rec.dim, rec.metric,
                     rec.family)  # fmt: skip
            return self._result(rec, created=True)

    def drop(self, name: Any) -> dict[str, Any]:
        """Stop serving an index and release its lock; its data goes after the grace period."""
        if not isinstance(name, str):
            raise InvalidParameter(f"name must be a string, got {type(name).__name__}")
        check_index_name(name)
        with self._lock:
            slot = self.runtime.slots.get(name)
            if slot is not None and slot.cfg is None:
                raise InvalidParameter(f"index {name!r} is configured on this worker (--index); "
                                       "stop serving it in the configuration")  # fmt: skip
            rec = self.catalog.get(name)
            if rec is None:
                raise UnknownIndex(f"index {name!r} was never created (or is purged)")
            if rec.state == "dropped":
                return self._result(rec, dropped=False)
            if slot is None:
                raise WriterConflict(f"index {name!r} is served by another dynamic worker: "
                                     "run one dynamic worker per storage root")  # fmt: skip
            rec = self.catalog.mark_dropped(rec, self.grace_s)
            self.runtime.remove(name)
            if self.lease is not None:
                self.lease.release(name)
            self.tombstones.add(name)
            log.warning("index %s dropped; data removed after %.0fs", name, self.grace_s)
            self._purge_if_due(rec)
            return self._result(rec, dropped=True)

    # -- purge ------------------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Purge every dropped index whose grace period ended; the names purged."""
        with self._lock:
            return [r.name for r in self.catalog.all() if self._purge_if_due(r)]

    def _purge_if_due(self, rec: IndexDef) -> bool:
        if rec.state != "dropped" or (rec.purge_after or 0) > time.time():
            return False
        if rec.name in self.tombstones:
            self.rpc.remove(rec.name)
            self._consume(rec.name, False)
            self.tombstones.discard(rec.name)
        self.catalog.purge(rec.name)
        log.warning("index %s: data of the dropped index removed", rec.name)
        return True

    def _sweep_loop(self) -> None:
        every = min(SWEEP_MAX_S, max(self.grace_s, 1.0))
        while not self._stop.wait(every):
            try:
                self.sweep()
            except Exception as exc:  # storage away: try again next time
                log.warning("dropped indexes not purged: %s", exc)

    # -- helpers ----------------------------------------------------------------------------

    def _cfg(self, rec: IndexDef) -> Any:
        return self.settings.index.model_copy(update={"metric": rec.metric, "family": rec.family,
                                                      "attributes": rec.attributes})  # fmt: skip

    def _lock_index(self, name: str) -> None:
        try:
            take_writer(self.runtime.store, self.lease, name)
        except WriterConflict as exc:
            raise WriterConflict(f"index {name!r} already has a writer ({exc})") from exc

    def _release(self, name: str) -> None:
        """Give up the storage lock and the lease of an index this worker no longer writes."""
        self.runtime.store.release(name)
        if self.lease is not None:
            self.lease.release(name)

    def _lock_or_skip(self, name: str) -> bool:
        try:
            self._lock_index(name)
        except WriterConflict as exc:
            log.warning("index %s not served here: %s", name, exc)
            return False
        return True

    def _consume(self, name: str, on: bool) -> None:
        """(Un)subscribe this worker's consumer through Celery's remote control (thread-safe:
        the consumer's own thread handles it)."""
        queue = keys.task_queue(name)
        control = self.app.control
        kw: dict[str, Any] = {"destination": [self.hostname], "reply": True,
                              "timeout": CONTROL_REPLY_S}  # fmt: skip
        if on:
            replies = control.add_consumer(queue, exchange=queue, exchange_type="direct",
                                           routing_key=queue, **kw)  # fmt: skip
        else:
            replies = control.cancel_consumer(queue, **kw)
        if not replies:
            log.warning("index %s: no consumer answered for %s", name, queue)

    @staticmethod
    def _result(rec: IndexDef, **flags: bool) -> dict[str, Any]:
        return {**rec.describe(), "queue": keys.task_queue(rec.name), **flags}
