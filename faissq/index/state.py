"""The engine's immutable state: primary index, delta, tombstones; swapped by one assignment."""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from faissq.errors import IndexNotReady
from faissq.index.attributes import AttrTable
from faissq.index.delta import Delta
from faissq.index.gpu import GpuCopy
from faissq.index.live import LiveLists
from faissq.index.params import (
    CallParams,
    ParamShape,
    ivf_of,
    make_params,
    not_selector,
    param_shape,
)
from faissq.index.policy import Plan
from faissq.index.validate import F32, I64

_SERIALS = itertools.count(1)


@dataclass(frozen=True, eq=False)
class Primary:
    """A built FAISS index plus the raw vectors of its (sorted) ids; immutable once published."""

    index: Any
    ids: I64
    vectors: F32
    plan: Plan
    gpu: GpuCopy | None = None
    gpu_reason: str = "CPU"
    live: LiveLists | None = None  # lists that upserts and deletes change in place (live.py)
    # names this index's quantizer to the delta rows it placed (a GPU copy keeps the serial)
    serial: int = field(default_factory=lambda: next(_SERIALS))

    @cached_property
    def coarse(self) -> Any | None:
        """The index as an IndexIVF when it is one itself (no pre-transform or id map) and is
        searched on the CPU: its quantizer places the delta's rows, which a search then scans
        in the lists the primary probes (a GPU copy probes on the device)."""
        if self.gpu is not None:
            return None
        idx = faiss.downcast_index(self.index)
        return idx if isinstance(idx, faiss.IndexIVF) else None

    @cached_property
    def quantizer(self) -> Any:
        """The coarse quantizer of `coarse` (one SWIG proxy, not one per search)."""
        return None if self.coarse is None else self.coarse.quantizer

    @cached_property
    def in_place(self) -> bool:
        """Whether upserts and deletes can change this index's lists in place (live.py): an
        IVF-Flat on a flat quantizer searched on the CPU (a GPU copy would not see them)."""
        ivf: Any = self.coarse
        if type(ivf) is not faiss.IndexIVFFlat:
            return False
        return isinstance(faiss.downcast_index(self.quantizer), faiss.IndexFlat)

    def lists_of(self, vectors: F32) -> I64 | None:
        """The coarse list of each vector (None: this index has no quantizer of its own)."""
        ivf = self.coarse
        if ivf is None or vectors.shape[0] == 0:
            return None
        return np.asarray(self.quantizer.assign(vectors, 1), dtype=np.int64).reshape(-1)

    @cached_property
    def plain_params(self) -> dict[tuple[int | None, int | None], CallParams]:
        """Reused parameter trees for calls without selectors (FAISS only reads them)."""
        return {}

    def params_for(self, nprobe: int | None, ef_search: int | None) -> CallParams:
        """SearchParameters for a call without selectors, built once per setting."""
        key = (nprobe, ef_search)
        call = self.plain_params.get(key)
        if call is None:
            call = make_params(self.shape, nprobe=nprobe, ef_search=ef_search, sel=None, keep=[])
            if len(self.plain_params) < 256:
                self.plain_params[key] = call
        return call

    @cached_property
    def lossy(self) -> bool:
        """Whether the family stores compressed codes (so exact refine changes results)."""
        if self.plan.pq_m:
            return True
        return any(tag in self.plan.factory for tag in ("PQ", "SQ", "LSH", "RaBitQ", "RQ", "LSQ"))

    @cached_property
    def shape(self) -> ParamShape:
        """Where per-call parameters go in this index (computed once, on first search)."""
        return param_shape(self.index)

    def imbalance(self) -> float:
        """IVF list-size imbalance factor (1.0: even, or not IVF), read under the lock of lists
        that change in place (live.py): another thread may be growing one."""
        ivf = ivf_of(self.index)
        if ivf is None:
            return 1.0
        with self.live.lock if self.live is not None else nullcontext():
            return float(ivf.invlists.imbalance_factor()) if ivf.ntotal else 1.0

    def rows_of(self, ids: I64) -> npt.NDArray[np.intp]:
        """Row of each id in the raw store, -1 where absent (vectorised binary search)."""
        if self.ids.size == 0 or ids.size == 0:
            return np.full(ids.shape, -1, dtype=np.intp)
        pos = np.searchsorted(self.ids, ids)
        pos_c = np.minimum(pos, self.ids.size - 1)
        return np.where(self.ids[pos_c] == ids, pos_c, -1)


