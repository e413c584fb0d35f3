"""Streaming, hashed writers and readers for the file kinds of a snapshot (.npy, FAISS index).

Everything streams in bounded chunks: a snapshot of a large index never becomes one bytes object,
so its extra memory is about `CHUNK_BYTES`, whatever the index size.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from faissq.errors import SnapshotCorrupt
from faissq.storage.fs import Storage, Writable

_faiss: Any = faiss  # the callback IO classes are missing from some faiss type stubs
CHUNK_BYTES = 8 << 20  # write/read/hash granularity: bounds the extra memory of save and verify


@dataclass(frozen=True)
class FileDigest:
    """What the manifest records about one file."""

    sha256: str
    bytes: int

    def as_json(self) -> dict[str, Any]:
        """Return the manifest form of this record."""
        return {"sha256": self.sha256, "bytes": self.bytes}


class HashingWriter:
    """A sink that hashes and counts every byte on its way to the real file."""

    def __init__(self, f: Writable) -> None:
        """Wrap the open file `f`."""
        self.f = f
        self.digest = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: Any) -> int:
        """Hash then write one buffer; return its length (the PyCallbackIOWriter contract)."""
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.f.write(view)
        self.nbytes += view.nbytes
        return view.nbytes

    def result(self) -> FileDigest:
        """Return the digest of everything written."""
        return FileDigest(self.digest.hexdigest(), self.nbytes)


def write_npy(storage: Storage, path: str, arr: npt.NDArray[Any]) -> FileDigest:
    """Write `arr` as a memory-mappable .npy, streaming rows in CHUNK_BYTES slices."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header,
        {
            "descr": np.lib.format.dtype_to_descr(arr.dtype),
            "fortran_order": False,
            "shape": arr.shape,
        },
    )
    row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    rows = max(1, CHUNK_BYTES // row_bytes)
    with storage.open_new(path) as f:
        out = HashingWriter(f)
        out.write(header.getvalue())
        for start in range(0, arr.shape[0], rows):
            out.write(np.ascontiguousarray(arr[start : start + rows]).data)
        return out.result()


def write_index(storage: Storage, path: str, index: Any) -> FileDigest:
    """Serialise a CPU FAISS index straight to storage through a callback writer (no bytes blob)."""
    with storage.open_new(path) as f:
        out = HashingWriter(f)
        writer = _faiss.PyCallbackIOWriter(out.write, CHUNK_BYTES)
        faiss.write_index(index, writer)
        del writer  # flushes faiss' last buffered block into `out`
        return out.result()


def write_bytes(storage: Storage, path: str, data: bytes) -> FileDigest:
    """Write a small file and return its digest."""
    with storage.open_new(path) as f:
        out = HashingWriter(f)
        out.write(data)
        return out.result()


def hash_file(storage: Storage, path: str) -> FileDigest:
    """Stream a file through sha256."""
    digest = hashlib.sha256()
    total = 0
    try:
        with storage.open_read(path) as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
                total += len(chunk)
    except FileNotFoundError as exc:
        raise SnapshotCorrupt(f"{path} is missing") from exc
    return FileDigest(digest.hexdigest(), total)


def read_npy(storage: Storage, path: str, *, mmap: bool = True) -> npt.NDArray[Any]:
    """Load a .npy: memory-mapped (read-only) on local storage, streamed into memory elsewhere."""
    local = storage.local_path(path)
    try:
        if local is not None and mmap:
            arr: npt.NDArray[Any] = np.load(local, mmap_mode="r", allow_pickle=False)
            return arr
        with storage.open_read(path) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise SnapshotCorrupt(f"{path} is not a readable .npy: {exc}") from exc


def read_index(storage: Storage, path: str) -> Any:
    """Load a FAISS index: FAISS' own file reader on local storage, a callback reader elsewhere."""
    local = storage.local_path(path)
    try:
        if local is not None:
            return faiss.read_index(local)
        with storage.open_read(path) as f:
            reader = _faiss.PyCallbackIOReader(f.read, CHUNK_BYTES)
            try:
                return faiss.read_index(reader)
            finally:
                del reader
    except RuntimeError as exc:
        raise SnapshotCorrupt(f"{path} is not a readable FAISS index: {exc}") from exc


def to_cpu(index: Any) -> Any:
    """Return a CPU copy of a GPU index (snapshots always hold CPU indexes), else the index."""
    if "Gpu" in type(index).__name__ and hasattr(faiss, "index_gpu_to_cpu"):
        return faiss.index_gpu_to_cpu(index)
    return index
