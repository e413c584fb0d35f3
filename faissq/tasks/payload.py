"""Decode and check job payloads: inline frames, .npy references under the storage root, ids,
attribute columns (inline or a msgpack file by reference).

Every problem becomes a named PermanentError before anything is logged or applied.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
from typing import Any

import fsspec
import msgpack
import numpy as np
import numpy.typing as npt

from faissq import codec
from faissq.errors import (
    ChecksumMismatch,
    InvalidAttributes,
    InvalidIds,
    InvalidParameter,
    InvalidVectors,
    PermanentError,
)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

VECTOR_DTYPES = frozenset({"<f4"})
ID_DTYPES = frozenset({"<i8", "<u8", "<i4", "<u4"})
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_BATCH_ID = 200  # the update log's limit on batch id length
CHUNK = 8 << 20  # bytes hashed per read of a referenced file


def vectors_arg(vectors: Any, vectors_ref: Any, *, root: str, inline_max_bytes: int) -> F32:
    """Return the job's vectors from exactly one of `vectors` (inline) or `vectors_ref`."""
    if vectors is not None and vectors_ref is not None:
        raise InvalidParameter("give vectors or vectors_ref, not both")
    if vectors is not None:
        arr = codec.unpack_array(
            vectors,
            field="vectors",
            dtypes=VECTOR_DTYPES,
            ndim=2,
            max_bytes=inline_max_bytes,
            error=InvalidVectors,
        )
        return arr.astype(np.float32, copy=False)
    if vectors_ref is not None:
        arr = read_ref(vectors_ref, root=root, field="vectors_ref", error=InvalidVectors)
        if arr.ndim != 2 or arr.dtype != np.float32:
            raise InvalidVectors(f"vectors_ref must hold a 2-D float32 array, got {arr.dtype}")
        return arr.astype(np.float32, copy=False)
    raise InvalidVectors("the job has no vectors: give vectors (inline) or vectors_ref")


def ids_arg(ids: Any, ids_ref: Any, *, root: str, n: int | None) -> I64:
    """Return the job's ids (a list of ints, an inline frame, or ids_ref) as int64."""
    if ids is not None and ids_ref is not None:
        raise InvalidParameter("give ids or ids_ref, not both")
    if ids_ref is not None:
        arr: Any = read_ref(ids_ref, root=root, field="ids_ref", error=InvalidIds)
    elif isinstance(ids, dict):
        arr = codec.unpack_array(ids, field="ids", dtypes=ID_DTYPES, ndim=1, error=InvalidIds)
    elif isinstance(ids, list | tuple):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InvalidIds("ids must be integers")
        try:
            arr = np.asarray(ids, dtype=np.int64)
        except OverflowError as exc:
            raise InvalidIds("ids must fit in int64") from exc
    elif ids is None:
        raise InvalidIds("the job has no ids: give ids or ids_ref")
    else:
        raise InvalidIds(f"ids must be a list or an int64 frame, got {type(ids).__name__}")
    from faissq.index.validate import as_ids

    return as_ids(arr, n)


def attributes_arg(attributes: Any, attributes_ref: Any, *, root: str) -> Any:
    """Return the job's attribute columns from at most one of `attributes` (inline) or
    `attributes_ref` (a msgpack file of the same map); None when neither. The columns are
    checked against the index's declared fields (InvalidAttributes) before anything is logged."""
    if attributes is not None and attributes_ref is not None:
        raise InvalidParameter("give attributes or attributes_ref, not both")
    if attributes_ref is None:
        return attributes
    data = read_blob(attributes_ref, root=root, field="attributes_ref")
    try:
        columns = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise InvalidAttributes(f"attributes_ref is not a msgpack map: {exc}") from None
    if not isinstance(columns, dict):
        raise InvalidAttributes(f"attributes_ref holds a {type(columns).__name__}, not a map")
    return columns


def batch_id_arg(batch_id: Any, fallback: str | None) -> str:
    """Return the client's batch id, else the Celery task id (stable across redeliveries)."""
    if batch_id is None:
        batch_id = fallback
    if not isinstance(batch_id, str) or not 0 < len(batch_id) <= MAX_BATCH_ID:
        raise InvalidParameter(f"batch_id must be a string of 1..{MAX_BATCH_ID} characters")
    return batch_id


def optional_str(name: str, value: Any) -> str | None:
    """Return an optional string parameter."""
    if value is not None and not isinstance(value, str):
        raise InvalidParameter(f"{name} must be a string, got {type(value).__name__}")
    return value


def flag_arg(name: str, value: Any) -> bool:
    """Return an optional boolean parameter (None: false)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidParameter(f"{name} must be true or false, got {value!r}")
    return value


def time_limit_arg(value: Any, default_s: float) -> float:
    """Return a job's time limit in seconds (the settings' when None)."""
    if value is None:
        return default_s
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidParameter(f"time_limit_s must be a positive number, got {value!r}")
    return float(value)


def count_arg(name: str, value: Any, default: int, most: int) -> int:
    """Return an optional integer parameter in 1..most (the default when None)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise InvalidParameter(f"{name} must be an integer in 1..{most}, got {value!r}")
    return value


SETTINGS = ("nprobe", "ef_search", "k_factor")  # the search parameters a tuning profile sets


