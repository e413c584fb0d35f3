"""The delta under an IVF primary: rows keep their coarse list, a search scans the probed ones."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from faissq.config import IndexSettings
from faissq.index.delta import Delta
from faissq.index.engine import Engine

DIM = 16
NLIST = 8


def _exact(
    xq: np.ndarray, ids: np.ndarray, vecs: np.ndarray, k: int, metric: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over the given rows by FAISS's own exact search (ids mapped back)."""
    if ids.size == 0:
        pad = -np.inf if metric == faiss.METRIC_INNER_PRODUCT else np.inf
        return np.full((len(xq), k), pad, np.float32), np.full((len(xq), k), -1, np.int64)
    s, r = faiss.knn(xq, vecs, k, metric=metric)
    return s, np.where(r >= 0, ids[np.maximum(r, 0)], -1)


@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2])
@pytest.mark.parametrize("nq", [1, 3])
def test_a_probed_search_is_exact_over_the_rows_of_the_probed_lists(metric: int, nq: int) -> None:
    """Churned rows with lists: each query's answer equals an exact search over the live rows
    in the lists it probes, plus the rows without a list (over every live row when those are
    most of them: a whole scan then costs less), whether it came alone or in a batch; None when
    no query has such a row."""
    rng = np.random.default_rng(7)
    delta = Delta(DIM)
    model: dict[int, tuple[np.ndarray, int]] = {}
    for step in range(40):
        ids = rng.choice(300, size=int(rng.integers(1, 20)), replace=False).astype(np.int64)
        vecs = rng.standard_normal((ids.size, DIM), dtype=np.float32)
        listed = step % 7 != 3  # some batches come without lists (no IVF primary then)
        lists = rng.integers(0, NLIST, ids.size) if listed else None
        delta = delta.without(ids).appended(ids, vecs, lists, 1 if listed else None)
        for i, v, lst in zip(ids, vecs, lists if listed else [-1] * ids.size, strict=True):
            model[int(i)] = (v, int(lst))
        gone = rng.choice(300, size=5, replace=False).astype(np.int64)
        delta = delta.without(gone)
        for g in gone:
            model.pop(int(g), None)
        xq = rng.standard_normal((nq, DIM), dtype=np.float32)
        probed = np.stack([rng.choice(NLIST, 2, replace=False) for _ in range(nq)]).astype(np.int64)
        got = delta.search_probed(xq, 5, metric, probed, NLIST)
        wants = []
        for q in range(nq):
            seen = set(probed[q].tolist()) | {-1}
            keep = sorted(i for i, (_, lst) in model.items() if lst in seen)
            if keep and 2 * len(keep) >= len(model):
                keep = sorted(model)
            rows = np.array(keep, dtype=np.int64)
            vecs_q = np.stack([model[i][0] for i in keep]) if keep else np.empty((0, DIM))
            wants.append((keep, _exact(xq[q : q + 1], rows, vecs_q.astype(np.float32), 5, metric)))
        if all(not keep for keep, _ in wants):
            assert got is None
            continue
        assert got is not None
        for q, (keep, (want_s, want_i)) in enumerate(wants):
            got_s, got_i = got[0][q : q + 1], got[1][q : q + 1]
            np.testing.assert_array_equal(got_i < 0, want_i < 0)
            np.testing.assert_allclose(got_s[got_i >= 0], want_s[want_i >= 0], rtol=1e-4, atol=1e-4)
            assert set(got_i[got_i >= 0].tolist()) <= set(keep)


def test_rows_placed_by_another_quantizer_are_scanned_by_every_search() -> None:
    """Lists from another primary say nothing about where this one probes: those rows lose
    them (every search scans them), and the new rows carry the new primary's."""
    rng = np.random.default_rng(1)
    old = Delta(DIM).appended(np.arange(4), rng.standard_normal((4, DIM), dtype=np.float32),
                              np.array([0, 1, 2, 3]), coarse=1)  # fmt: skip
    new = old.appended(np.arange(4, 6), rng.standard_normal((2, DIM), dtype=np.float32),
                       np.array([5, 5]), coarse=2)  # fmt: skip
    assert new.coarse == 2
    got = new.search_probed(np.ones((1, DIM), np.float32), 10, faiss.METRIC_L2,
                            np.array([[5]]), NLIST)  # fmt: skip
    assert got is not None
    assert sorted(got[1][got[1] >= 0].tolist()) == [0, 1, 2, 3, 4, 5]
    # the older delta still reads its own rows under the first quantizer's lists
    first = old.search_probed(np.ones((1, DIM), np.float32), 10, faiss.METRIC_L2,
                              np.array([[2]]), NLIST)  # fmt: skip
    assert first is not None
    assert first[1][first[1] >= 0].tolist() == [2]


def test_a_quantizer_short_of_lists_probes_nothing_more() -> None:
    """A probe of -1 (a quantizer that found fewer lists than asked) selects no rows."""
    delta = Delta(DIM).appended(np.arange(3), np.eye(3, DIM, dtype=np.float32),
                                np.array([0, 1, 2]), coarse=1)  # fmt: skip
    got = delta.search_probed(np.ones((1, DIM), np.float32), 2, faiss.METRIC_INNER_PRODUCT,
                              np.array([[1, -1]]), NLIST)  # fmt: skip
    assert got is not None
    assert got[1].tolist() == [[1, -1]]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_an_ivf_engine_answers_as_its_merged_index_would(metric: str) -> None:
    """Upserted rows are found exactly where the merged IVF would find them: the answer of
    primary + probed delta equals the answer after a merge, at the same nprobe."""
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((20, DIM)).astype(np.float32) * 4
    x = (centers[rng.integers(0, 20, 4000)] + rng.standard_normal((4000, DIM))).astype(np.float32)
    eng = Engine(DIM, IndexSettings(metric=metric, merge_delta_max=10**6), "p")
    eng.build(x, np.arange(4000), family="ivf_flat")
    assert eng.state.primary is not None and eng.state.primary.coarse is not None
    ids = rng.choice(4000, 300, replace=False).astype(np.int64)
    new = (centers[rng.integers(0, 20, 300)] + rng.standard_normal((300, DIM))).astype(np.float32)
    eng.upsert(ids, new)
    assert eng.state.delta.coarse == eng.state.primary.serial
    xq = np.concatenate([new[:20], x[:20]])
    before = [eng.search(xq[i : i + 1], 10, nprobe=3) for i in range(len(xq))]
    own = eng.search(new[:20], 1, nprobe=1)
    eng.merge()
    after = [eng.search(xq[i : i + 1], 10, nprobe=3) for i in range(len(xq))]
    for b, a in zip(before, after, strict=True):
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(own.ids[:, 0], ids[:20])  # a row is found by itself


def test_a_delta_under_a_primary_without_lists_is_scanned_whole() -> None:
    """An HNSW primary places no rows: the delta has no lists and every row is searched."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, DIM)).astype(np.float32)
    eng = Engine(DIM, IndexSettings(metric="l2"), "h")
    eng.build(x, np.arange(500), family="hnsw")
    assert eng.state.primary is not None and eng.state.primary.coarse is None
    far = np.full((1, DIM), 50.0, np.float32)
    eng.upsert(np.array([900]), far)
    assert eng.state.delta.coarse is None
    assert eng.search(far, 1).ids[0, 0] == 900