@dataclass(frozen=True, eq=False)
class State:
    """Everything a search reads, consistent as of one committed mutation."""

    dim: int
    primary: Primary | None
    delta: Delta
    tombstones: I64  # sorted primary ids deleted since the primary was built
    version: int
    tomb_selector: tuple[Any, list[Any]] | None = field(default=None)
    # parameter trees holding tomb_selector, one per (nprobe, ef_search): FAISS only reads them
    tomb_params: dict[tuple[int | None, int | None], CallParams] = field(default_factory=dict)
    attrs: AttrTable | None = None  # attribute values of the live ids (None: no fields declared)

    @classmethod
    def make(
        cls,
        dim: int,
        primary: Primary | None,
        delta: Delta,
        tombstones: I64,
        version: int,
        *,
        before: State | None = None,
        attrs: AttrTable | None = None,
    ) -> State:
        """Build a State, precomputing the tombstone selector once for all its searches.

        before: the state this one follows; its selector is reused when the tombstones are the
        same array (a FAISS id set per state would churn the C++ heap on every upsert).
        attrs: the attribute table (None: the one of `before`, if any).
        """
        if attrs is None and before is not None:
            attrs = before.attrs
        if before is not None and before.tombstones is tombstones:
            sel = before.tomb_selector
        elif primary is not None and primary.live is not None:
            sel = None  # the tombstoned rows left the lists
        else:
            sel = not_selector(tombstones) if tombstones.size else None
        return cls(dim, primary, delta, tombstones, version, sel, attrs=attrs)

    def params_for(self, nprobe: int | None, ef_search: int | None) -> CallParams:
        """SearchParameters for a call filtered by the tombstones alone, built once per setting
        (a fresh SWIG tree per search: worker CPU per search, benchmarks/upsert_stream.py)."""
        if self.primary is None:
            raise IndexNotReady("a state without a primary has no search parameters")
        if self.tomb_selector is None:
            return self.primary.params_for(nprobe, ef_search)
        key = (nprobe, ef_search)
        call = self.tomb_params.get(key)
        if call is None:
            sel, keep = self.tomb_selector
            call = make_params(self.primary.shape, nprobe=nprobe, ef_search=ef_search, sel=sel,
                               keep=list(keep))  # fmt: skip
            if len(self.tomb_params) < 256:
                self.tomb_params[key] = call
        return call

    @cached_property
    def tomb_set(self) -> frozenset[int] | None:
        """The tombstones as a set, for the few ids of one answer (a set lookup per id costs a
        third of a vectorised search of the sorted array); None past TOMB_SET_MAX of them."""
        if self.tombstones.size > TOMB_SET_MAX:
            return None
        return frozenset(self.tombstones.tolist())

    @property
    def ntotal(self) -> int:
        """Live vectors: primary minus tombstones plus delta."""
        base = 0 if self.primary is None else int(self.primary.ids.size)
        return base - int(self.tombstones.size) + len(self.delta)

    def live_in_primary(self, ids: I64) -> npt.NDArray[np.bool_]:
        """Whether each id is in the primary and not tombstoned."""
        if self.primary is None:
            return np.zeros(ids.shape, dtype=bool)
        present = self.primary.rows_of(ids) >= 0
        if self.tombstones.size:
            present &= ~in_sorted(self.tombstones, ids)
        return present

    def contains(self, ids: I64) -> npt.NDArray[np.bool_]:
        """Whether each id is live (primary not tombstoned, or delta)."""
        return self.live_in_primary(ids) | self.delta.contains(ids)

    def vectors_of(self, ids: I64) -> tuple[npt.NDArray[np.bool_], F32]:
        """Whether each id is live, and its stored vector (zeros where not; cosine: normalised)."""
        found, out = self.delta.vectors_of(ids)
        if self.primary is not None:
            live = self.live_in_primary(ids) & ~found
            out[live] = self.primary.vectors[self.primary.rows_of(ids[live])]
            found |= live
        return found, out

    def tombstoned(self, ids: I64) -> I64:
        """The tombstones plus those of ids that have a copy in the primary."""
        if self.primary is None or ids.size == 0:
            return self.tombstones
        in_primary = self.primary.rows_of(ids) >= 0
        if not in_primary.any():
            return self.tombstones
        return union_sorted(self.tombstones, ids[in_primary])

    def live_ids(self) -> I64:
        """Every live id: the primary's not tombstoned, then the delta's."""
        if self.primary is None:
            return self.delta.ids
        kept = self.primary.ids[~in_sorted(self.tombstones, self.primary.ids)]
        return np.concatenate([kept, self.delta.ids])

    def live_vectors(self) -> tuple[I64, F32]:
        """All live (ids, vectors) from the raw store and the delta (a copy)."""
        parts_ids: list[I64] = []
        parts_vecs: list[F32] = []
        if self.primary is not None:
            keep = ~in_sorted(self.tombstones, self.primary.ids)
            parts_ids.append(self.primary.ids[keep])
            parts_vecs.append(self.primary.vectors[keep])
        parts_ids.append(self.delta.ids)
        parts_vecs.append(self.delta.vectors)
        return np.concatenate(parts_ids), np.concatenate(parts_vecs).reshape(-1, self.dim)


TOMB_SET_MAX = 1 << 15  # tombstones past this are looked up in the sorted array alone


def in_sorted(sorted_arr: I64, ids: I64) -> npt.NDArray[np.bool_]:
    """Vectorised membership of ids in a sorted array."""
    if sorted_arr.size == 0:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_arr, ids), sorted_arr.size - 1)
    return np.asarray(sorted_arr[pos] == ids)


def union_sorted(sorted_arr: I64, ids: I64) -> I64:
    """Sorted union of a sorted id array and any ids: the new ones are inserted in place (one
    copy, no sort of the whole), and the array itself comes back when none is new."""
    extra = np.unique(ids).astype(np.int64, copy=False)
    if sorted_arr.size == 0:
        return extra
    extra = extra[~in_sorted(sorted_arr, extra)]
    if extra.size == 0:
        return sorted_arr
    return np.insert(sorted_arr, np.searchsorted(sorted_arr, extra), extra)
