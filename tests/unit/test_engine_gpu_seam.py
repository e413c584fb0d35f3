"""GPU seam on CPU: probe, decisions, over-fetch past tombstones, top-k limit, failure fallback."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import pytest
from engine_support import data, exact, recall

from faissq.config import GpuSettings, IndexSettings
from faissq.index.engine import Engine
from faissq.index.gpu import GpuCopy, GpuProbe, clone_to_gpu, probe


class FlakyDevice:
    """A stand-in device index: a CPU clone that ignores selectors and can be told to fail."""

    def __init__(self, index: Any) -> None:
        self.index = faiss.clone_index(index)
        self.fail = False
        self.calls = 0

    def search(self, x: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.index.search(x, k)  # type: ignore[no-any-return]


def _engine(max_k: int = 2048) -> tuple[Engine, list[FlakyDevice], np.ndarray, np.ndarray]:
    devices: list[FlakyDevice] = []

    def cloner(index: Any) -> tuple[GpuCopy | None, str]:
        devices.append(FlakyDevice(index))
        return GpuCopy(devices[-1], max_k), "test device"

    eng = Engine(16, IndexSettings(family="flat"), cloner=cloner)
    xb = data(500, 16)
    ids = np.arange(500, dtype=np.int64) + 7
    eng.build(xb, ids)
    return eng, devices, xb, ids


def test_probe_on_a_cpu_build_reports_why() -> None:
    found = probe()
    if found.available:
        pytest.skip("this machine has a GPU")
    assert found.num_gpus == 0 and found.reason


def test_clone_decisions_without_a_gpu() -> None:
    idx = faiss.IndexFlatIP(4)
    none = GpuProbe(0, False, "faiss built without GPU support (faiss-cpu)")
    assert clone_to_gpu(idx, GpuSettings(mode="off"), none) == (
        None,
        "GPU disabled by settings (gpu.mode=off)",
    )
    copy, reason = clone_to_gpu(idx, GpuSettings(), none)
    assert copy is None and reason.startswith("CPU")


def test_gpu_memory_budget_is_checked_before_cloning() -> None:
    seen = GpuProbe(1, False, "1 GPU(s) visible")
    cfg = GpuSettings(memory_fraction=0.5, temp_memory_bytes=1 << 20)
    copy, reason = clone_to_gpu(faiss.IndexFlatIP(4), cfg, seen, 600 << 20, free_bytes=1 << 30)
    assert copy is None and "GPU budget 512.0 MiB" in reason and "600.0 MiB" in reason


def test_engine_with_gpu_settings_runs_on_cpu_here() -> None:
    eng = Engine(8, IndexSettings(), gpu=GpuSettings(mode="auto"))
    eng.build(data(100, 8), np.arange(100))
    stats = eng.stats()
    if not probe().available:
        assert stats["gpu"] is False and stats["device"].startswith("CPU")


def test_device_answers_and_tombstones_are_filtered_by_over_fetch() -> None:
    eng, devices, xb, ids = _engine()
    eng.delete(ids[:50])
    xq = xb[:20]
    res = eng.search(xq, 10)
    assert devices[-1].calls == 1
    assert not np.isin(res.ids, ids[:50]).any()
    truth = exact(xb[50:], ids[50:], xq, 10)
    assert recall(res.ids, truth) == 1.0


def test_allow_lists_and_k_above_the_device_limit_use_the_cpu_copy() -> None:
    eng, devices, xb, ids = _engine(max_k=16)
    eng.search(xb[:2], 8, allow_ids=ids[:30])
    eng.search(xb[:2], 20)
    assert devices[-1].calls == 0
    eng.search(xb[:2], 8)
    assert devices[-1].calls == 1


def test_device_failure_falls_back_and_is_reported_never_raised() -> None:
    eng, devices, xb, ids = _engine()
    devices[-1].fail = True
    res = eng.search(xb[:5], 5)
    assert res.ids[:, 0].tolist() == ids[:5].tolist()
    stats = eng.stats()
    assert stats["gpu_failures"] == 1
    assert "illegal memory access" in eng.state.primary.gpu.last_error  # type: ignore[union-attr]


def test_merge_reclones_to_the_device() -> None:
    eng, devices, xb, _ = _engine()
    eng.upsert([1, 2], data(2, 16, seed=9))
    eng.merge()
    assert len(devices) == 2
    assert eng.search(xb[:1], 1).version == eng.version


@pytest.mark.gpu
def test_real_gpu_clone_matches_cpu() -> None:
    if not probe().available:
        pytest.skip("no GPU on this machine")
    eng = Engine(32, IndexSettings(family="ivf_flat"), gpu=GpuSettings(mode="on"))
    xb = data(20_000, 32)
    eng.build(xb, np.arange(20_000))
    cpu = Engine(32, IndexSettings(family="ivf_flat"))
    cpu.build(xb, np.arange(20_000))
    a, b = eng.search(xb[:50], 10, nprobe=16), cpu.search(xb[:50], 10, nprobe=16)
    assert eng.stats()["gpu"] and recall(a.ids, b.ids) > 0.99


def test_nprobe_reaches_an_ivf_kept_under_a_cpu_pre_transform() -> None:
    """index_cpu_to_gpu keeps OPQ's IndexPreTransform on the CPU: nprobe must pass through it."""
    clones: list[Any] = []

    def cloner(index: Any) -> tuple[GpuCopy | None, str]:
        # the shape of a real device clone: a pre-transform over an IVF whose own nprobe is 1
        clones.append(faiss.clone_index(index))
        return GpuCopy(clones[-1], 2048), "test device"

    cfg = IndexSettings(family="ivf_pq", opq=True, pq_bytes=8, refine=False)
    eng = Engine(32, cfg, cloner=cloner)
    xb = data(6_000, 32)
    eng.build(xb, np.arange(6_000))
    assert isinstance(clones[-1], faiss.IndexPreTransform)
    xq = data(50, 32, seed=5)
    narrow = eng.search(xq, 10, nprobe=1, k_factor=1).ids
    wide = eng.search(xq, 10, nprobe=32, k_factor=1).ids
    assert not np.array_equal(narrow, wide)
    cpu = Engine(32, cfg)
    cpu.build(xb, np.arange(6_000))
    assert np.array_equal(wide, cpu.search(xq, 10, nprobe=32, k_factor=1).ids)


@pytest.mark.gpu
def test_real_gpu_opq_clone_honours_nprobe() -> None:
    if not probe().available:
        pytest.skip("no GPU on this machine")
    cfg = IndexSettings(family="ivf_pq", opq=True, pq_bytes=8, refine=False)
    eng = Engine(32, cfg, gpu=GpuSettings(mode="on"))
    eng.build(data(20_000, 32), np.arange(20_000))
    xq = data(50, 32, seed=5)
    assert eng.stats()["gpu"]
    narrow = eng.search(xq, 10, nprobe=1, k_factor=1).ids
    assert not np.array_equal(narrow, eng.search(xq, 10, nprobe=32, k_factor=1).ids)
