"""Autotune: sweep nprobe / efSearch / k_factor against exact ground truth in the same id space."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import numpy.typing as npt

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
    ok = [r for r in rows if r.get("recall_lo", r["recall"]) >= target]
    if ok:
        return dict(min(ok, key=lambda r: r["ms_per_query"]))
    return dict(max(rows, key=lambda r: r["recall"]))


def recall_per_query(found: I64, truth: I64) -> npt.NDArray[np.float64]:
    """Fraction of each row's true neighbours found (ignoring -1 padding in the truth)."""
    out = np.ones(truth.shape[0])
    for i, (f, t) in enumerate(zip(found, truth, strict=True)):
        t = t[t >= 0]
        if t.size:
            out[i] = np.intersect1d(f, t).size / t.size
    return out


def recall_at_k(found: I64, truth: I64) -> float:
    """Mean recall@k over the rows."""
    return float(recall_per_query(found, truth).mean())


def lower_bound(per_query: npt.NDArray[np.float64]) -> float:
    """One-sided 95% lower confidence bound of the mean recall (the sample is finite)."""
    if per_query.size < 2:
        return float(per_query.mean())
    return float(per_query.mean() - 1.645 * per_query.std(ddof=1) / np.sqrt(per_query.size))


def held_out_queries(live_vecs: F32, num: int, seed: int, cosine: bool) -> F32:
    """Stored vectors moved off their own point by their nearest-neighbour distance.

    A query equal to a stored vector starts graph and list search at its own node and makes
    recall look better than it is for queries never seen; a random step as long as the distance
    to the nearest other vector puts it among its neighbours, where unseen queries land.
    """
    rng = np.random.default_rng(seed)
    rows = rng.choice(live_vecs.shape[0], size=min(num, live_vecs.shape[0]), replace=False)
    base = np.ascontiguousarray(live_vecs[rows])
    dist, _ = faiss.knn(base, live_vecs, min(2, live_vecs.shape[0]), metric=faiss.METRIC_L2)
    step = np.sqrt(np.maximum(dist[:, -1], 0))
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise *= (step / np.maximum(np.linalg.norm(noise, axis=1), 1e-12))[:, None]
    out = base + noise
    if cosine:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)


def ground_truth(engine: Engine, queries: F32, k: int) -> I64:
    """Exact top-k over every live vector of the engine (raw store + delta): same id space."""
    live_ids, live_vecs = engine.state.live_vectors()
    mt = faiss.METRIC_INNER_PRODUCT if engine.metric == "cosine" else faiss.METRIC_L2
    _, rows = faiss.knn(queries, live_vecs, k, metric=mt)
    return np.where(rows >= 0, live_ids[np.maximum(rows, 0)], -1)


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
    held_out = queries is None
    if queries is None:
        queries = held_out_queries(live_vecs, num_queries, seed + 1, engine.metric == "cosine")
    truth = ground_truth(engine, queries, k)
    param, grid = _grid(engine)
    table: list[dict[str, Any]] = []
    met: set[int] = set()
    progress("autotune", 0, len(grid))
    for i, point in enumerate(grid):
        kf = point.get("k_factor", 1)
        if kf in met:  # larger nprobe/efSearch only cost more once the target is met
            progress("autotune", i + 1, len(grid))
            continue
        t0 = time.perf_counter()
        res = engine.search(queries, k, **point)
        ms = (time.perf_counter() - t0) * 1000 / queries.shape[0]
        per_query = recall_per_query(res.ids, truth)
        rec, lo = float(per_query.mean()), lower_bound(per_query)
        row = {**point, "recall": round(rec, 4), "recall_lo": round(lo, 4)}
        table.append({**row, "ms_per_query": round(ms, 4)})
        if lo >= target:
            met.add(kf)
        progress("autotune", i + 1, len(grid))
    # the choice must meet the target with confidence, not by sampling luck
    ok = [r for r in table if r["recall_lo"] >= target]
    chosen = (
        min(ok, key=lambda r: r["ms_per_query"]) if ok else max(table, key=lambda r: r["recall"])
    )
    return {
        "k": k,
        "target_recall": target,
        "met": bool(ok),
        "param": param,
        "num_queries": int(queries.shape[0]),
        "held_out": held_out,
        "ntotal": int(live_ids.size),
        "version": engine.version,
        "chosen": chosen,
        "table": table,
    }