def profile_arg(value: Any) -> dict[str, Any] | None:
    """Return a tuning profile to install as given (None when absent): a map whose `chosen`
    row and every `table` row hold a numeric recall and positive integer settings."""
    if value is None:
        return None
    rows = value.get("table") if isinstance(value, dict) else None
    if not isinstance(rows, list) or not rows or not isinstance(value.get("chosen"), dict):
        raise InvalidParameter("profile must be a tuning profile: a map with chosen and table")
    for row in [value["chosen"], *rows]:
        ok = isinstance(row, dict) and isinstance(row.get("recall"), int | float)
        for name in SETTINGS:
            got = row.get(name) if ok else None
            ok = ok and (got is None or (type(got) is int and got >= 1))
        if not ok:
            raise InvalidParameter(f"profile row {row!r} needs a recall and settings >= 1")
    given: dict[str, Any] = value
    return given


def resolve_ref(path: Any, root: str) -> str:
    """Return the storage path of a reference, refusing anything outside the storage root."""
    if not isinstance(path, str) or not path:
        raise InvalidParameter("a reference's path must be a non-empty string")
    fs, root_path = fsspec.core.url_to_fs(root)
    root_norm = posixpath.normpath(str(root_path)).rstrip("/") or "/"
    if "://" in path:
        proto, _, rest = path.partition("://")
        if proto not in _protocols(fs):
            raise InvalidParameter(f"reference {path!r} is not on the storage filesystem")
        path = rest
    joined = path if path.startswith("/") else posixpath.join(root_norm, path)
    full = posixpath.normpath(joined)
    if not (full == root_norm or full.startswith(root_norm.rstrip("/") + "/")):
        raise InvalidParameter(f"reference {path!r} is outside the storage root")
    if _is_local(fs):
        import os

        real, real_root = os.path.realpath(full), os.path.realpath(root_norm)
        if not real.startswith(real_root.rstrip("/") + "/"):
            raise InvalidParameter(f"reference {path!r} leaves the storage root through a link")
    return full


def read_ref(ref: Any, *, root: str, field: str, error: type[PermanentError]) -> npt.NDArray[Any]:
    """Load a .npy named by {path, shape, sha256} after checking its place, checksum and shape."""
    if not isinstance(ref, dict):
        raise InvalidParameter(f"{field} must be a map with path, shape and sha256")
    missing = {"path", "shape", "sha256"} - ref.keys()
    if missing:
        raise InvalidParameter(f"{field} lacks {', '.join(sorted(missing))}")
    digest = ref["sha256"]
    if not isinstance(digest, str) or not SHA256.match(digest):
        raise InvalidParameter(f"{field}.sha256 must be 64 lowercase hex digits")
    shape = codec.check_shape(ref["shape"], field=field, error=error)
    full = resolve_ref(ref["path"], root)
    fs, _ = fsspec.core.url_to_fs(root)
    try:
        if _is_local(fs):
            actual = _sha256_file(fs, full)
            if actual != digest:
                raise ChecksumMismatch(f"{field} {ref['path']!r}: sha256 {actual} != {digest}")
            arr = np.load(full, mmap_mode="r", allow_pickle=False)
        else:
            data = bytes(fs.cat_file(full))
            actual = hashlib.sha256(data).hexdigest()
            if actual != digest:
                raise ChecksumMismatch(f"{field} {ref['path']!r}: sha256 {actual} != {digest}")
            arr = np.load(io.BytesIO(data), allow_pickle=False)
    except FileNotFoundError as exc:
        raise InvalidParameter(f"{field} {ref['path']!r} does not exist") from exc
    except ValueError as exc:  # not a .npy, or an object array (pickle refused)
        raise error(f"{field} {ref['path']!r} is not a plain .npy array: {exc}") from exc
    if tuple(arr.shape) != shape:
        raise error(f"{field} holds shape {list(arr.shape)}, the job announced {list(shape)}")
    return np.asarray(arr)


def read_blob(ref: Any, *, root: str, field: str) -> bytes:
    """The bytes of a file named by {path, sha256}, after checking its place and checksum."""
    if not isinstance(ref, dict):
        raise InvalidParameter(f"{field} must be a map with path and sha256")
    missing = {"path", "sha256"} - ref.keys()
    if missing:
        raise InvalidParameter(f"{field} lacks {', '.join(sorted(missing))}")
    digest = ref["sha256"]
    if not isinstance(digest, str) or not SHA256.match(digest):
        raise InvalidParameter(f"{field}.sha256 must be 64 lowercase hex digits")
    full = resolve_ref(ref["path"], root)
    fs, _ = fsspec.core.url_to_fs(root)
    try:
        data = bytes(fs.cat_file(full))
    except FileNotFoundError as exc:
        raise InvalidParameter(f"{field} {ref['path']!r} does not exist") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise ChecksumMismatch(f"{field} {ref['path']!r}: sha256 {actual} != {digest}")
    return data


def _sha256_file(fs: Any, path: str) -> str:
    """Hash a file in chunks, so a large reference is never held twice in memory."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_local(fs: Any) -> bool:
    """Say whether an fsspec filesystem is the local one."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _protocols(fs: Any) -> set[str]:
    """The URL schemes that name this filesystem."""
    proto = fs.protocol
    return set(proto) if isinstance(proto, tuple | list) else {str(proto)}
