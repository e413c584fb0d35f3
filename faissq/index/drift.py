"""IVF drift: how far new vectors land from the trained centroids, against training time.

An IVF index's centroids describe the corpus it was trained on. When new vectors come from
elsewhere (a new topic, a new embedding model), they land far from every centroid and crowd a
few lists: recall at a fixed nprobe falls and searches slow down. The ratio of the new vectors'
mean distance to their nearest centroid over the same figure for the vectors the index was
built with, together with the list imbalance, says when a rebuild (retraining) is advised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from faissq.index.params import ivf_of
from faissq.index.validate import F32

SAMPLE = 4_096  # vectors a baseline is measured on: a few thousand fix the mean to ~1%
BATCH = 256  # sample rows gathered and measured at a time (bounds the baseline's memory)


def centroids(index: Any) -> F32 | None:
    """The coarse centroids of an IVF index, in its own space (see coarse_space); None: not IVF."""
    ivf = ivf_of(index)
    if ivf is None:
        return None
    return np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, ivf.nlist), dtype=np.float32)


def coarse_space(index: Any, vectors: Any) -> F32:
    """vectors moved into the space of the IVF's centroids: through the transforms (an OPQ
    rotation, a PCA) the index applies before its inverted lists, under a refine or an id map."""
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    node = faiss.downcast_index(index)
    while not isinstance(node, faiss.IndexIVF):
        if isinstance(node, faiss.IndexPreTransform):
            for i in range(node.chain.size()):
                out = faiss.downcast_VectorTransform(node.chain.at(i)).apply(out)
            node = faiss.downcast_index(node.index)
        elif isinstance(node, faiss.IndexRefine):
            node = faiss.downcast_index(node.base_index)
        elif isinstance(node, faiss.IndexIDMap | faiss.IndexIDMap2):
            node = faiss.downcast_index(node.index)
        else:
            break
    return np.ascontiguousarray(out, dtype=np.float32)


def mean_distance(cents: F32, vectors: F32) -> float:
    """Mean L2 distance of vectors to their nearest centroid."""
    if vectors.shape[0] == 0:
        return 0.0
    dist, _ = faiss.knn(np.ascontiguousarray(vectors, dtype=np.float32), cents, 1,
                        metric=faiss.METRIC_L2)  # fmt: skip
    return float(np.sqrt(np.maximum(dist[:, 0], 0.0)).mean())


def baseline(
    index: Any, vectors: Any, seed: int, prepare: Callable[[Any], F32] | None = None
) -> float:
    """Mean centroid distance of a seeded sample of the build's vectors (0.0: not IVF).

    The sample is gathered and measured BATCH rows at a time: at the end of a build the index
    is at its largest, and a whole sample with its distance blocks would raise the build's peak
    memory by several times the sample's size. prepare: checks and normalises each batch.
    """
    cents = centroids(index)
    n = int(vectors.shape[0])
    if cents is None or n == 0:
        return 0.0
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, SAMPLE), replace=False))
    total = 0.0
    for start in range(0, rows.size, BATCH):
        part = vectors[rows[start : start + BATCH]]
        part = prepare(part) if prepare is not None else part
        total += mean_distance(cents, coarse_space(index, part)) * int(part.shape[0])
    return round(total / rows.size, 6)


def measure(primary: Any, added: F32, ratio_max: float, imbalance_max: float) -> dict[str, Any]:
    """Drift of added (already normalised under cosine) against primary's training baseline.

    `advised` is true when the ratio passes ratio_max or the list imbalance imbalance_max.
    """
    cents = centroids(primary.index)
    if cents is None:
        return {}
    base = float(primary.plan.centroid_dist) or baseline(primary.index, primary.vectors, 0)
    current = mean_distance(cents, coarse_space(primary.index, added))
    ratio = current / base if base > 0 and added.shape[0] else 1.0
    imb = primary.imbalance()
    return {
        "ratio": round(ratio, 4),
        "baseline": round(base, 6),
        "current": round(current, 6),
        "added": int(added.shape[0]),
        "imbalance": round(imb, 4),
        "advised": bool(ratio > ratio_max or imb > imbalance_max),
    }
