"""Recall on seeded clustered data that is not trivially easy, before and after autotune."""

from __future__ import annotations

import numpy as np
import pytest
from engine_support import exact, recall

from faissq.cli.demo_data import clustered, queries_like
from faissq.config import IndexSettings
from faissq.index.engine import Engine

N, DIM, CLUSTERS, SPREAD = 20_000, 64, 141, 1.4


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stored vectors, their ids, held-out queries (never stored) and exact top-10."""
    xb = clustered(N, DIM, clusters=CLUSTERS, spread=SPREAD, seed=1)
    ids = np.arange(N, dtype=np.int64) * 7 + 11
    xq = queries_like(N, DIM, clusters=CLUSTERS, spread=SPREAD, seed=1, nq=400)
    return xb, ids, xq, exact(xb, ids, xq, 10)


def test_ivf_flat_at_nprobe_8_is_not_trivially_easy(corpus: tuple[np.ndarray, ...]) -> None:
    xb, ids, xq, truth = corpus
    eng = Engine(DIM, IndexSettings(family="ivf_flat"))
    eng.build(xb, ids)
    got = recall(eng.search(xq, 10, nprobe=8).ids, truth)
    assert 0.8 <= got <= 0.93, got


@pytest.mark.parametrize("family", ["ivf_flat", "hnsw"])
def test_autotune_meets_target_on_held_out_queries(
    corpus: tuple[np.ndarray, ...], family: str
) -> None:
    xb, ids, xq, truth = corpus
    eng = Engine(DIM, IndexSettings(family=family, hnsw_m=16))
    eng.build(xb, ids)
    profile = eng.autotune(target_recall=0.95)
    assert profile["met"] and profile["chosen"]["recall_lo"] >= 0.95
    assert len(profile["table"]) >= 2 and profile["held_out"]
    # default searches now use the chosen setting; measured on queries never stored
    assert recall(eng.search(xq, 10).ids, truth) >= 0.95


def test_target_recall_per_request_maps_through_the_calibration_table(
    corpus: tuple[np.ndarray, ...],
) -> None:
    xb, ids, xq, truth = corpus
    eng = Engine(DIM, IndexSettings(family="ivf_flat"))
    eng.build(xb, ids)
    eng.autotune(target_recall=0.99)
    low = recall(eng.search(xq, 10, target_recall=0.6).ids, truth)
    high = recall(eng.search(xq, 10, target_recall=0.95).ids, truth)
    assert low < high and high >= 0.95


def test_autotune_counts_the_delta_in_the_same_id_space(corpus: tuple[np.ndarray, ...]) -> None:
    xb, ids, _, _ = corpus
    eng = Engine(DIM, IndexSettings(family="ivf_flat"))
    eng.build(xb[:15_000], ids[:15_000])
    eng.upsert(ids[15_000:], xb[15_000:])
    profile = eng.autotune(target_recall=0.9, num_queries=300)
    assert profile["ntotal"] == N and profile["met"]


def test_ivf_pq_refine_recovers_recall_from_raw_vectors() -> None:
    n, dim = 8_000, 32
    xb = clustered(n, dim, clusters=89, spread=1.2, seed=3)
    xq = queries_like(n, dim, clusters=89, spread=1.2, seed=3, nq=200)
    ids = np.arange(n, dtype=np.int64)
    truth = exact(xb, ids, xq, 10)
    eng = Engine(dim, IndexSettings(family="ivf_pq_refine", pq_bytes=4, opq=False))
    eng.build(xb, ids)
    coarse = recall(eng.search(xq, 10, nprobe=32, k_factor=1).ids, truth)
    refined = recall(eng.search(xq, 10, nprobe=32, k_factor=8).ids, truth)
    assert refined > coarse + 0.1, (coarse, refined)
    res = eng.search(xq, 10, nprobe=32, k_factor=8)
    xn = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    qn = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    exact_top = np.einsum("qd,qkd->qk", qn, xn[res.ids])
    assert np.allclose(res.scores, exact_top, atol=1e-5)  # refined scores are exact


def test_autotune_calibrates_past_its_target_for_higher_request_targets(
    corpus: tuple[np.ndarray, ...],
) -> None:
    xb, ids, xq, truth = corpus
    eng = Engine(DIM, IndexSettings(family="hnsw", hnsw_m=16))
    eng.build(xb, ids)
    profile = eng.autotune(target_recall=0.9)
    res = eng.search(xq, 10, target_recall=0.99)
    assert recall(res.ids, truth) >= 0.98
    assert profile["max_recall_lo"] >= 0.99  # the curve goes on past the target it was given
    assert res.target_met is True
    assert eng.search(xq, 10, target_recall=0.9).target_met is True
    assert eng.search(xq, 10).target_met is None  # no target asked: no flag


def test_a_target_above_the_reachable_maximum_is_flagged_not_met() -> None:
    n, dim = 8_000, 32
    xb = clustered(n, dim, clusters=89, spread=1.2, seed=3)
    eng = Engine(dim, IndexSettings(family="ivf_pq", pq_bytes=2, opq=False))
    eng.build(xb, np.arange(n))
    profile = eng.autotune(target_recall=0.999, num_queries=200)
    assert not profile["met"] and profile["max_recall_lo"] < 0.999
    best = max(r["recall"] for r in profile["table"])
    assert profile["chosen"]["recall"] == best
    res = eng.search(xb[:5], 10, target_recall=0.999)
    assert res.target_met is False and res.ids.shape == (5, 10)
