"""Sharded indexes: shard names, the id-to-shard hash and the definition record (docs/tasks.md).

A sharded index ``<name>`` of ``S`` shards is ``S`` ordinary faissq indexes named
``<name>.s<s>of<S>``. An id goes to shard ``splitmix64(id) % S``. The definition lives in Redis
under ``keys.shard_map(name)``; the functions here take any redis-py client and import none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from faissq import keys
from faissq.errors import IndexExists, InvalidIds, InvalidParameter

MAX_SHARDS = 1024  # a search sends one request per shard: beyond this the fan-out dominates
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # storage/durable.py's index names
_SHARD = re.compile(r"^(?P<name>.+)\.s(?P<s>\d+)of(?P<n>\d+)$")

# splitmix64's constants (Steele, Lea, Flood 2014; Vigna's reference C): all arithmetic mod 2^64
GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(ids: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    """splitmix64 of each int64 id read as an unsigned 64-bit integer (wrapping arithmetic)."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64) + GAMMA
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)


def shard_of(ids: npt.ArrayLike, shards: int) -> npt.NDArray[np.int64]:
    """The shard of each id: ``splitmix64(id) % shards`` (ids are int64 >= 0)."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise InvalidIds(f"ids must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    if arr.size and int(arr.min()) < 0:
        raise InvalidIds("ids must be >= 0")
    return (splitmix64(arr) % np.uint64(check_shards(shards))).astype(np.int64)


def split_rows(ids: npt.ArrayLike, shards: int) -> list[npt.NDArray[np.int64]]:
    """Row numbers of the batch that go to each shard, in batch order (empty for none)."""
    which = shard_of(ids, shards)
    order = np.argsort(which, kind="stable")
    cuts = np.searchsorted(which[order], np.arange(1, shards))
    return [part.astype(np.int64) for part in np.split(order, cuts)]


def check_shards(shards: int) -> int:
    """The shard count, or InvalidParameter unless 1 <= shards <= MAX_SHARDS."""
    if isinstance(shards, bool) or not isinstance(shards, int | np.integer):
        raise InvalidParameter(f"shards must be an int, got {shards!r}")
    if not 1 <= int(shards) <= MAX_SHARDS:
        raise InvalidParameter(f"shards must be in 1..{MAX_SHARDS}, got {shards}")
    return int(shards)


def shard_name(name: str, shard: int, shards: int) -> str:
    """The ordinary index serving one shard: ``<name>.s<shard>of<shards>`` (e.g. docs.s2of4)."""
    full = f"{name}.s{shard}of{check_shards(shards)}"
    if not 0 <= shard < shards or not _NAME.match(name) or not _NAME.match(full):
        raise InvalidParameter(
            f"sharded index name {name!r} with {shards} shards gives no valid index name {full!r}"
        )
    return full


def shard_names(name: str, shards: int) -> list[str]:
    """The index names of every shard, in shard order."""
    return [shard_name(name, s, shards) for s in range(check_shards(shards))]


def parse_shard(index: str) -> tuple[str, int, int] | None:
    """(name, shard, shards) when an index name follows the shard rule, else None."""
    m = _SHARD.match(index)
    if m is None or int(m["s"]) >= int(m["n"]) or not 1 <= int(m["n"]) <= MAX_SHARDS:
        return None
    return m["name"], int(m["s"]), int(m["n"])


def shard_batch_id(batch_id: str, shard: int, shards: int) -> str:
    """A shard job's batch_id: the batch's, then ``.s<shard>of<shards>`` (idempotent per shard)."""
    return f"{batch_id}.s{shard}of{shards}"


@dataclass(frozen=True)
class ShardMap:
    """The definition of a sharded index: its name, shard count (fixed) and metric."""

    name: str
    shards: int
    metric: Literal["cosine", "l2"] = "cosine"

    def __post_init__(self) -> None:
        """Refuse a map whose shard names would be invalid index names."""
        shard_names(self.name, self.shards)
        if self.metric not in ("cosine", "l2"):
            raise InvalidParameter(f"metric must be cosine or l2, got {self.metric!r}")

    @property
    def names(self) -> list[str]:
        """The index names of the shards, in shard order."""
        return shard_names(self.name, self.shards)

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger score is a nearer neighbour (cosine) or a smaller one (l2)."""
        return self.metric == "cosine"

    def to_json(self) -> str:
        """The record stored under keys.shard_map(name)."""
        return json.dumps({"name": self.name, "shards": self.shards, "metric": self.metric})

    @classmethod
    def from_json(cls, raw: str | bytes) -> ShardMap:
        """Read a stored record; InvalidParameter when it is not one."""
        try:
            doc: Any = json.loads(raw)
            return cls(str(doc["name"]), int(doc["shards"]), doc.get("metric", "cosine"))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidParameter(f"unreadable shard map {raw!r}: {exc}") from exc


def declare(client: Any, shard_map: ShardMap) -> ShardMap:
    """Record a sharded index's definition (SET NX); an equal one is fine, another IndexExists.

    The shard count is fixed: resharding is a rebuild under a new name (docs/tasks.md).
    """
    key = keys.shard_map(shard_map.name)
    if client.set(key, shard_map.to_json(), nx=True):
        return shard_map
    stored = lookup(client, shard_map.name)
    if stored != shard_map:
        raise IndexExists(f"{shard_map.name!r} is declared as {stored}, not {shard_map}")
    return stored


def lookup(client: Any, name: str) -> ShardMap | None:
    """The stored definition of a sharded index, or None when the name is not sharded."""
    raw = client.get(keys.shard_map(name))
    return None if raw is None else ShardMap.from_json(raw)
