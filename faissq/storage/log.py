"""The durable update log of one index: one checksummed file per batch, written before applying.

Layout under ``<root>/<index>/log/``::

    00000000000000000001.entry   one batch (seq 1); created exclusively, never rewritten
    TRUNCATED                    JSON {"upto": seq, "batch_ids": {...}}: a snapshot covers up to seq
    writer.lock                  advisory lock held by the single writer (local storage)
    quarantine/                  damaged entries moved aside, each an explicit gap (quarantine.py)

An entry file (log_entry.py) holds one batch, its upsert's attribute columns too, under a digest
that covers every byte, so a torn or flipped byte is detected before anything from the entry is
applied. Sequence numbers are gap-free: the writer creates ``<seq>.entry`` exclusively, so a
second writer fails on its first append instead of interleaving. The only gaps a reader accepts
are quarantined seqs, which the writer never reuses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from faissq.errors import InvalidParameter, LogCorrupt, WriterConflict
from faissq.storage import quarantine
from faissq.storage.fs import Storage, storage_errors
from faissq.storage.log_entry import (
    HEAD,
    LogEntry,
    Op,
    attribute_section,
    check_batch,
    decode_entry,
    parse_header,
    write_entry,
)

__all__ = ["LOCK", "MAX_BATCH_ID", "TRUNCATED", "Appended", "LogEntry", "LogWriter", "Op",
           "Truncation", "UpdateLog", "entry_name"]  # fmt: skip

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^(\d{20})\.entry$")
TRUNCATED = "TRUNCATED"
LOCK = "writer.lock"
MAX_BATCH_ID = 256  # characters; keeps headers small enough to scan cheaply
REMEMBERED_BATCH_IDS = 100_000  # batch ids kept after truncation, to stay idempotent on redelivery


def entry_name(seq: int) -> str:
    """File name of the entry holding `seq` (zero-padded so names sort by seq)."""
    return f"{seq:020d}.entry"


@dataclass(frozen=True)
class Appended:
    """What an append returns: the batch's seq, and whether it was already in the log."""

    seq: int
    duplicate: bool


@dataclass
class Truncation:
    """The TRUNCATED marker: entries up to `upto` are covered by a snapshot and may be gone."""

    upto: int = 0
    batch_ids: dict[str, int] = field(default_factory=dict)


class UpdateLog:
    """Read side of one index's log (never writes); `open_writer` gives the single writer."""

    def __init__(self, storage: Storage, index: str) -> None:
        """Log of `index` under `storage`; nothing is touched until a method is called."""
        self.storage = storage
        self.index = index
        self.folder = storage.path(index, "log")

    def entry_seqs(self) -> list[int]:
        """Return the seqs of the entry files present, ascending."""
        seqs = (_ENTRY.match(name) for name in self.storage.listdir(self.folder))
        return sorted(int(m.group(1)) for m in seqs if m)

    def truncation(self) -> Truncation:
        """Return the TRUNCATED marker (upto 0 when the log was never truncated)."""
        path = f"{self.folder}/{TRUNCATED}"
        try:
            raw = json.loads(self.storage.read_bytes(path))
            return Truncation(
                int(raw["upto"]), {str(k): int(v) for k, v in raw["batch_ids"].items()}
            )
        except FileNotFoundError:
            return Truncation()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LogCorrupt(f"{path} is unreadable: {exc}") from exc

    def quarantined(self) -> dict[int, quarantine.Quarantined]:
        """Return the quarantined seqs with their records (explicit gaps, never reused)."""
        return quarantine.listing(self.storage, self.folder)

    def quarantine(self, seq: int, reason: str) -> quarantine.Quarantined:
        """Move entry `seq` aside into log/quarantine/ (never deleted); writers and operators."""
        try:
            batch_id: str | None = str(self.read_header(seq).get("batch_id"))
        except (LogCorrupt, FileNotFoundError):
            batch_id = None
        return quarantine.move_aside(self.storage, self.folder, seq, reason, batch_id)

    def last_seq(self) -> int:
        """Return the highest seq ever assigned (0 for an empty log), quarantined ones included."""
        seqs = self.entry_seqs() + list(self.quarantined())
        return max(max(seqs, default=0), self.truncation().upto)

    def read_entry(self, seq: int) -> LogEntry:
        """Read and verify the entry holding `seq`."""
        path = f"{self.folder}/{entry_name(seq)}"
        try:
            entry = decode_entry(self.storage.read_bytes(path), path)
        except FileNotFoundError as exc:
            raise LogCorrupt(f"log entry {path} is missing") from exc
        if entry.seq != seq:
            raise LogCorrupt(f"log entry {path} holds seq {entry.seq}")
        return entry

    def read_header(self, seq: int) -> dict[str, Any]:
        """Read only the JSON header of an entry (cheap scan of batch ids)."""
        path = f"{self.folder}/{entry_name(seq)}"
        with self.storage.open_read(path) as f:
            data = f.read(HEAD.size)
            if len(data) == HEAD.size:
                data += f.read(min(HEAD.unpack(data)[1], 1 << 20))
        return parse_header(data, path)[0]

    def read(self, after_seq: int = 0) -> Iterator[LogEntry]:
        """Yield verified entries after `after_seq` in order, skipping quarantined seqs;
        LogCorrupt at the first bad or missing one."""
        upto = self.truncation().upto
        if after_seq < upto:
            raise LogCorrupt(
                f"log of {self.index!r} is truncated up to seq {upto}: "
                f"entries {after_seq + 1}..{upto} are no longer available"
            )
        skipped = set(self.quarantined())
        expected = after_seq + 1
        for seq in (s for s in self.entry_seqs() if s > after_seq and s not in skipped):
            while expected in skipped:
                expected += 1
            if seq != expected:
                raise LogCorrupt(
                    f"log of {self.index!r} has a gap: entry {expected} is missing "
                    f"(next present: {seq}); last good seq is {expected - 1}"
                )
            yield self.read_entry(seq)
            expected += 1

    def open_writer(self) -> LogWriter:
        """Become the single writer of this log; WriterConflict when another one holds it."""
        return LogWriter(self)


