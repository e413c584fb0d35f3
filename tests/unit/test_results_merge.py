"""merge_topk against a plain model: best score per id, ordered, -1 padded, for both metrics."""

from __future__ import annotations

import numpy as np
import pytest

from faissq.index.results import merge_topk, worst


def _model(parts: list[tuple[np.ndarray, np.ndarray]], k: int, hib: bool) -> list[list[int]]:
    """Per row: ids by best score (first part, then position, on ties), each id once."""
    out = []
    for q in range(parts[0][0].shape[0]):
        best: dict[int, tuple[float, int]] = {}
        order = 0
        for scores, ids in parts:
            for s, i in zip(scores[q], ids[q], strict=True):
                key = -float(s) if hib else float(s)
                if i >= 0 and (int(i) not in best or key < best[int(i)][0]):
                    best[int(i)] = (key, order)
                order += 1
        ranked = sorted(best, key=lambda i: best[i])
        out.append((ranked + [-1] * k)[:k])
    return out


def _part(rng: np.random.Generator, nq: int, k: int, hib: bool, id_range: int) -> tuple:
    """A FAISS-like result: sorted scores, some rows padded with -1 and the worst score."""
    scores = rng.integers(0, 20, size=(nq, k)).astype(np.float32)  # ties on purpose
    scores = -np.sort(-scores, axis=1) if hib else np.sort(scores, axis=1)
    ids = np.stack([rng.choice(id_range, size=k, replace=False) for _ in range(nq)])
    pad = rng.integers(0, k + 1, size=nq)
    for q in range(nq):
        ids[q, k - pad[q] :] = -1
        scores[q, k - pad[q] :] = worst(hib)
    return scores, ids.astype(np.int64)


@pytest.mark.parametrize("hib", [True, False])
def test_merge_matches_a_model_with_repeats_and_padding(hib: bool) -> None:
    """Disjoint and overlapping id sets, padded rows: ids and scores equal the model's."""
    rng = np.random.default_rng(5)
    for trial in range(200):
        nq, k = int(rng.integers(1, 5)), int(rng.integers(1, 12))
        id_range = 2 * k + 4 if trial % 2 else 10_000  # small range: repeats across the parts
        parts = [_part(rng, nq, k, hib, id_range) for _ in range(2)]
        scores, ids = merge_topk(parts, k, hib)
        assert ids.tolist() == _model(parts, k, hib)
        lookup = [{} for _ in range(nq)]
        for s_part, i_part in parts:
            for q in range(nq):
                for s, i in zip(s_part[q], i_part[q], strict=True):
                    if i >= 0:
                        old = lookup[q].get(int(i))
                        better = old is None or (s > old if hib else s < old)
                        lookup[q][int(i)] = s if better else old
        for q in range(nq):
            for s, i in zip(scores[q], ids[q], strict=True):
                assert s == (lookup[q][int(i)] if i >= 0 else worst(hib))
