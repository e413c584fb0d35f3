"""`faissq build / upsert / delete / merge / rebuild / save / reload / autotune`: jobs from a shell.

Each command enqueues one job with JobClient, draws its PROGRESS states and prints its result
(or, with --no-wait, prints the task id). Batches above worker.inline_max_bytes travel as .npy
files under <storage root>/incoming/, which the command removes once the job has finished.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from faissq import codec, keys
from faissq.config import Settings, masked_url
from faissq.errors import InvalidIds, InvalidParameter, InvalidVectors, permission_denied

if TYPE_CHECKING:
    import redis
    from celery.result import AsyncResult

    from faissq.tasks.producer import JobClient

ID_LIST = re.compile(r"^\s*\d+\s*(,\s*\d+\s*)*,?\s*$")
Send = Callable[["Sender"], "AsyncResult"]


# -- shared by every command that talks to a worker --------------------------------------------


def require_redis(settings: Settings, command: str) -> str:
    """The worker's Redis URL; refuse to guess one (an embedded Redis is private to its worker)."""
    if settings.redis.url:
        return settings.redis.url
    hint = ""
    sock = Path(settings.storage.url) / ".redis" / "redis.sock"
    if "://" not in settings.storage.url and sock.exists():
        hint = f" (a worker's embedded Redis listens on unix://{sock.resolve()})"
    raise InvalidParameter(
        f"FAISSQ_REDIS__URL is unset: `faissq {command}` needs the Redis of a running worker; "
        f"set it to that URL{hint}"
    )


def redis_client(settings: Settings) -> redis.Redis:
    """A plain redis-py client on the configured URL (socket timeout from settings)."""
    import redis

    url = require_redis(settings, "status")
    timeout = settings.redis.socket_timeout_s
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def heartbeats(client: redis.Redis, index: str) -> dict[str, dict[str, Any]]:
    """The live heartbeat values of an index by key (a JSON object each; {} when unreadable)."""
    import json

    out: dict[str, dict[str, Any]] = {}
    for key in client.scan_iter(match=keys.heartbeat_pattern(index), count=1000):
        raw = client.get(key)
        if raw is None:  # expired between SCAN and GET
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            value = {}
        out[key.decode() if isinstance(key, bytes) else str(key)] = (
            value if isinstance(value, dict) else {}
        )
    return out


# -- reading input files -----------------------------------------------------------------------


def load_npy(path: Path, what: str) -> npt.NDArray[Any]:
    """One array from a .npy file (memory-mapped, no pickles)."""
    if not path.is_file():
        raise InvalidParameter(f"{what} file {str(path)!r} does not exist")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidParameter(f"{what} file {str(path)!r} is not a readable .npy: {exc}") from exc
    if not isinstance(arr, np.ndarray):
        raise InvalidParameter(f"{what} file {str(path)!r} holds several arrays; give a .npy")
    return arr


def load_vectors(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64] | None]:
    """Vectors (and ids when an .npz has them) from .npy, or .npz arrays `vectors` and `ids`."""
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                names = list(npz.files)
                if not names:
                    raise InvalidParameter(f"{str(path)!r} holds no arrays")
                vectors = npz["vectors"] if "vectors" in names else npz[names[0]]
                ids = npz["ids"] if "ids" in names else None
        except (OSError, ValueError) as exc:
            raise InvalidParameter(f"{str(path)!r} is not a readable .npz: {exc}") from exc
        return as_vectors(vectors, path), None if ids is None else as_id_array(ids, str(path))
    return as_vectors(load_npy(path, "vectors"), path), None


def as_vectors(arr: npt.NDArray[Any], path: Path) -> npt.NDArray[np.float32]:
    """A numeric (n, d) array as float32, or InvalidVectors naming the file."""
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise InvalidVectors(f"{str(path)!r} must hold a 2-D numeric array, got {arr.dtype} "
                             f"{arr.shape}")  # fmt: skip
    return np.asarray(arr, dtype=np.float32)


def as_id_array(arr: npt.ArrayLike, source: str) -> npt.NDArray[np.int64]:
    """A 1-D integer array as int64, or InvalidIds naming where it came from."""
    out = np.asarray(arr)
    if out.ndim != 1 or out.dtype.kind not in "iu":
        raise InvalidIds(f"ids from {source!r} must be a 1-D integer array, got {out.dtype} "
                         f"{out.shape}")  # fmt: skip
    return out.astype(np.int64)


