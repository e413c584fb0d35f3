"""Micro-batching: requests with the same k, parameters and filter share one engine.search call."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq.errors import DimensionMismatch, FaissqError
from faissq.index.engine import Engine
from faissq.index.filters import Filter, compile_filter
from faissq.rpc.protocol import Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """The answer to one request: results or an error, plus how its search call went."""

    request: Request
    scores: npt.NDArray[np.float32] | None = None
    ids: npt.NDArray[np.int64] | None = None
    version: int = 0
    error: tuple[str, str] | None = None  # (stable code, message)
    search_s: float = 0.0
    batch: int = 1
    target_met: bool | None = None  # the engine's SearchResult.target_met
    extra: dict[str, Any] | None = None  # range and fetch reply fields (rpc/queries.py)


INTERNAL = "internal"  # wire code of an unexpected engine failure (a bug, not bad input)


def search_all(
    engine: Engine,
    requests: Sequence[Request],
    calls: list[int] | None = None,
    max_candidates: int | None = None,
    default_k_factor: int = 1,
) -> list[Outcome]:
    """Answer every request, batching compatible ones; one bad request never fails another.

    calls, when given, receives the number of requests of each engine.search call made;
    max_candidates, when given, bounds rows x k x k_factor of one batched call (k_factor: the
    group's, else default_k_factor), as the protocol bounds it for one request. A filter is
    checked against the index's fields here, once per request: a bad one fails its request.
    """
    calls = calls if calls is not None else []
    if len(requests) == 1 and requests[0].queries.shape[1] == engine.dim:
        return [_one(engine, requests[0], calls)]  # the idle-server case: nothing to group
    groups: dict[tuple[Any, ...], list[Request]] = {}
    filters: dict[tuple[Any, ...], Filter] = {}
    out: list[Outcome] = []
    for req in requests:
        if req.queries.shape[1] != engine.dim:
            err = DimensionMismatch(
                f"queries have dimension {req.queries.shape[1]}, the index has {engine.dim}"
            )
            out.append(Outcome(req, error=(err.code, str(err))))
        elif req.allow_ids is not None or req.deny_ids is not None:
            out.append(_one(engine, req, calls))  # id lists are per request: never merged
        elif req.filter is None:
            groups.setdefault(req.params(), []).append(req)
        else:
            try:
                flt = compile_filter(req.filter, engine.schema)
            except FaissqError as exc:
                out.append(Outcome(req, error=(exc.code, str(exc))))
                continue
            key = (*req.params(), flt.key)  # equal filters (after checking) share a call
            filters[key] = flt
            groups.setdefault(key, []).append(req)
    for key, group in groups.items():
        shared = filters.get(key)
        for part in _split(group, max_candidates, default_k_factor):
            out.extend(
                _group(engine, part, calls, shared)
                if len(part) > 1
                else [_one(engine, part[0], calls, shared)]
            )
    return out


def _split(group: list[Request], max_candidates: int | None, k_factor: int) -> list[list[Request]]:
    """The group in runs whose rows x k x k_factor stay within max_candidates (None: whole)."""
    if max_candidates is None or len(group) == 1:
        return [group]
    first = group[0]
    per_row = (first.k + first.offset) * (first.k_factor or k_factor)
    parts: list[list[Request]] = [[]]
    rows = 0
    for req in group:
        n = req.queries.shape[0]
        if parts[-1] and (rows + n) * per_row > max_candidates:
            parts.append([])
            rows = 0
        parts[-1].append(req)
        rows += n
    return parts


def _group(
    engine: Engine, group: list[Request], calls: list[int], flt: Filter | None
) -> list[Outcome]:
    """One stacked search for the group (which shares `flt`), split back by rows; per-request
    on any error."""
    first = group[0]
    t0 = time.perf_counter()
    calls.append(len(group))
    try:
        res = engine.search(np.concatenate([r.queries for r in group]), first.k + first.offset,
                            filter=flt, **_params(first))  # fmt: skip
    except Exception:  # one request (NaN after all, a GPU fault) must not fail the others
        return [_one(engine, r, calls, flt) for r in group]
    took = time.perf_counter() - t0
    out: list[Outcome] = []
    row = 0
    for req in group:
        n = req.queries.shape[0]
        out.append(
            Outcome(
                req,
                scores=res.scores[row : row + n, first.offset :],
                ids=res.ids[row : row + n, first.offset :],
                version=res.version,
                search_s=took,
                batch=len(group),
                target_met=res.target_met,
            )
        )
        row += n
    return out


def _one(engine: Engine, req: Request, calls: list[int], flt: Filter | None = None) -> Outcome:
    """Search one request alone (flt: its filter, already checked); every failure becomes an
    error outcome."""
    t0 = time.perf_counter()
    calls.append(1)
    try:
        res = engine.search(req.queries, req.k + req.offset, allow_ids=req.allow_ids,
                            deny_ids=req.deny_ids, filter=req.filter if flt is None else flt,
                            **_params(req))  # fmt: skip
    except FaissqError as exc:
        return Outcome(req, error=(exc.code, str(exc)))
    except Exception as exc:
        log.exception("search failed unexpectedly")
        return Outcome(req, error=(INTERNAL, f"{type(exc).__name__}: {exc}"))
    return Outcome(
        req,
        scores=res.scores[:, req.offset :] if req.offset else res.scores,
        ids=res.ids[:, req.offset :] if req.offset else res.ids,
        version=res.version,
        search_s=time.perf_counter() - t0,
        target_met=res.target_met,
    )


def _params(req: Request) -> dict[str, Any]:
    """The engine keyword arguments of a request."""
    return {
        "nprobe": req.nprobe,
        "ef_search": req.ef_search,
        "k_factor": req.k_factor,
        "target_recall": req.target_recall,
    }
