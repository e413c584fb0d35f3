"""Choose the index family and its shape (nlist, PQ bytes, OPQ) from memory, recall and cost.

auto: among Flat, IVF-Flat and HNSW whose index fits the memory budget (the GPU's when the index
goes there), the one a build-time calibration (calibrate.py) finds fastest at the target recall;
compressed IVF-PQ only when none fits. Raw vectors always live on disk, memory-mapped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import faiss

from faissq.config import IndexSettings
from faissq.errors import InvalidParameter, MemoryBudgetExceeded, UnknownFamily
from faissq.index.calibrate import Calibration, estimate_ms
from faissq.index.memory import estimate_bytes, format_bytes, raw_store_bytes

FAMILIES = ("flat", "ivf_flat", "ivf_pq", "ivf_pq_refine", "hnsw")
# smaller-footprint fallbacks tried, in order, when a family is over the memory budget
_SMALLER = {
    "hnsw": "ivf_flat",
    "flat": "ivf_pq",
    "ivf_flat": "ivf_pq",
    "ivf_pq_refine": "ivf_pq",
}


@dataclass(frozen=True)
class Plan:
    """What will be built: family, FAISS factory string and the numbers behind it."""

    family: str
    factory: str
    metric: str
    dim: int
    ntotal: int
    train_size: int
    nlist: int = 0
    pq_m: int = 0
    pq_nbits: int = 0
    opq: bool = False
    refine: bool = False
    hnsw_m: int = 0
    reason: str = ""
    estimate_bytes: int = 0  # resident: the index and the ids of the raw store
    raw_bytes: int = 0  # raw vectors + ids, memory-mapped from disk
    calibration: dict[str, Any] | None = None  # calibrate.Calibration.to_dict() when auto
    centroid_dist: float = 0.0  # IVF: build vectors' mean distance to their centroid (drift.py)

    @property
    def is_ivf(self) -> bool:
        """Whether the index has inverted lists (nprobe applies)."""
        return self.nlist > 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (stored in snapshots and task results)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a Plan from to_dict() output, ignoring unknown keys."""
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        return cls(**known)


