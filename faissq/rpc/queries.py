"""The RPC loop's requests beyond top-k: range search, fetch by id, and reads that wait for a seq.

Top-k requests go on to batch.search_all; range and fetch requests are answered one by one here.
A request with `min_seq` ahead of the serving engine's version is held across loop turns (the
loop then polls the list every POLL_S) until the engine holds that seq, or answered `stale`
STALE_MARGIN_S before its deadline, so the client reads the code rather than a timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from faissq.errors import FaissqError, InvalidParameter
from faissq.index.engine import Engine
from faissq.rpc.batch import INTERNAL, Outcome, search_all
from faissq.rpc.protocol import Limits, Request

log = logging.getLogger(__name__)

POLL_S = 0.005  # the loop's pause between polls while a request is held
STALE_MARGIN_S = 0.05  # a held request is answered `stale` this long before its deadline
STALE = "stale"  # wire code: the index did not reach the request's min_seq in time


def search_kinds(
    eng: Engine, live: list[Request], calls: list[int], limits: Limits
) -> list[Outcome]:
    """Answer top-k requests in batches (search_all), range and fetch requests one by one."""
    knn = [r for r in live if r.kind == "knn"]
    out = search_all(eng, knn, calls, limits.max_candidates, limits.default_k_factor) if knn else []
    for req in live:
        if req.kind != "knn":
            calls.append(1)
            out.append(answer(eng, req, limits))
    return out


def answer(eng: Engine, req: Request, limits: Limits) -> Outcome:
    """The outcome of one range or fetch request; every failure becomes an error outcome."""
    t0 = time.perf_counter()
    try:
        if req.kind == "range" and req.radius is not None:
            return _range(eng, req, req.radius, limits, t0)
        if req.kind == "fetch" and req.fetch_ids is not None:
            return _fetch(eng, req, req.fetch_ids, t0)
        raise InvalidParameter(f"request kind {req.kind!r} is not answered here")
    except FaissqError as exc:
        return Outcome(req, error=(exc.code, str(exc)))
    except Exception as exc:
        log.exception("%s request failed unexpectedly", req.kind)
        return Outcome(req, error=(INTERNAL, f"{type(exc).__name__}: {exc}"))


def _range(eng: Engine, req: Request, radius: float, limits: Limits, t0: float) -> Outcome:
    """Range search; each query keeps its best max_candidates // rows results (truncated)."""
    version = eng.version  # read first: the searched state holds at least this seq
    scores, ids = eng.range_search(req.queries, radius, nprobe=req.nprobe, filter=req.filter)
    per_query = max(1, limits.max_candidates // max(1, len(scores)))
    truncated = any(len(s) > per_query for s in scores)
    counts = np.array([min(len(s), per_query) for s in scores], dtype=np.int64)
    lims = np.zeros(len(scores) + 1, dtype=np.int64)
    np.cumsum(counts, out=lims[1:])
    flat_s = np.concatenate([s[:per_query] for s in scores]).astype("<f4", copy=False)
    flat_i = np.concatenate([i[:per_query] for i in ids]).astype("<i8", copy=False)
    return Outcome(req, scores=flat_s, ids=flat_i, version=version,
                   search_s=time.perf_counter() - t0,
                   extra={"lims": lims, "truncated": truncated})  # fmt: skip


def _fetch(eng: Engine, req: Request, fetch_ids: Any, t0: float) -> Outcome:
    """The stored vectors and attributes of the asked ids that are live, and the ids that are
    not (no attributes when the index declares no fields)."""
    ids = np.ascontiguousarray(fetch_ids, dtype=np.int64)
    st = eng.state  # one committed state: vectors, attributes and version agree
    found, vectors = st.vectors_of(ids)
    extra: dict[str, Any] = {"vectors": vectors[found], "missing": ids[~found]}
    if st.attrs is not None:
        extra["attributes"] = st.attrs.values_of(ids[found])
    return Outcome(req, scores=None, ids=ids[found], version=st.version,
                   search_s=time.perf_counter() - t0, extra=extra)  # fmt: skip


class Held:
    """Requests whose min_seq the serving engine has not reached yet, oldest first."""

    def __init__(self) -> None:
        self.items: list[Request] = []

    def __bool__(self) -> bool:
        """Whether any request is held (the loop then polls instead of blocking)."""
        return bool(self.items)

    def turn(
        self, live: list[Request], engine: Callable[[], Engine], now: float
    ) -> tuple[list[Request], list[Request]]:
        """(requests to answer now, held requests now stale); the rest stay held."""
        if not self.items and all(r.min_seq is None for r in live):
            return live, []
        try:
            version = engine().version
        except FaissqError:  # no engine: let them through to its index_not_ready answer
            version = None
        run: list[Request] = []
        stale: list[Request] = []
        keep: list[Request] = []
        for req in [*self.items, *live]:
            if version is None or req.min_seq is None or req.min_seq <= version:
                run.append(req)
            elif req.deadline - STALE_MARGIN_S <= now:
                stale.append(req)
            else:
                keep.append(req)
        self.items = keep
        return run, stale


def stale_message(req: Request, engine: Callable[[], Engine]) -> str:
    """Why a held request is answered `stale`."""
    try:
        have: Any = engine().version
    except FaissqError as exc:
        have = exc.code
    return f"min_seq {req.min_seq} not reached before the deadline (this worker is at {have})"
