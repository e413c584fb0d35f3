"""make_celery_app(settings): the one place that configures Celery for faissq (DESIGN §5)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue  # type: ignore[attr-defined]

from faissq import keys
from faissq.config import Settings
from faissq.errors import InvalidParameter

TASK_NAMES = (
    "faissq.build",
    "faissq.upsert",
    "faissq.delete",
    "faissq.merge",
    "faissq.rebuild",
    "faissq.save",
    "faissq.reload",
    "faissq.autotune",
    "faissq.sweep",
    "faissq.maintain",
    "faissq.stats",
    "faissq.create_index",
    "faissq.drop_index",
)
CONTROL_TASKS = frozenset({"faissq.create_index", "faissq.drop_index"})  # on keys.CONTROL_QUEUE


def redis_url(settings: Settings) -> str:
    """Return the configured Redis URL, refusing to guess when none is set."""
    if not settings.redis.url:
        raise InvalidParameter(
            "settings.redis.url is unset: start an embedded Redis (faissq worker does) or set "
            "FAISSQ_REDIS__URL"
        )
    return settings.redis.url


def celery_url(url: str) -> str:
    """Translate a redis-py URL to kombu's spelling (unix:// sockets are redis+socket:// there)."""
    if url.startswith("unix://"):
        return "redis+socket://" + url[len("unix://") :]
    return url


def index_queue(index: str) -> Queue:
    """The Celery queue of one index: a direct exchange and routing key named after the queue."""
    return named_queue(keys.task_queue(index))


def named_queue(name: str) -> Queue:
    """A Celery queue with a direct exchange and routing key of its own name."""
    exchange = Exchange(name, type="direct")  # type: ignore[no-untyped-call]
    return Queue(name, exchange, routing_key=name)  # type: ignore[no-untyped-call]


def route_by_index(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
) -> dict[str, Any] | None:
    """Send every faissq.* job to the queue of the index named in its kwargs."""
    if name in CONTROL_TASKS:
        return {"queue": keys.CONTROL_QUEUE}
    if not name.startswith(f"{keys.PREFIX}.") or not isinstance(kwargs, dict):
        return None
    index = kwargs.get("index")
    if not isinstance(index, str) or not index:
        return None
    # only the queue: an explicit queue= given by the sender then wins over the route entirely
    return {"queue": keys.task_queue(index)}


def make_celery_app(
    settings: Settings, *, main: str = "faissq", set_as_current: bool = False
) -> Celery:
    """Build the Celery app for workers and clients alike; nothing connects until first use.

    set_as_current: make it the process's default app (tools such as Flower build results
    without naming an app); libraries leave it False so they never replace their host's app.
    """
    url = celery_url(redis_url(settings))
    visibility = {"visibility_timeout": settings.worker.visibility_timeout_s}
    app = Celery(main, broker=url, backend=url, set_as_current=set_as_current)
    app.conf.update(
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack", "json"],
        result_accept_content=["msgpack", "json"],
        event_serializer="json",  # Flower (and any other monitor) decodes events as json
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis redelivers an unacked job once this expires: it must exceed the longest job;
        # kombu reads it from both option sets, so set it everywhere it is read.
        # one list per queue (jobs of an index are FIFO, no priorities): a worker can then fetch
        # with one atomic BLMOVE (faissq.worker.transport) instead of BRPOP over four lists
        broker_transport_options={**visibility, "priority_steps": [0]},
        result_backend_transport_options=dict(visibility),
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_queues=[index_queue(i) for i in settings.worker.indexes]
        + ([named_queue(keys.CONTROL_QUEUE)] if settings.worker.dynamic else []),
        task_create_missing_queues=True,
        task_routes=(route_by_index,),
        result_expires=7 * 24 * 3600,
        # a job that ran across a Redis restart keeps its result: storing it waits for Redis
        # (connection errors only), polling at least every second so it lands soon after
        result_backend_always_retry=True,
        result_backend_max_sleep_between_retries_ms=1000,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
