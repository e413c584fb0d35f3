"""The engine's read path: top-k and range search over one committed State (no I/O).

The Engine checks the arguments and picks the parameters; a Reader answers from the State it is
given, so a search reads one consistent snapshot while mutations publish new ones. The lists of
an IVF-Flat primary that upserts change in place are the exception: searched under their lock,
they may already hold rows of a state not yet published (live.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from faissq.errors import IndexNotReady, InvalidParameter
from faissq.index.delta import exact_knn
from faissq.index.params import CallParams, allow_selector, combine, make_params, not_selector
from faissq.index.results import exact_scores, merge_topk, worst
from faissq.index.state import Primary, State, in_sorted, union_sorted
from faissq.index.validate import F32, I64

_NO_IDS: I64 = np.empty(0, np.int64)


@dataclass(frozen=True)
class Reader:
    """How one engine reads its states: its name (for errors), metric and refine factor."""

    name: str
    metric_type: int  # faiss.METRIC_*
    higher_is_better: bool  # inner product (cosine): larger scores rank first
    k_factor: int  # candidates per result fetched for exact refine, when the plan refines
    exact_rows: int = 0  # an allow set (a filter's ids) this small is scanned exactly

    def top_k(
        self,
        st: State,
        xq: F32,
        k: int,
        nprobe: int | None,
        ef_search: int | None,
        k_factor: int | None,
        allow: I64 | None,
        deny: I64 | None,
    ) -> tuple[F32, I64]:
        """Top-k over primary + delta, tombstones excluded, merged by score, ids de-duplicated.

        With an allow set: few ids are scanned exactly; else FAISS skips the others, probing
        more lists (or a wider graph search) the fewer pass, so the filtered top-k has no holes.
        """
        if allow is not None:
            if allow.size <= self.exact_rows:
                return self.exact_subset(st, xq, k, allow, deny)
            nprobe, ef_search = widened(nprobe, ef_search, allow.size, st.ntotal)
        p = st.primary
        if p is not None and p.live is not None:
            call = self._call(p, nprobe, ef_search, allow, deny)
            return p.live.search(xq, k, call.params)
        parts: list[tuple[F32, I64]] = []
        # delta rows placed by this primary's quantizer are scanned in the lists it probes,
        # unless it probes half of them or more: the whole delta (exact) then costs as much
        params = None
        unfiltered = allow is None and deny is None
        if p is not None and p.coarse is not None and st.delta.coarse == p.serial and unfiltered:
            call = p.params_for(nprobe, ef_search).params
            if 2 * int(call.nprobe) < p.shape.nlist and len(st.delta):
                params = call
        if p is not None:
            parts.append(self.primary(st, xq, k, nprobe, ef_search, k_factor, allow, deny))
        if p is not None and params is not None:
            found = st.delta.search_probed(xq, k, self.metric_type, p, params)
            if found is not None:
                parts.append(found)
        elif len(st.delta) or not parts:
            parts.append(st.delta.search(xq, k, self.metric_type, allow, deny))
        if len(parts) == 1:
            # one source: FAISS already returns k sorted, unique ids padded with -1
            return parts[0]
        if self._delta_out_of_reach(parts[0], parts[1]):
            return parts[0]
        return merge_topk(parts, k, self.higher_is_better)

    @staticmethod
    def _call(
        p: Primary, nprobe: int | None, ef_search: int | None, allow: I64 | None, deny: I64 | None
    ) -> CallParams:
        """The parameters of a search of lists that hold the live rows alone (live.py): the
        shared tree without filters, else one with their selectors."""
        if allow is None and deny is None:
            return p.params_for(nprobe, ef_search)
        sel, keep = combine(selectors(None, allow, deny))
        return make_params(p.shape, nprobe=nprobe, ef_search=ef_search, sel=sel, keep=keep)

    def exact_subset(
        self, st: State, xq: F32, k: int, allow: I64, deny: I64 | None
    ) -> tuple[F32, I64]:
        """Exact top-k over the live vectors of the allowed ids (deny removed): their raw rows
        gathered (FAISS's selector-aware knn would score every row) and the delta's among them."""
        ids = allow if deny is None else allow[~in_sorted(deny, allow)]
        parts: list[tuple[F32, I64]] = []
        p = st.primary
        if p is not None:
            rows = p.rows_of(ids)
            live = rows >= 0
            if st.tombstones.size:
                live &= ~in_sorted(st.tombstones, ids)
            in_p, rows = ids[live], rows[live]
            vecs = np.take(np.asarray(p.vectors), rows, axis=0)
            parts.append(exact_knn(xq, in_p, vecs, k, self.metric_type))
        if len(st.delta) or not parts:
            parts.append(st.delta.search(xq, k, self.metric_type, ids, None))
        return parts[0] if len(parts) == 1 else merge_topk(parts, k, self.higher_is_better)

    def _delta_out_of_reach(self, primary: tuple[F32, I64], delta: tuple[F32, I64]) -> bool:
        """Whether no delta row would enter any row's top-k: the primary's k slots are all
        filled and each row's best delta score is no better than its k-th (the merge keeps the
        primary first on ties), so the primary's answer stands as it is. Most searches end
        here, skipping the merge (worker CPU per search, benchmarks/upsert_stream.py)."""
        p_scores, p_ids = primary
        kth, best = p_scores[:, -1], delta[0][:, 0]
        beaten = best > kth if self.higher_is_better else best < kth
        return bool(p_ids[:, -1].min() >= 0) and not bool(beaten.any())

    def primary(
        self,
        st: State,
        xq: F32,
        k: int,
        nprobe: int | None,
        ef_search: int | None,
        k_factor: int | None,
        allow: I64 | None,
        deny: I64 | None,
    ) -> tuple[F32, I64]:
        """Search the primary (GPU copy when usable), then refine lossy codes exactly."""
        primary = st.primary
        if primary is None:
            raise IndexNotReady(f"index {self.name!r} has no primary")
        lossy = primary.lossy
        kf = k_factor if k_factor is not None else (self.k_factor if primary.plan.refine else 1)
        fetch = k * kf if lossy else k
        result = None
        if primary.gpu is not None:
            exclude = st.tombstones if deny is None else union_sorted(st.tombstones, deny)
            result = primary.gpu.search(xq, fetch, nprobe, exclude, allow, st.ntotal)
        if result is None and allow is None and deny is None:
            # no per-call selector: the state's parameter trees are shared (FAISS only reads them)
            if post_filtered(st):
                result = self._past_tombstones(st, xq, fetch, nprobe, ef_search)
            else:
                result = plain(st, xq, fetch, st.params_for(nprobe, ef_search).params)
        if result is None:
            sel, keep = combine(selectors(st.tomb_selector, allow, deny))
            call = make_params(primary.shape, nprobe=nprobe, ef_search=ef_search, sel=sel,
                               keep=keep)  # fmt: skip
            result = primary.index.search(xq, fetch, params=call.params)
        scores, ids = result
        if lossy and fetch > k:
            scores, ids = self.refine(primary, xq, ids, k)
        return scores, ids

    def _past_tombstones(
        self,
        st: State,
        xq: F32,
        fetch: int,
        nprobe: int | None,
        ef_search: int | None,
    ) -> tuple[F32, I64]:
        """A plain IVF primary's top-`fetch` without the tombstoned ids: FAISS fetches a few
        more without a selector and those are dropped here, as a selector test per scanned row
        cost a sixth of the search (benchmarks/upsert_stream.py). The lists scanned are the
        same, so the answer is the selector's; a query left short is searched again with it."""
        p = st.primary
        assert p is not None
        want = fetch + max(POST_FILTER_SPARE, fetch // 4)
        scores, ids = plain(st, xq, want, p.params_for(nprobe, ef_search).params)
        gone = st.tomb_set
        if gone is not None and gone.isdisjoint(ids.ravel().tolist()):
            return scores[:, :fetch], ids[:, :fetch]
        dead = in_sorted(st.tombstones, ids)
        if not dead.any():
            return scores[:, :fetch], ids[:, :fetch]
        full = ids[:, -1] >= 0  # FAISS found `want` rows: more may lie past them
        order = np.argsort(dead, axis=1, kind="stable")[:, :fetch]  # the live ones, best first
        scores = np.take_along_axis(scores, order, 1)
        ids = np.take_along_axis(np.where(dead, -1, ids), order, 1)
        scores[ids == -1] = worst(self.higher_is_better)
        short = np.flatnonzero(full & (ids[:, -1] < 0))
        if short.size:
            call = st.params_for(nprobe, ef_search)
            scores[short], ids[short] = plain(st, xq[short], fetch, call.params)
        return scores, ids

    def within(
        self, st: State, xq: F32, radius: float, nprobe: int, allow: I64 | None = None
    ) -> tuple[list[F32], list[I64]]:
        """Per-query scores and ids within radius, best first, only ids in `allow` when given
        (see Engine.range_search)."""
        nq = xq.shape[0]
        out_s: list[list[F32]] = [[] for _ in range(nq)]
        out_i: list[list[I64]] = [[] for _ in range(nq)]
        if allow is not None and allow.size == 0:  # nothing passes: no selector over no ids
            return [np.empty(0, np.float32) for _ in range(nq)], [_NO_IDS for _ in range(nq)]
        p = st.primary
        if p is not None:
            sel, keep = combine(selectors(st.tomb_selector, allow, None))
            call = make_params(p.shape, nprobe=nprobe, ef_search=None, sel=sel, keep=keep)
            ranged = p.index.range_search if p.live is None else p.live.range_search
            try:
                lims, dist, ids = ranged(xq, radius, params=call.params)
            except RuntimeError as exc:
                raise InvalidParameter(
                    f"{p.plan.family} does not support range search: {exc}"
                ) from None
            for q in range(nq):
                out_s[q].append(dist[lims[q] : lims[q + 1]])
                out_i[q].append(ids[lims[q] : lims[q + 1]])
        if len(st.delta) and (p is None or p.live is None):  # live lists hold the delta
            v = st.delta.vectors
            scores = xq @ v.T
            if not self.higher_is_better:
                scores = (xq * xq).sum(1)[:, None] + (v * v).sum(1)[None, :] - 2 * scores
            hit = scores > radius if self.higher_is_better else scores < radius
            if allow is not None:
                hit &= in_sorted(allow, st.delta.ids)[None, :]
            for q in range(nq):
                out_s[q].append(scores[q][hit[q]])
                out_i[q].append(st.delta.ids[hit[q]])
        res_s: list[F32] = []
        res_i: list[I64] = []
        for q in range(nq):
            s = np.concatenate(out_s[q]) if out_s[q] else np.empty(0, np.float32)
            i = np.concatenate(out_i[q]) if out_i[q] else np.empty(0, np.int64)
            order = np.argsort(-s if self.higher_is_better else s, kind="stable")
            res_s.append(s[order].astype(np.float32, copy=False))
            res_i.append(i[order].astype(np.int64, copy=False))
        return res_s, res_i

    def refine(self, primary: Primary, xq: F32, cand: I64, k: int) -> tuple[F32, I64]:
        """Re-score candidates exactly from raw vectors and keep the best k per query."""
        rows = primary.rows_of(cand)
        valid = rows >= 0
        vecs = primary.vectors[np.maximum(rows, 0)]
        exact = exact_scores(xq, vecs, self.higher_is_better)
        bad = worst(self.higher_is_better)
        exact[~valid] = bad
        key = -exact if self.higher_is_better else exact
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(np.where(valid, cand, -1), order, axis=1)
        return np.take_along_axis(exact, order, axis=1), ids


def plain(st: State, xq: F32, k: int, params: Any) -> tuple[F32, I64]:
    """The primary's search with these parameters (a shared tree: FAISS only reads it)."""
    p = st.primary
    assert p is not None
    return p.index.search(xq, k, params=params)  # type: ignore[no-any-return]


def post_filtered(st: State) -> bool:
    """Whether a search without filters drops the tombstones from a plain IVF primary's answer
    instead of passing FAISS a selector: while they are few (POST_FILTER_SHARE of its rows),
    a few spare results cover them."""
    p = st.primary
    dead = int(st.tombstones.size)
    return p is not None and p.coarse is not None and 0 < dead * POST_FILTER_SHARE <= p.ids.size


def selectors(tomb: tuple[Any, list[Any]] | None, allow: I64 | None, deny: I64 | None) -> list[Any]:
    """The (selector, kept arrays) pairs a filtered search combines: the tombstones', the
    allowed ids', the denied ids'."""
    sels = [tomb] if tomb is not None else []
    if allow is not None:
        sels.append(allow_selector(allow))
    if deny is not None:
        sels.append(not_selector(deny))
    return sels


POST_FILTER_SHARE = 20  # tombstones up to 1 in this many primary rows are dropped after FAISS
POST_FILTER_SPARE = 4  # results fetched past the asked ones (at least; a quarter more else)
MAX_WIDEN = 16  # most a filter multiplies nprobe / efSearch by


def widened(
    nprobe: int | None, ef_search: int | None, passing: int, live: int
) -> tuple[int | None, int | None]:
    """nprobe grown by the inverse share of rows a filter passes, efSearch by its square root
    (each at most MAX_WIDEN times): the filtered neighbours lie in more IVF lists, while HNSW's
    filtered walk still visits refused nodes, so its queue needs less room (200k x 128 at 10%:
    recall@10 0.97 unwidened, 0.99 at 10x for 16x the time; benchmarks/filters.py)."""
    if passing <= 0 or live <= passing:
        return nprobe, ef_search
    w = min(MAX_WIDEN, live / passing)
    return (None if nprobe is None else math.ceil(nprobe * w),
            None if ef_search is None else math.ceil(ef_search * math.sqrt(w)))  # fmt: skip