def load_attributes(path: Path | None) -> dict[str, Any] | None:
    """Attribute columns from a JSON file (the worker checks them against its fields)."""
    import json

    from faissq.errors import InvalidAttributes

    if path is None:
        return None
    try:
        columns = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidAttributes(f"{path}: cannot read a JSON map of columns ({exc})") from exc
    if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
        raise InvalidAttributes(f"{path}: give a JSON map {{field: [value per row]}}")
    return columns


def parse_ids(text: str) -> npt.NDArray[np.int64]:
    """Ids from a .npy file or an inline list `7,8,9`."""
    if ID_LIST.match(text) and not Path(text).exists():
        return np.asarray([int(t) for t in text.split(",") if t.strip()], dtype=np.int64)
    return as_id_array(load_npy(Path(text), "ids"), text)


# -- sending and showing a job -----------------------------------------------------------------


def run_job(
    args: argparse.Namespace,
    settings: Settings,
    send: Send,
    show: Callable[[dict[str, Any]], None],
) -> int:
    """Enqueue one job, wait for it with a progress bar, print its result."""
    from faissq.cli.progress_view import wait_with_progress
    from faissq.tasks.producer import JobClient

    require_redis(settings, args.command)
    warn_if_no_worker(settings, args.index)
    jobs = JobClient(settings)
    sender = Sender(jobs)
    try:
        result = send(sender)
        if args.no_wait:
            print(result.id)
            return 0
        t0 = time.perf_counter()
        try:
            report = wait_with_progress(result, args.timeout)
        finally:
            if result.ready():  # a finished job never reads its files again
                _remove_refs(settings, sender.refs)
        show(report)
        print(f"  {'done in':<14} {time.perf_counter() - t0:.2f} s (task {result.id})")
    finally:
        jobs.close()
    return 0


def warn_if_no_worker(settings: Settings, index: str) -> None:
    """Say on stderr when no worker beats for the index: the job would wait in its queue."""
    import redis

    client = redis_client(settings)
    try:
        alive = bool(heartbeats(client, index))
    except redis.exceptions.NoPermissionError as exc:
        raise permission_denied(str(exc), "producer") from exc
    except (redis.RedisError, OSError) as exc:
        url = masked_url(settings.redis.url)
        raise InvalidParameter(f"cannot reach Redis at {url}: {exc}") from exc
    finally:
        client.close()
    if not alive:
        print(
            f"faissq: no worker alive for index {index!r}; the job waits in queue "
            f"{keys.task_queue(index)} until one starts (Ctrl-C stops waiting, not the job)",
            file=sys.stderr,
        )


class Sender:
    """A JobClient and the batch files written through it (removed once the job has ended)."""

    def __init__(self, jobs: JobClient) -> None:
        """jobs: the client every job goes out through."""
        self.jobs = jobs
        self.refs: list[str] = []

    def vectors(self, vectors: npt.NDArray[np.float32]) -> dict[str, Any]:
        """Vectors inline below worker.inline_max_bytes, else as a .npy reference."""
        out = self.jobs.vectors_kwargs(vectors, None)
        if "vectors_ref" in out:
            self.refs.append(out["vectors_ref"]["path"])
        return out

    def attributes(self, columns: dict[str, Any] | None, vectors: dict[str, Any]) -> dict[str, Any]:
        """Attribute columns inline, or by reference beside vectors sent by reference."""
        out = self.jobs.attributes_kwargs(columns, "vectors_ref" in vectors, None)
        if "attributes_ref" in out:
            self.refs.append(out["attributes_ref"]["path"])
        return out

    def ids(self, ids: npt.NDArray[np.int64]) -> dict[str, Any]:
        """Ids inline below worker.inline_max_bytes, else as an int64 .npy reference."""
        from faissq.tasks.producer import put_vectors

        if ids.nbytes <= self.jobs.settings.worker.inline_max_bytes:
            return {"ids": codec.pack_array(np.ascontiguousarray(ids, dtype="<i8"))}
        ref = put_vectors(self.jobs.settings, ids)
        self.refs.append(ref["path"])
        return {"ids_ref": ref}


def _remove_refs(settings: Settings, refs: list[str]) -> None:
    """Delete the batch files this command wrote (best effort: a leftover file only costs space)."""
    import fsspec

    if not refs:
        return
    fs, root = fsspec.core.url_to_fs(settings.storage.url)
    for rel in refs:
        with contextlib.suppress(OSError):
            fs.rm(f"{str(root).rstrip('/')}/{rel}")


