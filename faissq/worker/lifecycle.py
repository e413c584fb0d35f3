"""The index worker process: a Celery app with the faissq tasks, started in one fixed order.

`Lifecycle` is the one owner of a worker's start and stop, top to bottom: telemetry, each
index's writer lock and Redis lease (`worker/lease.py`: a second writer stops here, before it
touches anything), load (snapshot +
log; storage trouble is waited out), the jobs a dead predecessor left, the search loops,
maintenance; a dynamic worker first adds the created indexes of its catalog
(`worker/dynamic.py`); a replica loads, serves and follows instead. The `WriterStep` bootstep
runs it in the Celery worker, which starts its Consumer step last, so no job is fetched before
that: jobs sent while the indexes load wait in their queues instead of failing.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import weakref
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, bootsteps, signals
from celery.worker import state as worker_state
from redis.retry import Retry

from faissq import keys
from faissq.config import Settings
from faissq.errors import InvalidParameter, WriterConflict
from faissq.rpc.server_set import RpcService
from faissq.storage.durable import DurableStore
from faissq.worker.app import make_celery_app, redis_url
from faissq.worker.backoff import wait_out_storage
from faissq.worker.context import WorkerContext, attach_context
from faissq.worker.delivery import REDIS_BACKOFF
from faissq.worker.dynamic import DynamicIndexes
from faissq.worker.follower import Follower
from faissq.worker.lease import WriterLease, holder_id, take_writer
from faissq.worker.maintenance import Maintenance
from faissq.worker.persistence import IndexStore
from faissq.worker.process_telemetry import WorkerTelemetry, start_telemetry
from faissq.worker.recall_live import LiveRecall, attach_recall
from faissq.worker.replica import make_replica
from faissq.worker.runtime import IndexRuntime
from faissq.worker.transport import restore_inflight, use_inflight_fetch

log = logging.getLogger(__name__)
# the worker's own client reconnects this often within one command before the error surfaces
# (the delivery counters then wait Redis out; metrics and restores report it)
CLIENT_RETRIES = 3


def make_store(settings: Settings) -> IndexStore:
    """The persistence the runtime writes through (update log + snapshots on shared storage)."""
    gpu = settings.gpu if settings.gpu.mode != "off" else None
    return DurableStore(settings, engine_options={"gpu": gpu})


def make_worker_app(settings: Settings, register: Callable[[Celery, Settings], None]) -> Celery:
    """A Celery app that serves settings.worker.indexes: tasks registered, lifecycle added.

    register: adds the jobs (tasks/jobs.py's register_tasks); the tasks call into worker/, so
    worker/ never imports them.
    """
    app = make_celery_app(settings)
    use_inflight_fetch(app, redis_url(settings))
    register(app, settings)
    # queues merges and saves when due; built before loading (its heap settings apply to it)
    maintenance = Maintenance(app, settings)
    step = type("FaissqWriter", (WriterStep,), {"settings": settings, "maintenance": maintenance})
    app.steps["worker"].add(step)
    return app


# a worker's exit status by app: Celery's worker_main returns none (a refused start exits 1)
_EXIT_CODES: weakref.WeakKeyDictionary[Celery, int] = weakref.WeakKeyDictionary()


def exit_code(app: Celery) -> int:
    """The exit status of the worker `app` ran last (0 when it never stopped)."""
    return _EXIT_CODES.get(app, 0)


def shutting_down() -> bool:
    """Whether Celery was asked to stop (SIGTERM, SIGQUIT) while a start-up step waits."""
    return worker_state.should_stop is not None or worker_state.should_terminate is not None


class Lifecycle:
    """Start and stop of one worker process, writer or search replica, top to bottom.

    Writer: telemetry, lock, load, restore a dead predecessor's jobs, serve, maintain.
    Replica: telemetry, load, and per index once loaded: serve and follow the writer's log.
    Stop undoes it in reverse. The Celery bootstep below drives a writer; `run_replica` drives
    a replica, which is a plain process without a consumer.
    """

    def __init__(self, app: Celery, settings: Settings, maintenance: Maintenance | None) -> None:
        """maintenance: the writer's merge/save scheduler (None for a replica)."""
        self.app = app
        self.settings = settings
        self.maintenance = maintenance
        self.replica = settings.worker.replica
        self.ctx: WorkerContext | None = None
        self.telemetry: WorkerTelemetry | None = None
        self.rpc: RpcService | None = None
        self.recall: LiveRecall | None = None
        self.follower: Follower | None = None
        self.dynamic: DynamicIndexes | None = None
        self.lease: WriterLease | None = None  # a writer's Redis leases, one per index
        self.hostname = ""  # the Celery node name (a dynamic worker subscribes itself by it)

    def start(self, should_stop: Callable[[], bool]) -> None:
        """Bring the worker up; WriterConflict ends a writer's start (a second writer)."""
        if self.replica:
            runtime, self.follower = make_replica(self.settings)
        else:
            runtime = IndexRuntime(self.settings, make_store(self.settings))
        client = redis.Redis.from_url(
            redis_url(self.settings),
            socket_timeout=self.settings.redis.socket_timeout_s,
            retry=Retry(REDIS_BACKOFF, CLIENT_RETRIES),
        )
        ctx = self.ctx = WorkerContext(settings=self.settings, runtime=runtime, redis=client)
        attach_context(self.app, ctx)
        # /healthz and /readyz answer from here on; readiness stays false until loaded
        self.telemetry = start_telemetry(self.app, ctx)
        self.rpc = RpcService(self.settings)
        self.recall = LiveRecall(self.settings.recall, runtime.engine).start()
        attach_recall(runtime, self.recall)  # autotune, the recall gate and stats read it
        self.rpc.samplers = self.recall.sampler_for  # each search loop samples what it answers
        if self.follower is not None:
            follower = self.follower
            runtime.on_ready(self.rpc.start)
            runtime.on_ready(lambda _: follower.start())
            log.info("replica of %s: loading", ", ".join(self.settings.worker.indexes))
            runtime.load_all()
            return
        ttl = self.settings.worker.writer_lease_s
        self.lease = WriterLease(client, ttl, holder_id(self.hostname))
        for index in self.settings.worker.indexes:  # 1. lock: before anything is read or moved
            if not self.lock(ctx, index, should_stop):
                return
        if self.settings.worker.dynamic:  # 1b. the created indexes this worker can lock
            self.dynamic = ctx.dynamic = DynamicIndexes(self.app, self.settings, runtime, self.rpc)
            self.dynamic.hostname = self.hostname
            self.dynamic.lease = self.lease
            if self.dynamic.prepare(should_stop) is None:
                return
        runtime.load_all(should_stop)  # 2. load: snapshot + log, storage waited out
        if not runtime.wait_ready(0):
            return  # asked to stop while storage was away
        served = list(runtime.slots)
        for index in served:  # 3. restore: a dead predecessor's jobs
            n = restore_inflight(client, keys.task_queue(index))
            n += restore_orphans(self.app, index)
            if n:
                log.warning("index %s: %d job(s) left unacked by a dead worker were requeued",
                            index, n)  # fmt: skip
        self.rpc.start(runtime, served)  # 4. serve: one search loop per index
        if self.dynamic is not None:
            self.dynamic.start()  # dropped indexes answer until purged; the purge sweeper
        if self.maintenance is not None:
            self.maintenance.start(runtime)  # 5. maintain: merges and saves when due

    def lock(self, ctx: WorkerContext, index: str, should_stop: Callable[[], bool]) -> bool:
        """Take the index's writer lock and lease, waiting out storage; False when asked to stop
        first."""

        def take() -> bool:
            try:
                return take_writer(ctx.runtime.store, self.lease, index, should_stop)
            except WriterConflict as exc:
                raise WriterConflict(
                    f"index {index!r} already has a writer ({exc}): this worker does not start. "
                    "Stop the other `faissq worker` of the index first (docs/operations.md, "
                    "rolling restarts); add search capacity with --replica"
                ) from exc

        def note(reason: str) -> None:
            ctx.runtime.slot(index).reason = reason  # /readyz shows why it is still loading

        cfg, what = self.settings.worker, f"locking index {index}"
        return bool(wait_out_storage(take, cfg, what, should_stop, note))

    def stop(self) -> None:
        """Stop maintenance, following and the search loops, then telemetry; release the locks."""
        if self.maintenance is not None:
            self.maintenance.stop()
        if self.dynamic is not None:
            self.dynamic.stop()
        if self.follower is not None:
            self.follower.stop()
        if self.rpc is not None:
            self.rpc.stop()
        if self.recall is not None:
            self.recall.stop()
        if self.telemetry is not None:
            self.telemetry.close()
        if self.ctx is not None:
            self.ctx.runtime.close()
            if self.lease is not None:  # after the storage locks: the next writer starts at once
                self.lease.close()
            self.ctx.redis.close()


class WriterStep(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """The bootstep that runs a writer's Lifecycle inside the Celery worker.

    It stops on `worker_shutdown`, which Celery sends after the pool finished the running job:
    a step's own stop would run before that and release the writer lock under a running job.
    """

    settings: Settings  # set by make_worker_app on a subclass per app
    maintenance: Maintenance  # likewise

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Nothing starts here: Celery builds its steps before it starts any."""
        super().__init__(parent, **kwargs)
        self.lifecycle: Lifecycle | None = None
        self.worker: Any = None

    def start(self, parent: Any) -> None:
        """Bring the writer up before Celery's consumer fetches its first job."""
        self.worker = parent
        signals.worker_shutdown.connect(self.on_shutdown, weak=False)
        self.lifecycle = Lifecycle(parent.app, self.settings, self.maintenance)
        self.lifecycle.hostname = parent.hostname
        self.lifecycle.start(shutting_down)

    def on_shutdown(self, sender: Any = None, **_: Any) -> None:
        """Stop the lifecycle after the last job; keep the exit status."""
        if sender is not self.worker:
            return
        signals.worker_shutdown.disconnect(self.on_shutdown)
        _EXIT_CODES[sender.app] = int(getattr(sender, "exitcode", 0) or 0)
        if self.lifecycle is not None:
            self.lifecycle.stop()


def run_replica(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run a search replica until SIGTERM / SIGINT (or `stop` is set)."""
    if not settings.redis.url:
        raise InvalidParameter("a replica serves the writer's Redis: set FAISSQ_REDIS__URL")
    settings = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"replica": True})}
    )
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # the app is never started: it only carries the context (no consumer, no job signals)
    lifecycle = Lifecycle(make_celery_app(settings), settings, maintenance=None)
    lifecycle.start(stop.is_set)
    while not stop.wait(1.0):  # a timed wait: the signal handler runs between two waits
        pass
    log.info("replica: shutting down")
    lifecycle.stop()


def restore_orphans(app: Celery, index: str) -> int:
    """Requeue this index's unacked jobs, at the head of its queue, and return how many.

    Redis redelivers an unacked job only after the visibility timeout (hours, above the longest
    job). The caller holds the index's writer lock, so every unacked job of its queue belongs
    to a dead predecessor and can be redelivered now.
    """
    queue = keys.task_queue(index)
    restored = 0
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        for tag, raw in client.hgetall(channel.unacked_key).items():
            try:
                _, _, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            if routing_key != queue:
                continue
            channel.qos.restore_by_tag(tag, client=client)  # rpush: the next job popped
            restored += 1
    return restored
