"""Versioned, checksummed snapshots of one index, published by flipping an atomic CURRENT pointer.

Layout under ``<root>/<index>/``::

    CURRENT                         {"version": "v00000007"}; replaced atomically, written last
    snapshots/v00000007/            one immutable version folder
        index.faiss                 the primary index (CPU), streamed through PyCallbackIOWriter
        primary_ids.npy ...         raw vectors, ids, delta, tombstones (memory-mappable .npy)
        tuning.json                 the tuning profile (JSON null when none)
        manifest.json               written after every other file: a folder without it is debris

A reader only follows CURRENT and never writes, so a crash at any point of `save` leaves the
previous version loadable, and a read-only mount loads fine.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import faiss
import numpy as np
import numpy.typing as npt

from faissq.errors import ManifestMismatch, SnapshotCorrupt, StorageUnavailable, WriterConflict
from faissq.storage import files
from faissq.storage.fs import Storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the folder layout or manifest fields change incompatibly
READABLE_FORMATS = (1, 2)  # 1: files recorded with sha256; 2: with BLAKE3
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
TUNING_FILE = "tuning.json"
ARRAYS = ("primary_ids", "primary_vectors", "delta_ids", "delta_vectors", "tombstones")
_VERSION = re.compile(r"^v(\d{8})$")


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


@dataclass
class Snapshot:
    """A loaded, verified snapshot: the export's fields plus where they came from."""

    version: str
    seq: int
    manifest: dict[str, Any]
    dim: int
    metric: str
    plan: dict[str, Any]
    index: Any
    primary_ids: npt.NDArray[np.int64]
    primary_vectors: npt.NDArray[np.float32]
    delta_ids: npt.NDArray[np.int64]
    delta_vectors: npt.NDArray[np.float32]
    tombstones: npt.NDArray[np.int64]
    tuning: dict[str, Any] | None
    fallbacks: list[str] = field(default_factory=list)  # "version: reason" of skipped versions

    def export_fields(self) -> dict[str, Any]:
        """Return the keyword arguments of an EngineExport holding this snapshot."""
        names = ("dim", "metric", "plan", "index", *ARRAYS, "tuning")
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class SnapshotInfo:
    """One version as an operator sees it."""

    version: str
    seq: int
    created_at: str
    bytes: int
    ntotal: int
    current: bool


