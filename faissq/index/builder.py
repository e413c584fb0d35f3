"""Build a primary index from raw vectors, and merge a delta into a copy of one.

Builds stream: validation, the raw store (written to disk and memory-mapped) and IVF adds go
chunk by chunk, so a build holds the index, a bounded training sample and one chunk at a time
(Flat and HNSW add in one call: see build_primary).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import faiss
import numpy as np

from faissq.config import IndexSettings
from faissq.errors import InvalidParameter
from faissq.index import drift
from faissq.index.omp import one_thread
from faissq.index.params import batch_selector, hnsw_of, ivf_of
from faissq.index.policy import Plan, nlist_for, with_centroids
from faissq.index.state import Primary, in_sorted
from faissq.index.validate import F32, I64

Progress = Callable[[str, int, int], None]
Prepare = Callable[[Any], F32]  # raw rows -> checked float32 rows (normalised under cosine)
ADD_CHUNK = 65_536  # rows per add call: progress granularity without slowing FAISS down
SERIAL_MERGE_MAX = 50_000  # delta rows a merge adds on one OpenMP thread (0.02 s CPU per 5,000)


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


def seed_quantizer(index: Any, centroids: F32) -> None:
    """Fill an untrained IVF index's coarse quantizer with given centroids: training then
    skips k-means (FAISS trains a quantizer only when it does not hold nlist centroids)."""
    ivf = ivf_of(index)
    if ivf is None or ivf.nlist != centroids.shape[0] or ivf.d != centroids.shape[1]:
        raise InvalidParameter(f"centroids {centroids.shape} do not fit index {plan_shape(ivf)}")
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):  # OPQ: rotated space
        raise InvalidParameter("centroids need an IVF index without a vector transform")
    ivf.quantizer.reset()
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))


def train_centroids(vectors: Any, cfg: IndexSettings, metric: str) -> F32:
    """Coarse centroids for n vectors by the engine's nlist rule, k-means on its sample size
    (spherical under cosine): one quantizer a sharded IVF build shares over its shards."""
    nlist, size = nlist_for(int(vectors.shape[0]), cfg)
    sample = np.array(train_sample(vectors, size, cfg.seed), dtype=np.float32)
    if metric == "cosine":
        faiss.normalize_L2(sample)
    # niter 10: what FAISS's IVF training runs, so a shared quantizer costs what one index's does
    km = faiss.Kmeans(sample.shape[1], nlist, niter=10, seed=cfg.seed, spherical=metric == "cosine")
    km.train(sample)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def plan_shape(ivf: Any) -> str:
    """An IVF index's (nlist, dim) for messages, or 'without inverted lists'."""
    return "without inverted lists" if ivf is None else f"({ivf.nlist}, {ivf.d})"


def train_sample(vectors: Any, size: int, seed: int) -> Any:
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


class RawStore:
    """Writes the raw vectors to an unlinked file and maps it read-only: disk, not memory.

    The file has no name once opened, so nothing is left behind by a crash, and the mapping
    keeps it alive for as long as the Primary that holds it.
    """

    def __init__(self, dim: int, raw_dir: str | None) -> None:
        """Open the unlinked file in raw_dir (None: the system temp folder)."""
        self.dim = dim
        self.rows = 0
        # closed by finish(): the file outlives this call, as long as the mapping
        self._fh = tempfile.TemporaryFile(dir=raw_dir, prefix="faissq-raw-")  # noqa: SIM115

    def write(self, rows: F32) -> None:
        """Append rows (float32, dim columns)."""
        arr = np.ascontiguousarray(rows, dtype=np.float32)
        self._fh.write(arr.data.cast("B"))  # the array's own buffer: no chunk copy
        self.rows += int(rows.shape[0])

    def finish(self) -> F32:
        """The rows written, memory-mapped read-only (the file closes; the mapping stays)."""
        self._fh.flush()
        try:
            if self.rows == 0:
                return np.empty((0, self.dim), dtype=np.float32)
            mapped = np.memmap(self._fh, dtype=np.float32, mode="r", shape=(self.rows, self.dim))
            return mapped
        finally:
            self._fh.close()


