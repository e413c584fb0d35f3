"""A search's result, merging result lists by score (primary + delta), exact rescoring."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from faissq.index.validate import F32, I64


@dataclass(frozen=True)
class SearchResult:
    """Top-k scores (nq, k) and ids (nq, k; -1 pads) and the state version that answered."""

    scores: F32
    ids: I64
    version: int
    target_met: bool | None = None  # target_recall given: whether the calibrated curve reaches it


WORST_IP = np.float32(-np.finfo(np.float32).max)  # FAISS's score for an empty slot under IP
WORST_L2 = np.float32(np.finfo(np.float32).max)  # and under L2


def worst(higher_is_better: bool) -> np.float32:
    """The score FAISS puts in an empty slot for this metric."""
    return WORST_IP if higher_is_better else WORST_L2


def merge_topk(parts: list[tuple[F32, I64]], k: int, higher_is_better: bool) -> tuple[F32, I64]:
    """Merge per-row candidate lists by score, keep the better score per id, pad with -1.

    Rows are gathered through flat indexes rather than take_along_axis: this runs on every
    search of an index with a delta, where numpy's per-call overhead is most of its cost.
    """
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    nq, width = ids.shape
    pad = worst(higher_is_better)
    key = -scores if higher_is_better else scores.copy()
    key[ids < 0] = np.inf
    if width > 1 and _has_repeats(ids):
        drop = _worse_repeats(ids, key)
        key[drop] = np.inf
        ids = np.where(drop, -1, ids)
    take = min(k, width)
    order = np.argsort(key, axis=1, kind="stable")[:, :take]
    flat = (order + (np.arange(nq) * width)[:, None]).ravel()
    out_ids = np.full((nq, k), -1, dtype=np.int64)
    out_scores = np.full((nq, k), pad, dtype=np.float32)
    out_ids[:, :take] = ids.ravel()[flat].reshape(nq, take)
    out_scores[:, :take] = scores.ravel()[flat].reshape(nq, take)
    out_scores[out_ids < 0] = pad
    return out_scores, out_ids


def _worse_repeats(ids: I64, key: F32) -> np.ndarray:
    """Mask of each (row, id) repeat but the best-keyed one (the first among equal keys)."""
    nq, width = ids.shape
    rows = np.repeat(np.arange(nq), width)
    flat_ids, flat_key = ids.ravel(), key.ravel()
    pos = np.tile(np.arange(width), nq)
    # sort by (row, id, key, position): a repeat of (row, id) after the first is a worse one
    srt = np.lexsort((pos, flat_key, flat_ids, rows))
    dup_sorted = np.zeros(flat_ids.size, dtype=bool)
    dup_sorted[1:] = (rows[srt][1:] == rows[srt][:-1]) & (flat_ids[srt][1:] == flat_ids[srt][:-1])
    dup = np.zeros(flat_ids.size, dtype=bool)
    dup[srt] = dup_sorted
    return dup.reshape(nq, width) & (ids >= 0)


def _has_repeats(ids: I64) -> bool:
    """Whether some row holds an id (not -1) twice: one sort, so the common case skips the
    de-duplication (primary and delta rarely share an id: an upsert tombstones the old copy)."""
    srt = np.sort(ids, axis=1)
    return bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any())


def exact_scores(queries: F32, vectors: F32, higher_is_better: bool) -> F32:
    """Exact score of each query row against its candidate rows: (nq, d) x (nq, c, d) -> (nq, c)."""
    if higher_is_better:
        out = np.einsum("qd,qcd->qc", queries, vectors)
    else:
        diff = vectors - queries[:, None, :]
        out = np.einsum("qcd,qcd->qc", diff, diff)
    return np.asarray(out, dtype=np.float32)
