"""The delta under churn: deletes move no vectors, dead rows stay bounded, searches stay exact."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from faissq.index.delta import DEAD_FRACTION, Delta

DIM = 16


def _rows(rng: np.random.Generator, ids: np.ndarray) -> np.ndarray:
    return rng.standard_normal((ids.size, DIM), dtype=np.float32)


def _check_exact(
    delta: Delta, model: dict[int, np.ndarray], xq: np.ndarray, k: int, metric: int
) -> None:
    """The delta's top-k scores equal those over a plain dict of live rows, and each returned
    id is live with the score returned (ties may order differently)."""
    ids = np.array(sorted(model), dtype=np.int64)
    vecs = np.stack([model[i] for i in ids]) if ids.size else np.empty((0, DIM), np.float32)
    want_s, want_r = faiss.knn(xq, vecs, k, metric=metric)
    got_s, got_i = delta.search(xq, k, metric)
    np.testing.assert_array_equal(got_i < 0, want_r < 0)
    np.testing.assert_allclose(got_s[got_i >= 0], want_s[want_r >= 0], rtol=1e-4, atol=1e-4)
    for q, row in enumerate(got_i):
        for i, s in zip(row[row >= 0], got_s[q][row >= 0], strict=True):
            v = model[int(i)]
            exact = v @ xq[q] if metric == faiss.METRIC_INNER_PRODUCT else ((v - xq[q]) ** 2).sum()
            assert abs(exact - s) <= 1e-3 * max(1.0, abs(exact))


@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2])
def test_churned_delta_matches_a_plain_model(metric: int) -> None:
    """Random upserts and deletes: contents and exact top-k equal a dict of the live rows."""
    rng = np.random.default_rng(3)
    delta, model = Delta(DIM), {}
    # 25 queries: FAISS scans past 20 through BLAS, below through its own loop; both must skip
    # the dead rows
    xq = rng.standard_normal((25, DIM), dtype=np.float32)
    for step in range(300):
        ids = rng.choice(400, size=int(rng.integers(1, 40)), replace=False).astype(np.int64)
        if step % 3 == 2:
            delta = delta.without(ids)
            for i in ids:
                model.pop(int(i), None)
        else:
            vecs = _rows(rng, ids)
            delta = delta.without(ids).appended(ids, vecs)
            model.update({int(i): v for i, v in zip(ids, vecs, strict=True)})
        assert len(delta) == len(model)
        if step % 25 == 0:
            for k in (1, 10, 500):
                _check_exact(delta, model, xq[:7], k, metric)
                _check_exact(delta, model, xq, k, metric)
    assert sorted(delta.ids.tolist()) == sorted(model)
    rows = {int(i): v for i, v in zip(delta.ids, delta.vectors, strict=True)}
    for i, v in model.items():
        np.testing.assert_array_equal(rows[i], v)


def test_a_delete_moves_no_vectors_and_dead_rows_stay_bounded() -> None:
    """Deleting from a big delta marks rows dead in place; compaction is rare and bounded."""
    rng = np.random.default_rng(5)
    ids = np.arange(20_000, dtype=np.int64)
    delta = Delta(DIM).appended(ids, _rows(rng, ids))
    buffers = {id(delta._buf)}
    for _ in range(200):
        gone = rng.choice(20_000, size=50, replace=False).astype(np.int64)
        before = delta
        delta = delta.without(gone)
        if delta._buf is before._buf:
            # the rows are still where they were: nothing was copied
            assert delta.nbytes == before.nbytes
        buffers.add(id(delta._buf))
        assert delta.dead <= DEAD_FRACTION * (len(delta) + delta.dead)
    # 10,000 deleted rows out of 20,000: a few compactions, never one per delete
    assert len(buffers) <= 4


def test_upserts_of_the_same_ids_append_in_place_and_compact() -> None:
    """Replacing the same ids over and over keeps the rows held within the dead-row bound."""
    rng = np.random.default_rng(9)
    ids = np.arange(1_000, dtype=np.int64)
    delta = Delta(DIM)
    for _ in range(100):
        delta = delta.without(ids).appended(ids, _rows(rng, ids))
        assert len(delta) == 1_000
        assert delta.dead <= DEAD_FRACTION * (len(delta) + delta.dead) + ids.size
    np.testing.assert_array_equal(np.sort(delta.ids), ids)


def test_an_older_delta_keeps_its_rows_after_newer_changes() -> None:
    """A state a reader still holds answers as of its own version (states are immutable)."""
    rng = np.random.default_rng(1)
    ids = np.arange(100, dtype=np.int64)
    old = Delta(DIM).appended(ids, _rows(rng, ids))
    snapshot = old.vectors.copy()
    new = old.without(ids[:30]).appended(ids[:30], _rows(rng, ids[:30]))
    assert len(new) == 100
    np.testing.assert_array_equal(old.ids, ids)
    np.testing.assert_array_equal(old.vectors, snapshot)
    got = old.search(snapshot[:5], 1, faiss.METRIC_L2)[1][:, 0]
    np.testing.assert_array_equal(got, ids[:5])


def test_filters_see_live_rows_only() -> None:
    """Allow and deny lists apply to live rows; a deleted id never comes back through them."""
    rng = np.random.default_rng(2)
    ids = np.arange(50, dtype=np.int64)
    delta = Delta(DIM).appended(ids, _rows(rng, ids)).without(ids[:10])
    xq = rng.standard_normal((3, DIM), dtype=np.float32)
    got = delta.search(xq, 50, faiss.METRIC_L2, allow=ids[:20])[1]
    assert set(got[got >= 0].tolist()) == set(range(10, 20))
    got = delta.search(xq, 50, faiss.METRIC_L2, deny=ids[40:])[1]
    assert set(got[got >= 0].tolist()) == set(range(10, 40))


def test_a_one_query_scan_is_exact_and_leaves_the_thread_setting_as_it_was() -> None:
    """One query over 12,000 rows runs on one OpenMP thread, then the setting is restored."""
    rng = np.random.default_rng(4)
    ids = np.arange(12_000, dtype=np.int64)
    vecs = rng.standard_normal((ids.size, DIM), dtype=np.float32)
    delta = Delta(DIM).appended(ids, vecs)
    xq = rng.standard_normal((1, DIM), dtype=np.float32)
    before = faiss.omp_get_max_threads()
    got_s, got_i = delta.search(xq, 5, faiss.METRIC_L2)
    assert faiss.omp_get_max_threads() == before
    want_s, want_i = faiss.knn(xq, vecs, 5, metric=faiss.METRIC_L2)
    np.testing.assert_array_equal(got_i, ids[want_i])
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5)
