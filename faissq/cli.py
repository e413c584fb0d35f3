"""The `faissq` command. Each subcommand is one entry of COMMANDS: (help, add_arguments, run)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from faissq import cli_acl, cli_jobs, cli_log, cli_ops
from faissq.config import Settings
from faissq.errors import FaissqError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace, Settings], int]


@contextlib.contextmanager
def redis_for(settings: Settings) -> Iterator[Settings]:
    """Yield settings with a Redis URL: the configured one, else a private embedded redis-server."""
    if settings.redis.url:
        yield settings
        return
    from faissq.embedded_redis import EmbeddedRedis

    root = Path(settings.storage.url)
    workdir = root / ".redis" if "://" not in settings.storage.url else None
    server = EmbeddedRedis(workdir, unix_socket=True, persistent=True)
    url = server.start()
    logging.getLogger("faissq").warning("FAISSQ_REDIS__URL is unset: embedded Redis at %s", url)
    try:
        yield settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": url})})
    finally:
        server.stop()


# -- worker ----------------------------------------------------------------------------------


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq worker`."""
    p.add_argument(
        "--index",
        action="append",
        metavar="NAME",
        help="index to serve (repeatable; default: FAISSQ_WORKER__INDEXES or 'default')",
    )
    p.add_argument("--hostname", "-n", help="Celery node name (default: faissq-<index>@<host>)")
    p.add_argument("--loglevel", "-l", default="INFO", help="log level (default INFO)")
    p.add_argument(
        "--mingle", action="store_true", help="sync with other workers at start (slower start)"
    )
    p.add_argument(
        "--replica",
        action="store_true",
        help="search-only replica: no job queue, follows the writer's log "
        "(also FAISSQ_WORKER__REPLICA=true; needs FAISSQ_REDIS__URL)",
    )


def worker_argv(indexes: Sequence[str], hostname: str, loglevel: str, mingle: bool) -> list[str]:
    """The `celery worker` arguments of an index worker: threads pool, one thread, events."""
    from faissq import keys

    argv = [
        "worker",
        "--pool=threads",
        "--concurrency=1",  # one writer per index; searches run on the RPC thread
        "--queues=" + ",".join(keys.task_queue(i) for i in indexes),
        "--task-events",
        "--hostname=" + hostname,
        "--loglevel=" + loglevel,
    ]
    if not mingle:
        argv.append("--without-mingle")
    return argv


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Start an index worker (and an embedded Redis when no URL is configured)."""
    from faissq.worker.service import exit_code, make_worker_app

    if args.index:
        settings = settings.model_copy(
            update={"worker": settings.worker.model_copy(update={"indexes": list(args.index)})}
        )
    indexes = settings.worker.indexes
    hostname = args.hostname or f"faissq-{'+'.join(indexes)}@{socket.gethostname()}"
    logging.basicConfig(level=args.loglevel.upper(), format=LOG_FORMAT)
    if args.replica or settings.worker.replica:
        from faissq.worker.replica import run_replica

        run_replica(settings)  # a replica joins the writer's Redis: never an embedded one
        return 0
    with redis_for(settings) as settings:
        app = make_worker_app(settings)
        app.worker_main(worker_argv(indexes, hostname, args.loglevel, args.mingle))
    return exit_code(app)


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq demo` (defined next to the demo itself)."""
    from faissq.demo import add_demo_args as add

    add(p)


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Run the main job end to end on this machine."""
    from faissq.demo import run_demo as run

    return run(args, settings)


COMMANDS: dict[str, tuple[str, AddArgs, Run]] = {
    "worker": ("run the Celery worker that pins the given indexes", add_worker_args, run_worker),
    "demo": (
        "start embedded Redis, a worker and Flower; build, autotune and search generated data",
        add_demo_args,
        run_demo,
    ),
    "build": (
        "build an index from a .npy/.npz file (replaces it), with a progress bar",
        cli_jobs.add_build_args,
        cli_jobs.run_build,
    ),
    "upsert": ("insert or replace vectors by id", cli_jobs.add_upsert_args, cli_jobs.run_upsert),
    "delete": ("delete vectors by id", cli_jobs.add_delete_args, cli_jobs.run_delete),
    "merge": (
        "fold delta and tombstones into the primary",
        cli_jobs.add_job_args,
        cli_jobs.run_merge,
    ),
    "rebuild": (
        "retrain the primary from the raw vectors",
        cli_jobs.add_rebuild_args,
        cli_jobs.run_rebuild,
    ),
    "save": ("snapshot the index to shared storage", cli_jobs.add_job_args, cli_jobs.run_save),
    "reload": ("reload the index from shared storage", cli_jobs.add_job_args, cli_jobs.run_reload),
    "autotune": (
        "tune search parameters for a target recall; print the calibration table",
        cli_jobs.add_autotune_args,
        cli_jobs.run_autotune,
    ),
    "search": (
        "search through the RPC queue; print a table",
        cli_ops.add_search_args,
        cli_ops.run_search,
    ),
    "status": (
        "indexes, versions, sizes, family, device, readiness, queue depths, snapshots",
        cli_ops.add_status_args,
        cli_ops.run_status,
    ),
    "snapshot": (
        "ls / verify / restore the snapshots on shared storage",
        cli_ops.add_snapshot_args,
        cli_ops.run_snapshot,
    ),
    "acl": ("print the Redis ACL user of a role (least privilege)", *cli_acl.ACL_COMMAND),
    "log": (
        "verify / quarantine / resolve entries of the update log on shared storage",
        cli_log.add_log_args,
        cli_log.run_log,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per COMMANDS entry."""
    parser = argparse.ArgumentParser(
        prog="faissq",
        description="faissq: FAISS indexes behind Celery jobs and a Redis search RPC. "
        "Configuration comes from FAISSQ_* environment variables (e.g. FAISSQ_REDIS__URL).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `faissq` command; typed errors become one line and exit code 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        settings = Settings()
        return int(args.run(args, settings))
    except FaissqError as exc:
        print(f"faissq: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, like other Unix tools
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
