"""The catalog of indexes created at runtime: one JSON record per index on shared storage.

A record (`_catalog/<name>.json` under the storage root; index names cannot start with `_`)
holds the definition (dim, metric, family, attributes) and the state: `created`, or `dropped`
with the time its data may be removed. Storage is the one source of truth, so a restarting
dynamic worker serves every created index and keeps answering for dropped ones until purged.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from faissq.errors import InvalidParameter, UnknownFamily
from faissq.index.attributes import AttrType, check_schema
from faissq.storage.durable import check_index_name
from faissq.storage.fs import Storage

FOLDER = "_catalog"  # not a valid index name, so never an index's own folder
MAX_DIM = 65536  # FAISS takes more, but a larger vector is a producer's mistake
METRICS = ("cosine", "l2")

State = Literal["created", "dropped"]


@dataclass(frozen=True)
class IndexDef:
    """One created index: its definition and where it stands (created or dropped)."""

    name: str
    dim: int
    metric: str
    family: str
    attributes: dict[str, AttrType] = field(default_factory=dict)  # field -> int64 | keyword
    state: State = "created"
    created_at: float = 0.0
    dropped_at: float | None = None
    purge_after: float | None = None

    def definition(self) -> dict[str, Any]:
        """What a create names: equal definitions make a repeated create a no-op."""
        return {"name": self.name, "dim": self.dim, "metric": self.metric,
                "family": self.family, "attributes": self.attributes}  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """The whole record as a plain map (job results carry it)."""
        return asdict(self)


def check_definition(name: Any, dim: Any, metric: Any, family: Any, attributes: Any) -> IndexDef:
    """Validate a create's arguments; InvalidParameter, UnknownFamily or InvalidAttributes (the
    attribute fields: {name: "int64" | "keyword"}, as index.attributes) names the bad one."""
    if not isinstance(name, str):
        raise InvalidParameter(f"name must be a string, got {type(name).__name__}")
    check_index_name(name)
    if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= MAX_DIM:
        raise InvalidParameter(f"dim must be an integer in [1, {MAX_DIM}], got {dim!r}")
    if metric not in METRICS:
        raise InvalidParameter(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    family = "auto" if family is None else family
    if not isinstance(family, str) or not family:
        raise UnknownFamily(f"family must be a non-empty string, got {family!r}")
    check_family(family, dim, metric)
    attrs = check_schema(attributes)
    return IndexDef(name=name, dim=dim, metric=metric, family=family, attributes=attrs)


def check_family(family: str, dim: int, metric: str) -> None:
    """Refuse a family that is neither auto, a known family nor a factory string FAISS takes."""
    from faissq.index.policy import FAMILIES

    if family == "auto" or family in FAMILIES:
        return
    import faiss

    kind = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    try:
        faiss.index_factory(dim, family, kind)
    except RuntimeError:
        raise UnknownFamily(
            f"family {family!r} is neither auto, one of {', '.join(FAMILIES)}, nor a FAISS "
            f"factory string for dimension {dim}"
        ) from None


class Catalog:
    """Read and write the records of created indexes under one storage root."""

    def __init__(self, storage: Storage) -> None:
        """storage: the shared storage the indexes' logs and snapshots live on."""
        self.storage = storage

    def _path(self, name: str) -> str:
        return self.storage.path(FOLDER, f"{check_index_name(name)}.json")

    def get(self, name: str) -> IndexDef | None:
        """The record of `name`, or None when it was never created (or was purged)."""
        try:
            raw = self.storage.read_bytes(self._path(name))
        except FileNotFoundError:
            return None
        rec = json.loads(raw)
        if isinstance(rec.get("attributes"), list):  # written when fields were free-form, unused
            rec["attributes"] = {}
        return IndexDef(**rec)

    def all(self) -> list[IndexDef]:
        """Every record, created and dropped, by name."""
        out = []
        for entry in self.storage.listdir(self.storage.path(FOLDER)):
            if entry.endswith(".json"):
                rec = self.get(entry[: -len(".json")])
                if rec is not None:
                    out.append(rec)
        return out

    def put(self, rec: IndexDef) -> None:
        """Write a record atomically (a reader sees the old or the new one, never half)."""
        self.storage.makedirs(self.storage.path(FOLDER))
        data = json.dumps(rec.describe(), sort_keys=True).encode()
        self.storage.write_atomic(self._path(rec.name), data)

    def has_data(self, name: str) -> bool:
        """Whether storage already holds a log or snapshots under this name."""
        return bool(self.storage.listdir(self.storage.path(check_index_name(name))))

    def mark_dropped(self, rec: IndexDef, grace_s: float) -> IndexDef:
        """Record the drop; the data may be removed `grace_s` seconds from now."""
        now = time.time()
        dropped = replace(rec, state="dropped", dropped_at=now, purge_after=now + grace_s)
        self.put(dropped)
        return dropped

    def purge(self, name: str) -> None:
        """Remove the index's data, then its record (a crash in between purges again later)."""
        self.storage.remove_tree(self.storage.path(check_index_name(name)))
        self.storage.remove(self._path(name))
