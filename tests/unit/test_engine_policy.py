"""Family choice, nlist rule, memory estimate accuracy and the memory budget."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from engine_support import data

from faissq.config import IndexSettings
from faissq.errors import MemoryBudgetExceeded, UnknownFamily
from faissq.index.engine import Engine
from faissq.index.memory import host_budget
from faissq.index.policy import choose_plan, nlist_for

BIG = 1 << 50


@pytest.mark.parametrize(
    ("n", "family"),
    [
        (10, "flat"),
        (4_999, "flat"),
        (5_000, "ivf_flat"),
        (49_999, "ivf_flat"),
        (50_000, "ivf_pq_refine"),
    ],
)
def test_auto_tiers_on_total_corpus_size(n: int, family: str) -> None:
    assert choose_plan(n, 128, IndexSettings(), BIG).family == family


def test_auto_without_refine_and_opq_when_dimension_allows() -> None:
    plan = choose_plan(1_000_000, 128, IndexSettings(refine=False), BIG)
    assert plan.family == "ivf_pq" and plan.opq and plan.factory.startswith("OPQ32,IVF")
    odd = choose_plan(1_000_000, 100, IndexSettings(pq_bytes=30), BIG)
    assert 100 % odd.pq_m == 0  # PQ sub-quantizers must divide the dimension


@pytest.mark.parametrize("n", [5_000, 20_000, 1_000_000, 10_000_000])
def test_nlist_never_exceeds_what_the_training_sample_supports(n: int) -> None:
    cfg = IndexSettings()
    nlist, train = nlist_for(n, cfg)
    assert train <= n and nlist * 39 <= train
    assert nlist <= round(4 * np.sqrt(n))


def test_small_pq_training_sample_lowers_nbits() -> None:
    plan = choose_plan(3_000, 32, IndexSettings(family="ivf_pq"), BIG)
    assert plan.pq_nbits < 8 and (1 << plan.pq_nbits) * 39 <= plan.train_size


@pytest.mark.parametrize("family", ["flat", "ivf_flat", "ivf_pq", "ivf_pq_refine", "hnsw"])
def test_explicit_families(family: str) -> None:
    eng = Engine(32, IndexSettings(family=family, pq_bytes=4))
    report = eng.build(data(6_000), np.arange(6_000))
    assert report["family"] == family
    assert eng.search(data(2, seed=3), 5).ids.shape == (2, 5)


def test_raw_factory_string_is_accepted() -> None:
    eng = Engine(32, IndexSettings(family="IVF64,SQ8"))
    report = eng.build(data(5_000), np.arange(5_000))
    assert report["factory"] == "IVF64,SQ8" and report["family"] == "factory"


@pytest.mark.parametrize("bad", ["bogus", "IVF,Nope", "Flat,Flat,Flat"])
def test_unknown_family_is_an_error_not_flat(bad: str) -> None:
    eng = Engine(32, IndexSettings(family=bad))
    with pytest.raises(UnknownFamily):
        eng.build(data(100), np.arange(100))
    assert eng.ntotal == 0


def _footprint(eng: Engine) -> int:
    """Real bytes: the serialized index + precomputed tables FAISS keeps + the raw store."""
    p = eng.state.primary
    assert p is not None
    real = faiss.serialize_index(p.index).nbytes + p.ids.nbytes + p.vectors.nbytes
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(p.index))
    except RuntimeError:
        return int(real)
    if isinstance(ivf, faiss.IndexIVFPQ) and ivf.use_precomputed_table:
        real += ivf.precomputed_table.size() * 4
    return int(real)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize(
    ("family", "n", "dim"),
    [
        ("flat", 8_000, 32),
        ("ivf_flat", 20_000, 32),
        ("ivf_pq", 6_000, 32),
        ("hnsw", 8_000, 32),
        ("IVF128,SQ8", 20_000, 32),
    ],
)
def test_memory_estimate_within_20_percent(metric: str, family: str, n: int, dim: int) -> None:
    cfg = IndexSettings(family=family, metric=metric, pq_bytes=4)  # type: ignore[arg-type]
    eng = Engine(dim, cfg)
    eng.build(data(n, dim), np.arange(n))
    plan = eng.state.primary.plan  # type: ignore[union-attr]
    real = _footprint(eng)
    assert 0.8 * real <= plan.estimate_bytes <= 1.2 * real, (plan.estimate_bytes, real)


def test_over_budget_steps_down_to_a_smaller_family() -> None:
    cfg = IndexSettings(family="flat")
    flat = choose_plan(100_000, 128, cfg, BIG)
    plan = choose_plan(100_000, 128, cfg, int(flat.estimate_bytes * 0.8))
    assert plan.family == "ivf_pq" and "stepped down" in plan.reason
    assert plan.estimate_bytes <= flat.estimate_bytes * 0.8


def test_over_budget_refusal_names_the_numbers_and_changes_nothing() -> None:
    eng = Engine(32, IndexSettings(memory_budget_bytes=10_000))
    with pytest.raises(MemoryBudgetExceeded, match=r"budget of .*MiB.*needs"):
        eng.build(data(6_000), np.arange(6_000))
    assert eng.ntotal == 0 and eng.state.primary is None


def test_default_budget_is_a_fraction_of_available_memory() -> None:
    budget = host_budget(IndexSettings(memory_fraction=0.5))
    assert 0 < budget < host_budget(IndexSettings(memory_fraction=1.0))
    assert host_budget(IndexSettings(memory_budget_bytes=123)) == 123
