"""Autotune: sweep nprobe / efSearch / k_factor against exact ground truth in the same id space.

The sweep calibrates the whole recall curve up to CURVE_TOP (or as high as the index reaches),
whatever the target, so a per-request target_recall above the autotune target maps to a row
that was measured, and one above the reachable maximum is told so (SearchResult.target_met).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import faiss
import numpy as np
import numpy.typing as npt

from faissq.config import IndexSettings
from faissq.errors import IndexNotReady
from faissq.index.params import hnsw_of, ivf_of
from faissq.index.results import worst
from faissq.index.state import State, in_sorted
from faissq.index.validate import F32, I64

if TYPE_CHECKING:
    from faissq.index.engine import Engine

Progress = Callable[[str, int, int], None]
K_FACTORS = (1, 2, 4, 8)
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)
CURVE_TOP = 0.99  # the sweep goes on past the target up to this recall (lower bound)
PLATEAU = 0.001  # two steps in a row gaining less than this: the curve's top is reached
BLOCK = 65_536  # raw-store rows scanned at once for ground truth (the store may be on disk)


def pick(profile: dict[str, Any] | None, target: float | None) -> dict[str, Any]:
    """The fastest table row meeting target (the profile's choice when target is None)."""
    if not profile:
        return {}
    if target is None:
        return dict(profile["chosen"])
    return dict(choose(profile["table"], target))


def choose(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The cheapest row meeting target: the first in sweep order per k_factor, then the fastest.

    Within one k_factor a larger nprobe / efSearch never costs less, so the smallest one that
    meets the target wins even when a busy host timed a larger one faster; the best-recall row
    when none meets it.
    """
    first: dict[int, dict[str, Any]] = {}
    for r in rows:  # table rows are in sweep order: cheapest setting first
        if meets(r, target):
            first.setdefault(int(r.get("k_factor", 1)), r)
    if first:
        return min(first.values(), key=lambda r: r["ms_per_query"])
    return max(rows, key=lambda r: r["recall"])


def fill(
    profile: dict[str, Any] | None,
    target: float | None,
    nprobe: int | None,
    ef_search: int | None,
    k_factor: int | None,
    cfg: IndexSettings,
) -> tuple[int, int, int | None, bool | None]:
    """Each search parameter not given, on its own: the tuned row's value, else the default.

    Returns (nprobe, ef_search, k_factor, target_met). target_met is the row's verdict only
    when the search runs the row's setting: None without a target, without a profile, or when
    a given parameter differs from the row's (the table measured no such setting).
    """
    chosen = pick(profile, target) if profile else {}
    nprobe = nprobe if nprobe is not None else chosen.get("nprobe") or cfg.default_nprobe
    ef_search = ef_search if ef_search is not None else chosen.get("ef_search")
    ef_search = ef_search or cfg.default_ef_search
    k_factor = k_factor if k_factor is not None else chosen.get("k_factor")
    used = {"nprobe": nprobe, "ef_search": ef_search, "k_factor": k_factor}
    ran = all(chosen[name] == value for name, value in used.items() if name in chosen)
    met = meets(chosen, target) if target is not None and chosen and ran else None
    return nprobe, ef_search, k_factor, met


def tuned_k_factor(profile: dict[str, Any] | None, target: float | None) -> int | None:
    """The k_factor the tuned row for target sets (None: no profile, or its row sets none)."""
    kf = pick(profile, target).get("k_factor") if profile else None
    return None if kf is None else int(kf)


def meets(row: dict[str, Any], target: float) -> bool:
    """Whether a profile row reaches target with confidence."""
    return float(row.get("recall_lo", row.get("recall", 0.0))) >= target


def recall_per_query(found: I64, truth: I64) -> npt.NDArray[np.float64]:
    """Fraction of each row's true neighbours found (ignoring -1 padding in the truth)."""
    out = np.ones(truth.shape[0])
    for i, (f, t) in enumerate(zip(found, truth, strict=True)):
        t = t[t >= 0]
        if t.size:
            out[i] = np.intersect1d(f, t).size / t.size
    return out


def lower_bound(per_query: npt.NDArray[np.float64]) -> float:
    """One-sided 95% lower confidence bound of the mean recall (the sample is finite)."""
    if per_query.size < 2:
        return float(per_query.mean())
    return float(per_query.mean() - 1.645 * per_query.std(ddof=1) / np.sqrt(per_query.size))


def live_blocks(st: State) -> Iterator[tuple[I64, F32]]:
    """Every live (ids, vectors) in blocks of the raw store, then the delta: never one copy."""
    p = st.primary
    if p is not None:
        for start in range(0, int(p.ids.size), BLOCK):
            ids = p.ids[start : start + BLOCK]
            vecs = np.asarray(p.vectors[start : start + BLOCK])
            keep = ~in_sorted(st.tombstones, ids)
            yield (ids, vecs) if keep.all() else (ids[keep], np.ascontiguousarray(vecs[keep]))
    if len(st.delta):
        yield st.delta.ids, st.delta.vectors


def exact_knn(queries: F32, blocks: Iterator[tuple[I64, F32]], k: int, metric: int) -> I64:
    """Exact top-k ids over blocks of (ids, vectors), merged block by block (-1 pads)."""
    return exact_knn_scored(queries, blocks, k, metric)[1]


def exact_knn_scored(
    queries: F32, blocks: Iterator[tuple[I64, F32]], k: int, metric: int
) -> tuple[F32, I64]:
    """Exact top-k (scores, ids) over blocks of (ids, vectors), merged block by block."""
    higher = metric == faiss.METRIC_INNER_PRODUCT
    best_d = np.empty((queries.shape[0], 0), dtype=np.float32)
    best_i = np.empty((queries.shape[0], 0), dtype=np.int64)
    for ids, vecs in blocks:
        if ids.size == 0:
            continue
        d, rows = faiss.knn(queries, vecs, min(k, int(ids.size)), metric=metric)
        found = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
        all_d, all_i = np.hstack([best_d, d]), np.hstack([best_i, found])
        order = np.argsort(-all_d if higher else all_d, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(all_d, order, axis=1)
        best_i = np.take_along_axis(all_i, order, axis=1)
    if best_i.shape[1] < k:
        pad = np.full((queries.shape[0], k - best_i.shape[1]), -1, dtype=np.int64)
        best_i = np.hstack([best_i, pad])
        fill = np.full(pad.shape, worst(higher), dtype=np.float32)
        best_d = np.hstack([best_d, fill])
    return best_d.astype(np.float32, copy=False), best_i


def held_out_queries(st: State, num: int, seed: int, cosine: bool) -> F32:
    """Stored vectors moved off their own point by their nearest-neighbour distance.

    A query equal to a stored vector starts graph and list search at its own node and makes
    recall look better than it is for queries never seen; a random step as long as the distance
    to the nearest other vector puts it among its neighbours, where unseen queries land.
    """
    rng = np.random.default_rng(seed)
    total = st.ntotal
    picks = np.sort(rng.choice(total, size=min(num, total), replace=False))
    parts: list[F32] = []
    seen = 0
    for _, vecs in live_blocks(st):
        inside = picks[(picks >= seen) & (picks < seen + vecs.shape[0])] - seen
        parts.append(np.asarray(vecs[inside], dtype=np.float32))
        seen += vecs.shape[0]
    base = np.ascontiguousarray(np.concatenate(parts).reshape(-1, st.dim))
    rng.shuffle(base)
    # the nearest other vector: the second hit (the first is the row itself)
    near = exact_knn(base, _with_rows(st), min(2, total), faiss.METRIC_L2)
    dist = _l2_to(st, base, near[:, -1])
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise *= (dist / np.maximum(np.linalg.norm(noise, axis=1), 1e-12))[:, None]
    out = base + noise
    if cosine:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)


def _with_rows(st: State) -> Iterator[tuple[I64, F32]]:
    """live_blocks with running row numbers as ids (so a hit can be read back by position)."""
    seen = 0
    for ids, vecs in live_blocks(st):
        yield np.arange(seen, seen + ids.size, dtype=np.int64), vecs
        seen += int(ids.size)


def _l2_to(st: State, base: F32, rows: I64) -> F32:
    """L2 distance of each base row to the live vector at running row number rows[i]."""
    out = np.zeros(base.shape[0], dtype=np.float32)
    seen = 0
    for ids, vecs in live_blocks(st):
        inside = (rows >= seen) & (rows < seen + ids.size)
        if inside.any():
            diff = base[inside] - np.asarray(vecs[rows[inside] - seen], dtype=np.float32)
            out[inside] = np.linalg.norm(diff, axis=1)
        seen += int(ids.size)
    return out


def ground_truth(engine: Engine, queries: F32, k: int) -> I64:
    """Exact top-k over every live vector of the engine (raw store + delta): same id space."""
    mt = faiss.METRIC_INNER_PRODUCT if engine.metric == "cosine" else faiss.METRIC_L2
    return exact_knn(queries, live_blocks(engine.state), k, mt)


def _grid(engine: Engine) -> tuple[str, list[dict[str, int]]]:
    """The parameter grid for the primary's family, cheapest first."""
    primary = engine.state.primary
    if primary is None:
        return "none", [{}]
    ivf = ivf_of(primary.index)
    lossy = bool(primary.plan.pq_m) or "PQ" in primary.plan.factory
    kfs = K_FACTORS if lossy else (1,)
    if ivf is not None:
        nlist = int(ivf.nlist)
        # powers of two and the midpoints between them: 1, 2, 3, 4, 6, 8, 12, 16, ...
        steps = {1 << i for i in range(16)} | {3 << i for i in range(15)}
        probes = sorted({min(nlist, p) for p in steps if p <= 2 * nlist})
        return "nprobe", [{"nprobe": p, "k_factor": kf} for kf in kfs for p in probes]
    if hnsw_of(primary.index) is not None:
        return "ef_search", [{"ef_search": e, "k_factor": kf} for kf in kfs for e in EF_SEARCH]
    return "none", [{"k_factor": 1}]


class Swept(NamedTuple):
    """One grid point searched: the result, milliseconds per query, recall of each query."""

    point: dict[str, int]
    result: Any  # engine.SearchResult
    ms: float
    per_query: npt.NDArray[np.float64]


def sweep_points(
    engine: Engine, queries: F32, truth: I64, k: int, grid: list[dict[str, int]], top: float,
    progress: Progress,
) -> Iterator[Swept | None]:  # fmt: skip
    """Search every grid point in order, or None for a point of a k_factor whose curve has
    reached `top` (lower bound) or gone flat: larger nprobe/efSearch there only cost more."""
    done: set[int] = set()
    last: dict[int, list[float]] = {}
    progress("autotune", 0, len(grid))
    for i, point in enumerate(grid):
        kf = point.get("k_factor", 1)
        if kf in done:
            progress("autotune", i + 1, len(grid))
            yield None
            continue
        t0 = time.perf_counter()
        res = engine.search(queries, k, **point)
        ms = (time.perf_counter() - t0) * 1000 / queries.shape[0]
        per_query = recall_per_query(res.ids, truth)
        seen = last.setdefault(kf, [])
        seen.append(float(per_query.mean()))
        flat = len(seen) >= 3 and seen[-1] - seen[-3] < 2 * PLATEAU
        if lower_bound(per_query) >= top or flat:
            done.add(kf)
        progress("autotune", i + 1, len(grid))
        yield Swept(point, res, ms, per_query)


def row(point: dict[str, int], per_query: npt.NDArray[np.float64], ms: float) -> dict[str, Any]:
    """A profile table row: the setting, its recall, the bound, and milliseconds per query."""
    rec, lo = float(per_query.mean()), lower_bound(per_query)
    return {**point, "recall": round(rec, 4), "recall_lo": round(lo, 4),
            "ms_per_query": round(ms, 4)}  # fmt: skip


def profile(
    table: list[dict[str, Any]], target: float, k: int, param: str, **about: Any
) -> dict[str, Any]:
    """The tuning profile of a measured table: the cheapest row meeting the target with
    confidence (not by sampling luck), and what was measured (`about`)."""
    chosen = choose(table, target)
    return {
        "k": k,
        "target_recall": target,
        "met": meets(chosen, target),
        "max_recall_lo": max(r["recall_lo"] for r in table),
        "param": param,
        **about,
        "chosen": chosen,
        "table": table,
    }


def autotune(
    engine: Engine,
    target: float,
    k: int,
    queries: F32 | None,
    num_queries: int,
    seed: int,
    progress: Progress,
    source: str | None = None,
) -> dict[str, Any]:
    """Measure recall@k and latency over the grid; choose the fastest setting meeting target.

    source names the queries in the profile: "synthetic" (stored vectors moved off their
    point, made here when queries is None), "live" (sampled real searches) or "given".
    """
    st = engine.state
    if st.ntotal <= 0:
        raise IndexNotReady(f"index {engine.name!r} is empty: nothing to tune")
    held_out = queries is None
    if queries is None:
        queries = held_out_queries(st, num_queries, seed + 1, engine.metric == "cosine")
    truth = ground_truth(engine, queries, k)
    param, grid = _grid(engine)
    top = max(target, CURVE_TOP)
    swept = sweep_points(engine, queries, truth, k, grid, top, progress)
    table = [row(s.point, s.per_query, s.ms) for s in swept if s is not None]
    return profile(
        table, target, k, param, num_queries=int(queries.shape[0]), held_out=held_out,
        source=source or ("synthetic" if held_out else "given"), ntotal=int(st.ntotal),
        version=engine.version,
    )  # fmt: skip


def sweep(
    engine: Engine, queries: F32, k: int, target: float, progress: Progress
) -> dict[str, Any]:
    """One shard's part of a sharded autotune (faissq.index.merged_tuning): its exact top-k and
    its top-k at each grid setting on the same queries, with scores, so shards' lists merge.

    `found` holds None for a setting past this shard's curve top; the merge carries the
    shard's last result at the same k_factor forward (for IVF-Flat what it finds at most).
    """
    st = engine.state
    if st.ntotal <= 0:
        raise IndexNotReady(f"index {engine.name!r} is empty: nothing to tune")
    mt = faiss.METRIC_INNER_PRODUCT if engine.metric == "cosine" else faiss.METRIC_L2
    truth_scores, truth = exact_knn_scored(queries, live_blocks(st), k, mt)
    param, grid = _grid(engine)
    top = max(target, CURVE_TOP)
    found = [
        None if s is None else {"scores": s.result.scores, "ids": s.result.ids, "ms": s.ms}
        for s in sweep_points(engine, queries, truth, k, grid, top, progress)
    ]
    return {"param": param, "grid": grid, "found": found, "truth_ids": truth,
            "truth_scores": truth_scores, "k": k, "target_recall": target,
            "ntotal": int(st.ntotal), "version": engine.version}  # fmt: skip
