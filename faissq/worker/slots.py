"""One served index as the runtime holds it: lifecycle state, engine reference, log position."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from faissq.config import IndexSettings
    from faissq.index.engine import Engine
    from faissq.storage.recovery import Recovered


class IndexState(StrEnum):
    """Lifecycle of one served index in this process."""

    LOADING = "loading"  # snapshot load and log replay in progress; jobs wait for it
    EMPTY = "empty"  # nothing built or logged yet; a build or an upsert creates the index
    READY = "ready"  # loaded and replayed: serves searches and applies jobs
    REBUILDING = "rebuilding"  # a build/rebuild runs on a new object; the old one keeps serving
    DEGRADED = "degraded"  # serving, but on a fallback (GPU failed, older snapshot): see reason
    FAILED = "failed"  # could not load; jobs fail with IndexNotReady until a reload succeeds


SERVING = frozenset({IndexState.READY, IndexState.REBUILDING, IndexState.DEGRADED})


@dataclass
class IndexSlot:
    """One served index: its engine reference, state and the last log seq applied."""

    name: str
    state: IndexState = IndexState.LOADING
    engine: Engine | None = None
    reason: str = ""
    seq: int = 0
    version: str | None = None
    loaded_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    # an index created at runtime: its own index section (metric, family) and its dimension
    cfg: IndexSettings | None = None
    dim: int | None = None
    # replicas only, kept by the follower: the newest seq seen in the log, the seconds between
    # the writer logging the last applied entry and its application here, snapshot reloads
    log_seq: int = 0
    lag_s: float = 0.0
    reloads: int = 0


def small(report: Any) -> dict[str, Any]:
    """Keep a report JSON/msgpack friendly: numpy scalars to Python, arrays dropped."""
    if not isinstance(report, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in report.items():
        if isinstance(v, np.generic):
            out[str(k)] = v.item()
        elif isinstance(v, dict):
            out[str(k)] = small(v)
        elif isinstance(v, list | tuple):
            out[str(k)] = [small(x) if isinstance(x, dict) else plain(x) for x in v]
        elif isinstance(v, str | int | float | bool) or v is None:
            out[str(k)] = v
    return out


def plain(v: Any) -> Any:
    """A numpy scalar as its Python value; other values unchanged."""
    return v.item() if isinstance(v, np.generic) else v


def counts(slot: IndexSlot) -> dict[str, Any]:
    """The small numbers every job result carries."""
    eng = slot.engine
    if eng is None:
        return {"ntotal": 0, "version": None}
    return {"ntotal": int(eng.ntotal), "version": eng.version}


def role_status(slot: IndexSlot | None, role: str) -> dict[str, Any]:
    """Role and replication position of one index (None: dropped; its loop answers until purged)."""
    if slot is None:
        return {"role": role, "dropped": True}
    out: dict[str, Any] = {"role": role, "seq": slot.seq}
    if role == "replica":
        out["log_seq"] = max(slot.log_seq, slot.seq)
        out["behind"] = max(0, slot.log_seq - slot.seq)
        out["lag_seconds"] = round(slot.lag_s, 6)
        out["reloads"] = slot.reloads
    return out


def describe(slot: IndexSlot, role: str) -> dict[str, Any]:
    """One index for the stats job: state, seq, sizes and the engine's own stats."""
    out: dict[str, Any] = {
        "index": slot.name,
        "state": slot.state.value,
        "reason": slot.reason,
        "seq": slot.seq,
        "snapshot_version": slot.version,
        "load_seconds": round(slot.loaded_s, 6),
    }
    out.update(role_status(slot, role))
    if slot.engine is not None:
        out["engine"] = small(slot.engine.stats())
        out.update(counts(slot))
    return out


def install(slot: IndexSlot, rec: Recovered) -> None:
    """Publish a recovered engine: READY, or DEGRADED with the recovery's notes."""
    slot.engine, slot.seq, slot.version = rec.engine, rec.seq, rec.version
    slot.state = IndexState.DEGRADED if rec.notes else IndexState.READY
    slot.reason = "; ".join(rec.notes)


def swap(slot: IndexSlot, eng: Engine, saved: dict[str, Any]) -> None:
    """Publish a new engine to readers with one reference assignment."""
    slot.engine = eng
    seq = saved.get("seq")
    slot.seq = int(seq) if isinstance(seq, int) else slot.seq
    slot.version = saved.get("version") if isinstance(saved.get("version"), str) else None
    slot.state, slot.reason = IndexState.READY, ""
