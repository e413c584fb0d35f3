"""Per-call FAISS SearchParameters and id selectors: a search never mutates the shared index."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from faissq.index.validate import I64

BITMAP_MIN_BITS = 1 << 20  # ids below this always get a bitmap selector (128 KiB at most)


@dataclass
class CallParams:
    """A SearchParameters tree plus the Python objects that must outlive the call."""

    params: Any
    keep: list[Any] = field(default_factory=list)


def batch_selector(ids: I64) -> tuple[Any, list[Any]]:
    """Return an IDSelectorBatch over ids and the arrays it borrows from."""
    arr = np.ascontiguousarray(ids, dtype=np.int64)
    sel = faiss.IDSelectorBatch(int(arr.size), faiss.swig_ptr(arr))
    return sel, [arr, sel]


def bitmap_selector(ids: I64) -> tuple[Any, list[Any]] | None:
    """An IDSelectorBitmap over ids 0..max(ids), when that bitmap is small (at most 128 KiB or
    one byte per id, so at most what the id array itself takes); None when it is not."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size == 0 or int(arr.min()) < 0:
        return None
    bits = int(arr.max()) + 1
    if bits > max(BITMAP_MIN_BITS, 8 * int(arr.size)):
        return None
    member = np.zeros(bits, dtype=bool)
    member[arr] = True
    bitmap = np.packbits(member, bitorder="little")  # FAISS reads bit (id & 7) of byte id >> 3
    sel = faiss.IDSelectorBitmap(int(bitmap.size), faiss.swig_ptr(bitmap))
    return sel, [bitmap, sel]


_ALLOWED: dict[int, tuple[I64, Any, list[Any]]] = {}  # id(ids) -> (ids, selector, keep)
_ALLOWED_LOCK = threading.Lock()
ALLOWED_CACHED = 8  # allow sets whose selectors are kept (a filter's ids repeat per table) ...
ALLOWED_BYTES = 64 << 20  # ... holding at most this many bytes of ids


def allow_selector(ids: I64) -> tuple[Any, list[Any]]:
    """A selector passing exactly these sorted ids: a bitmap when they are dense enough, else
    an IDSelectorBatch; kept for the same array object, since a filter's result is one cached
    array per attribute table (an IDSelectorBatch of 100k ids costs milliseconds to build)."""
    key = id(ids)
    with _ALLOWED_LOCK:
        hit = _ALLOWED.get(key)
        if hit is not None and hit[0] is ids:
            return hit[1], hit[2]
    picked = bitmap_selector(ids)
    sel, keep = picked if picked is not None else batch_selector(ids)
    with _ALLOWED_LOCK:
        _ALLOWED[key] = (ids, sel, keep)  # the entry holds ids, so the id is not reused
        while len(_ALLOWED) > ALLOWED_CACHED or (
            len(_ALLOWED) > 1 and sum(v[0].nbytes for v in _ALLOWED.values()) > ALLOWED_BYTES
        ):
            _ALLOWED.pop(next(iter(_ALLOWED)))
    return sel, keep


def not_selector(ids: I64) -> tuple[Any, list[Any]]:
    """Return a selector that rejects exactly these ids: a bitmap when the ids are dense enough
    (one bit test per candidate where IDSelectorBatch hashes: IVF search CPU under tombstones,
    benchmarks/upsert_stream.py), else an IDSelectorBatch."""
    picked = bitmap_selector(ids)
    inner, keep = picked if picked is not None else batch_selector(ids)
    sel = faiss.IDSelectorNot(inner)
    return sel, [*keep, sel]


def combine(selectors: list[tuple[Any, list[Any]]]) -> tuple[Any, list[Any]]:
    """AND together selectors (None when the list is empty)."""
    if not selectors:
        return None, []
    sel, keep = selectors[0]
    keep = list(keep)
    for other, other_keep in selectors[1:]:
        sel = faiss.IDSelectorAnd(sel, other)
        keep.extend([*other_keep, sel])
    return sel, keep


@dataclass(frozen=True)
class ParamShape:
    """The layers of an index that take SearchParameters, read once per primary (not per call)."""

    pretransforms: int  # IndexPreTransform layers wrapping the searchable index
    kind: str  # "ivf", "hnsw" or "plain"
    nlist: int = 0
    default_nprobe: int = 1
    default_ef: int = 16


def param_shape(index: Any) -> ParamShape:
    """Walk pre-transforms and id maps down to the index whose parameters a search sets."""
    idx = faiss.downcast_index(index)
    layers = 0
    while True:
        if isinstance(idx, faiss.IndexPreTransform):
            layers += 1
            idx = faiss.downcast_index(idx.index)
        elif isinstance(idx, faiss.IndexIDMap | faiss.IndexIDMap2):
            # IndexIDMap translates the selector onto internal ids itself
            idx = faiss.downcast_index(idx.index)
        else:
            break
    if isinstance(idx, faiss.IndexIVF):
        return ParamShape(layers, "ivf", nlist=int(idx.nlist), default_nprobe=int(idx.nprobe))
    if isinstance(idx, faiss.IndexHNSW):
        return ParamShape(layers, "hnsw", default_ef=int(idx.hnsw.efSearch))
    return ParamShape(layers, "plain")


def make_params(
    shape: ParamShape, *, nprobe: int | None, ef_search: int | None, sel: Any, keep: list[Any]
) -> CallParams:
    """Build a fresh SearchParameters tree for one call (the shared index is never touched)."""
    p: Any
    if shape.kind == "ivf":
        p = faiss.SearchParametersIVF()
        p.nprobe = min(nprobe, shape.nlist) if nprobe is not None else shape.default_nprobe
    elif shape.kind == "hnsw":
        p = faiss.SearchParametersHNSW()
        p.efSearch = ef_search if ef_search is not None else shape.default_ef
    else:
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
    keep = [*keep, p]
    for _ in range(shape.pretransforms):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = p
        keep.append(outer)
        p = outer
    return CallParams(p, keep)


def ivf_of(index: Any) -> Any | None:
    """Return the IndexIVF inside index, or None when it has no inverted lists."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def hnsw_of(index: Any) -> Any | None:
    """Return the IndexHNSW inside an id map, or None."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexIDMap | faiss.IndexIDMap2):
        idx = faiss.downcast_index(idx.index)
    return idx if isinstance(idx, faiss.IndexHNSW) else None
