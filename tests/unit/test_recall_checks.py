"""Live recall's sampler, exact checks, the recall gate and IVF drift, on real FAISS engines."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pytest
from engine_support import exact, recall

from faissq.cli.demo_data import clustered, queries_between
from faissq.config import IndexSettings, RecallSettings, Settings
from faissq.errors import FaissqError, RecallRegression, error_for_code
from faissq.index import drift, recall_gate
from faissq.index.engine import Engine
from faissq.rpc.protocol import Request
from faissq.telemetry.metric_families import make_metrics
from faissq.telemetry.recall_metrics import update_recall_gauges
from faissq.worker.maintenance import Backlog, due
from faissq.worker.recall_live import IndexSampler

N, DIM, CLUSTERS = 6_000, 32, 80


@dataclass
class Out:
    """The part of an RPC outcome the sampler reads."""

    request: Request
    ids: np.ndarray
    version: int


@pytest.fixture(scope="module")
def ivf() -> tuple[Engine, np.ndarray]:
    """An IVF-Flat engine over clustered vectors (row numbers as ids) and its vectors."""
    xb = clustered(N, DIM, clusters=CLUSTERS, seed=1)
    eng = Engine(DIM, IndexSettings(family="ivf_flat"))
    eng.build(xb, np.arange(N))
    return eng, xb


def request(queries: np.ndarray, k: int = 10, **kw: Any) -> Request:
    """A decoded request as the RPC loop hands it on."""
    return Request(id="r", reply="x", deadline=0.0, k=k, queries=queries, **kw)


def served(eng: Engine, queries: np.ndarray, k: int = 10, **kw: Any) -> Out:
    """Search like the RPC loop does and return the outcome."""
    res = eng.search(queries, k, **kw)
    return Out(request(queries, k, **kw), res.ids, res.version)


def sampler(eng: Engine, **cfg: Any) -> IndexSampler:
    """A sampler of one engine (no thread: checks are called directly)."""
    s = IndexSampler("i", lambda: eng, RecallSettings(**cfg), threading.Event())
    s._rand.seed(5)
    return s


def test_the_sampled_fraction_matches_the_rate_and_the_ring_stays_bounded(ivf: Any) -> None:
    eng, xb = ivf
    s = sampler(eng, sample_rate=0.25, ring_size=100)
    for start in range(0, 4000, 40):  # requests of 40 rows: rows are sampled, not requests
        s.offer([served(eng, xb[start : start + 40], nprobe=2)])
    assert 850 <= s.sampled <= 1150  # binomial(4000, 0.25): 1000 +- 5 standard deviations
    assert len(s.queries()[1]) == 100  # only the newest ring_size are kept
    filtered = served(eng, xb[:50], deny_ids=np.array([1]))
    before = s.sampled
    s.offer([filtered])
    assert s.sampled == before  # filtered searches have another truth: never sampled
    page = served(eng, xb[:50], 10)
    s.offer(
        [
            Out(request(xb[:50], offset=10), page.ids, page.version),
            Out(request(xb[:50], k=0, kind="range", radius=0.5), page.ids, page.version),
            Out(request(xb[:50], filter={"field": "tenant", "eq": 7}), page.ids, page.version),
        ]
    )
    assert s.sampled == before  # later pages, range and attribute-filtered searches: not plain


def test_checks_equal_an_offline_exact_recall_per_setting(ivf: Any) -> None:
    eng, xb = ivf
    xq = queries_between(N, DIM, clusters=CLUSTERS, seed=1, nq=64)
    s = sampler(eng, sample_rate=1.0)
    s.offer([served(eng, xq[:32], nprobe=1), served(eng, xq[32:], 5, nprobe=8)])
    while s.check():
        pass
    params = s.summary()["params"]
    assert set(params) == {"k=10 nprobe=1", "k=5 nprobe=8"}
    truth = exact(xb, np.arange(N), xq, 10)
    low = recall(eng.search(xq[:32], 10, nprobe=1).ids, truth[:32])
    high = recall(eng.search(xq[32:], 5, nprobe=8).ids, truth[32:, :5])
    assert params["k=10 nprobe=1"]["recall"] == pytest.approx(low, abs=1e-4)
    assert params["k=5 nprobe=8"]["recall"] == pytest.approx(high, abs=1e-4)
    assert low < high and params["k=10 nprobe=1"]["samples"] == 32
    m = make_metrics()
    update_recall_gauges(m.recall, "i", s.summary())
    ix = {"index": "i", "shard": "", "parent": "i"}
    got = m.registry.get_sample_value("faissq_recall_live", {**ix, "param": "k=5 nprobe=8"})
    assert got == params["k=5 nprobe=8"]["recall"]
    assert m.registry.get_sample_value("faissq_recall_evaluated_total", ix) == 64


def test_a_sample_answered_by_an_older_state_is_searched_again_on_the_current_one() -> None:
    xb = clustered(2000, 16, seed=3)
    eng = Engine(16, IndexSettings(family="flat"))
    eng.build(xb[:1000], np.arange(1000))
    s = sampler(eng, sample_rate=1.0)
    s.offer([served(eng, xb[1000:1010], 5)])
    eng.upsert(np.arange(1000, 2000), xb[1000:])  # the true neighbours now include themselves
    s.check()
    assert s.summary()["params"]["k=5 exact"]["recall"] == 1.0  # flat: exact on the new state


@pytest.mark.parametrize(
    ("family", "label"),
    [("hnsw", "k=10 ef_search=64"), ("IVF16,PQ4", "k=10 nprobe=16 k_factor=4"),
     ("flat", "k=10 exact")],
)  # fmt: skip
def test_a_sample_is_labelled_with_the_parameters_its_family_reads(family: str, label: str) -> None:
    xb = clustered(1000, 16, seed=3)
    eng = Engine(16, IndexSettings(family=family, hnsw_m=8))
    eng.build(xb, np.arange(1000))
    s = sampler(eng, sample_rate=1.0)
    s.offer([served(eng, xb[:4])])
    s.check()
    assert list(s.summary()["params"]) == [label]


def test_a_build_of_another_dimension_drops_the_older_samples() -> None:
    eng = Engine(16, IndexSettings(family="flat"))
    eng.build(clustered(500, 16, seed=3), np.arange(500))
    s = sampler(eng, sample_rate=1.0)
    s.offer([served(eng, clustered(20, 16, seed=4), 5)])
    wider = Engine(24, IndexSettings(family="flat"))
    wider.build(clustered(500, 24, seed=3), np.arange(500))
    s.engine = lambda: wider
    assert s.check() == 0 and s.queries()[1].size == 0  # 16-d queries cannot be checked on 24-d
    s.offer([served(wider, clustered(8, 24, seed=4), 5)])
    assert s.queries()[0].shape == (8, 24) and s.check() == 8


def test_the_gate_refuses_a_lossy_candidate_and_passes_one_that_holds(ivf: Any) -> None:
    eng, xb = ivf
    xq = queries_between(N, DIM, clusters=CLUSTERS, seed=1, nq=300)
    bad = Engine(DIM, IndexSettings(family="IVF32,PQ2"))
    bad.build(xb, np.arange(N))
    bad.autotune(queries=xq, source="live")
    report = recall_gate.gate(eng, bad, xq, 10, target=0.95, margin=0.01)
    assert report["passed"] is False
    assert report["candidate"]["recall"] < report["serving"]["recall"] - 0.01
    good = Engine(DIM, IndexSettings(family="flat"))
    good.build(xb, np.arange(N))
    assert recall_gate.gate(eng, good, xq, 10, target=0.95, margin=0.01)["passed"] is True
    err = RecallRegression("refused", {"samples": 300})
    assert error_for_code("recall_regression") is RecallRegression
    assert err.report == {"samples": 300} and str(err) == "refused"
    assert isinstance(err, FaissqError)


def test_drift_advises_a_rebuild_only_for_vectors_from_elsewhere() -> None:
    xb = clustered(20_000, DIM, clusters=CLUSTERS, seed=1)
    eng = Engine(DIM, IndexSettings(family="ivf_flat", metric="l2"))
    eng.build(xb[:15_000], np.arange(15_000))
    s = sampler(eng, drift_ratio=1.25)
    s.note_added(xb[15_000:])
    s.check_drift()
    assert s.drift is not None and s.drift["ratio"] < 1.15 and not s.drift["advised"]
    m, ix = make_metrics(), {"index": "i", "shard": "", "parent": "i"}
    update_recall_gauges(m.recall, "i", s.summary())
    assert m.registry.get_sample_value("faissq_index_drift_ratio", ix) == s.drift["ratio"]
    assert m.registry.get_sample_value("faissq_index_rebuild_advised", ix) == 0.0
    other = clustered(5_000, DIM, clusters=CLUSTERS, seed=9)  # another corpus's clusters
    for start in range(0, 5_000, 100):
        s.note_added(other[start : start + 100])
    s.check_drift()
    assert s.drift["ratio"] > 1.25 and s.drift["advised"]
    update_recall_gauges(m.recall, "i", s.summary())
    assert m.registry.get_sample_value("faissq_index_drift_ratio", ix) == s.drift["ratio"]
    assert m.registry.get_sample_value("faissq_index_rebuild_advised", ix) == 1.0
    assert eng.state.primary is not None
    assert eng.state.primary.plan.centroid_dist == pytest.approx(s.drift["baseline"])
    settings = Settings(recall={"drift_rebuild": True})
    assert due({"merge_due": True}, Backlog(), settings, drifted=True) == ["rebuild"]
    assert due({"merge_due": True}, Backlog(), settings, drifted=False) == ["merge"]
    flat = Engine(DIM, IndexSettings(family="flat"))
    flat.build(xb[:100], np.arange(100))
    assert drift.centroids(flat.state.primary.index) is None  # not IVF: no drift figure


def test_drift_is_measured_in_the_rotated_space_of_an_opq_family() -> None:
    """OPQ rotates vectors before the inverted lists: drift applies the rotation first (none
    was measured under an IndexPreTransform)."""
    xb = clustered(7_000, DIM, clusters=CLUSTERS, seed=1)
    eng = Engine(DIM, IndexSettings(family="ivf_pq", metric="l2", opq=True))
    eng.build(xb[:6_000], np.arange(6_000))
    assert eng.state.primary is not None and eng.state.primary.plan.opq
    assert eng.state.primary.plan.centroid_dist > 0
    s = sampler(eng, drift_ratio=1.25)
    s.note_added(xb[6_000:])
    s.check_drift()
    assert s.drift is not None and 0.85 < s.drift["ratio"] < 1.15 and not s.drift["advised"]
    other = clustered(1_000, DIM, clusters=CLUSTERS, seed=9)  # another corpus's clusters
    for start in range(0, 1_000, 100):
        s.note_added(other[start : start + 100])
    s.check_drift()
    assert s.drift["ratio"] > 1.25 and s.drift["advised"]
    # under a refine too, vectors reach the centroids' space through the same rotation
    refined = faiss.index_factory(DIM, "OPQ8,IVF16,PQ8x4,RFlat")
    refined.train(xb[:2_000])
    x = xb[:5]
    inner = faiss.downcast_index(refined).base_index
    np.testing.assert_allclose(drift.coarse_space(refined, x), drift.coarse_space(inner, x))
    assert not np.allclose(drift.coarse_space(refined, x), x)
