"""Shared data and helpers for the engine's unit tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from faissq.cli.demo_data import clustered, queries_like
from faissq.config import IndexSettings
from faissq.index.engine import Engine


def data(n: int, dim: int = 32, *, spread: float = 1.0, seed: int = 0) -> np.ndarray:
    """Clustered float32 vectors."""
    return clustered(n, dim, clusters=max(8, int(np.sqrt(n))), spread=spread, seed=seed)


def engine(
    n: int, dim: int = 32, *, family: str = "auto", metric: str = "cosine", **cfg: Any
) -> tuple[Engine, np.ndarray, np.ndarray]:
    """A built engine over n clustered vectors with ids 1000.. (not row numbers)."""
    xb = data(n, dim)
    ids = np.arange(n, dtype=np.int64) * 3 + 1000
    eng = Engine(dim, IndexSettings(family=family, metric=metric, **cfg))  # type: ignore[arg-type]
    eng.build(xb, ids)
    return eng, xb, ids


def exact(
    xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, k: int, metric: str = "cosine"
) -> np.ndarray:
    """Exact top-k ids by brute force in numpy (independent of FAISS)."""
    if metric == "cosine":
        xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
        scores = -(xq @ xb.T)
    else:
        scores = (xq * xq).sum(1)[:, None] + (xb * xb).sum(1)[None, :] - 2 * xq @ xb.T
    return ids[np.argsort(scores, axis=1, kind="stable")[:, :k]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall@k of found against truth rows."""
    k = truth.shape[1]
    return float(
        np.mean([np.intersect1d(f, t).size / k for f, t in zip(found, truth, strict=True)])
    )


__all__ = ["clustered", "data", "engine", "exact", "queries_like", "recall"]