def _rows(vectors: Any, order: I64 | None, start: int, stop: int) -> Any:
    """Rows start..stop of the id-sorted order (a chunk-sized copy at most)."""
    return vectors[start:stop] if order is None else vectors[order[start:stop]]


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each chunk of n rows."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def build_primary(
    ids: I64,
    vectors: Any,
    plan: Plan,
    *,
    seed: int,
    ef_construction: int,
    progress: Progress,
    prepare: Prepare = np.ascontiguousarray,
    raw_dir: str | None = None,
    chunk: int = ADD_CHUNK,
    centroids: F32 | None = None,
) -> Primary:
    """Train on a sample and add everything, chunk by chunk; the raw store is sorted by id.

    prepare checks and normalises each chunk of vectors (the caller's array is never copied
    whole); the raw store is written before training, so bad input fails before any k-means.
    centroids: an IVF plan's coarse centroids, used as they are instead of training them.
    """
    n = int(ids.size)
    order = None
    if n > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        order = np.argsort(ids, kind="stable")
    ids_s = np.ascontiguousarray(ids if order is None else ids[order])
    store = RawStore(plan.dim, raw_dir)
    progress("store", 0, n)
    for start, stop in _chunks(n, chunk):
        store.write(prepare(_rows(vectors, order, start, stop)))
        progress("store", stop, n)
    raw = store.finish()
    if centroids is not None:
        plan = with_centroids(plan, int(centroids.shape[0]))
    index = new_index(plan, ef_construction)
    if centroids is not None:
        seed_quantizer(index, centroids)
    if not index.is_trained:
        sample = prepare(train_sample(vectors, plan.train_size, seed))
        progress("train", 0, int(sample.shape[0]))
        ivf = ivf_of(index)
        if ivf is not None:
            ivf.cp.seed = seed
        index.train(sample)
        progress("train", int(sample.shape[0]), int(sample.shape[0]))
        del sample
    progress("add", 0, n)
    # IVF lists grow one by one: chunks cost nothing. Flat and HNSW keep one array per index
    # that every append reallocates, holding two copies at once (build peak 1.6x raw FAISS on
    # HNSW, docs/benchmarks.md): they are added in one call, sized once
    step = chunk if ivf_of(index) is not None else max(n, 1)
    for start, stop in _chunks(n, step):
        # from the caller's rows, not the mapped store: reading the mapping back would make
        # every page of the raw store resident in this process during the build
        index.add_with_ids(prepare(_rows(vectors, order, start, stop)), ids_s[start:stop])
        progress("add", stop, n)
    # the drift baseline: how far the vectors the index was built with lie from its centroids,
    # on a sample of the caller's rows: gathering rows of the mapped store would make it all
    # resident (readahead around each row), nearly doubling the build's peak
    plan = replace(plan, centroid_dist=drift.baseline(index, vectors, seed, prepare))
    return Primary(index=index, ids=ids_s, vectors=raw, plan=plan)


def merge_primary(
    primary: Primary,
    tombstones: I64,
    delta_ids: I64,
    delta_vectors: F32,
    progress: Progress,
    raw_dir: str | None = None,
    chunk: int = ADD_CHUNK,
) -> Primary:
    """Copy the primary, drop tombstones, add the delta, reusing the trained quantizer; a
    primary whose lists hold them already (live.py) gets its raw store rewritten alone."""
    if primary.live is not None:
        ids, vectors = _merged_store(primary, tombstones, delta_ids, delta_vectors, raw_dir, chunk)
        plan = replace(primary.plan, ntotal=int(ids.size))
        return replace(primary, ids=ids, vectors=vectors, plan=plan)
    if tombstones.size and hnsw_of(primary.index) is not None:
        raise InvalidParameter("HNSW cannot remove vectors: use rebuild instead of merge")
    index = faiss.clone_index(primary.index)
    if tombstones.size:
        progress("remove", 0, int(tombstones.size))
        sel, keep = batch_selector(tombstones)
        index.remove_ids(sel)
        del keep
        progress("remove", int(tombstones.size), int(tombstones.size))
    # a delta of a few thousand rows is added (and its lists assigned) for half the CPU on one
    # thread: the hand-off between threads costs more than it saves
    with one_thread(delta_ids.size <= SERIAL_MERGE_MAX):
        add_chunked(index, delta_ids, delta_vectors, progress, "add")
    ids, vectors = _merged_store(primary, tombstones, delta_ids, delta_vectors, raw_dir, chunk)
    plan = replace(primary.plan, ntotal=int(ids.size))
    return Primary(index=index, ids=ids, vectors=vectors, plan=plan)


def _merged_store(
    primary: Primary,
    tombstones: I64,
    delta_ids: I64,
    delta_vectors: F32,
    raw_dir: str | None,
    chunk: int,
) -> tuple[I64, F32]:
    """The kept primary rows and the delta rows, sorted by id, in a new raw store.

    The kept rows are already in id order: each delta row is slotted in where it sorts (after
    an equal kept id, as a stable sort of kept + delta would), so each chunk is one gather of
    primary rows plus the few delta rows, not a sort and two masked copies of every row.
    """
    kept = np.flatnonzero(~in_sorted(tombstones, primary.ids))
    kept_ids = primary.ids[kept]
    d_order = np.argsort(delta_ids, kind="stable")
    d_ids = np.ascontiguousarray(delta_ids[d_order], dtype=np.int64)
    d_vecs = delta_vectors[d_order]
    total = int(kept.size + d_ids.size)
    d_pos = np.searchsorted(kept_ids, d_ids, side="right") + np.arange(d_ids.size)
    from_delta = np.zeros(total, dtype=bool)
    from_delta[d_pos] = True
    src = np.zeros(total, dtype=np.intp)  # the primary row of each kept slot (0 on delta slots)
    src[~from_delta] = kept
    ids = np.empty(total, dtype=np.int64)
    ids[~from_delta] = kept_ids
    ids[d_pos] = d_ids
    store = RawStore(primary.plan.dim, raw_dir)
    for start, stop in _chunks(total, chunk):
        if kept.size:
            rows = np.take(primary.vectors, src[start:stop], axis=0)
        else:  # every primary row dropped (the store may be empty): delta rows alone
            rows = np.empty((stop - start, primary.plan.dim), dtype=np.float32)
        lo, hi = np.searchsorted(d_pos, [start, stop])
        rows[d_pos[lo:hi] - start] = d_vecs[lo:hi]
        store.write(rows)
    return ids, store.finish()
