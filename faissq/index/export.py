"""The engine's state as plain arrays for snapshots, and the parts of a state rebuilt from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from faissq.index.delta import Delta
from faissq.index.policy import Plan
from faissq.index.state import Primary, State
from faissq.index.validate import F32, I64

_EMPTY: I64 = np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class EngineExport:
    """A consistent, read-only view of the engine for snapshots."""

    dim: int
    metric: str
    plan: dict[str, Any]
    index: Any
    primary_ids: I64
    primary_vectors: F32
    delta_ids: I64
    delta_vectors: F32
    tombstones: I64
    tuning: dict[str, Any] | None
    attributes: bytes = b""  # the attribute table (AttrTable.to_bytes); b"": no fields


def export_state(st: State, metric: str, tuning: dict[str, Any] | None) -> EngineExport:
    """The arrays of one committed state (not copied) plus its plan and tuning profile."""
    p = st.primary
    return EngineExport(
        dim=st.dim,
        metric=metric,
        plan=p.plan.to_dict() if p is not None else {},
        index=p.index if p is not None else None,
        primary_ids=p.ids if p is not None else _EMPTY,
        primary_vectors=p.vectors if p is not None else np.empty((0, st.dim), np.float32),
        delta_ids=st.delta.ids,
        delta_vectors=st.delta.vectors,
        tombstones=st.tombstones,
        tuning=tuning,
        attributes=st.attrs.to_bytes() if st.attrs is not None else b"",
    )


def restore_parts(exp: EngineExport) -> tuple[Primary | None, Delta, I64]:
    """Primary (without a GPU copy), delta and sorted tombstones of an export."""
    primary = None
    if exp.index is not None:
        ids, vecs = exp.primary_ids, exp.primary_vectors
        if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            order = np.argsort(ids, kind="stable")
            ids, vecs = ids[order], vecs[order]
        # sorted arrays (what export_state writes) are used as given: a memory-mapped .npy
        # stays mapped, so a restart does not copy the raw store
        primary = Primary(
            index=exp.index,
            ids=np.asarray(ids, dtype=np.int64),
            vectors=np.asarray(vecs, dtype=np.float32),
            plan=Plan.from_dict(exp.plan),
        )
    delta = Delta(exp.dim).appended(
        np.asarray(exp.delta_ids, dtype=np.int64),
        np.asarray(exp.delta_vectors, dtype=np.float32).reshape(-1, exp.dim),
    )
    return primary, delta, np.unique(np.asarray(exp.tombstones, dtype=np.int64))
