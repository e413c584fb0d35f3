"""Reading snapshots: list versions, verify their files, load the newest good one (never writes).

A reader follows CURRENT and falls back to older complete versions when one is damaged. When
CURRENT itself is missing or unreadable while complete versions exist, the newest complete
version that verifies is loaded and a note says so: a lost pointer must never hide built vectors.
Only when no complete version exists at all was the index never published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq.errors import ManifestMismatch, SnapshotCorrupt, StorageUnavailable
from faissq.storage import files
from faissq.storage.fs import Storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the folder layout or manifest fields change incompatibly
READABLE_FORMATS = (1, 2)  # 1: files recorded with sha256; 2: with BLAKE3
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
TUNING_FILE = "tuning.json"
ATTRIBUTES_FILE = "attributes.msgpack"  # only when the index declares attribute fields
ARRAYS = ("primary_ids", "primary_vectors", "delta_ids", "delta_vectors", "tombstones")
_VERSION = re.compile(r"^v(\d{8})$")


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
    attributes: bytes = b""  # the attribute table (AttrTable.to_bytes); b"": none saved
    fallbacks: list[str] = field(default_factory=list)  # "version: reason" of skipped versions
    notes: list[str] = field(default_factory=list)  # why CURRENT was not followed (degraded)

    def export_fields(self) -> dict[str, Any]:
        """Return the keyword arguments of an EngineExport holding this snapshot."""
        names = ("dim", "metric", "plan", "index", *ARRAYS, "tuning", "attributes")
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


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class SnapshotReader:
    """List, verify and load the snapshots of one index; touches nothing."""

    def __init__(self, storage: Storage, index: str, *, retention: int = 3) -> None:
        """Snapshots of `index` under `storage`; `retention` matters only to the writer."""
        self.storage = storage
        self.index = index
        self.retention = max(1, retention)
        self.folder = storage.path(index, "snapshots")
        self.current_path = storage.path(index, CURRENT)

    # -- listing -----------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Return every version folder name (complete or not), oldest first."""
        return sorted(n for n in self.storage.listdir(self.folder) if _VERSION.match(n))

    def current_version(self) -> str | None:
        """Return the version CURRENT points to, None when there is none (or it is unreadable)."""
        return self._pointer()[0]

    def _pointer(self) -> tuple[str | None, str]:
        """CURRENT's version and, when it cannot be followed, why ("" when it can)."""
        try:
            raw = json.loads(self.storage.read_bytes(self.current_path))
            version = str(raw["version"])
        except FileNotFoundError:
            return None, "CURRENT missing"
        except (ValueError, KeyError, TypeError) as exc:
            return None, f"CURRENT unreadable ({exc})"
        if not _VERSION.match(version):
            return None, f"CURRENT names no version ({version[:40]!r})"
        return version, ""

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

    def _is_complete(self, version: str) -> bool:
        return self.storage.exists(f"{self.folder}/{version}/{MANIFEST}")

    # -- verifying and loading ---------------------------------------------------------------

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
        attributes = opened.get(ATTRIBUTES_FILE) or b""
        if attributes and not files.bytes_match(attributes, manifest["files"][ATTRIBUTES_FILE]):
            raise SnapshotCorrupt(f"{folder}/{ATTRIBUTES_FILE} changed after it was verified")
        snap = Snapshot(
            version=version,
            seq=int(manifest["seq"]),
            manifest=manifest,
            dim=int(manifest["dim"]),
            metric=str(manifest["metric"]),
            plan=dict(manifest["plan"]),
            index=opened.get(INDEX_FILE),
            tuning=opened[TUNING_FILE],
            attributes=attributes,
            **{name: opened[f"{name}.npy"] for name in ARRAYS},
        )
        check_consistent(snap)
        return snap

    def load(self, *, dim: int | None = None, metric: str | None = None) -> Snapshot | None:
        """Load CURRENT, falling back to older good versions (logged); None when none exists.

        Without a usable CURRENT, the newest complete version that verifies is loaded and
        `Snapshot.notes` says so; None only when neither CURRENT nor a complete version exists.
        """
        current, why = self._pointer()
        complete = [v for v in self.versions() if self._is_complete(v)]
        if not complete and why == "CURRENT missing":
            return None  # never published (a first save may have crashed): an empty index
        # versions newer than CURRENT may be a save in flight; folders without a manifest are
        # debris of crashed saves: neither is a fallback
        older = [v for v in complete if current is None or v < current]
        candidates = ([current] if current else []) + older[::-1]
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
            if why:
                note = f"{why}: loaded the newest verified version {version} (seq {snap.seq})"
                log.error("snapshots of %r: %s; run `faissq snapshot restore`", self.index, note)
                snap.notes.append(note)
            return snap
        head = f"{why}; " if why else ""
        raise SnapshotCorrupt(
            f"no loadable snapshot of {self.index!r}: {head}" + "; ".join(fallbacks)
        )


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
