"""Requests other than a plain top-k search (docs/protocol.md): range search and fetch by id.

A request with `radius` (not nil) is a range search; one with `op: "fetch"` asks for vectors by
id. Each kind names its own required and allowed fields, checked here before anything is built.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from faissq.errors import InvalidIds, InvalidParameter, PayloadTooLarge
from faissq.rpc import fields

if TYPE_CHECKING:
    from faissq.rpc.protocol import Limits

RANGE_REQUIRED = frozenset({"v", "id", "reply", "deadline", "radius", "queries"})
RANGE_ALLOWED = RANGE_REQUIRED | {"nprobe", "min_seq", "sent", "op", "filter"}
FETCH_REQUIRED = frozenset({"v", "id", "reply", "deadline", "op", "ids"})
FETCH_ALLOWED = FETCH_REQUIRED | {"min_seq", "sent"}
NO_QUERIES = np.empty((0, 0), dtype=np.float32)


def check_kind(msg: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The Request fields (all but id and reply) of a range search or a fetch."""
    op = msg.get("op")
    present = {name for name, value in msg.items() if value is not None}
    if op == "fetch":
        if not FETCH_REQUIRED <= present <= FETCH_ALLOWED:
            fail_fields(present, FETCH_REQUIRED, FETCH_ALLOWED)
        return {"kind": "fetch", "k": 0, "queries": NO_QUERIES, **_common(msg),
                "fetch_ids": _fetch_ids(msg["ids"], limits.max_fetch_ids)}  # fmt: skip
    if op not in (None, "search"):
        raise InvalidParameter(f"op must be 'search' or 'fetch', got {op!r:.40}")
    if "k" in present:
        raise InvalidParameter("a request carries k (top-k) or radius (range search), not both")
    if not RANGE_REQUIRED <= present <= RANGE_ALLOWED:
        fail_fields(present, RANGE_REQUIRED, RANGE_ALLOWED)
    queries = fields.queries(msg["queries"], limits.max_bytes)
    if queries.shape[0] > limits.max_candidates:
        raise PayloadTooLarge(
            f"range search of {queries.shape[0]} rows, cap {limits.max_candidates}"
        )
    return {
        "kind": "range",
        "k": 0,
        "queries": queries,
        "radius": fields.number("radius", msg["radius"]),
        "nprobe": fields.capped("nprobe", msg.get("nprobe"), limits.max_nprobe),
        "filter": fields.filter_expr(msg.get("filter"), limits.max_filter_bytes),
        **_common(msg),
    }


def _common(msg: dict[str, Any]) -> dict[str, Any]:
    """deadline, sent and min_seq, which every kind may carry."""
    sent = msg.get("sent")
    return {
        "deadline": fields.number("deadline", msg["deadline"]),
        "sent": None if sent is None else fields.number("sent", sent),
        "min_seq": fields.min_seq(msg.get("min_seq")),
    }


def _fetch_ids(value: Any, cap: int) -> Any:
    """The ids of a fetch: a 1-D <i8 frame of 1..cap ids >= 0."""
    ids = fields.id_frame("ids", value, cap)
    if ids is None or ids.size == 0:
        raise InvalidIds("fetch needs at least one id")
    return ids


def offset(value: Any, k: int, max_k: int) -> int:
    """The optional `offset` of a top-k search: offset + k <= max_k."""
    out = fields.integer("offset", value)
    if out is None:
        return 0
    if not 0 <= out <= max_k - k:
        raise InvalidParameter(f"offset must be >= 0 with offset + k <= {max_k}, got {out}")
    return out


def fail_fields(
    present: Iterable[Any], required: Collection[str], allowed: Collection[str]
) -> NoReturn:
    """InvalidParameter naming the missing required or the unknown fields of a request."""
    keys = set(present)
    missing = set(required) - keys
    if missing:
        raise InvalidParameter(f"request lacks {', '.join(sorted(missing))}")
    unknown = keys - set(allowed)
    raise InvalidParameter(f"unknown request field(s): {', '.join(sorted(map(str, unknown)))}")