def nlist_for(n: int, cfg: IndexSettings) -> tuple[int, int]:
    """Return (nlist, train_size): factor x sqrt(n), never above train_size / 39 points."""
    target = max(1, round(cfg.nlist_factor * math.sqrt(n)))
    train = min(n, target * cfg.train_points_per_centroid)
    nlist = max(1, min(target, train // cfg.min_points_per_centroid))
    return nlist, train


def pq_shape(dim: int, cfg: IndexSettings, train_size: int) -> tuple[int, int, bool]:
    """Return (M, nbits, opq): M divides dim, nbits shrinks when the sample is small."""
    wanted = cfg.pq_bytes or max(1, dim // 4)
    wanted = max(1, min(wanted, dim))
    m = max(d for d in range(1, wanted + 1) if dim % d == 0)
    # a PQ codebook of 2**nbits centroids needs >= 39 training points per centroid
    nbits = max(1, min(8, int(math.log2(max(2, train_size // cfg.min_points_per_centroid)))))
    return m, nbits, cfg.opq and dim % m == 0 and m < dim


def _plan_family(family: str, n: int, dim: int, cfg: IndexSettings, reason: str) -> Plan:
    """Build the Plan of one named family for n vectors of dimension dim."""
    base = Plan(family=family, factory="", metric=cfg.metric, dim=dim, ntotal=n, train_size=0)
    if family == "flat":
        plan = replace(base, factory="IDMap,Flat")
    elif family == "hnsw":
        plan = replace(base, factory=f"IDMap,HNSW{cfg.hnsw_m},Flat", hnsw_m=cfg.hnsw_m)
    elif family == "ivf_flat":
        nlist, train = nlist_for(n, cfg)
        plan = replace(base, factory=f"IVF{nlist},Flat", nlist=nlist, train_size=train)
    elif family in ("ivf_pq", "ivf_pq_refine"):
        nlist, train = nlist_for(n, cfg)
        m, nbits, opq = pq_shape(dim, cfg, train)
        prefix = f"OPQ{m}," if opq else ""
        # "np": no polysemous training, which FAISS otherwise runs for PQ and we never search
        factory = f"{prefix}IVF{nlist},PQ{m}x{nbits}np"
        refine = family == "ivf_pq_refine"
        plan = replace(
            base,
            factory=factory,
            nlist=nlist,
            train_size=train,
            pq_m=m,
            pq_nbits=nbits,
            opq=opq,
            refine=refine,
        )
    else:
        raise UnknownFamily(f"unknown index family {family!r}; known: {', '.join(FAMILIES)}")
    return replace(
        plan,
        reason=reason,
        estimate_bytes=estimate_bytes(plan),
        raw_bytes=raw_store_bytes(n, dim),
    )


def _plan_factory(factory: str, n: int, dim: int, cfg: IndexSettings) -> Plan:
    """Plan a raw FAISS factory string, checking that FAISS accepts it."""
    try:
        probe = faiss.index_factory(dim, factory, _metric_type(cfg.metric))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected"
        raise UnknownFamily(
            f"{factory!r} is neither a family ({', '.join(FAMILIES)}) nor a valid FAISS "
            f"factory string: {first}"
        ) from None
    nlist = 0
    train = 0
    try:
        nlist = int(faiss.extract_index_ivf(probe).nlist)
        train = min(n, nlist * cfg.train_points_per_centroid)
    except RuntimeError:
        if not probe.is_trained:
            train = min(n, 65_536)
    plan = Plan(
        family="factory",
        factory=factory,
        metric=cfg.metric,
        dim=dim,
        ntotal=n,
        train_size=train,
        nlist=nlist,
        reason="explicit factory string",
    )
    return replace(
        plan,
        estimate_bytes=estimate_bytes(plan, code_size=int(probe.sa_code_size())),
        raw_bytes=raw_store_bytes(n, dim),
    )


def with_centroids(plan: Plan, nlist: int) -> Plan:
    """An IVF plan resized to given coarse centroids (a sharded build's shared quantizer), so
    every shard has the same lists and nprobe means the same on each; InvalidParameter else."""
    if not plan.is_ivf or plan.opq:
        raise InvalidParameter(
            f"centroids need an IVF family without OPQ (ivf_flat, or ivf_pq with index.opq off), "
            f"not {plan.factory!r}"
        )
    factory = re.sub(r"IVF\d+", f"IVF{nlist}", plan.factory, count=1)
    return replace(plan, factory=factory, nlist=nlist, reason=f"{plan.reason}; shared centroids")


def _metric_type(metric: str) -> int:
    """Map the metric name onto FAISS's constant."""
    return int(faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2)


Calibrator = Callable[[], Calibration | None]
UNCOMPRESSED = ("flat", "ivf_flat", "hnsw")


def _fmt_ms(ms: float) -> str:
    """Milliseconds for a reason string."""
    return "unreachable" if math.isinf(ms) else f"{ms:.3f} ms"


def _compressed(n: int, dim: int, cfg: IndexSettings, room: int, why: str) -> Plan:
    """IVF-PQ (refined from the memory-mapped raw vectors when cfg.refine), without OPQ.

    OPQ's rotation training is most of an IVF-PQ build's time; auto leaves it out, an explicit
    family (with index.opq) or a factory string can still ask for it.
    """
    fam = "ivf_pq_refine" if cfg.refine else "ivf_pq"
    plan = _plan_family(fam, n, dim, cfg.model_copy(update={"opq": False}), "")
    need = format_bytes(plan.estimate_bytes)
    if plan.estimate_bytes > room:
        raise MemoryBudgetExceeded(
            f"{n} x {dim} vectors do not fit the memory budget of {format_bytes(room)}: "
            f"{why}; even {fam} needs {need}"
        )
    return replace(plan, reason=f"{why}: {fam} needs {need} (raw vectors on disk)")


def _auto_plan(
    n: int, dim: int, cfg: IndexSettings, room: int, where: str, gpu: bool, calibrator: Calibrator
) -> Plan:
    """The auto choice: the fastest uncompressed family that fits room, else IVF-PQ."""
    plans = {f: _plan_family(f, n, dim, cfg, "") for f in UNCOMPRESSED}
    fits = {f: p for f, p in plans.items() if p.estimate_bytes <= room}
    if gpu:
        fits.pop("hnsw", None)  # index_cpu_to_gpu has no HNSW: it would search on the CPU
    sizes = ", ".join(f"{f} {format_bytes(p.estimate_bytes)}" for f, p in plans.items())
    budget = f"{where} budget {format_bytes(room)} ({sizes})"
    if not fits:
        return _compressed(n, dim, cfg, room, f"no uncompressed index fits the {budget}")
    if "flat" in fits and n < cfg.flat_max:
        return replace(fits["flat"], reason=f"{n} vectors < flat_max {cfg.flat_max}; {budget}")
    cal = calibrator() if len(fits) > 1 else None
    if cal is None:
        name = "ivf_flat" if "ivf_flat" in fits else next(iter(fits))
        return replace(fits[name], reason=f"{name}: fits the {budget}; not calibrated")
    est = {f: estimate_ms(cal, f, n, p.nlist) for f, p in fits.items()}
    approx = {f: ms for f, ms in est.items() if f != "flat"}
    best = min(approx, key=lambda f: approx[f]) if approx else "flat"
    if "flat" in est and (not approx or est["flat"] <= max(cfg.flat_max_ms, approx[best])):
        name = "flat"
    elif "hnsw" in approx and "ivf_flat" in approx:
        # HNSW builds several times slower than IVF-Flat: it must search clearly faster
        gain = approx["ivf_flat"] / approx["hnsw"]
        name = "hnsw" if gain >= cfg.hnsw_min_speedup else "ivf_flat"
    else:
        name = best
    measured = (
        f"calibrated on {cal.sample} of {n} vectors in {cal.seconds:.1f} s for "
        f"recall@10 >= {cal.target}: flat {cal.flat_ms:.3f} ms, ivf_flat {cal.ivf_ms:.3f} ms "
        f"(nprobe {cal.ivf_nprobe}/{cal.ivf_nlist}, recall {cal.ivf_recall}), hnsw "
        f"{cal.hnsw_ms:.3f} ms (efSearch {cal.hnsw_ef}, recall {cal.hnsw_recall})"
    )
    scaled = ", ".join(f"{f} {_fmt_ms(ms)}" for f, ms in est.items())
    reason = (
        f"{name}: {measured}; at {n} vectors ~{scaled} per query "
        f"(flat_max_ms {cfg.flat_max_ms}, hnsw_min_speedup {cfg.hnsw_min_speedup}); {budget}"
    )
    return replace(fits[name], reason=reason, calibration=cal.to_dict())


def _no_calibration() -> Calibration | None:
    """Calibrator used when the caller has no data at hand (the choice falls back to IVF-Flat)."""
    return None


def choose_plan(
    n: int,
    dim: int,
    cfg: IndexSettings,
    budget_bytes: int,
    family: str | None = None,
    *,
    calibrator: Calibrator = _no_calibration,
    gpu_budget: int | None = None,
) -> Plan:
    """Return the Plan for n vectors, stepping down to smaller families when over budget.

    calibrator: runs the build-time calibration (only called when auto has a real choice);
    gpu_budget: device bytes when the index will be cloned to a GPU (auto fits it there too).
    """
    wanted = (family or cfg.family).strip()
    if wanted == "auto":
        room = budget_bytes if gpu_budget is None else min(budget_bytes, gpu_budget)
        where = "host" if gpu_budget is None or budget_bytes <= gpu_budget else "GPU"
        return _auto_plan(n, dim, cfg, room, where, gpu_budget is not None, calibrator)
    if wanted in FAMILIES:
        plan = _plan_family(wanted, n, dim, cfg, f"family {wanted!r} asked for")
    else:
        plan = _plan_factory(wanted, n, dim, cfg)
    tried = [f"{plan.family} needs {format_bytes(plan.estimate_bytes)}"]
    while plan.estimate_bytes > budget_bytes:
        smaller = _SMALLER.get(plan.family)
        if smaller is None:
            raise MemoryBudgetExceeded(
                f"{n} x {dim} vectors do not fit the memory budget of "
                f"{format_bytes(budget_bytes)}: " + "; ".join(tried)
            )
        why = (
            f"{plan.family} needs {format_bytes(plan.estimate_bytes)} > budget "
            f"{format_bytes(budget_bytes)}: stepped down to {smaller}"
        )
        plan = _plan_family(smaller, n, dim, cfg, why)
        tried.append(f"{plan.family} needs {format_bytes(plan.estimate_bytes)}")
    return plan
