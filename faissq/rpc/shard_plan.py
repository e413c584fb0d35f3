"""The pure side of a sharded search: the shards' requests, their grouping by Redis node, and
the merge of their replies (shared by the threaded and the asyncio sharded clients)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq import shards
from faissq.config import Settings
from faissq.errors import (
    FaissqError,
    InvalidParameter,
    RemoteSearchError,
    RpcError,
    ShardUnavailable,
    UnknownIndex,
)
from faissq.index.results import merge_topk
from faissq.rpc import query_client as qc
from faissq.rpc.search_client import Prepared, RequestBuilder, SearchResponse, as_queries, rpc_of

# reply codes that mean "this shard did not answer" (partial_ok may go on without it); any
# other error is the request's own fault and is raised whatever partial_ok says
UNAVAILABLE = frozenset(
    {"timeout", "no_worker", "index_not_ready", "busy", "stale", "unknown_index", "unreachable"}
)


@dataclass(frozen=True)
class ShardedSearchResponse:
    """Merged top-k (nq, k; -1 pads), each answering shard's version and worker, and which
    shards are missing (only with partial_ok: then `partial` is True)."""

    scores: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]
    versions: dict[str, int | None]
    workers: dict[str, str]
    partial: bool = False
    missing: dict[str, str] = field(default_factory=dict)  # shard index -> error code
    timings: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class FanOut:
    """One sharded search in flight: each shard's prepared request, the page and the deadline."""

    prepared: list[Prepared]
    start: int
    k: int
    deadline: float  # time.monotonic()


def resolve_map(
    index: str, stored: shards.ShardMap | None, shard_count: int | None, metric: str | None
) -> shards.ShardMap:
    """The definition to search by: the stored one, or the given one (checked against it)."""
    if shard_count is None:
        if stored is None:
            raise UnknownIndex(f"{index!r} is not a declared sharded index")
        return stored
    given = shards.ShardMap(index, shard_count, metric or "cosine")  # type: ignore[arg-type]
    if stored is not None and stored != given:
        raise InvalidParameter(f"{index!r} is declared as {stored}, not {given}")
    return given


class ShardPlan:
    """Which shards a search asks, on which Redis, and how their answers merge."""

    def __init__(
        self, settings: Settings | str, shard_map: shards.ShardMap, partial_ok: bool
    ) -> None:
        """settings: as for SearchClient (rpc.cluster: each shard's node from its slot)."""
        _, rpc, self.socket_timeout = rpc_of(settings, shard_map.name)
        self.map = shard_map
        self.partial_ok = partial_ok
        self.builders = [RequestBuilder(name, rpc) for name in shard_map.names]
        urls = [rpc_of(settings, name)[0] for name in shard_map.names]
        cluster = not isinstance(settings, str) and settings.rpc.cluster
        # one connection waits on several reply keys only where they may share a BRPOP: a
        # cluster refuses keys of several slots in one command (CROSSSLOT), so there each
        # shard gets a connection of its own, all written before any is read
        self.groups: list[tuple[str, list[int]]] = (
            [(u, [i]) for i, u in enumerate(urls)] if cluster
            else [(u, [i for i, v in enumerate(urls) if v == u]) for u in dict.fromkeys(urls)]
        )  # fmt: skip
        self.urls = list(dict.fromkeys(urls))

    def prepare(
        self,
        queries: npt.ArrayLike,
        k: int,
        offset: int | None,
        min_seq: Mapping[str, int] | None,
        timeout: float | None,
        options: dict[str, Any],
    ) -> FanOut:
        """Check the arguments and encode every shard's request for the top offset + k."""
        q = as_queries(queries)
        start = int(qc.scalar(offset) or 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or start < 0:
            raise InvalidParameter(f"k must be >= 1 and offset >= 0, got k={k}, offset={offset}")
        seqs = dict(min_seq or {})
        unknown = set(seqs) - set(self.map.names)
        if unknown:
            raise InvalidParameter(f"min_seq names indexes that are not shards: {sorted(unknown)}")
        timeout_s = self.builders[0].timeout_of(timeout)
        prepared = []
        for b in self.builders:
            own = {**options, "min_seq": qc.scalar(seqs.get(b.index))}  # each shard's own log
            prepared.append(b.prepare(q, start + k, timeout_s, own))
        return FanOut(prepared, start, k, time.monotonic() + timeout_s)

    def commands(self, fan: FanOut, members: list[int]) -> list[tuple[Any, ...]]:
        """One connection's write: the members' submit scripts, then as many BRPOPs on all
        their reply keys; each pops whichever reply came next, so the wait is the slowest
        shard's, not their sum."""
        prepared = [fan.prepared[i] for i in members]
        wait = ("BRPOP", *[p.reply for p in prepared], prepared[0].block_s)
        return [p.commands[0] for p in prepared] + [wait] * len(prepared)

    @staticmethod
    def unreachable(exc: BaseException) -> FaissqError:
        """The answer of a shard whose Redis (node) could not be written or read."""
        return RemoteSearchError(f"Redis unreachable: {exc}", "unreachable")

    def merge(
        self, fan: FanOut, answers: list[Any], partial_ok: bool | None
    ) -> ShardedSearchResponse:
        """Decode each shard's answer, set the missing ones aside, merge the rest by score."""
        parts: list[SearchResponse] = []
        missing: dict[str, str] = {}
        for builder, prep, got in zip(self.builders, fan.prepared, answers, strict=True):
            try:
                if isinstance(got, FaissqError):
                    raise got
                parts.append(builder.response(got, prep))
            except FaissqError as exc:  # a typed remote error, or the shard's timeout
                code = getattr(exc, "remote_code", exc.code)
                if code not in UNAVAILABLE:
                    raise
                missing[builder.index] = code
        allowed = self.partial_ok if partial_ok is None else partial_ok
        if missing and (not allowed or not parts):
            raise ShardUnavailable(
                f"{len(missing)} of {len(self.builders)} shards of {self.map.name!r} did not "
                f"answer: {missing}",
                missing,
            )
        scores, ids = merge_topk([(p.scores, p.ids) for p in parts], fan.start + fan.k,
                                 self.map.higher_is_better)  # fmt: skip
        answered = [b.index for b in self.builders if b.index not in missing]
        return ShardedSearchResponse(
            np.ascontiguousarray(scores[:, fan.start :]),
            np.ascontiguousarray(ids[:, fan.start :]),
            {n: p.version for n, p in zip(answered, parts, strict=True)},
            {n: p.worker for n, p in zip(answered, parts, strict=True)},
            partial=bool(missing),
            missing=missing,
            timings={n: p.timings for n, p in zip(answered, parts, strict=True)},
        )


def arrived(got: Any, slot: dict[bytes, int]) -> int:
    """Which member a BRPOP answer `[reply key, bytes]` belongs to; RpcError when it is none."""
    if not (isinstance(got, list | tuple) and len(got) == 2 and got[0] in slot):
        raise RpcError(f"Redis answered out of step: {type(got).__name__}")
    return slot[got[0]]
