"""Memory footprint estimates (checked before a build) and the host memory budget."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from faissq.config import IndexSettings

if TYPE_CHECKING:
    from faissq.index.policy import Plan

F32 = 4  # bytes per float32 component
ID = 8  # bytes per int64 id


def raw_store_bytes(n: int, dim: int) -> int:
    """Bytes of the raw vectors + ids kept for exact refine, rebuild and snapshots."""
    return n * (dim * F32 + ID)


def index_bytes(plan: Plan, code_size: int | None = None) -> int:
    """Bytes of the FAISS index itself for plan.ntotal vectors."""
    n, d = plan.ntotal, plan.dim
    coarse = plan.nlist * d * F32  # IVF centroids held by the flat quantizer
    if plan.family == "flat":
        return n * (d * F32 + ID)
    if plan.family == "hnsw":
        m = plan.hnsw_m
        # level 0 keeps 2M int32 links, upper levels add ~M/(M-1); offsets (8) + levels (4)
        links = (2 * m + 1) * 4 + 12
        return n * (d * F32 + ID + links)
    if plan.family == "ivf_flat":
        return n * (d * F32 + ID) + coarse
    if plan.family in ("ivf_pq", "ivf_pq_refine"):
        code = -(-plan.pq_m * plan.pq_nbits // 8)
        codebooks = d * (1 << plan.pq_nbits) * F32
        rotation = d * d * F32 + d * F32 if plan.opq else 0
        # L2 by-residual IVF-PQ precomputes an nlist x M x 2**nbits float table
        table = plan.nlist * plan.pq_m * (1 << plan.pq_nbits) * F32 if plan.metric == "l2" else 0
        return n * (code + ID) + coarse + codebooks + rotation + table
    per_vector = code_size if code_size is not None else d * F32
    return n * (per_vector + ID) + coarse


def estimate_bytes(plan: Plan, code_size: int | None = None) -> int:
    """Total bytes for plan: the index plus the raw store kept beside it."""
    return index_bytes(plan, code_size) + raw_store_bytes(plan.ntotal, plan.dim)


def available_host_bytes() -> int:
    """Return MemAvailable from /proc/meminfo (total physical memory where that is unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def host_budget(cfg: IndexSettings) -> int:
    """Return the host memory budget: explicit bytes, else a fraction of available memory."""
    if cfg.memory_budget_bytes is not None:
        return cfg.memory_budget_bytes
    return int(available_host_bytes() * cfg.memory_fraction)


def format_bytes(n: int) -> str:
    """Render a byte count for messages (MiB/GiB, one decimal)."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.1f} MiB"
