"""Family choice, nlist rule, memory estimate accuracy and the memory budget."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import pytest
from engine_support import data

from faissq.config import IndexSettings
from faissq.errors import MemoryBudgetExceeded, UnknownFamily
from faissq.index.calibrate import Calibration
from faissq.index.engine import Engine
from faissq.index.memory import host_budget
from faissq.index.policy import choose_plan, nlist_for

BIG = 1 << 50


def _cal(ivf_ms: float, hnsw_ms: float, *, flat_ms: float = 5.0, hnsw_recall: float = 0.97) -> Any:
    """A calibrator returning fixed sample figures (10k-vector sample, target 0.95)."""
    cal = Calibration(
        sample=10_000,
        target=0.95,
        overhead_ms=0.0,
        flat_ms=flat_ms,
        ivf_nlist=256,
        ivf_nprobe=8,
        ivf_recall=0.96,
        ivf_ms=ivf_ms,
        hnsw_ef=64,
        hnsw_recall=hnsw_recall,
        hnsw_ms=hnsw_ms,
        seconds=1.0,
    )
    return lambda: cal


def test_auto_below_flat_max_is_flat_without_calibration() -> None:
    def never() -> Calibration:
        raise AssertionError("calibrated a corpus below flat_max")

    assert choose_plan(4_999, 128, IndexSettings(), BIG, calibrator=never).family == "flat"


def test_auto_is_flat_while_exact_search_is_fast_enough() -> None:
    fast = choose_plan(20_000, 64, IndexSettings(), BIG, calibrator=_cal(0.05, 0.05, flat_ms=0.05))
    assert fast.family == "flat" and "flat 0.100 ms" in fast.reason
    slow = choose_plan(20_000, 64, IndexSettings(), BIG, calibrator=_cal(0.05, 0.05, flat_ms=0.3))
    assert slow.family != "flat"  # 0.6 ms: over flat_max_ms and slower than the others


def test_auto_picks_ivf_flat_when_lists_separate_the_data() -> None:
    plan = choose_plan(100_000, 384, IndexSettings(), BIG, calibrator=_cal(0.05, 0.3))
    assert plan.family == "ivf_flat" and plan.calibration is not None
    assert "calibrated on 10000 of 100000 vectors" in plan.reason and "budget" in plan.reason


def test_auto_picks_hnsw_when_ivf_must_scan_much_more() -> None:
    plan = choose_plan(100_000, 384, IndexSettings(), BIG, calibrator=_cal(2.0, 0.3))
    assert plan.family == "hnsw" and plan.factory == "IDMap,HNSW32,Flat"
    # a graph that never reached the target on the sample is never chosen
    plan = choose_plan(
        100_000, 384, IndexSettings(), BIG, calibrator=_cal(2.0, 0.3, hnsw_recall=0.9)
    )
    assert plan.family == "ivf_flat"


def test_auto_keeps_hnsw_off_a_gpu_and_fits_the_device_budget() -> None:
    cfg = IndexSettings()
    plan = choose_plan(100_000, 384, cfg, BIG, calibrator=_cal(2.0, 0.3), gpu_budget=BIG)
    assert plan.family == "ivf_flat"
    ivf = choose_plan(100_000, 384, cfg, BIG, family="ivf_flat")
    small = choose_plan(100_000, 384, cfg, BIG, calibrator=_cal(2.0, 0.3),
                        gpu_budget=ivf.estimate_bytes // 2)  # fmt: skip
    assert small.family == "ivf_pq_refine" and "GPU budget" in small.reason


def test_auto_compresses_only_when_nothing_uncompressed_fits() -> None:
    cfg = IndexSettings()
    ivf = choose_plan(1_000_000, 128, cfg, BIG, family="ivf_flat")
    plan = choose_plan(1_000_000, 128, cfg, ivf.estimate_bytes // 2, calibrator=_cal(0.1, 0.2))
    assert plan.family == "ivf_pq_refine" and not plan.opq and "raw vectors on disk" in plan.reason
    assert plan.estimate_bytes <= ivf.estimate_bytes // 2 < plan.raw_bytes
    with pytest.raises(MemoryBudgetExceeded, match="even ivf_pq_refine needs"):
        choose_plan(1_000_000, 128, cfg, 1 << 20, calibrator=_cal(0.1, 0.2))


def test_auto_without_refine_and_explicit_ivf_pq_keeps_opq() -> None:
    small = choose_plan(1_000_000, 128, IndexSettings(refine=False), 1 << 28)
    assert small.family == "ivf_pq" and not small.opq
    plan = choose_plan(1_000_000, 128, IndexSettings(family="ivf_pq"), BIG)
    assert plan.opq and plan.factory.startswith("OPQ32,IVF")
    odd = choose_plan(1_000_000, 100, IndexSettings(family="ivf_pq", pq_bytes=30), BIG)
    assert 100 % odd.pq_m == 0  # PQ sub-quantizers must divide the dimension


def test_auto_build_reports_its_calibration() -> None:
    eng = Engine(32, IndexSettings(flat_max=1_000, calibration_sample=1_500))
    report = eng.build(data(8_000), np.arange(8_000))
    cal = report["calibration"]
    assert cal["sample"] == 1_500 and cal["seconds"] > 0
    assert report["family"] in ("flat", "ivf_flat", "hnsw")
    assert "calibrated on 1500 of 8000" in report["reason"]


def test_calibration_measures_at_most_a_quarter_of_a_small_corpus() -> None:
    """Three indexes over the whole corpus would triple a small build's peak memory."""
    eng = Engine(32, IndexSettings(flat_max=1_000))
    report = eng.build(data(4_000), np.arange(4_000))
    assert report["calibration"]["sample"] == 1_000
    assert "calibrated on 1000 of 4000" in report["reason"]


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
    """Resident bytes: the serialized index + precomputed tables + the raw store's ids."""
    p = eng.state.primary
    assert p is not None
    assert isinstance(p.vectors, np.memmap)  # raw vectors live on disk
    real = faiss.serialize_index(p.index).nbytes + p.ids.nbytes
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
