"""One client process of the sustained-load test: searches, checks each reply, prints a summary.

Run as `python rpc_load_client.py URL INDEX SEED COUNT`; prints one JSON line: searches made,
replies whose scores do not belong to their query, and errors by type.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from faissq import SearchClient
from faissq.errors import FaissqError

DIM = 16
TABLE_SEED = 99
TABLE_ROWS = 20_000
K = 10


def table() -> np.ndarray:
    """The vector of every id the test ever writes, unit length: id i is row i."""
    v = np.random.default_rng(TABLE_SEED).standard_normal((TABLE_ROWS, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def foreign(query: np.ndarray, scores: np.ndarray, ids: np.ndarray, unit: np.ndarray) -> bool:
    """Whether a reply's scores are not this query's cosine scores of the ids it names."""
    q = query / np.linalg.norm(query)
    found = ids >= 0
    if not found.any():
        return False
    want = unit[ids[found]] @ q
    return not np.allclose(scores[found], want, atol=1e-4)


def run(url: str, index: str, seed: int, count: int) -> dict[str, Any]:
    """Search `count` random queries one by one; count foreign replies and errors."""
    unit = table()
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"searches": 0, "foreign": 0, "errors": {}}
    with SearchClient(url, index) as client:
        for _ in range(count):
            q = rng.standard_normal(DIM).astype(np.float32)
            try:
                got = client.search(q, K, timeout=10)
            except FaissqError as exc:
                name = type(exc).__name__
                out["errors"][name] = out["errors"].get(name, 0) + 1
                continue
            out["searches"] += 1
            out["foreign"] += int(foreign(q, got.scores[0], got.ids[0], unit))
    return out


if __name__ == "__main__":
    url, index, seed, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(run(url, index, seed, count)))
