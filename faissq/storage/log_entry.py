"""One update-log entry file: its byte layout, writing it, and reading it back verified.

An entry is ``MAGIC | u32 header length | JSON header | ids int64 | vectors float32 | attributes
| digest``. The attribute section (an upsert's attribute columns, msgpack from
`faissq.index.attributes.encode_batch`) is present only when the header's ``attrs_bytes`` says
so; entries without that key (written before attributes existed) read as before. The 32-byte
digest (BLAKE3; sha256 in format-1 entries) covers every byte before it, so a torn or flipped
byte, in the attributes too, is detected before anything from the entry is applied.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import blake3
import numpy as np
import numpy.typing as npt

from faissq.errors import (
    FaissqError,
    InvalidIds,
    InvalidParameter,
    InvalidVectors,
    LogCorrupt,
)
from faissq.index.attributes import decode_batch, encode_batch
from faissq.storage.fs import Writable

Op = Literal["upsert", "delete"]
MAGIC = b"FQLOG\x00\x02\x00"  # file kind + format version 2 (BLAKE3 trailer)
# the trailer's algorithm by magic; format 1 (sha256) entries still replay
DIGESTS: dict[bytes, Any] = {MAGIC: blake3.blake3, b"FQLOG\x00\x01\x00": hashlib.sha256}
HEAD = struct.Struct("<8sI")  # magic, header length
DIGEST_BYTES = 32  # trailer bytes (both algorithms)


@dataclass(frozen=True)
class LogEntry:
    """One logged batch, verified against its checksum."""

    seq: int
    batch_id: str
    op: Op
    ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]  # (n, dim); (n, 0) for deletes
    created_at: float
    # an upsert's checked attribute columns (decode_batch); {}: none sent (all null)
    attributes: dict[str, Any] = field(default_factory=dict)


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


def attribute_section(op: str, attributes: Mapping[str, Any] | None) -> bytes:
    """The bytes an entry carries for a checked attribute batch (b"": none)."""
    if not attributes:
        return b""
    if op != "upsert":
        raise InvalidParameter("only an upsert carries attributes")
    return encode_batch(attributes)


def write_entry(
    f: Writable,
    seq: int,
    batch_id: str,
    op: str,
    ids: npt.NDArray[np.int64],
    vectors: npt.NDArray[np.float32],
    attrs: bytes = b"",
) -> None:
    """Write one entry to `f`, hashing as it goes (no concatenated copy of a large batch)."""
    head: dict[str, Any] = {"seq": seq, "batch_id": batch_id, "op": op, "n": len(ids),
                            "dim": vectors.shape[1], "created_at": time.time()}  # fmt: skip
    if attrs:
        head["attrs_bytes"] = len(attrs)
    header = json.dumps(head).encode()
    digest = DIGESTS[MAGIC]()
    arrays = (a.reshape(-1).view(np.uint8).data for a in (ids, vectors))  # bytes, as hashed
    for part in (HEAD.pack(MAGIC, len(header)), header, *arrays, attrs):
        digest.update(part)
        f.write(part)
    f.write(digest.digest())


def parse_header(data: bytes, where: str) -> tuple[dict[str, Any], int]:
    """The JSON header of an entry's first bytes and where the arrays start."""
    if len(data) < HEAD.size:
        raise LogCorrupt(f"log entry {where} is truncated ({len(data)} bytes)")
    magic, hlen = HEAD.unpack_from(data)
    if magic not in DIGESTS:
        raise LogCorrupt(f"log entry {where} has an unknown magic/format {magic!r}")
    end = HEAD.size + hlen
    if len(data) < end:
        raise LogCorrupt(f"log entry {where} is truncated inside its header")
    try:
        header = json.loads(data[HEAD.size : end])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except ValueError as exc:
        raise LogCorrupt(f"log entry {where} has an unreadable header: {exc}") from exc
    return header, end


def decode_entry(data: bytes, where: str) -> LogEntry:
    """Parse and verify one entry file's bytes; LogCorrupt names `where` on any damage."""
    if len(data) < HEAD.size + DIGEST_BYTES:
        raise LogCorrupt(f"log entry {where} is truncated ({len(data)} bytes)")
    body, digest = memoryview(data)[:-DIGEST_BYTES], data[-DIGEST_BYTES:]  # a view: no copy
    algorithm = DIGESTS.get(data[: len(MAGIC)])
    if algorithm is None or algorithm(body).digest() != digest:
        raise LogCorrupt(f"log entry {where} fails its checksum (truncated or corrupted)")
    header, start = parse_header(data[: HEAD.size + HEAD.unpack_from(data)[1]], where)
    try:
        seq, n, dim = int(header["seq"]), int(header["n"]), int(header["dim"])
        op, batch_id = str(header["op"]), str(header["batch_id"])
        created_at = float(header["created_at"])
        attrs_bytes = int(header.get("attrs_bytes", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise LogCorrupt(f"log entry {where} has a malformed header: {exc}") from exc
    arrays_end = start + n * (8 + 4 * dim)
    if (op not in ("upsert", "delete") or min(n, dim, attrs_bytes) < 0
            or len(body) != arrays_end + attrs_bytes):  # fmt: skip
        raise LogCorrupt(f"log entry {where} header disagrees with its size")
    ids = np.frombuffer(body, np.int64, n, start)
    vectors = np.frombuffer(body, np.float32, n * dim, start + 8 * n).reshape(n, dim)
    try:
        attributes = decode_batch(body[arrays_end:])
    except (FaissqError, ValueError, TypeError) as exc:  # msgpack's errors are ValueErrors
        raise LogCorrupt(f"log entry {where} has an unreadable attribute section: {exc}") from exc
    kind: Op = "upsert" if op == "upsert" else "delete"
    return LogEntry(seq, batch_id, kind, ids, vectors, created_at, attributes)
