"""Engine behaviour: ids, padding, upsert/delete/contains, filters, metrics, merge, rebuild."""

from __future__ import annotations

import numpy as np
import pytest
from engine_support import data, engine, exact, recall

from faissq.config import IndexSettings
from faissq.index.engine import Engine
from faissq.index.params import ivf_of


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_search_returns_caller_ids_and_exact_results(metric: str) -> None:
    eng, xb, ids = engine(500, family="flat", metric=metric)
    xq = data(20, seed=7)
    res = eng.search(xq, 10)
    assert res.ids.dtype == np.int64 and res.ids.shape == (20, 10)
    assert recall(res.ids, exact(xb, ids, xq, 10, metric)) == 1.0
    # scores sorted best first
    diffs = np.diff(res.scores, axis=1)
    assert (diffs <= 1e-6).all() if metric == "cosine" else (diffs >= -1e-4).all()


def test_empty_slots_are_minus_one() -> None:
    eng, _, ids = engine(5, family="flat")
    res = eng.search(data(3, seed=1), 8)
    assert (res.ids[:, 5:] == -1).all()
    assert set(res.ids[:, :5].ravel()) <= set(ids.tolist())


def test_upsert_replaces_and_delete_hides() -> None:
    eng, xb, ids = engine(300, family="flat")
    target = int(ids[10])
    new_vec = -xb[10:11]  # point the other way: must now be found by its negation
    eng.upsert([target], new_vec)
    assert eng.ntotal == 300
    hit = eng.search(new_vec, 1)
    assert int(hit.ids[0, 0]) == target and hit.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    old = eng.search(xb[10:11], 300).ids[0]
    assert (old == target).sum() == 1  # once, never twice
    assert eng.delete([target, 999_999_999]) == 1
    assert not eng.contains([target])[0]
    assert target not in eng.search(new_vec, 50).ids
    assert eng.ntotal == 299


def test_contains_is_vectorised_over_primary_delta_and_tombstones() -> None:
    eng, _xb, ids = engine(200, family="ivf_flat", flat_max=10)
    eng.upsert([5, 6], data(2, seed=3))
    eng.delete([ids[0], 6])
    got = eng.contains(np.array([ids[0], ids[1], 5, 6, 123456789]))
    assert got.tolist() == [False, True, True, False, False]


def test_caller_arrays_are_never_modified() -> None:
    xb = data(400)
    keep = xb.copy()
    ids = np.arange(400, dtype=np.int64)
    eng = Engine(32, IndexSettings(family="flat"))
    eng.build(xb, ids)
    xq = data(5, seed=2)
    q_keep = xq.copy()
    eng.search(xq, 3)
    eng.upsert(ids[:4], xq[:4])
    assert np.array_equal(xb, keep) and np.array_equal(xq, q_keep)
    assert np.array_equal(ids, np.arange(400))


def test_search_parameters_do_not_mutate_the_shared_index() -> None:
    eng, _, _ = engine(3000, family="ivf_flat")
    ivf = ivf_of(eng.state.primary.index)  # type: ignore[union-attr]
    before = ivf.nprobe
    eng.search(data(4, seed=1), 5, nprobe=before + 7)
    assert ivf.nprobe == before


def test_allow_and_deny_filters_apply_to_primary_and_delta() -> None:
    eng, xb, ids = engine(1000, family="ivf_flat")
    eng.upsert([1, 2, 3], data(3, seed=9))
    allow = np.array([ids[0], ids[1], 2])
    res = eng.search(xb[:5], 10, allow_ids=allow, nprobe=64)
    assert set(res.ids.ravel()) - {-1} <= set(allow.tolist())
    deny = np.array([ids[0], 2])
    res = eng.search(np.vstack([xb[:1], data(3, seed=9)[1:2]]), 10, deny_ids=deny, nprobe=64)
    assert not np.isin(res.ids, deny).any()


