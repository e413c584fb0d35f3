"""Start-up recovery: load the newest good snapshot, then replay the update log after it.

Recovery only reads, so it runs on read-only mounts and in search replicas. Every acknowledged
mutation is either inside the snapshot (seq <= its covered seq) or in a log entry after it; a
snapshot that is older than the log's truncation point cannot be completed and is refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from faissq.config import IndexSettings
from faissq.errors import LogCorrupt, SnapshotCorrupt
from faissq.index.engine import Engine, EngineExport
from faissq.storage.fs import Storage
from faissq.storage.log import LogEntry, UpdateLog
from faissq.storage.snapshots import SnapshotStore

log = logging.getLogger(__name__)


@dataclass
class Recovered:
    """What recovery found: the engine (None when nothing was ever stored) and the seq it holds."""

    engine: Engine | None
    seq: int = 0
    version: str | None = None
    notes: list[str] = field(default_factory=list)  # fallbacks and a log stop, for status/logs
    fallbacks: int = 0  # damaged snapshot versions skipped (each one also logged)
    replayed: int = 0  # log entries applied after the snapshot
    seconds: float = 0.0


def recover(
    storage: Storage,
    index: str,
    settings: IndexSettings,
    *,
    dim: int | None = None,
    retention: int = 3,
    strict: bool = True,
    engine_options: dict[str, Any] | None = None,
) -> Recovered:
    """Rebuild `index` from storage.

    storage: where snapshots and the log live; index: the index name; settings: the index section
    (its metric must match the manifest); dim: expected dimension (None: trust the manifest);
    retention: only used to open the snapshot store; strict: raise LogCorrupt at a damaged entry
    (False: stop there and report it in `notes`); engine_options: extra Engine keyword arguments
    (gpu, cloner).
    """
    t0 = time.perf_counter()
    options = engine_options or {}
    snap = SnapshotStore(storage, index, retention=retention).load(dim=dim, metric=settings.metric)
    ulog = UpdateLog(storage, index)
    out = Recovered(engine=None)
    if snap is not None:
        out.version, out.seq = snap.version, snap.seq
        out.fallbacks = len(snap.fallbacks)
        out.notes.extend(f"snapshot fallback: {f}" for f in snap.fallbacks)
        exp = EngineExport(**snap.export_fields())
        out.engine = Engine.from_export(exp, settings, index, version=snap.seq, **options)
        dim = snap.dim
    upto = ulog.truncation().upto
    if out.seq < upto:
        raise SnapshotCorrupt(
            f"index {index!r}: the log is truncated up to seq {upto} but the newest loadable "
            f"snapshot covers only seq {out.seq}; acknowledged entries {out.seq + 1}..{upto} "
            "exist only in damaged snapshots (restore one, or repair storage)"
        )
    try:
        for entry in ulog.read(after_seq=out.seq):
            out.engine = _apply(out.engine, entry, dim, settings, index, options)
            out.seq = entry.seq
            out.replayed += 1
    except LogCorrupt as exc:
        msg = f"log replay stopped after seq {out.seq}: {exc}"
        log.error("index %r: %s", index, msg)
        if strict:
            raise LogCorrupt(msg) from exc
        out.notes.append(msg)
    out.seconds = time.perf_counter() - t0
    log.info(
        "index %r recovered: snapshot %s + %d log entries -> seq %d in %.2fs",
        index,
        out.version,
        out.replayed,
        out.seq,
        out.seconds,
    )
    return out


def _apply(
    engine: Engine | None,
    entry: LogEntry,
    dim: int | None,
    settings: IndexSettings,
    index: str,
    options: dict[str, Any],
) -> Engine | None:
    """Apply one verified entry, creating the engine at the first upsert when none exists yet."""
    if engine is None:
        if entry.op == "delete":
            return None  # deleting from an index that holds nothing changes nothing
        engine = Engine(dim or entry.vectors.shape[1], settings, index, **options)
    if entry.op == "upsert":
        engine.upsert(entry.ids, entry.vectors, version=entry.seq)
    else:
        engine.delete(entry.ids, version=entry.seq)
    return engine
