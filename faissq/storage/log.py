"""The durable update log of one index: one checksummed file per batch, written before applying.

Layout under ``<root>/<index>/log/``::

    00000000000000000001.entry   one batch (seq 1); created exclusively, never rewritten
    TRUNCATED                    JSON {"upto": seq, "batch_ids": {...}}: a snapshot covers up to seq
    writer.lock                  advisory lock held by the single writer (local storage)
    quarantine/                  damaged entries moved aside, each an explicit gap (quarantine.py)

An entry file is ``MAGIC | u32 header length | JSON header | ids int64 | vectors float32 | digest``,
the 32-byte digest (BLAKE3; sha256 in format-1 entries) covering every byte before it, so a torn
or flipped byte is detected before anything from the entry is applied. Sequence numbers are
gap-free: the writer creates ``<seq>.entry`` exclusively, so a second writer fails on its first
append instead of interleaving. The only gaps a reader accepts are quarantined seqs, which the
writer never reuses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import blake3
import numpy as np
import numpy.typing as npt

from faissq.errors import InvalidIds, InvalidParameter, InvalidVectors, LogCorrupt, WriterConflict
from faissq.storage import quarantine
from faissq.storage.fs import Storage, Writable, storage_errors

log = logging.getLogger(__name__)

Op = Literal["upsert", "delete"]
MAGIC = b"FQLOG\x00\x02\x00"  # file kind + format version 2 (BLAKE3 trailer)
# the trailer's algorithm by magic; format 1 (sha256) entries still replay
_DIGESTS: dict[bytes, Any] = {MAGIC: blake3.blake3, b"FQLOG\x00\x01\x00": hashlib.sha256}
_HEAD = struct.Struct("<8sI")  # magic, header length
_DIGEST = 32  # trailer bytes (both algorithms)
_ENTRY = re.compile(r"^(\d{20})\.entry$")
TRUNCATED = "TRUNCATED"
LOCK = "writer.lock"
MAX_BATCH_ID = 256  # characters; keeps headers small enough to scan cheaply
REMEMBERED_BATCH_IDS = 100_000  # batch ids kept after truncation, to stay idempotent on redelivery


def entry_name(seq: int) -> str:
    """File name of the entry holding `seq` (zero-padded so names sort by seq)."""
    return f"{seq:020d}.entry"


@dataclass(frozen=True)
class LogEntry:
    """One logged batch, verified against its checksum."""

    seq: int
    batch_id: str
    op: Op
    ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]  # (n, dim); (n, 0) for deletes
    created_at: float


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


def check_batch(
    op: str, ids: Any, vectors: Any | None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Validate a batch's shapes and dtypes up front; return contiguous arrays to log."""
    if op not in ("upsert", "delete"):
        raise InvalidParameter(f"log op must be 'upsert' or 'delete', got {op!r}")
    id_arr = np.asarray(ids)
    if id_arr.ndim != 1 or id_arr.dtype != np.int64:
        raise InvalidIds(f"ids must be a 1-D int64 array, got {id_arr.dtype} {id_arr.shape}")
    if op == "delete":
        if vectors is not None:
            raise InvalidVectors("a delete carries no vectors")
        return np.ascontiguousarray(id_arr), np.empty((len(id_arr), 0), np.float32)
    vec = np.asarray(vectors)
    if vec.ndim != 2 or vec.dtype != np.float32 or vec.shape[0] != len(id_arr):
        raise InvalidVectors(
            f"vectors must be float32 (n, dim) with n = {len(id_arr)}, got {vec.dtype} {vec.shape}"
        )
    return np.ascontiguousarray(id_arr), np.ascontiguousarray(vec)


def _write_entry(
    f: Writable,
    seq: int,
    batch_id: str,
    op: str,
    ids: npt.NDArray[np.int64],
    vectors: npt.NDArray[np.float32],
) -> None:
    header = json.dumps(
        {
            "seq": seq,
            "batch_id": batch_id,
            "op": op,
            "n": len(ids),
            "dim": vectors.shape[1],
            "created_at": time.time(),
        }
    ).encode()
    digest = _DIGESTS[MAGIC]()
    # write the arrays' own buffers: no concatenated copy of a large batch
    arrays = (a.reshape(-1).view(np.uint8).data for a in (ids, vectors))  # bytes, as hashed
    for part in (_HEAD.pack(MAGIC, len(header)), header, *arrays):
        digest.update(part)
        f.write(part)
    f.write(digest.digest())