def test_dual_search_merges_primary_and_delta_by_score() -> None:
    eng, xb, ids = engine(2000, family="flat")
    extra = data(100, seed=11)
    extra_ids = np.arange(100, dtype=np.int64) + 10**9
    eng.upsert(extra_ids, extra)
    xq = data(30, seed=12)
    all_x = np.vstack([xb, extra])
    all_i = np.concatenate([ids, extra_ids])
    res = eng.search(xq, 10)
    assert recall(res.ids, exact(all_x, all_i, xq, 10)) == 1.0
    for row in res.ids:
        assert len(set(row.tolist())) == 10


def test_merge_reuses_quantizer_and_keeps_results() -> None:
    eng, _xb, ids = engine(6000, family="ivf_flat")
    quantizer = ivf_of(eng.state.primary.index).quantizer  # type: ignore[union-attr]
    centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
    eng.upsert(np.arange(50, dtype=np.int64), data(50, seed=5))
    eng.delete(ids[:100])
    xq = data(40, seed=6)
    # all lists probed: before, the delta is searched exhaustively, after it sits in lists
    before = eng.search(xq, 10, nprobe=4096)
    report = eng.merge()
    after = eng.search(xq, 10, nprobe=4096)
    assert report["op"] == "merge" and eng.stats()["delta"] == 0 and eng.stats()["tombstones"] == 0
    assert np.array_equal(before.ids, after.ids)
    merged = ivf_of(eng.state.primary.index)  # type: ignore[union-attr]
    assert np.array_equal(merged.quantizer.reconstruct_n(0, merged.quantizer.ntotal), centroids)
    assert merged.ntotal == eng.ntotal == 6000 - 100 + 50


def test_rebuild_retiers_when_the_corpus_crosses_a_threshold() -> None:
    eng, _, _ = engine(800, flat_max=1000)
    assert eng.stats()["family"] == "flat"
    eng.upsert(np.arange(10**6, 10**6 + 1500, dtype=np.int64), data(1500, seed=4))
    m = eng.maintenance()
    assert m["rebuild_due"] and "2300 vectors" in " ".join(m["reasons"])
    report = eng.rebuild()
    # past flat_max the rebuild calibrates (on a quarter of the corpus at most); its choice then
    # stands until the data grows
    assert report["calibration"]["sample"] == 2300 // 4 and eng.ntotal == 2300
    assert not eng.maintenance()["rebuild_due"]


def test_imbalance_is_exposed_for_ivf() -> None:
    eng, _, _ = engine(4000, family="ivf_flat")
    imb = eng.stats()["imbalance"]
    assert 1.0 <= imb < 10.0


def test_hnsw_merge_with_deletes_falls_back_to_rebuild() -> None:
    eng, xb, ids = engine(600, family="hnsw")
    eng.delete(ids[:10])
    report = eng.merge()
    assert report["op"] == "rebuild" and eng.ntotal == 590
    assert not np.isin(eng.search(xb[:10], 5).ids, ids[:10]).any()


def test_range_search_cosine_and_delta() -> None:
    eng, xb, ids = engine(500, family="flat")
    eng.upsert([7], xb[:1] * 2)
    scores, found = eng.range_search(xb[:2], 0.95)
    assert int(ids[0]) in found[0] and 7 in found[0]
    assert (scores[0] > 0.95).all() and np.all(np.diff(scores[0]) <= 1e-6)


def test_search_before_build_answers_from_delta_only() -> None:
    eng = Engine(16, IndexSettings())
    assert (eng.search(np.ones((1, 16)), 3).ids == -1).all()
    eng.upsert([1, 2], np.eye(16)[:2])
    assert eng.search(np.eye(16)[:1], 1).ids[0, 0] == 1
    eng.merge()
    assert eng.stats()["family"] == "flat" and eng.ntotal == 2


def test_export_roundtrip_preserves_results() -> None:
    eng, _, ids = engine(3000, family="ivf_flat")
    eng.upsert([1, 2], data(2, seed=8))
    eng.delete(ids[:5])
    xq = data(10, seed=3)
    again = Engine.from_export(eng.export(), eng.cfg)
    a, b = eng.search(xq, 10), again.search(xq, 10)
    assert np.array_equal(a.ids, b.ids)
    assert again.ntotal == eng.ntotal
