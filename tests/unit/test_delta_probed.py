"""The delta under an IVF primary: rows keep their coarse list, a search scans the probed ones.

An IVF-Flat primary changes its lists in place instead (live.py, tests/unit/test_live_lists.py):
the tests of the delta's own search turn that off (live_lists=False).
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from faissq.config import IndexSettings
from faissq.index.delta import PROBED_MAX_BYTES, Delta
from faissq.index.engine import Engine
from faissq.index.reader import post_filtered

DIM = 16
NLIST = 8


class _Primary:
    """What a probed delta search reads of a primary: its IndexIVF and quantizer (a real FAISS
    quantizer with NLIST centroids far apart, one per axis)."""

    def __init__(self, dim: int, metric: int) -> None:
        self.quantizer = faiss.IndexFlat(dim, metric)
        self.quantizer.add(np.eye(NLIST, dim, dtype=np.float32) * 10)
        self.coarse = faiss.IndexIVFFlat(self.quantizer, dim, NLIST, metric)

    def lists_of(self, vectors: np.ndarray) -> np.ndarray:
        return np.asarray(self.quantizer.assign(vectors, 1), dtype=np.int64).reshape(-1)

    def probed(self, xq: np.ndarray, nprobe: int) -> np.ndarray:
        return np.asarray(self.quantizer.search(xq, nprobe)[1])

    @staticmethod
    def params(nprobe: int) -> faiss.SearchParametersIVF:
        out = faiss.SearchParametersIVF()
        out.nprobe = nprobe
        return out


def _exact(
    xq: np.ndarray, ids: np.ndarray, vecs: np.ndarray, k: int, metric: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over the given rows by FAISS's own exact search (ids mapped back)."""
    if ids.size == 0:
        pad = -np.inf if metric == faiss.METRIC_INNER_PRODUCT else np.inf
        return np.full((len(xq), k), pad, np.float32), np.full((len(xq), k), -1, np.int64)
    s, r = faiss.knn(xq, vecs, k, metric=metric)
    return s, np.where(r >= 0, ids[np.maximum(r, 0)], -1)


def _vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """Rows near random centroids of _Primary, so every list gets some."""
    near = np.eye(NLIST, dim, dtype=np.float32)[rng.integers(0, NLIST, n)] * 10
    return (near + 3 * rng.standard_normal((n, dim))).astype(np.float32)


