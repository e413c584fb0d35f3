"""Streaming, hashed writers and readers for the file kinds of a snapshot (.npy, FAISS index).

Everything streams in bounded chunks: a snapshot of a large index never becomes one bytes object,
so its extra memory is a few `CHUNK_BYTES`, whatever the index size. sha256 runs at about the
speed of a page-cache write, so a writer hashes in a background thread (hashlib releases the GIL
on large buffers) while it produces and writes the next chunk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from faissq.errors import SnapshotCorrupt
from faissq.storage.fs import Storage, Writable

_faiss: Any = faiss  # the callback IO classes are missing from some faiss type stubs
CHUNK_BYTES = 8 << 20  # write/read/hash granularity: bounds the extra memory of save and verify
VERIFY_THREADS = 4  # files hashed side by side at load (capped by the core count, at least 2)
# numpy parses .npy headers with ast.literal_eval, which CPython 3.11 cannot run in two threads at
# once (spurious "AST constructor recursion depth mismatch", python/cpython#106905)
_NPY_HEADER_LOCK = threading.Lock()
HASH_QUEUE_CHUNKS = 3  # chunks a writer may run ahead of its hasher: at most 3 x 8 MB held


@dataclass(frozen=True)
class FileDigest:
    """What the manifest records about one file."""

    sha256: str
    bytes: int

    def as_json(self) -> dict[str, Any]:
        """Return the manifest form of this record."""
        return {"sha256": self.sha256, "bytes": self.bytes}


class BackgroundSha256:
    """sha256 fed in order through a bounded queue to a worker thread, overlapping the caller's I/O.

    A buffer handed to `update` is hashed later, so it must not change afterwards: bytes objects
    (faiss' callback writer) and slices of the immutable export arrays qualify.
    """

    def __init__(self, depth: int = HASH_QUEUE_CHUNKS) -> None:
        """Start the worker; `depth` chunks may wait for it before `update` blocks."""
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[memoryview | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="faissq-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:  # after a failure keep draining, so producers never block
                try:
                    self._digest.update(chunk)
                except BaseException as exc:  # re-raised in the caller by hexdigest()
                    self._error = exc

    def update(self, chunk: memoryview) -> None:
        """Queue one buffer for hashing (blocks while `depth` buffers are waiting)."""
        self._queue.put(chunk)

    def close(self) -> None:
        """Stop the worker once it has hashed everything queued (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        """Wait for every queued buffer, then return the hex digest."""
        self.close()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()


class HashingWriter:
    """A sink that hashes (in a background thread) and counts every byte written to the file."""

    def __init__(self, f: Writable) -> None:
        """Wrap the open file `f`; call `result()` or `close()` when done."""
        self.f = f
        self.digest = BackgroundSha256()
        self.nbytes = 0

    def write(self, data: Any) -> int:
        """Queue a buffer for hashing, write it, return its length (PyCallbackIOWriter contract)."""
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.f.write(view)
        self.nbytes += view.nbytes
        return view.nbytes

    def close(self) -> None:
        """Stop the hashing thread (after a failed write, too)."""
        self.digest.close()

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
        try:
            out.write(header.getvalue())
            for start in range(0, arr.shape[0], rows):
                out.write(np.ascontiguousarray(arr[start : start + rows]).data)
            return out.result()
        finally:
            out.close()


def write_index(storage: Storage, path: str, index: Any) -> FileDigest:
    """Serialise a CPU FAISS index straight to storage through a callback writer (no bytes blob)."""
    with storage.open_new(path) as f:
        out = HashingWriter(f)
        try:
            writer = _faiss.PyCallbackIOWriter(out.write, CHUNK_BYTES)
            faiss.write_index(index, writer)
            del writer  # flushes faiss' last buffered block into `out`
            return out.result()
        finally:
            out.close()


def write_bytes(storage: Storage, path: str, data: bytes) -> FileDigest:
    """Write a small file and return its digest."""
    digest = hashlib.sha256(data).hexdigest()  # small: no thread
    with storage.open_new(path) as f:
        f.write(data)
    return FileDigest(digest, len(data))


def hash_file(storage: Storage, path: str) -> FileDigest:
    """Stream a file through sha256, reading into one reused buffer (no fresh pages per chunk)."""
    digest = hashlib.sha256()
    total = 0
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    try:
        with storage.open_read(path) as f:
            readinto = getattr(f, "readinto", None)
            while True:
                if readinto is not None:
                    got = readinto(view)
                    chunk = view[:got]
                else:
                    chunk = memoryview(f.read(CHUNK_BYTES))
                    got = chunk.nbytes
                if not got:
                    break
                digest.update(chunk)
                total += got
    except FileNotFoundError as exc:
        raise SnapshotCorrupt(f"{path} is missing") from exc
    return FileDigest(digest.hexdigest(), total)


def verify_files(
    storage: Storage,
    folder: str,
    expected: Mapping[str, Mapping[str, Any]],
    parse: Callable[[Storage, str], Any] | None = None,
) -> dict[str, Any]:
    """Hash the files of `folder` against `expected` in parallel; `parse(storage, path)` each match.

    A file is parsed only after its own digest matched, and the caller trusts the result only when
    every file matched, so parsing the index overlaps the hashing of the .npy files without ever
    handing FAISS unverified bytes. Returns {name: parse result (None without `parse`)}.
    """

    def one(name: str) -> Any:
        path = f"{folder}/{name}"
        got, want = hash_file(storage, path), expected[name]
        if got.sha256 != want["sha256"] or got.bytes != int(want["bytes"]):
            raise SnapshotCorrupt(f"{path} fails its checksum")
        return None if parse is None else parse(storage, path)

    names = sorted(expected, key=lambda n: -int(expected[n]["bytes"]))  # largest first
    workers = max(1, min(len(names), max(2, min(VERIFY_THREADS, os.cpu_count() or 2))))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="faissq-verify") as pool:
        futures = {name: pool.submit(one, name) for name in names}
        try:
            return {name: fut.result() for name, fut in futures.items()}
        except BaseException:
            for fut in futures.values():
                fut.cancel()  # running ones finish; their results are dropped
            raise


def read_npy(storage: Storage, path: str, *, mmap: bool = True) -> npt.NDArray[Any]:
    """Load a .npy: memory-mapped (read-only) on local storage, streamed into memory elsewhere."""
    local = storage.local_path(path)
    try:
        if local is not None and mmap:
            with _NPY_HEADER_LOCK:
                arr: npt.NDArray[Any] = np.load(local, mmap_mode="r", allow_pickle=False)
            return arr
        with storage.open_read(path) as f, _NPY_HEADER_LOCK:
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


def open_file(storage: Storage, path: str) -> Any:
    """Open one (verified) snapshot file by kind: FAISS index, .npy, or JSON."""
    if path.endswith(".faiss"):
        return read_index(storage, path)
    if path.endswith(".npy"):
        return read_npy(storage, path)
    if path.endswith(".json"):
        try:
            return json.loads(storage.read_bytes(path))
        except (ValueError, FileNotFoundError) as exc:
            raise SnapshotCorrupt(f"{path} is unreadable: {exc}") from exc
    return None


def to_cpu(index: Any) -> Any:
    """Return a CPU copy of a GPU index (snapshots always hold CPU indexes), else the index."""
    if "Gpu" in type(index).__name__ and hasattr(faiss, "index_gpu_to_cpu"):
        return faiss.index_gpu_to_cpu(index)
    return index
