"""Memory footprint estimates (checked before a build) and the host memory budget (cgroup-aware)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from faissq.config import IndexSettings

if TYPE_CHECKING:
    from faissq.index.policy import Plan

F32 = 4  # bytes per float32 component
ID = 8  # bytes per int64 id
# cgroup v1 writes "no limit" as the largest page-aligned int64, not as "max"
_UNLIMITED_V1 = 1 << 62


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
    """Resident bytes for plan: the index plus the raw store's ids (its vectors are on disk)."""
    return index_bytes(plan, code_size) + plan.ntotal * ID


def _read_int(path: Path) -> int | None:
    """An integer file of a cgroup folder; None when absent, unreadable or "max"."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _stat_field(path: Path, name: str) -> int:
    """One "name value" line of a memory.stat file (0 when absent)."""
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(" ")
            if key == name and value.strip().isdigit():
                return int(value)
    except (OSError, UnicodeDecodeError):
        pass
    return 0


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory-controller path) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _folders(base: Path, rel: str) -> list[Path]:
    """The cgroup folder of rel under base and its ancestors up to base (limits nest)."""
    here = base / rel.strip("/")
    if not here.is_dir():  # a private cgroup namespace shows the process's own group as base
        return [base]
    out = [here]
    while here != base and base in here.parents:
        here = here.parent
        out.append(here)
    return out


def cgroup_available_bytes(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """Memory this process's cgroup may still use: limit - usage + inactive file cache.

    The tightest limit of the group and its ancestors counts; cgroup v2 (memory.max) first,
    then v1 (memory/memory.limit_in_bytes). None when no limit is set or none can be read.
    """
    v2, v1 = _cgroup_paths(proc_cgroup)
    found: list[int] = []
    layouts = []
    if v2 is not None:
        layouts.append((root, v2, "memory.max", "memory.current", "inactive_file"))
    if v1 is not None:
        layouts.append((root / "memory", v1, "memory.limit_in_bytes", "memory.usage_in_bytes",
                        "total_inactive_file"))  # fmt: skip
    for base, rel, limit_name, usage_name, inactive in layouts:
        for folder in _folders(base, rel):
            limit = _read_int(folder / limit_name)
            if limit is None or limit >= _UNLIMITED_V1:
                continue
            usage = _read_int(folder / usage_name) or 0
            cache = _stat_field(folder / "memory.stat", inactive)
            found.append(max(0, limit - usage + min(cache, usage)))
        if found:
            break
    return min(found) if found else None


def available_host_bytes(
    meminfo: Path = Path("/proc/meminfo"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int:
    """Memory a build may use: MemAvailable, lowered to the cgroup's room under its limit.

    Inside a container /proc/meminfo shows the host's memory; the cgroup limit is what the
    kernel enforces, so reading only meminfo ends in an OOM kill instead of a typed refusal.
    """
    host = None
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
                break
    except (OSError, UnicodeDecodeError, ValueError, IndexError):
        pass
    if host is None:
        host = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    limited = cgroup_available_bytes(cgroup_root, proc_cgroup)
    return host if limited is None else min(host, limited)


def host_budget(cfg: IndexSettings, available: int | None = None) -> int:
    """Return the host memory budget: explicit bytes, else a fraction of available memory."""
    if cfg.memory_budget_bytes is not None:
        return cfg.memory_budget_bytes
    room = available if available is not None else available_host_bytes()
    return int(room * cfg.memory_fraction)


def format_bytes(n: int) -> str:
    """Render a byte count for messages (MiB/GiB, one decimal)."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.1f} MiB"
