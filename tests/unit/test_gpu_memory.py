"""The GPU memory probe's seam on a CPU host: no nvidia-ml-py or no driver means no GPU budget."""

from __future__ import annotations

import sys

import faiss
import pytest

from faissq.config import GpuSettings
from faissq.index.gpu import GpuProbe, clone_to_gpu, device_budget, gpu_free_bytes

SEEN = GpuProbe(1, False, "1 GPU(s) visible")  # what faiss-gpu would report on a GPU host


def nvml_loads() -> bool:
    """Whether this host has the NVML driver library (a GPU host)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_without_nvidia_ml_py_there_is_no_free_memory_figure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert gpu_free_bytes(0) is None
    assert device_budget(GpuSettings(), SEEN) is None


def test_without_the_driver_library_the_probe_answers_none_and_the_index_stays_on_cpu() -> None:
    if nvml_loads():
        pytest.skip("this host has an NVIDIA driver")
    assert gpu_free_bytes(0) is None
    assert device_budget(GpuSettings(), SEEN) is None
    # free memory unknown: no budget refusal; the clone itself fails here (faiss-cpu)
    copy, reason = clone_to_gpu(faiss.IndexFlatIP(4), GpuSettings(), SEEN, need_bytes=1 << 40)
    assert copy is None and reason.startswith("CPU fallback: GPU clone failed")


def test_a_given_free_figure_is_used_without_asking_nvml() -> None:
    cfg = GpuSettings(memory_fraction=0.5, temp_memory_bytes=1 << 20)
    assert device_budget(cfg, SEEN, free_bytes=1 << 30) == (1 << 29) - (1 << 20)


@pytest.mark.gpu
def test_a_gpu_host_reports_free_memory() -> None:
    if not nvml_loads():
        pytest.skip("no NVIDIA driver on this host")
    free = gpu_free_bytes(0)
    assert free is not None and free > 0
