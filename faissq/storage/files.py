"""Streaming, hashed writers and readers for the file kinds of a snapshot (.npy, FAISS index).

Everything streams in bounded chunks: a snapshot of a large index never becomes one bytes object,
so its extra memory is one `CHUNK_BYTES` buffer, whatever the index size. Files are hashed with
BLAKE3 inline, as they stream (docs/benchmarks.md, Storage); sha256 records of format-1 snapshots
still verify.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import blake3
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
DIGEST = "blake3"  # the algorithm new manifests record


class Hasher(Protocol):
    """The part of hashlib's interface (shared by blake3) used here."""

    def update(self, data: Any, /) -> Any: ...

    def hexdigest(self) -> str: ...


ALGORITHMS: dict[str, Callable[[], Hasher]] = {
    "blake3": blake3.blake3,
    "sha256": hashlib.sha256,  # format-1 snapshots
}


@dataclass(frozen=True)
class FileDigest:
    """What the manifest records about one file: {algorithm: hex digest, "bytes": size}."""

    hexdigest: str
    bytes: int
    algorithm: str = DIGEST

    def as_json(self) -> dict[str, Any]:
        """Return the manifest form of this record."""
        return {self.algorithm: self.hexdigest, "bytes": self.bytes}


def recorded_algorithm(record: Mapping[str, Any]) -> str:
    """The algorithm a manifest record names (SnapshotCorrupt when it names none we know)."""
    for name in ALGORITHMS:
        if isinstance(record.get(name), str):
            return name
    raise SnapshotCorrupt(f"manifest record {dict(record)} names no known digest")


class HashingWriter:
    """A sink that hashes and counts every byte on its way to the file."""

    def __init__(self, f: Writable) -> None:
        """Wrap the open file `f`; call `result()` when done."""
        self.f = f
        self.digest = ALGORITHMS[DIGEST]()
        self.nbytes = 0

    def write(self, data: Any) -> int:
        """Hash a buffer, write it, return its length (PyCallbackIOWriter contract)."""
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
    digest = ALGORITHMS[DIGEST]()
    digest.update(data)
    with storage.open_new(path) as f:
        f.write(data)
    return FileDigest(digest.hexdigest(), len(data))


def bytes_match(data: bytes, record: Mapping[str, Any]) -> bool:
    """Whether bytes read whole agree with their manifest record (they were read after the
    file's own check, so a change in between is caught before they are used)."""
    algorithm = recorded_algorithm(record)
    digest = ALGORITHMS[algorithm]()
    digest.update(data)
    return len(data) == int(record["bytes"]) and digest.hexdigest() == record[algorithm]


def hash_file(storage: Storage, path: str, algorithm: str = DIGEST) -> FileDigest:
    """Stream a file through a digest, reading into one reused buffer (no fresh pages per chunk)."""
    digest = ALGORITHMS[algorithm]()
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
    return FileDigest(digest.hexdigest(), total, algorithm)


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
        path, want = f"{folder}/{name}", expected[name]
        algorithm = recorded_algorithm(want)
        got = hash_file(storage, path, algorithm)
        if got.hexdigest != want[algorithm] or got.bytes != int(want["bytes"]):
            raise SnapshotCorrupt(f"{path} fails its checksum")
        parsed = None if parse is None else parse(storage, path)
        if isinstance(parsed, np.memmap):
            _MAPPED[os.path.abspath(str(parsed.filename))] = (storage, path, got)
        return parsed

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


# files verified at load and then used memory-mapped: local path -> (storage, path, digest)
_MAPPED: dict[str, tuple[Storage, str, FileDigest]] = {}


def mapped_file(arr: Any) -> str | None:
    """The file a memory-mapped array (or a view of one) reads from, None for memory."""
    while isinstance(arr, np.ndarray):
        if isinstance(arr, np.memmap) and arr.filename is not None:
            return os.path.abspath(str(arr.filename))
        arr = arr.base
    return None


def reverify_mapped(arrays: Any) -> int:
    """Hash again every verified file that `arrays` read through a memory map; return how many.

    A mapped page is read from storage again whenever the kernel likes, so bytes verified at
    load are not the bytes a rebuild or a snapshot reads later: SnapshotCorrupt when they
    changed, before anything is built or written from them.
    """
    seen: set[str] = set()
    for arr in arrays:
        name = mapped_file(arr)
        if name is None or name in seen or name not in _MAPPED:
            continue
        seen.add(name)
        storage, path, want = _MAPPED[name]
        got = hash_file(storage, path, want.algorithm)
        if got.hexdigest != want.hexdigest or got.bytes != want.bytes:
            raise SnapshotCorrupt(
                f"{path} changed on storage after it was verified and memory-mapped: its vectors "
                "cannot be trusted (reload the index from a good snapshot version)"
            )
    return len(seen)


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
    """Open one (verified) snapshot file by kind: FAISS index, .npy, JSON, or msgpack (bytes)."""
    if path.endswith(".faiss"):
        return read_index(storage, path)
    if path.endswith(".npy"):
        return read_npy(storage, path)
    if path.endswith(".json"):
        try:
            return json.loads(storage.read_bytes(path))
        except (ValueError, FileNotFoundError) as exc:
            raise SnapshotCorrupt(f"{path} is unreadable: {exc}") from exc
    if path.endswith(".msgpack"):
        try:
            return storage.read_bytes(path)
        except FileNotFoundError as exc:
            raise SnapshotCorrupt(f"{path} is missing") from exc
    return None


def to_cpu(index: Any) -> Any:
    """Return a CPU copy of a GPU index (snapshots always hold CPU indexes), else the index."""
    if "Gpu" in type(index).__name__ and hasattr(faiss, "index_gpu_to_cpu"):
        return faiss.index_gpu_to_cpu(index)
    return index