@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2])
@pytest.mark.parametrize("nq", [1, 3])
def test_a_probed_search_is_exact_over_the_rows_of_the_probed_lists(metric: int, nq: int) -> None:
    """Churned rows placed by the primary's quantizer: each query's answer equals an exact
    search over the live rows in the lists the primary probes for it, whether it came alone or
    in a batch; None when no query has such a row. Once some live row has no list (a batch
    upserted under no quantizer), the whole delta is scanned."""
    rng = np.random.default_rng(7)
    primary = _Primary(DIM, metric)
    delta = Delta(DIM)
    model: dict[int, tuple[np.ndarray, int]] = {}
    for step in range(40):
        ids = rng.choice(300, size=int(rng.integers(1, 20)), replace=False).astype(np.int64)
        vecs = _vectors(rng, ids.size)
        listed = step % 7 != 3 or step > 30  # some batches come without lists
        lists = primary.lists_of(vecs) if listed else None
        delta = delta.without(ids).appended(ids, vecs, lists, 1 if listed else None)
        for i, v, lst in zip(ids, vecs, lists if listed else [-1] * ids.size, strict=True):
            model[int(i)] = (v, int(lst))
        gone = rng.choice(300, size=5, replace=False).astype(np.int64)
        delta = delta.without(gone)
        for g in gone:
            model.pop(int(g), None)
        xq = _vectors(rng, nq)
        probed = primary.probed(xq, 2)
        got = delta.search_probed(xq, 5, metric, primary, primary.params(2))
        whole = any(lst < 0 for _, lst in model.values())
        wants = []
        for q in range(nq):
            seen = set(probed[q].tolist())
            keep = sorted(i for i, (_, lst) in model.items() if whole or lst in seen)
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
    them, and a delta holding such rows is scanned whole; the older delta still reads only
    its own rows in the lists its primary probes."""
    rng = np.random.default_rng(1)
    primary = _Primary(DIM, faiss.METRIC_L2)
    first = np.eye(4, DIM, dtype=np.float32) * 10  # one row per list 0..3
    old = Delta(DIM).appended(np.arange(4), first, primary.lists_of(first), coarse=1)
    second = _vectors(rng, 2)
    new = old.appended(np.arange(4, 6), second, primary.lists_of(second), coarse=2)
    assert new.coarse == 2
    query = first[2:3]
    got = new.search_probed(query, 10, faiss.METRIC_L2, primary, primary.params(1))
    assert got is not None
    assert sorted(got[1][got[1] >= 0].tolist()) == [0, 1, 2, 3, 4, 5]
    mine = old.search_probed(query, 10, faiss.METRIC_L2, primary, primary.params(1))
    assert mine is not None
    assert mine[1][mine[1] >= 0].tolist() == [2]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("live", [False, True])
def test_an_ivf_engine_answers_as_its_merged_index_would(metric: str, live: bool) -> None:
    """Upserted rows are found exactly where the merged IVF would find them: the answer of
    primary + probed delta (or of the lists changed in place) equals the answer after a merge,
    at the same nprobe."""
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((20, DIM)).astype(np.float32) * 4
    x = (centers[rng.integers(0, 20, 4000)] + rng.standard_normal((4000, DIM))).astype(np.float32)
    eng = Engine(DIM, IndexSettings(metric=metric, merge_delta_max=10**6, live_lists=live), "p")
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


def test_a_delta_past_the_probed_copy_cap_is_scanned_whole() -> None:
    """The probed scan copies the live rows once per Delta; past PROBED_MAX_BYTES of them the
    delta is scanned whole instead, so a row in a list the query does not probe is found."""
    dim = 4096
    rows = PROBED_MAX_BYTES // (8 + 4 * dim) + 1
    primary = _Primary(dim, faiss.METRIC_INNER_PRODUCT)
    vecs = np.zeros((rows, dim), np.float32)
    vecs[:, 0] = 0.001
    vecs[-1, 1] = 1.0
    in_list_0 = np.zeros(rows, np.int64)
    big = Delta(dim).appended(np.arange(rows), vecs, in_list_0, coarse=1)
    small = Delta(dim).appended(np.arange(2), vecs[-2:], in_list_0[:2], coarse=1)
    query = np.zeros((1, dim), np.float32)
    query[0, 1] = 1.0
    assert primary.probed(query, 1).tolist() == [[1]]  # list 1: where no row was placed
    params = primary.params(1)
    assert small.search_probed(query, 1, faiss.METRIC_INNER_PRODUCT, primary, params) is None
    got = big.search_probed(query, 1, faiss.METRIC_INNER_PRODUCT, primary, params)
    assert got is not None
    assert got[1].tolist() == [[rows - 1]]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("deleted", [30, 400])
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("live", [False, True])
def test_tombstones_dropped_after_faiss_answer_as_the_merged_index(
    metric: str, deleted: int, with_delta: bool, live: bool
) -> None:
    """Under an IVF primary few tombstones (30 of 4,000) are dropped from FAISS's answer with a
    few spare results, and a query whose nearest rows are all deleted is searched again with
    the selector; many (400: past 1 in 20) go to FAISS as a selector. Either way, alone or in
    a batch, with or without delta rows, the answer is the merged index's at the same nprobe
    and holds no deleted id; so it is when the deletes leave the lists at once (live)."""
    rng = np.random.default_rng(9)
    centers = rng.standard_normal((20, DIM)).astype(np.float32) * 4
    x = (centers[rng.integers(0, 20, 4000)] + rng.standard_normal((4000, DIM))).astype(np.float32)
    eng = Engine(DIM, IndexSettings(metric=metric, merge_delta_max=10**6, live_lists=live), "t")
    eng.build(x, np.arange(4000), family="ivf_flat")
    xq = np.concatenate([x[:12], centers[:4]]).astype(np.float32)
    near = eng.search(xq[:1], 20, nprobe=3).ids[0]  # more than FAISS's spare results
    gone = np.union1d(near, rng.choice(np.arange(20, 4000), deleted - near.size, replace=False))
    eng.delete(gone)
    if with_delta:
        new = centers[rng.integers(0, 20, 100)] + rng.standard_normal((100, DIM))
        eng.upsert(np.arange(5000, 5100), new.astype(np.float32))
    alone = [eng.search(xq[i : i + 1], 10, nprobe=3) for i in range(len(xq))]
    batch = eng.search(xq, 10, nprobe=3)
    assert not set(batch.ids.ravel().tolist()) & set(gone.tolist())
    eng.merge()  # the lists then hold exactly the live rows
    assert eng.state.tombstones.size == 0 and len(eng.state.delta) == 0
    after = eng.search(xq, 10, nprobe=3)
    np.testing.assert_allclose(batch.scores, after.scores, rtol=1e-4, atol=1e-4)
    for i, one in enumerate(alone):
        np.testing.assert_allclose(one.scores[0], after.scores[i], rtol=1e-4, atol=1e-4)


def test_a_search_probing_half_the_lists_scans_the_delta_whole() -> None:
    """Probing half the lists or more, a search scans every delta row (exact, as a range
    search does): a row placed in a list the query does not probe is found; below half it
    is found only where the merged index would find it."""
    rng = np.random.default_rng(4)
    centers = np.outer(np.arange(8), np.eye(1, DIM)).astype(np.float32) * 20  # on a line
    x = (centers[np.arange(1000) % 8] + rng.standard_normal((1000, DIM))).astype(np.float32)
    eng = Engine(DIM, IndexSettings(metric="l2", merge_delta_max=10**6, live_lists=False), "w")
    eng.build(x, np.arange(1000), family="ivf_flat")
    nlist = eng.state.primary.shape.nlist  # type: ignore[union-attr]
    far = centers[7:8] + 1  # in cluster 7, the farthest from the query at cluster 0
    eng.upsert(np.array([9000]), far)
    query = centers[:1]
    wide = eng.search(query, 1024, nprobe=(nlist + 1) // 2)
    assert 9000 in wide.ids[0].tolist()
    narrow = eng.search(query, 1024, nprobe=1)
    merged_narrow = set(narrow.ids[0].tolist())
    eng.merge()
    assert set(eng.search(query, 1024, nprobe=1).ids[0].tolist()) == merged_narrow
    assert 9000 not in merged_narrow


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_replaced_row_is_found_under_its_id_and_its_old_copy_is_not(metric: str) -> None:
    """Few replacements (tombstones dropped after FAISS, the delta searched in the probed
    lists): each new vector finds its own id first, the old vector is not returned under that
    id, and a batch answers as the merged index does."""
    rng = np.random.default_rng(12)
    centers = rng.standard_normal((20, DIM)).astype(np.float32) * 4
    x = (centers[rng.integers(0, 20, 4000)] + rng.standard_normal((4000, DIM))).astype(np.float32)
    eng = Engine(DIM, IndexSettings(metric=metric, merge_delta_max=10**6, live_lists=False), "r")
    eng.build(x, np.arange(4000), family="ivf_flat")
    ids = rng.choice(4000, 30, replace=False).astype(np.int64)
    new = (centers[rng.integers(0, 20, 30)] + rng.standard_normal((30, DIM))).astype(np.float32)
    eng.upsert(ids, new)
    st = eng.state
    assert st.primary is not None and st.primary.in_place and post_filtered(st)
    own = eng.search(new, 1, nprobe=2)
    np.testing.assert_array_equal(own.ids[:, 0], ids)
    old = eng.search(x[ids], 10, nprobe=2)  # each old vector would match itself exactly
    self_score = old.scores[old.ids == ids[:, None]]  # the id's score, where it is returned
    if metric == "l2":
        assert (self_score > 1e-3).all()  # the new row's distance, not the old copy's 0
    else:
        assert (self_score < 1 - 1e-3).all()
    batch = eng.search(np.concatenate([new, x[:20]]), 10, nprobe=2)
    eng.merge()
    after = eng.search(np.concatenate([new, x[:20]]), 10, nprobe=2)
    np.testing.assert_allclose(batch.scores, after.scores, rtol=1e-4, atol=1e-4)
    assert (batch.ids >= -1).all()


def test_a_search_of_few_live_rows_pads_with_minus_one() -> None:
    """When the probed lists of primary and delta hold fewer than k live rows, the answer is
    those rows then -1, with no deleted or repeated id."""
    rng = np.random.default_rng(13)
    centers = np.outer(np.arange(8), np.eye(1, DIM)).astype(np.float32) * 20
    x = (centers[np.arange(400) % 8] + rng.standard_normal((400, DIM))).astype(np.float32)
    eng = Engine(DIM, IndexSettings(metric="l2", merge_delta_max=10**6, live_lists=False), "k")
    eng.build(x, np.arange(400), family="ivf_flat")
    eng.delete(np.arange(0, 400, 40))  # 10 tombstones: dropped after FAISS
    new = (centers[:1] + rng.standard_normal((5, DIM))).astype(np.float32)
    eng.upsert(np.arange(1000, 1005), new)
    got = eng.search(centers[:1], 100, nprobe=1)  # one list: ~50 primary rows + 5 new ones
    live = got.ids[0][got.ids[0] != -1]
    assert set(range(1000, 1005)) <= set(live.tolist())
    assert (got.ids >= -1).all() and got.ids[0, -1] == -1
    assert not set(live.tolist()) & set(range(0, 400, 40))
    assert live.size == np.unique(live).size


def test_the_tombstone_set_holds_the_replaced_and_deleted_ids() -> None:
    """The set a search checks its few ids against (State.tomb_set) holds every id replaced
    or deleted since the primary was built, and a deleted row is not found."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2000, DIM)).astype(np.float32)
    eng = Engine(DIM, IndexSettings(metric="l2", merge_delta_max=10**6, live_lists=False), "w")
    eng.build(x, np.arange(2000), family="ivf_flat")
    eng.upsert(np.arange(10), rng.standard_normal((10, DIM)).astype(np.float32))
    assert eng.state.tomb_set == frozenset(range(10))
    eng.upsert(np.arange(30, 50), rng.standard_normal((20, DIM)).astype(np.float32))
    eng.delete(np.arange(10, 20))
    eng.delete(np.arange(30, 35))  # its delta rows go: a new delta
    st = eng.state
    assert st.tomb_set == frozenset([*range(20), *range(30, 50)])  # replaced or deleted
    got = eng.search(x[15:16], 1, nprobe=1)  # a deleted row is not found
    assert got.ids[0, 0] != 15
