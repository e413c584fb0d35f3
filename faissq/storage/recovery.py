"""Start-up recovery: load the newest good snapshot, then replay the update log after it.

Every acknowledged mutation is either inside the snapshot (seq <= its covered seq) or in a log
entry after it; a snapshot that is older than the log's truncation point cannot be completed and
is refused. Whatever is served short of that is said in `Recovered.notes` (the index is then
`degraded`): a snapshot fallback, a lost CURRENT pointer, a quarantined log entry. Recovery only
reads, except that the writer (quarantine=True) moves a damaged newest log entry aside; a damaged
entry with entries after it stops recovery with LogCorrupt, as skipping it would reorder history.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from faissq.config import IndexSettings
from faissq.errors import LogCorrupt, SnapshotCorrupt, StorageUnavailable
from faissq.index.attributes import columns_for
from faissq.index.engine import Engine
from faissq.index.export import EngineExport
from faissq.storage.fs import Storage
from faissq.storage.log import LogEntry, UpdateLog
from faissq.storage.snapshot_load import SnapshotReader

log = logging.getLogger(__name__)


@dataclass
class Recovered:
    """What recovery found: the engine (None when nothing was ever stored) and the seq it holds."""

    engine: Engine | None
    seq: int = 0
    version: str | None = None
    notes: list[str] = field(default_factory=list)  # why less than everything is served
    fallbacks: int = 0  # damaged snapshot versions skipped (each one also logged)
    replayed: int = 0  # log entries applied after the snapshot
    quarantined: list[int] = field(default_factory=list)  # log seqs moved aside by this recovery
    seconds: float = 0.0


def recover(
    storage: Storage,
    index: str,
    settings: IndexSettings,
    *,
    dim: int | None = None,
    retention: int = 3,
    quarantine: bool = False,
    engine_options: dict[str, Any] | None = None,
) -> Recovered:
    """Rebuild `index` from storage.

    storage: where snapshots and the log live; index: the index name; settings: the index section
    (its metric must match the manifest); dim: expected dimension (None: trust the manifest);
    retention: only used to open the snapshot store; quarantine: move a damaged newest log entry
    into log/quarantine/ (the writer only; replicas stop before it without moving anything);
    engine_options: extra Engine keyword arguments (gpu, cloner).
    """
    t0 = time.perf_counter()
    options = engine_options or {}
    snap = SnapshotReader(storage, index, retention=retention).load(dim=dim, metric=settings.metric)
    ulog = UpdateLog(storage, index)
    out = Recovered(engine=None)
    if snap is not None:
        out.version, out.seq = snap.version, snap.seq
        out.fallbacks = len(snap.fallbacks)
        out.notes.extend(snap.notes)
        out.notes.extend(f"snapshot fallback: {f}" for f in snap.fallbacks)
        exp = EngineExport(**snap.export_fields())
        out.engine = Engine.from_export(exp, settings, index, version=snap.seq, **options)
        dim = snap.dim
    upto = ulog.truncation().upto
    if out.seq < upto:
        raise SnapshotCorrupt(_unrecoverable(index, out, upto, snap is None))
    try:
        for entry in ulog.read(after_seq=out.seq):
            out.engine = _apply(out.engine, entry, dim, settings, index, options)
            out.seq = entry.seq
            out.replayed += 1
    except LogCorrupt as exc:
        _stop_at_damage(ulog, out, exc, quarantine)
    for seq, q in sorted(ulog.quarantined().items()):
        if q.resolved_at is None and seq not in out.quarantined:
            out.notes.append(
                f"log entry {seq} is quarantined ({q.reason}): its batch was not replayed; "
                f"`faissq log resolve --index {index} --seq {seq}` once it is re-sent"
            )
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


def _unrecoverable(index: str, out: Recovered, upto: int, no_snapshot: bool) -> str:
    """Why the snapshot found cannot be completed from the log (the entries are gone)."""
    lost = f"acknowledged entries {out.seq + 1}..{upto} are in no loadable snapshot"
    if no_snapshot:
        return (
            f"index {index!r}: no complete snapshot version is stored but the log is truncated "
            f"up to seq {upto}; {lost} (restore the snapshots folder from a backup)"
        )
    return (
        f"index {index!r}: the log is truncated up to seq {upto} but the newest loadable "
        f"snapshot {out.version} covers only seq {out.seq}; {lost}: every newer version is "
        "damaged (see `faissq snapshot verify`; restore one from a backup)"
    )


def _stop_at_damage(ulog: UpdateLog, out: Recovered, exc: LogCorrupt, quarantine: bool) -> None:
    """Serve up to the last good entry when the damaged one is the newest; else raise."""
    index, moved = ulog.index, ulog.quarantined()
    bad = out.seq + 1
    while bad in moved:
        bad += 1
    later = [s for s in ulog.entry_seqs() if s > bad and s not in moved]
    if later:
        msg = (
            f"log replay of {index!r} stopped after seq {out.seq}: {exc}; entries up to seq "
            f"{later[-1]} follow it, so it cannot be skipped silently. Inspect with `faissq log "
            f"verify --index {index}`; put the entry back from a backup, or accept the loss of "
            f"its batch with `faissq log quarantine --index {index} --seq {bad}`, then reload"
        )
        log.error("index %r: %s", index, msg)
        raise LogCorrupt(msg) from exc
    note = f"newest log entry {bad} is damaged ({exc}), served up to seq {out.seq}"
    if quarantine:
        try:
            ulog.quarantine(bad, str(exc))
            out.quarantined.append(bad)
            note += "; moved to log/quarantine/"
        except StorageUnavailable as err:
            note += f"; moving it aside failed: {err}"
    else:
        note += "; its writer moves it aside"
    log.error("index %r: %s", index, note)
    out.notes.append(note)


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
        attrs = columns_for(engine.schema, entry.attributes)
        engine.upsert(entry.ids, entry.vectors, version=entry.seq, attributes=attrs)
    else:
        engine.delete(entry.ids, version=entry.seq)
    return engine
