"""`faissq status / search / snapshot`: what an operator looks at and touches by hand."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from faissq import keys
from faissq.cli.job_commands import as_vectors, heartbeats, load_npy, redis_client, require_redis
from faissq.config import Settings, masked_url
from faissq.errors import FaissqError, NoWorkerAlive, PermissionDenied, permission_denied, refused
from faissq.shards import ShardMap, lookup, parse_shard

if TYPE_CHECKING:
    import redis


# -- status ------------------------------------------------------------------------------------


def run_status(args: argparse.Namespace, settings: Settings) -> int:
    """Show each index; exit 0 only when every one has a live worker and is ready."""
    import json

    import redis

    require_redis(settings, "status")
    client = redis_client(settings)
    try:
        indexes, declared = expand_sharded(client, args.index or discover_indexes(client, settings))
        timeout = None if args.no_stats else args.stats_timeout
        report = [index_status(client, settings, i, timeout) for i in indexes]
        sharded = shard_summaries(declared, report)
    except (redis.RedisError, OSError) as exc:
        if message := refused(exc):  # reachable, but this user may not read what status reads
            raise permission_denied(message, "monitor") from exc
        raise FaissqError(f"cannot reach Redis at {masked_url(settings.redis.url)}: {exc}") from exc
    finally:
        client.close()
    if args.json:
        print(json.dumps({"indexes": report, "sharded": sharded}, indent=2, default=str))
    else:
        print(f"redis {masked_url(settings.redis.url)}  storage {masked_url(settings.storage.url)}")
        for summary in sharded:
            print_sharded(summary)
        for entry in report:
            print_status(entry)
    return 0 if report and all(e["ready"] for e in report) else 1


def expand_sharded(client: redis.Redis, names: list[str]) -> tuple[list[str], list[ShardMap]]:
    """The names with each declared sharded index replaced by its shards, and those indexes
    (a shard's index found alone brings its declared index too)."""
    declared: dict[str, ShardMap] = {}
    out: list[str] = []
    for name in names:
        parent = parse_shard(name)
        shard_map = lookup(client, parent[0] if parent else name)
        if shard_map is None or (parent and name not in shard_map.names):
            out.append(name)
            continue
        declared[shard_map.name] = shard_map
        out.extend(shard_map.names if parent is None else [name])
    for shard_map in declared.values():  # every shard shows, served or not
        out.extend(n for n in shard_map.names if n not in out)
    return sorted(dict.fromkeys(out)), list(declared.values())


def shard_summaries(declared: list[ShardMap], report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sharded index: its shards, which are ready, and its vectors in all."""
    by_name = {e["index"]: e for e in report}
    out = []
    for m in declared:
        entries = [by_name[n] for n in m.names if n in by_name]
        ready = [e["index"] for e in entries if e["ready"]]
        sizes = [(e["stats"] or {}).get("ntotal") for e in entries]
        counted = [s for s in sizes if isinstance(s, int)]
        out.append({
            "name": m.name, "shards": m.shards, "metric": m.metric, "ready": ready,
            "not_ready": [n for n in m.names if n not in ready],
            "ntotal": sum(counted) if len(counted) == m.shards else None,  # None: shards unknown
        })  # fmt: skip
    return out


def print_sharded(summary: dict[str, Any]) -> None:
    """A sharded index in one or two lines; its shards follow as ordinary indexes."""
    ready = f"{len(summary['ready'])}/{summary['shards']} ready"
    print(f"sharded {summary['name']}: {summary['shards']} shards, {summary['metric']}, "
          f"{ready}, ntotal {summary['ntotal']}")  # fmt: skip
    if summary["not_ready"]:
        print(f"  not ready   {', '.join(summary['not_ready'])}")


def discover_indexes(client: redis.Redis, settings: Settings) -> list[str]:
    """Indexes with a live heartbeat or a snapshot on storage; else the configured ones."""
    found = set()
    for key in client.scan_iter(match=f"{keys.PREFIX}:{{*}}:hb:*", count=1000):
        name = key.decode() if isinstance(key, bytes) else str(key)
        found.add(name[len(keys.PREFIX) + 1 :].split(":hb:", 1)[0].strip("{}"))
    found.update(stored_indexes(settings))
    return sorted(found) or list(settings.worker.indexes)


def stored_indexes(settings: Settings) -> list[str]:
    """Folders under the storage root that hold an index (a CURRENT pointer, snapshots or a log)."""
    from faissq.storage.fs import Storage
    from faissq.storage.snapshots import CURRENT

    storage = Storage.from_url(settings.storage.url)
    try:
        names = storage.listdir(storage.root)
        marks = (CURRENT, "snapshots", "log")  # CURRENT alone may be lost: see docs/operations.md
        return [n for n in names if any(storage.exists(storage.path(n, m)) for m in marks)]
    except FaissqError:  # storage down: Redis still tells what runs
        return []


def index_status(
    client: redis.Redis, settings: Settings, index: str, stats_timeout_s: float | None
) -> dict[str, Any]:
    """Heartbeats, queue depths, the worker's stats (alive; timeout None: none) and the snapshot."""
    now = time.time()
    workers = []
    for key, beat in sorted(heartbeats(client, index).items()):
        engine = beat.get("engine") or {}
        workers.append(
            {
                "worker": beat.get("worker") or key.split(":hb:", 1)[-1],
                "beat_age_s": round(now - float(beat.get("beat", now)), 1),
                "ready": bool(engine.get("ready")),
                "reason": engine.get("reason", ""),
                "version": engine.get("version"),
                "ntotal": engine.get("ntotal"),
            }
        )
    out: dict[str, Any] = {
        "index": index,
        "alive": bool(workers),
        "workers": workers,
        "queues": {
            "rpc": int(client.llen(keys.rpc_queue(index))),
            "jobs": int(client.llen(keys.task_queue(index))),
            "in_flight": int(client.llen(keys.inflight_list(keys.task_queue(index)))),
            "dead_letters": int(client.llen(keys.dead_letter_list(index))),
        },
        "stats": None,
        "stats_error": "",
        "snapshot": stored_snapshot(settings, index),
    }
    if workers and stats_timeout_s is not None:
        out["stats"], out["stats_error"] = worker_stats(settings, index, stats_timeout_s)
    elif workers:
        out["stats_error"] = "not asked for (--no-stats)"
    stats = out["stats"] or {}
    out["ready"] = any(w["ready"] for w in workers) and stats.get("state", "ready") == "ready"
    return out


def worker_stats(settings: Settings, index: str, timeout_s: float) -> tuple[dict[str, Any], str]:
    """The `faissq.stats` job's answer, or an empty dict and why there is none."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from faissq.tasks.producer import JobClient

    jobs = JobClient(settings)
    try:
        try:
            result = jobs.stats(index)
        except PermissionDenied as exc:  # a read-only (monitor) user: the rest still shows
            return {}, f"{exc.code}: the stats job needs the producer role (--no-stats skips it)"
        try:
            return dict(result.get(timeout=timeout_s)), ""
        except CeleryTimeout:
            result.revoke()  # nobody waits for it any more
            return {}, f"no stats within {timeout_s:g}s (the writer is busy with another job)"
        except FaissqError as exc:
            return {}, f"{exc.code}: {exc}"
    finally:
        jobs.close()


def stored_snapshot(settings: Settings, index: str) -> dict[str, Any]:
    """The CURRENT version on shared storage and how many versions there are."""
    from faissq.storage.durable import DurableStore

    try:
        store = DurableStore(settings).snapshots(index)
        return {"current": store.current_version(), "versions": len(store.versions())}
    except FaissqError as exc:
        return {"current": None, "versions": 0, "error": f"{exc.code}: {exc}"}


def print_status(entry: dict[str, Any]) -> None:
    """One index as a few aligned lines."""
    index, workers, stats = entry["index"], entry["workers"], entry["stats"] or {}
    print(f"index {index}")
    if not workers:
        print(f"  readiness   no worker alive (no heartbeat under {keys.heartbeat_pattern(index)};"
              " a starting worker beats once its indexes are loaded)")  # fmt: skip
    else:
        verdict = "ready" if entry["ready"] else "NOT READY"
        print(f"  readiness   {verdict}: {len(workers)} worker(s) alive")
        for w in workers:
            what = (
                f"ready, version {w['version']}, ntotal {w['ntotal']}"
                if w["ready"]
                else f"not ready ({w['reason']})"
            )
            print(f"    {w['worker']}  beat {w['beat_age_s']}s ago, {what}")
    if entry["stats_error"]:
        print(f"  stats       {entry['stats_error']}")
    if stats:
        reason = f" ({stats['reason']})" if stats.get("reason") else ""
        print(f"  state       {stats.get('state')}{reason}, seq {stats.get('seq')}, "
              f"loaded snapshot {stats.get('snapshot_version')}")  # fmt: skip
        eng = stats.get("engine") or {}
        if eng:
            print(f"  version     {eng.get('version')}")
            print(f"  sizes       ntotal {eng.get('ntotal')} (primary {eng.get('primary')}, "
                  f"delta {eng.get('delta')}, tombstones {eng.get('tombstones')}), "
                  f"dim {eng.get('dim')}")  # fmt: skip
            print(f"  family      {eng.get('family')} ({eng.get('factory')}), {eng.get('metric')}")
            kind, device = ("GPU" if eng.get("gpu") else "CPU"), str(eng.get("device"))
            print(f"  device      {kind}" + ("" if device == kind else f" ({device})"))
        print_recall(stats.get("recall_live"))
    q = entry["queues"]
    print(f"  queues      rpc {q['rpc']}, jobs {q['jobs']}, in flight {q['in_flight']}, "
          f"dead letters {q['dead_letters']}")  # fmt: skip
    snap = entry["snapshot"]
    if snap.get("error"):
        print(f"  snapshot    unreadable: {snap['error']}")
    else:
        print(f"  snapshot    {snap['current'] or 'none'} (CURRENT; {snap['versions']} stored)")


def print_recall(live: dict[str, Any] | None) -> None:
    """Live recall lines: measured recall per setting on sampled searches (docs/operations.md)."""
    if not live:
        return
    print(f"  recall      live, {live['sampled']} sampled (rate {live['sample_rate']:g}), "
          f"{live['evaluated']} checked, {live['backlog']} waiting")  # fmt: skip
    for param, row in (live.get("params") or {}).items():
        print(f"    {param}: {row['recall']:.4f} (lower bound {row['recall_lo']:.4f}, "
              f"{row['samples']} queries)")  # fmt: skip
    drift = live.get("drift") or {}
    if drift:
        advised = ", rebuild advised" if drift.get("advised") else ""
        ratio, imbalance = drift.get("ratio"), drift.get("imbalance")
        print(f"  drift       ratio {ratio}, imbalance {imbalance}{advised}")


# -- search ------------------------------------------------------------------------------------


def run_search(args: argparse.Namespace, settings: Settings) -> int:
    """Search through the RPC queue and print (query row, rank, id, score)."""
    from faissq.rpc.search_client import SearchClient

    require_redis(settings, "search")
    client = SearchClient(settings, index=args.index)
    try:
        if args.random:
            queries = random_queries(client, args.index, args.queries, args.seed)
        else:
            queries = load_npy(args.vector, "query")
            if queries.ndim == 1:
                queries = queries.reshape(1, -1)
            queries = as_vectors(queries, args.vector)
        t0 = time.perf_counter()
        res = client.search(queries, args.k, nprobe=args.nprobe, ef_search=args.ef_search,
                            target_recall=args.target_recall, timeout=args.timeout)  # fmt: skip
        ms = (time.perf_counter() - t0) * 1000
    finally:
        client.close()
    print(f"{'query':>5} {'rank':>4} {'id':>12} {'score':>10}")
    for row in range(res.ids.shape[0]):
        for rank in range(res.ids.shape[1]):
            if res.ids[row, rank] < 0:  # -1 pads when fewer than k vectors match
                continue
            print(f"{row:>5} {rank + 1:>4} {res.ids[row, rank]:>12} {res.scores[row, rank]:>10.4f}")
    print(f"index {args.index} version {res.version}, answered by {res.worker}, "
          f"{ms:.2f} ms round trip for {queries.shape[0]} query row(s)")  # fmt: skip
    return 0


def random_queries(client: Any, index: str, n: int, seed: int) -> np.ndarray[Any, Any]:
    """Standard-normal float32 queries of the dimension the index's worker reports."""
    dims = [w.get("engine", {}).get("dim") for w in client.workers()]
    dim = next((d for d in dims if isinstance(d, int)), None)
    if dim is None:
        raise NoWorkerAlive(f"no ready worker for index {index!r}: its dimension is unknown")
    return np.random.default_rng(seed).standard_normal((max(1, n), dim)).astype(np.float32)


# -- snapshot ----------------------------------------------------------------------------------


def run_snapshot(args: argparse.Namespace, settings: Settings) -> int:
    """Snapshot operations on shared storage (FAISSQ_STORAGE__URL); no worker or Redis needed."""
    from faissq.storage import admin

    if args.action == "ls":
        rows = admin.ls(settings, args.index)
        # the manifest counts the saved FAISS index only; delta and tombstones are stored beside it
        print(f"{'version':<10} {'seq':>8} {'primary':>10} {'bytes':>12}  created")
        for r in rows:
            mark = "  CURRENT" if r["current"] else ""
            print(f"{r['version']:<10} {r['seq']:>8} {r['ntotal']:>10} {r['bytes']:>12}  "
                  f"{r['created_at']}{mark}")  # fmt: skip
        if not rows:
            print(f"(no snapshot of {args.index!r} under {masked_url(settings.storage.url)})")
        return 0
    if args.action == "verify":
        report = admin.verify(settings, args.index, args.version)
        for version, verdict in report.items():
            print(f"{version:<10} {verdict}")
        if not report:
            print(f"(no snapshot of {args.index!r} under {masked_url(settings.storage.url)})")
        return 0 if all(v == "ok" for v in report.values()) else 1
    done = admin.restore(settings, args.index, args.version)
    print(f"{args.index}: CURRENT {done['previous']} -> {done['current']} (seq {done['seq']})")
    print(f"now run `faissq reload --index {args.index}` or restart the index's worker")
    return 0
