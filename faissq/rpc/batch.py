"""Micro-batching: requests with the same k, parameters and filter share one engine.search call."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq.errors import DimensionMismatch, FaissqError, PayloadTooLarge
from faissq.index import tuning
from faissq.index.engine import Engine
from faissq.index.filters import Filter, compile_filter
from faissq.rpc import fields
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
    max_candidates, when given, bounds rows x k x k_factor of one request and of one batched
    call (see _Refine for the k_factor counted). A filter is checked against the index's fields
    here, once per request: a bad one fails its request.
    """
    calls = calls if calls is not None else []
    refine = _Refine(engine.tuning_profile, default_k_factor)
    groups: dict[tuple[Any, ...], list[Request]] = {}
    filters: dict[tuple[Any, ...], Filter] = {}
    out: list[Outcome] = []
    for req in requests:
        refused = _refused(engine, req, refine, max_candidates)
        if refused is not None:
            out.append(Outcome(req, error=(refused.code, str(refused))))
        elif len(requests) == 1 or req.allow_ids is not None or req.deny_ids is not None:
            # the idle-server case has nothing to group; id lists are per request: never merged
            out.append(_one(engine, req, calls, refine))
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
        for part in _split(group, max_candidates, refine):
            out.extend(
                _group(engine, part, calls, refine, shared)
                if len(part) > 1
                else [_one(engine, part[0], calls, refine, shared)]
            )
    return out


class _Refine:
    """The k_factor each request refines with, read from one tuning profile for the whole turn.

    A request naming none runs the tuned row's for its target_recall (else the engine's own
    default) and is counted against the cap at the larger of that and the index's k_factor: the
    decoder, which sees no profile, already counted the index's. The tuned value is passed to
    the engine as it was counted, so a profile installed meanwhile cannot raise the work.
    """

    def __init__(self, profile: dict[str, Any] | None, default: int) -> None:
        self.profile = profile
        self.default = default
        self._tuned: dict[float | None, int | None] = {}

    def runs(self, req: Request) -> int | None:
        """The k_factor passed to the engine for req (None: the engine's default)."""
        if req.k_factor is not None:
            return req.k_factor
        target = req.target_recall
        if target not in self._tuned:
            self._tuned[target] = tuning.tuned_k_factor(self.profile, target)
        return self._tuned[target]

    def counted(self, req: Request) -> int:
        """The k_factor req is counted at against max_candidates."""
        if req.k_factor is not None:
            return req.k_factor
        return max(self.default, self.runs(req) or 0)


def _refused(
    engine: Engine, req: Request, refine: _Refine, max_candidates: int | None
) -> FaissqError | None:
    """Why req cannot be searched at all: queries of another dimension, or more candidates
    than max_candidates at the k_factor it is counted at."""
    if req.queries.shape[1] != engine.dim:
        return DimensionMismatch(
            f"queries have dimension {req.queries.shape[1]}, the index has {engine.dim}"
        )
    if max_candidates is not None:
        rows, k = req.queries.shape[0], req.k + req.offset
        try:
            fields.check_work(rows, k, refine.counted(req), max_candidates)
        except PayloadTooLarge as exc:
            return exc
    return None


def _split(
    group: list[Request], max_candidates: int | None, refine: _Refine
) -> list[list[Request]]:
    """The group in runs whose rows x k x k_factor stay within max_candidates (None: whole)."""
    if max_candidates is None or len(group) == 1:
        return [group]
    first = group[0]
    per_row = (first.k + first.offset) * refine.counted(first)
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
    engine: Engine, group: list[Request], calls: list[int], refine: _Refine, flt: Filter | None
) -> list[Outcome]:
    """One stacked search for the group (which shares `flt`), split back by rows; per-request
    on any error."""
    first = group[0]
    t0 = time.perf_counter()
    calls.append(len(group))
    try:
        res = engine.search(np.concatenate([r.queries for r in group]), first.k + first.offset,
                            filter=flt, **_params(first, refine))  # fmt: skip
    except Exception:  # one request (NaN after all, a GPU fault) must not fail the others
        return [_one(engine, r, calls, refine, flt) for r in group]
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


def _one(
    engine: Engine, req: Request, calls: list[int], refine: _Refine, flt: Filter | None = None
) -> Outcome:
    """Search one request alone (flt: its filter, already checked); every failure becomes an
    error outcome."""
    t0 = time.perf_counter()
    calls.append(1)
    try:
        res = engine.search(req.queries, req.k + req.offset, allow_ids=req.allow_ids,
                            deny_ids=req.deny_ids, filter=req.filter if flt is None else flt,
                            **_params(req, refine))  # fmt: skip
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


def _params(req: Request, refine: _Refine) -> dict[str, Any]:
    """The engine keyword arguments of a request."""
    return {
        "nprobe": req.nprobe,
        "ef_search": req.ef_search,
        "k_factor": refine.runs(req),
        "target_recall": req.target_recall,
    }