class LogWriter:
    """The one process appending to an index's log: assigns gap-free seqs, dedups batch ids."""

    def __init__(self, log: UpdateLog) -> None:
        """Take the writer lock, clean leftovers of a crashed truncation, load the batch ids."""
        self.log = log
        self.storage = log.storage
        self._lock: Any = None
        self.storage.makedirs(log.folder)
        self._take_lock()
        try:
            trunc = log.truncation()
            self._batch_ids: dict[str, int] = dict(trunc.batch_ids)
            self._upto = trunc.upto
            self.last_seq = trunc.upto
            moved = log.quarantined()
            for seq in log.entry_seqs():
                if seq <= trunc.upto:
                    self.storage.remove(f"{log.folder}/{entry_name(seq)}")
                    continue
                if seq in moved:
                    continue  # a move aside interrupted by a crash: recovery finishes it
                self.last_seq = max(self.last_seq, seq)
                with contextlib.suppress(LogCorrupt):
                    # a damaged entry is recovery's to judge (quarantined when newest), and
                    # a writer locks before recovering: refusing the lock would stop that
                    header = log.read_header(seq)
                    self._batch_ids[str(header.get("batch_id"))] = seq
            self.forget_quarantined()
        except BaseException:
            self.close()
            raise

    def forget_quarantined(self) -> None:
        """Never reuse a quarantined seq, and let its batch id be logged again (not applied)."""
        moved = set(self.log.quarantined())
        self.last_seq = max(self.last_seq, max(moved, default=0))
        self._batch_ids = {b: s for b, s in self._batch_ids.items() if s not in moved}

    def _take_lock(self) -> None:
        if not self.storage.is_local:
            return  # object stores: exclusive creation of each entry is the fence
        import fcntl

        path = f"{self.log.folder}/{LOCK}"
        with storage_errors("open", path):
            fh = open(path, "a+b")  # noqa: SIM115 - held open for the writer's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.close()
            raise WriterConflict(f"another process writes the log of {self.log.index!r}") from exc
        self._lock = fh

    def close(self) -> None:
        """Release the writer lock."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, seq: int) -> None:
        """Never hand out `seq` or below again (a build's snapshot took it)."""
        self.last_seq = max(self.last_seq, seq)

    def append(
        self,
        op: Op,
        ids: Any,
        vectors: Any | None,
        batch_id: str,
        attributes: Mapping[str, Any] | None = None,
    ) -> Appended:
        """Durably log one batch before it is applied; a known batch_id returns its first seq.

        attributes: an upsert's attribute columns, already checked (attributes.check_batch).
        """
        if not batch_id or len(batch_id) > MAX_BATCH_ID:
            raise InvalidParameter(f"batch_id must have 1..{MAX_BATCH_ID} characters")
        known = self._batch_ids.get(batch_id)
        if known is not None:
            return Appended(known, duplicate=True)
        id_arr, vec = check_batch(op, ids, vectors)
        attrs = attribute_section(op, attributes)
        seq = self.last_seq + 1
        path = f"{self.log.folder}/{entry_name(seq)}"
        created = self.storage.write_exclusive_stream(
            path, lambda f: write_entry(f, seq, batch_id, op, id_arr, vec, attrs)
        )
        if not created and not self._is_own_retry(seq, batch_id):
            raise WriterConflict(
                f"log entry {seq} of {self.log.index!r} exists and is not this batch: another "
                f"writer's, or a damaged one (`faissq log verify --index {self.log.index}`)"
            )
        self.last_seq = seq
        self._batch_ids[batch_id] = seq
        return Appended(seq, duplicate=False)

    def _is_own_retry(self, seq: int, batch_id: str) -> bool:
        # an earlier attempt may have created the entry and then failed on the folder fsync;
        # the whole entry is verified, as a torn one with an intact header must not be acked
        with contextlib.suppress(LogCorrupt, FileNotFoundError):
            return self.log.read_entry(seq).batch_id == batch_id
        return False

    def truncate(self, upto: int) -> int:
        """Drop entries up to `upto` (a snapshot covers them); return how many were removed."""
        if upto <= self._upto:
            return 0
        if upto > self.last_seq:
            raise InvalidParameter(f"cannot truncate up to {upto}: last seq is {self.last_seq}")
        keep = sorted(self._batch_ids.items(), key=lambda kv: kv[1])[-REMEMBERED_BATCH_IDS:]
        marker = {"upto": upto, "batch_ids": dict(keep)}
        self.storage.write_atomic(f"{self.log.folder}/{TRUNCATED}", json.dumps(marker).encode())
        self._upto = upto
        self._batch_ids = dict(keep)
        removed = 0
        for seq in self.log.entry_seqs():
            if seq <= upto:
                self.storage.remove(f"{self.log.folder}/{entry_name(seq)}")
                removed += 1
        self.storage.sync_dir(self.log.folder)
        log.info("log of %r truncated up to seq %d (%d entries)", self.log.index, upto, removed)
        return removed
