"""Build-time calibration: what Flat, IVF-Flat and HNSW cost per query at the target recall.

A few seconds on a sample of the corpus measure each family's single-query latency at the
smallest setting that reaches the target recall@10 on held-out queries; the policy scales those
figures to the whole corpus (policy.estimate_ms) instead of guessing from a vector count.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from faissq.config import IndexSettings
from faissq.index.validate import F32, I64

K = 10
NUM_QUERIES = 200
TIMED_QUERIES = NUM_QUERIES  # single-query searches timed per family (median)
KMEANS_ITERATIONS = 10  # a rough quantizer is enough to find the probe fraction
EF_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class Calibration:
    """Per-query milliseconds of each family on a sample, at the setting meeting the target."""

    sample: int  # vectors in the sample
    target: float  # recall@10 asked for
    overhead_ms: float  # a search call over one vector: the part that does not grow with n
    flat_ms: float  # exact search over the sample
    ivf_nlist: int  # lists of the sample's IVF
    ivf_nprobe: int  # smallest nprobe meeting the target on the sample
    ivf_recall: float
    ivf_ms: float
    hnsw_ef: int  # smallest efSearch meeting the target (the largest tried when none did)
    hnsw_recall: float
    hnsw_ms: float
    seconds: float  # what the calibration itself took

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (kept in the plan, so snapshots and maintenance reuse it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Calibration | None:
        """Rebuild from to_dict() output; None when absent or from another layout."""
        if not data:
            return None
        try:
            return cls(**{f: data[f] for f in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None


def _held_out(sample: F32, rng: np.random.Generator, cosine: bool) -> F32:
    """Sample rows moved off their point by their nearest-neighbour distance (unseen queries)."""
    rows = rng.choice(sample.shape[0], size=min(NUM_QUERIES, sample.shape[0]), replace=False)
    base = np.ascontiguousarray(sample[rows])
    dist, _ = faiss.knn(base, sample, min(2, sample.shape[0]), metric=faiss.METRIC_L2)
    noise = rng.standard_normal(base.shape).astype(np.float32)
    step = np.sqrt(np.maximum(dist[:, -1], 0))
    noise *= (step / np.maximum(np.linalg.norm(noise, axis=1), 1e-12))[:, None]
    out = base + noise
    if cosine:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)


def _recall(found: I64, truth: I64) -> float:
    """Mean recall@K of found rows against exact rows."""
    hits = sum(np.intersect1d(f, t).size for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def _single_query_ms(indexes: list[Any], queries: F32) -> list[float]:
    """Median wall time of one-query searches per index, interleaved (the p50 a lone request sees).

    Interleaving spreads a busy host's noise over all of them alike. One OpenMP thread (this
    thread only): a single query runs on one thread anyway, and the barrier of a wider team
    costs a scheduler slice whenever the host is busy.
    """
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times: list[list[float]] = [[] for _ in indexes]
    try:
        for i in range(min(TIMED_QUERIES, queries.shape[0])):
            for j in range(len(indexes)):
                which = (i + j) % len(indexes)
                t0 = time.perf_counter()
                indexes[which].search(queries[i : i + 1], K)
                times[which].append(time.perf_counter() - t0)
    finally:
        faiss.omp_set_num_threads(threads)
    return [statistics.median(t) * 1000 for t in times]


def calibrate(sample: F32, cfg: IndexSettings, nlist: int, seed: int) -> Calibration:
    """Measure Flat, IVF-Flat (nlist lists) and HNSW on sample (normalised when cosine)."""
    t0 = time.perf_counter()
    n, dim = sample.shape
    cosine = cfg.metric == "cosine"
    metric = faiss.METRIC_INNER_PRODUCT if cosine else faiss.METRIC_L2
    rng = np.random.default_rng(seed)
    queries = _held_out(sample, rng, cosine)
    flat = faiss.IndexFlat(dim, metric)
    flat.add(sample)
    truth = flat.search(queries, K)[1]
    tiny = faiss.IndexFlat(dim, metric)
    tiny.add(sample[:1])

    quantizer = faiss.IndexFlat(dim, metric)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
    ivf.cp.niter = KMEANS_ITERATIONS
    ivf.cp.seed = seed
    ivf.train(sample)
    ivf.add(sample)
    probes = sorted({min(nlist, 1 << i) for i in range(int(math.log2(nlist)) + 2)})
    nprobe, ivf_recall = nlist, 1.0
    for p in probes:
        ivf.nprobe = p
        got = _recall(ivf.search(queries, K)[1], truth)
        if got >= cfg.target_recall:
            nprobe, ivf_recall = p, got
            break
    ivf.nprobe = nprobe

    hnsw = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, metric)
    hnsw.hnsw.efConstruction = cfg.ef_construction
    hnsw.add(sample)
    ef, hnsw_recall = EF_STEPS[-1], 0.0
    for e in EF_STEPS:
        hnsw.hnsw.efSearch = e
        got = _recall(hnsw.search(queries, K)[1], truth)
        ef, hnsw_recall = e, got
        if got >= cfg.target_recall:
            break
    hnsw.hnsw.efSearch = ef
    overhead_ms, flat_ms, ivf_ms, hnsw_ms = _single_query_ms([tiny, flat, ivf, hnsw], queries)
    return Calibration(
        sample=n,
        target=cfg.target_recall,
        overhead_ms=round(overhead_ms, 4),
        flat_ms=round(flat_ms, 4),
        ivf_nlist=nlist,
        ivf_nprobe=nprobe,
        ivf_recall=round(ivf_recall, 4),
        ivf_ms=round(ivf_ms, 4),
        hnsw_ef=ef,
        hnsw_recall=round(hnsw_recall, 4),
        hnsw_ms=round(hnsw_ms, 4),
        seconds=round(time.perf_counter() - t0, 3),
    )


def estimate_ms(cal: Calibration, family: str, n: int, nlist: int) -> float:
    """Per-query milliseconds of family over n vectors, scaled from the sample's figures.

    The call overhead stays; the rest scales with the distances computed. Flat scans
    everything: linear in n. IVF-Flat keeps the probed fraction of lists found on the sample
    (a conservative guess: finer lists usually need a smaller fraction) and pays nlist coarse
    distances. HNSW's cost at a fixed recall grows as about (n / sample)**0.5: more than its
    O(log n) hops, since the efSearch a recall needs grows too (on clustered data, 5k -> 100k
    vectors: x4.9 at recall 0.95; docs/benchmarks.md).
    """
    s = max(cal.sample, 2)
    o = min(cal.overhead_ms, cal.flat_ms, cal.ivf_ms, cal.hnsw_ms)
    if family == "flat":
        return o + (cal.flat_ms - o) * n / s
    if family == "ivf_flat":
        fraction = cal.ivf_nprobe / max(cal.ivf_nlist, 1)
        return o + (cal.ivf_ms - o) * (nlist + fraction * n) / (cal.ivf_nlist + fraction * s)
    if family == "hnsw":
        if cal.hnsw_recall < cal.target:
            return math.inf  # never reached the target, even on the sample
        return o + (cal.hnsw_ms - o) * math.sqrt(n / s)
    raise ValueError(f"no latency model for {family!r}")


def sample_calibrator(
    vectors: Any,
    cfg: IndexSettings,
    prepare: Callable[[Any], F32],
    progress: Callable[[str, int, int], None],
) -> Callable[[], Calibration | None]:
    """A thunk calibrating on a seeded sample of vectors (None when calibration is off)."""

    def run() -> Calibration | None:
        n = int(vectors.shape[0])
        # a quarter of a small corpus at most: three indexes over all of it would triple the
        # build's peak memory (5k x 384: 3.0x raw FAISS, 1.5x with a quarter)
        size = min(n // 4, cfg.calibration_sample)
        if size < 2 * K:
            return None
        rows = np.sort(np.random.default_rng(cfg.seed + 2).choice(n, size=size, replace=False))
        sample = np.ascontiguousarray(prepare(vectors[rows]))
        # the build's nlist rule (policy.nlist_for) at the sample's size
        target = round(cfg.nlist_factor * math.sqrt(size))
        nlist = max(1, min(target, size // cfg.min_points_per_centroid))
        progress("calibrate", 0, size)
        cal = calibrate(sample, cfg, nlist, cfg.seed)
        progress("calibrate", size, size)
        return cal

    return run
