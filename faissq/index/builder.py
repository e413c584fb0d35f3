"""Build a primary index from raw vectors, and merge a delta into a copy of one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import faiss
import numpy as np

from faissq.errors import InvalidParameter
from faissq.index.params import batch_selector, hnsw_of, ivf_of
from faissq.index.policy import Plan
from faissq.index.state import Primary, in_sorted
from faissq.index.validate import F32, I64

Progress = Callable[[str, int, int], None]
ADD_CHUNK = 65_536  # rows per add call: progress granularity without slowing FAISS down


def _noop(phase: str, done: int, total: int) -> None:
    """Progress sink used when the caller gives none."""


def metric_type(metric: str) -> int:
    """FAISS metric constant for a metric name."""
    return int(faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2)


def new_index(plan: Plan, ef_construction: int) -> Any:
    """Create the empty FAISS index of a plan (always accepting external ids)."""
    index = faiss.index_factory(plan.dim, plan.factory, metric_type(plan.metric))
    if ivf_of(index) is None and not isinstance(
        faiss.downcast_index(index), faiss.IndexIDMap | faiss.IndexIDMap2
    ):
        index = faiss.IndexIDMap(index)
    hnsw = hnsw_of(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = ef_construction
    return index


def train_sample(vectors: F32, size: int, seed: int) -> F32:
    """A seeded random sample of rows for training (the whole set when it is small)."""
    n = vectors.shape[0]
    if size <= 0 or size >= n:
        return vectors
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=size, replace=False))
    return np.ascontiguousarray(vectors[rows])


def add_chunked(index: Any, ids: I64, vectors: F32, progress: Progress, phase: str) -> None:
    """add_with_ids in chunks, reporting (phase, done, total) after each."""
    n = int(ids.size)
    progress(phase, 0, n)
    for start in range(0, n, ADD_CHUNK):
        stop = min(n, start + ADD_CHUNK)
        index.add_with_ids(vectors[start:stop], ids[start:stop])
        progress(phase, stop, n)


def build_primary(
    ids: I64, vectors: F32, plan: Plan, *, seed: int, ef_construction: int, progress: Progress
) -> Primary:
    """Train on a sample and add everything; ids/vectors are stored sorted by id."""
    if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        order = np.argsort(ids, kind="stable")
        ids, vectors = ids[order], vectors[order]
    # already sorted (what the engine passes): no second copy of the whole corpus
    ids_s = np.ascontiguousarray(ids)
    vecs_s = np.ascontiguousarray(vectors)
    index = new_index(plan, ef_construction)
    if not index.is_trained:
        sample = train_sample(vectors, plan.train_size, seed)
        progress("train", 0, int(sample.shape[0]))
        ivf = ivf_of(index)
        if ivf is not None:
            ivf.cp.seed = seed
        index.train(sample)
        progress("train", int(sample.shape[0]), int(sample.shape[0]))
    add_chunked(index, ids_s, vecs_s, progress, "add")
    return Primary(index=index, ids=ids_s, vectors=vecs_s, plan=plan)


def merge_primary(
    primary: Primary,
    tombstones: I64,
    delta_ids: I64,
    delta_vectors: F32,
    progress: Progress,
) -> Primary:
    """Copy the primary, drop tombstones, add the delta, reusing the trained quantizer."""
    if tombstones.size and hnsw_of(primary.index) is not None:
        raise InvalidParameter("HNSW cannot remove vectors: use rebuild instead of merge")
    index = faiss.clone_index(primary.index)
    if tombstones.size:
        progress("remove", 0, int(tombstones.size))
        sel, keep = batch_selector(tombstones)
        index.remove_ids(sel)
        del keep
        progress("remove", int(tombstones.size), int(tombstones.size))
    add_chunked(index, delta_ids, delta_vectors, progress, "add")
    keep_rows = ~in_sorted(tombstones, primary.ids)
    ids = np.concatenate([primary.ids[keep_rows], delta_ids])
    vecs = np.concatenate([primary.vectors[keep_rows], delta_vectors])
    order = np.argsort(ids, kind="stable")
    plan = replace(primary.plan, ntotal=int(ids.size))
    return Primary(
        index=index,
        ids=np.ascontiguousarray(ids[order]),
        vectors=np.ascontiguousarray(vecs[order]),
        plan=plan,
    )


def imbalance(index: Any) -> float:
    """IVF list-size imbalance factor (1.0 = perfectly even); 1.0 for non-IVF indexes."""
    ivf = ivf_of(index)
    if ivf is None or ivf.ntotal == 0:
        return 1.0
    return float(ivf.invlists.imbalance_factor())
