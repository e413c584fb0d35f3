"""The index worker process: a Celery app with the faissq tasks and the pinned IndexRuntime.

State is loaded at `worker_init`: the threads pool never sends `worker_process_init`, and
in-process test workers never send `worker_ready`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from celery import Celery, signals

from faissq import keys
from faissq.config import Settings
from faissq.rpc.service import RpcService
from faissq.storage.store import DurableStore
from faissq.tasks.jobs import register_tasks
from faissq.worker.app import make_celery_app, redis_url
from faissq.worker.context import WorkerContext, attach_context, context_of
from faissq.worker.maintenance import Maintenance
from faissq.worker.runtime import IndexRuntime
from faissq.worker.store import IndexStore
from faissq.worker.telemetry import start_telemetry
from faissq.worker.transport import restore_inflight

log = logging.getLogger(__name__)


def make_store(settings: Settings) -> IndexStore:
    """The persistence the runtime writes through (update log + snapshots on shared storage)."""
    gpu = settings.gpu if settings.gpu.mode != "off" else None
    return DurableStore(settings, engine_options={"gpu": gpu})


def make_worker_app(settings: Settings) -> Celery:
    """A Celery app that serves settings.worker.indexes: tasks registered, signals connected."""
    app = make_celery_app(settings)
    use_inflight_fetch(app, redis_url(settings))
    register_tasks(app, settings)
    rpc = RpcService(settings)  # search loops, one per index, from the moment indexes are loaded
    maintenance = Maintenance(app, settings)  # queues merges and saves when due, once loaded

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        runtime = start_runtime(app, settings).runtime
        runtime.on_ready(rpc.start)
        runtime.on_ready(maintenance.start)

    def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        maintenance.stop()
        rpc.stop()
        ctx = context_of(app)
        if ctx is not None:
            ctx.runtime.close()

    # weak=False: the closures live only as long as the signal holds them
    signals.worker_init.connect(on_worker_init, weak=False)
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False)
    return app


def start_runtime(app: Celery, settings: Settings) -> WorkerContext:
    """Load every served index, put back jobs a killed predecessor left unacked, attach it all."""
    client = redis.Redis.from_url(
        redis_url(settings), socket_timeout=settings.redis.socket_timeout_s
    )
    runtime = IndexRuntime(settings, make_store(settings))
    ctx = WorkerContext(settings=settings, runtime=runtime, redis=client)
    attach_context(app, ctx)
    start_telemetry(app, ctx)  # metrics hook: /metrics, /healthz, /readyz, job signals
    runtime.load_all()
    for index in settings.worker.indexes:
        n = restore_inflight(client, keys.task_queue(index)) + restore_orphans(app, index)
        if n:
            log.warning("index %s: %d job(s) left unacked by a dead worker were requeued", index, n)
    return ctx


def use_inflight_fetch(app: Celery, url: str) -> None:
    """Consume through faissq.worker.transport (no job lost to a SIGKILL between fetch and ack).

    Plain redis:// and unix:// only; other schemes (rediss://, sentinel://) keep kombu's own.
    """
    if url.startswith("redis://"):
        app.conf.broker_transport = "faissq.worker.transport:Transport"
    elif url.startswith("unix://"):
        app.conf.broker_url = "socket://" + url[len("unix://") :]
        app.conf.broker_transport = "faissq.worker.transport:SocketTransport"


def restore_orphans(app: Celery, index: str) -> int:
    """Requeue this index's unacked jobs, at the head of its queue, and return how many.

    Redis redelivers an unacked job only after the visibility timeout (hours, above the longest
    job). There is one writer per index, so at its start every unacked job of its queue belongs
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
