"""Client side of the request options (top-k, range search, fetch by id) and typed responses.

Shared by SearchClient and AsyncSearchClient (range and fetch requests are never merged) and by
the sharded clients (top-k options).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq.errors import InvalidFilter, RemoteSearchError
from faissq.rpc.replies import Reply

MAX_NESTING = 64  # maps and lists in a filter (the worker allows 16 operator levels)


@dataclass(frozen=True)
class RangeResponse:
    """Per query row i: scores[lims[i]:lims[i+1]] and ids[...], best first (docs/protocol.md)."""

    lims: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]
    truncated: bool  # some query had more results than the worker's cap: it kept its best
    version: int | None
    worker: str
    timings: dict[str, float] = field(default_factory=dict)

    def row(self, i: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The scores and ids of query row i."""
        a, b = int(self.lims[i]), int(self.lims[i + 1])
        return self.scores[a:b], self.ids[a:b]


@dataclass(frozen=True)
class FetchResponse:
    """The stored vectors of the live ids asked for (request order) and the ids not live."""

    ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]  # row j is the vector of ids[j] (cosine: normalised)
    missing: npt.NDArray[np.int64]
    version: int | None
    worker: str
    attributes: dict[str, list[Any]] = field(default_factory=dict)  # field -> value per id


def scalar(value: Any) -> Any:
    """A numpy scalar as its Python value (msgpack packs only Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value


def search_options(
    *,
    nprobe: Any,
    ef_search: Any,
    k_factor: Any,
    target_recall: Any,
    allow_ids: Any,
    deny_ids: Any,
    offset: Any = None,
    min_seq: Any = None,
    filter: Any = None,
) -> dict[str, Any]:
    """The fields of a top-k request besides k and its queries (None: left out)."""
    return {
        "nprobe": nprobe,
        "ef_search": ef_search,
        "k_factor": k_factor,
        "target_recall": target_recall,
        "allow_ids": allow_ids,
        "deny_ids": deny_ids,
        "offset": scalar(offset),  # ranks offset .. offset + k - 1
        "min_seq": scalar(min_seq),  # wait for this update-log seq (read your writes)
        "filter": filter_value(filter),
    }


def range_options(radius: Any, nprobe: Any, min_seq: Any, filter: Any = None) -> dict[str, Any]:
    """The fields of a range search request besides its queries."""
    return {"radius": scalar(radius), "nprobe": scalar(nprobe), "min_seq": scalar(min_seq),
            "filter": filter_value(filter)}  # fmt: skip


def filter_value(expr: Any, depth: int = 0) -> Any:
    """A filter (docs/protocol.md, Filters) as plain msgpack values: numpy scalars and arrays
    as Python ones, tuples as lists. The worker checks its terms; this only makes it travel."""
    if depth > MAX_NESTING:
        raise InvalidFilter(f"a filter nests at most {MAX_NESTING} maps and lists deep")
    if isinstance(expr, dict):
        if not all(isinstance(k, str) for k in expr):
            raise InvalidFilter(f"filter map keys must be strings, got {list(expr)!r:.80}")
        return {k: filter_value(v, depth + 1) for k, v in expr.items()}
    if isinstance(expr, list | tuple | np.ndarray):
        return [filter_value(v, depth + 1) for v in expr]
    if isinstance(expr, np.generic):
        return expr.item()
    if expr is None or isinstance(expr, str | int | float):
        return expr
    raise InvalidFilter(f"a filter holds maps, lists, strings and numbers, got {type(expr)}")


def filter_key(expr: Any) -> Hashable:
    """A canonical, hashable form of a filter_value (map order ignored, types kept apart): equal
    keys mean the same filter, so searches with equal keys may share a request."""
    if isinstance(expr, dict):
        return ("map", tuple(sorted((k, filter_key(v)) for k, v in expr.items())))
    if isinstance(expr, list):
        return ("list", tuple(filter_key(v) for v in expr))
    return (type(expr).__name__, expr)


def fetch_options(ids: npt.ArrayLike, min_seq: Any) -> dict[str, Any]:
    """The fields of a fetch request."""
    return {"op": "fetch", "ids": np.asarray(ids), "min_seq": scalar(min_seq)}


def to_range(reply: Reply) -> RangeResponse:
    """The RangeResponse of a decoded reply."""
    if reply.lims is None or reply.scores is None or reply.ids is None:
        raise RemoteSearchError("reply to a range search holds no lims", "mismatch")
    return RangeResponse(reply.lims, reply.scores, reply.ids, reply.truncated, reply.version,
                         reply.worker, reply.timings)  # fmt: skip


def to_fetch(reply: Reply) -> FetchResponse:
    """The FetchResponse of a decoded reply."""
    if reply.vectors is None or reply.missing is None or reply.ids is None:
        raise RemoteSearchError("reply to a fetch holds no vectors", "mismatch")
    return FetchResponse(reply.ids, reply.vectors, reply.missing, reply.version, reply.worker,
                         reply.attributes)  # fmt: skip
