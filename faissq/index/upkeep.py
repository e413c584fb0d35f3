"""An engine's upkeep: whether a merge or rebuild is due, and the stats that status shows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from faissq.errors import MemoryBudgetExceeded
from faissq.index.calibrate import Calibration
from faissq.index.memory import host_budget, raw_store_bytes
from faissq.index.policy import choose_plan

if TYPE_CHECKING:
    from faissq.index.engine import Engine
    from faissq.index.state import Primary


def maintenance(eng: Engine) -> dict[str, Any]:
    """Whether a merge or a rebuild is due, and why."""
    st, cfg = eng.state, eng.cfg
    reasons: list[str] = []
    merge_due = len(st.delta) >= cfg.merge_delta_max
    if merge_due:
        reasons.append(f"delta {len(st.delta)} >= merge_delta_max {cfg.merge_delta_max}")
    rebuild_due = False
    if st.primary is not None:
        imb = st.primary.imbalance()
        if imb > cfg.imbalance_rebuild:
            rebuild_due = True
            reasons.append(f"IVF imbalance {imb:.2f} > {cfg.imbalance_rebuild}")
        if eng.family_request == "auto":
            # the build's own calibration, scaled to today's size: no new measurement here
            cal = Calibration.from_dict(st.primary.plan.calibration)
            try:
                plan = choose_plan(
                    st.ntotal, eng.dim, cfg, host_budget(cfg), calibrator=lambda: cal
                )
            except MemoryBudgetExceeded as exc:
                plan = None
                reasons.append(f"{st.ntotal} vectors no longer fit: {exc}")
            if plan is not None and plan.family != st.primary.plan.family:
                rebuild_due = True
                reasons.append(f"{st.ntotal} vectors now call for {plan.family}")
    return {"merge_due": merge_due, "rebuild_due": rebuild_due, "reasons": reasons}


def stats(eng: Engine) -> dict[str, Any]:
    """Actual state, for the stats task, metrics and status."""
    st = eng.state
    p = st.primary
    plan = p.plan if p is not None else None
    tuning = eng.tuning_profile
    return {
        "name": eng.name,
        "dim": eng.dim,
        "metric": eng.metric,
        "family": plan.family if plan else None,
        "factory": plan.factory if plan else None,
        "ntotal": st.ntotal,
        "primary": int(p.ids.size) if p is not None else 0,
        "delta": len(st.delta),
        "tombstones": int(st.tombstones.size),
        "version": st.version,
        "imbalance": p.imbalance() if p is not None else 1.0,
        "device": p.gpu_reason if p is not None else "CPU",
        "gpu": p is not None and p.gpu is not None,
        "gpu_failures": p.gpu.failures if p is not None and p.gpu is not None else 0,
        "raw_bytes": raw_store_bytes(int(p.ids.size), eng.dim) if p is not None else 0,
        "delta_bytes": st.delta.nbytes,
        "delta_dead": st.delta.dead,
        "tuning": None if tuning is None else tuning.get("chosen"),
        **maintenance(eng),
    }


def report(eng: Engine, op: str, seconds: float, primary: Primary) -> dict[str, Any]:
    """The small dict a build, merge or rebuild returns."""
    plan = primary.plan
    return {
        "op": op,
        "family": plan.family,
        "factory": plan.factory,
        "reason": plan.reason,
        "ntotal": eng.ntotal,
        "estimate_bytes": plan.estimate_bytes,
        "raw_bytes": plan.raw_bytes,
        "calibration": plan.calibration,
        "seconds": round(seconds, 4),
        "version": eng.version,
        "device": primary.gpu_reason,
    }
