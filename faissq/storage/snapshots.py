"""Versioned, checksummed snapshots of one index, published by flipping an atomic CURRENT pointer.

Layout under ``<root>/<index>/``::

    CURRENT                         {"version": "v00000007"}; replaced atomically, written last
    snapshots/v00000007/            one immutable version folder
        index.faiss                 the primary index (CPU), streamed through PyCallbackIOWriter
        primary_ids.npy ...         raw vectors, ids, delta, tombstones (memory-mappable .npy)
        tuning.json                 the tuning profile (JSON null when none)
        attributes.msgpack          the attribute table, when the index declares fields
        manifest.json               written after every other file: a folder without it is debris

A reader never writes (snapshot_load.py), so a crash at any point of `save` leaves the previous
version loadable, and a read-only mount loads fine. Versions are published in seq order: a save
covering fewer log entries than a stored version is refused, so a reduced index never replaces
a fuller one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import faiss
import numpy as np
import numpy.typing as npt

from faissq.errors import StorageUnavailable, WriterConflict
from faissq.storage import files
from faissq.storage.snapshot_load import (
    ARRAYS,
    ATTRIBUTES_FILE,
    CURRENT,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST,
    READABLE_FORMATS,
    TUNING_FILE,
    Snapshot,
    SnapshotInfo,
    SnapshotReader,
    check_consistent,
    check_manifest,
    manifest_digest,
)

__all__ = [
    "ARRAYS",
    "ATTRIBUTES_FILE",
    "CURRENT",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "MANIFEST",
    "READABLE_FORMATS",
    "TUNING_FILE",
    "ExportLike",
    "Snapshot",
    "SnapshotInfo",
    "SnapshotStore",
    "check_consistent",
    "check_manifest",
    "manifest_digest",
    "version_name",
]

log = logging.getLogger(__name__)


class ExportLike(Protocol):
    """The engine's immutable export (faissq.index.engine.EngineExport) as snapshots see it."""

    @property
    def dim(self) -> int: ...

    @property
    def metric(self) -> str: ...

    @property
    def plan(self) -> dict[str, Any]: ...

    @property
    def index(self) -> Any: ...

    @property
    def primary_ids(self) -> npt.NDArray[np.int64]: ...

    @property
    def primary_vectors(self) -> npt.NDArray[np.float32]: ...

    @property
    def delta_ids(self) -> npt.NDArray[np.int64]: ...

    @property
    def delta_vectors(self) -> npt.NDArray[np.float32]: ...

    @property
    def tombstones(self) -> npt.NDArray[np.int64]: ...

    @property
    def tuning(self) -> dict[str, Any] | None: ...

    @property
    def attributes(self) -> bytes: ...


def version_name(number: int) -> str:
    """Folder name of version `number` (zero-padded so names sort by number)."""
    return f"v{number:08d}"


