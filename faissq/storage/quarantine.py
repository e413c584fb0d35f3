"""The log's quarantine: damaged entries moved aside, kept forever, each an explicit, recorded gap.

Layout under ``<root>/<index>/log/quarantine/``::

    00000000000000000007.entry   the entry's bytes exactly as they were found (never deleted)
    00000000000000000007.json    {"seq", "reason", "moved_at", "batch_id", "resolved_at", ...}

A quarantined seq is skipped by every reader and never reused by the writer. Until an operator
resolves it (`faissq log resolve`) recovery reports the index `degraded` naming the seq: its batch
was acknowledged once and is not in the index.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

from faissq.errors import InvalidParameter, LogCorrupt
from faissq.storage.fs import Storage, Writable

log = logging.getLogger(__name__)

FOLDER = "quarantine"
_ENTRY = re.compile(r"^(\d{20})\.entry$")
_COPY_BYTES = 8 << 20  # streamed copy: a large batch is never held in memory twice


@dataclass(frozen=True)
class Quarantined:
    """What the record beside a quarantined entry says."""

    seq: int
    reason: str
    moved_at: str
    batch_id: str | None = None
    resolved_at: str | None = None
    resolution: str = ""


def folder_of(log_folder: str) -> str:
    """The quarantine folder of the log in `log_folder`."""
    return f"{log_folder}/{FOLDER}"


def listing(storage: Storage, log_folder: str) -> dict[int, Quarantined]:
    """Every quarantined seq with its record (a missing or unreadable record still counts)."""
    qdir = folder_of(log_folder)
    out = {}
    for name in storage.listdir(qdir):
        m = _ENTRY.match(name)
        if m:
            seq = int(m.group(1))
            out[seq] = _record(storage, qdir, seq)
    return out


def _record(storage: Storage, qdir: str, seq: int) -> Quarantined:
    path = f"{qdir}/{seq:020d}.json"
    try:
        raw = json.loads(storage.read_bytes(path))
        return Quarantined(**{k: raw[k] for k in Quarantined.__dataclass_fields__ if k in raw})
    except FileNotFoundError:
        return Quarantined(seq, "no record beside the entry", "")
    except (ValueError, TypeError) as exc:
        return Quarantined(seq, f"record unreadable: {exc}", "")


def move_aside(
    storage: Storage, log_folder: str, seq: int, reason: str, batch_id: str | None = None
) -> Quarantined:
    """Copy entry `seq` into the quarantine, write its record, then remove it from the log.

    Each step is safe to repeat: a crash leaves the entry in both places, and the next call
    finds the identical copy and finishes the move.
    """
    name = f"{seq:020d}.entry"
    src, qdir = f"{log_folder}/{name}", folder_of(log_folder)
    dst = f"{qdir}/{name}"
    if not storage.exists(src):
        if storage.exists(dst):
            return _record(storage, qdir, seq)
        raise InvalidParameter(f"log entry {src} is not there to quarantine")
    storage.makedirs(qdir)

    def copy(f: Writable) -> None:
        with storage.open_read(src) as r:
            while chunk := r.read(_COPY_BYTES):
                f.write(chunk)

    if not storage.write_exclusive_stream(dst, copy) and not _same(storage, src, dst):
        raise LogCorrupt(f"{dst} already holds another entry {seq}: move it away by hand first")
    now = dt.datetime.now(dt.UTC).isoformat()
    record = Quarantined(seq, reason, now, batch_id)
    storage.write_atomic(f"{qdir}/{seq:020d}.json", json.dumps(asdict(record)).encode())
    storage.remove(src)
    storage.sync_dir(log_folder)
    log.error("log entry %s quarantined to %s: %s", src, dst, reason)
    return record


def _same(storage: Storage, a: str, b: str) -> bool:
    return storage.size(a) == storage.size(b) and storage.read_bytes(a) == storage.read_bytes(b)


def resolve(storage: Storage, log_folder: str, seq: int, resolution: str) -> Quarantined:
    """Mark a quarantined entry as dealt with (its batch re-sent or known unneeded); kept."""
    qdir = folder_of(log_folder)
    if not storage.exists(f"{qdir}/{seq:020d}.entry"):
        raise InvalidParameter(f"log entry {seq} is not in {qdir}")
    now = dt.datetime.now(dt.UTC).isoformat()
    record: dict[str, Any] = asdict(_record(storage, qdir, seq))
    record.update(resolved_at=now, resolution=resolution)
    storage.write_atomic(f"{qdir}/{seq:020d}.json", json.dumps(record).encode())
    log.warning("quarantined log entry %d in %s resolved: %s", seq, qdir, resolution)
    return Quarantined(**record)
