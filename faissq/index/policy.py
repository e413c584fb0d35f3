"""Choose the index family and its shape (nlist, PQ bytes, OPQ) from the corpus size and memory."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import faiss

from faissq.config import IndexSettings
from faissq.errors import MemoryBudgetExceeded, UnknownFamily
from faissq.index.memory import estimate_bytes, format_bytes

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
    estimate_bytes: int = 0

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
    return replace(plan, reason=reason, estimate_bytes=estimate_bytes(plan))


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
    return replace(plan, estimate_bytes=estimate_bytes(plan, code_size=int(probe.sa_code_size())))


def _metric_type(metric: str) -> int:
    """Map the metric name onto FAISS's constant."""
    return int(faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2)


def _auto_family(n: int, cfg: IndexSettings) -> tuple[str, str]:
    """Return (family, reason) from the corpus-size tiers."""
    if n < cfg.flat_max:
        return "flat", f"{n} vectors < flat_max {cfg.flat_max}: exact search is cheap"
    if n < cfg.ivf_flat_max:
        return "ivf_flat", f"{n} vectors < ivf_flat_max {cfg.ivf_flat_max}: IVF-Flat"
    fam = "ivf_pq_refine" if cfg.refine else "ivf_pq"
    return fam, f"{n} vectors >= ivf_flat_max {cfg.ivf_flat_max}: compressed IVF-PQ"


def choose_plan(
    n: int, dim: int, cfg: IndexSettings, budget_bytes: int, family: str | None = None
) -> Plan:
    """Return the Plan for n vectors, stepping down to smaller families when over budget."""
    wanted = (family or cfg.family).strip()
    if wanted == "auto":
        name, reason = _auto_family(n, cfg)
        plan = _plan_family(name, n, dim, cfg, reason)
    elif wanted in FAMILIES:
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
