"""Autotune: sweep nprobe / efSearch / k_factor against exact ground truth in the same id space."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from faissq.errors import IndexNotReady
from faissq.index.params import hnsw_of, ivf_of
from faissq.index.validate import F32, I64

if TYPE_CHECKING:
    from faissq.index.engine import Engine

Progress = Callable[[str, int, int], None]
K_FACTORS = (1, 2, 4, 8)
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024)


def pick(profile: dict[str, Any] | None, target: float | None) -> dict[str, Any]:
    """The fastest table row meeting target (the profile's choice when target is None)."""
    if not profile:
        return {}
    if target is None:
        return dict(profile["chosen"])
    rows = profile["table"]
    ok = [r for r in rows if r["recall"] >= target]
    if ok:
        return dict(min(ok, key=lambda r: r["ms_per_query"]))
    return dict(max(rows, key=lambda r: r["recall"]))


def recall_at_k(found: I64, truth: I64) -> float:
    """Mean fraction of each row's true neighbours found (ignoring -1 padding in the truth)."""
    hits = 0
    total = 0
    for f, t in zip(found, truth, strict=True):
        t = t[t >= 0]
        hits += np.intersect1d(f, t).size
        total += t.size
    return hits / total if total else 1.0


def _drop_self(ids: I64, self_ids: I64 | None, k: int) -> I64:
    """Remove each query's own id from its row and keep k (the query is held out)."""
    if self_ids is None:
        return ids[:, :k]
    keep = ids != self_ids[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")
    return np.take_along_axis(np.where(keep, ids, -1), order, axis=1)[:, :k]


def ground_truth(engine: Engine, queries: F32, k: int, self_ids: I64 | None) -> I64:
    """Exact top-k over every live vector of the engine (raw store + delta)."""
    live_ids, live_vecs = engine.state.live_vectors()
    extra = 1 if self_ids is not None else 0
    mt = faiss.METRIC_INNER_PRODUCT if engine.metric == "cosine" else faiss.METRIC_L2
    _, rows = faiss.knn(queries, live_vecs, k + extra, metric=mt)
    ids = np.where(rows >= 0, live_ids[np.maximum(rows, 0)], -1)
    return _drop_self(ids, self_ids, k)


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
        probes = sorted({min(nlist, 1 << i) for i in range(0, 16) if (1 << i) <= 2 * nlist})
        return "nprobe", [{"nprobe": p, "k_factor": kf} for kf in kfs for p in probes]
    if hnsw_of(primary.index) is not None:
        return "ef_search", [{"ef_search": e, "k_factor": kf} for kf in kfs for e in EF_SEARCH]
    return "none", [{"k_factor": 1}]


def autotune(
    engine: Engine,
    target: float,
    k: int,
    queries: F32 | None,
    num_queries: int,
    seed: int,
    progress: Progress,
) -> dict[str, Any]:
    """Measure recall@k and latency over the grid; choose the fastest setting meeting target."""
    live_ids, live_vecs = engine.state.live_vectors()
    if live_ids.size == 0:
        raise IndexNotReady(f"index {engine.name!r} is empty: nothing to tune")
    self_ids: I64 | None = None
    if queries is None:
        rng = np.random.default_rng(seed + 1)
        take = min(num_queries, int(live_ids.size))
        rows = rng.choice(live_ids.size, size=take, replace=False)
        queries, self_ids = np.ascontiguousarray(live_vecs[rows]), live_ids[rows]
    truth = ground_truth(engine, queries, k, self_ids)
    param, grid = _grid(engine)
    table: list[dict[str, Any]] = []
    met: set[int] = set()
    progress("autotune", 0, len(grid))
    for i, point in enumerate(grid):
        kf = point.get("k_factor", 1)
        if kf in met:  # larger nprobe/efSearch only cost more once the target is met
            progress("autotune", i + 1, len(grid))
            continue
        extra = 1 if self_ids is not None else 0
        t0 = time.perf_counter()
        res = engine.search(queries, k + extra, **point)
        ms = (time.perf_counter() - t0) * 1000 / queries.shape[0]
        rec = recall_at_k(_drop_self(res.ids, self_ids, k), truth)
        table.append({**point, "recall": round(rec, 4), "ms_per_query": round(ms, 4)})
        if rec >= target:
            met.add(kf)
        progress("autotune", i + 1, len(grid))
    ok = [r for r in table if r["recall"] >= target]
    chosen = (
        min(ok, key=lambda r: r["ms_per_query"]) if ok else max(table, key=lambda r: r["recall"])
    )
    return {
        "k": k,
        "target_recall": target,
        "met": bool(ok),
        "param": param,
        "num_queries": int(queries.shape[0]),
        "held_out": self_ids is not None,
        "ntotal": int(live_ids.size),
        "version": engine.version,
        "chosen": chosen,
        "table": table,
    }
