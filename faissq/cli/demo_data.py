"""Seeded synthetic embeddings for the demo, tests and benchmarks (clustered, not too easy)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def clustered(
    n: int,
    dim: int,
    *,
    clusters: int | None = None,
    spread: float = 1.0,
    seed: int = 0,
) -> npt.NDArray[np.float32]:
    """n vectors around `clusters` random centres; spread is the in-cluster std over the centres'.

    Real embeddings form overlapping topical clusters: with spread near 1 a cluster's members are
    about as far from each other as from the neighbouring centres, which keeps IVF honest.
    """
    rng = np.random.default_rng(seed)
    k = clusters or max(8, int(np.sqrt(n)))
    centres = rng.standard_normal((k, dim), dtype=np.float32)
    # uneven cluster sizes, as in real corpora
    weights = rng.gamma(2.0, size=k)
    labels = rng.choice(k, size=n, p=weights / weights.sum())
    out = rng.standard_normal((n, dim), dtype=np.float32)
    out *= np.float32(spread)
    out += centres[labels]
    return out


def queries_like(
    n: int, dim: int, *, clusters: int, spread: float = 1.0, seed: int = 0, nq: int = 1000
) -> npt.NDArray[np.float32]:
    """Held-out queries from the same distribution as clustered(n, dim, ...) (not stored)."""
    rng = np.random.default_rng(seed)
    # same draws, in the same order, as clustered(): centres, then cluster weights
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    weights = rng.gamma(2.0, size=clusters)
    q_rng = np.random.default_rng(seed + 10_007)
    labels = q_rng.choice(clusters, size=nq, p=weights / weights.sum())
    out = q_rng.standard_normal((nq, dim), dtype=np.float32) * np.float32(spread)
    return out + centres[labels]


def queries_between(
    n: int,
    dim: int,
    *,
    clusters: int,
    spread: float = 1.0,
    seed: int = 0,
    nq: int = 1000,
    query_seed: int = 7,
) -> npt.NDArray[np.float32]:
    """Unseen queries halfway between two of clustered(n, dim, ...)'s centres, as real queries
    often fall between topics: autotune's synthetic queries (stored vectors moved off their
    point) make such traffic look easier than it is."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)  # clustered()'s first draw
    q_rng = np.random.default_rng(query_seed)
    a, b = q_rng.integers(0, clusters, nq), q_rng.integers(0, clusters, nq)
    noise = q_rng.standard_normal((nq, dim), dtype=np.float32) * np.float32(spread)
    return np.ascontiguousarray((centres[a] + centres[b]) / 2 + noise, dtype=np.float32)