def version_name(number: int) -> str:
    """Folder name of version `number` (zero-padded so names sort by number)."""
    return f"v{number:08d}"


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class SnapshotStore:
    """Save, list, verify, load and restore the snapshots of one index."""

    def __init__(self, storage: Storage, index: str, *, retention: int = 3) -> None:
        """Snapshots of `index` under `storage`, keeping the newest `retention` versions."""
        self.storage = storage
        self.index = index
        self.retention = max(1, retention)
        self.folder = storage.path(index, "snapshots")
        self.current_path = storage.path(index, CURRENT)

    # -- listing -----------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Return every version folder name (complete or not), oldest first."""
        return [n for n in self.storage.listdir(self.folder) if _VERSION.match(n)]

    def current_version(self) -> str | None:
        """Return the version CURRENT points to, None when there is none (or it is unreadable)."""
        try:
            raw = json.loads(self.storage.read_bytes(self.current_path))
            version = str(raw["version"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.error(
                "%s is unreadable (%s); falling back to the newest good version",
                self.current_path,
                exc,
            )
            return None
        return version if _VERSION.match(version) else None

    def read_manifest(self, version: str) -> dict[str, Any]:
        """Read a version's manifest and check its own digest; SnapshotCorrupt when damaged."""
        path = f"{self.folder}/{version}/{MANIFEST}"
        try:
            manifest = json.loads(self.storage.read_bytes(path))
        except FileNotFoundError as exc:
            raise SnapshotCorrupt(f"{path} is missing (incomplete snapshot)") from exc
        except ValueError as exc:
            raise SnapshotCorrupt(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("manifest_sha256") != manifest_digest(
            manifest
        ):
            raise SnapshotCorrupt(f"{path} fails its checksum")
        return manifest

    def ls(self) -> list[SnapshotInfo]:
        """List complete versions, oldest first (damaged manifests are skipped, not raised)."""
        current = self.current_version()
        out = []
        for version in self.versions():
            try:
                m = self.read_manifest(version)
            except SnapshotCorrupt:
                continue
            size = sum(int(f["bytes"]) for f in m["files"].values())
            out.append(
                SnapshotInfo(
                    version,
                    int(m["seq"]),
                    m["created_at"],
                    size,
                    int(m["ntotal"]),
                    version == current,
                )
            )
        return out

    # -- saving (writers only) -------------------------------------------------------------

    def save(self, export: ExportLike, seq: int) -> SnapshotInfo:
        """Write `export` (covering log entries up to `seq`) as a new version, then flip CURRENT."""
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

    # -- verifying and loading (never writes) -------------------------------------------------

    def verify(self, version: str) -> dict[str, Any]:
        """Check every file of a version against its manifest; return the manifest."""
        manifest = self._readable_manifest(version)
        files.verify_files(self.storage, f"{self.folder}/{version}", manifest["files"])
        return manifest

    def _readable_manifest(self, version: str) -> dict[str, Any]:
        manifest = self.read_manifest(version)
        if manifest.get("format") not in READABLE_FORMATS:
            raise ManifestMismatch(
                f"snapshot {version} has format {manifest.get('format')}, "
                f"this faissq reads formats {READABLE_FORMATS}"
            )
        return manifest

    def load_version(
        self, version: str, *, dim: int | None = None, metric: str | None = None
    ) -> Snapshot:
        """Verify then load one version; ManifestMismatch when it disagrees with dim/metric."""
        manifest = self._readable_manifest(version)
        check_manifest(manifest, dim=dim, metric=metric)  # the manifest's own digest matched
        folder = f"{self.folder}/{version}"
        # each file is parsed as soon as its digest matches; the snapshot is used only when all do
        opened = files.verify_files(self.storage, folder, manifest["files"], files.open_file)
        missing = [n for n in (*(f"{a}.npy" for a in ARRAYS), TUNING_FILE) if n not in opened]
        if missing:
            raise SnapshotCorrupt(f"snapshot {version} has no {missing} in its manifest")
        snap = Snapshot(
            version=version,
            seq=int(manifest["seq"]),
            manifest=manifest,
            dim=int(manifest["dim"]),
            metric=str(manifest["metric"]),
            plan=dict(manifest["plan"]),
            index=opened.get(INDEX_FILE),
            tuning=opened[TUNING_FILE],
            **{name: opened[f"{name}.npy"] for name in ARRAYS},
        )
        check_consistent(snap)
        return snap

    def load(self, *, dim: int | None = None, metric: str | None = None) -> Snapshot | None:
        """Load CURRENT, falling back to older good versions (logged); None when none exists."""
        current = self.current_version()
        if current is None and not self.storage.exists(self.current_path):
            return None  # never published: an empty index, not a failure
        # older folders without a manifest are debris of crashed saves, not fallbacks
        older = [v for v in self.versions() if current is None or v < current]
        candidates = ([current] if current else []) + [
            v for v in reversed(older) if self._is_complete(v)
        ]
        fallbacks: list[str] = []
        for version in candidates:
            try:
                snap = self.load_version(version, dim=dim, metric=metric)
            except (SnapshotCorrupt, StorageUnavailable) as exc:
                if isinstance(exc, StorageUnavailable) and not fallbacks:
                    raise  # storage down, not a damaged snapshot: let the caller retry
                log.error(
                    "snapshot %s of %r unusable, trying the previous one: %s",
                    version,
                    self.index,
                    exc,
                )
                fallbacks.append(f"{version}: {exc}")
                continue
            snap.fallbacks = fallbacks
            return snap
        raise SnapshotCorrupt(f"no loadable snapshot of {self.index!r}: " + "; ".join(fallbacks))


def check_manifest(manifest: Mapping[str, Any], *, dim: int | None, metric: str | None) -> None:
    """Refuse a snapshot whose dim or metric differs from what the settings expect."""
    if dim is not None and int(manifest["dim"]) != dim:
        raise ManifestMismatch(
            f"snapshot {manifest['version']} has dim {manifest['dim']}, settings expect {dim}"
        )
    if metric is not None and manifest["metric"] != metric:
        raise ManifestMismatch(
            f"snapshot {manifest['version']} has metric {manifest['metric']!r}, "
            f"settings expect {metric!r}"
        )


def check_consistent(snap: Snapshot) -> None:
    """Cross-check loaded files against the manifest (shapes, counts, dimension)."""
    m = snap.manifest
    problems = []
    if snap.index is not None and (snap.index.d != snap.dim or snap.index.ntotal != m["ntotal"]):
        problems.append(f"index d={snap.index.d} ntotal={snap.index.ntotal}")
    for ids, vecs, count in (
        (snap.primary_ids, snap.primary_vectors, m["primary_count"]),
        (snap.delta_ids, snap.delta_vectors, m["delta_count"]),
    ):
        if len(ids) != count or vecs.shape != (count, snap.dim):
            problems.append(f"arrays {ids.shape} / {vecs.shape} vs count {count}")
    if len(snap.tombstones) != m["tombstone_count"]:
        problems.append(f"{len(snap.tombstones)} tombstones vs {m['tombstone_count']}")
    if problems:
        raise SnapshotCorrupt(f"snapshot {snap.version} disagrees with its manifest: {problems}")