def print_report(report: dict[str, Any], fields: tuple[str, ...] = ()) -> None:
    """The result's named fields first, one per line, then every other scalar field."""
    names = list(fields) + [k for k in report if k not in fields]
    gate = report.get("recall_gate")
    if isinstance(gate, dict):  # a build or rebuild: how it fared on sampled queries
        print(f"  {'recall gate':<14} {gate.get('reason')}")
    for name in names:
        value = report.get(name)
        if name not in report or isinstance(value, dict | list):
            continue
        print(f"  {name:<14} {value}")
    snap = report.get("snapshot")
    if isinstance(snap, dict) and snap.get("version"):
        print(f"  {'snapshot':<14} {snap['version']} (seq {snap.get('seq')}, "
              f"{snap.get('bytes', 0)} bytes)")  # fmt: skip


# -- the commands ------------------------------------------------------------------------------


def run_build(args: argparse.Namespace, settings: Settings) -> int:
    """Replace the index with a fresh build from a file."""
    vectors, ids = load_vectors(args.file)
    columns = load_attributes(args.attributes)
    if args.ids is not None:
        ids = as_id_array(load_npy(args.ids, "ids"), str(args.ids))

    def send(s: Sender) -> AsyncResult:
        id_kwargs = {} if ids is None else s.ids(ids)
        vecs = s.vectors(vectors)
        return s.jobs.send("faissq.build", args.index, **vecs, **id_kwargs,
                           **s.attributes(columns, vecs), family=args.family,
                           force=args.force or None)  # fmt: skip

    print(f"build {args.index}: {vectors.shape[0]} x {vectors.shape[1]} vectors from {args.file}")
    fields = ("family", "factory", "reason", "ntotal", "seconds", "save_seconds", "version")
    return run_job(args, settings, send, lambda r: print_report(r, fields))


def run_upsert(args: argparse.Namespace, settings: Settings) -> int:
    """Insert or replace vectors by id."""
    ids = parse_ids(args.ids)
    vectors = as_vectors(load_npy(args.vectors, "vectors"), args.vectors)
    columns = load_attributes(args.attributes)

    def send(s: Sender) -> AsyncResult:
        vecs = s.vectors(vectors)
        return s.jobs.send("faissq.upsert", args.index, **s.ids(ids), **vecs,
                           **s.attributes(columns, vecs), batch_id=args.batch_id)  # fmt: skip

    fields = ("applied", "duplicate", "ntotal", "seq", "version", "seconds")
    return run_job(args, settings, send, lambda r: print_report(r, fields))


def run_delete(args: argparse.Namespace, settings: Settings) -> int:
    """Delete vectors by id."""
    ids = parse_ids(args.ids)

    def send(s: Sender) -> AsyncResult:
        return s.jobs.send("faissq.delete", args.index, **s.ids(ids), batch_id=args.batch_id)

    fields = ("applied", "duplicate", "ntotal", "seq", "version", "seconds")
    return run_job(args, settings, send, lambda r: print_report(r, fields))


def run_merge(args: argparse.Namespace, settings: Settings) -> int:
    """Fold delta and tombstones into the primary."""
    return run_job(args, settings, lambda s: s.jobs.merge(args.index), print_report)


def run_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    """Retrain the primary from the raw vectors."""
    force = args.force or None
    return run_job(args, settings, lambda s: s.jobs.rebuild(args.index, family=args.family,
                                                            force=force), print_report)  # fmt: skip


def run_save(args: argparse.Namespace, settings: Settings) -> int:
    """Snapshot the index to shared storage."""
    return run_job(args, settings, lambda s: s.jobs.save(args.index), print_report)


def run_reload(args: argparse.Namespace, settings: Settings) -> int:
    """Reload the index from shared storage (after `faissq snapshot restore`)."""
    return run_job(args, settings, lambda s: s.jobs.reload(args.index), print_report)


def run_autotune(args: argparse.Namespace, settings: Settings) -> int:
    """Tune search parameters for a target recall and print the calibration table."""
    from faissq.cli.progress_view import print_profile

    def show(report: dict[str, Any]) -> None:
        print_profile(report)
        print_report({"snapshot": report.get("snapshot")})

    def send(s: Sender) -> AsyncResult:
        return s.jobs.autotune(args.index, target_recall=args.target_recall)

    return run_job(args, settings, send, show)
