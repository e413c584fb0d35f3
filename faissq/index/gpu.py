"""GPU seam: probe, clone to GPU, and a search that falls back to the CPU copy on any failure."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from faissq.config import GpuSettings
from faissq.index.memory import format_bytes
from faissq.index.validate import F32, I64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuProbe:
    """What this process can do on a GPU: device count, cuVS, and why not when it cannot."""

    num_gpus: int
    cuvs: bool
    reason: str

    @property
    def available(self) -> bool:
        """Whether at least one GPU can be used."""
        return self.num_gpus > 0


_PROBE: list[GpuProbe] = []


def probe_once() -> GpuProbe:
    """Probe the GPU once per process (the answer does not change while it runs)."""
    if not _PROBE:
        _PROBE.append(probe())
    return _PROBE[0]


def probe() -> GpuProbe:
    """Look for faiss GPU symbols and devices, and for cuVS support in this faiss build."""
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "index_cpu_to_gpu"):
        return GpuProbe(0, False, "faiss built without GPU support (faiss-cpu)")
    try:
        n = int(faiss.get_num_gpus())
    except Exception as exc:  # a broken CUDA runtime must not stop a CPU service
        return GpuProbe(0, False, f"GPU probe failed: {exc}")
    cuvs = bool(getattr(faiss, "should_use_cuvs", None)) or hasattr(faiss, "GpuIndexCagra")
    if n == 0:
        return GpuProbe(0, cuvs, "faiss has GPU support but no device is visible")
    return GpuProbe(n, cuvs, f"{n} GPU(s) visible")


class GpuCopy:
    """A device copy of the primary index; calls are serialised (faiss GPU indexes are not
    thread-safe) and anything it cannot answer exactly is left to the CPU copy."""

    def __init__(self, device_index: Any, max_k: int, *, resources: Any = None) -> None:
        """Wrap device_index (the clone) with its top-k limit max_k; resources are kept alive."""
        self.index = device_index
        self.max_k = max_k
        self._resources = resources
        self._lock = threading.Lock()
        self.failures = 0
        self.last_error = ""
        self._layers, self._ivf = _nprobe_path(device_index)

    def _params(self, nprobe: int) -> tuple[Any, list[Any]]:
        """SearchParametersIVF wrapped once per pre-transform the clone kept on the CPU."""
        p = faiss.SearchParametersIVF()
        p.nprobe = nprobe
        keep = [p]
        for _ in range(self._layers):
            outer = faiss.SearchParametersPreTransform()
            outer.index_params = p
            keep.append(outer)
            p = outer
        return p, keep

    def search(
        self, queries: F32, k: int, nprobe: int | None, exclude: I64,
        allow: I64 | None = None, live: int = 0,
    ) -> tuple[F32, I64] | None:  # fmt: skip
        """Top-k on the device, over-fetching past excluded ids and ids outside `allow` (a
        filter's sorted ids, of `live` rows); None: use the CPU copy (also when fewer than k
        fetched rows pass, so a filtered answer never has holes)."""
        fetch = k + int(exclude.size)
        if allow is not None:  # expect the allowed share of rows among those fetched, twice
            fetch = math.ceil(2 * fetch * max(live, 1) / max(int(allow.size), 1))
        if fetch > self.max_k:
            return None
        try:
            with self._lock:
                if nprobe is not None and self._ivf:
                    params, _keep = self._params(nprobe)
                    scores, ids = self.index.search(queries, fetch, params=params)
                else:
                    scores, ids = self.index.search(queries, fetch)
        except Exception as exc:  # device errors degrade to the CPU copy, never to the caller
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("GPU search failed, answering from the CPU copy: %s", self.last_error)
            return None
        if exclude.size or allow is not None:
            drop = np.isin(ids, exclude) if exclude.size else np.zeros(ids.shape, dtype=bool)
            if allow is not None:
                drop |= ~np.isin(ids, allow)
                if bool(((~drop).sum(axis=1) < k).any()):
                    return None
            if drop.any():
                order = np.argsort(drop, axis=1, kind="stable")
                ids = np.where(drop, -1, ids)
                ids = np.take_along_axis(ids, order, axis=1)
                scores = np.take_along_axis(scores, order, axis=1)
        return scores[:, :k], ids[:, :k]


def _nprobe_path(index: Any) -> tuple[int, bool]:
    """(pre-transform layers, whether an IVF index lies under them) of a device clone.

    index_cpu_to_gpu keeps an IndexPreTransform (OPQ) on the CPU and moves only the IVF inside,
    so nprobe must travel down through SearchParametersPreTransform as on the CPU path.
    """
    layers = 0
    idx = index
    while isinstance(idx, faiss.IndexPreTransform):
        layers += 1
        idx = faiss.downcast_index(idx.index)
    return layers, isinstance(idx, faiss.Index) and hasattr(idx, "nprobe")


def gpu_free_bytes(device: int) -> int | None:
    """Free memory of a device as NVML reports it; None without nvidia-ml-py, a driver or a GPU."""
    try:
        import pynvml  # nvidia-ml-py, from the `gpu` extra
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver library on this host: there is no GPU to budget
        return None
    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device))
        return int(info.free)
    except pynvml.NVMLError as exc:
        log.warning("GPU %d: free memory unknown (%s); cloning without a budget check", device,
                    exc)  # fmt: skip
        return None
    finally:
        pynvml.nvmlShutdown()


def device_budget(cfg: GpuSettings, found: GpuProbe, free_bytes: int | None = None) -> int | None:
    """Bytes an index may take on the configured GPU; None when it will not go to one."""
    if cfg.mode == "off" or not found.available:
        return None
    free = free_bytes if free_bytes is not None else gpu_free_bytes(cfg.device)
    if free is None:
        return None
    return max(0, int(free * cfg.memory_fraction) - cfg.temp_memory_bytes)


def clone_to_gpu(
    cpu_index: Any,
    cfg: GpuSettings,
    found: GpuProbe,
    need_bytes: int = 0,
    free_bytes: int | None = None,
) -> tuple[GpuCopy | None, str]:
    """Clone cpu_index to the configured device; return (copy or None, reason for the choice).

    need_bytes: estimated device footprint, checked against gpu.memory_fraction of free_bytes
    (read from NVML when not given) before any allocation, so a large index stays on the
    CPU with a reason instead of failing half-way on the device.
    """
    if cfg.mode == "off":
        return None, "GPU disabled by settings (gpu.mode=off)"
    if not found.available:
        return None, f"CPU: {found.reason}"
    free = free_bytes if free_bytes is not None else gpu_free_bytes(cfg.device)
    budget = None if free is None else int(free * cfg.memory_fraction)
    if budget is not None and need_bytes + cfg.temp_memory_bytes > budget:
        return None, (
            f"CPU fallback: index needs {format_bytes(need_bytes)} + "
            f"{format_bytes(cfg.temp_memory_bytes)} scratch > GPU budget {format_bytes(budget)}"
        )
    try:
        res = faiss.StandardGpuResources()
        res.setTempMemory(cfg.temp_memory_bytes)
        opts = faiss.GpuClonerOptions()
        opts.useFloat16 = cfg.fp16
        if hasattr(opts, "use_cuvs"):
            opts.use_cuvs = bool(cfg.use_cuvs and found.cuvs)
        device_index = faiss.index_cpu_to_gpu(res, cfg.device, cpu_index, opts)
    except Exception as exc:  # unsupported family, out of device memory, driver trouble
        return None, f"CPU fallback: GPU clone failed: {type(exc).__name__}: {exc}"
    cuvs = " with cuVS" if found.cuvs and cfg.use_cuvs else ""
    return GpuCopy(device_index, cfg.max_k, resources=res), f"GPU {cfg.device}{cuvs}"
