"""`faissq worker`: start an index worker, with an embedded Redis when no URL is configured."""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from faissq.config import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def redis_for(settings: Settings) -> Iterator[Settings]:
    """Yield settings with a Redis URL: the configured one, else a private embedded redis-server."""
    if settings.redis.url:
        yield settings
        return
    from faissq.worker.embedded_redis import EmbeddedRedis

    root = Path(settings.storage.url)
    workdir = root / ".redis" if "://" not in settings.storage.url else None
    server = EmbeddedRedis(workdir, unix_socket=True, persistent=True)
    url = server.start()
    logging.getLogger("faissq").warning("FAISSQ_REDIS__URL is unset: embedded Redis at %s", url)
    try:
        yield settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": url})})
    finally:
        server.stop()


def worker_argv(
    indexes: Sequence[str], hostname: str, loglevel: str, mingle: bool, dynamic: bool = False
) -> list[str]:
    """The `celery worker` arguments of an index worker: threads pool, one thread, events."""
    from faissq import keys

    queues = [keys.task_queue(i) for i in indexes] + ([keys.CONTROL_QUEUE] if dynamic else [])
    argv = [
        "worker",
        "--pool=threads",
        "--concurrency=1",  # one writer per index; searches run on the RPC thread
        "--queues=" + ",".join(queues),
        "--task-events",
        "--hostname=" + hostname,
        "--loglevel=" + loglevel,
    ]
    if not mingle:
        argv.append("--without-mingle")
    return argv


PROBE = "faissq:role-probe"  # a value no request or job message ever equals


def check_worker_role(settings: Settings) -> None:
    """Raise PermissionDenied, before anything starts, when the Redis user is not a worker's.

    LREM of a value no message has writes nothing, yet ACL checks it as a write on the lists
    only the worker role may write: each index's request list and its jobs' in-flight list.
    Any other Redis error is left to the worker's own connection retries.
    """
    import redis

    from faissq import keys
    from faissq.errors import permission_denied, refused
    from faissq.worker.app import redis_url

    queues = [keys.task_queue(i) for i in settings.worker.indexes]
    if settings.worker.dynamic:
        queues.append(keys.CONTROL_QUEUE)
    lists = [keys.rpc_queue(i) for i in settings.worker.indexes]
    if not settings.worker.replica:
        lists += [keys.inflight_list(q) for q in queues]
    client = redis.Redis.from_url(
        redis_url(settings), socket_timeout=settings.redis.socket_timeout_s, retry=None
    )
    try:
        for name in lists:
            client.lrem(name, 0, PROBE)
    except redis.RedisError as exc:
        if message := refused(exc):
            raise permission_denied(message, "worker") from exc
    finally:
        client.close()


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Start an index worker (and an embedded Redis when no URL is configured)."""
    from faissq.tasks.jobs import register_tasks
    from faissq.worker.lifecycle import exit_code, make_worker_app

    dynamic = bool(getattr(args, "dynamic", False)) or settings.worker.dynamic
    update: dict[str, object] = {"dynamic": dynamic}
    if args.index or (dynamic and "indexes" not in settings.worker.model_fields_set):
        update["indexes"] = list(args.index or [])  # dynamic: only created ones unless named
    settings = settings.model_copy(update={"worker": settings.worker.model_copy(update=update)})
    indexes = settings.worker.indexes
    name = "+".join(indexes) or "dynamic"
    hostname = args.hostname or f"faissq-{name}@{socket.gethostname()}"
    logging.basicConfig(level=args.loglevel.upper(), format=LOG_FORMAT)
    if args.replica or settings.worker.replica:
        from faissq.worker.lifecycle import run_replica

        if settings.redis.url:  # else run_replica says why it needs one
            replica = settings.worker.model_copy(update={"replica": True})
            check_worker_role(settings.model_copy(update={"worker": replica}))
        run_replica(settings)  # a replica joins the writer's Redis: never an embedded one
        return 0
    with redis_for(settings) as settings:
        check_worker_role(settings)
        app = make_worker_app(settings, register_tasks)
        app.worker_main(worker_argv(indexes, hostname, args.loglevel, args.mingle, dynamic))
    return exit_code(app)
