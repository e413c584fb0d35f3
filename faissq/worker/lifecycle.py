"""The index worker process: a Celery app with the faissq tasks, started in one fixed order.

`WriterLifecycle` is the one bootstep that owns a writer's start, top to bottom: take each
index's writer lock (a second writer stops here, before it touches anything), load (snapshot +
log; storage trouble is waited out), put back the jobs a dead predecessor left, serve searches.
Celery starts its Consumer step last, so no job is fetched before that: jobs sent while the
indexes load wait in their queues instead of failing.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Any

import redis
from celery import Celery, bootsteps, signals
from celery.worker import state as worker_state

from faissq import keys
from faissq.config import Settings
from faissq.errors import WriterConflict
from faissq.rpc.server_set import RpcService
from faissq.storage.durable import DurableStore
from faissq.tasks.jobs import register_tasks
from faissq.telemetry.worker_telemetry import start_telemetry
from faissq.worker.app import make_celery_app, redis_url
from faissq.worker.backoff import wait_out_storage
from faissq.worker.context import WorkerContext, attach_context
from faissq.worker.maintenance import Maintenance
from faissq.worker.persistence import IndexStore
from faissq.worker.runtime import IndexRuntime
from faissq.worker.transport import restore_inflight, use_inflight_fetch

log = logging.getLogger(__name__)


def make_store(settings: Settings) -> IndexStore:
    """The persistence the runtime writes through (update log + snapshots on shared storage)."""
    gpu = settings.gpu if settings.gpu.mode != "off" else None
    return DurableStore(settings, engine_options={"gpu": gpu})


def make_worker_app(settings: Settings) -> Celery:
    """A Celery app that serves settings.worker.indexes: tasks registered, lifecycle added."""
    app = make_celery_app(settings)
    use_inflight_fetch(app, redis_url(settings))
    register_tasks(app, settings)
    # queues merges and saves when due; built before loading (its heap settings apply to it)
    maintenance = Maintenance(app, settings)
    step = type(
        "FaissqWriter", (WriterLifecycle,), {"settings": settings, "maintenance": maintenance}
    )
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


class WriterLifecycle(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """Start (lock, load, restore, serve) and stop of one index writer process.

    It stops on `worker_shutdown`, which Celery sends after the pool finished the running job:
    a step's own stop would run before that and release the writer lock under a running job.
    """

    settings: Settings  # set by make_worker_app on a subclass per app
    maintenance: Maintenance  # likewise

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Nothing starts here: Celery builds its steps before it starts any."""
        super().__init__(parent, **kwargs)
        self.ctx: WorkerContext | None = None
        self.rpc: RpcService | None = None
        self.worker: Any = None

    def start(self, parent: Any) -> None:
        """Lock, load, restore and serve every index; WriterConflict ends the worker's start."""
        self.worker = parent
        signals.worker_shutdown.connect(self.on_shutdown, weak=False)
        ctx = self.ctx = start_runtime(parent.app, self.settings)
        for index in self.settings.worker.indexes:  # 1. lock: before anything is read or moved
            if not self.lock(ctx, index):
                return
        ctx.runtime.load_all(shutting_down)  # 2. load: snapshot + log, storage waited out
        if not ctx.runtime.wait_ready(0):
            return  # asked to stop while storage was away
        for index in self.settings.worker.indexes:  # 3. restore: a dead predecessor's jobs
            n = restore_inflight(ctx.redis, keys.task_queue(index))
            n += restore_orphans(parent.app, index)
            if n:
                log.warning("index %s: %d job(s) left unacked by a dead worker were requeued",
                            index, n)  # fmt: skip
        self.rpc = RpcService(self.settings)  # 4. serve: one search loop per index
        self.rpc.start(ctx.runtime)
        self.maintenance.start(ctx.runtime)  # 5. maintain: merges and saves when due

    def lock(self, ctx: WorkerContext, index: str) -> bool:
        """Take the index's writer lock, waiting out storage; False when asked to stop first."""

        def take() -> bool:
            try:
                ctx.runtime.store.lock(index)
            except WriterConflict as exc:
                raise WriterConflict(
                    f"index {index!r} already has a writer ({exc}): this worker does not start. "
                    "Stop the other `faissq worker` of the index first (docs/operations.md, "
                    "rolling restarts); add search capacity with --replica"
                ) from exc
            return True

        def note(reason: str) -> None:
            ctx.runtime.slot(index).reason = reason  # /readyz shows why it is still loading

        cfg, what = self.settings.worker, f"locking index {index}"
        return wait_out_storage(take, cfg, what, shutting_down, note) is not None

    def on_shutdown(self, sender: Any = None, **_: Any) -> None:
        """Stop the search loops, then release the writer locks; keep the exit status."""
        if sender is not self.worker:
            return
        signals.worker_shutdown.disconnect(self.on_shutdown)
        _EXIT_CODES[sender.app] = int(getattr(sender, "exitcode", 0) or 0)
        self.maintenance.stop()
        if self.rpc is not None:
            self.rpc.stop()
        if self.ctx is not None:
            self.ctx.runtime.close()


def start_runtime(app: Celery, settings: Settings) -> WorkerContext:
    """The runtime (nothing loaded yet), its Redis client and telemetry, attached to `app`.

    /healthz and /readyz answer from here on: readiness stays false until every index loaded.
    """
    client = redis.Redis.from_url(
        redis_url(settings), socket_timeout=settings.redis.socket_timeout_s
    )
    runtime = IndexRuntime(settings, make_store(settings))
    ctx = WorkerContext(settings=settings, runtime=runtime, redis=client)
    attach_context(app, ctx)
    start_telemetry(app, ctx)  # metrics hook: /metrics, /healthz, /readyz, job signals
    return ctx


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
