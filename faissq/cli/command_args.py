"""Every command's arguments, kept apart from the commands so `faissq CMD --help` stays light.

Nothing here imports beyond the standard library: the command's own module (numpy, pydantic,
Celery, redis, FAISS) loads only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORCE_HELP = "publish even when the recall gate refuses it (docs/operations.md 5.1)"
STATS_TIMEOUT_S = 5.0  # the stats job waits behind a running job: do not hang the command on it


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
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="consume faissq.control: serve the indexes created at runtime (faissq.create_index) "
        "besides any --index; one per storage root (also FAISSQ_WORKER__DYNAMIC=true)",
    )


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq demo`."""
    p.add_argument("--n", type=int, default=40_000, help="generated vectors (default 40000)")
    p.add_argument("--dim", type=int, default=128, help="dimension of generated vectors")
    p.add_argument("--vectors", type=Path, help="a .npy (n, d) float array to index instead")
    p.add_argument("--queries", type=int, default=500, help="RPC searches to time")
    p.add_argument("--k", type=int, default=10, help="neighbours per search")
    p.add_argument("--target-recall", type=float, default=0.95, help="autotune target")
    p.add_argument("--no-flower", action="store_true", help="do not start Flower")
    p.add_argument(
        "--serve", action="store_true", help="keep the worker and Flower up until Ctrl-C"
    )


def add_job_args(p: argparse.ArgumentParser) -> None:
    """Arguments every job command takes: the index, --no-wait, --timeout."""
    p.add_argument("--index", required=True, metavar="NAME", help="the index the job is for")
    p.add_argument("--no-wait", action="store_true", help="print the task id and return at once")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="stop waiting after S seconds (the job goes on; default: wait until it ends)",
    )


def add_build_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq build`."""
    add_job_args(p)
    p.add_argument(
        "file",
        type=Path,
        metavar="FILE",
        help="a .npy (n, d) array, or an .npz with arrays `vectors` (else its first) and `ids`",
    )
    p.add_argument(
        "--ids", type=Path, metavar="FILE", help="a .npy of n int64 ids (default 0..n-1)"
    )
    p.add_argument(
        "--family",
        help="auto, flat, ivf_flat, ivf_pq, ivf_pq_refine, hnsw or a FAISS factory string "
        "(default: FAISSQ_INDEX__FAMILY of the worker)",
    )
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    add_attributes_arg(p)


def add_attributes_arg(p: argparse.ArgumentParser) -> None:
    """--attributes of build and upsert: the rows' attribute values from a JSON file."""
    p.add_argument(
        "--attributes",
        type=Path,
        metavar="FILE",
        help="a JSON map {field: [one value per row, null for none]} for an index that declares "
        "attribute fields (docs/tasks.md#attributes)",
    )


def add_upsert_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq upsert`."""
    add_job_args(p)
    p.add_argument("--ids", required=True, metavar="FILE|ID,ID", help="a .npy of ids or 7,8,9")
    p.add_argument("--vectors", required=True, type=Path, metavar="FILE", help="a .npy (n, d)")
    add_attributes_arg(p)
    p.add_argument(
        "--batch-id",
        metavar="ID",
        help="idempotency key: a batch id already logged is not applied again (default: task id)",
    )


def add_delete_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq delete`."""
    add_job_args(p)
    p.add_argument("--ids", required=True, metavar="FILE|ID,ID", help="a .npy of ids or 7,8,9")
    p.add_argument("--batch-id", metavar="ID", help="idempotency key (default: task id)")


def add_rebuild_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq rebuild`."""
    add_job_args(p)
    p.add_argument(
        "--family",
        help="retrain into this family (default: the one the last build asked for, else "
        "FAISSQ_INDEX__FAMILY of the worker)",
    )
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def add_autotune_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq autotune`."""
    add_job_args(p)
    p.add_argument(
        "--target-recall",
        type=float,
        metavar="R",
        help="recall@k to reach, in (0, 1] (default: FAISSQ_INDEX__TARGET_RECALL of the worker)",
    )


def add_search_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq search`."""
    p.add_argument("--index", required=True, metavar="NAME", help="the index to search")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vector", type=Path, metavar="FILE", help="a .npy query (d) or (n, d)")
    src.add_argument(
        "--random", action="store_true", help="random queries of the index's dimension"
    )
    p.add_argument("--queries", type=int, default=1, metavar="N", help="--random: how many rows")
    p.add_argument("--seed", type=int, default=0, help="--random: the generator's seed")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--nprobe", type=int, help="IVF lists to visit (default: the tuned value)")
    p.add_argument("--ef-search", type=int, help="HNSW efSearch (default: the tuned value)")
    p.add_argument("--target-recall", type=float, metavar="R", help="use the tuned row for R")
    p.add_argument("--timeout", type=float, metavar="S", help="default FAISSQ_RPC__TIMEOUT_S")


def add_status_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq status`."""
    p.epilog = "exit status 0 when every shown index has a live, ready worker; 1 otherwise"
    p.add_argument(
        "--index",
        action="append",
        metavar="NAME",
        help="index to show (repeatable; default: every index with a heartbeat or a snapshot, "
        "else FAISSQ_WORKER__INDEXES)",
    )
    p.add_argument(
        "--stats-timeout",
        type=float,
        default=STATS_TIMEOUT_S,
        metavar="S",
        help=f"wait this long for the worker's stats job (default {STATS_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--no-stats",
        action="store_true",
        help="send no stats job (it needs a producer's right to enqueue; heartbeats still show "
        "readiness): for a monitor user",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_snapshot_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq snapshot ls | verify [VERSION] | restore VERSION`."""
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser(
        "ls",
        help="list complete versions, oldest first, and which is CURRENT "
        "(primary: vectors in the saved FAISS index, without delta and tombstones)",
    )
    verify = sub.add_parser(
        "verify", help="check the checksum of every file of a version (all); exit 1 if one fails"
    )
    verify.add_argument("version", nargs="?", help="e.g. v00000007 (default: every version)")
    restore = sub.add_parser(
        "restore", help="point CURRENT at an older verified version; then reload the worker"
    )
    restore.add_argument("version", help="e.g. v00000007")
    for q in (ls, verify, restore):
        q.add_argument("--index", required=True, metavar="NAME", help="the index")


def add_log_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq log verify | quarantine --seq N [--force] | resolve --seq N`."""
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = sub.add_parser(
        "verify",
        help="check every entry's checksum; list damaged, missing and quarantined entries; "
        "exit 1 if any needs an operator",
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    quarantine = sub.add_parser(
        "quarantine",
        help="move a damaged entry into log/quarantine/ (kept, never deleted): the index then "
        "serves without its batch, degraded; reload the worker afterwards",
    )
    quarantine.add_argument("--seq", type=int, required=True, help="the entry's seq")
    quarantine.add_argument(
        "--force", action="store_true", help="quarantine an entry that verifies (drops its batch)"
    )
    resolve = sub.add_parser(
        "resolve",
        help="record that a quarantined entry was dealt with (its batch re-sent or not needed); "
        "the index reports ready again at its next reload",
    )
    resolve.add_argument("--seq", type=int, required=True, help="the quarantined entry's seq")
    resolve.add_argument(
        "--note", default="resolved by an operator", help="what was done (kept in the record)"
    )
    for q in (verify, quarantine, resolve):
        q.add_argument("--index", required=True, metavar="NAME", help="the index")