class SnapshotStore(SnapshotReader):
    """Save, list, verify, load and restore the snapshots of one index."""

    # -- saving (writers only) -------------------------------------------------------------

    def save(self, export: ExportLike, seq: int) -> SnapshotInfo:
        """Write `export` (covering log entries up to `seq`) as a new version, then flip CURRENT.

        WriterConflict when a stored version covers a later seq: publishing would replace it
        with an index that lacks acknowledged mutations (a stale or reduced engine).
        """
        newest = max(self.ls(), key=lambda i: i.seq, default=None)
        if newest is not None and seq < newest.seq:
            raise WriterConflict(
                f"snapshot of {self.index!r} refused: it covers seq {seq} but {newest.version} "
                f"already covers seq {newest.seq}; the engine lacks acknowledged mutations"
            )
        self.storage.makedirs(self.folder)
        existing = self.versions()
        number = max((int(v[1:]) for v in existing), default=0) + 1
        version = version_name(number)
        folder = f"{self.folder}/{version}"
        self.storage.makedirs(folder)
        index = None if export.index is None else files.to_cpu(export.index)

        def write_arrays() -> dict[str, files.FileDigest]:
            out = {}
            for name in ARRAYS:
                path = f"{folder}/{name}.npy"
                out[f"{name}.npy"] = files.write_npy(self.storage, path, getattr(export, name))
            tuning = json.dumps(export.tuning).encode()
            out[TUNING_FILE] = files.write_bytes(self.storage, f"{folder}/{TUNING_FILE}", tuning)
            if export.attributes:
                path = f"{folder}/{ATTRIBUTES_FILE}"
                out[ATTRIBUTES_FILE] = files.write_bytes(self.storage, path, export.attributes)
            return out

        # the index and the arrays stream side by side: hashing and file writes release the GIL
        digests: dict[str, files.FileDigest] = {}
        with ThreadPoolExecutor(max_workers=1) as pool:
            arrays = pool.submit(write_arrays)
            try:
                if index is not None:
                    path = f"{folder}/{INDEX_FILE}"
                    digests[INDEX_FILE] = files.write_index(self.storage, path, index)
            finally:
                digests.update(arrays.result())
        self.storage.sync_dir(folder)
        manifest = self._manifest(export, index, seq, version, digests)
        payload = json.dumps(manifest, indent=1, sort_keys=True).encode()
        if not self.storage.write_exclusive(f"{folder}/{MANIFEST}", payload):
            raise WriterConflict(
                f"snapshot {version} of {self.index!r} was written by another writer"
            )
        self.storage.sync_dir(self.folder)
        self.storage.write_atomic(self.current_path, json.dumps({"version": version}).encode())
        log.info(
            "snapshot %s of %r saved (seq %d, %d bytes)",
            version,
            self.index,
            seq,
            manifest["bytes"],
        )
        self._retain(version)
        return SnapshotInfo(
            version, seq, manifest["created_at"], manifest["bytes"], manifest["ntotal"], True
        )

    def _manifest(
        self,
        export: ExportLike,
        index: Any,
        seq: int,
        version: str,
        digests: dict[str, files.FileDigest],
    ) -> dict[str, Any]:
        manifest: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "faiss_version": faiss.__version__,
            "index_name": self.index,
            "version": version,
            "parent": self.current_version(),
            "dim": int(export.dim),
            "metric": export.metric,
            "family": export.plan.get("family"),
            "factory": export.plan.get("factory"),
            "plan": export.plan,
            "ntotal": 0 if index is None else int(index.ntotal),
            "primary_count": len(export.primary_ids),
            "delta_count": len(export.delta_ids),
            "tombstone_count": len(export.tombstones),
            "seq": int(seq),
            "files": {name: d.as_json() for name, d in sorted(digests.items())},
            "bytes": sum(d.bytes for d in digests.values()),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        manifest["manifest_sha256"] = manifest_digest(manifest)
        return manifest

    def _retain(self, current: str) -> None:
        """Delete versions beyond the newest `retention` complete ones, and debris of crashes."""
        complete = [v for v in self.versions() if self._is_complete(v)]
        keep = set(complete[-self.retention :]) | {current}
        for version in self.versions():
            if version in keep or version > current:
                continue  # a newer folder may be a save in flight: never touch it
            folder = f"{self.folder}/{version}"
            try:
                # manifest first: a half-deleted folder must read as incomplete, not as damaged
                self.storage.remove(f"{folder}/{MANIFEST}")
                self.storage.remove_tree(folder)
            except StorageUnavailable as exc:
                log.warning("could not delete old snapshot %s: %s", folder, exc)

    def _is_complete(self, version: str) -> bool:
        return self.storage.exists(f"{self.folder}/{version}/{MANIFEST}")

    def set_current(self, version: str) -> None:
        """Point CURRENT at an existing, verified version (operator restore)."""
        self.verify(version)
        self.storage.write_atomic(self.current_path, json.dumps({"version": version}).encode())
        log.warning("CURRENT of %r set to %s by restore", self.index, version)