def _parse_header(data: bytes, where: str) -> tuple[dict[str, Any], int]:
    if len(data) < _HEAD.size:
        raise LogCorrupt(f"log entry {where} is truncated ({len(data)} bytes)")
    magic, hlen = _HEAD.unpack_from(data)
    if magic not in _DIGESTS:
        raise LogCorrupt(f"log entry {where} has an unknown magic/format {magic!r}")
    end = _HEAD.size + hlen
    if len(data) < end:
        raise LogCorrupt(f"log entry {where} is truncated inside its header")
    try:
        header = json.loads(data[_HEAD.size : end])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except ValueError as exc:
        raise LogCorrupt(f"log entry {where} has an unreadable header: {exc}") from exc
    return header, end


def decode_entry(data: bytes, where: str) -> LogEntry:
    """Parse and verify one entry file's bytes; LogCorrupt names `where` on any damage."""
    if len(data) < _HEAD.size + _DIGEST:
        raise LogCorrupt(f"log entry {where} is truncated ({len(data)} bytes)")
    body, digest = memoryview(data)[:-_DIGEST], data[-_DIGEST:]  # a view: no copy of the batch
    algorithm = _DIGESTS.get(data[: len(MAGIC)])
    if algorithm is None or algorithm(body).digest() != digest:
        raise LogCorrupt(f"log entry {where} fails its checksum (truncated or corrupted)")
    header, start = _parse_header(data[: _HEAD.size + _HEAD.unpack_from(data)[1]], where)
    try:
        seq, n, dim = int(header["seq"]), int(header["n"]), int(header["dim"])
        op, batch_id = str(header["op"]), str(header["batch_id"])
        created_at = float(header["created_at"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LogCorrupt(f"log entry {where} has a malformed header: {exc}") from exc
    if op not in ("upsert", "delete") or n < 0 or dim < 0 or len(body) != start + n * (8 + 4 * dim):
        raise LogCorrupt(f"log entry {where} header disagrees with its size")
    ids = np.frombuffer(body, np.int64, n, start)
    vectors = np.frombuffer(body, np.float32, n * dim, start + 8 * n).reshape(n, dim)
    return LogEntry(
        seq, batch_id, "upsert" if op == "upsert" else "delete", ids, vectors, created_at
    )


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
            data = f.read(_HEAD.size)
            if len(data) == _HEAD.size:
                data += f.read(min(_HEAD.unpack(data)[1], 1 << 20))
        return _parse_header(data, path)[0]

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
                header = log.read_header(seq)
                self._batch_ids[str(header.get("batch_id"))] = seq
                self.last_seq = max(self.last_seq, seq)
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

    def seq_of(self, batch_id: str) -> int | None:
        """Return the seq a batch id was logged with, or None."""
        return self._batch_ids.get(batch_id)

    def append(self, op: Op, ids: Any, vectors: Any | None, batch_id: str) -> Appended:
        """Durably log one batch before it is applied; a known batch_id returns its first seq."""
        if not batch_id or len(batch_id) > MAX_BATCH_ID:
            raise InvalidParameter(f"batch_id must have 1..{MAX_BATCH_ID} characters")
        known = self._batch_ids.get(batch_id)
        if known is not None:
            return Appended(known, duplicate=True)
        id_arr, vec = check_batch(op, ids, vectors)
        seq = self.last_seq + 1
        path = f"{self.log.folder}/{entry_name(seq)}"
        created = self.storage.write_exclusive_stream(
            path, lambda f: _write_entry(f, seq, batch_id, op, id_arr, vec)
        )
        if not created and not self._is_own_retry(seq, batch_id):
            raise WriterConflict(
                f"log entry {seq} of {self.log.index!r} was written by another writer"
            )
        self.last_seq = seq
        self._batch_ids[batch_id] = seq
        return Appended(seq, duplicate=False)

    def _is_own_retry(self, seq: int, batch_id: str) -> bool:
        # an earlier attempt may have created the entry and then failed on the folder fsync
        with contextlib.suppress(LogCorrupt, FileNotFoundError):
            return self.log.read_header(seq).get("batch_id") == batch_id
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
