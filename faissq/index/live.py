"""An IVF-Flat primary whose lists upserts and deletes change in place, under a lock.

Under a steady upsert stream a search then stays one FAISS call over the lists, as without
writes: no delta scanned beside it, no tombstones dropped after it (benchmarks/upsert_stream.py).
The State still records the delta and the tombstones (their raw vectors serve fetch, export and
merge); the lists already hold what they say. FAISS grows a list by reallocating it, which a
scan running beside it must not see: the writer's changes and every FAISS call on the lists
take one lock.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from faissq.index.validate import F32, I64

if TYPE_CHECKING:
    from faissq.index.delta import Delta
    from faissq.index.state import Primary, State


CHUNK = 4096  # rows changed per hold of the lock (4 ms at 128-d on a 2-core VM; 100 rows 0.15)


class LiveLists:
    """The lists of one IVF-Flat index, changed in place; shared by the primaries a merge
    makes of it (a merge rewrites the raw store alone: the lists already hold the delta)."""

    def __init__(self, index: Any) -> None:
        """Take over `index` (an IndexIVFFlat): from now on it changes only through here."""
        ivf = faiss.downcast_index(index)
        # id -> (list, offset): a removal is one lookup, not a scan of every list
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        self.ivf = ivf
        self.lock = threading.Lock()

    def put(self, ids: I64, vectors: F32, lists: I64) -> None:
        """Insert or replace rows whose coarse lists are known: an id's old copy leaves and its
        new row enters in one step, so no search sees it twice or not at all. A large batch
        goes in chunks of CHUNK rows, so a search waits for one chunk at most."""
        ptr = faiss.swig_ptr
        for start in range(0, int(ids.size), CHUNK):
            keys = np.ascontiguousarray(ids[start : start + CHUNK], dtype=np.int64)
            rows = np.ascontiguousarray(vectors[start : start + CHUNK], dtype=np.float32)
            where = np.ascontiguousarray(lists[start : start + CHUNK], dtype=np.int64)
            n = int(keys.size)
            sel = faiss.IDSelectorArray(n, ptr(keys))
            with self.lock:
                self.ivf.remove_ids(sel)  # ids not in the lists are skipped
                self.ivf.add_core(n, ptr(rows), ptr(keys), ptr(where))

    def remove(self, ids: I64) -> int:
        """Drop these ids from the lists, CHUNK at a time (absent ones are skipped); how many
        were there."""
        gone = 0
        for start in range(0, int(ids.size), CHUNK):
            keys = np.ascontiguousarray(ids[start : start + CHUNK], dtype=np.int64)
            sel = faiss.IDSelectorArray(int(keys.size), faiss.swig_ptr(keys))
            with self.lock:
                gone += int(self.ivf.remove_ids(sel))
        return gone

    def search(self, xq: F32, k: int, params: Any) -> tuple[F32, I64]:
        """FAISS's top-k over the lists as they stand."""
        with self.lock:
            return self.ivf.search(xq, k, params=params)  # type: ignore[no-any-return]

    def range_search(self, xq: F32, radius: float, params: Any) -> tuple[Any, F32, I64]:
        """FAISS's range search over the lists as they stand (limits, scores, ids)."""
        with self.lock:
            return self.ivf.range_search(xq, radius, params=params)  # type: ignore[no-any-return]


def attach(primary: Primary, delta: Delta, tombstones: I64, enabled: bool = True) -> Primary:
    """`primary` with its lists changed in place from now on, the delta's rows put and the
    tombstoned ids removed (a snapshot holds them apart); as it is where its lists cannot be
    (not IVF-Flat on a flat quantizer on the CPU) or `enabled` is off."""
    if not enabled or primary.live is not None or not primary.in_place:
        return primary
    live = LiveLists(primary.index)
    live.remove(tombstones)
    lists = primary.lists_of(delta.vectors)
    if lists is not None:
        live.put(delta.ids, delta.vectors, lists)
    return replace(primary, live=live)


def unmerged(st: State) -> bool:
    """Whether a state's live lists hold rows its primary's raw store does not (the delta) or
    lack some it does (the tombstones): a snapshot would then save lists and arrays that
    disagree, so the engine merges first."""
    p = st.primary
    return p is not None and p.live is not None and bool(len(st.delta) or st.tombstones.size)
