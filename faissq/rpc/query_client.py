"""Client side of range search and fetch by id: their options and typed responses.

Shared by SearchClient and AsyncSearchClient, which send these requests alone (never merged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq.errors import RemoteSearchError
from faissq.rpc.replies import Reply


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


def scalar(value: Any) -> Any:
    """A numpy scalar as its Python value (msgpack packs only Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value


def range_options(radius: Any, nprobe: Any, min_seq: Any) -> dict[str, Any]:
    """The fields of a range search request besides its queries."""
    return {"radius": scalar(radius), "nprobe": scalar(nprobe), "min_seq": scalar(min_seq)}


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
    return FetchResponse(reply.ids, reply.vectors, reply.missing, reply.version, reply.worker)
