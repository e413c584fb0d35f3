"""The `faissq` command: a parser that imports a subcommand's module only when it runs.

Each COMMANDS entry names its help text, its argument set-up (command_args.py, standard library
only) and its runner, so `faissq --help` and `faissq CMD --help` load neither pydantic, numpy,
FAISS, Celery nor redis.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from faissq.config import Settings

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace, "Settings"], int]

ARGS = "faissq.cli.command_args"
JOBS = "faissq.cli.job_commands"
OPS = "faissq.cli.ops_commands"


class Command(NamedTuple):
    """One subcommand: its help line, its `add` function (in `args`), its `run` (in `module`)."""

    help: str
    module: str
    add: str
    run: str
    args: str = ARGS  # where `add` lives: a light module, imported to build the parser

    def add_args(self) -> AddArgs:
        """The function that adds this command's arguments to its parser."""
        add: AddArgs = load(self.args, self.add)
        return add

    def runner(self) -> Run:
        """Import the command's module and return its `run` (only once it is about to run)."""
        run: Run = load(self.module, self.run)
        return run


def load(module: str, name: str) -> Any:
    """`name` of `module`, imported now."""
    return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "worker": Command(
        "run the Celery worker that pins the given indexes",
        "faissq.cli.worker_command", "add_worker_args", "run_worker",
    ),
    "demo": Command(
        "start embedded Redis, a worker and Flower; build, autotune and search generated data",
        "faissq.cli.demo", "add_demo_args", "run_demo",
    ),
    "build": Command(
        "build an index from a .npy/.npz file (replaces it), with a progress bar",
        JOBS, "add_build_args", "run_build",
    ),
    "upsert": Command("insert or replace vectors by id", JOBS, "add_upsert_args", "run_upsert"),
    "delete": Command("delete vectors by id", JOBS, "add_delete_args", "run_delete"),
    "merge": Command("fold delta and tombstones into the primary", JOBS, "add_job_args",
                     "run_merge"),
    "rebuild": Command("retrain the primary from the raw vectors", JOBS, "add_rebuild_args",
                       "run_rebuild"),
    "save": Command("snapshot the index to shared storage", JOBS, "add_job_args", "run_save"),
    "reload": Command("reload the index from shared storage", JOBS, "add_job_args",
                      "run_reload"),
    "autotune": Command(
        "tune search parameters for a target recall; print the calibration table",
        JOBS, "add_autotune_args", "run_autotune",
    ),
    "search": Command("search through the RPC queue; print a table", OPS, "add_search_args",
                      "run_search"),
    "status": Command(
        "indexes, versions, sizes, family, device, readiness, queue depths, snapshots",
        OPS, "add_status_args", "run_status",
    ),
    "snapshot": Command(
        "ls / verify / restore the snapshots on shared storage",
        OPS, "add_snapshot_args", "run_snapshot",
    ),
    "acl": Command(
        "print the Redis ACL user of a role (least privilege)",
        "faissq.cli.acl_commands", "add_acl_args", "run_acl", args="faissq.cli.acl_commands",
    ),
    "log": Command(
        "verify / quarantine / resolve entries of the update log on shared storage",
        "faissq.cli.log_commands", "add_log_args", "run_log",
    ),
}  # fmt: skip


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with one subparser per command; arguments for `only` (None: every command)."""
    parser = argparse.ArgumentParser(
        prog="faissq",
        description="faissq: FAISS indexes behind Celery jobs and a Redis search RPC. "
        "Configuration comes from FAISSQ_* environment variables (e.g. FAISSQ_REDIS__URL).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if only is None or only == name:
            command.add_args()(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `faissq` command; typed errors become one line and exit code 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the first word that is not an option names the command (the top level has only -h)
    first = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(only=first)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    run = COMMANDS[args.command].runner()
    from faissq.config import Settings
    from faissq.errors import FaissqError

    try:
        settings = Settings()
        return int(run(args, settings))
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
